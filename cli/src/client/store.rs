//! `dmfabric client --store`: a client platform placed by the control
//! panel — its VMs come from the store, and a control follows the store
//! while they run (launch, suspend, resume, shutdown, migration, device
//! maps), starting the VMs launched or migrated here later.

use super::*;

/// The run of a client platform placed by the control panel: the VMs the
/// store gives it now (those defined, running or suspended there), and
/// the control that follows the store while they run — and starts the VMs
/// launched or migrated here later.
pub(super) fn store_plan(spec: &str, args: &ClientArgs) -> anyhow::Result<(Plan, Arc<StoreControl>)> {
    let Some(me) = args.client_id else { bail!("--store needs --client-id (this client platform's id in the store)") };
    let Some(iface) = args.iface.clone() else { bail!("--store needs --iface (the data-plane interface)") };
    let store = dmfabric_control::store::open(spec)?;
    let db = store.load()?;
    let Some(record) = db.clients.get(&me) else {
        bail!("client platform {me} is not in the store ({spec}): add it with `dmfabric ctl --store {spec} add client --id {me} --mac <its MAC>`");
    };
    let mac = dmfabric_dataplane::if_mac(&iface).with_context(|| format!("Cannot read the MAC of {iface}"))?;
    if dmfabric_control::routing::parse_mac(&record.mac) != Some(mac) {
        bail!(
            "the store has client platform {me} at MAC {}, but {iface}'s is {mac}: servers would answer elsewhere",
            record.mac
        );
    }
    let mine: Vec<&dmfabric_control::model::Vm> =
        db.vms.values().filter(|v| v.client == me && StoreControl::runs_here(v)).collect();
    let incoming = db.vms.values().any(|v| v.migrate_to == Some(me));
    if mine.is_empty() && !incoming {
        bail!("the store has no VM for client platform {me} (add one: dmfabric ctl add vm --client {me} ...)");
    }
    let Some(keys) = store.client_keys(me)? else {
        bail!("client platform {me} has no key in the store ({spec}): make one with `dmfabric ctl --store {spec} client rekey {me}`");
    };
    let ring = keys.ring()?;
    let file = FileConfig {
        client: me,
        key_file: None,
        hypervisor: record.hypervisor,
        run_seconds: args.seconds.unwrap_or(86_400.0),
        timeout_ms: args.timeout_ms,
        retries: args.retries,
        metrics: None,
        link: LinkConfig { iface: Some(iface), ..LinkConfig::default() },
        vm: mine.iter().map(|v| vm_config(&db, v)).collect(),
    };
    let mut plan = plan_vms(file, None, args.seconds.or(Some(86_400.0)), true, Some(ring))?;
    if db.servers.is_empty() {
        bail!("the store has no server: add one (dmfabric ctl add server ...) first");
    }
    // Sessions now with the servers of the VMs it runs (or that migrate
    // here); with any other server when a device there is first used: a
    // server serves this platform (has its key) only once one of its VMs
    // has a device there.
    let needed: BTreeSet<u16> = db
        .vms
        .values()
        .filter(|v| (v.client == me && StoreControl::runs_here(v)) || v.migrate_to == Some(me))
        .flat_map(|v| vm_ranges(&db, v).into_iter().flat_map(|(_, _, _, r)| [r.server, r.runs_on]))
        .collect();
    plan.client.servers = needed.into_iter().collect();
    plan.client.open_on_demand = true;
    // Told of commits, and of VM states put in transit (a migration here).
    let follow = dmfabric_control::watch::Follow::new(format!("dmfabric client {me}"), Duration::from_millis(50))
        .with_states("vm/");
    let watch = dmfabric_control::watch::Watch::start_with(dmfabric_control::store::open(spec)?, follow, |_| None)?;
    let (tx, changes) = crossbeam_channel::unbounded();
    let swapped = tx.clone();
    watch.on_swap(Box::new(move |_| {
        let _ = swapped.send(());
    }));
    let pokes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let poked = pokes.clone();
    watch.on_poke(Box::new(move || {
        poked.fetch_add(1, std::sync::atomic::Ordering::Release);
        let _ = tx.send(());
    }));
    let control = StoreControl {
        me,
        watch,
        changes,
        pokes,
        store,
        maps: Mutex::new(Vec::new()),
        seen: Mutex::new(0),
        started: Mutex::new(mine.iter().map(|v| v.id).collect()),
        arrivals: Mutex::new(Arrivals::default()),
        arrival_wait: Duration::from_secs_f64(args.arrival_s),
        failed: Mutex::new(Vec::new()),
        keys: Mutex::new(keys),
        keys_revision: Mutex::new(0),
    };
    *control.keys_revision.lock().unwrap_or_else(|e| e.into_inner()) = control.watch.routes().revision();
    *control.seen.lock().unwrap_or_else(|e| e.into_inner()) = control.watch.routes().revision();
    for (s, v) in plan.vms.iter().zip(&mine) {
        control.follow(s, vm_ranges(&db, v));
    }
    Ok((plan, Arc::new(control)))
}

/// VM `v` of `db` as a client config entry: its test guest and arguments,
/// its devices' ranges mapped to its owner server (or each device's own).
fn vm_config(db: &dmfabric_control::model::Db, v: &dmfabric_control::model::Vm) -> VmConfig {
    let mut a = [0u64; 3];
    for (slot, arg) in a.iter_mut().zip(&v.args) {
        *slot = *arg;
    }
    let device = vm_ranges(db, v)
        .into_iter()
        .map(|(space, base, len, r)| RangeConfig {
            space: if space == Space::Mmio { "mmio".into() } else { "pio".into() },
            base,
            len,
            server: Some(r.server),
            device: Some(r.device),
            runs_on: Some(r.runs_on),
            irq: (0..32).filter(|&l| r.may_raise(l)).collect(),
            reset: r.reset,
            local: None,
            image: None,
            read_only: false,
            virtio: db.devices.get(&r.device).is_some_and(|d| d.kind == "virtio-blk"),
            msi: db.devices.get(&r.device).is_some_and(|d| d.kind == "ioapic"),
        })
        .collect();
    VmConfig {
        id: v.id,
        vcpus: v.vcpus,
        memory_mib: v.memory_mib as usize,
        guest: Some(v.image.clone()),
        kernel: None,
        initrd: None,
        cmdline: None,
        pc: None,
        pc_server: 1,
        console_log: None,
        irqchip: (v.irqchip == dmfabric_control::model::IrqChip::Remote).then(|| "remote".to_string()),
        args: a,
        vcpu_args: None,
        device,
    }
}

/// A VM's remote ranges: (space, base, length, the device: the server its
/// requests go to — its owner, or the device's own —, the server that runs
/// it, its lines and whether it may reset the VM).
type RemoteRanges = Vec<(Space, u64, u64, Remote)>;

/// The remote ranges of VM `v` in `db`.
fn vm_ranges(db: &dmfabric_control::model::Db, v: &dmfabric_control::model::Vm) -> RemoteRanges {
    let mut out = Vec::new();
    for d in db.devices.values().filter(|d| d.vm == v.id) {
        let mut remote = Remote::new(v.owner.unwrap_or(d.server), d.id).runs_on(d.server);
        if let Ok(kind) = dmfabric_devices::DeviceKind::parse(&d.kind, &d.irqs) {
            remote = remote.lines(&kind.lines());
            if kind.may_reset() {
                remote = remote.resets();
            }
            if kind == dmfabric_devices::DeviceKind::IoApic {
                remote = remote.msis();
            }
        }
        for r in &d.ranges {
            let space = if r.mmio { Space::Mmio } else { Space::Pio };
            out.push((space, r.base, r.len, remote));
        }
    }
    out
}

/// A VM's live device map, and the ranges it was last built from.
struct VmMap {
    vm: u32,
    live: Arc<LiveMap>,
    ranges: RemoteRanges,
}

/// VMs migrating here whose state is awaited: since when.
#[derive(Default)]
struct Arrivals {
    waiting: std::collections::BTreeMap<u32, std::time::Instant>,
    /// When the store was last asked for their states.
    asked: Option<std::time::Instant>,
    /// The store's pushes counted then.
    asked_pokes: u64,
    /// The table revision last scanned for launches and migrations.
    scanned: u64,
}
/// The control panel's wishes for the VMs of a client platform, read from
/// its store watch's tables.
pub(super) struct StoreControl {
    me: u16,
    watch: dmfabric_control::watch::Watch,
    /// For VM states in transit (migrations out and in) and recording arrivals.
    store: Box<dyn dmfabric_control::store::Store>,
    maps: Mutex<Vec<VmMap>>,
    /// The table revision the maps were last built from.
    seen: Mutex<u64>,
    /// VMs started here (at the start or since), and not migrated away.
    started: Mutex<BTreeSet<u32>>,
    arrivals: Mutex<Arrivals>,
    /// How long a migrating VM's state may take to arrive.
    arrival_wait: Duration,
    /// VMs that could not start here, and why.
    failed: Mutex<Vec<String>>,
    /// This client platform's keys as last read from the store, and the
    /// revision they were read at.
    keys: Mutex<dmfabric_control::keys::ClientKeys>,
    keys_revision: Mutex<u64>,
    /// A message on each revision the watch swaps in and each change the
    /// store pushes (the supervisor wakes).
    changes: crossbeam_channel::Receiver<()>,
    /// Changes the store pushed (a state put in transit among them).
    pokes: Arc<std::sync::atomic::AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StoreControl {
    /// Whether a VM of this platform in this state has a place in its run.
    fn runs_here(v: &dmfabric_control::model::Vm) -> bool {
        use dmfabric_control::model::VmState;
        matches!(v.state, VmState::Defined | VmState::Running | VmState::Suspended)
    }

    /// Replace `spec`'s map when the control panel's changes do.
    fn follow(&self, spec: &VmSpec, ranges: RemoteRanges) {
        lock(&self.maps).push(VmMap { vm: spec.id, live: spec.map.clone(), ranges });
    }

    /// Rebuild the VMs' device maps when the table moved on (devices
    /// added, removed or moved reach the running guests).
    fn refresh_maps(&self, t: &dmfabric_control::routing::RoutingTable) {
        let mut seen = lock(&self.seen);
        if *seen == t.revision {
            return;
        }
        *seen = t.revision;
        for m in lock(&self.maps).iter_mut() {
            let Some(v) = t.db.vms.get(&m.vm) else { continue };
            let ranges = vm_ranges(&t.db, v);
            if m.ranges == ranges {
                continue;
            }
            let targets: Vec<(Space, u64, u64, Target)> =
                ranges.iter().map(|&(s, b, l, r)| (s, b, l, Target::Remote(r))).collect();
            match machine::test_guest_map(&targets) {
                Ok(map) => {
                    eprintln!(
                        "dmfabric client: VM {}: device map of revision {} ({} ranges)",
                        m.vm,
                        t.revision,
                        ranges.len()
                    );
                    m.live.store(Arc::new(map));
                    m.ranges = ranges;
                }
                Err(e) => {
                    eprintln!("dmfabric client: VM {}: revision {}'s device map is unusable: {e}", m.vm, t.revision)
                }
            }
        }
    }

    /// The spec of VM `v` of `db` joining this run.
    fn spec_for(&self, db: &dmfabric_control::model::Db, v: &dmfabric_control::model::Vm) -> anyhow::Result<VmSpec> {
        // Its servers are reached on demand (sessions open at first use).
        let spec = vm_spec(&vm_config(db, v), &mut BTreeSet::new())?;
        self.follow(&spec, vm_ranges(db, v));
        Ok(spec)
    }

    /// VMs that could not start here, a line each.
    pub(super) fn failures(&self) -> Vec<String> {
        lock(&self.failed).clone()
    }

    /// VM `vm` could not start here: said, kept for the report, and taken
    /// as dealt with (the run does not wait for it: [`StoreControl::pending`]).
    fn fail(&self, vm: u32, why: String) {
        lock(&self.started).insert(vm);
        let line = format!("VM {vm} could not start here: {why}");
        eprintln!("dmfabric client: {line}");
        lock(&self.failed).push(line);
    }

    /// VMs migrating to this platform, whose state arrived: their specs,
    /// restored, recorded as running here.
    fn migrated_in(&self, t: &dmfabric_control::routing::RoutingTable, arr: &mut Arrivals) -> Vec<VmSpec> {
        let now = std::time::Instant::now();
        // Asked at once when the store pushed a change since the last ask
        // (the state may be in), else as often as next_look says.
        let pokes = self.pokes.load(std::sync::atomic::Ordering::Acquire);
        let every = Duration::from_millis(if self.watch.pushed() { 250 } else { 20 });
        let recent = arr.asked.is_some_and(|a| now.duration_since(a) < every);
        if arr.waiting.is_empty() || (recent && pokes == arr.asked_pokes) {
            return Vec::new();
        }
        arr.asked = Some(now);
        arr.asked_pokes = pokes;
        let mut out = Vec::new();
        for (vm, since) in arr.waiting.clone() {
            let Some(v) = t.db.vms.get(&vm).filter(|v| v.migrate_to == Some(self.me)) else {
                arr.waiting.remove(&vm);
                continue;
            };
            let bytes = match self.store.take_state(&format!("vm/{vm}")) {
                Ok(Some(b)) => b,
                Ok(None) if now.duration_since(since) > self.arrival_wait => {
                    arr.waiting.remove(&vm);
                    let why = format!(
                        "its state did not arrive within {:?}: is client platform {} running it?",
                        self.arrival_wait, v.client
                    );
                    self.fail(vm, why);
                    continue;
                }
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("dmfabric client: VM {vm}: {e}; asking again");
                    continue;
                }
            };
            arr.waiting.remove(&vm);
            let max_mem = (v.memory_mib as usize) << 20;
            let snap = match dmfabric_vmm_shim::migrate::VmSnapshot::decode(&bytes, max_mem) {
                Ok(s) => s,
                Err(e) => {
                    self.fail(vm, e.to_string());
                    continue;
                }
            };
            tracing::info!("VM {vm}: state arrived ({} KiB)", bytes.len() / 1024);
            let mut spec = match self.spec_for(&t.db, v) {
                Ok(s) => s,
                Err(e) => {
                    self.fail(vm, format!("{e:#}"));
                    continue;
                }
            };
            spec.boot = machine::Boot::Restore(Box::new(snap));
            use dmfabric_control::model::{Change, Vm, VmState};
            let here = Vm { client: self.me, state: VmState::Running, migrate_to: None, ..v.clone() };
            if let Err(e) = self.store.commit(&[Change::UpdateVm(here)]) {
                self.fail(vm, format!("cannot record it as running here: {e}"));
                continue;
            }
            lock(&self.started).insert(vm);
            out.push(spec);
        }
        out
    }
}

impl machine::VmControl for StoreControl {
    fn desired(&self, vm: u32) -> machine::Desired {
        use dmfabric_control::model::VmState;
        use machine::Desired;
        let t = self.watch.routes().load();
        self.refresh_maps(&t);
        let Some(v) = t.db.vms.get(&vm) else {
            lock(&self.started).remove(&vm);
            return Desired::End("removed from the control panel".into());
        };
        if v.state == VmState::Migrating {
            return match v.migrate_to {
                Some(to) if to == self.me => Desired::Run,
                Some(_) if v.client == self.me => Desired::MigrateOut,
                _ => Desired::End(format!("taken over by client platform {}", v.client)),
            };
        }
        if v.client != self.me {
            return Desired::End(format!("now runs on client platform {}", v.client));
        }
        match v.state {
            VmState::Running | VmState::Migrating => Desired::Run,
            VmState::Defined | VmState::Suspended => Desired::Hold,
            VmState::Stopped => {
                // Launched again later, it starts afresh.
                lock(&self.started).remove(&vm);
                Desired::End("shut down by the control panel".into())
            }
        }
    }

    fn migrated_out(&self, vm: u32, snapshot: &[u8]) -> Result<String, machine::ControlError> {
        let t = self.watch.routes().load();
        let to = t.db.vms.get(&vm).and_then(|v| v.migrate_to).ok_or(machine::ControlError::CalledOff)?;
        self.store.put_state(&format!("vm/{vm}"), snapshot).map_err(|e| machine::ControlError::Store(Box::new(e)))?;
        lock(&self.started).remove(&vm);
        Ok(format!("client platform {to}"))
    }

    /// Launched VMs not started here yet, and migrated ones whose state
    /// arrived. The table is scanned when it changes; states in transit
    /// are asked for when the store pushes a change (or, while it cannot,
    /// every 20 ms while some are awaited).
    fn arrivals(&self) -> Vec<VmSpec> {
        use dmfabric_control::model::VmState;
        let t = self.watch.routes().load();
        let mut arr = lock(&self.arrivals);
        let mut out = Vec::new();
        if arr.scanned != t.revision {
            arr.scanned = t.revision;
            let now = std::time::Instant::now();
            for v in t.db.vms.values() {
                if lock(&self.started).contains(&v.id) {
                    continue;
                }
                if v.state == VmState::Migrating && v.migrate_to == Some(self.me) {
                    arr.waiting.entry(v.id).or_insert_with(|| {
                        eprintln!(
                            "dmfabric client: VM {} migrates here from client platform {}: waiting for its state",
                            v.id, v.client
                        );
                        now
                    });
                } else if v.client == self.me && v.state == VmState::Running {
                    match self.spec_for(&t.db, v) {
                        Ok(spec) => {
                            lock(&self.started).insert(v.id);
                            out.push(spec);
                        }
                        Err(e) => {
                            lock(&self.started).insert(v.id);
                            self.fail(v.id, format!("{e:#}"));
                        }
                    }
                }
            }
        }
        out.extend(self.migrated_in(&t, &mut arr));
        out
    }

    /// A migration on its way, or a VM the table already has running here
    /// (launched, or arrived) that the run has not picked up yet: the
    /// swap that brought it wakes the supervisor, which must not end first.
    fn pending(&self) -> bool {
        use dmfabric_control::model::VmState;
        if !lock(&self.arrivals).waiting.is_empty() {
            return true;
        }
        let t = self.watch.routes().load();
        let started = lock(&self.started);
        t.db.vms.values().any(|v| {
            !started.contains(&v.id)
                && ((v.client == self.me && v.state == VmState::Running)
                    || (v.state == VmState::Migrating && v.migrate_to == Some(self.me)))
        })
    }

    /// A rekey bumps the store's revision: read the keys again then (and
    /// only then: each read opens the store).
    fn keys(&self) -> Option<KeyRing> {
        let revision = self.watch.routes().revision();
        {
            let mut seen = lock(&self.keys_revision);
            if *seen == revision {
                return None;
            }
            *seen = revision;
        }
        let fresh = match self.store.client_keys(self.me) {
            Ok(Some(k)) => k,
            Ok(None) => return None,
            Err(e) => {
                eprintln!("dmfabric client: cannot read this platform's keys ({e}); keeping the ones in use");
                return None;
            }
        };
        let mut keys = lock(&self.keys);
        if *keys == fresh {
            return None;
        }
        let ring = fresh.ring().ok()?;
        *keys = fresh;
        Some(ring)
    }

    fn changes(&self) -> Option<crossbeam_channel::Receiver<()>> {
        Some(self.changes.clone())
    }

    /// While a migrating VM's state is awaited: every 20 ms if the store
    /// does not push its changes, else every 250 ms in case a push was lost
    /// (the push of the state put wakes it at once).
    fn next_look(&self) -> Option<std::time::Instant> {
        let arr = lock(&self.arrivals);
        let every = Duration::from_millis(if self.watch.pushed() { 250 } else { 20 });
        (!arr.waiting.is_empty()).then(|| arr.asked.map_or_else(std::time::Instant::now, |a| a + every))
    }
}
