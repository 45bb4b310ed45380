//! Running VMs: several VMs in one client process, each vCPU on its own
//! thread, remote devices over one shared [`ClientPort`], interrupts
//! delivered by whoever holds the transport, and a supervisor that stops
//! everything on a timeout, on request (Ctrl-C) or when a vCPU fails.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmfabric_dataplane::Transport;
use dmfabric_devices::Device;
use hdrhistogram::Histogram;

use crate::devmap::{DeviceMap, Target};
use crate::exits::{AccessTimes, DeviceCount, ExitStats, LiveMap, NoRemote, RemoteAccess, Router};
use crate::kvm::{Exit, Kick, KvmError, RunStats, Vcpu, Vm};
use crate::linux::{self, LinuxError, LinuxImage};
use crate::local::IrqTarget;
use crate::migrate::VmSnapshot;
use crate::remote::{ClientConfig, ClientPort, ClientStats, IrqSink, RemoteError, VcpuRemote, VmEntry, VmRemoteStats};

/// One VM to run.
pub struct VmSpec {
    pub id: u32,
    pub vcpus: u16,
    pub mem_bytes: usize,
    /// Flat image loaded at `entry`.
    pub image: Vec<u8>,
    pub entry: u64,
    /// rdi, rsi, rdx of each vCPU (the last entry serves the rest).
    pub args: Vec<[u64; 3]>,
    pub map: DeviceMap<Target>,
    /// Device models kept in the client process, by `Target::Local` index.
    pub local: Vec<Mutex<Box<dyn Device>>>,
    /// Boot this Linux kernel instead of `image` (vCPU 0 enters it, the
    /// others wait for its INIT/SIPI).
    pub linux: Option<LinuxImage>,
    /// Where local models' interrupt lines go (set when the VM exists).
    pub irq_target: IrqTarget,
    /// Set by a local i8042's reset pulse: the VM stops, reset.
    pub reset: Arc<AtomicBool>,
    /// A 16550's base port whose output to keep the end of, for reports
    /// of a VM that stops (Linux VMs: COM1).
    pub console_port: Option<u64>,
    /// Start from this state (a VM migrated here) instead of the image.
    pub restore: Option<VmSnapshot>,
    /// Route by this map instead of `map`: the control panel replaces it
    /// while the VM runs.
    pub live_map: Option<Arc<LiveMap>>,
}

impl std::fmt::Debug for VmSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSpec")
            .field("id", &self.id)
            .field("vcpus", &self.vcpus)
            .field("mem_bytes", &self.mem_bytes)
            .field("image_bytes", &self.image.len())
            .finish()
    }
}

/// A test guest's device map: the debug port and `ranges` (space, base,
/// length, target).
pub fn test_guest_map(
    ranges: &[(dmfabric_wire::Space, u64, u64, Target)],
) -> Result<DeviceMap<Target>, crate::devmap::MapError> {
    let mut map = DeviceMap::default();
    map.add(
        dmfabric_wire::Space::Pio,
        u64::from(crate::debugport::DEBUG_PORT),
        u64::from(crate::debugport::DEBUG_PORT_LEN),
        Target::Debug,
    )?;
    for &(space, base, len, target) in ranges {
        map.add(space, base, len, target)?;
    }
    Ok(map)
}

/// Guest memory of a test-guest VM.
pub const TEST_VM_MEM: usize = 4 << 20;

impl VmSpec {
    /// A test-guest VM: `image` loaded at [`crate::guests::LOAD_ADDR`], the
    /// debug port mapped, `ranges` (space, base, length, target) mapped, and
    /// `local` the models `Target::Local` indices name.
    pub fn test_guest(
        id: u32,
        vcpus: u16,
        image: &[u8],
        args: Vec<[u64; 3]>,
        ranges: &[(dmfabric_wire::Space, u64, u64, Target)],
        local: Vec<Box<dyn Device>>,
    ) -> Result<VmSpec, crate::devmap::MapError> {
        let map = test_guest_map(ranges)?;
        Ok(VmSpec {
            id,
            vcpus,
            mem_bytes: TEST_VM_MEM,
            image: image.to_vec(),
            entry: crate::guests::LOAD_ADDR,
            args,
            map,
            local: local.into_iter().map(Mutex::new).collect(),
            linux: None,
            irq_target: IrqTarget::default(),
            reset: Arc::new(AtomicBool::new(false)),
            console_port: None,
            restore: None,
            live_map: None,
        })
    }

    /// A Linux VM: `image` booted with `mem_bytes` of memory, `ranges`
    /// mapped; every other port and MMIO address reads as absent hardware.
    pub fn linux(
        id: u32,
        vcpus: u16,
        mem_bytes: usize,
        image: LinuxImage,
        ranges: &[(dmfabric_wire::Space, u64, u64, Target)],
        local: Vec<Box<dyn Device>>,
    ) -> Result<VmSpec, crate::devmap::MapError> {
        let mut spec = VmSpec::test_guest(id, vcpus, &[], Vec::new(), ranges, local)?;
        spec.mem_bytes = mem_bytes;
        spec.linux = Some(image);
        spec.console_port = Some(0x3f8);
        Ok(spec)
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stop every VM after this long.
    pub timeout: Duration,
    /// Record the time between successive exits of each vCPU (the exit
    /// round trip as the guest sees it).
    pub time_exits: bool,
    /// When this flag is set (a signal handler, say), print the live
    /// remote counters to stderr and clear it.
    pub dump: Option<&'static AtomicBool>,
    /// Copy this guest-physical range `(addr, len)` of every VM into its
    /// report when the run ends (what a guest left in memory).
    pub keep_memory: Option<(u64, usize)>,
    /// What the control panel wants of each VM while it runs.
    pub control: Option<Control>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { timeout: Duration::from_secs(30), time_exits: false, dump: None, keep_memory: None, control: None }
    }
}

/// What the control panel wants of a VM now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// Run (launched, or resumed).
    Run,
    /// Stay out of the guest: not launched yet, or suspended.
    Hold,
    /// End it cleanly, for this reason.
    End(String),
    /// Save it and hand it to [`VmControl::migrated_out`].
    MigrateOut,
}

/// The control panel as the supervisor of a run sees it (asked every
/// millisecond: an answer must be cheap).
pub trait VmControl: Send + Sync {
    fn desired(&self, vm: u32) -> Desired;
    /// `vm` was saved for its move: deliver the snapshot to where it goes;
    /// returns where that is (for the VM's report), or why it failed (the
    /// VM stays held and it is tried again).
    fn migrated_out(&self, vm: u32, snapshot: &[u8]) -> Result<String, String>;
    /// VMs to start now (launched, or migrated here) while the run goes on.
    fn arrivals(&self) -> Vec<VmSpec> {
        Vec::new()
    }
    /// Whether VMs may still arrive: the run does not end while they may.
    fn pending(&self) -> bool {
        false
    }
}

/// A [`VmControl`] in [`RunOptions`].
#[derive(Clone)]
pub struct Control(pub Arc<dyn VmControl>);

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

/// Where the supervisor has a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    Held,
    /// Held with its state being saved, since.
    Saving(Instant),
    Ended,
}

/// What one vCPU did.
#[derive(Debug)]
pub struct VcpuReport {
    pub vcpu: u16,
    /// How it ended: the run counters (with the guest's exit code) or why it stopped.
    pub result: Result<RunStats, String>,
    pub reports: Vec<u32>,
    pub exits: ExitStats,
    pub per_device: Vec<DeviceCount>,
    /// Access times per target, parallel to `per_device`.
    pub device_times: Vec<AccessTimes>,
    /// Nanoseconds between successive exits, if asked for.
    pub exit_times: Option<Histogram<u64>>,
    pub elapsed: Duration,
}

/// What one VM did.
#[derive(Debug)]
pub struct VmReport {
    pub id: u32,
    pub vcpus: Vec<VcpuReport>,
    pub remote: Option<VmRemoteStats>,
    /// The range of `RunOptions::keep_memory`, if asked for (and in range).
    pub memory: Option<Vec<u8>>,
    /// Ended by the control panel: shut down, or migrated away (and where).
    pub ended: Option<String>,
}

impl VmReport {
    /// The VM's exit counters, all vCPUs summed.
    pub fn exits(&self) -> ExitStats {
        let mut s = ExitStats::default();
        for v in &self.vcpus {
            s += v.exits;
        }
        s
    }

    /// Exits per device-map target, all vCPUs summed.
    pub fn per_device(&self) -> Vec<DeviceCount> {
        let mut out: Vec<DeviceCount> = Vec::new();
        for c in self.vcpus.iter().flat_map(|v| &v.per_device) {
            match out.iter_mut().find(|o| o.target == c.target) {
                Some(o) => {
                    o.reads += c.reads;
                    o.writes += c.writes;
                }
                None => out.push(*c),
            }
        }
        out
    }

    /// Access times per target, all vCPUs merged, in the order of [`VmReport::per_device`].
    pub fn device_times(&self) -> Vec<(Target, AccessTimes)> {
        let mut out: Vec<(Target, AccessTimes)> = Vec::new();
        for v in &self.vcpus {
            for (c, h) in v.per_device.iter().zip(&v.device_times) {
                match out.iter_mut().find(|(t, _)| *t == c.target) {
                    Some((_, acc)) => {
                        let _ = acc.add(h);
                    }
                    None => out.push((c.target, h.clone())),
                }
            }
        }
        out
    }

    /// The first failure of any vCPU.
    pub fn error(&self) -> Option<&str> {
        self.vcpus.iter().find_map(|v| v.result.as_ref().err().map(String::as_str))
    }
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    pub vms: Vec<VmReport>,
    pub client: Option<ClientStats>,
}

impl RunReport {
    pub fn vm(&self, id: u32) -> Option<&VmReport> {
        self.vms.iter().find(|v| v.id == id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("VM ids must be unique: {0} appears twice")]
    DuplicateVm(u32),
    #[error("VM {vm}: {error}")]
    Linux { vm: u32, error: LinuxError },
    #[error("VM {vm}: its migrated state cannot be used: {why}")]
    Snapshot { vm: u32, why: String },
}

enum Remote<'p, 'a, T> {
    None,
    Some(VcpuRemote<'p, 'a, T>),
}

impl<T: Transport> RemoteAccess for Remote<'_, '_, T> {
    fn access(&mut self, server: u16, device: u32, exit: &Exit) -> Result<u64, String> {
        match self {
            Remote::None => NoRemote.access(server, device, exit),
            Remote::Some(r) => RemoteAccess::access(r, server, device, exit),
        }
    }
}

/// Run `specs` until every vCPU has exited, `opts.timeout` passed, `stop`
/// was set, or a vCPU failed (which stops the other vCPUs of its VM).
/// Remote ranges go over `transport` to the servers of `client`, which is
/// given back at the end. With a control ([`RunOptions::control`]) VMs may
/// also join while it runs ([`VmControl::arrivals`]); the run then lasts
/// while the control says more may come ([`VmControl::pending`]).
pub fn run<T: Transport>(
    specs: &[VmSpec],
    transport: Option<(T, ClientConfig)>,
    opts: &RunOptions,
    stop: &AtomicBool,
) -> Result<(RunReport, Option<T>), MachineError> {
    let mut ids: Vec<u32> = specs.iter().map(|s| s.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(MachineError::DuplicateVm(w[0]));
    }
    let mut lives = Vec::with_capacity(specs.len());
    let mut boots = Vec::with_capacity(specs.len());
    for spec in specs {
        let (vm, boot) = create_vm(spec)?;
        lives.push(Arc::new(VmLive::new(spec, vm)));
        boots.push(boot);
    }
    let entries: Vec<VmEntry<'_>> = specs
        .iter()
        .zip(&lives)
        .map(|(s, l)| VmEntry { id: s.id, vcpus: s.vcpus, irq: &l.vm as &dyn IrqSink })
        .collect();
    let port = match transport {
        Some((t, cfg)) => Some(ClientPort::connect(t, &cfg, &entries)?),
        None => None,
    };
    let mut vcpus = Vec::new();
    for ((spec, live), boot) in specs.iter().zip(&lives).zip(&boots) {
        vcpus.push(create_vcpus(spec, &live.vm, boot.as_ref())?);
    }
    let control = opts.control.as_ref().map(|c| c.0.clone());
    if let Some(c) = &control {
        for (spec, live) in specs.iter().zip(&lives) {
            live.hold_unless_running(c.as_ref(), spec.id);
        }
    }

    let poller_stop = AtomicBool::new(false);
    let running = AtomicUsize::new(vcpus.iter().map(Vec::len).sum());
    let start = Instant::now();
    let reports = std::thread::scope(|s| {
        let poller = port.as_ref().map(|p| s.spawn(|| p.serve(&poller_stop)));
        // Local models' timers and receive timeouts run while the vCPUs are
        // in their guests: tick them every millisecond.
        let ticker = specs.iter().any(|s| !s.local.is_empty()).then(|| {
            s.spawn(|| {
                while !poller_stop.load(Ordering::Acquire) {
                    let now = Instant::now();
                    for spec in specs {
                        for d in &spec.local {
                            d.lock().unwrap_or_else(|e| e.into_inner()).tick(now);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        });
        let mut handles = Vec::new();
        for (vi, (spec, list)) in specs.iter().zip(vcpus).enumerate() {
            for (ci, vcpu) in list.into_iter().enumerate() {
                let (live, port, running) = (&lives[vi], port.as_ref(), &running);
                handles.push((vi, s.spawn(move || vcpu_thread(spec, ci, vcpu, &live.kicks, port, running, opts))));
            }
        }
        // VMs that join while the run goes on: each on a thread of its own
        // that owns it, its vCPUs on threads of that thread's scope.
        let mut late: Vec<(Arc<VmLive>, std::thread::ScopedJoinHandle<'_, VmReport>)> = Vec::new();
        let mut modes: Vec<Mode> = lives.iter().map(|l| l.initial_mode()).collect();
        // Supervise: kick what is still running on a timeout or a stop
        // request, and keep kicking until it is out.
        let mut why: Option<String> = None;
        loop {
            if why.is_none() {
                if stop.load(Ordering::Acquire) {
                    why = Some("stopped on request".into());
                } else if start.elapsed() >= opts.timeout {
                    why = Some(format!("the run limit of {:?} was reached", opts.timeout));
                }
            }
            let all: Vec<Arc<VmLive>> = lives.iter().chain(late.iter().map(|(l, _)| l)).cloned().collect();
            if let Some(why) = &why {
                for k in all.iter().flat_map(|l| &l.kicks) {
                    k.stop(why, Duration::ZERO);
                }
            }
            // Kick again whatever was told to stop and is still inside
            // KVM_RUN (its signal may have come just before it went in).
            for k in all.iter().flat_map(|l| &l.kicks).filter(|k| k.stopped()) {
                k.poke();
            }
            for l in &all {
                let asked = l.reset.swap(false, Ordering::AcqRel) || port.as_ref().is_some_and(|p| p.take_reset(l.id));
                if asked {
                    for k in &l.kicks {
                        k.reset(Duration::ZERO);
                    }
                }
            }
            if let Some(c) = &control {
                let freeze = |vm: u32, on: bool| {
                    if let Some(p) = port.as_ref() {
                        p.freeze(vm, on);
                    }
                };
                for (l, mode) in all.iter().zip(&mut modes) {
                    supervise(c.as_ref(), l, mode, &freeze);
                }
                if why.is_none() {
                    for spec in c.arrivals() {
                        match join_vm(spec, port.as_ref(), c.as_ref()) {
                            Ok((live, spec, vm_vcpus)) => {
                                running.fetch_add(vm_vcpus, Ordering::AcqRel);
                                let (l, port, running) = (live.clone(), port.as_ref(), &running);
                                modes.push(live.initial_mode());
                                late.push((live, s.spawn(move || run_joined(spec, &l, port, running, opts))));
                            }
                            Err(e) => eprintln!("{e}"),
                        }
                    }
                }
            }
            if let (Some(flag), Some(p)) = (opts.dump, port.as_ref()) {
                if flag.swap(false, Ordering::AcqRel) {
                    eprintln!("live: link {:?}", p.stats());
                    for l in &all {
                        if let Some(s) = p.vm_stats(l.id) {
                            eprintln!("live: VM {}: {s:?}", l.id);
                        }
                    }
                }
            }
            // Done when nothing runs and (unless stopping) nothing more may come.
            let more = why.is_none() && control.as_ref().is_some_and(|c| c.pending());
            if running.load(Ordering::Acquire) == 0 && !more {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        poller_stop.store(true, Ordering::Release);
        if let Some(t) = ticker {
            let _ = t.join();
        }
        let mut out: Vec<VmReport> = lives.iter().map(|l| l.report()).collect();
        for (vi, h) in handles {
            let report = h.join().unwrap_or_else(|_| failed(u16::MAX, "the vCPU thread panicked".into()));
            out[vi].vcpus.push(report);
        }
        if let Some(p) = port.as_ref() {
            for r in &mut out {
                r.remote = p.vm_stats(r.id);
            }
        }
        for (l, h) in late {
            let mut r = h.join().unwrap_or_else(|_| VmReport {
                vcpus: vec![failed(u16::MAX, "the VM's thread panicked".into())],
                ..l.report()
            });
            r.ended = l.ended();
            r.remote = port.as_ref().and_then(|p| p.vm_stats(r.id));
            out.push(r);
        }
        if let Some(Ok(Err(e))) = poller.map(|p| p.join()) {
            for vm in &mut out {
                for v in &mut vm.vcpus {
                    if v.result.is_ok() {
                        v.result = Err(format!("the client's interrupt poller failed: {e}"));
                    }
                }
            }
        }
        out
    });
    let mut reports = reports;
    for (r, l) in reports.iter_mut().zip(&lives) {
        r.ended = l.ended();
        if let Some((addr, len)) = opts.keep_memory {
            r.memory = l.vm.memory(addr, len).map(<[u8]>::to_vec);
        }
    }
    let client = port.as_ref().map(ClientPort::stats);
    Ok((RunReport { vms: reports, client }, port.map(ClientPort::into_transport)))
}

/// A VM's memory and KVM state, loaded (or restored) and ready for vCPUs.
fn create_vm(spec: &VmSpec) -> Result<(Vm, Option<linux::LinuxBoot>), MachineError> {
    let mut vm = Vm::new(spec.mem_bytes)?;
    let boot = if let Some(snap) = &spec.restore {
        let n = snap.memory.len().min(spec.mem_bytes);
        vm.memory_mut()[..n].copy_from_slice(&snap.memory[..n]);
        vm.restore_state(&snap.device)?;
        None
    } else {
        match &spec.linux {
            Some(image) => Some(
                linux::load(&mut vm, image, spec.vcpus.min(255) as u8)
                    .map_err(|error| MachineError::Linux { vm: spec.id, error })?,
            ),
            None => {
                vm.load(spec.entry, &spec.image)?;
                None
            }
        }
    };
    let _ = spec.irq_target.set(vm.irq_handle());
    Ok((vm, boot))
}

/// The vCPUs of `spec` on `vm`, started (or restored) where they belong.
fn create_vcpus<'v>(spec: &VmSpec, vm: &'v Vm, boot: Option<&linux::LinuxBoot>) -> Result<Vec<Vcpu<'v>>, MachineError> {
    let mut list = Vec::new();
    for id in 0..spec.vcpus {
        list.push(match boot {
            Some(b) if id == 0 => vm.linux_vcpu(0, b.entry, b.zero_page)?,
            Some(_) => vm.linux_ap(u64::from(id))?,
            None => {
                let args = spec.args.get(usize::from(id)).or(spec.args.last()).copied().unwrap_or_default();
                vm.long_mode_vcpu(u64::from(id), spec.entry, args)?
            }
        });
        if let Some(snap) = &spec.restore {
            let Some(state) = snap.vcpus.get(usize::from(id)) else {
                return Err(MachineError::Snapshot { vm: spec.id, why: format!("it has no state for vCPU {id}") });
            };
            list.last().expect("just pushed").restore(state)?;
        }
    }
    Ok(list)
}

/// What the supervisor and a VM's vCPU threads share.
struct VmLive {
    id: u32,
    vm: Vm,
    kicks: Vec<Kick>,
    /// Set by a local i8042's reset pulse.
    reset: Arc<AtomicBool>,
    /// Ended by the control panel, and why.
    ended: Mutex<Option<String>>,
}

impl VmLive {
    fn new(spec: &VmSpec, vm: Vm) -> VmLive {
        VmLive {
            id: spec.id,
            vm,
            kicks: (0..spec.vcpus).map(|_| Kick::new()).collect(),
            reset: spec.reset.clone(),
            ended: Mutex::new(None),
        }
    }

    /// A VM the control panel does not want running yet starts held.
    fn hold_unless_running(&self, c: &dyn VmControl, id: u32) {
        if c.desired(id) != Desired::Run {
            self.kicks.iter().for_each(|k| k.pause(false));
        }
    }

    fn initial_mode(&self) -> Mode {
        if self.kicks.iter().any(Kick::pausing) {
            Mode::Held
        } else {
            Mode::Running
        }
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn report(&self) -> VmReport {
        VmReport { id: self.id, vcpus: Vec::new(), remote: None, memory: None, ended: None }
    }
}

/// Make a VM that joins a running run: its memory and KVM state, and its
/// place on the client port.
fn join_vm<T: Transport>(
    spec: VmSpec,
    port: Option<&ClientPort<'_, T>>,
    c: &dyn VmControl,
) -> Result<(Arc<VmLive>, VmSpec, usize), String> {
    let id = spec.id;
    let (vm, boot) = create_vm(&spec).map_err(|e| format!("VM {id} cannot start here: {e}"))?;
    if boot.is_some() {
        return Err(format!("VM {id}: Linux VMs join only when the client starts"));
    }
    let live = Arc::new(VmLive::new(&spec, vm));
    if let Some(p) = port {
        p.add_vm(id, spec.vcpus, Arc::new(live.vm.irq_handle()));
    }
    live.hold_unless_running(c, id);
    eprintln!("VM {id}: joins this client platform");
    let n = usize::from(spec.vcpus);
    Ok((live, spec, n))
}

/// Run a VM that joined: its vCPUs on threads of their own, until they end.
fn run_joined<T: Transport>(
    spec: VmSpec,
    live: &VmLive,
    port: Option<&ClientPort<'_, T>>,
    running: &AtomicUsize,
    opts: &RunOptions,
) -> VmReport {
    let mut report = live.report();
    let vcpus = match create_vcpus(&spec, &live.vm, None) {
        Ok(v) => v,
        Err(e) => {
            running.fetch_sub(usize::from(spec.vcpus), Ordering::AcqRel);
            report.vcpus.push(failed(0, e.to_string()));
            return report;
        }
    };
    report.vcpus = std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .into_iter()
            .enumerate()
            .map(|(ci, vcpu)| {
                let spec = &spec;
                s.spawn(move || vcpu_thread(spec, ci, vcpu, &live.kicks, port, running, opts))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| failed(u16::MAX, "the vCPU thread panicked".into())))
            .collect()
    });
    report
}

/// One vCPU's thread: run it, route its exits, report how it ended.
fn vcpu_thread<T: Transport>(
    spec: &VmSpec,
    ci: usize,
    mut vcpu: Vcpu<'_>,
    kicks: &[Kick],
    port: Option<&ClientPort<'_, T>>,
    running: &AtomicUsize,
    opts: &RunOptions,
) -> VcpuReport {
    let kick = &kicks[ci];
    let remote = match port {
        Some(p) => match p.vcpu(spec.id, ci as u16, Some(kick)) {
            Ok(r) => Remote::Some(r),
            Err(e) => {
                running.fetch_sub(1, Ordering::AcqRel);
                return failed(ci as u16, e.to_string());
            }
        },
        None => Remote::None,
    };
    let mut router = Router::new(&spec.map, &spec.local, remote);
    if let Some(live) = &spec.live_map {
        router.follow(live);
    }
    if let Some(port) = spec.console_port {
        router.tap_console(port);
    }
    let mut times =
        opts.time_exits.then(|| Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"));
    let mut last: Option<Instant> = None;
    let t0 = Instant::now();
    let result = vcpu.run(kick, &mut |e| {
        if let Some(h) = times.as_mut() {
            let now = Instant::now();
            if let Some(l) = last {
                h.saturating_record((now - l).as_nanos() as u64);
            }
            last = Some(now);
        }
        router.handle(e)
    });
    let tail = router.console().map(|t| t.last_lines(8)).filter(|t| !t.is_empty());
    let result = match (result, tail) {
        (Err(e), Some(tail)) => Err(format!("{e}; the console's last lines:\n{tail}")),
        (Err(e), None) => Err(e.to_string()),
        // A kernel that panics (panic=-1) resets at once:
        // that is a failure, not a clean end.
        (Ok(r), Some(tail)) if r.reset && tail.contains("Kernel panic") => {
            Err(format!("the kernel panicked and reset the VM; the console's last lines:\n{tail}"))
        }
        (Ok(r), _) => Ok(r),
    };
    if let Err(why) = &result {
        // One vCPU failing stops its VM.
        for (i, k) in kicks.iter().enumerate() {
            if i != ci {
                k.stop(&format!("vCPU {ci} failed: {why}"), Duration::ZERO);
            }
        }
    }
    running.fetch_sub(1, Ordering::AcqRel);
    VcpuReport {
        vcpu: ci as u16,
        result,
        reports: router.reports().to_vec(),
        exits: router.stats(),
        per_device: router.per_device().to_vec(),
        device_times: router.times().to_vec(),
        exit_times: times,
        elapsed: t0.elapsed(),
    }
}

/// Carry out what the control panel wants of one VM.
/// `freeze(vm, on)` stops (and restarts) the VM's interrupts being taken
/// while it is saved for a migration.
fn supervise(c: &dyn VmControl, live: &VmLive, mode: &mut Mode, freeze: &dyn Fn(u32, bool)) {
    if *mode == Mode::Ended {
        return;
    }
    let (id, vm, kicks) = (live.id, &live.vm, &live.kicks[..]);
    let mut ended = live.ended.lock().unwrap_or_else(|e| e.into_inner());
    let ended = &mut *ended;
    let end = |why: &str, mode: &mut Mode, ended: &mut Option<String>| {
        kicks.iter().for_each(|k| k.end(why));
        *ended = Some(why.to_string());
        *mode = Mode::Ended;
    };
    match (c.desired(id), *mode) {
        (Desired::End(why), _) => end(&why, mode, ended),
        (Desired::Run, Mode::Held) => {
            eprintln!("VM {id}: running");
            kicks.iter().for_each(Kick::resume);
            *mode = Mode::Running;
        }
        (Desired::Hold, Mode::Running) => {
            eprintln!("VM {id}: suspended");
            kicks.iter().for_each(|k| k.pause(false));
            *mode = Mode::Held;
        }
        (Desired::MigrateOut, Mode::Running | Mode::Held) => {
            eprintln!("VM {id}: holding its vCPUs to migrate it");
            freeze(id, true);
            kicks.iter().for_each(|k| k.pause(true));
            *mode = Mode::Saving(Instant::now());
        }
        (Desired::MigrateOut, Mode::Saving(since)) => {
            if !kicks.iter().all(Kick::paused) {
                // Re-kick a vCPU the first signal missed (it was just entering the guest).
                kicks.iter().filter(|k| !k.paused()).for_each(|k| {
                    k.poke();
                });
                return;
            }
            let mut vcpus = Vec::new();
            for (i, k) in kicks.iter().enumerate() {
                match k.take_saved() {
                    Some(Ok(s)) => vcpus.push(s),
                    Some(Err(e)) => return end(&format!("cannot save vCPU {i} to migrate it: {e}"), mode, ended),
                    // Asked again after a failed delivery: saved anew.
                    None => {
                        kicks.iter().for_each(|k| k.pause(true));
                        return;
                    }
                }
            }
            let device = match vm.save_state() {
                Ok(d) => d,
                Err(e) => return end(&format!("cannot save the VM's device state to migrate it: {e}"), mode, ended),
            };
            let snap = VmSnapshot { vm: id, device, vcpus, memory: vm.all_memory().to_vec() };
            let bytes = snap.encode();
            match c.migrated_out(id, &bytes) {
                Ok(to) => end(
                    &format!("migrated to {to} ({} KiB, held {:?})", bytes.len() / 1024, since.elapsed()),
                    mode,
                    ended,
                ),
                Err(e) => {
                    eprintln!("VM {id}: the migration could not be delivered ({e}); trying again");
                    std::thread::sleep(Duration::from_millis(100));
                    kicks.iter().for_each(|k| k.pause(true));
                }
            }
        }
        (Desired::Run | Desired::Hold, Mode::Saving(_)) => {
            // The migration was called off before it was delivered.
            freeze(id, false);
            let _ = kicks.iter().map(Kick::take_saved).count();
            kicks.iter().for_each(Kick::resume);
            *mode = Mode::Running;
        }
        _ => {}
    }
}

fn failed(vcpu: u16, why: String) -> VcpuReport {
    VcpuReport {
        vcpu,
        result: Err(why),
        reports: Vec::new(),
        exits: ExitStats::default(),
        per_device: Vec::new(),
        device_times: Vec::new(),
        exit_times: None,
        elapsed: Duration::ZERO,
    }
}
