//! Reliability of stop-and-wait streams (DESIGN.md, "Reliability").
//!
//! A vCPU has at most one request outstanding, so each (client platform,
//! VM, vCPU) is a stream whose sequence numbers only grow; a server's
//! interrupts to one (client, VM) go the same way. The sender keeps the
//! one item in flight and sends it again after a timeout ([`StopAndWait`]);
//! the receiver of requests keeps, per stream, the last sequence number
//! and its answer ([`DupCache`]), so that a duplicate is answered again
//! without running the device model twice (a UART write must not print
//! twice) and an older sequence number is recognised as stale.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
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
        self.in_flight = Some(InFlight { item, seq, sent: now, sends: 1 });
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
        self.in_flight.as_ref().map(|f| f.sent + self.retry.timeout)
    }

    /// What is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Due<'_, T> {
        let (timeout, retries) = (self.retry.timeout, self.retry.retries);
        match self.in_flight.take() {
            None => Due::Idle,
            Some(f) if now.saturating_duration_since(f.sent) < timeout => {
                self.in_flight = Some(f);
                Due::Waiting
            }
            Some(f) if f.sends > retries => Due::GaveUp(f.item),
            Some(f) => {
                let f = self.in_flight.insert(InFlight { sent: now, sends: f.sends + 1, ..f });
                Due::Resend(&f.item)
            }
        }
    }
}

/// One stop-and-wait stream: a vCPU of a VM on a client platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamKey(u64);

impl StreamKey {
    pub fn new(client: u16, vm: u32, vcpu: u16) -> StreamKey {
        StreamKey((u64::from(client) << 48) | (u64::from(vm) << 16) | u64::from(vcpu))
    }

    pub fn client(self) -> u16 {
        (self.0 >> 48) as u16
    }

    /// The key as one number (to carry it elsewhere) and back.
    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn from_raw(raw: u64) -> StreamKey {
        StreamKey(raw)
    }
}

/// What the cache says about an arriving sequence number.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen<'a, T> {
    /// Newer than anything of the stream: execute it (now recorded).
    New,
    /// The stream's latest request again. `Some`: its answer, to send
    /// again; `None`: still being executed, its answer will follow.
    Duplicate(Option<&'a T>),
    /// Older than the stream's latest request: drop it.
    Stale,
}

#[derive(Debug)]
struct Entry<T> {
    last: u64,
    answer: Option<T>,
}

/// Multiply-shift hashing of the 64-bit stream key: the keys are ours, not
/// an attacker's choice of strings, and SipHash would cost more than the
/// lookup it protects.
#[derive(Debug, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The server's per-stream memory of the last request and its answer.
#[derive(Debug)]
pub struct DupCache<T> {
    streams: HashMap<StreamKey, Entry<T>, BuildHasherDefault<KeyHasher>>,
}

impl<T> Default for DupCache<T> {
    fn default() -> Self {
        DupCache { streams: HashMap::default() }
    }
}

impl<T> DupCache<T> {
    /// Classify `seq` on stream `key`; a new one becomes the stream's latest.
    pub fn check(&mut self, key: StreamKey, seq: u64) -> Seen<'_, T> {
        match self.streams.entry(key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Entry { last: seq, answer: None });
                Seen::New
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                let e = o.into_mut();
                if seq > e.last {
                    e.last = seq;
                    e.answer = None;
                    Seen::New
                } else if seq == e.last {
                    Seen::Duplicate(e.answer.as_ref())
                } else {
                    Seen::Stale
                }
            }
        }
    }

    /// Remember `answer` for `seq`, if it is still the stream's latest.
    pub fn answered(&mut self, key: StreamKey, seq: u64, answer: T) {
        if let Some(e) = self.streams.get_mut(&key) {
            if e.last == seq {
                e.answer = Some(answer);
            }
        }
    }

    /// Forget every stream of `client` (it restarted and numbers anew).
    pub fn forget_client(&mut self, client: u16) -> usize {
        let before = self.streams.len();
        self.streams.retain(|k, _| k.client() != client);
        before - self.streams.len()
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Every stream's latest sequence number and answer.
    pub fn entries(&self) -> impl Iterator<Item = (StreamKey, u64, Option<&T>)> {
        self.streams.iter().map(|(k, e)| (*k, e.last, e.answer.as_ref()))
    }

    /// Take over a stream's latest from another cache (a device moving in
    /// from another server), unless this cache has seen newer.
    pub fn adopt(&mut self, key: StreamKey, last: u64, answer: Option<T>) {
        let e = self.streams.entry(key).or_insert(Entry { last, answer: None });
        if last > e.last || (last == e.last && e.answer.is_none()) {
            *e = Entry { last, answer };
        }
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_duplicate_stale() {
        let mut c = DupCache::<&str>::default();
        let k = StreamKey::new(1, 7, 0);
        assert_eq!(c.check(k, 5), Seen::New);
        assert_eq!(c.check(k, 5), Seen::Duplicate(None), "in flight");
        c.answered(k, 5, "five");
        assert_eq!(c.check(k, 5), Seen::Duplicate(Some(&"five")));
        assert_eq!(c.check(k, 4), Seen::Stale);
        assert_eq!(c.check(k, 9), Seen::New);
        c.answered(k, 5, "late answer for an old request");
        assert_eq!(c.check(k, 9), Seen::Duplicate(None));
        // Streams are independent.
        assert_eq!(c.check(StreamKey::new(1, 7, 1), 0), Seen::New);
        assert_eq!(c.check(StreamKey::new(2, 7, 0), 0), Seen::New);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn a_restarted_client_starts_over() {
        let mut c = DupCache::<u8>::default();
        for vcpu in 0..4 {
            c.check(StreamKey::new(3, 1, vcpu), 100);
        }
        c.check(StreamKey::new(4, 1, 0), 100);
        assert_eq!(c.forget_client(3), 4);
        assert_eq!(c.check(StreamKey::new(3, 1, 0), 0), Seen::New);
        assert_eq!(c.check(StreamKey::new(4, 1, 0), 0), Seen::Stale);
    }

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

    #[test]
    fn keys_keep_their_fields_apart() {
        let k = StreamKey::new(0xabcd, 0x1234_5678, 0x9abc);
        assert_eq!(k.client(), 0xabcd);
        assert_ne!(StreamKey::new(1, 0, 0), StreamKey::new(0, 1 << 16, 0));
    }
}
