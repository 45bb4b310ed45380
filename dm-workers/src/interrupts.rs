//! Interrupts from device models to the VMs that use them: one reliable
//! stream per (client platform, VM), stop-and-wait like a vCPU's requests
//! ([`StopAndWait`]): the next interrupt goes once the one in flight is
//! acknowledged, so a lost frame can never let a later level overtake an
//! earlier one. A device's interrupts go to the client and VM that used it
//! last ([`IrqStreams::bind`]); when the control panel moves a VM to another
//! client platform, its bindings and whatever was not acknowledged move
//! with it ([`IrqStreams::follow`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use dmfabric_dataplane::reliable::{Due, Retry, StopAndWait};
use dmfabric_dataplane::FrameBatch;
use dmfabric_wire::{EthernetRepr, FrameRepr, Interrupt, InterruptAck, IoRequest, MacAddr, Message, Route, Trigger};

use crate::irq::{IrqEvent, IrqQueue};

/// Interrupts one (client, VM) stream may queue behind the one in flight;
/// past it edges are dropped (counted) and levels coalesce.
pub const IRQ_STREAM_QUEUE: usize = 1024;
/// How long an interrupt waits for its ack before it is sent again.
pub const IRQ_RETRY: Duration = Duration::from_millis(20);
/// Sends of one interrupt before the server gives up on it.
pub const IRQ_TRIES: u32 = 50;

/// Where a device's interrupts go: the client platform (at its MAC) and
/// the VM that used the device last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub to: MacAddr,
    pub route: Route,
}

/// A VM the control panel moved to another client platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmMove {
    pub vm: u32,
    pub client: u16,
    pub hypervisor: u16,
    pub mac: MacAddr,
}

/// What the interrupt streams did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqStats {
    /// Interrupt frames sent (first copies).
    pub sent: u64,
    pub retransmits: u64,
    pub acks: u64,
    /// Acks for interrupts not (or no longer) waiting for one.
    pub acks_stale: u64,
    /// Interrupts of a device no VM has used yet: nobody to send them to.
    pub unbound: u64,
    /// Interrupts never acknowledged within the retry limit: dropped.
    pub given_up: u64,
    /// Edges dropped because a queue was full.
    pub queue_full: u64,
    /// Level changes folded into one still queued for the same line.
    pub coalesced: u64,
    /// Frames that did not fit the TX burst.
    pub tx_full: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    irq: Interrupt,
    to: MacAddr,
}

#[derive(Debug)]
struct IrqStream {
    next_seq: u64,
    sender: StopAndWait<Pending>,
    queue: VecDeque<Pending>,
}

/// Every interrupt stream of a server.
#[derive(Debug)]
pub struct IrqStreams {
    server: u16,
    mac: MacAddr,
    bindings: HashMap<u32, Binding>,
    streams: HashMap<(u16, u32), IrqStream>,
    /// First sequence number of a stream: the start time in nanoseconds, so
    /// a restarted server's interrupts are never older than its last life's.
    seq_base: u64,
    retry: Retry,
    stats: IrqStats,
    /// Edges dropped because a stream's queue was full.
    edges_dropped: u64,
}

impl IrqStreams {
    pub fn new(server: u16, mac: MacAddr) -> IrqStreams {
        IrqStreams {
            server,
            mac,
            bindings: HashMap::new(),
            streams: HashMap::new(),
            seq_base: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            retry: Retry { timeout: IRQ_RETRY, retries: IRQ_TRIES - 1 },
            stats: IrqStats::default(),
            edges_dropped: 0,
        }
    }

    /// `req` ran here for a client at `to`: its device's interrupts go there.
    pub fn bind(&mut self, req: &IoRequest, to: MacAddr) {
        let route = Route { server: self.server, vcpu: 0, ..req.route };
        self.bindings.insert(req.route.device, Binding { to, route });
    }

    /// Where `device`'s interrupts (and requests for its VM) go.
    pub fn binding(&self, device: u32) -> Option<Binding> {
        self.bindings.get(&device).copied()
    }

    /// Queue what the device models raised on their VMs' streams.
    pub fn take(&mut self, from: &IrqQueue) {
        from.drain(&mut |e| self.enqueue(e));
        self.stats.queue_full = from.edges_dropped() + self.edges_dropped;
    }

    fn enqueue(&mut self, e: IrqEvent) {
        let Some(b) = self.bindings.get(&e.device).copied() else {
            self.stats.unbound += 1;
            return;
        };
        let seq_base = self.seq_base;
        let retry = self.retry;
        let stream = self.streams.entry((b.route.client, b.route.vm)).or_insert_with(|| IrqStream {
            next_seq: seq_base,
            sender: StopAndWait::new(retry),
            queue: VecDeque::new(),
        });
        if stream.queue.len() >= IRQ_STREAM_QUEUE {
            match e.trigger {
                Trigger::Edge => {
                    self.edges_dropped += 1;
                    return;
                }
                Trigger::Level { asserted } => {
                    let same_line = |p: &&mut Pending| {
                        p.irq.route.device == e.device
                            && p.irq.source == e.source
                            && matches!(p.irq.trigger, Trigger::Level { .. })
                    };
                    if let Some(p) = stream.queue.iter_mut().rev().find(same_line) {
                        p.irq.trigger = Trigger::Level { asserted };
                        self.stats.coalesced += 1;
                        return;
                    }
                    // The line's first change in the queue: it goes in
                    // (the excess is bounded by the VM's level lines).
                }
            }
        }
        let irq = Interrupt {
            route: Route { device: e.device, ..b.route },
            seq: stream.next_seq,
            source: e.source,
            trigger: e.trigger,
        };
        stream.next_seq += 1;
        stream.queue.push_back(Pending { irq, to: b.to });
    }

    /// Send each stream's next interrupt once the previous one is
    /// acknowledged, and again those whose ack is overdue.
    pub fn send(&mut self, tx: &mut FrameBatch, now: Instant) {
        let (mac, stats) = (self.mac, &mut self.stats);
        for stream in self.streams.values_mut() {
            if tx.is_full() {
                break;
            }
            let (p, retransmit) = match stream.sender.poll(now) {
                Due::Waiting => continue,
                Due::Resend(p) => {
                    stats.retransmits += 1;
                    (*p, true)
                }
                due => {
                    if matches!(due, Due::GaveUp(_)) {
                        stats.given_up += 1;
                    }
                    let Some(p) = stream.queue.pop_front() else { continue };
                    stream.sender.sent(p, p.irq.seq, now);
                    stats.sent += 1;
                    (p, false)
                }
            };
            let mut repr = FrameRepr::new(EthernetRepr { dst: p.to, src: mac }, Message::Interrupt(p.irq));
            repr.retransmit = retransmit;
            if !tx.push_with(|buf| repr.emit(buf).ok()) {
                stats.tx_full += 1;
            }
        }
    }

    /// The client acknowledged an interrupt; the stream's next one goes out
    /// at the next [`IrqStreams::send`].
    pub fn ack(&mut self, ack: &InterruptAck) {
        let acked = self.streams.get_mut(&(ack.route.client, ack.route.vm)).and_then(|st| st.sender.ack(ack.seq));
        match acked {
            Some(_) => self.stats.acks += 1,
            None => self.stats.acks_stale += 1,
        }
    }

    /// VMs moved to other client platforms: their devices' interrupts go
    /// there from now on, those not yet acknowledged included (the old
    /// platform refuses interrupts from the moment it holds a VM to save
    /// it, so an unacknowledged one is not in the saved state).
    pub fn follow(&mut self, moves: &[VmMove]) {
        for m in moves {
            let mut old_keys = Vec::new();
            for b in self.bindings.values_mut().filter(|b| b.route.vm == m.vm && b.route.client != m.client) {
                old_keys.push((b.route.client, b.route.vm));
                b.route = Route { client: m.client, hypervisor: m.hypervisor, ..b.route };
                b.to = m.mac;
            }
            old_keys.sort_unstable();
            old_keys.dedup();
            for old in old_keys {
                let Some(mut st) = self.streams.remove(&old) else { continue };
                let unacked: Vec<Pending> = st.sender.take().into_iter().chain(st.queue.drain(..)).collect();
                if unacked.is_empty() {
                    continue;
                }
                let (seq_base, retry) = (self.seq_base, self.retry);
                let new = self.streams.entry((m.client, m.vm)).or_insert_with(|| IrqStream {
                    next_seq: seq_base,
                    sender: StopAndWait::new(retry),
                    queue: VecDeque::new(),
                });
                for p in unacked {
                    let route = Route { client: m.client, hypervisor: m.hypervisor, ..p.irq.route };
                    let irq = Interrupt { route, seq: new.next_seq, ..p.irq };
                    new.next_seq += 1;
                    new.queue.push_back(Pending { irq, to: m.mac });
                }
            }
        }
    }

    /// When an interrupt in flight is due for a retransmit.
    pub fn next_retransmit(&self) -> Option<Instant> {
        self.streams.values().filter_map(|st| st.sender.deadline()).min()
    }

    /// Interrupts not acknowledged yet (in flight or queued).
    pub fn pending(&self) -> usize {
        self.streams.values().map(|st| st.queue.len() + usize::from(!st.sender.is_idle())).sum()
    }

    pub fn stats(&self) -> IrqStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_devices::IrqLine;
    use dmfabric_wire::{AccessSize, Direction, IrqSource, Space};

    use crate::irq::WireLine;

    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 3]);

    fn bound(streams: &mut IrqStreams, device: u32) {
        let req = IoRequest {
            route: Route { server: 1, hypervisor: 1, client: 3, vm: 7, vcpu: 0, device },
            seq: 0,
            space: Space::Pio,
            dir: Direction::Write,
            size: AccessSize::B1,
            addr: 0,
            data: 0,
        };
        streams.bind(&req, CLIENT);
    }

    /// Send, ack each interrupt, and return (device, trigger) in order.
    fn deliver_all(streams: &mut IrqStreams) -> Vec<(u32, Trigger)> {
        let mut out = Vec::new();
        let now = Instant::now();
        for _ in 0..10_000 {
            let mut tx = FrameBatch::new();
            streams.send(&mut tx, now);
            let Some(frame) = tx.iter().next() else { break };
            let Message::Interrupt(i) = FrameRepr::parse_bytes(frame).unwrap().msg else { panic!("not an interrupt") };
            out.push((i.route.device, i.trigger));
            streams.ack(&InterruptAck { route: i.route, seq: i.seq });
        }
        out
    }

    #[test]
    fn a_full_stream_drops_edges_but_never_a_level() {
        let queue = IrqQueue::new();
        let mut streams = IrqStreams::new(1, MacAddr([2, 0, 0, 0, 0, 1]));
        bound(&mut streams, 5);
        bound(&mut streams, 6);
        let mut edges = WireLine::new(5, IrqSource::Line(5), queue.clone());
        let mut level = WireLine::new(6, IrqSource::Line(4), queue.clone());
        // More edges than a stream holds, then a level goes up, down, up.
        for _ in 0..IRQ_STREAM_QUEUE + 10 {
            edges.pulse();
            streams.take(&queue);
        }
        level.set_level(true);
        streams.take(&queue);
        level.set_level(false);
        streams.take(&queue);
        level.set_level(true);
        streams.take(&queue);
        let got = deliver_all(&mut streams);
        let levels: Vec<Trigger> = got.iter().filter(|(d, _)| *d == 6).map(|(_, t)| *t).collect();
        assert_eq!(levels.last(), Some(&Trigger::Level { asserted: true }), "the line ends where the device left it");
        assert_eq!(levels.len(), 1, "queued past the bound, the changes folded into one");
        let st = streams.stats();
        assert_eq!((st.queue_full, st.coalesced), (10, 2), "{st:?}");
        // The line goes on: lowering it now arrives.
        level.set_level(false);
        streams.take(&queue);
        assert_eq!(deliver_all(&mut streams), vec![(6, Trigger::Level { asserted: false })]);
    }
}
