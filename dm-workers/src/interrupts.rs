//! What device models raise, to the VMs that use them: interrupts, and
//! resets of the VM (an i8042's reset line). One reliable stream per
//! (client platform, VM), stop-and-wait like a vCPU's requests
//! ([`StopAndWait`]): the next item goes once the one in flight is
//! acknowledged, so a lost frame can never let a later level overtake an
//! earlier one, and a reset arrives in order with the interrupts.
//!
//! - **Where items go** ([`IrqStreams::bind_all`]): a device of a VM sends
//!   to the client platform the registry says runs that VM, at its
//!   registered MAC — never to whoever spoke last; a device of no VM in
//!   particular (the shared test devices) to the VM that used it last
//!   ([`IrqStreams::bind_shared`], authenticated requests only). When the
//!   control panel moves a VM, its bindings and whatever was not
//!   acknowledged move with it ([`IrqStreams::follow`]).
//! - **Sequence numbers** are assigned when an item is sent: the client's
//!   session here and a counter from 0 ([`dmfabric_wire::session`]). A
//!   client's items wait until it has a session; when it starts a new one
//!   ([`IrqStreams::start_session`]: it restarted, or this server did) its
//!   streams start again at 0 in it, the unacknowledged item first, and
//!   every level line of its devices is sent again at its current level.
//! - **Lines of a VM whose interrupt controller is a model** (an I/O APIC,
//!   [`IrqStreams::bind_chips`]) drive its pins instead of going to the
//!   client: on this server, through its pin queue; on another server, as
//!   Interrupt frames to that server on the VM's stream, which that server
//!   acknowledges like a client. [`IrqStreams::chip_pending`] says when a
//!   VM still has such a line change unacknowledged: the server holds the
//!   completions of that VM's requests until then, so a level the guest
//!   lowered is low at the controller before the guest can EOI it.
//! - **Bounds**: [`IRQ_STREAM_QUEUE`] items per stream (past it edges are
//!   dropped and counted, levels coalesce), each sent at most
//!   [`IRQ_TRIES`] times, every [`IRQ_RETRY`], only to the registered MAC.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use dmfabric_dataplane::reliable::{Due, Retry, StopAndWait};
use dmfabric_dataplane::FrameBatch;
use dmfabric_wire::auth::SendKey;
use dmfabric_wire::session::Seq;
use dmfabric_wire::{
    ControlMsg, ControlOp, EthernetRepr, FrameRepr, Interrupt, InterruptAck, IrqSource, MacAddr, Message, Route,
    Trigger, LIFECYCLE_RESET,
};

use crate::irq::{IrqEvent, IrqQueue};
use crate::irqchip::{PinQueue, Pins};
use crate::peers::Registry;

/// Items one (client, VM) stream may queue behind the one in flight;
/// past it edges are dropped (counted) and levels coalesce.
pub const IRQ_STREAM_QUEUE: usize = 1024;
/// How long an item waits for its ack before it is sent again.
pub const IRQ_RETRY: Duration = Duration::from_millis(20);
/// Sends of one item before the server gives up on it.
pub const IRQ_TRIES: u32 = 50;
/// How a line change to the server holding its VM's interrupt controller
/// is retried: that server busy-polls and acknowledges at once, and the
/// completions of the VM's requests wait for the acknowledgement, so a
/// lost frame is sent again sooner than one to a client; given up after
/// about as long.
pub const CHIP_RETRY: Retry = Retry { timeout: Duration::from_millis(2), retries: 499 };

/// Where a device's items go: the client platform (at its registered MAC)
/// and the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub to: MacAddr,
    pub route: Route,
    /// Bound by the registry (a device of a VM), not by its last user.
    pub fixed: bool,
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
    /// Acks for items not (or no longer) waiting for one.
    pub acks_stale: u64,
    /// Items of a device bound to no VM: nobody to send them to.
    pub unbound: u64,
    /// Items never acknowledged within the retry limit: dropped.
    pub given_up: u64,
    /// Edges dropped because a queue was full.
    pub queue_full: u64,
    /// Level changes folded into one still queued for the same line.
    pub coalesced: u64,
    /// Frames that did not fit the TX burst.
    pub tx_full: u64,
    /// Resets of a VM sent (first copies).
    pub resets: u64,
    /// Levels sent again because their client started a new session.
    pub levels_resent: u64,
    /// Line changes that drove the pins of an interrupt controller here.
    pub chip_pins: u64,
    /// Line changes sent to the server holding their VM's interrupt
    /// controller (first copies; also counted in `sent`).
    pub chip_sent: u64,
}

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    Irq {
        device: u32,
        source: IrqSource,
        trigger: Trigger,
    },
    /// The device asks for a reset of the VM.
    Reset {
        device: u32,
    },
}

impl Item {
    fn device(&self) -> u32 {
        match *self {
            Item::Irq { device, .. } | Item::Reset { device } => device,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    item: Item,
    route: Route,
    to: MacAddr,
    /// A line change on its way to the server holding the VM's
    /// interrupt controller (`to` is that server's MAC).
    to_chip: bool,
}

/// Where the lines of a VM with its interrupt controller as a model go.
#[derive(Debug, Clone)]
enum ChipRoute {
    /// The controller is here: its pin queue.
    Here(std::sync::Arc<PinQueue>),
    /// On that server, at that MAC.
    At(MacAddr),
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    pending: Pending,
    seq: u64,
}

#[derive(Debug)]
struct IrqStream {
    /// The session the counter runs in (None: the client has none yet).
    session: Option<u32>,
    counter: u32,
    sender: StopAndWait<Sent>,
    queue: VecDeque<Pending>,
}

impl IrqStream {
    fn new(retry: Retry, session: Option<u32>) -> IrqStream {
        IrqStream { session, counter: 0, sender: StopAndWait::new(retry), queue: VecDeque::new() }
    }
}

/// How frames to a client are sealed: its key, the server's epoch.
#[derive(Debug, Clone, Copy)]
pub struct Sealing<'a> {
    pub registry: &'a Registry,
    pub epoch: u32,
    /// Seal at all (false only to measure what sealing costs).
    pub authenticate: bool,
}

impl Sealing<'_> {
    /// Emit `repr` for `client` into `tx`: false if there was no room or
    /// no key.
    pub fn push(&self, tx: &mut FrameBatch, client: u16, mut repr: FrameRepr<'_>) -> bool {
        repr.epoch = self.epoch;
        if !self.authenticate {
            return tx.push_with(|buf| repr.emit(buf).ok());
        }
        let Some(key): Option<SendKey> = self.registry.client(client).map(|c| c.keys.sending()) else {
            return false;
        };
        tx.push_with(|buf| repr.emit_sealed(buf, &key).ok())
    }
}

/// Every interrupt stream of a server.
#[derive(Debug)]
pub struct IrqStreams {
    server: u16,
    mac: MacAddr,
    bindings: HashMap<u32, Binding>,
    streams: HashMap<(u16, u32), IrqStream>,
    /// The last level of each level line (device, source): sent again to a
    /// client that starts a new session.
    levels: HashMap<(u32, IrqSource), bool>,
    /// VMs whose lines drive an interrupt controller model.
    chips: HashMap<u32, ChipRoute>,
    /// Each client's session here.
    sessions: HashMap<u16, u32>,
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
            levels: HashMap::new(),
            chips: HashMap::new(),
            sessions: HashMap::new(),
            retry: Retry { timeout: IRQ_RETRY, retries: IRQ_TRIES - 1 },
            stats: IrqStats::default(),
            edges_dropped: 0,
        }
    }

    /// Bind each device of a VM in `devices` (device, its VM) to the
    /// client platform `registry` says runs the VM; devices of no VM keep
    /// their last user, devices no longer listed lose their binding.
    pub fn bind_all(&mut self, devices: impl IntoIterator<Item = (u32, Option<u32>)>, registry: &Registry) {
        let mut fresh = HashMap::new();
        for (device, vm) in devices {
            match vm {
                Some(vm) => {
                    if let Some(c) = registry.runs_on(vm) {
                        let route =
                            Route { server: self.server, hypervisor: c.hypervisor, client: c.id, vm, vcpu: 0, device };
                        fresh.insert(device, Binding { to: c.mac, route, fixed: true });
                    }
                }
                None => {
                    if let Some(b) = self.bindings.get(&device).filter(|b| !b.fixed) {
                        fresh.insert(device, *b);
                    }
                }
            }
        }
        self.bindings = fresh;
    }

    /// Where the lines of the bound VMs whose interrupt controller is a
    /// model go: its pin queue in `pins` if it is here, else the server
    /// `registry` names for it. Call after [`IrqStreams::bind_all`].
    pub fn bind_chips(&mut self, registry: &Registry, pins: &Pins) {
        let mut chips = HashMap::new();
        for b in self.bindings.values().filter(|b| b.fixed) {
            let vm = b.route.vm;
            if let Some(q) = pins.queue(vm) {
                chips.insert(vm, ChipRoute::Here(q));
            } else if let Some((_, mac)) = registry.chip_of(vm) {
                chips.insert(vm, ChipRoute::At(mac));
            }
        }
        self.chips = chips;
    }

    /// Whether VM `vm`'s lines go to an interrupt controller on another server.
    pub fn chip_elsewhere(&self, vm: u32) -> bool {
        matches!(self.chips.get(&vm), Some(ChipRoute::At(_)))
    }

    /// Whether `client`'s stream of VM `vm` holds a line change for the
    /// VM's interrupt controller on another server that it has not
    /// acknowledged yet (in flight or queued).
    pub fn chip_pending(&self, client: u16, vm: u32) -> bool {
        self.streams
            .get(&(client, vm))
            .is_some_and(|st| st.sender.item().is_some_and(|s| s.pending.to_chip) || st.queue.iter().any(|p| p.to_chip))
    }

    /// A verified request of `route`'s client and VM ran on `device`, a
    /// device of no VM in particular: its items go to that VM now.
    pub fn bind_shared(&mut self, device: u32, route: &Route, to: MacAddr) {
        if self.bindings.get(&device).is_some_and(|b| b.fixed) {
            return;
        }
        let route = Route { server: self.server, vcpu: 0, device, ..*route };
        self.bindings.insert(device, Binding { to, route, fixed: false });
    }

    /// Where `device`'s items go.
    pub fn binding(&self, device: u32) -> Option<Binding> {
        self.bindings.get(&device).copied()
    }

    /// Queue what the device models raised on their VMs' streams.
    pub fn take(&mut self, from: &IrqQueue) {
        from.drain(&mut |e| self.enqueue_irq(e));
        self.stats.queue_full = from.edges_dropped() + self.edges_dropped;
    }

    fn enqueue_irq(&mut self, e: IrqEvent) {
        let chip = match (e.source, self.bindings.get(&e.device)) {
            (IrqSource::Line(pin), Some(b)) if b.fixed => self.chips.get(&b.route.vm).map(|c| (pin, c)),
            _ => None,
        };
        if let Some((pin, ChipRoute::Here(q))) = chip {
            match e.trigger {
                Trigger::Edge => {
                    q.push(pin, true);
                    q.push(pin, false);
                }
                Trigger::Level { asserted } => q.push(pin, asserted),
            }
            self.stats.chip_pins += 1;
            return;
        }
        if let Trigger::Level { asserted } = e.trigger {
            self.levels.insert((e.device, e.source), asserted);
        }
        self.enqueue(Item::Irq { device: e.device, source: e.source, trigger: e.trigger });
    }

    /// Queue a reset of the VM `device` belongs to; false if it is bound to none.
    pub fn reset(&mut self, device: u32) -> bool {
        if self.bindings.contains_key(&device) {
            self.enqueue(Item::Reset { device });
            true
        } else {
            self.stats.unbound += 1;
            false
        }
    }

    fn enqueue(&mut self, item: Item) {
        let Some(b) = self.bindings.get(&item.device()).copied() else {
            self.stats.unbound += 1;
            return;
        };
        let (retry, session) = (self.retry, self.sessions.get(&b.route.client).copied());
        let stream = self.streams.entry((b.route.client, b.route.vm)).or_insert_with(|| IrqStream::new(retry, session));
        if stream.queue.len() >= IRQ_STREAM_QUEUE {
            match item {
                Item::Irq { trigger: Trigger::Edge, .. } => {
                    self.edges_dropped += 1;
                    return;
                }
                Item::Irq { device, source, trigger: Trigger::Level { asserted } } => {
                    let same_line = |p: &&mut Pending| {
                        matches!(p.item, Item::Irq { device: d, source: s, trigger: Trigger::Level { .. } }
                            if d == device && s == source)
                    };
                    if let Some(p) = stream.queue.iter_mut().rev().find(same_line) {
                        p.item = Item::Irq { device, source, trigger: Trigger::Level { asserted } };
                        self.stats.coalesced += 1;
                        return;
                    }
                    // The line's first change in the queue: it goes in
                    // (the excess is bounded by the VM's level lines).
                }
                // Resets are rare and matter: they go in.
                Item::Reset { .. } => {}
            }
        }
        // A line of a VM whose controller is on another server goes there.
        let chip = match (item, self.chips.get(&b.route.vm)) {
            (Item::Irq { source: IrqSource::Line(_), .. }, Some(ChipRoute::At(mac))) => Some(*mac),
            _ => None,
        };
        let route = Route { device: item.device(), ..b.route };
        stream.queue.push_back(Pending { item, route, to: chip.unwrap_or(b.to), to_chip: chip.is_some() });
    }

    /// `client` started using `session` here: its streams start again in it
    /// (what was not acknowledged first), and its level lines are sent again.
    pub fn start_session(&mut self, client: u16, session: u32) {
        self.sessions.insert(client, session);
        for ((c, _), st) in self.streams.iter_mut().filter(|((c, _), _)| *c == client) {
            debug_assert_eq!(*c, client);
            if let Some(sent) = st.sender.take() {
                st.queue.push_front(sent.pending);
            }
            st.session = Some(session);
            st.counter = 0;
        }
        let mut resend = Vec::new();
        for (&(device, source), &asserted) in &self.levels {
            if self.bindings.get(&device).is_some_and(|b| b.route.client == client) {
                resend.push(Item::Irq { device, source, trigger: Trigger::Level { asserted } });
            }
        }
        resend.sort_unstable_by_key(|i| i.device());
        self.stats.levels_resent += resend.len() as u64;
        for item in resend {
            self.enqueue(item);
        }
    }

    /// Send each stream's next item once the previous one is acknowledged,
    /// and again those whose ack is overdue.
    pub fn send(&mut self, tx: &mut FrameBatch, now: Instant, seal: &Sealing<'_>) {
        let (mac, stats) = (self.mac, &mut self.stats);
        for stream in self.streams.values_mut() {
            if tx.is_full() {
                break;
            }
            let Some(session) = stream.session else { continue };
            let (sent, retransmit) = match stream.sender.poll(now) {
                Due::Waiting => continue,
                Due::Resend(s) => {
                    stats.retransmits += 1;
                    (*s, true)
                }
                due => {
                    if matches!(due, Due::GaveUp(_)) {
                        stats.given_up += 1;
                    }
                    let Some(p) = stream.queue.pop_front() else { continue };
                    let seq = Seq::new(session, stream.counter).0;
                    stream.counter = stream.counter.wrapping_add(1);
                    let sent = Sent { pending: p, seq };
                    match p.to_chip {
                        true => stream.sender.sent_with(sent, seq, now, CHIP_RETRY),
                        false => stream.sender.sent(sent, seq, now),
                    }
                    match p.item {
                        Item::Irq { .. } => stats.sent += 1,
                        Item::Reset { .. } => stats.resets += 1,
                    }
                    stats.chip_sent += u64::from(p.to_chip);
                    (sent, false)
                }
            };
            let p = sent.pending;
            let reset = [LIFECYCLE_RESET];
            let msg = match p.item {
                Item::Irq { source, trigger, .. } => {
                    Message::Interrupt(Interrupt { route: p.route, seq: sent.seq, source, trigger })
                }
                Item::Reset { .. } => Message::Control(ControlMsg {
                    route: p.route,
                    seq: sent.seq,
                    op: ControlOp::Lifecycle,
                    payload: &reset,
                }),
            };
            let mut repr = FrameRepr::new(EthernetRepr { dst: p.to, src: mac }, msg);
            repr.retransmit = retransmit;
            if !seal.push(tx, p.route.client, repr) {
                stats.tx_full += 1;
            }
        }
    }

    /// The client acknowledged an item; the stream's next one goes out at
    /// the next [`IrqStreams::send`].
    pub fn ack(&mut self, ack: &InterruptAck) {
        let acked = self.streams.get_mut(&(ack.route.client, ack.route.vm)).and_then(|st| st.sender.ack(ack.seq));
        match acked {
            Some(_) => self.stats.acks += 1,
            None => self.stats.acks_stale += 1,
        }
    }

    /// VMs moved to other client platforms: their devices' items go there
    /// from now on, those not yet acknowledged included (the old platform
    /// refuses interrupts from the moment it holds a VM to save it, so an
    /// unacknowledged one is not in the saved state).
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
                // The old stream stays (its counter goes on if the VM comes
                // back in the same session); the item in flight was not
                // taken there, so its number is used again.
                let Some(st) = self.streams.get_mut(&old) else { continue };
                let in_flight = st.sender.take();
                if let Some(sent) = &in_flight {
                    if Some(Seq(sent.seq).session()) == st.session {
                        st.counter = Seq(sent.seq).counter();
                    }
                }
                let unacked: Vec<Pending> =
                    in_flight.map(|s| s.pending).into_iter().chain(st.queue.drain(..)).collect();
                let (retry, session) = (self.retry, self.sessions.get(&m.client).copied());
                let new = self.streams.entry((m.client, m.vm)).or_insert_with(|| IrqStream::new(retry, session));
                for p in unacked {
                    let route = Route { client: m.client, hypervisor: m.hypervisor, ..p.route };
                    // A line for the controller still goes to its server.
                    let to = if p.to_chip { p.to } else { m.mac };
                    new.queue.push_back(Pending { route, to, ..p });
                }
            }
        }
    }

    /// When an item in flight is due for a retransmit.
    pub fn next_retransmit(&self) -> Option<Instant> {
        self.streams.values().filter_map(|st| st.sender.deadline()).min()
    }

    /// Items not acknowledged yet (in flight or queued).
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
    use crate::peers::Client;
    use dmfabric_devices::IrqLine;
    use dmfabric_testkit::keys;

    use crate::irq::WireLine;

    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 3]);
    const OTHER: MacAddr = MacAddr([2, 0, 0, 0, 0, 4]);

    /// Client 3 runs VM 7, client 4 VM 8.
    fn registry() -> Registry {
        let c3 = Client { id: 3, mac: CLIENT, hypervisor: 1, keys: keys::ring(3), vms: vec![(7, 1)] };
        let c4 = Client { id: 4, mac: OTHER, hypervisor: 1, keys: keys::ring(4), vms: vec![(8, 1)] };
        Registry::new(vec![c3, c4], vec![], HashMap::new())
    }

    /// Send, ack each item, and return (client, device, trigger, seq) in order.
    fn deliver_all(streams: &mut IrqStreams, reg: &Registry) -> Vec<(u16, u32, Trigger, Seq)> {
        let mut out = Vec::new();
        let now = Instant::now();
        let seal = Sealing { registry: reg, epoch: 9, authenticate: true };
        for _ in 0..10_000 {
            let mut tx = FrameBatch::new();
            streams.send(&mut tx, now, &seal);
            let Some(frame) = tx.iter().next() else { break };
            let f = dmfabric_wire::Frame::new_checked(frame).unwrap();
            let client = f.header().client_id.get();
            reg.client(client).unwrap().keys.verify(&f).expect("sealed with its client's key");
            let repr = FrameRepr::parse_bytes(frame).unwrap();
            assert_eq!(repr.epoch, 9);
            let Message::Interrupt(i) = repr.msg else { panic!("not an interrupt") };
            assert_eq!(repr.eth.dst, reg.client(client).unwrap().mac, "to the registered MAC");
            out.push((client, i.route.device, i.trigger, Seq(i.seq)));
            streams.ack(&InterruptAck { route: i.route, seq: i.seq });
        }
        out
    }

    #[test]
    fn a_full_stream_drops_edges_but_never_a_level() {
        let reg = registry();
        let queue = IrqQueue::new();
        let mut streams = IrqStreams::new(1, MacAddr([2, 0, 0, 0, 0, 1]));
        streams.bind_all([(5, Some(7)), (6, Some(7))], &reg);
        streams.start_session(3, 40);
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
        let got = deliver_all(&mut streams, &reg);
        let levels: Vec<Trigger> = got.iter().filter(|g| g.1 == 6).map(|g| g.2).collect();
        assert_eq!(levels.last(), Some(&Trigger::Level { asserted: true }), "the line ends where the device left it");
        assert_eq!(levels.len(), 1, "queued past the bound, the changes folded into one");
        let seqs: Vec<Seq> = got.iter().map(|g| g.3).collect();
        assert!(seqs.iter().enumerate().all(|(i, s)| *s == Seq::new(40, i as u32)), "numbered from 0 in the session");
        let st = streams.stats();
        assert_eq!((st.queue_full, st.coalesced), (10, 2), "{st:?}");
        // The line goes on: lowering it now arrives.
        level.set_level(false);
        streams.take(&queue);
        assert_eq!(
            deliver_all(&mut streams, &reg).iter().map(|g| (g.1, g.2)).collect::<Vec<_>>(),
            vec![(6, Trigger::Level { asserted: false })]
        );
    }

    #[test]
    fn items_go_to_the_client_running_the_vm_and_wait_for_its_session() {
        let reg = registry();
        let queue = IrqQueue::new();
        let mut streams = IrqStreams::new(1, MacAddr([2, 0, 0, 0, 0, 1]));
        // Device 5 is VM 7's (client 3), device 6 VM 8's (client 4), device 9 nobody's.
        streams.bind_all([(5, Some(7)), (6, Some(8)), (9, None)], &reg);
        // A request from client 4 cannot take a device of VM 7 over.
        streams.bind_shared(5, &Route { client: 4, vm: 8, ..Route::default() }, OTHER);
        assert_eq!(streams.binding(5).map(|b| (b.route.client, b.to)), Some((3, CLIENT)));
        let mut l5 = WireLine::new(5, IrqSource::Line(5), queue.clone());
        let mut l6 = WireLine::new(6, IrqSource::Line(6), queue.clone());
        let mut l9 = WireLine::new(9, IrqSource::Line(9), queue.clone());
        l5.set_level(true);
        l6.pulse();
        l9.pulse();
        streams.take(&queue);
        assert_eq!(streams.stats().unbound, 1, "device 9: nobody used it");
        assert!(deliver_all(&mut streams, &reg).is_empty(), "no client has a session yet");
        streams.start_session(4, 7);
        assert_eq!(deliver_all(&mut streams, &reg), vec![(4, 6, Trigger::Edge, Seq::new(7, 0))]);
        // Client 3 starts a session: its level goes out once (queued and
        // re-sent are the same level, sent once each).
        streams.start_session(3, 70);
        let got = deliver_all(&mut streams, &reg);
        assert!(got.iter().all(|g| (g.0, g.1, g.2) == (3, 5, Trigger::Level { asserted: true })), "{got:?}");
        assert_eq!(got[0].3, Seq::new(70, 0));
        // Client 3 restarts (a new session): the level is sent again, from 0.
        streams.start_session(3, 71);
        assert_eq!(deliver_all(&mut streams, &reg), vec![(3, 5, Trigger::Level { asserted: true }, Seq::new(71, 0))]);
        assert!(streams.stats().levels_resent >= 2);
    }

    #[test]
    fn lines_of_a_vm_whose_controller_is_a_model_go_to_its_pins_or_its_server() {
        const CHIP_SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0a]);
        // VM 7's controller is on server 10; VM 8's is here.
        let reg = registry().with_chips([(7, (10, CHIP_SERVER))].into());
        let pins = Pins::default();
        pins.set_chips(&[8]);
        let queue = IrqQueue::new();
        let mut streams = IrqStreams::new(1, MacAddr([2, 0, 0, 0, 0, 1]));
        streams.bind_all([(5, Some(7)), (6, Some(8))], &reg);
        streams.bind_chips(&reg, &pins);
        assert!(streams.chip_elsewhere(7) && !streams.chip_elsewhere(8));
        streams.start_session(3, 1);
        streams.start_session(4, 1);
        let mut line7 = WireLine::new(5, IrqSource::Line(2), queue.clone());
        let mut msi7 = WireLine::new(5, IrqSource::Msi { address: 0xfee0_0000, data: 0x41 }, queue.clone());
        let mut line8 = WireLine::new(6, IrqSource::Line(9), queue.clone());
        line7.set_level(true);
        msi7.pulse();
        line8.pulse();
        streams.take(&queue);
        // VM 8's line drove the pins here, and went nowhere else.
        #[derive(Default)]
        struct Chip(Vec<(u32, bool)>);
        impl dmfabric_devices::IrqChip for Chip {
            fn set_pin(&mut self, pin: u32, high: bool) {
                self.0.push((pin, high));
            }
        }
        let mut chip = Chip::default();
        pins.queue(8).unwrap().drive(&mut chip);
        assert_eq!(chip.0, [(9, true), (9, false)]);
        assert!(streams.chip_pending(3, 7) && !streams.chip_pending(4, 8));
        // VM 7's line goes to the controller's server, sealed for client 3;
        // its MSI to the client, in order after it.
        let seal = Sealing { registry: &reg, epoch: 9, authenticate: true };
        let mut sent = Vec::new();
        for _ in 0..3 {
            let mut tx = FrameBatch::new();
            streams.send(&mut tx, Instant::now(), &seal);
            let Some(frame) = tx.iter().next() else { break };
            let repr = FrameRepr::parse_bytes(frame).unwrap();
            let Message::Interrupt(i) = repr.msg else { panic!("not an interrupt") };
            sent.push((repr.eth.dst, i.source));
            if repr.eth.dst == CHIP_SERVER {
                // Not acknowledged: sent again after CHIP_RETRY, not IRQ_RETRY.
                let mut again = FrameBatch::new();
                streams.send(&mut again, Instant::now() + CHIP_RETRY.timeout + Duration::from_millis(1), &seal);
                let again = FrameRepr::parse_bytes(again.iter().next().expect("sent again")).unwrap();
                assert!(again.retransmit && again.eth.dst == CHIP_SERVER);
            }
            streams.ack(&InterruptAck { route: i.route, seq: i.seq });
            if repr.eth.dst == CHIP_SERVER {
                assert!(!streams.chip_pending(3, 7), "acknowledged by the controller's server");
            }
        }
        assert_eq!(
            sent,
            [(CHIP_SERVER, IrqSource::Line(2)), (CLIENT, IrqSource::Msi { address: 0xfee0_0000, data: 0x41 })]
        );
        let st = streams.stats();
        assert_eq!((st.chip_pins, st.chip_sent, st.sent), (1, 1, 2), "{st:?}");
        // A new session of the client sends the level again, to the controller.
        streams.start_session(3, 2);
        let mut tx = FrameBatch::new();
        streams.send(&mut tx, Instant::now(), &seal);
        assert_eq!(FrameRepr::parse_bytes(tx.iter().next().unwrap()).unwrap().eth.dst, CHIP_SERVER);
    }

    #[test]
    fn an_unacknowledged_item_is_sent_again_in_a_new_session_first() {
        let reg = registry();
        let queue = IrqQueue::new();
        let mut streams = IrqStreams::new(1, MacAddr([2, 0, 0, 0, 0, 1]));
        streams.bind_all([(5, Some(7))], &reg);
        streams.start_session(3, 1);
        let mut l5 = WireLine::new(5, IrqSource::Line(5), queue.clone());
        l5.pulse();
        l5.pulse();
        streams.take(&queue);
        let seal = Sealing { registry: &reg, epoch: 9, authenticate: true };
        let mut tx = FrameBatch::new();
        streams.send(&mut tx, Instant::now(), &seal);
        assert_eq!(tx.len(), 1, "one in flight, not acknowledged");
        streams.start_session(3, 2);
        let got = deliver_all(&mut streams, &reg);
        assert_eq!(
            got.iter().map(|g| g.3).collect::<Vec<_>>(),
            vec![Seq::new(2, 0), Seq::new(2, 1)],
            "both edges, renumbered"
        );
    }
}
