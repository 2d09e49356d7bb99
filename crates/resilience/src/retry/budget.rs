//! A retry budget shared by all requests to an upstream: Finagle's algorithm.
//!
//! Every request deposits a fraction of a token, every retry withdraws a whole
//! one, and both are forgotten after `ttl`; on top of that a reserve of
//! `min_per_sec * ttl` retries per `ttl` lets a quiet client retry at all. So
//! retries stay below `percent`% of recent requests plus the minimum, and a
//! struggling upstream is never hit by a retry storm.
//!
//! tower's `TpsBudget` implements the same algorithm, but it turns the
//! percent into a whole number of deposits per retry with a truncating
//! division (0.3 becomes one retry per 3 deposits, i.e. 33%), so it can allow
//! more than the configured percent, and it takes a mutex on every deposit.
//! This one keeps the exact fraction in fixed point and deposits with one
//! atomic add; only withdrawals (retries, which are rare) take a lock, which is
//! what keeps two concurrent withdrawals from spending the same token.

use super::error::InvalidBudget;
use crate::clock::{Clock, duration_nanos};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// One retry costs this many units; a deposit earns `percent * 10` of them.
const UNITS_PER_RETRY: i64 = 1000;
const SLOTS: u64 = 10;
/// The largest `min_per_sec` accepted.
pub const MAX_MIN_PER_SEC: u32 = 1_000_000;

/// A retry budget: `deposit` once per request, `withdraw` before each retry.
///
/// ```
/// use std::time::Duration;
/// use switchboard_resilience::retry::RetryBudget;
///
/// // 20% of requests, plus 1 retry per second, remembered for 10 seconds.
/// let budget = RetryBudget::new(Duration::from_secs(10), 1, 20.0).unwrap();
/// let retries = (0..100)
///     .map(|_| { budget.deposit(); budget.withdraw() })
///     .filter(|ok| *ok)
///     .count();
/// assert_eq!(retries, 20 + 10);
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    /// Units added and spent, per tenth of the ttl.
    slots: Box<[AtomicI64]>,
    /// The slot number (time / width) the slots currently end at.
    current: AtomicU64,
    width: u64,
    deposit_units: i64,
    reserve_units: i64,
    clock: Clock,
    /// Serializes withdrawals and slot rotation.
    lock: Mutex<()>,
    config: (Duration, u32, f64),
}

impl RetryBudget {
    /// A budget allowing `percent`% of the requests of the last `ttl` to be
    /// retried (20.0 means one retry per five requests; up to 1000), plus
    /// `min_per_sec` retries per second of `ttl`.
    pub fn new(ttl: Duration, min_per_sec: u32, percent: f64) -> Result<Self, InvalidBudget> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(InvalidBudget::Ttl(ttl));
        }
        if !(0.0..=1000.0).contains(&percent) {
            return Err(InvalidBudget::Percent(percent));
        }
        if min_per_sec > MAX_MIN_PER_SEC {
            return Err(InvalidBudget::MinPerSec {
                value: min_per_sec,
                max: MAX_MIN_PER_SEC,
            });
        }
        // Fixed point with 0.1% resolution, rounded down so the budget never
        // allows more than asked.
        let deposit_units = (percent * 10.0 + 1e-9).floor() as i64;
        let reserve_units =
            (f64::from(min_per_sec) * ttl.as_secs_f64()).floor() as i64 * UNITS_PER_RETRY;
        Ok(Self {
            slots: (0..SLOTS).map(|_| AtomicI64::new(0)).collect(),
            current: AtomicU64::new(0),
            width: (duration_nanos(ttl) / SLOTS).max(1),
            deposit_units,
            reserve_units,
            clock: Clock::new(),
            lock: Mutex::new(()),
            config: (ttl, min_per_sec, percent),
        })
    }

    /// The `(ttl, min_per_sec, percent)` this budget was built with.
    pub fn config(&self) -> (Duration, u32, f64) {
        self.config
    }

    /// Records one request (not a retry): earns `percent`% of a retry.
    pub fn deposit(&self) {
        if self.deposit_units == 0 {
            return;
        }
        let slot = self.slot_now();
        self.slots[(slot % SLOTS) as usize].fetch_add(self.deposit_units, Ordering::AcqRel);
    }

    /// Spends one retry if the budget has it; false means do not retry.
    pub fn withdraw(&self) -> bool {
        let _guard = self.lock.lock();
        let slot = self.slot_now_locked();
        if self.balance_units() < UNITS_PER_RETRY {
            return false;
        }
        self.slots[(slot % SLOTS) as usize].fetch_sub(UNITS_PER_RETRY, Ordering::AcqRel);
        true
    }

    /// How many retries the budget would allow right now.
    pub fn available(&self) -> u64 {
        let _guard = self.lock.lock();
        self.slot_now_locked();
        u64::try_from(self.balance_units() / UNITS_PER_RETRY).unwrap_or(0)
    }

    fn balance_units(&self) -> i64 {
        self.reserve_units
            + self
                .slots
                .iter()
                .map(|s| s.load(Ordering::Acquire))
                .sum::<i64>()
    }

    /// The current slot number, expiring the slots that left the ttl if no
    /// one else is busy doing so (then the deposit lands one slot early, which
    /// only makes it expire sooner: the budget gets stricter, never looser).
    fn slot_now(&self) -> u64 {
        let target = self.clock.now() / self.width;
        let current = self.current.load(Ordering::Acquire);
        if target <= current {
            return current;
        }
        match self.lock.try_lock() {
            Some(_guard) => self.rotate_locked(target),
            None => self.current.load(Ordering::Acquire),
        }
    }

    /// Like `slot_now`, for callers that hold the lock.
    fn slot_now_locked(&self) -> u64 {
        self.rotate_locked(self.clock.now() / self.width)
    }

    fn rotate_locked(&self, target: u64) -> u64 {
        let current = self.current.load(Ordering::Acquire);
        if target <= current {
            return current;
        }
        for n in 1..=(target - current).min(SLOTS) {
            self.slots[((current + n) % SLOTS) as usize].store(0, Ordering::Release);
        }
        self.current.store(target, Ordering::Release);
        target
    }
}

impl Default for RetryBudget {
    /// Finagle's default: 20% of requests plus 10 retries per second, over 10 seconds.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 20.0).expect("valid default")
    }
}

impl tower::retry::budget::Budget for RetryBudget {
    fn deposit(&self) {
        RetryBudget::deposit(self);
    }

    fn withdraw(&self) -> bool {
        RetryBudget::withdraw(self)
    }
}
