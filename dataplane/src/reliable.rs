//! Reliability of stop-and-wait streams (DESIGN.md, "Reliability").
//!
//! A vCPU has at most one request outstanding to a device, so each is a
//! stream; a server's interrupts to one (client, VM) go the same way. The
//! sender keeps the one item in flight and sends it again after a timeout
//! ([`StopAndWait`]). What a receiver keeps per stream — the last sequence
//! number and its answer, so that a duplicate is answered again without
//! running the device model twice — lives with the sessions that number
//! the streams (`dmfabric_dm_workers::peers`, `dmfabric_wire::session`).

use std::time::{Duration, Instant};

/// When to give up on an answer: after `timeout`, send the request again
/// (same sequence number), up to `retries` times; then count it lost.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub timeout: Duration,
    pub retries: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { timeout: Duration::from_millis(20), retries: 4 }
    }
}

/// The sending side of a stop-and-wait stream: at most one item in flight,
/// sent again every `retry.timeout` until it is acknowledged, given up
/// after `retry.retries` resends. Time is passed in.
#[derive(Debug, Clone)]
pub struct StopAndWait<T> {
    retry: Retry,
    in_flight: Option<InFlight<T>>,
}

#[derive(Debug, Clone)]
struct InFlight<T> {
    item: T,
    seq: u64,
    sent: Instant,
    /// Sends so far (the first included).
    sends: u32,
    /// How this item is retried.
    retry: Retry,
}

/// What a stop-and-wait sender has to do at some instant.
#[derive(Debug, PartialEq, Eq)]
pub enum Due<'a, T> {
    /// Nothing in flight: the next item may go.
    Idle,
    /// In flight, not yet due again.
    Waiting,
    /// Send this again (now counted as sent).
    Resend(&'a T),
    /// Sent `1 + retries` times without an answer: given up.
    GaveUp(T),
}

impl<T> StopAndWait<T> {
    pub fn new(retry: Retry) -> StopAndWait<T> {
        StopAndWait { retry, in_flight: None }
    }

    /// Nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none()
    }

    /// `item` with sequence number `seq` was sent at `now` and waits for its
    /// acknowledgement (replacing whatever was in flight).
    pub fn sent(&mut self, item: T, seq: u64, now: Instant) {
        self.sent_with(item, seq, now, self.retry);
    }

    /// The same, retried as `retry` says instead of as the stream's items
    /// are (an item to a faster peer than the others).
    pub fn sent_with(&mut self, item: T, seq: u64, now: Instant, retry: Retry) {
        self.in_flight = Some(InFlight { item, seq, sent: now, sends: 1, retry });
    }

    /// An acknowledgement of `seq`: the item, if it was the one in flight.
    pub fn ack(&mut self, seq: u64) -> Option<T> {
        match &self.in_flight {
            Some(f) if f.seq == seq => self.in_flight.take().map(|f| f.item),
            _ => None,
        }
    }

    /// The sequence number in flight.
    pub fn seq(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.seq)
    }

    /// The item in flight.
    pub fn item(&self) -> Option<&T> {
        self.in_flight.as_ref().map(|f| &f.item)
    }

    /// Take the item in flight out (it will not be sent again).
    pub fn take(&mut self) -> Option<T> {
        self.in_flight.take().map(|f| f.item)
    }

    /// When the item in flight is due to be sent again.
    pub fn deadline(&self) -> Option<Instant> {
        self.in_flight.as_ref().map(|f| f.sent + f.retry.timeout)
    }

    /// What is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Due<'_, T> {
        match self.in_flight.take() {
            None => Due::Idle,
            Some(f) if now.saturating_duration_since(f.sent) < f.retry.timeout => {
                self.in_flight = Some(f);
                Due::Waiting
            }
            Some(f) if f.sends > f.retry.retries => Due::GaveUp(f.item),
            Some(f) => {
                let f = self.in_flight.insert(InFlight { sent: now, sends: f.sends + 1, ..f });
                Due::Resend(&f.item)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_resends_until_acked_and_gives_up_after_its_retries() {
        let retry = Retry { timeout: Duration::from_millis(10), retries: 2 };
        let mut s = StopAndWait::new(retry);
        let t0 = Instant::now();
        assert_eq!(s.poll(t0), Due::Idle);
        s.sent("a", 7, t0);
        assert_eq!(s.poll(t0 + Duration::from_millis(5)), Due::Waiting);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(s.poll(t0 + Duration::from_millis(10)), Due::Resend(&"a"));
        assert_eq!(s.ack(6), None, "not the one in flight");
        assert_eq!(s.ack(7), Some("a"));
        assert!(s.is_idle());
        s.sent("b", 8, t0);
        let mut now = t0;
        let mut resends = 0;
        loop {
            now += Duration::from_millis(10);
            match s.poll(now) {
                Due::Resend(_) => resends += 1,
                Due::GaveUp(item) => {
                    assert_eq!(item, "b");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(resends, 2, "sent 1 + retries times in all");
        assert_eq!(s.poll(now), Due::Idle);
    }
}
