//! A server: the data-plane core's side of device emulation. For each
//! received frame it asks [`rx::classify`] what to do, then does it: the
//! duplicate cache, running the request on its device (through a
//! [`Backend`], inline or on worker shards), completions and Nacks,
//! forwarding, Hellos and interrupt acks. Between bursts it sends what the
//! device models raised ([`crate::interrupts`], VM resets) and, when placed
//! by the control panel, swaps in the plans its planner prepared
//! ([`crate::placement`]): no database work, JSON or logging on this core.
//!
//! Every frame that is not answered is counted by reason; nothing received
//! from the wire can make this code panic.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_control::routing::RoutingTable;
use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::reliable::{DupCache, Seen, StreamKey};
use dmfabric_dataplane::FrameBatch;
use dmfabric_devices::DeviceSpec;
use dmfabric_wire::{
    ControlMsg, ControlOp, EthernetRepr, FrameRepr, IoCompletion, IoRequest, Kind, MacAddr, Message, Nack, Route,
    WireError, LIFECYCLE_RESET,
};

use crate::backend::{Backend, Done, Inline, Job, ShardStats};
use crate::env::{DeviceEnv, VmEvent};
use crate::interrupts::IrqStreams;
use crate::placement::{Arrival, Departure, PlacementLink, Plan, StreamAnswer, HELD_MAX};
use crate::rx::AddressMap;
use crate::rx::{self, Dropped, Refusal, Rx, View};
pub use crate::stats::ServerStats;
use crate::table::Devices;

fn stream_of(route: &Route) -> StreamKey {
    StreamKey::new(route.client, route.vm, route.vcpu)
}

/// What a server placed by the control panel keeps on its core.
#[derive(Debug)]
struct Placed {
    link: Arc<PlacementLink>,
    table: Arc<RoutingTable>,
    /// The devices served here (arriving ones included).
    here: HashSet<u32>,
    /// Devices waiting for their state, with the requests held meanwhile.
    arriving: HashMap<u32, Vec<(IoRequest, MacAddr)>>,
    /// Devices being taken out, and where their state goes.
    leaving: HashMap<u32, Option<u16>>,
}

/// A server: a poll-loop [`Handler`] over a [`Backend`].
#[derive(Debug)]
pub struct Server<B> {
    id: u16,
    mac: MacAddr,
    stats: ServerStats,
    malformed: [u64; WireError::ALL.len()],
    streams: DupCache<IoCompletion>,
    irqs: IrqStreams,
    env: DeviceEnv,
    backend: B,
    /// Resolves requests that name no device (ANY_DEVICE) by address.
    addresses: AddressMap,
    placed: Option<Placed>,
}

impl Server<Inline> {
    /// A run-to-completion server with id `id` answering from `mac` for `devices`.
    pub fn new(id: u16, mac: MacAddr, devices: &[DeviceSpec]) -> Server<Inline> {
        Server::with_env(id, mac, devices, DeviceEnv::new())
    }

    /// The same, wired to `env` (whose consoles the caller serves).
    pub fn with_env(id: u16, mac: MacAddr, devices: &[DeviceSpec], env: DeviceEnv) -> Server<Inline> {
        let backend = Inline::new(Devices::new(devices, &env));
        Server::unplaced(id, mac, env, backend, devices)
    }
}

impl<B: Backend> Server<B> {
    /// A server for the `devices` its `backend` runs, for any client.
    pub fn unplaced(id: u16, mac: MacAddr, env: DeviceEnv, backend: B, devices: &[DeviceSpec]) -> Server<B> {
        tracing::debug!(server = id, %mac, devices = devices.len(), "serving the devices of its config");
        let mut s = Server::bare(id, mac, env, backend);
        s.addresses = AddressMap::new(devices);
        s
    }

    /// A server whose devices, forwarding and answers follow the plans its
    /// planner ([`crate::placement::Planner`]) sends through `link`; the
    /// plan already waiting there is in force at once.
    pub fn placed(id: u16, mac: MacAddr, env: DeviceEnv, backend: B, link: Arc<PlacementLink>) -> Server<B> {
        tracing::debug!(server = id, %mac, "serving what the control panel places here");
        let mut s = Server::bare(id, mac, env, backend);
        s.placed = Some(Placed {
            link,
            table: Arc::new(RoutingTable::default()),
            here: HashSet::new(),
            arriving: HashMap::new(),
            leaving: HashMap::new(),
        });
        s.follow_placement(&mut FrameBatch::new(), Instant::now());
        s
    }

    fn bare(id: u16, mac: MacAddr, env: DeviceEnv, backend: B) -> Server<B> {
        Server {
            id,
            mac,
            stats: ServerStats::default(),
            malformed: [0; WireError::ALL.len()],
            streams: DupCache::default(),
            irqs: IrqStreams::new(id, mac),
            env,
            backend,
            addresses: AddressMap::default(),
            placed: None,
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn env(&self) -> &DeviceEnv {
        &self.env
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The revision of the routing table in force (0 when not placed).
    pub fn table_revision(&self) -> u64 {
        self.placed.as_ref().map_or(0, |p| p.table.revision)
    }

    /// Interrupts not acknowledged yet (in flight or queued).
    pub fn interrupts_pending(&self) -> usize {
        self.irqs.pending()
    }

    /// Counters so far (a sharded backend's per-device ones after [`Server::finish`]).
    pub fn stats(&self) -> ServerStats {
        self.stats_with(self.backend.stats())
    }

    /// The split layout's counters, if that is the backend.
    pub fn shard_stats(&self) -> Option<ShardStats> {
        self.backend.stats().shards
    }

    /// Stop the backend's workers; every counter.
    pub fn finish(&mut self) -> (ServerStats, Option<ShardStats>) {
        let b = self.backend.finish();
        let shards = b.shards.clone();
        (self.stats_with(b), shards)
    }

    fn stats_with(&self, b: crate::backend::BackendStats) -> ServerStats {
        let i = self.irqs.stats();
        let mut s = self.stats.clone();
        s.malformed = WireError::ALL
            .iter()
            .filter(|e| self.malformed[e.index()] > 0)
            .map(|e| (e.name(), self.malformed[e.index()]))
            .collect();
        s.interrupts = i.sent;
        s.interrupt_retransmits = i.retransmits;
        s.interrupt_acks = i.acks;
        s.interrupt_acks_stale = i.acks_stale;
        s.interrupts_unbound = i.unbound;
        s.interrupts_given_up = i.given_up;
        s.interrupts_queue_full = i.queue_full;
        s.interrupts_coalesced = i.coalesced;
        s.vm_events_dropped = self.env.events.dropped();
        s.tx_full += i.tx_full;
        s.unclaimed = b.unclaimed;
        s.devices = b.devices;
        s
    }

    fn view(&self) -> View<'_> {
        View {
            server: self.id,
            mac: self.mac,
            addresses: &self.addresses,
            placed: self.placed.as_ref().map(|p| rx::Placed { table: &p.table, here: &p.here }),
        }
    }

    /// A request that passed the duplicate check: run it on its device, or
    /// hold it while the device's state is on its way here.
    fn run(&mut self, req: IoRequest, reply_to: MacAddr, tx: &mut FrameBatch, now: Instant) {
        if let Some(held) = self.placed.as_mut().and_then(|p| p.arriving.get_mut(&req.route.device)) {
            if held.len() < HELD_MAX {
                held.push((req, reply_to));
                self.stats.held += 1;
            } else {
                self.stats.held_dropped += 1;
            }
            return;
        }
        if let Some(done) = self.backend.submit(Job { req, reply_to, queued: now }, now) {
            self.done(done, tx);
        }
    }

    /// Something came back from the models.
    fn done(&mut self, done: Done, tx: &mut FrameBatch) {
        match done {
            Done::Ran { result: Ok(cmp), to } => {
                self.stats.completions += 1;
                self.streams.answered(stream_of(&cmp.route), cmp.seq, cmp);
                self.reply(tx, to, Message::IoCompletion(cmp));
            }
            Done::Ran { result: Err((req, why)), to } => self.nack(tx, to, &req, why),
            Done::Removed { id, state } => {
                let Some(p) = self.placed.as_mut() else { return };
                let to = p.leaving.remove(&id).flatten();
                let answers = answers_of(&self.streams, id);
                p.link.depart(Departure { id, to, state, answers });
                self.stats.devices_left += u64::from(to.is_some());
            }
        }
    }

    fn nack(&mut self, tx: &mut FrameBatch, to: MacAddr, req: &IoRequest, why: Refusal) {
        match why {
            Refusal::UnknownDevice => self.stats.nack_unknown_device += 1,
            Refusal::WrongServer => self.stats.nack_wrong_server += 1,
            Refusal::OtherVm => self.stats.nack_other_vm += 1,
            Refusal::UnknownVm => self.stats.nack_unknown_vm += 1,
            Refusal::UnknownClient => self.stats.nack_unknown_client += 1,
        }
        let msg =
            Message::Nack(Nack { route: req.route, seq: req.seq, reason: why.nack_reason(), nacked: Kind::IoRequest });
        self.reply(tx, to, msg);
    }

    fn reply(&mut self, tx: &mut FrameBatch, to: MacAddr, msg: Message<'_>) {
        let repr = FrameRepr::new(EthernetRepr { dst: to, src: self.mac }, msg);
        if !tx.push_with(|buf| repr.emit(buf).ok()) {
            self.stats.tx_full += 1;
        }
    }

    /// Swap in the plans and arrivals the planner prepared.
    fn follow_placement(&mut self, tx: &mut FrameBatch, now: Instant) {
        let Some((plans, arrivals)) = self.placed.as_ref().and_then(|p| p.link.take()) else { return };
        for plan in plans {
            self.apply(plan, tx, now);
        }
        for a in arrivals {
            self.arrive(a, tx, now);
        }
    }

    fn apply(&mut self, plan: Plan, tx: &mut FrameBatch, now: Instant) {
        // (No logging here: the planner said what the plan does, off this core.)
        for (id, to) in plan.leaving {
            let Some(p) = self.placed.as_mut() else { return };
            if p.arriving.remove(&id).is_some() {
                // Moved on again before its state came: nothing to hand
                // over, and its held requests are retransmitted by their clients.
                continue;
            }
            p.leaving.insert(id, to);
            if let Some(done) = self.backend.remove(id, now) {
                self.done(done, tx);
            }
        }
        let Some(p) = self.placed.as_mut() else { return };
        for (spec, model) in plan.add {
            self.backend.install(&spec, model, now);
        }
        for id in plan.arriving {
            p.arriving.entry(id).or_default();
        }
        self.irqs.follow(&plan.moves);
        p.table = plan.table;
        p.here = plan.here;
        self.addresses = plan.addresses;
    }

    /// A moved device's model is ready: install it, take over its last
    /// server's answers, run what waited for it.
    fn arrive(&mut self, a: Arrival, tx: &mut FrameBatch, now: Instant) {
        let Some(p) = self.placed.as_mut() else { return };
        let Some(held) = p.arriving.remove(&a.id) else {
            // It moved on while its state was on its way: pass it on.
            let to = p.table.placement(a.id).map(|pl| pl.server).filter(|s| *s != self.id);
            p.link.depart(Departure { id: a.id, to, state: a.model.save(), answers: a.answers });
            return;
        };
        for (key, last, answer) in a.answers {
            self.streams.adopt(key, last, Some(answer));
        }
        self.backend.install(&a.spec, a.model, now);
        self.stats.devices_arrived += u64::from(a.restored);
        for (req, to) in held {
            match self.streams.check(stream_of(&req.route), req.seq) {
                // Run by the server it came from: answered from its cache.
                Seen::Duplicate(Some(&answer)) => {
                    self.stats.duplicates_answered += 1;
                    self.reply(tx, to, Message::IoCompletion(answer));
                }
                _ => self.run(req, to, tx, now),
            }
        }
    }

    /// Tell the clients of VMs what their devices asked for (an i8042 reset).
    fn send_vm_events(&mut self, tx: &mut FrameBatch) {
        while !tx.is_full() {
            let Some((device, event)) = self.env.events.pop() else { break };
            let Some(b) = self.irqs.binding(device) else {
                self.stats.vm_events_unbound += 1;
                continue;
            };
            let payload = match event {
                VmEvent::Reset => [LIFECYCLE_RESET],
            };
            self.stats.vm_resets += 1;
            let msg =
                ControlMsg { route: Route { device, ..b.route }, seq: 0, op: ControlOp::Lifecycle, payload: &payload };
            self.reply(tx, b.to, Message::Control(msg));
        }
    }
}

/// The stream entries whose latest answer came from `device`: what the
/// server taking the device over needs to answer retransmissions of
/// requests this one ran.
fn answers_of(streams: &DupCache<IoCompletion>, device: u32) -> Vec<StreamAnswer> {
    streams
        .entries()
        .filter_map(|(key, last, answer)| answer.filter(|c| c.route.device == device).map(|c| (key, last, *c)))
        .collect()
}

impl<B: Backend> Handler for Server<B> {
    fn on_frame(&mut self, bytes: &[u8], tx: &mut FrameBatch, now: Instant) {
        match rx::classify(bytes, &self.view()) {
            Rx::Run { req, reply_to } => {
                self.stats.requests += 1;
                match self.streams.check(stream_of(&req.route), req.seq) {
                    Seen::New => {
                        self.irqs.bind(&req, reply_to);
                        self.run(req, reply_to, tx, now);
                    }
                    Seen::Duplicate(Some(&answer)) => {
                        self.stats.duplicates_answered += 1;
                        self.reply(tx, reply_to, Message::IoCompletion(answer));
                    }
                    Seen::Duplicate(None) => self.stats.duplicates_in_flight += 1,
                    Seen::Stale => self.stats.stale += 1,
                }
            }
            Rx::Forward { req, to, retransmit } => {
                self.stats.requests += 1;
                self.stats.forwarded += 1;
                let mut fwd = FrameRepr::new(EthernetRepr { dst: to, src: self.mac }, Message::IoRequest(req));
                fwd.retransmit = retransmit;
                if !tx.push_with(|buf| fwd.emit(buf).ok()) {
                    self.stats.tx_full += 1;
                }
            }
            Rx::Refuse { req, to, why } => {
                self.stats.requests += 1;
                self.nack(tx, to, &req, why);
            }
            Rx::Hello { from, route, seq } => {
                self.stats.hellos += 1;
                // A client says Hello when it starts: its sequence numbers start over.
                self.stats.streams_reset += self.streams.forget_client(route.client) as u64;
                let route = Route { server: self.id, ..route };
                let reply = ControlMsg { route, seq, op: ControlOp::HelloReply, payload: &[] };
                self.reply(tx, from, Message::Control(reply));
            }
            Rx::Ack(ack) => self.irqs.ack(&ack),
            Rx::Drop(Dropped::Foreign) => self.stats.foreign += 1,
            Rx::Drop(Dropped::Malformed(e)) => self.malformed[e.index()] += 1,
            Rx::Drop(Dropped::NotForUs) => self.stats.not_for_us += 1,
            Rx::Drop(Dropped::UnexpectedKind) => self.stats.unexpected_kind += 1,
        }
    }

    fn on_poll(&mut self, tx: &mut FrameBatch, now: Instant) {
        self.follow_placement(tx, now);
        self.backend.tick(now);
        while !tx.is_full() {
            let Some(done) = self.backend.poll_done() else { break };
            self.done(done, tx);
        }
        self.send_vm_events(tx);
        self.irqs.take(&self.env.irqs);
        self.irqs.send(tx, now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        // A placed server looks for plans and arrivals every few ms even when idle.
        let watch = self.placed.as_ref().map(|_| Instant::now() + Duration::from_millis(5));
        [self.backend.next_due(), self.irqs.next_retransmit(), watch].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupts::{IRQ_RETRY, IRQ_TRIES};
    use dmfabric_devices::platform::pc;
    use dmfabric_wire::NackReason;
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

    fn answer(server: &mut Server<Inline>, frame: &[u8]) -> Vec<Vec<u8>> {
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
        bad_version[16] = 1;
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
    fn poll_irqs(s: &mut Server<Inline>, now: Instant) -> Vec<(u64, dmfabric_wire::Trigger, bool)> {
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
        assert_eq!(s.interrupts_pending(), 0);
    }
}
