//! The sliding windows the breaker computes its rates over, lock-free.
//!
//! Both windows are written on every call that gets a verdict, from many
//! threads at once, so neither takes a lock on that path:
//!
//! - [`CountWindow`] is a ring of outcome words plus one packed counter word.
//!   A writer claims the next ring slot, swaps its outcome in, and folds the
//!   difference into the counters with a compare-and-swap. Slots and counters
//!   carry the tag of the breaker epoch they were written in, so resetting the
//!   window is one store, and a writer from an earlier epoch (it raced a state
//!   change) is detected and undone instead of corrupting the new window.
//! - [`TimeWindow`] is ten buckets of atomic counters; the one writer that sees
//!   time move into a new bucket zeroes the expired buckets under a mutex, which
//!   happens once per bucket width, never per call.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Calls, failures and slow calls currently in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failed: u64,
    pub(crate) slow: u64,
}

/// What recording one outcome did to a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// The counts changed; these are the new counts.
    Changed(Counts),
    /// The outcome replaced an identical one: the counts did not change.
    Unchanged,
    /// The writer's epoch is over; nothing was recorded.
    Stale,
}

// ----- count-based -------------------------------------------------------

// Slot word: tag (29 bits) << 3 | filled << 2 | slow << 1 | failed.
const SLOT_FAILED: u32 = 1;
const SLOT_SLOW: u32 = 2;
const SLOT_FILLED: u32 = 4;
const SLOT_TAG_MASK: u64 = (1 << 29) - 1;

// Counter word: calls (18 bits) | failed (18) | slow (18) | tag (10). Failed and
// slow may dip below zero for an instant when two writers' updates land out of
// order, so they are kept modulo 2^18 and read as signed.
const FIELD_BITS: u32 = 18;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
const FAILED_SHIFT: u32 = FIELD_BITS;
const SLOW_SHIFT: u32 = 2 * FIELD_BITS;
const TAG_SHIFT: u32 = 3 * FIELD_BITS;
const COUNTER_TAG_MASK: u64 = (1 << (64 - TAG_SHIFT)) - 1;

#[inline]
fn signed_field(word: u64, shift: u32) -> i64 {
    let raw = (word >> shift) & FIELD_MASK;
    if raw >= 1 << (FIELD_BITS - 1) {
        raw as i64 - (1 << FIELD_BITS)
    } else {
        raw as i64
    }
}

#[inline]
fn counter_tag(epoch: u64) -> u64 {
    epoch & COUNTER_TAG_MASK
}

/// The last `size` outcomes.
#[derive(Debug)]
pub(crate) struct CountWindow {
    size: u32,
    head: AtomicU32,
    slots: Box<[AtomicU32]>,
    counters: AtomicU64,
}

impl CountWindow {
    pub(crate) fn new(size: u32, epoch: u64) -> Self {
        debug_assert!(size > 0 && u64::from(size) < (1 << (FIELD_BITS - 1)));
        Self {
            size,
            head: AtomicU32::new(0),
            slots: (0..size).map(|_| AtomicU32::new(0)).collect(),
            counters: AtomicU64::new(counter_tag(epoch) << TAG_SHIFT),
        }
    }

    /// Empties the window for `epoch`. Called before the epoch is published.
    pub(crate) fn reset(&self, epoch: u64) {
        self.counters
            .store(counter_tag(epoch) << TAG_SHIFT, Ordering::Release);
    }

    /// Records one outcome written in `epoch`.
    #[inline]
    pub(crate) fn record(&self, epoch: u64, failed: bool, slow: bool) -> Recorded {
        let tag = counter_tag(epoch);
        if !failed
            && !slow
            && self.counters.load(Ordering::Acquire) == (tag << TAG_SHIFT) | u64::from(self.size)
        {
            // A full window of plain successes, and another one: every slot
            // holds the same outcome, so which one it replaces makes no
            // difference and the head need not move. A healthy upstream costs
            // two loads per call and no write at all.
            return Recorded::Unchanged;
        }
        let slot_tag = (epoch & SLOT_TAG_MASK) as u32;
        let new = (slot_tag << 3)
            | SLOT_FILLED
            | if slow { SLOT_SLOW } else { 0 }
            | if failed { SLOT_FAILED } else { 0 };

        // Claim the next slot. A compare-and-swap rather than `fetch_add % size`
        // keeps the index in range without a division.
        let mut index = self.head.load(Ordering::Relaxed);
        loop {
            let next = if index + 1 == self.size { 0 } else { index + 1 };
            match self
                .head
                .compare_exchange_weak(index, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => index = actual,
            }
        }
        let slot = &self.slots[index as usize];
        // Same epoch, same outcome: the counts stay what they were, and so does
        // the slot, so skip the write. This is the steady state of a healthy
        // upstream and makes it one read-modify-write per call. (A writer a
        // whole lap ahead that changes the slot meanwhile accounts for what it
        // overwrote itself, so skipping is the same as writing first.)
        if slot.load(Ordering::Acquire) == new {
            return Recorded::Unchanged;
        }
        let old = slot.swap(new, Ordering::AcqRel);
        if old == new {
            return Recorded::Unchanged;
        }
        let old_live = old & SLOT_FILLED != 0 && old >> 3 == slot_tag;
        let mut word = self.counters.load(Ordering::Acquire);
        loop {
            if word >> TAG_SHIFT != tag {
                // The window was reset for a later epoch after this writer read
                // the state: put back what it overwrote, unless someone newer
                // has already written the slot.
                let _ = slot.compare_exchange(new, old, Ordering::AcqRel, Ordering::Relaxed);
                return Recorded::Stale;
            }
            let mut calls = word & FIELD_MASK;
            let mut failed_n = signed_field(word, FAILED_SHIFT);
            let mut slow_n = signed_field(word, SLOW_SHIFT);
            if old_live {
                failed_n -= i64::from(old & SLOT_FAILED);
                slow_n -= i64::from((old & SLOT_SLOW) >> 1);
            } else {
                calls += 1;
            }
            failed_n += i64::from(failed);
            slow_n += i64::from(slow);
            let next = (tag << TAG_SHIFT)
                | (((slow_n as u64) & FIELD_MASK) << SLOW_SHIFT)
                | (((failed_n as u64) & FIELD_MASK) << FAILED_SHIFT)
                | (calls & FIELD_MASK);
            match self.counters.compare_exchange_weak(
                word,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Recorded::Changed(self.decode(next)),
                Err(actual) => word = actual,
            }
        }
    }

    fn decode(&self, word: u64) -> Counts {
        let calls = (word & FIELD_MASK).min(u64::from(self.size));
        let clamp = |v: i64| u64::try_from(v).unwrap_or(0).min(calls);
        Counts {
            calls,
            failed: clamp(signed_field(word, FAILED_SHIFT)),
            slow: clamp(signed_field(word, SLOW_SHIFT)),
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        self.decode(self.counters.load(Ordering::Acquire))
    }
}

// ----- time-based --------------------------------------------------------

/// How many buckets a time window is split into.
pub(crate) const BUCKETS: u64 = 10;

#[derive(Debug, Default)]
struct Bucket {
    /// calls in the low 32 bits, failures in the high 32.
    calls_failed: AtomicU64,
    slow: AtomicU64,
}

/// The outcomes of the last `window` of time, in [`BUCKETS`] buckets.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    width: u64,
    buckets: Box<[Bucket]>,
    /// The bucket number (time / width) the buckets currently end at.
    current: AtomicU64,
    rollover: Mutex<()>,
    /// Whether slow calls are recorded at all (if not, summing skips them).
    track_slow: bool,
}

impl TimeWindow {
    pub(crate) fn new(window_nanos: u64, track_slow: bool) -> Self {
        Self {
            width: (window_nanos / BUCKETS).max(1),
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            current: AtomicU64::new(0),
            rollover: Mutex::new(()),
            track_slow,
        }
    }

    /// Empties every bucket. Called with the breaker's transition lock held.
    pub(crate) fn reset(&self) {
        for bucket in &self.buckets {
            bucket.calls_failed.store(0, Ordering::Release);
            bucket.slow.store(0, Ordering::Release);
        }
    }

    /// Moves the window's end to `now`, zeroing the buckets that expired, and
    /// returns the bucket number to write into.
    #[inline]
    fn advance(&self, now: u64) -> u64 {
        let target = now / self.width;
        let current = self.current.load(Ordering::Acquire);
        if target <= current {
            // A writer that read the clock just before a rollover still writes
            // into its own bucket while that bucket is inside the window.
            return if current - target < BUCKETS {
                target
            } else {
                current
            };
        }
        self.roll(target)
    }

    #[cold]
    fn roll(&self, target: u64) -> u64 {
        let _guard = self.rollover.lock();
        let current = self.current.load(Ordering::Acquire);
        if target > current {
            let expired = (target - current).min(BUCKETS);
            for n in 1..=expired {
                let bucket = &self.buckets[((current + n) % BUCKETS) as usize];
                bucket.calls_failed.store(0, Ordering::Release);
                bucket.slow.store(0, Ordering::Release);
            }
            self.current.store(target, Ordering::Release);
        }
        target.max(current)
    }

    /// Records one outcome that finished at `now`; returns the new counts.
    #[inline]
    pub(crate) fn record(&self, now: u64, failed: bool, slow: bool) -> Counts {
        let bucket = &self.buckets[(self.advance(now) % BUCKETS) as usize];
        bucket
            .calls_failed
            .fetch_add(1 | (u64::from(failed) << 32), Ordering::AcqRel);
        if slow {
            bucket.slow.fetch_add(1, Ordering::AcqRel);
        }
        self.sum()
    }

    fn sum(&self) -> Counts {
        let mut counts = Counts::default();
        for bucket in &self.buckets {
            let cf = bucket.calls_failed.load(Ordering::Acquire);
            counts.calls += cf & 0xFFFF_FFFF;
            counts.failed += cf >> 32;
            if self.track_slow {
                counts.slow += bucket.slow.load(Ordering::Acquire);
            }
        }
        counts
    }

    /// The counts of the window ending at `now`.
    pub(crate) fn counts(&self, now: u64) -> Counts {
        self.advance(now);
        self.sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_slides_over_the_last_n() {
        let w = CountWindow::new(3, 1);
        assert_eq!(
            w.record(1, true, false),
            Recorded::Changed(Counts {
                calls: 1,
                failed: 1,
                slow: 0
            })
        );
        w.record(1, false, true);
        w.record(1, true, false);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failed: 2,
                slow: 1
            }
        );
        // Replaces the first failure with a success.
        w.record(1, false, false);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failed: 1,
                slow: 1
            }
        );
        // Replaces the slow success with a slow success: nothing changes.
        assert_eq!(w.record(1, false, true), Recorded::Unchanged);
    }

    #[test]
    fn count_window_reset_ignores_old_slots_and_stale_writers() {
        let w = CountWindow::new(2, 1);
        w.record(1, true, false);
        w.record(1, true, false);
        w.reset(2);
        assert_eq!(w.counts(), Counts::default());
        // A writer from epoch 1 changing a slot is detected and undone.
        assert_eq!(w.record(1, false, false), Recorded::Stale);
        assert_eq!(w.counts(), Counts::default());
        assert_eq!(
            w.record(2, false, false),
            Recorded::Changed(Counts {
                calls: 1,
                failed: 0,
                slow: 0
            })
        );
        w.record(2, false, false);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 2,
                failed: 0,
                slow: 0
            }
        );
    }

    #[test]
    fn time_window_expires_whole_buckets() {
        let w = TimeWindow::new(1_000, true);
        w.record(0, true, false);
        w.record(150, false, true);
        assert_eq!(
            w.counts(950),
            Counts {
                calls: 2,
                failed: 1,
                slow: 1
            }
        );
        // At 1050 the window covers buckets 1..=10: the first call expired.
        assert_eq!(
            w.counts(1_050),
            Counts {
                calls: 1,
                failed: 0,
                slow: 1
            }
        );
        assert_eq!(w.counts(5_000), Counts::default());
    }
}
