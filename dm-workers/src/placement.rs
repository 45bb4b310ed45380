//! A server placed by the control panel: the narrow adapter between the
//! control panel's records and the data-plane loop.
//!
//! Everything that needs the database, JSON or a log line happens on the
//! store watch's thread, in a [`Planner`]: when the routing table moves on,
//! it works out what changes for this server and builds the models of
//! devices that arrive, and hands the loop a ready [`Plan`]; it writes the
//! states of devices that leave to the store and reads the states of
//! devices that arrive, restoring their models ([`Arrival`]). The loop
//! ([`crate::server::Server`]) only swaps plans in, installs and removes
//! prebuilt models, and queues what leaves ([`Departure`]).
//!
//! A move of device D from server A to server B, as each side sees it:
//! - A's plan says D leaves: the loop takes D's model out and hands its
//!   state, with A's latest answers for the requests D served (so that B
//!   answers a retransmission of a request A ran from cache instead of
//!   running it twice), to A's planner, which writes it to the store. From
//!   then on A forwards requests for D to B.
//! - B's plan says D arrives: requests for it wait (bounded) while B's
//!   planner looks for D's state in the store. When it is there the planner
//!   builds the model from it; the loop installs it, adopts A's answers and
//!   runs the waiting requests. After [`STATE_WAIT`] without a state (A
//!   gone), B starts D fresh and says so.
//!
//! A virtio-blk's image is named by its record ([`BlockImage`]): before
//! the planner builds one placed or moved here it sets it in
//! [`DeviceEnv::images`] and checks that it opens. The path is this
//! server's: a virtio-blk that moves is opened on its new server at the
//! same path, so its image lives on storage both servers mount at the same
//! place. Its model's state moves (the virtio transport, the queue
//! positions; requests taken but not answered are done again on the new
//! server); the disk's data is whatever the file holds. A server that
//! cannot open the image logs one error naming the path and the server,
//! and the device runs as an empty drive.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmfabric_control::model::{BlockImage, Db, Device as DeviceRecord};
use dmfabric_control::routing::{LiveRoutes, RoutingTable};
use dmfabric_control::store::{Store, StoreError};
use dmfabric_control::watch::Chores;
use dmfabric_devices::{Device, DeviceKind, DeviceSpec, DeviceState};
use dmfabric_wire::auth::KeyRing;
use dmfabric_wire::{EthernetRepr, FrameRepr, MacAddr, Message};

use crate::env::{DeviceEnv, ImageSpec};
use crate::interrupts::VmMove;
pub use crate::peers::StreamAnswer;
use crate::peers::{Client, Registry, StreamKey};
use crate::rx::AddressMap;

/// How long an arriving device waits for its state before it starts fresh.
pub const STATE_WAIT: Duration = Duration::from_secs(5);
/// Requests one arriving device may hold before more are dropped (the
/// clients retransmit them).
pub const HELD_MAX: usize = 1024;
/// How soon the planner runs again while the loop is about to hand over
/// the state of a device that leaves (the loop does not wake it: it never
/// makes a system call for the planner).
pub const HANDOVER_TICK: Duration = Duration::from_millis(1);
/// How soon the planner asks again for keys it could not read.
pub const KEYS_RETRY: Duration = Duration::from_millis(100);

/// Why a control-panel record cannot be a device here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("Device {id}: {source}")]
    Kind {
        id: u32,
        #[source]
        source: dmfabric_devices::KindError,
    },
    #[error("Device {id}: {what}")]
    Range { id: u32, what: String },
}

/// The device of a control-panel record: its kind, first port and MMIO
/// ranges, and its lines (each kind's usual ones where it names none).
pub fn spec_of(d: &DeviceRecord) -> Result<DeviceSpec, RecordError> {
    let range = |what: String| RecordError::Range { id: d.id, what };
    let kind = DeviceKind::parse(&d.kind, &d.irqs).map_err(|source| RecordError::Kind { id: d.id, source })?;
    let pio = match d.ranges.iter().find(|r| !r.mmio) {
        Some(r) => Some((
            u16::try_from(r.base).map_err(|_| range(format!("port {:#x} is past 0xffff", r.base)))?,
            u16::try_from(r.len).map_err(|_| range(format!("{} ports is too many", r.len)))?,
        )),
        None => None,
    };
    let mmio = match d.ranges.iter().find(|r| r.mmio) {
        Some(r) => Some((r.base, u32::try_from(r.len).map_err(|_| range("MMIO range too long".into()))?)),
        None => None,
    };
    let shard = usize::try_from(d.shard).ok();
    Ok(DeviceSpec { id: d.id, pio, mmio, kind, vm: Some(d.vm), shard })
}

/// The devices of the control panel's records for server `server`, as specs.
pub fn specs_in(db: &Db, server: u16) -> Vec<Result<DeviceSpec, RecordError>> {
    db.devices.values().filter(|d| d.server == server).map(spec_of).collect()
}

/// Where the interrupt controllers of the VMs with `irqchip = remote` in
/// `db` are, for server `me`: the VMs whose I/O APIC (their device of kind
/// ioapic with the lowest id) is here, and the others' servers (id, MAC).
/// The lines of their devices drive those controllers instead of going to
/// their clients.
pub fn chip_places(db: &Db, me: u16) -> (Vec<u32>, HashMap<u32, (u16, MacAddr)>) {
    let (mut here, mut elsewhere) = (Vec::new(), HashMap::new());
    for vm in db.vms.values().filter(|v| v.irqchip == dmfabric_control::model::IrqChip::Remote) {
        // Devices are kept by id: the first is the lowest.
        let Some(chip) = db.devices.values().find(|d| d.vm == vm.id && d.kind == "ioapic") else { continue };
        if chip.server == me {
            here.push(vm.id);
        } else if let Some(mac) =
            db.servers.get(&chip.server).and_then(|s| dmfabric_control::routing::parse_mac(&s.mac))
        {
            elsewhere.insert(vm.id, (chip.server, mac));
        }
    }
    (here, elsewhere)
}

/// Where a planner finds a client platform's keys: the control panel's
/// key store (readable only by the servers that serve that client).
/// `Err` says why they could not be read (the client is left out, and the
/// next plan asks again).
pub type KeySource = Box<dyn FnMut(u16) -> Result<Option<KeyRing>, String> + Send>;

/// What changes for a server when the routing table moves on, worked out
/// and built off the data-plane core.
pub struct Plan {
    pub table: Arc<RoutingTable>,
    /// The devices served here (arriving ones included).
    pub here: HashSet<u32>,
    /// Which of them holds an address (requests that name no device).
    pub addresses: AddressMap,
    /// Devices placed here afresh, built.
    pub add: Vec<(DeviceSpec, Box<dyn Device>)>,
    /// Devices moving here from another server: their requests wait for the state.
    pub arriving: Vec<u32>,
    /// Devices that leave: moved to a server (their state goes there), or removed.
    pub leaving: Vec<(u32, Option<u16>)>,
    /// VMs now on another client platform: their interrupts go there.
    pub moves: Vec<VmMove>,
    /// The client platforms this server acts for now, with their keys.
    pub registry: Arc<Registry>,
    /// Each device served here and its VM (where its interrupts go).
    pub bound: Vec<(u32, Option<u32>)>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("revision", &self.table.revision)
            .field("add", &self.add.iter().map(|(s, _)| s.id).collect::<Vec<_>>())
            .field("arriving", &self.arriving)
            .field("leaving", &self.leaving)
            .finish()
    }
}

/// A moved device's state came (or did not come in time): its model, built.
pub struct Arrival {
    pub id: u32,
    pub spec: DeviceSpec,
    pub model: Box<dyn Device>,
    /// The answers of the server it left, for its streams.
    pub answers: Vec<StreamAnswer>,
    /// Built from the state it left with (not started fresh).
    pub restored: bool,
}

impl std::fmt::Debug for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arrival").field("id", &self.id).field("answers", &self.answers.len()).finish()
    }
}

/// A device that left this server, with what goes with it.
#[derive(Debug)]
pub struct Departure {
    pub id: u32,
    /// Where it went (None: removed).
    pub to: Option<u16>,
    pub state: DeviceState,
    pub answers: Vec<StreamAnswer>,
}

/// Where the planner and the data-plane loop meet. The loop looks at it
/// once per iteration with one atomic load when nothing is waiting.
#[derive(Debug, Default)]
pub struct PlacementLink {
    waiting: AtomicBool,
    plans: Mutex<Vec<Plan>>,
    arrivals: Mutex<Vec<Arrival>>,
    departures: Mutex<Vec<Departure>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PlacementLink {
    pub fn new() -> Arc<PlacementLink> {
        Arc::new(PlacementLink::default())
    }

    /// Plans and arrivals waiting for the loop, in order (cheap when none).
    pub fn take(&self) -> Option<(Vec<Plan>, Vec<Arrival>)> {
        if !self.waiting.swap(false, Ordering::AcqRel) {
            return None;
        }
        // Plans first: an arrival never comes before the plan that expects it.
        let plans = std::mem::take(&mut *lock(&self.plans));
        let arrivals = std::mem::take(&mut *lock(&self.arrivals));
        Some((plans, arrivals))
    }

    /// The loop let a device go.
    pub fn depart(&self, d: Departure) {
        lock(&self.departures).push(d);
    }

    fn publish_plan(&self, plan: Plan) {
        lock(&self.plans).push(plan);
        self.waiting.store(true, Ordering::Release);
    }

    fn publish_arrival(&self, a: Arrival) {
        lock(&self.arrivals).push(a);
        self.waiting.store(true, Ordering::Release);
    }
}

/// What travels with a device model from one server to the next, through the store.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Handoff {
    device: u32,
    /// The server it left.
    from: u16,
    state: DeviceState,
    /// The streams whose latest request this device served.
    streams: Vec<HandoffStream>,
}

/// One stream's latest request and its completion, as it travels.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct HandoffStream {
    client: u16,
    key: StreamKey,
    last: u64,
    /// The completion as a frame (unsealed: the store seals the whole blob).
    completion: Vec<u8>,
}

/// The store key of device `id`'s state in transit.
fn state_key(id: u32) -> String {
    format!("device/{id}")
}

/// The planner of a placed server: runs on its store watch's thread.
pub struct Planner {
    server: u16,
    mac: MacAddr,
    routes: Arc<LiveRoutes>,
    env: DeviceEnv,
    link: Arc<PlacementLink>,
    /// The table the last plan came from.
    planned: Option<Arc<RoutingTable>>,
    /// What the loop serves after the plans sent so far.
    served: HashMap<u32, DeviceSpec>,
    /// Devices waiting for their state: since when.
    awaiting: HashMap<u32, Instant>,
    /// Devices leaving whose state the loop has not handed over yet: since when.
    handing: HashMap<u32, Instant>,
    keys: KeySource,
    /// Each client platform's keys as last read: kept while a read fails
    /// (etcd just back, a connection not yet up again).
    known_keys: HashMap<u16, KeyRing>,
    /// A keys read failed: plan again soon, even without a new table.
    keys_retry: bool,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner").field("server", &self.server).field("served", &self.served.len()).finish()
    }
}

impl Planner {
    /// The planner of server `server` (at `mac`) following `routes`; its
    /// first plan (the devices placed here now) is ready for the loop at once.
    pub fn new(
        server: u16,
        mac: MacAddr,
        routes: Arc<LiveRoutes>,
        env: DeviceEnv,
        link: Arc<PlacementLink>,
        keys: KeySource,
    ) -> Planner {
        let mut p = Planner {
            server,
            mac,
            routes,
            env,
            link,
            planned: None,
            served: HashMap::new(),
            awaiting: HashMap::new(),
            handing: HashMap::new(),
            keys,
            known_keys: HashMap::new(),
            keys_retry: false,
        };
        p.plan();
        p
    }

    /// The link to give the loop.
    pub fn link(&self) -> Arc<PlacementLink> {
        self.link.clone()
    }

    /// One step: plan a new table, write what left, look for states of
    /// what arrives. The watch runs it after each change the store pushes
    /// ([`Planner::chores`]), and again as soon as the step asks: within
    /// [`HANDOVER_TICK`] while the loop is about to hand over a state,
    /// within [`KEYS_RETRY`] after a keys read failed (the keys it had
    /// are kept meanwhile), soon while states are awaited (a push brings them sooner; an
    /// awaited state has a deadline).
    pub fn step(&mut self, store: &dyn Store) -> Result<Option<Duration>, StoreError> {
        self.plan();
        self.send_departures(store)?;
        self.look_for_states(store)?;
        let now = Instant::now();
        self.handing.retain(|dev, since| {
            let late = now.duration_since(*since) > STATE_WAIT;
            if late {
                tracing::warn!(
                    server = self.server,
                    device = dev,
                    "the loop did not hand over the state of a device that left within {STATE_WAIT:?}"
                );
            }
            !late
        });
        Ok(if !self.handing.is_empty() || !lock(&self.link.departures).is_empty() {
            Some(HANDOVER_TICK)
        } else if self.keys_retry {
            Some(KEYS_RETRY)
        } else if !self.awaiting.is_empty() {
            Some(STATE_WAIT)
        } else {
            None
        })
    }

    /// [`Planner::step`] as a store watch's chores.
    pub fn chores(mut self) -> Chores {
        Box::new(move |store: &dyn Store| self.step(store))
    }

    /// If the table moved on: what changes here, built, for the loop
    /// (part of [`Planner::step`]).
    pub fn plan(&mut self) {
        if !self.keys_retry && self.planned.as_ref().is_some_and(|t| t.revision == self.routes.revision()) {
            return;
        }
        self.keys_retry = false;
        let table = self.routes.load();
        let id = self.server;
        let now = Instant::now();
        let mut mine: HashMap<u32, DeviceSpec> = HashMap::new();
        for spec in specs_in(&table.db, id) {
            match spec {
                Ok(s) => {
                    mine.insert(s.id, s);
                }
                Err(e) => tracing::warn!(server = id, "{e}: not served"),
            }
        }
        let mut leaving = Vec::new();
        for dev in self.served.keys().copied().collect::<Vec<_>>() {
            if mine.contains_key(&dev) {
                continue;
            }
            self.served.remove(&dev);
            self.awaiting.remove(&dev);
            self.handing.insert(dev, now);
            let to = table.placement(dev).map(|p| p.server);
            match to {
                Some(to) => tracing::info!(server = id, device = dev, to, "device moves away"),
                None => tracing::info!(server = id, device = dev, "device removed"),
            }
            leaving.push((dev, to));
        }
        let (mut add, mut arriving) = (Vec::new(), Vec::new());
        for (dev, spec) in &mine {
            if self.served.contains_key(dev) {
                continue;
            }
            // Before it is built: fresh here, or when its state comes.
            if let Some(image) = table.db.devices.get(dev).and_then(|d| d.image.as_ref()) {
                self.set_image(*dev, image);
            }
            let from = self.planned.as_ref().and_then(|t| t.placement(*dev)).map(|p| p.server).filter(|s| *s != id);
            match from {
                Some(from) => {
                    tracing::info!(server = id, device = dev, from, "device moves here: waiting for its state");
                    arriving.push(*dev);
                    self.awaiting.insert(*dev, now);
                }
                None => {
                    tracing::info!(server = id, device = dev, kind = spec.kind.name(), vm = spec.vm, "device added");
                    add.push((spec.clone(), self.env.build(spec, now)));
                }
            }
            self.served.insert(*dev, spec.clone());
        }
        let moves = self.moves(&table);
        let specs: Vec<DeviceSpec> = self.served.values().cloned().collect();
        let here = self.served.keys().copied().collect();
        let (chips_here, chips_elsewhere) = chip_places(&table.db, id);
        self.env.pins.set_chips(&chips_here);
        let registry = Arc::new(self.registry(&table).with_chips(chips_elsewhere));
        let bound = specs.iter().map(|s| (s.id, s.vm)).collect();
        tracing::debug!(
            server = id,
            revision = table.revision,
            served = specs.len(),
            clients = registry.clients().len(),
            "placement planned"
        );
        self.planned = Some(table.clone());
        self.link.publish_plan(Plan {
            table,
            here,
            addresses: AddressMap::new(&specs),
            add,
            arriving,
            leaving,
            moves,
            registry,
            bound,
        });
    }

    /// Give block device `dev` its image before its model is built, and
    /// say (one line: device, path, server) if it does not open here. It
    /// is set either way: the device runs as an empty drive (and
    /// [`crate::env::Images::failed`] counts it) until it is placed again.
    fn set_image(&self, dev: u32, image: &BlockImage) {
        let spec = ImageSpec { path: image.path.clone().into(), read_only: image.read_only };
        if let Err(e) = spec.open() {
            tracing::error!(
                server = self.server,
                device = dev,
                path = %image.path,
                "server {} cannot open the image of device {dev}, which runs as an empty drive: {e} (a device that moves between servers needs its image on storage they share, at the same path)",
                self.server
            );
        }
        self.env.images.set(dev, spec);
    }

    /// The client platforms this server acts for: those with a VM (running
    /// there or migrating there) that has a device here or names this
    /// server its owner; each with its keys, registered MAC and VMs.
    fn registry(&mut self, table: &RoutingTable) -> Registry {
        let db = &table.db;
        let me = self.server;
        let served_vm = |vm: u32| {
            db.vms.get(&vm).is_some_and(|v| v.owner == Some(me))
                || db.devices.values().any(|d| d.vm == vm && d.server == me)
        };
        let mut clients = Vec::new();
        for c in db.clients.values() {
            let vms: Vec<(u32, u16)> = db
                .vms
                .values()
                .filter(|v| v.client == c.id || v.migrate_to == Some(c.id))
                .map(|v| (v.id, v.vcpus))
                .collect();
            if !vms.iter().any(|&(vm, _)| served_vm(vm)) {
                continue;
            }
            let Some(mac) = table.client_mac(c.id) else { continue };
            let keys = match (self.keys)(c.id) {
                Ok(Some(keys)) => {
                    self.known_keys.insert(c.id, keys.clone());
                    keys
                }
                Ok(None) => {
                    self.known_keys.remove(&c.id);
                    tracing::warn!(server = me, client = c.id, "client platform has no key in the control panel: its frames are refused (`dmfabric ctl client rekey {}`)", c.id);
                    continue;
                }
                Err(e) => {
                    self.keys_retry = true;
                    match self.known_keys.get(&c.id) {
                        Some(keys) => {
                            tracing::warn!(
                                server = me,
                                client = c.id,
                                "cannot read the client platform's keys ({e}): keeping the ones it had, asking again"
                            );
                            keys.clone()
                        }
                        None => {
                            tracing::warn!(
                                server = me,
                                client = c.id,
                                "cannot read the client platform's keys ({e}): its frames are refused until they can be read (asking again)"
                            );
                            continue;
                        }
                    }
                }
            };
            clients.push(Client { id: c.id, mac, hypervisor: c.hypervisor, keys, vms });
        }
        let servers = db
            .servers
            .values()
            .filter(|s| s.id != me)
            .filter_map(|s| Some((s.id, dmfabric_control::routing::parse_mac(&s.mac)?)))
            .collect();
        let runs_on = db.vms.values().map(|v| (v.id, v.client)).collect();
        Registry::new(clients, servers, runs_on)
    }

    /// VMs whose client platform changed since the last plan.
    fn moves(&self, table: &RoutingTable) -> Vec<VmMove> {
        let Some(old) = &self.planned else { return Vec::new() };
        let mut out = Vec::new();
        for vm in table.db.vms.values() {
            let before = old.client_of(vm.id);
            if before.is_none_or(|c| c == vm.client) {
                continue;
            }
            let (Some(mac), Some(rec)) = (table.client_mac(vm.client), table.db.clients.get(&vm.client)) else {
                continue;
            };
            tracing::info!(server = self.server, vm = vm.id, client = vm.client, "VM moved: its interrupts follow");
            out.push(VmMove { vm: vm.id, client: vm.client, hypervisor: rec.hypervisor, mac });
        }
        out
    }

    /// Write the states of devices that left to the store (what the store
    /// refuses stays for the next step).
    fn send_departures(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        let mut pending = std::mem::take(&mut *lock(&self.link.departures)).into_iter();
        while let Some(d) = pending.next() {
            self.handing.remove(&d.id);
            let Some(to) = d.to else {
                tracing::info!(server = self.server, device = d.id, "device removed: its state is dropped");
                continue;
            };
            let streams = self.frames(&d.answers);
            let handoff = Handoff { device: d.id, from: self.server, state: d.state, streams };
            let blob = serde_json::to_vec(&handoff).unwrap_or_default();
            if let Err(e) = store.put_state(&state_key(d.id), &blob) {
                let back = Departure { id: d.id, to: d.to, state: handoff.state, answers: d.answers };
                let mut queue = lock(&self.link.departures);
                let later = std::mem::take(&mut *queue);
                queue.extend(std::iter::once(back).chain(pending).chain(later));
                return Err(e);
            }
            tracing::info!(server = self.server, device = d.id, to, bytes = blob.len(), "device state handed over");
        }
        Ok(())
    }

    /// Completions as frames (what a Handoff carries).
    fn frames(&self, answers: &[StreamAnswer]) -> Vec<HandoffStream> {
        answers
            .iter()
            .filter_map(|a| {
                let repr =
                    FrameRepr::new(EthernetRepr { dst: self.mac, src: self.mac }, Message::IoCompletion(a.answer));
                let mut buf = vec![0u8; repr.buffer_len()];
                repr.emit(&mut buf).ok()?;
                Some(HandoffStream { client: a.client, key: a.key, last: a.last, completion: buf })
            })
            .collect()
    }

    /// Take the states of arriving devices from the store and build them;
    /// a device that waited too long starts fresh.
    fn look_for_states(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        let now = Instant::now();
        for (dev, since) in self.awaiting.clone() {
            let Some(spec) = self.served.get(&dev).cloned() else {
                self.awaiting.remove(&dev);
                continue;
            };
            let arrival = match store.take_state(&state_key(dev))? {
                Some(blob) => self.restore(&spec, &blob, now),
                None if now.duration_since(since) > STATE_WAIT => {
                    tracing::warn!(
                        server = self.server,
                        device = dev,
                        "no saved state within {STATE_WAIT:?}: starting it fresh"
                    );
                    Arrival { id: dev, model: self.env.build(&spec, now), spec, answers: Vec::new(), restored: false }
                }
                None => continue,
            };
            self.awaiting.remove(&dev);
            self.link.publish_arrival(arrival);
        }
        Ok(())
    }

    fn restore(&self, spec: &DeviceSpec, blob: &[u8], now: Instant) -> Arrival {
        let id = spec.id;
        let restored = serde_json::from_slice::<Handoff>(blob).map_err(|e| e.to_string()).and_then(|h| {
            let model = self.env.restore(spec, h.state, now).map_err(|e| e.to_string())?;
            let answers = h
                .streams
                .iter()
                .filter_map(|st| match FrameRepr::parse_bytes(&st.completion) {
                    Ok(FrameRepr { msg: Message::IoCompletion(answer), .. }) => {
                        Some(StreamAnswer { client: st.client, key: st.key, last: st.last, answer })
                    }
                    _ => None,
                })
                .collect();
            Ok((model, answers, h.from))
        });
        match restored {
            Ok((model, answers, from)) => {
                tracing::info!(server = self.server, device = id, from, "device arrived with its state");
                Arrival { id, spec: spec.clone(), model, answers, restored: true }
            }
            Err(e) => {
                tracing::warn!(
                    server = self.server,
                    device = id,
                    "its saved state is unusable ({e}): starting it fresh"
                );
                Arrival {
                    id,
                    spec: spec.clone(),
                    model: self.env.build(spec, now),
                    answers: Vec::new(),
                    restored: false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_control::model::{Change, Device as Record, IrqChip, Range};

    #[test]
    fn a_remote_irqchip_vms_controller_is_here_or_on_the_server_holding_its_io_apic() {
        // VM 7 (client 3) with an I/O APIC on server 10; servers 10 and 11.
        let mut db = dmfabric_testkit::fixtures::owner_and_io_server();
        let ioapic = |id: u32, server: u16| Record {
            id,
            kind: "ioapic".into(),
            server,
            shard: 0,
            vm: 7,
            ranges: vec![Range { mmio: true, base: 0xfec0_0000 + u64::from(id) * 0x1000, len: 0x1000 }],
            irqs: vec![],
            image: None,
        };
        db.apply(&[Change::AddDevice(ioapic(20, 10)), Change::AddDevice(ioapic(30, 11))]).unwrap();
        // Kernel irqchip (the default): its lines go to its client.
        assert_eq!(chip_places(&db, 10), (vec![], HashMap::new()));
        let remote = dmfabric_control::model::Vm { irqchip: IrqChip::Remote, ..db.vms[&7].clone() };
        db.apply(&[Change::UpdateVm(remote)]).unwrap();
        let mac = MacAddr([2, 0, 0, 0, 0, 0x0a]);
        assert_eq!(chip_places(&db, 10), (vec![7], HashMap::new()), "the lowest id is its I/O APIC");
        assert_eq!(chip_places(&db, 11), (vec![], [(7, (10, mac))].into()));
    }
}
