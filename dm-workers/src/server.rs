//! The server's frame handling: receive, validate, run the device model,
//! transmit the completion. [`Server`] does all of it on one core; the
//! split layout ([`crate::sharded`]) runs the [`Frontend`] on a data-plane
//! core and [`Devices`] shards on worker cores.
//!
//! Every frame that is not answered is counted by reason; nothing received
//! from the wire can make this code panic.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::FrameBatch;
use dmfabric_wire::{
    ControlMsg, ControlOp, EthernetRepr, FrameRepr, Interrupt, IoCompletion, IoRequest, Kind, MacAddr, Message, Nack,
    NackReason, Route, WireError, ETHERTYPE_DMFABRIC,
};

use dmfabric_dataplane::reliable::{DupCache, Seen, StreamKey};

use crate::devices::AddressMap;
pub use crate::devices::{DeviceCounters, DeviceEnv, Devices, Refused, ANY_DEVICE};
use crate::devices::{VmEvent, VmEvents};
use crate::irq::IrqQueue;
use crate::placed::{Handoff, Transit, HELD_MAX, STATE_WAIT};
use dmfabric_control::routing::{LiveRoutes, RoutingTable};
use dmfabric_devices::DeviceSpec;

/// Counters of a server. Plain integers: owned by the server's core.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    pub requests: u64,
    pub completions: u64,
    /// Accesses the device did not claim (completed as real hardware would).
    pub unclaimed: u64,
    pub nack_unknown_device: u64,
    /// Requests for a device that belongs to another VM.
    pub nack_other_vm: u64,
    /// Reset requests (i8042) sent to VMs' clients.
    pub vm_resets: u64,
    /// Reset requests for a device no VM has used yet: nobody to tell.
    pub vm_events_unbound: u64,
    pub nack_wrong_server: u64,
    /// Requests naming a VM the control panel does not know (or not on
    /// that client platform).
    pub nack_unknown_vm: u64,
    /// Requests from a client platform the control panel does not know.
    pub nack_unknown_client: u64,
    /// Requests for devices placed on another server, sent there.
    pub forwarded: u64,
    /// Requests that waited for their device's state to arrive.
    pub held: u64,
    /// Requests dropped because too many waited already (the client retransmits).
    pub held_dropped: u64,
    /// Devices taken over from another server with their saved state.
    pub devices_arrived: u64,
    /// Devices that moved away, their state saved for the next server.
    pub devices_left: u64,
    pub hellos: u64,
    /// Frames of another EtherType (ARP and the like on a shared link).
    pub foreign: u64,
    /// Unicast frames addressed to another MAC.
    pub not_for_us: u64,
    /// Valid frames of a kind a server does not accept.
    pub unexpected_kind: u64,
    /// Replies that did not fit the TX burst.
    pub tx_full: u64,
    /// Retransmitted requests answered again from the stream's cache,
    /// without running the device model twice.
    pub duplicates_answered: u64,
    /// Retransmitted requests still being executed (their answer follows).
    pub duplicates_in_flight: u64,
    /// Requests older than their stream's latest: dropped.
    pub stale: u64,
    /// Streams forgotten because their client said Hello again (restarted).
    pub streams_reset: u64,
    /// Interrupt frames sent (first copies).
    pub interrupts: u64,
    pub interrupt_retransmits: u64,
    pub interrupt_acks: u64,
    /// Acks for interrupts not (or no longer) waiting for one.
    pub interrupt_acks_stale: u64,
    /// Interrupts of a device no VM has used yet: nobody to send them to.
    pub interrupts_unbound: u64,
    /// Interrupts never acknowledged within the retry limit: dropped.
    pub interrupts_given_up: u64,
    /// Interrupts lost because the queue from the device models was full.
    pub interrupts_queue_full: u64,
    /// Malformed frames by reason (WireError::name → count, non-zero only).
    pub malformed: Vec<(&'static str, u64)>,
    /// Per device (filled where the devices are: at once in the
    /// run-to-completion layout, after `finish` in the split one).
    pub devices: Vec<DeviceCounters>,
}

impl ServerStats {
    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for ServerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests {} completions {} unclaimed {} nack(unknown device {}, wrong server {}, other VM {}, unknown VM {}, unknown client {}) forwarded {} held {} (dropped {}) devices arrived {} left {} resets {} duplicates {} (in flight {}) stale {} hellos {} interrupts {} (retransmits {}, acks {}, unbound {}, given up {}) foreign {} not-for-us {} unexpected-kind {} tx-full {} malformed {}",
            self.requests,
            self.completions,
            self.unclaimed,
            self.nack_unknown_device,
            self.nack_wrong_server,
            self.nack_other_vm,
            self.nack_unknown_vm,
            self.nack_unknown_client,
            self.forwarded,
            self.held,
            self.held_dropped,
            self.devices_arrived,
            self.devices_left,
            self.vm_resets,
            self.duplicates_answered,
            self.duplicates_in_flight,
            self.stale,
            self.hellos,
            self.interrupts,
            self.interrupt_retransmits,
            self.interrupt_acks,
            self.interrupts_unbound,
            self.interrupts_given_up,
            self.foreign,
            self.not_for_us,
            self.unexpected_kind,
            self.tx_full,
            self.malformed_total()
        )?;
        for (name, n) in &self.malformed {
            write!(f, " {name}={n}")?;
        }
        Ok(())
    }
}

/// The part of a server that faces the wire: validates every frame,
/// answers Hellos, Nacks what it cannot serve, and emits completions. In
/// the run-to-completion layout it shares a core with the devices; in the
/// split layout it is the data-plane core.
#[derive(Debug)]
pub struct Frontend {
    id: u16,
    mac: MacAddr,
    stats: ServerStats,
    malformed: [u64; WireError::ALL.len()],
    streams: DupCache<IoCompletion>,
    /// Resolves requests that name no device (ANY_DEVICE) by address.
    addresses: AddressMap,
    /// Device → the client and VM that used it last: where its interrupts go.
    bindings: HashMap<u32, (MacAddr, Route)>,
    /// One interrupt stream per (client, VM).
    irq_streams: Vec<IrqStream>,
    /// First sequence number of a stream: the start time in nanoseconds, so
    /// a restarted server's interrupts are never older than its last life's.
    irq_seq_base: u64,
    /// Placed by the control panel: the routing table in force, and the
    /// devices served here (those waiting for their state included).
    table: Option<Arc<RoutingTable>>,
    here: HashSet<u32>,
}

/// What a placed server does with a request.
enum Verdict {
    /// Serve it here and answer the client at this MAC.
    Here(MacAddr),
    /// Send it on to server `.1` at MAC `.0`.
    Forward(MacAddr, u16),
    Refuse(NackReason),
}

/// Where `req` goes by table `t`; fills in the device of a request that
/// names none ([`ANY_DEVICE`]).
fn place(t: &RoutingTable, addresses: &AddressMap, here: &HashSet<u32>, req: &mut IoRequest) -> Verdict {
    let Some(client) = t.client_mac(req.route.client) else {
        return Verdict::Refuse(NackReason::NotAuthorised);
    };
    if !t.may_send(req.route.vm, req.route.client) {
        return Verdict::Refuse(NackReason::UnknownVm);
    }
    if !addresses.fill(req) {
        match t.route(req.route.vm, req.space == dmfabric_wire::Space::Mmio, req.addr) {
            Some(hit) => req.route.device = hit.device,
            None => return Verdict::Refuse(NackReason::UnknownDevice),
        }
    }
    if here.contains(&req.route.device) {
        return Verdict::Here(MacAddr(client));
    }
    match t.placement(req.route.device).and_then(|p| Some((t.server_mac(p.server)?, p.server))) {
        Some((mac, server)) if server != req.route.server => Verdict::Forward(MacAddr(mac), server),
        _ => Verdict::Refuse(NackReason::UnknownDevice),
    }
}

/// The interrupts of one (client, VM), delivered in order, stop-and-wait:
/// the next is sent once the one in flight is acknowledged, so a lost frame
/// can never let a later level overtake an earlier one.
#[derive(Debug)]
struct IrqStream {
    key: (u16, u32),
    next_seq: u64,
    in_flight: Option<PendingIrq>,
    queue: std::collections::VecDeque<(Interrupt, MacAddr)>,
}

#[derive(Debug, Clone, Copy)]
struct PendingIrq {
    irq: Interrupt,
    to: MacAddr,
    sent: Instant,
    tries: u32,
}

/// Interrupts one (client, VM) stream may queue behind the one in flight.
pub const IRQ_STREAM_QUEUE: usize = 1024;

/// How long an interrupt waits for its ack before it is sent again.
pub const IRQ_RETRY: Duration = Duration::from_millis(20);
/// Sends of one interrupt before the server gives up on it.
pub const IRQ_TRIES: u32 = 50;

fn stream_of(route: &Route) -> StreamKey {
    StreamKey::new(route.client, route.vm, route.vcpu)
}

impl Frontend {
    pub fn new(id: u16, mac: MacAddr) -> Frontend {
        Frontend {
            id,
            mac,
            stats: ServerStats::default(),
            malformed: [0; WireError::ALL.len()],
            streams: DupCache::default(),
            addresses: AddressMap::default(),
            bindings: HashMap::new(),
            irq_streams: Vec::new(),
            irq_seq_base: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            table: None,
            here: HashSet::new(),
        }
    }

    /// Route by `table` from now on, serving `here` (and resolving
    /// requests that name no device among `specs`).
    pub fn set_table(&mut self, table: Arc<RoutingTable>, here: HashSet<u32>, specs: &[DeviceSpec]) {
        self.follow_migrations(&table);
        self.table = Some(table);
        self.here = here;
        self.set_devices(specs);
    }

    /// VMs that moved to another client platform: their devices'
    /// interrupts go there from now on, those not yet acknowledged included
    /// (the old platform refuses interrupts from the moment it holds a VM
    /// to save it, so an unacknowledged one is not in the saved state).
    fn follow_migrations(&mut self, t: &RoutingTable) {
        let mut moved: Vec<((u16, u32), MacAddr, Route)> = Vec::new();
        for (mac, route) in self.bindings.values_mut() {
            let Some(client) = t.client_of(route.vm).filter(|c| *c != route.client) else { continue };
            let (Some(new_mac), Some(rec)) = (t.client_mac(client), t.db.clients.get(&client)) else { continue };
            let old = (route.client, route.vm);
            *route = Route { client, hypervisor: rec.hypervisor, ..*route };
            *mac = MacAddr(new_mac);
            moved.push((old, *mac, *route));
        }
        for (old, to, route) in moved {
            let Some(i) = self.irq_streams.iter().position(|st| st.key == old) else { continue };
            let old_stream = &mut self.irq_streams[i];
            let in_flight = old_stream.in_flight.take().map(|p| (p.irq, p.to));
            let queued: Vec<(Interrupt, MacAddr)> = in_flight.into_iter().chain(old_stream.queue.drain(..)).collect();
            if queued.is_empty() {
                continue;
            }
            let key = (route.client, route.vm);
            let at = self.irq_stream(key);
            let stream = &mut self.irq_streams[at];
            for (irq, _) in queued {
                let irq = Interrupt {
                    route: Route { client: route.client, hypervisor: route.hypervisor, ..irq.route },
                    seq: stream.next_seq,
                    ..irq
                };
                stream.next_seq += 1;
                stream.queue.push_back((irq, to));
            }
        }
    }

    /// The revision of the table in force (0 when not placed).
    pub fn table_revision(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| t.revision)
    }

    /// The stream entries whose latest answer came from `device`: what a
    /// server taking the device over needs to answer retransmissions of
    /// requests this one ran. (key, latest seq, the completion's frame)
    pub fn streams_of_device(&self, device: u32) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (key, last, answer) in self.streams.entries() {
            if let Some(c) = answer.filter(|c| c.route.device == device) {
                let repr = FrameRepr::new(EthernetRepr { dst: self.mac, src: self.mac }, Message::IoCompletion(*c));
                let mut buf = vec![0u8; repr.buffer_len()];
                if repr.emit(&mut buf).is_ok() {
                    out.push((key.raw(), last, buf));
                }
            }
        }
        out
    }

    /// Take over stream entries from [`Frontend::streams_of_device`] of another server.
    pub fn adopt_streams(&mut self, streams: &[(u64, u64, Vec<u8>)]) {
        for (key, last, frame) in streams {
            if let Ok(FrameRepr { msg: Message::IoCompletion(c), .. }) = FrameRepr::parse_bytes(frame) {
                self.streams.adopt(StreamKey::from_raw(*key), *last, Some(c));
            }
        }
    }

    /// Answer `req` from its stream's cache if the answer is there (a
    /// request held while its device moved in, which the server it came
    /// from had run already); true if it was.
    pub fn answer_if_cached(&mut self, req: &IoRequest, to: MacAddr, tx: &mut FrameBatch) -> bool {
        match self.streams.check(stream_of(&req.route), req.seq) {
            Seen::Duplicate(Some(&answer)) => {
                self.stats.duplicates_answered += 1;
                self.reply(tx, to, Message::IoCompletion(answer));
                true
            }
            _ => false,
        }
    }

    /// Count a request held for its device's state (or dropped when full).
    pub fn count_held(&mut self, held: bool) {
        if held {
            self.stats.held += 1;
        } else {
            self.stats.held_dropped += 1;
        }
    }

    /// Count a device that arrived with its state or left with it.
    pub fn count_move(&mut self, arrived: bool) {
        if arrived {
            self.stats.devices_arrived += 1;
        } else {
            self.stats.devices_left += 1;
        }
    }

    /// Let requests that name no device be resolved by address among `specs`.
    pub fn set_devices(&mut self, specs: &[DeviceSpec]) {
        self.addresses = AddressMap::new(specs);
    }

    /// Remember who uses `req`'s device: its interrupts go there.
    fn bind(&mut self, req: &IoRequest, from: MacAddr) {
        let route = Route { server: self.id, vcpu: 0, ..req.route };
        self.bindings.insert(req.route.device, (from, route));
    }

    /// The index of (client, VM) `key`'s interrupt stream, made if new.
    fn irq_stream(&mut self, key: (u16, u32)) -> usize {
        match self.irq_streams.iter().position(|st| st.key == key) {
            Some(i) => i,
            None => {
                let next_seq = self.irq_seq_base;
                self.irq_streams.push(IrqStream { key, next_seq, in_flight: None, queue: Default::default() });
                self.irq_streams.len() - 1
            }
        }
    }

    /// Send the interrupts the device models queued (each stream's next
    /// one once the previous is acknowledged), and again those whose ack is
    /// overdue.
    pub fn send_interrupts(&mut self, irqs: &IrqQueue, tx: &mut FrameBatch, now: Instant) {
        self.stats.interrupts_queue_full = irqs.dropped();
        while let Some(e) = irqs.pop() {
            let Some(&(to, route)) = self.bindings.get(&e.device) else {
                self.stats.interrupts_unbound += 1;
                continue;
            };
            let key = (route.client, route.vm);
            let at = self.irq_stream(key);
            let stream = &mut self.irq_streams[at];
            if stream.queue.len() >= IRQ_STREAM_QUEUE {
                self.stats.interrupts_queue_full += 1;
                continue;
            }
            let irq = Interrupt { route, seq: stream.next_seq, source: e.source, trigger: e.trigger };
            stream.next_seq += 1;
            stream.queue.push_back((irq, to));
        }
        for i in 0..self.irq_streams.len() {
            if tx.is_full() {
                break;
            }
            let stream = &mut self.irq_streams[i];
            match stream.in_flight {
                None => {
                    let Some((irq, to)) = stream.queue.pop_front() else { continue };
                    stream.in_flight = Some(PendingIrq { irq, to, sent: now, tries: 1 });
                    self.stats.interrupts += 1;
                    self.send_irq(tx, to, irq, false);
                }
                Some(p) if now.saturating_duration_since(p.sent) < IRQ_RETRY => {}
                Some(p) if p.tries >= IRQ_TRIES => {
                    self.stats.interrupts_given_up += 1;
                    stream.in_flight = None;
                }
                Some(p) => {
                    stream.in_flight = Some(PendingIrq { sent: now, tries: p.tries + 1, ..p });
                    self.stats.interrupt_retransmits += 1;
                    self.send_irq(tx, p.to, p.irq, true);
                }
            }
        }
    }

    fn send_irq(&mut self, tx: &mut FrameBatch, to: MacAddr, irq: Interrupt, retransmit: bool) {
        let mut repr = FrameRepr::new(EthernetRepr { dst: to, src: self.mac }, Message::Interrupt(irq));
        repr.retransmit = retransmit;
        if !tx.push_with(|buf| repr.emit(buf).ok()) {
            self.stats.tx_full += 1;
        }
    }

    /// Tell the clients of VMs what their devices asked for (an i8042 reset).
    pub fn send_vm_events(&mut self, events: &VmEvents, tx: &mut FrameBatch) {
        while !tx.is_full() {
            let Some((device, event)) = events.pop() else { break };
            let Some(&(to, route)) = self.bindings.get(&device) else {
                self.stats.vm_events_unbound += 1;
                continue;
            };
            let payload = match event {
                VmEvent::Reset => [dmfabric_wire::LIFECYCLE_RESET],
            };
            self.stats.vm_resets += 1;
            let msg =
                ControlMsg { route: Route { device, ..route }, seq: 0, op: ControlOp::Lifecycle, payload: &payload };
            self.reply(tx, to, Message::Control(msg));
        }
    }

    /// When an interrupt in flight is due for a retransmit.
    pub fn next_retransmit(&self) -> Option<Instant> {
        self.irq_streams.iter().filter_map(|st| st.in_flight.map(|p| p.sent + IRQ_RETRY)).min()
    }

    /// Interrupts not acknowledged yet (in flight or queued).
    pub fn interrupts_pending(&self) -> usize {
        self.irq_streams.iter().map(|st| st.queue.len() + usize::from(st.in_flight.is_some())).sum()
    }

    /// Counters so far (`unclaimed` is the devices' to add).
    pub fn stats(&self) -> ServerStats {
        let mut s = self.stats.clone();
        s.malformed = WireError::ALL
            .iter()
            .filter(|e| self.malformed[e.index()] > 0)
            .map(|e| (e.name(), self.malformed[e.index()]))
            .collect();
        s
    }

    /// Handle everything about a received frame except running a device:
    /// returns the request to execute and whom to answer, if any.
    pub fn classify(&mut self, bytes: &[u8], tx: &mut FrameBatch) -> Option<(IoRequest, MacAddr)> {
        if bytes.len() >= 14 && bytes[12..14] != ETHERTYPE_DMFABRIC.to_be_bytes() {
            self.stats.foreign += 1;
            return None;
        }
        let repr = match FrameRepr::parse_bytes(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.malformed[e.index()] += 1;
                return None;
            }
        };
        let from = repr.eth.src;
        if repr.eth.dst != self.mac && !repr.eth.dst.is_multicast() {
            self.stats.not_for_us += 1;
            return None;
        }
        match repr.msg {
            Message::IoRequest(mut req) => {
                self.stats.requests += 1;
                if req.route.server != self.id {
                    self.nack(tx, from, &req, NackReason::WrongServer);
                    return None;
                }
                let mut to = from;
                let verdict = self.table.as_ref().map(|t| place(t, &self.addresses, &self.here, &mut req));
                match verdict {
                    None if !self.addresses.fill(&mut req) => {
                        self.nack(tx, from, &req, NackReason::UnknownDevice);
                        return None;
                    }
                    None => {}
                    Some(Verdict::Here(client)) => to = client,
                    Some(Verdict::Forward(mac, server)) => {
                        self.stats.forwarded += 1;
                        let req = IoRequest { route: Route { server, ..req.route }, ..req };
                        let mut fwd = FrameRepr::new(EthernetRepr { dst: mac, src: self.mac }, Message::IoRequest(req));
                        fwd.retransmit = repr.retransmit;
                        if !tx.push_with(|buf| fwd.emit(buf).ok()) {
                            self.stats.tx_full += 1;
                        }
                        return None;
                    }
                    Some(Verdict::Refuse(reason)) => {
                        self.nack(tx, from, &req, reason);
                        return None;
                    }
                }
                match self.streams.check(stream_of(&req.route), req.seq) {
                    Seen::New => {
                        self.bind(&req, to);
                        Some((req, to))
                    }
                    Seen::Duplicate(Some(&answer)) => {
                        self.stats.duplicates_answered += 1;
                        self.reply(tx, to, Message::IoCompletion(answer));
                        None
                    }
                    Seen::Duplicate(None) => {
                        self.stats.duplicates_in_flight += 1;
                        None
                    }
                    Seen::Stale => {
                        self.stats.stale += 1;
                        None
                    }
                }
            }
            Message::Control(ControlMsg { op: ControlOp::Hello, route, seq, .. }) => {
                self.stats.hellos += 1;
                // A client says Hello when it starts: its sequence numbers start over.
                self.stats.streams_reset += self.streams.forget_client(route.client) as u64;
                let route = Route { server: self.id, ..route };
                let reply = ControlMsg { route, seq, op: ControlOp::HelloReply, payload: &[] };
                self.reply(tx, from, Message::Control(reply));
                None
            }
            Message::InterruptAck(ack) => {
                let key = (ack.route.client, ack.route.vm);
                let stream = self.irq_streams.iter_mut().find(|st| st.key == key);
                match stream {
                    Some(st) if st.in_flight.is_some_and(|p| p.irq.seq == ack.seq) => {
                        st.in_flight = None;
                        self.stats.interrupt_acks += 1;
                        // The stream's next interrupt goes out in this loop's on_poll.
                    }
                    _ => self.stats.interrupt_acks_stale += 1,
                }
                None
            }
            _ => {
                self.stats.unexpected_kind += 1;
                None
            }
        }
    }

    /// Send a completion to `to`.
    pub fn complete(&mut self, tx: &mut FrameBatch, to: MacAddr, cmp: IoCompletion) {
        self.stats.completions += 1;
        self.streams.answered(stream_of(&cmp.route), cmp.seq, cmp);
        self.reply(tx, to, Message::IoCompletion(cmp));
    }

    /// Refuse `req`.
    pub fn nack(&mut self, tx: &mut FrameBatch, to: MacAddr, req: &IoRequest, reason: NackReason) {
        match reason {
            NackReason::UnknownDevice => self.stats.nack_unknown_device += 1,
            NackReason::WrongServer => self.stats.nack_wrong_server += 1,
            NackReason::NotAuthorised
                if self.table.as_ref().is_some_and(|t| t.client_mac(req.route.client).is_none()) =>
            {
                self.stats.nack_unknown_client += 1
            }
            NackReason::NotAuthorised => self.stats.nack_other_vm += 1,
            NackReason::UnknownVm => self.stats.nack_unknown_vm += 1,
            NackReason::BadVersion => {}
        }
        let msg = Message::Nack(Nack { route: req.route, seq: req.seq, reason, nacked: Kind::IoRequest });
        self.reply(tx, to, msg);
    }

    fn reply(&mut self, tx: &mut FrameBatch, to: MacAddr, msg: Message<'_>) {
        let repr = FrameRepr::new(EthernetRepr { dst: to, src: self.mac }, msg);
        if !tx.push_with(|buf| repr.emit(buf).ok()) {
            self.stats.tx_full += 1;
        }
    }
}

/// A whole server on one core (run-to-completion): a poll-loop [`Handler`].
#[derive(Debug)]
pub struct Server {
    frontend: Frontend,
    devices: Devices,
    env: DeviceEnv,
    placed: Option<Placed>,
}

/// What a server placed by the control panel keeps (see [`crate::placed`]).
#[derive(Debug)]
struct Placed {
    routes: Arc<LiveRoutes>,
    transit: Arc<Transit>,
    /// Specs of the devices served here, arriving ones included.
    specs: HashMap<u32, DeviceSpec>,
    /// Devices waiting for their state: since when, and the requests held meanwhile.
    arriving: HashMap<u32, (Instant, Vec<(IoRequest, MacAddr)>)>,
}

impl Server {
    /// A server with id `id` answering from `mac` for `devices`.
    pub fn new(id: u16, mac: MacAddr, devices: &[DeviceSpec]) -> Server {
        Server::with_env(id, mac, devices, DeviceEnv::new(devices))
    }

    /// The same, wired to `env` (whose consoles the caller serves).
    pub fn with_env(id: u16, mac: MacAddr, devices: &[DeviceSpec], env: DeviceEnv) -> Server {
        let mut frontend = Frontend::new(id, mac);
        frontend.set_devices(devices);
        Server { frontend, devices: Devices::new(devices, &env), env, placed: None }
    }

    /// A server whose devices, forwarding and answers follow the tables of
    /// `routes` (swapped in by a store watch running `transit`'s chores).
    pub fn placed(id: u16, mac: MacAddr, env: DeviceEnv, routes: Arc<LiveRoutes>, transit: Arc<Transit>) -> Server {
        let mut s = Server {
            frontend: Frontend::new(id, mac),
            devices: Devices::new(&[], &env),
            env,
            placed: Some(Placed { routes, transit, specs: HashMap::new(), arriving: HashMap::new() }),
        };
        s.follow_table(Instant::now());
        s
    }

    /// Pick up a new table if the watch swapped one in: add, remove and
    /// hand over devices, and route by it.
    fn follow_table(&mut self, now: Instant) {
        let Some(p) = self.placed.as_mut() else { return };
        if p.routes.revision() == self.frontend.table_revision() && self.frontend.table.is_some() {
            return;
        }
        let table = p.routes.load();
        let old = self.frontend.table.clone();
        let id = self.frontend.id;
        let db = &table.db;
        let mine: HashMap<u32, DeviceSpec> = crate::placed::specs_in(db, id)
            .into_iter()
            .filter_map(|r| r.map_err(|e| eprintln!("server {id}: {e}: not served")).ok())
            .map(|s| (s.id, s))
            .collect();
        // Leaving: removed, or moved away with their state.
        for dev in self.devices.ids() {
            if mine.contains_key(&dev) {
                continue;
            }
            let Some(state) = self.devices.remove(dev, now) else { continue };
            p.specs.remove(&dev);
            match db.devices.get(&dev) {
                Some(d) => {
                    let handoff =
                        Handoff { device: dev, from: id, state, streams: self.frontend.streams_of_device(dev) };
                    let blob = serde_json::to_vec(&handoff).expect("handoffs serialise");
                    eprintln!(
                        "server {id}: device {dev} moves to server {}: {} bytes of state go with it",
                        d.server,
                        blob.len()
                    );
                    p.transit.send(dev, blob);
                    self.frontend.count_move(false);
                }
                None => eprintln!("server {id}: device {dev} removed"),
            }
        }
        for dev in p.arriving.keys().copied().collect::<Vec<_>>() {
            if !mine.contains_key(&dev) {
                // Moved on again before its state came: its held requests are retransmitted by their clients.
                p.arriving.remove(&dev);
                p.specs.remove(&dev);
                p.transit.unwant(dev);
            }
        }
        // Arriving: new ones start fresh, moved ones wait for their state.
        for (dev, spec) in &mine {
            if self.devices.contains(*dev) || p.arriving.contains_key(dev) {
                continue;
            }
            let from = old.as_ref().and_then(|t| t.placement(*dev)).map(|pl| pl.server).filter(|s| *s != id);
            match from {
                Some(from) => {
                    eprintln!("server {id}: device {dev} moves here from server {from}: waiting for its state");
                    p.arriving.insert(*dev, (now, Vec::new()));
                    p.transit.want(*dev);
                }
                None => {
                    eprintln!("server {id}: device {dev} ({}) of VM {:?} added", spec.kind.name(), spec.vm);
                    self.devices.insert(spec, self.env.build(spec, now), now);
                }
            }
            p.specs.insert(*dev, spec.clone());
        }
        let specs: Vec<DeviceSpec> = p.specs.values().cloned().collect();
        let here = p.specs.keys().copied().collect();
        self.frontend.set_table(table, here, &specs);
    }

    /// Build the devices whose state arrived (or that waited too long for
    /// it) and run the requests they held.
    fn take_arrivals(&mut self, tx: &mut FrameBatch, now: Instant) {
        let Some(p) = self.placed.as_mut() else { return };
        let id = self.frontend.id;
        let mut ready = Vec::new();
        for (dev, blob) in p.transit.take_arrived() {
            let Some((_, held)) = p.arriving.remove(&dev) else { continue };
            let Some(spec) = p.specs.get(&dev).cloned() else { continue };
            let model = serde_json::from_slice::<Handoff>(&blob).map_err(|e| e.to_string()).and_then(|h| {
                self.frontend.adopt_streams(&h.streams);
                self.env.restore(&spec, h.state, now).map(|m| (m, h.from)).map_err(|e| e.to_string())
            });
            match model {
                Ok((model, from)) => {
                    eprintln!(
                        "server {id}: device {dev} arrived from server {from} with its state; {} requests waited",
                        held.len()
                    );
                    self.devices.insert(&spec, model, now);
                    self.frontend.count_move(true);
                }
                Err(e) => {
                    eprintln!("server {id}: device {dev}'s saved state is unusable ({e}): starting it fresh");
                    self.devices.insert(&spec, self.env.build(&spec, now), now);
                }
            }
            ready.push(held);
        }
        let late: Vec<u32> = p
            .arriving
            .iter()
            .filter(|(_, (since, _))| now.duration_since(*since) > STATE_WAIT)
            .map(|(d, _)| *d)
            .collect();
        for dev in late {
            let Some((_, held)) = p.arriving.remove(&dev) else { continue };
            p.transit.unwant(dev);
            let Some(spec) = p.specs.get(&dev).cloned() else { continue };
            eprintln!("server {id}: no saved state for device {dev} within {STATE_WAIT:?}: starting it fresh");
            self.devices.insert(&spec, self.env.build(&spec, now), now);
            ready.push(held);
        }
        for (req, to) in ready.into_iter().flatten() {
            if !self.frontend.answer_if_cached(&req, to, tx) {
                self.run(&req, to, tx, now);
            }
        }
    }

    fn run(&mut self, req: &IoRequest, to: MacAddr, tx: &mut FrameBatch, now: Instant) {
        match self.devices.execute(req, now) {
            Ok(cmp) => self.frontend.complete(tx, to, cmp),
            Err(Refused::UnknownDevice) => self.frontend.nack(tx, to, req, NackReason::UnknownDevice),
            Err(Refused::OtherVm) => self.frontend.nack(tx, to, req, NackReason::NotAuthorised),
        }
    }

    pub fn id(&self) -> u16 {
        self.frontend.id
    }

    pub fn env(&self) -> &DeviceEnv {
        &self.env
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats { unclaimed: self.devices.unclaimed(), devices: self.devices.counters(), ..self.frontend.stats() }
    }
}

impl Handler for Server {
    fn on_frame(&mut self, bytes: &[u8], tx: &mut FrameBatch, now: Instant) {
        if let Some((req, to)) = self.frontend.classify(bytes, tx) {
            if let Some((_, held)) = self.placed.as_mut().and_then(|p| p.arriving.get_mut(&req.route.device)) {
                let room = held.len() < HELD_MAX;
                if room {
                    held.push((req, to));
                }
                self.frontend.count_held(room);
                return;
            }
            self.run(&req, to, tx, now);
        }
    }

    fn on_poll(&mut self, tx: &mut FrameBatch, now: Instant) {
        if self.placed.is_some() {
            self.follow_table(now);
            self.take_arrivals(tx, now);
        }
        self.devices.tick(now);
        self.frontend.send_vm_events(&self.env.events, tx);
        self.frontend.send_interrupts(&self.env.irqs, tx, now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        // A placed server looks at its table and arrivals every few ms even when idle.
        let watch = self.placed.as_ref().map(|_| Instant::now() + Duration::from_millis(5));
        [self.devices.next_due(), self.frontend.next_retransmit(), watch].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_devices::platform::pc;
    use dmfabric_wire::{AccessSize, Direction, IrqSource, Space, Status};

    const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);

    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);

    /// A request with the next sequence number of the test stream.
    fn request(device: u32, server: u16, dir: Direction, addr: u64, data: u64) -> Vec<u8> {
        request_seq(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed), device, server, dir, addr, data)
    }

    fn request_seq(seq: u64, device: u32, server: u16, dir: Direction, addr: u64, data: u64) -> Vec<u8> {
        let req = IoRequest {
            route: Route { server, client: 3, vm: 7, vcpu: 0, device, hypervisor: 1 },
            seq,
            space: Space::Pio,
            dir,
            size: AccessSize::B2,
            addr,
            data,
        };
        let repr = FrameRepr::new(EthernetRepr { dst: SERVER, src: CLIENT }, Message::IoRequest(req));
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    fn answer(server: &mut Server, frame: &[u8]) -> Vec<Vec<u8>> {
        let mut tx = FrameBatch::new();
        server.on_frame(frame, &mut tx, Instant::now());
        tx.iter().map(<[u8]>::to_vec).collect()
    }

    fn only_msg(frames: &[Vec<u8>]) -> Message<'_> {
        assert_eq!(frames.len(), 1);
        let repr = FrameRepr::parse_bytes(&frames[0]).unwrap();
        assert_eq!(repr.eth, EthernetRepr { dst: CLIENT, src: SERVER });
        repr.msg
    }

    #[test]
    fn write_then_read_back() {
        let mut s = Server::new(1, SERVER, &[pc::test_device(1)]);
        let out = answer(&mut s, &request(1, 1, Direction::Write, 0x502, 0xbeef));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!((c.status, c.dir), (Status::Ok, Direction::Write));
        let out = answer(&mut s, &request(1, 1, Direction::Read, 0x502, 0));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!((c.data, c.route.vm, c.route.client), (0xbeef, 7, 3));
        assert_eq!(s.stats().completions, 2);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let mut s = Server::new(1, SERVER, &[pc::test_device(1)]);
        let out = answer(&mut s, &request(1, 1, Direction::Read, 0x600, 0));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!((c.data, c.status), (0xffff, Status::Unclaimed));
        assert_eq!(s.stats().unclaimed, 1);
    }

    #[test]
    fn unknown_device_and_wrong_server_are_nacked() {
        let mut s = Server::new(1, SERVER, &[pc::test_device(1)]);
        let out = answer(&mut s, &request(99, 1, Direction::Read, 0x500, 0));
        assert!(matches!(only_msg(&out), Message::Nack(Nack { reason: NackReason::UnknownDevice, .. })));
        let out = answer(&mut s, &request(1, 2, Direction::Read, 0x500, 0));
        assert!(matches!(only_msg(&out), Message::Nack(Nack { reason: NackReason::WrongServer, .. })));
        let st = s.stats();
        assert_eq!((st.nack_unknown_device, st.nack_wrong_server, st.completions), (1, 1, 0));
    }

    #[test]
    fn bad_frames_are_counted_by_reason_and_not_answered() {
        let mut s = Server::new(1, SERVER, &[pc::test_device(1)]);
        let good = request(1, 1, Direction::Read, 0x500, 0);
        let mut bad_magic = good.clone();
        bad_magic[14] = 0;
        let mut bad_version = good.clone();
        bad_version[16] = 2;
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut other_mac = good.clone();
        other_mac[5] = 0x99;
        for f in [&good[..20], &bad_magic[..], &bad_version[..], &arp[..], &other_mac[..], &[][..]] {
            assert!(answer(&mut s, f).is_empty());
        }
        let st = s.stats();
        assert_eq!(st.malformed, vec![("truncated", 2), ("bad_magic", 1), ("bad_version", 1)]);
        assert_eq!((st.foreign, st.not_for_us, st.requests), (1, 1, 0));
        // And the server still answers.
        assert_eq!(answer(&mut s, &good).len(), 1);
    }

    #[test]
    fn a_retransmitted_write_is_answered_from_the_cache_not_run_twice() {
        let mut s = Server::new(1, SERVER, &[pc::test_device(1)]);
        let first = request_seq(10, 1, 1, Direction::Write, 0x500, 0xaa);
        let first_answer = answer(&mut s, &first);
        // The same frame again (the client did not see the answer): same answer.
        assert_eq!(answer(&mut s, &first), first_answer);
        // The next write, then the first one arriving late: stale, dropped.
        answer(&mut s, &request_seq(11, 1, 1, Direction::Write, 0x500, 0xbb));
        assert!(answer(&mut s, &first).is_empty());
        let out = answer(&mut s, &request_seq(12, 1, 1, Direction::Read, 0x500, 0));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!(c.data, 0xbb, "the old write was not applied again");
        let st = s.stats();
        assert_eq!((st.requests, st.completions, st.duplicates_answered, st.stale), (5, 3, 1, 1));
    }

    #[test]
    fn hello_resets_the_clients_streams() {
        let mut s = Server::new(1, SERVER, &[pc::test_device(1)]);
        answer(&mut s, &request_seq(1000, 1, 1, Direction::Write, 0x500, 1));
        assert!(answer(&mut s, &request_seq(5, 1, 1, Direction::Write, 0x500, 2)).is_empty(), "stale");
        let hello = FrameRepr::new(
            EthernetRepr { dst: MacAddr::BROADCAST, src: CLIENT },
            Message::Control(ControlMsg {
                route: Route { client: 3, ..Route::default() },
                seq: 1,
                op: ControlOp::Hello,
                payload: &[],
            }),
        );
        let mut buf = vec![0u8; hello.buffer_len()];
        hello.emit(&mut buf).unwrap();
        answer(&mut s, &buf);
        assert_eq!(answer(&mut s, &request_seq(5, 1, 1, Direction::Write, 0x500, 2)).len(), 1, "new again");
        assert_eq!(s.stats().streams_reset, 1);
    }

    #[test]
    fn hello_is_answered_from_our_mac() {
        let mut s = Server::new(5, SERVER, &[]);
        let hello = FrameRepr::new(
            EthernetRepr { dst: MacAddr::BROADCAST, src: CLIENT },
            Message::Control(ControlMsg { route: Route::default(), seq: 9, op: ControlOp::Hello, payload: &[] }),
        );
        let mut buf = vec![0u8; hello.buffer_len()];
        hello.emit(&mut buf).unwrap();
        let out = answer(&mut s, &buf);
        let Message::Control(c) = only_msg(&out) else { panic!("not control") };
        assert_eq!((c.op, c.route.server, c.seq), (ControlOp::HelloReply, 5, 9));
    }

    fn irq_command(seq: u64, command: u64) -> Vec<u8> {
        let req = IoRequest {
            route: Route { server: 1, client: 3, vm: 7, vcpu: 0, device: 101, hypervisor: 1 },
            seq,
            space: Space::Pio,
            dir: Direction::Write,
            size: AccessSize::B4,
            addr: u64::from(pc::IRQ_TEST.base),
            data: command,
        };
        let repr = FrameRepr::new(EthernetRepr { dst: SERVER, src: CLIENT }, Message::IoRequest(req));
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    fn ack(seq: u64) -> Vec<u8> {
        let ack = dmfabric_wire::InterruptAck {
            route: Route { server: 1, client: 3, vm: 7, vcpu: 0, device: 101, hypervisor: 1 },
            seq,
        };
        let repr = FrameRepr::new(EthernetRepr { dst: SERVER, src: CLIENT }, Message::InterruptAck(ack));
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    /// The interrupts `on_poll` sends at `now`: (seq, trigger, retransmit).
    fn poll_irqs(s: &mut Server, now: Instant) -> Vec<(u64, dmfabric_wire::Trigger, bool)> {
        let mut tx = FrameBatch::new();
        s.on_poll(&mut tx, now);
        tx.iter()
            .map(|f| {
                let repr = FrameRepr::parse_bytes(f).unwrap();
                assert_eq!(repr.eth.dst, CLIENT, "to the client that used the device");
                let Message::Interrupt(i) = repr.msg else { panic!("not an interrupt") };
                assert_eq!((i.route.client, i.route.vm, i.source), (3, 7, IrqSource::Line(pc::IRQ_TEST_IRQ)));
                (i.seq, i.trigger, repr.retransmit)
            })
            .collect()
    }

    #[test]
    fn interrupts_go_one_at_a_time_until_acked_and_are_retransmitted() {
        use dmfabric_wire::Trigger;
        let mut s = Server::new(1, SERVER, &[pc::irq_test_device(0)]);
        let t0 = Instant::now();
        // Nobody has used the device yet: nothing to send.
        assert!(poll_irqs(&mut s, t0).is_empty());
        // Assert the level, then lower it: two interrupts, in order.
        assert_eq!(answer(&mut s, &irq_command(0, 2)).len(), 1, "the write is completed");
        assert_eq!(answer(&mut s, &irq_command(1, 3)).len(), 1);
        let first = poll_irqs(&mut s, t0);
        assert_eq!(first.len(), 1, "the second waits for the first's ack");
        let (seq, trigger, re) = first[0];
        assert_eq!((trigger, re), (Trigger::Level { asserted: true }, false));
        assert!(poll_irqs(&mut s, t0 + IRQ_RETRY / 2).is_empty());
        assert_eq!(poll_irqs(&mut s, t0 + IRQ_RETRY), vec![(seq, trigger, true)], "retransmitted");
        assert!(answer(&mut s, &ack(seq + 7)).is_empty());
        assert!(answer(&mut s, &ack(seq)).is_empty());
        let t1 = t0 + IRQ_RETRY;
        assert_eq!(poll_irqs(&mut s, t1), vec![(seq + 1, Trigger::Level { asserted: false }, false)]);
        assert!(answer(&mut s, &ack(seq + 1)).is_empty());
        assert!(poll_irqs(&mut s, t1 + IRQ_RETRY * 2).is_empty(), "all acknowledged");
        let st = s.stats();
        assert_eq!(
            (st.interrupts, st.interrupt_retransmits, st.interrupt_acks, st.interrupt_acks_stale),
            (2, 1, 2, 1),
            "{st}"
        );
    }

    #[test]
    fn an_interrupt_nobody_acks_is_given_up_after_the_retry_limit() {
        let mut s = Server::new(1, SERVER, &[pc::irq_test_device(0)]);
        answer(&mut s, &irq_command(0, 1));
        let mut now = Instant::now();
        let mut sent = 0;
        for _ in 0..IRQ_TRIES + 5 {
            sent += poll_irqs(&mut s, now).len();
            now += IRQ_RETRY;
        }
        assert_eq!(sent, IRQ_TRIES as usize);
        assert_eq!(s.stats().interrupts_given_up, 1);
        assert_eq!(s.frontend.interrupts_pending(), 0);
    }
}
