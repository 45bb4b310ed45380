//! The load generator: IoRequests against the register-file test device,
//! timed per request, with every answer checked — sealed and verified like
//! a client platform's, numbered in the session it opened
//! ([`dmfabric_wire::session`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dmfabric_dataplane::hello::{Sealer, Session};
use dmfabric_dataplane::{FrameBatch, Transport, TransportError};
use dmfabric_devices::platform::pc::{TEST_DEVICE_ID, TEST_DEVICE_MMIO, TEST_DEVICE_PIO};
use dmfabric_wire::auth::SendKey;
use dmfabric_wire::session::Seq;
use dmfabric_wire::{
    AccessSize, Direction, EthernetRepr, Frame, FrameRepr, IoRequest, MacAddr, Message, Route, Space, Status,
};
use hdrhistogram::Histogram;

pub use dmfabric_dataplane::reliable::Retry;

/// The client platform id the load generator sends as.
pub const CLIENT_ID: u16 = 1;

/// Whom the load is aimed at and as whom it is sent.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub server_mac: MacAddr,
    pub server_id: u16,
    pub device: u32,
    pub client_id: u16,
    pub vm: u32,
    /// Spread vCPUs over devices `device..device + devices` (vCPU `v` uses
    /// `device + v % devices`), e.g. to load several worker shards.
    pub devices: u32,
    /// The session the requests are numbered in, and the server's epoch.
    pub session: u32,
    pub epoch: u32,
    /// The key requests are sealed with and answers checked with (None:
    /// neither, to measure what authentication costs).
    pub key: Option<SendKey>,
}

impl Target {
    /// The default test device of the server `session` is with.
    pub fn test_device(session: &Session, sealer: &Sealer) -> Target {
        Target {
            server_mac: session.mac,
            server_id: session.server,
            device: TEST_DEVICE_ID,
            client_id: CLIENT_ID,
            vm: 1,
            devices: 1,
            session: session.id,
            epoch: session.epoch32(),
            key: sealer.authenticate.then(|| sealer.keys.sending()),
        }
    }

    /// Whether `frame` verifies under the target's key (always without one).
    fn verifies(&self, frame: &[u8]) -> bool {
        let Some(key) = self.key else { return true };
        Frame::new_checked(frame).is_ok_and(|f| f.sealed_parts().is_some_and(|(c, tag)| key.key.verify(c, tag)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(
        "No dmfabric server answered a Hello within {0:?}: is `dmfabric server` running on the other end of the link?"
    )]
    NoServer(Duration),
    #[error("The server stopped answering: {0} requests in a row were lost")]
    ServerGone(u64),
}

/// Open a session with a server on the link as client platform `client`
/// (a sealed broadcast Hello, the first answer that verifies, a Register):
/// the load's streams start at 0 in it.
pub fn discover(t: &mut dyn Transport, client: u16, sealer: &Sealer, timeout: Duration) -> Result<Session, LoadError> {
    let route = Route { client, hypervisor: 1, ..Route::default() };
    dmfabric_dataplane::hello::open_session(t, route, None, sealer, timeout)?.ok_or(LoadError::NoServer(timeout))
}

/// Most simulated vCPUs: each owns one 8-byte MMIO register of the test device.
pub const MAX_INFLIGHT: u16 = 512;
/// vCPUs below this also own a 4-byte port register (256 ports / 4).
const PIO_SLOTS: u16 = 64;

/// One request of the test pattern: write, then read back, in port space
/// and MMIO space in turn, so every read has a known answer. Each vCPU
/// slot has registers of its own, so slots never disturb each other.
fn pattern(i: u64, slot: u16) -> (Space, Direction, AccessSize, u64, u64) {
    let value = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(slot);
    let pio = u64::from(TEST_DEVICE_PIO.base) + u64::from(slot) * 4;
    let mmio = TEST_DEVICE_MMIO + u64::from(slot % MAX_INFLIGHT) * 8;
    match (i % 4, slot < PIO_SLOTS) {
        (0, true) => (Space::Pio, Direction::Write, AccessSize::B4, pio, value & 0xffff_ffff),
        (1, true) => (Space::Pio, Direction::Read, AccessSize::B4, pio, 0),
        (0 | 2, _) => (Space::Mmio, Direction::Write, AccessSize::B8, mmio, value),
        _ => (Space::Mmio, Direction::Read, AccessSize::B8, mmio, 0),
    }
}

/// What the answer to request `i` must carry, given the write before it.
fn expected(i: u64, slot: u16) -> u64 {
    match i % 4 {
        1 | 3 => pattern(i - 1, slot).4,
        _ => pattern(i, slot).4,
    }
}

/// Request `i` of vCPU `vcpu`'s stream: the test pattern's `i`, numbered
/// `i` in the target's session.
fn emit_request(batch: &mut FrameBatch, src: MacAddr, target: &Target, vcpu: u16, i: u64, retransmit: bool) {
    let (space, dir, size, addr, data) = pattern(i, vcpu);
    let req = IoRequest {
        route: Route {
            server: target.server_id,
            hypervisor: 1,
            client: target.client_id,
            vm: target.vm,
            vcpu,
            device: target.device + u32::from(vcpu) % target.devices.max(1),
        },
        seq: Seq::new(target.session, i as u32).0,
        space,
        dir,
        size,
        addr,
        data,
    };
    let mut repr = FrameRepr::new(EthernetRepr { dst: target.server_mac, src }, Message::IoRequest(req));
    repr.retransmit = retransmit;
    repr.epoch = target.epoch;
    match &target.key {
        Some(key) => batch.push_with(|buf| repr.emit_sealed(buf, key).ok()),
        None => batch.push_with(|buf| repr.emit(buf).ok()),
    };
}

/// What a completion said, reduced to what the generator checks.
struct Answer {
    vcpu: u16,
    seq: u64,
    good: bool,
}

fn check_answer(frame: &[u8], target: &Target) -> Option<Answer> {
    if !target.verifies(frame) {
        return None;
    }
    let repr = FrameRepr::parse_bytes(frame).ok()?;
    let Message::IoCompletion(c) = repr.msg else {
        return None;
    };
    if c.route.vm != target.vm || c.route.client != target.client_id || Seq(c.seq).session() != target.session {
        return None;
    }
    let i = u64::from(Seq(c.seq).counter());
    let good = c.status == Status::Ok && c.data == expected(i, c.route.vcpu);
    Some(Answer { vcpu: c.route.vcpu, seq: i, good })
}

fn histogram() -> Histogram<u64> {
    // 10 ns .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(10, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Result of [`rtt`] or [`throughput`].
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub completed: u64,
    /// Requests without an answer after every retry.
    pub lost: u64,
    /// Requests sent again after a timeout.
    pub retransmits: u64,
    /// Answers with the wrong data or a non-Ok status.
    pub wrong: u64,
    /// Answers to requests already answered or given up on.
    pub late: u64,
    pub elapsed: Duration,
    /// Round-trip times in nanoseconds, from the first send to the answer.
    pub hist: Histogram<u64>,
}

impl LoadReport {
    fn new() -> Self {
        LoadReport {
            sent: 0,
            completed: 0,
            lost: 0,
            retransmits: 0,
            wrong: 0,
            late: 0,
            elapsed: Duration::ZERO,
            hist: histogram(),
        }
    }

    /// Latency at `q` (0..=1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Consecutive lost requests after which a run gives up instead of waiting
/// out every remaining timeout.
pub const GIVE_UP_AFTER_LOST: u64 = 50;

/// Ping-pong: `requests` requests, one outstanding at a time. Warm-up
/// requests (not recorded) go first. Streams start at 0 in the target's
/// session, so call [`discover`] before each run: each opens a new one.
pub fn rtt(
    t: &mut dyn Transport,
    target: &Target,
    requests: u64,
    warmup: u64,
    retry: Retry,
    stop: &AtomicBool,
) -> Result<LoadReport, LoadError> {
    let mut report = LoadReport::new();
    let mut batch = FrameBatch::new();
    let src = t.mac();
    let start = Instant::now();
    let mut lost_in_a_row = 0u64;
    let mut i = 0u64;
    while i < warmup + requests {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let record = i >= warmup;
        emit_request(&mut batch, src, target, 0, i, false);
        let sent_at = Instant::now();
        t.send(&mut batch)?;
        report.sent += u64::from(record);
        let mut deadline = sent_at + retry.timeout;
        let mut tries = 0;
        let mut done = false;
        while !done {
            t.recv(8, &mut |f| {
                if let Some(a) = check_answer(f, target) {
                    if a.vcpu == 0 && a.seq == i && !done {
                        let rtt = sent_at.elapsed();
                        done = true;
                        if record {
                            report.completed += 1;
                            report.wrong += u64::from(!a.good);
                            let _ = report.hist.record(rtt.as_nanos() as u64);
                        }
                    } else if record {
                        report.late += 1;
                    }
                }
            })?;
            if !done && Instant::now() >= deadline {
                if tries == retry.retries {
                    report.lost += u64::from(record);
                    break;
                }
                tries += 1;
                report.retransmits += u64::from(record);
                emit_request(&mut batch, src, target, 0, i, true);
                t.send(&mut batch)?;
                deadline = Instant::now() + retry.timeout;
            }
        }
        lost_in_a_row = if done { 0 } else { lost_in_a_row + 1 };
        if lost_in_a_row >= GIVE_UP_AFTER_LOST {
            return Err(LoadError::ServerGone(lost_in_a_row));
        }
        // A lost request is asked again under its number: the stream takes
        // only the next one, and the server answers it once (from its
        // cache if it ran it).
        if done {
            i += 1;
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Many requests in flight, as from `inflight` vCPUs each with one
/// outstanding request, for `duration`. Like [`rtt`], numbers from 0. A request without an answer is
/// sent again per `retry`, then counted lost, and its vCPU goes on.
pub fn throughput(
    t: &mut dyn Transport,
    target: &Target,
    duration: Duration,
    inflight: u16,
    retry: Retry,
    stop: &AtomicBool,
) -> Result<LoadReport, LoadError> {
    struct Slot {
        seq: u64,
        sent_at: Instant,
        deadline: Instant,
        tries: u32,
        busy: bool,
    }
    let inflight = inflight.clamp(1, MAX_INFLIGHT);
    let now = Instant::now();
    let mut slots: Vec<Slot> =
        (0..inflight).map(|_| Slot { seq: 0, sent_at: now, deadline: now, tries: 0, busy: false }).collect();
    let mut report = LoadReport::new();
    let mut batch = FrameBatch::new();
    let src = t.mac();
    let start = Instant::now();
    let end = start + duration;
    let mut next_slot = 0usize;
    let mut iter = 0u64;
    loop {
        let now = Instant::now();
        let sending = now < end && !stop.load(Ordering::Relaxed);
        if sending {
            // Up to half a burst of new requests per iteration, round-robin.
            for _ in 0..inflight.min(32) {
                let vcpu = next_slot as u16;
                next_slot = (next_slot + 1) % slots.len();
                let s = &mut slots[usize::from(vcpu)];
                if s.busy {
                    continue;
                }
                *s = Slot { seq: s.seq, sent_at: now, deadline: now + retry.timeout, tries: 0, busy: true };
                emit_request(&mut batch, src, target, vcpu, s.seq, false);
                report.sent += 1;
                if batch.len() >= 32 {
                    break;
                }
            }
            if !batch.is_empty() {
                t.send(&mut batch)?;
            }
        }
        let slots_ref = &mut slots;
        let report_ref = &mut report;
        t.recv(64, &mut |f| {
            let Some(a) = check_answer(f, target) else { return };
            let Some(s) = slots_ref.get_mut(usize::from(a.vcpu)) else { return };
            if s.busy && a.seq == s.seq {
                s.busy = false;
                s.seq += 1;
                report_ref.completed += 1;
                report_ref.wrong += u64::from(!a.good);
                let _ = report_ref.hist.record(s.sent_at.elapsed().as_nanos() as u64);
            } else {
                report_ref.late += 1;
            }
        })?;
        iter += 1;
        if iter.is_multiple_of(64) || !sending {
            let now = Instant::now();
            for (vcpu, s) in slots.iter_mut().enumerate().filter(|(_, s)| s.busy && now >= s.deadline) {
                if s.tries < retry.retries {
                    s.tries += 1;
                    s.deadline = now + retry.timeout;
                    report.retransmits += 1;
                    emit_request(&mut batch, src, target, vcpu as u16, s.seq, true);
                    if batch.is_full() {
                        t.send(&mut batch)?;
                    }
                } else {
                    // Counted lost, and asked again under its number (the
                    // stream takes only the next one).
                    report.lost += 1;
                    s.busy = false;
                }
            }
            if !batch.is_empty() {
                t.send(&mut batch)?;
            }
            if !sending && slots.iter().all(|s| !s.busy) {
                break;
            }
        }
    }
    report.elapsed = Instant::now().min(end).duration_since(start).max(Duration::from_nanos(1));
    Ok(report)
}
