//! How a reader off the data plane (a metrics endpoint) sees counters that
//! a data-plane core owns, without the core taking a lock or doing an
//! atomic read-modify-write on its hot path:
//!
//! - [`Mailbox`]: the reader raises a flag; the owner looks at it (one
//!   relaxed load) where it already looks at SIGUSR1's flag, and when it is
//!   up hands over a copy of its plain counters, without ever waiting (a
//!   `try_lock`; on contention it tries at its next look).
//! - [`LatencyBuckets`]: an HDR histogram summed into the fixed buckets a
//!   Prometheus histogram exports, in one pass (the owner does it only when
//!   it publishes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use hdrhistogram::Histogram;

/// A copy of an owner's counters, handed over when a reader asks.
#[derive(Debug, Default)]
pub struct Mailbox<T> {
    want: AtomicBool,
    /// (copies published so far, the latest).
    slot: Mutex<(u64, Option<T>)>,
    published: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain copies: nothing half-written matters after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Clone> Mailbox<T> {
    pub fn new() -> Mailbox<T> {
        Mailbox { want: AtomicBool::new(false), slot: Mutex::new((0, None)), published: Condvar::new() }
    }

    /// Whether a reader waits for a copy (the owner's one look: a relaxed load).
    #[inline]
    pub fn wanted(&self) -> bool {
        self.want.load(Ordering::Relaxed)
    }

    /// Hand over `value` (the owner, when [`Mailbox::wanted`], and when it
    /// ends). Never waits: if a reader holds the slot this moment, nothing
    /// is published and the flag stays up for the next look.
    pub fn publish(&self, value: T) -> bool {
        let mut slot = match self.slot.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        slot.0 += 1;
        slot.1 = Some(value);
        self.want.store(false, Ordering::Relaxed);
        drop(slot);
        self.published.notify_all();
        true
    }

    /// Ask for a fresh copy and wait for it at most `within`; the latest
    /// copy there is (an owner that did not look in time, e.g. a vCPU in a
    /// halted guest, leaves its previous one).
    pub fn fetch(&self, within: Duration) -> Option<T> {
        let asked = self.ask();
        self.wait(asked, std::time::Instant::now() + within)
    }

    /// Raise the flag; what [`Mailbox::wait`] waits to move past.
    pub fn ask(&self) -> u64 {
        let slot = lock(&self.slot);
        self.want.store(true, Ordering::Relaxed);
        slot.0
    }

    /// Wait until a copy newer than `asked` is there, or `deadline`; the latest copy.
    pub fn wait(&self, asked: u64, deadline: std::time::Instant) -> Option<T> {
        let within = deadline.saturating_duration_since(std::time::Instant::now());
        let slot = lock(&self.slot);
        let (slot, _) =
            self.published.wait_timeout_while(slot, within, |s| s.0 == asked).unwrap_or_else(|e| e.into_inner());
        slot.1.clone()
    }

    /// Hand over `value`, waiting for the slot if a reader holds it: the
    /// owner's last copy, when it ends.
    pub fn put(&self, value: T) {
        let mut slot = lock(&self.slot);
        slot.0 += 1;
        slot.1 = Some(value);
        self.want.store(false, Ordering::Relaxed);
        drop(slot);
        self.published.notify_all();
    }

    /// The latest copy, without asking for a new one.
    pub fn latest(&self) -> Option<T> {
        lock(&self.slot).1.clone()
    }
}

/// Upper bounds of [`LatencyBuckets`], nanoseconds (the `le` labels are
/// these in seconds); larger values count only in the `+Inf` bucket.
pub const LATENCY_BOUNDS_NS: [u64; 16] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
];

/// A latency histogram in fixed buckets: what a Prometheus histogram needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyBuckets {
    /// Values recorded (the `+Inf` bucket).
    pub count: u64,
    /// Their sum, nanoseconds (each value as its HDR bucket's middle).
    pub sum_ns: u64,
    /// Values at most [`LATENCY_BOUNDS_NS`]`[i]`, cumulative.
    pub cumulative: [u64; LATENCY_BOUNDS_NS.len()],
}

impl LatencyBuckets {
    /// `h` (nanoseconds) summed into the buckets, in one pass over its
    /// recorded values.
    pub fn of(h: &Histogram<u64>) -> LatencyBuckets {
        let mut b = LatencyBuckets::default();
        let mut per = [0u64; LATENCY_BOUNDS_NS.len()];
        for v in h.iter_recorded() {
            let n = v.count_at_value();
            let value = v.value_iterated_to();
            b.count += n;
            b.sum_ns = b.sum_ns.saturating_add(h.median_equivalent(value).saturating_mul(n));
            // Each value in the first bucket whose bound holds the whole
            // HDR bucket it stands for.
            if let Some(i) = LATENCY_BOUNDS_NS.iter().position(|&le| value <= le) {
                per[i] += n;
            }
        }
        let mut running = 0;
        for (c, n) in b.cumulative.iter_mut().zip(per) {
            running += n;
            *c = running;
        }
        b
    }

    /// Add `other`'s values (another vCPU's, another core's).
    pub fn merge(&mut self, other: &LatencyBuckets) {
        self.count += other.count;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        for (a, b) in self.cumulative.iter_mut().zip(other.cumulative) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_everything() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for v in [500, 1_500, 1_500, 7_000, 3_000_000, 20_000_000_000] {
            h.record(v).unwrap();
        }
        let b = LatencyBuckets::of(&h);
        assert_eq!(b.count, 6);
        assert_eq!(b.cumulative[0], 1, "500 ns <= 1 µs");
        assert_eq!(b.cumulative[1], 3, "1.5 µs <= 2 µs");
        assert_eq!(b.cumulative[3], 4, "7 µs <= 10 µs");
        assert_eq!(b.cumulative[11], 5, "3 ms <= 5 ms");
        assert_eq!(*b.cumulative.last().unwrap(), 5, "20 s only in +Inf");
        let sum = 500 + 3_000 + 7_000 + 3_000_000 + 20_000_000_000u64;
        assert!(b.sum_ns.abs_diff(sum) < sum / 100, "{} ~ {sum}", b.sum_ns);
        let mut twice = b;
        twice.merge(&b);
        assert_eq!((twice.count, twice.cumulative[1]), (12, 6));
    }

    #[test]
    fn a_reader_gets_what_the_owner_publishes_when_asked() {
        let m = std::sync::Arc::new(Mailbox::<u64>::new());
        assert!(!m.wanted());
        assert_eq!(m.fetch(Duration::from_millis(1)), None, "nobody published");
        assert!(m.wanted(), "the flag stays up");
        let owner = m.clone();
        let t = std::thread::spawn(move || {
            let mut counter = 0u64;
            // The owner's loop: count, and look at the flag.
            for _ in 0..5_000_000 {
                counter += 1;
                if owner.wanted() {
                    owner.publish(counter);
                }
                if counter & 1023 == 0 {
                    std::thread::yield_now();
                }
            }
            owner.put(counter);
        });
        let first = m.fetch(Duration::from_secs(10)).expect("a copy");
        assert!(first > 0);
        t.join().unwrap();
        assert_eq!(m.latest(), Some(5_000_000), "the final copy");
    }
}
