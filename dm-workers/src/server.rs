//! A server: the data-plane core's side of device emulation. For each
//! received frame it asks [`rx::classify`] what to do — which checks the
//! frame's tag and the client's identity before anything else — then does
//! it: the client's sessions and streams ([`Peers`]), running the request
//! on its device (through a [`Backend`], inline or on worker shards),
//! completions and Nacks, forwarding, Hellos and interrupt acks. Between
//! bursts it sends what the device models raised ([`crate::interrupts`]:
//! interrupts, VM resets) and, when placed by the control panel, swaps in
//! the plans its planner prepared ([`crate::placement`]): no database
//! work, JSON or logging on this core.
//!
//! Every frame it sends is sealed with the key of the client platform it
//! is for and goes to that client's registered MAC. Every frame that is
//! not answered is counted by reason; nothing received from the wire can
//! make this code panic.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_control::routing::RoutingTable;
use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::FrameBatch;
use dmfabric_devices::DeviceSpec;
use dmfabric_wire::auth::AuthError;
use dmfabric_wire::session::HelloReplyBody;
use dmfabric_wire::{
    ControlMsg, ControlOp, EthernetRepr, FrameRepr, Interrupt, InterruptAck, IoCompletion, IoRequest, IrqSource, Kind,
    MacAddr, Message, Nack, Route, Trigger, WireError,
};

use crate::backend::{Backend, Done, Inline, Job, ShardStats};
use crate::dma::DmaEngine;
use crate::env::{DeviceEnv, VmEvent};
use crate::interrupts::{IrqStreams, Sealing};
use crate::peers::{Peers, Registry, SessionChange, StreamKey, Verdict};
use crate::placement::{Arrival, Departure, PlacementLink, Plan, HELD_MAX};
use crate::rx::AddressMap;
use crate::rx::{self, Dropped, Refusal, Rx, View};
pub use crate::stats::ServerStats;
use crate::table::Devices;

/// The stream a request belongs to: its vCPU and the device it names.
fn stream_of(req: &IoRequest, named: u32) -> StreamKey {
    StreamKey { vm: req.route.vm, vcpu: req.route.vcpu, device: named }
}

/// How often idle clients are looked for.
const FORGET_EVERY: Duration = Duration::from_secs(1);

/// A request waiting for its device's state, with what answering it needs.
#[derive(Debug, Clone, Copy)]
struct Held {
    req: IoRequest,
    reply_to: MacAddr,
    named: u32,
    epoch: u32,
}

/// What a server placed by the control panel keeps on its core.
#[derive(Debug)]
struct Placed {
    link: Arc<PlacementLink>,
    table: Arc<RoutingTable>,
    /// The devices served here (arriving ones included).
    here: HashSet<u32>,
    /// Devices waiting for their state, with the requests held meanwhile.
    arriving: HashMap<u32, Vec<Held>>,
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
    unauthenticated: [u64; AuthError::ALL.len()],
    /// The client platforms it acts for.
    registry: Arc<Registry>,
    peers: Peers,
    /// Check and seal tags (off only to measure what that costs).
    authenticate: bool,
    irqs: IrqStreams,
    /// The models' DMA in flight to their clients.
    dma: DmaEngine,
    env: DeviceEnv,
    backend: B,
    /// Resolves requests that name no device (ANY_DEVICE) by address, and
    /// knows each device's VM.
    addresses: AddressMap,
    placed: Option<Placed>,
    /// Told every registered client its epoch (once, at the first poll).
    announced: bool,
    next_forget: Instant,
    /// Completions held until the line changes of their VM reached its
    /// interrupt controller on another server (at most one per vCPU
    /// stream): each with where it goes and the device its stream named.
    fenced: Vec<(IoCompletion, MacAddr, u32)>,
    /// The last line change taken from each (server, client, VM) stream
    /// for an interrupt controller here: the same again is not applied.
    lines_in: HashMap<(u16, u16, u32), u64>,
}

impl Server<Inline> {
    /// A run-to-completion server with id `id` answering from `mac` for
    /// `devices`, acting for the client platforms of `registry`.
    pub fn new(id: u16, mac: MacAddr, devices: &[DeviceSpec], registry: Registry) -> Server<Inline> {
        Server::with_env(id, mac, devices, DeviceEnv::new(), registry)
    }

    /// The same, wired to `env` (whose consoles the caller serves).
    pub fn with_env(
        id: u16,
        mac: MacAddr,
        devices: &[DeviceSpec],
        env: DeviceEnv,
        registry: Registry,
    ) -> Server<Inline> {
        env.pins.route(devices);
        let backend = Inline::new(Devices::new(devices, &env));
        Server::unplaced(id, mac, env, backend, devices, registry)
    }
}

impl<B: Backend> Server<B> {
    /// A server for the `devices` its `backend` runs, for the client
    /// platforms of `registry` (the server's config).
    pub fn unplaced(
        id: u16,
        mac: MacAddr,
        env: DeviceEnv,
        backend: B,
        devices: &[DeviceSpec],
        registry: Registry,
    ) -> Server<B> {
        tracing::debug!(server = id, %mac, devices = devices.len(), clients = registry.clients().len(), "serving the devices of its config");
        let mut s = Server::bare(id, mac, env, backend, Arc::new(registry));
        s.addresses = AddressMap::new(devices);
        s.irqs.bind_all(devices.iter().map(|d| (d.id, d.vm)), &s.registry);
        s.irqs.bind_chips(&s.registry, &s.env.pins);
        s
    }

    /// A server whose devices, clients, forwarding and answers follow the
    /// plans its planner ([`crate::placement::Planner`]) sends through
    /// `link`; the plan already waiting there is in force at once.
    pub fn placed(id: u16, mac: MacAddr, env: DeviceEnv, backend: B, link: Arc<PlacementLink>) -> Server<B> {
        tracing::debug!(server = id, %mac, "serving what the control panel places here");
        let mut s = Server::bare(id, mac, env, backend, Arc::new(Registry::default()));
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

    fn bare(id: u16, mac: MacAddr, env: DeviceEnv, backend: B, registry: Arc<Registry>) -> Server<B> {
        Server {
            id,
            mac,
            stats: ServerStats::default(),
            malformed: [0; WireError::ALL.len()],
            unauthenticated: [0; AuthError::ALL.len()],
            registry,
            peers: Peers::random(),
            authenticate: true,
            irqs: IrqStreams::new(id, mac),
            dma: DmaEngine::new(mac, crate::dma::DEFAULT_DMA_CHUNK),
            env,
            backend,
            addresses: AddressMap::default(),
            placed: None,
            announced: false,
            next_forget: Instant::now() + FORGET_EVERY,
            fenced: Vec::new(),
            lines_in: HashMap::new(),
        }
    }

    /// Neither check nor seal tags: only to measure what authentication
    /// costs (`dmfabric bench rtt --auth both`). Never in service.
    pub fn without_authentication(mut self) -> Server<B> {
        self.authenticate = false;
        self
    }

    /// A fixed epoch and first session id instead of random ones (feature
    /// `testing`: fuzz targets and tests that must be repeatable).
    #[cfg(any(test, feature = "testing"))]
    pub fn with_epoch(mut self, epoch: u64, first_session: u32) -> Server<B> {
        self.peers = Peers::new(epoch, first_session);
        self
    }

    /// Forget a client after `idle` of silence (default [`crate::peers::IDLE_FORGET`]).
    pub fn with_idle_forget(mut self, idle: Duration) -> Server<B> {
        self.peers = std::mem::replace(&mut self.peers, Peers::random()).with_idle(idle);
        self
    }

    /// Send device DMA in chunks of `bytes` (the link's MTU less
    /// dmfabric's header and tag; [`crate::dma::DEFAULT_DMA_CHUNK`] for 1500).
    pub fn with_dma_chunk(mut self, bytes: u32) -> Server<B> {
        self.dma = DmaEngine::new(self.mac, bytes);
        self
    }

    /// What the models' DMA did so far.
    pub fn dma_stats(&self) -> crate::dma::DmaStats {
        self.dma.stats()
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

    /// This server's epoch (drawn at its start).
    pub fn epoch(&self) -> u64 {
        self.peers.epoch()
    }

    /// The revision of the routing table in force (0 when not placed).
    pub fn table_revision(&self) -> u64 {
        self.placed.as_ref().map_or(0, |p| p.table.revision)
    }

    /// Interrupts not acknowledged yet (in flight or queued).
    pub fn interrupts_pending(&self) -> usize {
        self.irqs.pending()
    }

    /// Clients remembered, and the streams of `client`.
    pub fn remembered(&self, client: u16) -> (usize, usize) {
        (self.peers.len(), self.peers.streams(client))
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
        let p = self.peers.stats();
        let mut s = self.stats.clone();
        s.malformed = WireError::ALL
            .iter()
            .filter(|e| self.malformed[e.index()] > 0)
            .map(|e| (e.name(), self.malformed[e.index()]))
            .collect();
        s.unauthenticated = AuthError::ALL
            .iter()
            .filter(|e| self.unauthenticated[e.index()] > 0)
            .map(|e| (e.name(), self.unauthenticated[e.index()]))
            .collect();
        s.interrupts = i.sent;
        s.interrupt_retransmits = i.retransmits;
        s.interrupt_acks = i.acks;
        s.interrupt_acks_stale = i.acks_stale;
        s.interrupts_unbound = i.unbound;
        s.interrupts_given_up = i.given_up;
        s.interrupts_queue_full = i.queue_full;
        s.interrupts_coalesced = i.coalesced;
        s.levels_resent = i.levels_resent;
        s.chip_pins = i.chip_pins;
        s.chip_lines_sent = i.chip_sent;
        s.vm_resets = i.resets;
        s.vm_events_dropped = self.env.events.dropped();
        s.tx_full += i.tx_full;
        s.sessions_offered = p.sessions_offered;
        s.sessions_started = p.sessions_started;
        s.hellos_limited = p.hellos_limited;
        s.nacks_limited = p.nacks_limited;
        s.clients_forgotten = p.clients_evicted;
        s.unclaimed = b.unclaimed;
        s.devices = b.devices;
        s.dma = self.dma.stats();
        s
    }

    fn view(&self) -> View<'_> {
        View {
            server: self.id,
            mac: self.mac,
            registry: &self.registry,
            addresses: &self.addresses,
            placed: self.placed.as_ref().map(|p| rx::Placed { table: &p.table, here: &p.here }),
            authenticate: self.authenticate,
        }
    }

    fn sealing(&self) -> Sealing<'_> {
        Sealing { registry: &self.registry, epoch: self.peers.epoch32(), authenticate: self.authenticate }
    }

    /// Seal `msg` for its client and queue it to `to`.
    fn send(&mut self, tx: &mut FrameBatch, to: MacAddr, msg: Message<'_>, retransmit: bool) {
        let client = msg.route().client;
        let mut repr = FrameRepr::new(EthernetRepr { dst: to, src: self.mac }, msg);
        repr.retransmit = retransmit;
        if !self.sealing().push(tx, client, repr) {
            self.stats.tx_full += 1;
        }
    }

    /// A request its stream takes: run it on its device.
    fn run(&mut self, h: Held, tx: &mut FrameBatch, now: Instant) {
        if self.addresses.vm_of(h.req.route.device) == Some(None) {
            self.irqs.bind_shared(h.req.route.device, &h.req.route, h.reply_to);
        }
        let job = Job { req: h.req, reply_to: h.reply_to, named: h.named, queued: now };
        if let Some(done) = self.backend.submit(job, now) {
            self.done(done, tx);
        }
    }

    /// Something came back from the models.
    fn done(&mut self, done: Done, tx: &mut FrameBatch) {
        match done {
            Done::Ran { result: Ok(cmp), to, named } => {
                self.stats.completions += 1;
                // The line changes the request made go to the VM's
                // interrupt controller on another server before its
                // completion goes to the client (the model queued them
                // before it was done).
                if self.irqs.chip_elsewhere(cmp.route.vm) {
                    self.irqs.take(&self.env.irqs);
                    if self.irqs.chip_pending(cmp.route.client, cmp.route.vm) {
                        self.stats.completions_fenced += 1;
                        self.fenced.push((cmp, to, named));
                        return;
                    }
                }
                self.complete(cmp, to, named, tx);
            }
            Done::Ran { result: Err((req, why)), to, .. } => self.nack(tx, to, &req, why, Instant::now()),
            Done::Dma { device, req } => {
                let to = self.irqs.binding(device);
                self.dma.submit(device, req, to, Instant::now());
            }
            Done::Removed { id, state } => {
                let Some(p) = self.placed.as_mut() else { return };
                let to = p.leaving.remove(&id).flatten();
                let answers = self.peers.answers_of(id);
                p.link.depart(Departure { id, to, state, answers });
                self.stats.devices_left += u64::from(to.is_some());
            }
        }
    }

    /// Remember `cmp` as its stream's answer and send it.
    fn complete(&mut self, cmp: IoCompletion, to: MacAddr, named: u32, tx: &mut FrameBatch) {
        let key = StreamKey { vm: cmp.route.vm, vcpu: cmp.route.vcpu, device: named };
        self.peers.answered(cmp.route.client, key, cmp.seq, cmp);
        self.send(tx, to, Message::IoCompletion(cmp), false);
    }

    /// Send the held completions whose VM's line changes were acknowledged
    /// (or given up on) by the server holding its interrupt controller.
    fn release_fenced(&mut self, tx: &mut FrameBatch) {
        if self.fenced.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.fenced.len() {
            let (cmp, to, named) = self.fenced[i];
            if self.irqs.chip_pending(cmp.route.client, cmp.route.vm) {
                i += 1;
                continue;
            }
            self.fenced.swap_remove(i);
            self.complete(cmp, to, named, tx);
        }
    }

    /// Another server changed a line of a device of a VM whose interrupt
    /// controller may be here: drive its pin (once per change) and
    /// acknowledge it to that server.
    fn line_in(&mut self, from: MacAddr, irq: Interrupt, tx: &mut FrameBatch) {
        let Some(q) = self.env.pins.queue(irq.route.vm) else {
            self.stats.chip_lines_no_chip += 1;
            return;
        };
        let IrqSource::Line(pin) = irq.source else { return };
        let stream = (irq.route.server, irq.route.client, irq.route.vm);
        if self.lines_in.get(&stream) == Some(&irq.seq) {
            self.stats.chip_lines_again += 1;
        } else {
            self.lines_in.insert(stream, irq.seq);
            self.stats.chip_lines_in += 1;
            match irq.trigger {
                Trigger::Edge => {
                    q.push(pin, true);
                    q.push(pin, false);
                }
                Trigger::Level { asserted } => q.push(pin, asserted),
            }
        }
        let ack = InterruptAck { route: irq.route, seq: irq.seq };
        self.send(tx, from, Message::InterruptAck(ack), false);
    }

    fn nack(&mut self, tx: &mut FrameBatch, to: MacAddr, req: &IoRequest, why: Refusal, now: Instant) {
        match why {
            Refusal::UnknownDevice => self.stats.nack_unknown_device += 1,
            Refusal::WrongServer => self.stats.nack_wrong_server += 1,
            Refusal::OtherVm => self.stats.nack_other_vm += 1,
            Refusal::UnknownVm => self.stats.nack_unknown_vm += 1,
            Refusal::BadVcpu => self.stats.nack_bad_vcpu += 1,
            Refusal::NoSession => self.stats.nack_no_session += 1,
        }
        if !self.peers.may_nack(req.route.client, now) {
            return;
        }
        let msg =
            Message::Nack(Nack { route: req.route, seq: req.seq, reason: why.nack_reason(), nacked: Kind::IoRequest });
        self.send(tx, to, msg, false);
    }

    /// A verified request that names this server and may run here: held
    /// while its device's state is on its way (its stream is checked once
    /// the last server's answers came with it), else checked and run.
    fn request(&mut self, h: Held, tx: &mut FrameBatch, now: Instant) {
        if let Some(held) = self.placed.as_mut().and_then(|p| p.arriving.get_mut(&h.req.route.device)) {
            if held.len() < HELD_MAX {
                held.push(h);
                self.stats.held += 1;
            } else {
                self.stats.held_dropped += 1;
            }
            return;
        }
        let client = h.req.route.client;
        let (verdict, change) = self.peers.check(client, stream_of(&h.req, h.named), h.req.seq, h.epoch, now);
        let answer = match verdict {
            Verdict::New => None,
            Verdict::Duplicate(Some(&answer)) => Some(answer),
            Verdict::Duplicate(None) => {
                self.stats.duplicates_in_flight += 1;
                return;
            }
            Verdict::Stale => {
                self.stats.stale += 1;
                return;
            }
            Verdict::NoSession => return self.nack(tx, h.reply_to, &h.req, Refusal::NoSession, now),
        };
        if let SessionChange::Started(session) = change {
            self.irqs.start_session(client, session);
            self.dma.start_session(client, session);
        }
        match answer {
            Some(answer) => {
                self.stats.duplicates_answered += 1;
                self.send(tx, h.reply_to, Message::IoCompletion(answer), true);
            }
            None => self.run(h, tx, now),
        }
    }

    /// Tell every registered client this server's epoch, so that one that
    /// knew an earlier life of it opens a session again (its requests and
    /// interrupts start over; its level lines are sent again).
    fn announce(&mut self, tx: &mut FrameBatch) {
        self.announced = true;
        let registry = self.registry.clone();
        for c in registry.clients() {
            let body = HelloReplyBody::new([0; dmfabric_wire::session::CHALLENGE_LEN], self.peers.epoch(), 0);
            let route = Route { server: self.id, client: c.id, hypervisor: c.hypervisor, ..Route::default() };
            let msg = ControlMsg { route, seq: 0, op: ControlOp::HelloReply, payload: body.bytes() };
            self.send(tx, c.mac, Message::Control(msg), false);
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
        self.registry = plan.registry;
        self.irqs.bind_all(plan.bound, &self.registry);
        self.irqs.bind_chips(&self.registry, &self.env.pins);
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
        for answer in &a.answers {
            self.peers.adopt(answer, now);
        }
        self.backend.install(&a.spec, a.model, now);
        self.stats.devices_arrived += u64::from(a.restored);
        for h in held {
            // One the last server ran is answered from its cache.
            self.request(h, tx, now);
        }
    }

    /// Queue the resets the devices asked for on their VMs' streams.
    fn take_vm_events(&mut self) {
        while let Some((device, event)) = self.env.events.pop() {
            match event {
                VmEvent::Reset => {
                    if !self.irqs.reset(device) {
                        self.stats.vm_events_unbound += 1;
                    }
                }
            }
        }
    }
}

impl<B: Backend> Handler for Server<B> {
    fn on_frame(&mut self, bytes: &[u8], tx: &mut FrameBatch, now: Instant) {
        match rx::classify(bytes, &self.view()) {
            Rx::Run { req, reply_to, named, epoch } => {
                self.stats.requests += 1;
                self.request(Held { req, reply_to, named, epoch }, tx, now);
            }
            Rx::Forward { req, to, retransmit, epoch } => {
                self.stats.requests += 1;
                self.stats.forwarded += 1;
                let mut fwd = FrameRepr::new(EthernetRepr { dst: to, src: self.mac }, Message::IoRequest(req));
                fwd.retransmit = retransmit;
                // The epoch is the one the client named (of the server
                // that runs the device), not ours.
                let key = self.registry.client(req.route.client).map(|c| c.keys.sending());
                let sent = match (self.authenticate, key) {
                    (true, Some(key)) => tx.push_with(|buf| {
                        fwd.epoch = epoch;
                        fwd.emit_sealed(buf, &key).ok()
                    }),
                    (false, _) => tx.push_with(|buf| {
                        fwd.epoch = epoch;
                        fwd.emit(buf).ok()
                    }),
                    (true, None) => false,
                };
                if !sent {
                    self.stats.tx_full += 1;
                }
            }
            Rx::Refuse { req, to, why } => {
                self.stats.requests += 1;
                self.nack(tx, to, &req, why, now);
            }
            Rx::Hello { to, route, seq, challenge } => {
                self.stats.hellos += 1;
                let Some(session) = self.peers.hello(route.client, now) else { return };
                let body = HelloReplyBody::new(challenge, self.peers.epoch(), session);
                let route = Route { server: self.id, ..route };
                let reply = ControlMsg { route, seq, op: ControlOp::HelloReply, payload: body.bytes() };
                self.send(tx, to, Message::Control(reply), false);
            }
            Rx::Register { client, seq, epoch } => {
                if let SessionChange::Started(session) = self.peers.register(client, seq, epoch, now) {
                    self.irqs.start_session(client, session);
                    self.dma.start_session(client, session);
                }
            }
            Rx::Ack(ack) => {
                self.irqs.ack(&ack);
                self.release_fenced(tx);
            }
            Rx::Line { from, irq } => self.line_in(from, irq, tx),
            Rx::DmaAnswer { client, answer } => self.dma.answer(client, &rx::dma_answer(bytes, &answer)),
            Rx::DmaRefused { client, seq, reason } => self.dma.refused(client, seq, reason),
            Rx::Drop(Dropped::Foreign) => self.stats.foreign += 1,
            Rx::Drop(Dropped::Malformed(e)) => self.malformed[e.index()] += 1,
            Rx::Drop(Dropped::NotForUs) => self.stats.not_for_us += 1,
            Rx::Drop(Dropped::Unauthenticated(e)) => self.unauthenticated[e.index()] += 1,
            Rx::Drop(Dropped::WrongSource) => self.stats.wrong_source += 1,
            Rx::Drop(Dropped::UnexpectedKind) => self.stats.unexpected_kind += 1,
            Rx::Drop(Dropped::BadHello) => self.stats.bad_hello += 1,
        }
    }

    fn on_poll(&mut self, tx: &mut FrameBatch, now: Instant) {
        self.follow_placement(tx, now);
        if !self.announced {
            self.announce(tx);
        }
        if now >= self.next_forget {
            self.next_forget = now + FORGET_EVERY;
            self.peers.forget(now, &self.registry);
        }
        self.backend.tick(now);
        while !tx.is_full() {
            let Some(done) = self.backend.poll_done() else { break };
            self.done(done, tx);
        }
        self.take_vm_events();
        self.irqs.take(&self.env.irqs);
        let seal = Sealing { registry: &self.registry, epoch: self.peers.epoch32(), authenticate: self.authenticate };
        self.irqs.send(tx, now, &seal);
        self.dma.send(tx, now, &seal);
        for (device, tag, result) in self.dma.take_finished() {
            self.backend.dma_done(device, tag, result, now);
        }
        // (A line change given up on releases what it held.)
        self.release_fenced(tx);
    }

    fn next_deadline(&self) -> Option<Instant> {
        // A placed server looks for plans and arrivals every few ms even when idle.
        let watch = self.placed.as_ref().map(|_| Instant::now() + Duration::from_millis(5));
        [
            self.backend.next_due(),
            self.irqs.next_retransmit(),
            self.dma.next_retransmit(),
            watch,
            Some(self.next_forget),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupts::{IRQ_RETRY, IRQ_TRIES};
    use crate::testing::{self, TestClient};
    use dmfabric_devices::platform::pc;
    use dmfabric_testkit::keys;
    use dmfabric_wire::session::{Seq, CHALLENGE_LEN};
    use dmfabric_wire::{AccessSize, Direction, IrqSource, NackReason, Space, Status, Trigger};

    const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);
    const FORGER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x66]);

    /// Client 3 at CLIENT runs VM 7 (one vCPU).
    fn registry() -> Registry {
        testing::registry(vec![testing::client(3, CLIENT, &[(7, 1)])])
    }

    /// A server and a client of it with a session open.
    struct Rig {
        s: Server<Inline>,
        c: TestClient,
    }

    fn seal(msg: Message<'_>, epoch: u32) -> Vec<u8> {
        let mut c = TestClient::new(3, CLIENT, 1, SERVER);
        c.epoch = epoch;
        c.seal(msg)
    }

    fn hello(challenge: u8) -> Vec<u8> {
        TestClient::new(3, CLIENT, 1, SERVER).hello(challenge)
    }

    fn io(device: u32, server: u16, dir: Direction, addr: u64, data: u64, seq: Seq) -> IoRequest {
        IoRequest {
            route: Route { server, client: 3, vm: 7, vcpu: 0, device, hypervisor: 1 },
            seq: seq.0,
            space: Space::Pio,
            dir,
            size: AccessSize::B2,
            addr,
            data,
        }
    }

    impl Rig {
        fn new(devices: &[DeviceSpec]) -> Rig {
            let mut s = Server::new(1, SERVER, devices, registry());
            let mut c = TestClient::new(3, CLIENT, 1, SERVER);
            c.open(&mut s);
            Rig { s, c }
        }

        /// The next request of `device`'s stream, naming server `server`.
        fn request(&mut self, device: u32, server: u16, dir: Direction, addr: u64, data: u64) -> Vec<u8> {
            self.c.server = server;
            let f = self.c.request(7, 0, device, Space::Pio, dir, AccessSize::B2, addr, data);
            self.c.server = 1;
            f
        }

        fn answer(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
            answer(&mut self.s, frame)
        }
    }

    fn answer(server: &mut Server<Inline>, frame: &[u8]) -> Vec<Vec<u8>> {
        let mut tx = FrameBatch::new();
        server.on_frame(frame, &mut tx, Instant::now());
        tx.iter().map(<[u8]>::to_vec).collect()
    }

    /// The one frame sent: sealed with client 3's key, to its registered MAC.
    fn only_msg(frames: &[Vec<u8>]) -> Message<'_> {
        assert_eq!(frames.len(), 1);
        let f = dmfabric_wire::Frame::new_checked(&frames[0][..]).unwrap();
        keys::ring(3).verify(&f).expect("sealed with the client's key");
        let repr = FrameRepr::parse_bytes(&frames[0]).unwrap();
        assert_eq!(repr.eth, EthernetRepr { dst: CLIENT, src: SERVER });
        repr.msg
    }

    #[test]
    fn write_then_read_back() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let f = r.request(1, 1, Direction::Write, 0x502, 0xbeef);
        let Message::IoCompletion(c) = only_msg(&r.answer(&f)) else { panic!("not a completion") };
        assert_eq!((c.status, c.dir), (Status::Ok, Direction::Write));
        let f = r.request(1, 1, Direction::Read, 0x502, 0);
        let Message::IoCompletion(c) = only_msg(&r.answer(&f)) else { panic!("not a completion") };
        assert_eq!((c.data, c.route.vm, c.route.client), (0xbeef, 7, 3));
        assert_eq!(r.s.stats().completions, 2);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let f = r.request(1, 1, Direction::Read, 0x600, 0);
        let Message::IoCompletion(c) = only_msg(&r.answer(&f)) else { panic!("not a completion") };
        assert_eq!((c.data, c.status), (0xffff, Status::Unclaimed));
        assert_eq!(r.s.stats().unclaimed, 1);
    }

    #[test]
    fn unknown_device_and_wrong_server_are_nacked() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let f = r.request(99, 1, Direction::Read, 0x500, 0);
        assert!(matches!(only_msg(&r.answer(&f)), Message::Nack(Nack { reason: NackReason::UnknownDevice, .. })));
        let f = r.request(1, 2, Direction::Read, 0x500, 0);
        assert!(matches!(only_msg(&r.answer(&f)), Message::Nack(Nack { reason: NackReason::WrongServer, .. })));
        let st = r.s.stats();
        assert_eq!((st.nack_unknown_device, st.nack_wrong_server, st.completions), (1, 1, 0));
    }

    #[test]
    fn bad_frames_are_counted_by_reason_and_not_answered() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let good = r.request(1, 1, Direction::Read, 0x500, 0);
        let mut bad_magic = good.clone();
        bad_magic[14] = 0;
        let mut bad_version = good.clone();
        bad_version[16] = 1;
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut other_mac = good.clone();
        other_mac[5] = 0x99;
        let mut forged = good.clone();
        forged[14 + 56 - 1] ^= 0x40; // the write data, under the tag
        let untagged = keys::unsealed(&FrameRepr::parse_bytes(&good).unwrap());
        for f in [
            &good[..20],
            &bad_magic[..],
            &bad_version[..],
            &arp[..],
            &other_mac[..],
            &[][..],
            &forged[..],
            &untagged[..],
        ] {
            assert!(r.answer(f).is_empty());
        }
        let st = r.s.stats();
        assert_eq!(st.malformed, vec![("truncated", 2), ("bad_magic", 1), ("bad_version", 1)]);
        assert_eq!(st.unauthenticated, vec![("no_tag", 1), ("bad_tag", 1)]);
        assert_eq!((st.foreign, st.not_for_us, st.requests), (1, 1, 0));
        // And the server still answers.
        assert_eq!(r.answer(&good).len(), 1);
    }

    #[test]
    fn a_retransmitted_write_is_answered_from_the_cache_not_run_twice() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let first = r.request(1, 1, Direction::Write, 0x500, 0xaa);
        let first_answer = r.answer(&first);
        // The same frame again (the client did not see the answer): same answer, marked a retransmission.
        let again = r.answer(&first);
        assert_eq!(
            FrameRepr::parse_bytes(&again[0]).unwrap().msg,
            FrameRepr::parse_bytes(&first_answer[0]).unwrap().msg
        );
        // The next write, then the first one arriving late: stale, dropped.
        let second = r.request(1, 1, Direction::Write, 0x500, 0xbb);
        r.answer(&second);
        assert!(r.answer(&first).is_empty());
        let f = r.request(1, 1, Direction::Read, 0x500, 0);
        let Message::IoCompletion(c) = only_msg(&r.answer(&f)) else { panic!("not a completion") };
        assert_eq!(c.data, 0xbb, "the old write was not applied again");
        let st = r.s.stats();
        assert_eq!((st.requests, st.completions, st.duplicates_answered, st.stale), (5, 3, 1, 1));
    }

    #[test]
    fn a_stream_takes_only_the_next_number_so_a_huge_one_poisons_nothing() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let f = r.request(1, 1, Direction::Write, 0x500, 1);
        r.answer(&f);
        // An authentic request far ahead (as a replay of some later frame would be): stale.
        let far =
            seal(Message::IoRequest(io(1, 1, Direction::Write, 0x500, 9, Seq::new(r.c.session, u32::MAX))), r.c.epoch);
        assert!(r.answer(&far).is_empty());
        let f = r.request(1, 1, Direction::Read, 0x500, 0);
        let Message::IoCompletion(c) = only_msg(&r.answer(&f)) else { panic!("the stream goes on") };
        assert_eq!(c.data, 1);
    }

    #[test]
    fn a_replayed_hello_wipes_nothing_and_a_replayed_write_does_not_run_again() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let write = r.request(1, 1, Direction::Write, 0x500, 0x11);
        r.answer(&write);
        let f = r.request(1, 1, Direction::Write, 0x500, 0x22);
        r.answer(&f);
        // The recorded Hello again: answered (a new offer), nothing forgotten.
        let out = r.answer(&hello(1));
        assert!(matches!(only_msg(&out), Message::Control(ControlMsg { op: ControlOp::HelloReply, .. })));
        assert!(r.answer(&write).is_empty(), "the old write is stale still");
        let f = r.request(1, 1, Direction::Read, 0x500, 0);
        let Message::IoCompletion(c) = only_msg(&r.answer(&f)) else { panic!("not a completion") };
        assert_eq!(c.data, 0x22);
        // Outside the stream's session: stale for a stream the server
        // knows; for one it does not (here: naming no device), NoSession.
        let (session, epoch) = (r.c.session, r.c.epoch);
        let stray = |device| {
            let seq = Seq::new(session ^ 0xffff, 0);
            seal(Message::IoRequest(io(device, 1, Direction::Read, 0x500, 0, seq)), epoch)
        };
        assert!(r.answer(&stray(1)).is_empty());
        let out = r.answer(&stray(0));
        assert!(matches!(only_msg(&out), Message::Nack(Nack { reason: NackReason::NoSession, .. })));
    }

    #[test]
    fn hellos_are_answered_with_the_challenge_from_our_mac_to_the_registered_one() {
        let mut s = Server::new(5, SERVER, &[], registry());
        // Sent from another MAC by someone holding the key: still answered at the registered MAC... no: dropped.
        let mut moved = hello(3);
        moved[6..12].copy_from_slice(&FORGER.0);
        assert!(answer(&mut s, &moved).is_empty(), "the tag covers the source MAC");
        let out = answer(&mut s, &hello(3));
        let Message::Control(c) = only_msg(&out) else { panic!("not control") };
        assert_eq!((c.op, c.route.server, c.seq), (ControlOp::HelloReply, 5, 1));
        let body = HelloReplyBody::parse(c.payload).unwrap();
        assert_eq!((body.challenge, body.epoch.get()), ([3; CHALLENGE_LEN], s.epoch()));
        // A flood of the same Hello: a few answers, then none.
        let answered: usize = (0..100).map(|_| answer(&mut s, &hello(3)).len()).sum();
        assert!(answered < 10, "{answered}");
        assert!(s.stats().hellos_limited > 90);
    }

    #[test]
    fn a_vm_whose_io_apic_is_here_gets_its_devices_lines_as_msis_and_a_level_fires_again_after_eoi() {
        use dmfabric_devices::{DeviceKind, DeviceSpec};
        let ioapic = pc::ioapic_device(20, Some(7));
        let tester = DeviceSpec::at(21, DeviceKind::IrqTest { line: 5 }, pc::IRQ_TEST.base, Some(7));
        let mut s = Server::new(1, SERVER, &[ioapic.clone(), tester], registry());
        let mut c = TestClient::new(3, CLIENT, 1, SERVER);
        c.open(&mut s);
        let now = Instant::now();
        let mmio = |c: &mut TestClient, s: &mut Server<Inline>, off: u64, data: u64| {
            let f = c.request(7, 0, 20, Space::Mmio, Direction::Write, AccessSize::B4, pc::IOAPIC_MMIO + off, data);
            answer(s, &f);
        };
        // Pin 5: vector 0x35, level-triggered, to APIC 0; unmasked.
        mmio(&mut c, &mut s, 0, 0x10 + 2 * 5);
        mmio(&mut c, &mut s, 0x10, 0x35 | 1 << 15);
        let msis = |s: &mut Server<Inline>, c: &TestClient| -> Vec<(u64, u32)> {
            let mut tx = FrameBatch::new();
            s.on_poll(&mut tx, now);
            let mut out = Vec::new();
            for f in tx.iter() {
                if let Message::Interrupt(i) = FrameRepr::parse_bytes(f).unwrap().msg {
                    assert_eq!(i.route.device, 20, "from the I/O APIC");
                    let IrqSource::Msi { address, data } = i.source else { panic!("{i:?}") };
                    out.push((address, data));
                    // Acknowledged, so the next goes out.
                    answer(s, &c.ack(i.route, i.seq));
                }
            }
            out
        };
        let level = (0xfee0_0000, 0x35 | 1 << 14 | 1 << 15);
        answer(&mut s, &c.outl(7, 21, u64::from(pc::IRQ_TEST.base), 2)); // assert the level
        assert_eq!(msis(&mut s, &c), [level]);
        assert_eq!(msis(&mut s, &c), [], "remote IRR: not again before the EOI");
        // The guest's EOI (the client's KVM_EXIT_IOAPIC_EOI) with the line still high: again.
        mmio(&mut c, &mut s, 0x40, 0x35);
        assert_eq!(msis(&mut s, &c), [level]);
        answer(&mut s, &c.outl(7, 21, u64::from(pc::IRQ_TEST.base), 3)); // lower it
        mmio(&mut c, &mut s, 0x40, 0x35);
        assert_eq!(msis(&mut s, &c), [], "lowered: nothing after the EOI");
        assert_eq!(s.stats().interrupts, 2);
    }

    #[test]
    fn a_line_of_a_device_on_another_server_reaches_the_vms_io_apic_before_its_completion_goes() {
        use dmfabric_devices::{DeviceKind, DeviceSpec};
        const CHIP: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x5a]);
        let client = || testing::client(3, CLIENT, &[(7, 1)]);
        // Server 1 holds VM 7's interrupt test device (line 5), server 2 its I/O APIC.
        let tester = DeviceSpec::at(21, DeviceKind::IrqTest { line: 5 }, pc::IRQ_TEST.base, Some(7));
        let reg_b = Registry::new(vec![client()], vec![(2, CHIP)], HashMap::new()).with_chips([(7, (2, CHIP))].into());
        let mut b = Server::new(1, SERVER, &[tester], reg_b);
        let mut a = Server::new(2, CHIP, &[pc::ioapic_device(20, Some(7))], {
            Registry::new(vec![client()], vec![(1, SERVER)], HashMap::new())
        });
        let (mut cb, mut ca) = (TestClient::new(3, CLIENT, 1, SERVER), TestClient::new(3, CLIENT, 2, CHIP));
        cb.open(&mut b);
        ca.open(&mut a);
        let now = Instant::now();
        let poll = |s: &mut Server<Inline>| -> Vec<FrameRepr<'static>> {
            let mut tx = FrameBatch::new();
            s.on_poll(&mut tx, now);
            let frames: Vec<Vec<u8>> = tx.iter().map(<[u8]>::to_vec).collect();
            frames.into_iter().map(|f| FrameRepr::parse_bytes(f.leak()).unwrap()).collect()
        };
        poll(&mut a);
        poll(&mut b);
        // Pin 5 of the I/O APIC: vector 0x35, level-triggered, unmasked.
        for (off, data) in [(0, 0x10 + 2 * 5), (0x10, 0x35 | 1 << 15)] {
            let f = ca.request(7, 0, 20, Space::Mmio, Direction::Write, AccessSize::B4, pc::IOAPIC_MMIO + off, data);
            answer(&mut a, &f);
        }
        // The guest asserts the level on server 1: the completion waits
        // while the line change goes to server 2, sealed for client 3.
        let out = answer(&mut b, &cb.outl(7, 21, u64::from(pc::IRQ_TEST.base), 2));
        assert!(out.is_empty(), "no completion before the controller has the line");
        let sent = poll(&mut b);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].eth, EthernetRepr { dst: CHIP, src: SERVER });
        let Message::Interrupt(line) = sent[0].msg else { panic!("{sent:?}") };
        assert_eq!(
            (line.source, line.trigger, line.route.server),
            (IrqSource::Line(5), Trigger::Level { asserted: true }, 1)
        );
        assert_eq!(b.stats().completions_fenced, 1);
        let sealed = {
            let mut buf = vec![0u8; sent[0].sealed_len()];
            let mut r = sent[0];
            r.epoch = 0;
            let n = r.emit_sealed(&mut buf, &keys::ring(3).sending()).unwrap();
            buf.truncate(n);
            buf
        };
        // Server 2 takes it (and the same frame again only once), acknowledges both to server 1...
        let acks: Vec<Vec<u8>> = [answer(&mut a, &sealed), answer(&mut a, &sealed)].concat();
        assert_eq!(acks.len(), 2);
        for f in &acks {
            let repr = FrameRepr::parse_bytes(f).unwrap();
            assert_eq!(repr.eth.dst, SERVER);
            assert!(matches!(repr.msg, Message::InterruptAck(k) if k.seq == line.seq));
        }
        assert_eq!((a.stats().chip_lines_in, a.stats().chip_lines_again), (1, 1));
        // ... and its I/O APIC sends the MSI to the client.
        let msis: Vec<_> = poll(&mut a)
            .into_iter()
            .filter_map(|r| match r.msg {
                Message::Interrupt(i) => Some((r.eth.dst, i.source)),
                _ => None,
            })
            .collect();
        assert_eq!(msis, [(CLIENT, IrqSource::Msi { address: 0xfee0_0000, data: 0x35 | 1 << 14 | 1 << 15 })]);
        // The acknowledgement releases the completion, to the client.
        let released = answer(&mut b, &acks[0]);
        assert!(matches!(only_msg(&released), Message::IoCompletion(_)));
        assert!(poll(&mut b).is_empty(), "nothing more");
        // A server that is not the one the line names, or a MAC no server has: dropped.
        let forged = a.stats().wrong_source;
        let mut from_elsewhere = sent[0];
        from_elsewhere.eth.src = MacAddr([2, 0, 0, 0, 0, 0x77]);
        let mut buf = vec![0u8; from_elsewhere.sealed_len()];
        let n = from_elsewhere.emit_sealed(&mut buf, &keys::ring(3).sending()).unwrap();
        assert!(answer(&mut a, &buf[..n]).is_empty());
        assert_eq!(a.stats().wrong_source, forged + 1);
    }

    fn irq_command(r: &mut Rig, command: u64) -> Vec<u8> {
        r.c.outl(7, 101, u64::from(pc::IRQ_TEST.base), command)
    }

    fn ack(seq: u64) -> Vec<u8> {
        let ack = dmfabric_wire::InterruptAck {
            route: Route { server: 1, client: 3, vm: 7, vcpu: 0, device: 101, hypervisor: 1 },
            seq,
        };
        seal(Message::InterruptAck(ack), 0)
    }

    /// The interrupts `on_poll` sends at `now`: (seq, trigger, retransmit).
    fn poll_irqs(s: &mut Server<Inline>, now: Instant) -> Vec<(u64, Trigger, bool)> {
        let mut tx = FrameBatch::new();
        s.on_poll(&mut tx, now);
        tx.iter()
            .filter_map(|f| {
                let repr = FrameRepr::parse_bytes(f).unwrap();
                assert_eq!(repr.eth.dst, CLIENT, "to the client that used the device");
                let i = match repr.msg {
                    Message::Interrupt(i) => i,
                    // The announcement of the server's epoch at its first poll.
                    Message::Control(c) if c.op == ControlOp::HelloReply => return None,
                    other => panic!("not an interrupt: {other:?}"),
                };
                assert_eq!((i.route.client, i.route.vm, i.source), (3, 7, IrqSource::Line(pc::IRQ_TEST_IRQ)));
                Some((i.seq, i.trigger, repr.retransmit))
            })
            .collect()
    }

    #[test]
    fn interrupts_go_one_at_a_time_until_acked_and_are_retransmitted() {
        let mut r = Rig::new(&[pc::irq_test_device(0)]);
        let t0 = Instant::now();
        // Nobody has used the device yet: nothing to send.
        assert!(poll_irqs(&mut r.s, t0).is_empty());
        // Assert the level, then lower it: two interrupts, in order.
        let f = irq_command(&mut r, 2);
        assert_eq!(r.answer(&f).len(), 1, "the write is completed");
        let f = irq_command(&mut r, 3);
        assert_eq!(r.answer(&f).len(), 1);
        let first = poll_irqs(&mut r.s, t0);
        assert_eq!(first.len(), 1, "the second waits for the first's ack");
        let (seq, trigger, re) = first[0];
        assert_eq!(Seq(seq), Seq::new(r.c.session, 0), "counted from 0 in the client's session");
        assert_eq!((trigger, re), (Trigger::Level { asserted: true }, false));
        assert!(poll_irqs(&mut r.s, t0 + IRQ_RETRY / 2).is_empty());
        assert_eq!(poll_irqs(&mut r.s, t0 + IRQ_RETRY), vec![(seq, trigger, true)], "retransmitted");
        assert!(r.answer(&ack(seq + 7)).is_empty());
        assert!(r.answer(&ack(seq)).is_empty());
        let t1 = t0 + IRQ_RETRY;
        assert_eq!(poll_irqs(&mut r.s, t1), vec![(seq + 1, Trigger::Level { asserted: false }, false)]);
        assert!(r.answer(&ack(seq + 1)).is_empty());
        assert!(poll_irqs(&mut r.s, t1 + IRQ_RETRY * 2).is_empty(), "all acknowledged");
        let st = r.s.stats();
        assert_eq!(
            (st.interrupts, st.interrupt_retransmits, st.interrupt_acks, st.interrupt_acks_stale),
            (2, 1, 2, 1),
            "{st}"
        );
    }

    #[test]
    fn an_interrupt_nobody_acks_is_given_up_after_the_retry_limit() {
        let mut r = Rig::new(&[pc::irq_test_device(0)]);
        let f = irq_command(&mut r, 1);
        r.answer(&f);
        let mut now = Instant::now();
        let mut sent = 0;
        for _ in 0..IRQ_TRIES + 5 {
            sent += poll_irqs(&mut r.s, now).len();
            now += IRQ_RETRY;
        }
        assert_eq!(sent, IRQ_TRIES as usize);
        assert_eq!(r.s.stats().interrupts_given_up, 1);
        assert_eq!(r.s.interrupts_pending(), 0);
    }

    #[test]
    fn a_million_forged_stream_ids_leave_no_state() {
        let mut r = Rig::new(&[pc::test_device(1)]);
        let before = r.s.remembered(3);
        for i in 0..20_000u32 {
            // Valid format, every id different, no key: dropped at the tag.
            let mut req = io(1, 1, Direction::Write, 0x500, 1, Seq::new(i, i));
            req.route.vm = i;
            req.route.client = (i % 7) as u16;
            let repr = FrameRepr::new(EthernetRepr { dst: SERVER, src: FORGER }, Message::IoRequest(req));
            assert!(r.answer(&keys::unsealed(&repr)).is_empty());
        }
        assert_eq!(r.s.remembered(3), before, "no client or stream added");
        assert_eq!(r.s.stats().requests, 0);
    }
}
