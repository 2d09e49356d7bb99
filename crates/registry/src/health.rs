//! The threshold state machine that turns check results into a status.
//!
//! Pure and clock-free so it can be property-tested; the checker tasks in
//! [`crate::registry`] feed it.

use crate::model::Status;

/// The result of one active check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    /// HTTP 2xx, or the TCP connect succeeded.
    Pass,
    /// HTTP 429: alive but overloaded.
    Warn,
    /// Any other HTTP status, no answer, refused, timed out.
    Fail,
}

impl CheckResult {
    /// The status this result points to.
    pub fn target(self) -> Status {
        match self {
            CheckResult::Pass => Status::Passing,
            CheckResult::Warn => Status::Warning,
            CheckResult::Fail => Status::Critical,
        }
    }

    /// Classifies an HTTP status code.
    pub fn from_http_status(code: u16) -> Self {
        match code {
            200..=299 => CheckResult::Pass,
            429 => CheckResult::Warn,
            _ => CheckResult::Fail,
        }
    }
}

/// Status of one instance under thresholds.
///
/// A result that points to a different status than the current one must repeat
/// `healthy_threshold` times in a row to improve the status and
/// `unhealthy_threshold` times to degrade it, so a check that flaps does not
/// make the status flap. The one exception is the first result of a freshly
/// registered instance: it starts `critical` and its first passing (or warning)
/// check makes it routable at once, so a new instance gets traffic after one
/// check rather than `healthy_threshold` intervals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    status: Status,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    streak_target: Status,
    streak: u32,
    fresh: bool,
}

impl HealthState {
    /// A newly registered instance: `critical` until its first good check.
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        HealthState {
            status: Status::Critical,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            streak_target: Status::Critical,
            streak: 0,
            fresh: true,
        }
    }

    /// Continues from a known status (e.g. a check taken over from another process).
    pub fn resume(status: Status, healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        HealthState {
            status,
            fresh: false,
            streak_target: status,
            ..Self::new(healthy_threshold, unhealthy_threshold)
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Forces the status (used to roll back a transition that could not be stored).
    pub fn set_status(&mut self, status: Status) {
        self.status = status;
    }

    /// Feeds one result; returns the new status when it changed.
    pub fn observe(&mut self, result: CheckResult) -> Option<Status> {
        let target = result.target();
        if target == self.streak_target {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak_target = target;
            self.streak = 1;
        }
        if target == self.status {
            if target != Status::Critical {
                self.fresh = false;
            }
            return None;
        }
        let needed = if self.fresh && target != Status::Critical {
            1
        } else if target.rank() > self.status.rank() {
            self.healthy_threshold
        } else {
            self.unhealthy_threshold
        };
        if self.streak >= needed {
            self.status = target;
            if target != Status::Critical {
                self.fresh = false;
            }
            Some(target)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckResult::{Fail, Pass, Warn};
    use proptest::prelude::*;

    fn run(state: &mut HealthState, results: &[CheckResult]) -> Vec<Option<Status>> {
        results.iter().map(|r| state.observe(*r)).collect()
    }

    #[test]
    fn first_pass_makes_new_instance_passing() {
        let mut s = HealthState::new(2, 3);
        assert_eq!(s.status(), Status::Critical);
        assert_eq!(s.observe(Fail), None);
        assert_eq!(s.observe(Pass), Some(Status::Passing));
    }

    #[test]
    fn thresholds_apply_after_first_pass() {
        let mut s = HealthState::new(2, 3);
        s.observe(Pass);
        assert_eq!(run(&mut s, &[Fail, Fail]), [None, None]);
        assert_eq!(s.observe(Fail), Some(Status::Critical));
        assert_eq!(s.observe(Pass), None);
        assert_eq!(s.observe(Pass), Some(Status::Passing));
        // a flapping check never flips
        assert!(
            run(&mut s, &[Fail, Pass, Fail, Fail, Pass, Fail])
                .iter()
                .all(Option::is_none)
        );
    }

    #[test]
    fn warning_is_its_own_state() {
        let mut s = HealthState::resume(Status::Passing, 2, 2);
        assert_eq!(run(&mut s, &[Warn, Warn]), [None, Some(Status::Warning)]);
        assert_eq!(run(&mut s, &[Pass, Pass]), [None, Some(Status::Passing)]);
        let mut s = HealthState::resume(Status::Critical, 2, 2);
        assert_eq!(run(&mut s, &[Warn, Warn]), [None, Some(Status::Warning)]);
    }

    proptest! {
        /// No status change without `threshold` identical results in a row (after the first pass).
        #[test]
        fn never_flips_below_threshold(
            healthy in 1u32..5, unhealthy in 1u32..5,
            results in proptest::collection::vec(prop_oneof![Just(Pass), Just(Warn), Just(Fail)], 0..60)
        ) {
            let mut s = HealthState::resume(Status::Passing, healthy, unhealthy);
            let mut streak: (Option<CheckResult>, u32) = (None, 0);
            for r in results {
                streak = if streak.0 == Some(r) { (Some(r), streak.1 + 1) } else { (Some(r), 1) };
                let before = s.status();
                if let Some(new) = s.observe(r) {
                    prop_assert_eq!(new, r.target());
                    let need = if new.rank() > before.rank() { healthy } else { unhealthy };
                    prop_assert!(streak.1 >= need);
                }
            }
        }
    }
}
