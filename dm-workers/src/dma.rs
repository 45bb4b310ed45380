//! Device DMA over the wire, the server's side: a model's [`DmaRequest`]
//! becomes DmaRead / DmaWrite frames to the client platform that runs its
//! VM, chunked to what the link carries, many in flight, each retransmitted
//! until answered; the answers are put together and handed back to the
//! model ([`DmaEngine::take_finished`]).
//!
//! Reliability, like requests but in the other direction: every chunk has
//! a sequence number in the client's session here ([`Seq`]); a chunk not
//! answered within [`DMA_RETRY`] goes again under the same number (the
//! client applies a write once and answers its duplicates without applying
//! them again); an answer nobody waits for (a duplicate, or one after a
//! give-up) is counted and dropped; a chunk not answered after
//! [`DMA_TRIES`] sends fails its request ([`DmaResult::Refused`]), as does
//! a client's refusal (a range outside the VM's memory). Nothing here
//! blocks: the data-plane core sends, the answers arrive on later polls.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use dmfabric_dataplane::FrameBatch;
use dmfabric_devices::{DmaOp, DmaRequest, DmaResult};
use dmfabric_wire::session::Seq;
use dmfabric_wire::{Dma, DmaDir, EthernetRepr, FrameRepr, MacAddr, Message, NackReason, AUTH_TAG_LEN, HEADER_LEN};

use crate::interrupts::{Binding, Sealing};

/// Bytes of a DMA chunk on a link with a 1500-byte MTU: the MTU less
/// dmfabric's header and tag.
pub const DEFAULT_DMA_CHUNK: u32 = 1500 - HEADER_LEN as u32 - AUTH_TAG_LEN as u32;
/// The largest chunk a frame buffer holds (a jumbo-frame link).
pub const MAX_DMA_CHUNK: u32 = (dmfabric_dataplane::FRAME_CAP - 14 - HEADER_LEN - AUTH_TAG_LEN) as u32;
/// How long a chunk waits for its answer before it is sent again.
pub const DMA_RETRY: Duration = Duration::from_millis(2);
/// Sends of a chunk before its request fails.
pub const DMA_TRIES: u32 = 50;
/// Chunks in flight at once, over all clients.
pub const DMA_WINDOW: usize = 256;

/// What the DMA engine did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DmaStats {
    /// Requests the models issued, and how they ended.
    pub requests: u64,
    pub completed: u64,
    /// Failed: refused by the client, no client to ask, or never answered.
    pub failed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Chunk frames sent, and of them sent again.
    pub chunks_sent: u64,
    pub retransmits: u64,
    /// Answers nobody waited for (duplicates, late ones), dropped.
    pub stale_answers: u64,
    /// Answers whose length or direction did not match their chunk, dropped.
    pub bad_answers: u64,
    /// Refusals by the client (out of range, unknown VM, not authorised).
    pub refused: u64,
    /// Chunks given up after [`DMA_TRIES`] sends.
    pub gave_up: u64,
}

/// One request of a model.
#[derive(Debug)]
struct Op {
    device: u32,
    tag: u64,
    dir: DmaDir,
    addr: u64,
    /// A write's bytes, or where a read's arrive.
    buf: Vec<u8>,
    chunks_left: u32,
    failed: bool,
    /// When the model asked.
    since: Instant,
}

/// One frame's worth of an [`Op`].
#[derive(Debug, Clone, Copy)]
struct Chunk {
    op: u64,
    offset: u32,
    len: u32,
    to: Binding,
    /// The number it was last sent under, and when.
    seq: Option<Seq>,
    sent: Instant,
    tries: u32,
}

/// The server's DMA: requests of its models in flight to their clients.
#[derive(Debug)]
pub struct DmaEngine {
    mac: MacAddr,
    chunk: u32,
    ops: HashMap<u64, Op>,
    next_op: u64,
    /// Chunks not yet sent (or to be sent again under a new number).
    queued: VecDeque<Chunk>,
    /// Chunks in flight, by (client, seq).
    in_flight: HashMap<(u16, u64), Chunk>,
    /// The next counter of each client's current session.
    counters: HashMap<u16, Seq>,
    finished: Vec<(u32, u64, DmaResult)>,
    stats: DmaStats,
}

impl DmaEngine {
    /// An engine sending from `mac` in chunks of `chunk` bytes (cut to [`MAX_DMA_CHUNK`]).
    pub fn new(mac: MacAddr, chunk: u32) -> DmaEngine {
        DmaEngine {
            mac,
            chunk: chunk.clamp(64, MAX_DMA_CHUNK),
            ops: HashMap::new(),
            next_op: 0,
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            counters: HashMap::new(),
            finished: Vec::new(),
            stats: DmaStats::default(),
        }
    }

    pub fn stats(&self) -> DmaStats {
        self.stats.clone()
    }

    /// Requests not yet finished.
    pub fn pending(&self) -> usize {
        self.ops.len()
    }

    /// Device `device` asks for `req`, on behalf of the VM `to` names (None:
    /// the device is bound to no VM's client, and the request fails).
    pub fn submit(&mut self, device: u32, req: DmaRequest, to: Option<Binding>, now: Instant) {
        self.stats.requests += 1;
        let (dir, addr, len, buf) = match req.op {
            DmaOp::Read { addr, len } => (DmaDir::Read, addr, len, vec![0u8; len as usize]),
            DmaOp::Write { addr, data } => {
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                (DmaDir::Write, addr, len, data)
            }
        };
        let fits = len > 0
            && len <= dmfabric_devices::dma::MAX_DMA_LEN
            && buf.len() == len as usize
            && addr.checked_add(u64::from(len) - 1).is_some();
        let Some(to) = to.filter(|_| fits) else {
            self.stats.failed += 1;
            self.finished.push((device, req.tag, DmaResult::Refused));
            return;
        };
        let id = self.next_op;
        self.next_op += 1;
        let chunks = len.div_ceil(self.chunk);
        self.ops
            .insert(id, Op { device, tag: req.tag, dir, addr, buf, chunks_left: chunks, failed: false, since: now });
        for i in 0..chunks {
            let offset = i * self.chunk;
            let len = self.chunk.min(len - offset);
            self.queued.push_back(Chunk { op: id, offset, len, to, seq: None, sent: now, tries: 0 });
        }
    }

    /// The client platform `client` started session `session` here: its
    /// chunks are numbered in it from now on.
    pub fn start_session(&mut self, client: u16, session: u32) {
        if self.counters.get(&client).is_none_or(|s| s.session() != session) {
            self.counters.insert(client, Seq::new(session, 0));
        }
    }

    /// Send what waits (as far as the window and `tx` allow) and again
    /// what was not answered in time.
    pub fn send(&mut self, tx: &mut FrameBatch, now: Instant, seal: &Sealing<'_>) {
        // Chunks whose answer is late go to the front of the queue.
        let late: Vec<(u16, u64)> = self
            .in_flight
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.sent) >= DMA_RETRY)
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            let Some(c) = self.in_flight.remove(&key) else { continue };
            if c.tries >= DMA_TRIES {
                self.stats.gave_up += 1;
                self.fail(c.op);
            } else {
                self.queued.push_front(c);
            }
        }
        // Each queued chunk is looked at once at most: those of a client
        // with no session yet go to the back and wait for it.
        let mut budget = self.queued.len();
        while budget > 0 && self.in_flight.len() < DMA_WINDOW && !tx.is_full() {
            budget -= 1;
            let Some(mut c) = self.queued.pop_front() else { break };
            let Some(op) = self.ops.get(&c.op) else { continue };
            if op.failed {
                self.chunk_done(c.op);
                continue;
            }
            let client = c.to.route.client;
            let Some(next) = self.counters.get(&client).copied() else {
                if now.saturating_duration_since(op.since) >= DMA_RETRY * DMA_TRIES {
                    self.stats.gave_up += 1;
                    self.fail(c.op);
                } else {
                    self.queued.push_back(c);
                }
                continue;
            };
            // Sent again under its own number while the session holds, so
            // that the client can tell a duplicate; a new number otherwise.
            let seq = match c.seq.filter(|s| s.session() == next.session()) {
                Some(s) => s,
                None => {
                    self.counters.insert(client, next.next());
                    next
                }
            };
            let start = c.offset as usize;
            let end = start + c.len as usize;
            let payload = if op.dir == DmaDir::Write { &op.buf[start..end] } else { &[][..] };
            let msg = Dma {
                route: c.to.route,
                seq: seq.0,
                dir: op.dir,
                reply: false,
                addr: op.addr + u64::from(c.offset),
                len: c.len,
                payload,
            };
            let mut repr = FrameRepr::new(EthernetRepr { dst: c.to.to, src: self.mac }, Message::Dma(msg));
            repr.retransmit = c.tries > 0;
            if !seal.push(tx, client, repr) {
                self.queued.push_front(c);
                break;
            }
            self.stats.chunks_sent += 1;
            self.stats.retransmits += u64::from(c.tries > 0);
            c.tries += 1;
            c.sent = now;
            c.seq = Some(seq);
            self.in_flight.insert((client, seq.0), c);
        }
    }

    /// The client's answer to chunk `seq` (`payload`: a read's bytes).
    pub fn answer(&mut self, client: u16, dma: &Dma<'_>) {
        let Some(c) = self.in_flight.get(&(client, dma.seq)).copied() else {
            self.stats.stale_answers += 1;
            return;
        };
        let Some(op) = self.ops.get_mut(&c.op) else {
            self.in_flight.remove(&(client, dma.seq));
            self.stats.stale_answers += 1;
            return;
        };
        let expected = if Dma::carries_data(op.dir, true) { c.len as usize } else { 0 };
        if dma.dir != op.dir
            || dma.route != c.to.route
            || dma.len != c.len
            || dma.addr != op.addr + u64::from(c.offset)
            || dma.payload.len() != expected
        {
            self.stats.bad_answers += 1;
            return;
        }
        self.in_flight.remove(&(client, dma.seq));
        if op.dir == DmaDir::Read {
            let start = c.offset as usize;
            op.buf[start..start + dma.payload.len()].copy_from_slice(dma.payload);
        }
        self.chunk_done(c.op);
    }

    /// The client refused chunk `seq`.
    pub fn refused(&mut self, client: u16, seq: u64, reason: NackReason) {
        let Some(mut c) = self.in_flight.remove(&(client, seq)) else {
            self.stats.stale_answers += 1;
            return;
        };
        if reason == NackReason::NoSession {
            // Its session is gone at the client: number it anew when the
            // client's next session starts (the tries still count).
            c.seq = None;
            self.counters.remove(&client);
            self.queued.push_back(c);
            return;
        }
        self.stats.refused += 1;
        self.fail(c.op);
    }

    fn fail(&mut self, op: u64) {
        if let Some(o) = self.ops.get_mut(&op) {
            o.failed = true;
        }
        self.chunk_done(op);
    }

    fn chunk_done(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        op.chunks_left = op.chunks_left.saturating_sub(1);
        if op.chunks_left > 0 {
            return;
        }
        let Some(op) = self.ops.remove(&id) else { return };
        let result = match (op.failed, op.dir) {
            (true, _) => {
                self.stats.failed += 1;
                DmaResult::Refused
            }
            (false, DmaDir::Read) => {
                self.stats.completed += 1;
                self.stats.bytes_read += op.buf.len() as u64;
                DmaResult::Read(op.buf)
            }
            (false, DmaDir::Write) => {
                self.stats.completed += 1;
                self.stats.bytes_written += op.buf.len() as u64;
                DmaResult::Written
            }
        };
        // Chunks of a failed request still queued are dropped as they come up.
        self.finished.push((op.device, op.tag, result));
    }

    /// Requests that ended: (device, tag, result).
    pub fn take_finished(&mut self) -> std::vec::Drain<'_, (u32, u64, DmaResult)> {
        self.finished.drain(..)
    }

    /// When a chunk is next due to be sent again.
    pub fn next_retransmit(&self) -> Option<Instant> {
        if !self.queued.is_empty() {
            return Some(Instant::now());
        }
        self.in_flight.values().map(|c| c.sent + DMA_RETRY).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use dmfabric_wire::Route;

    const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);

    fn binding() -> Binding {
        Binding {
            to: CLIENT,
            route: Route { server: 1, hypervisor: 1, client: 3, vm: 7, vcpu: 0, device: 9 },
            fixed: true,
        }
    }

    /// Send what the engine has and return the DMA frames, parsed and owned.
    fn sent(e: &mut DmaEngine, now: Instant) -> Vec<(u64, DmaDir, u64, u32, Vec<u8>, bool)> {
        let registry = testing::registry(vec![testing::client(3, CLIENT, &[(7, 1)])]);
        let seal = Sealing { registry: &registry, epoch: 5, authenticate: true };
        let mut tx = FrameBatch::new();
        e.send(&mut tx, now, &seal);
        (0..tx.len())
            .map(|i| {
                let repr = FrameRepr::parse_bytes(tx.get(i)).unwrap();
                assert_eq!((repr.eth.dst, repr.epoch), (CLIENT, 5));
                let Message::Dma(d) = repr.msg else { panic!("not DMA: {repr:?}") };
                assert!(!d.reply);
                (d.seq, d.dir, d.addr, d.len, d.payload.to_vec(), repr.retransmit)
            })
            .collect()
    }

    fn reply(seq: u64, dir: DmaDir, addr: u64, len: u32, payload: &[u8]) -> Dma<'_> {
        Dma { route: binding().route, seq, dir, reply: true, addr, len, payload }
    }

    #[test]
    fn a_read_is_chunked_numbered_in_the_session_and_put_together() {
        let mut e = DmaEngine::new(SERVER, 1000);
        let t0 = Instant::now();
        e.start_session(3, 0x77);
        e.submit(9, DmaRequest { tag: 42, op: DmaOp::Read { addr: 0x1000, len: 2500 } }, Some(binding()), t0);
        let frames = sent(&mut e, t0);
        let chunks: Vec<_> = frames.iter().map(|f| (Seq(f.0), f.2, f.3)).collect();
        assert_eq!(
            chunks,
            [
                (Seq::new(0x77, 0), 0x1000, 1000),
                (Seq::new(0x77, 1), 0x1000 + 1000, 1000),
                (Seq::new(0x77, 2), 0x1000 + 2000, 500)
            ]
        );
        // Answers in any order; a duplicate changes nothing.
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        for (i, f) in frames.iter().enumerate().rev() {
            let part = &data[i * 1000..(i * 1000 + f.3 as usize)];
            e.answer(3, &reply(f.0, DmaDir::Read, f.2, f.3, part));
            e.answer(3, &reply(f.0, DmaDir::Read, f.2, f.3, part));
        }
        let done: Vec<_> = e.take_finished().collect();
        assert_eq!(done, [(9, 42, DmaResult::Read(data))]);
        assert_eq!((e.stats().stale_answers, e.stats().completed, e.pending()), (3, 1, 0));
    }

    #[test]
    fn an_unanswered_chunk_goes_again_under_its_number_then_fails_its_request() {
        let mut e = DmaEngine::new(SERVER, 1000);
        let t0 = Instant::now();
        e.start_session(3, 1);
        e.submit(9, DmaRequest { tag: 1, op: DmaOp::Write { addr: 0x2000, data: vec![5; 10] } }, Some(binding()), t0);
        let first = sent(&mut e, t0);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].4.as_slice(), first[0].5), (&[5u8; 10][..], false));
        assert!(sent(&mut e, t0 + DMA_RETRY / 2).is_empty(), "not yet due");
        let mut now = t0;
        for _ in 1..DMA_TRIES {
            now += DMA_RETRY;
            let again = sent(&mut e, now);
            assert_eq!((again.len(), again[0].0, again[0].5), (1, first[0].0, true));
        }
        now += DMA_RETRY;
        assert!(sent(&mut e, now).is_empty());
        let done: Vec<_> = e.take_finished().collect();
        assert_eq!(done, [(9, 1, DmaResult::Refused)]);
        assert_eq!((e.stats().gave_up, e.stats().failed, e.stats().retransmits), (1, 1, u64::from(DMA_TRIES - 1)));
    }

    #[test]
    fn refusals_fail_the_request_no_session_numbers_it_again_and_bad_answers_are_dropped() {
        let mut e = DmaEngine::new(SERVER, 1000);
        let t0 = Instant::now();
        e.start_session(3, 1);
        e.submit(9, DmaRequest { tag: 1, op: DmaOp::Read { addr: 0x3000, len: 8 } }, Some(binding()), t0);
        e.submit(9, DmaRequest { tag: 2, op: DmaOp::Read { addr: 0x4000, len: 8 } }, Some(binding()), t0);
        let f = sent(&mut e, t0);
        // Wrong length, wrong address, wrong direction: dropped, still waiting.
        e.answer(3, &reply(f[0].0, DmaDir::Read, 0x3000, 4, &[0; 4]));
        e.answer(3, &reply(f[0].0, DmaDir::Read, 0x3008, 8, &[0; 8]));
        e.answer(3, &reply(f[0].0, DmaDir::Write, 0x3000, 8, &[]));
        assert_eq!(e.stats().bad_answers, 3);
        e.refused(3, f[0].0, NackReason::OutOfRange);
        // The client lost its session: the chunk waits for the next one and gets a number in it.
        e.refused(3, f[1].0, NackReason::NoSession);
        assert!(sent(&mut e, t0).is_empty());
        e.start_session(3, 2);
        let again = sent(&mut e, t0);
        assert_eq!(Seq(again[0].0), Seq::new(2, 0));
        e.answer(3, &reply(again[0].0, DmaDir::Read, 0x4000, 8, &[1; 8]));
        let done: Vec<_> = e.take_finished().collect();
        assert_eq!(done, [(9, 1, DmaResult::Refused), (9, 2, DmaResult::Read(vec![1; 8]))]);
        // No client bound, or a range past the end: refused at once.
        e.submit(9, DmaRequest { tag: 3, op: DmaOp::Read { addr: 0, len: 8 } }, None, t0);
        e.submit(9, DmaRequest { tag: 4, op: DmaOp::Read { addr: u64::MAX, len: 8 } }, Some(binding()), t0);
        let done: Vec<_> = e.take_finished().collect();
        assert_eq!(done, [(9, 3, DmaResult::Refused), (9, 4, DmaResult::Refused)]);
    }
}
