//! The supervisor of a run: it owns the VMs and their vCPU handles and
//! sleeps until something happens — a vCPU answers or ends, a device model
//! resets a VM, the control panel changes its mind, Ctrl-C, the run limit —
//! then acts on it, one method per concern. vCPUs are controlled only
//! through [`VcpuHandle`] events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, Sender};
use hdrhistogram::Histogram;

use crate::exits::Router;
use crate::kvm::{Vcpu, VcpuState, Vm};
use crate::linux;
use crate::live::VcpuCounters;
use crate::local::Ticker;
use crate::machine::{Boot, Desired, MachineError, RunOptions, VcpuReport, VmControl, VmReport, VmSpec};
use crate::migrate::VmSnapshot;
use crate::remote::{ClientPort, RemoteError, VmEntry};
use crate::vcpu::{RunState, VcpuEvent, VcpuHandle, VcpuMessage, VcpuResponse};
use dmfabric_dataplane::observe::Mailbox;

/// A migration whose delivery failed is tried again after this long.
const DELIVERY_RETRY: Duration = Duration::from_millis(100);

/// Where the supervisor has a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    /// Held outside the guest (not launched yet, or suspended).
    Held,
    /// Held with its vCPUs' states being saved to migrate it, since.
    Saving(Instant),
    /// Told to end; waiting for its vCPUs to exit.
    Ending,
}

/// A VM created (memory loaded, vCPUs made) but not yet running.
pub(crate) struct NewVm {
    spec: VmSpec,
    vm: Vm,
    vcpus: Vec<Vcpu>,
}

impl NewVm {
    /// The VM as the client port knows it.
    pub(crate) fn entry(&self) -> VmEntry {
        VmEntry {
            id: self.spec.id,
            vcpus: self.spec.vcpus,
            irq: Arc::new(self.vm.irq_handle()),
            map: self.spec.map.clone(),
            ram: Some(Arc::new(self.vm.ram())),
        }
    }
}

/// A running VM.
struct VmRun {
    id: u32,
    vm: Vm,
    vcpus: Vec<VcpuHandle>,
    mode: Mode,
    /// States saved for a migration, per vCPU.
    saved: Vec<Option<Box<VcpuState>>>,
    report: VmReport,
}

impl VmRun {
    fn exited(&self) -> bool {
        self.vcpus.iter().all(|h| h.state == RunState::Exited)
    }

    fn send_all(&mut self, event: VcpuEvent) {
        for h in &mut self.vcpus {
            h.send(event.clone());
        }
    }

    /// End the VM cleanly for `why` (shut down, migrated, reset).
    fn end(&mut self, why: String) {
        tracing::info!(vm = self.id, "ending: {why}");
        self.report.ended = Some(why);
        self.mode = Mode::Ending;
        self.send_all(VcpuEvent::End);
    }
}

pub(crate) struct Supervisor<'r> {
    opts: &'r RunOptions,
    stop: &'r AtomicBool,
    started: Instant,
    port: Option<Arc<ClientPort>>,
    control: Option<Arc<dyn VmControl>>,
    vms: Vec<VmRun>,
    responses: (Sender<VcpuMessage>, Receiver<VcpuMessage>),
    resets: Receiver<u32>,
    ticker: Arc<Ticker>,
    /// Why everything is stopping (the run limit, Ctrl-C), once it is.
    stopping: Option<String>,
    /// When to try delivering a saved migration again.
    retry_at: Option<Instant>,
}

impl<'r> Supervisor<'r> {
    pub(crate) fn new(opts: &'r RunOptions, stop: &'r AtomicBool, started: Instant) -> Supervisor<'r> {
        Supervisor {
            opts,
            stop,
            started,
            port: None,
            control: opts.control.as_ref().map(|c| c.0.clone()),
            vms: Vec::new(),
            responses: crossbeam_channel::unbounded(),
            resets: never(),
            ticker: Ticker::new(),
            stopping: None,
            retry_at: None,
        }
    }

    pub(crate) fn set_port(&mut self, port: Option<Arc<ClientPort>>) {
        if let Some(p) = &port {
            let (tx, rx) = crossbeam_channel::unbounded();
            p.notify_resets(tx);
            self.resets = rx;
        }
        self.port = port;
    }

    /// A VM's memory, KVM state and vCPUs, loaded (or restored) and ready.
    pub(crate) fn create(&self, spec: VmSpec) -> Result<NewVm, MachineError> {
        let id = spec.id;
        let mut vm = Vm::with_irqchip(spec.mem_bytes, spec.irqchip)?;
        let mut linux_boot = None;
        match &spec.boot {
            Boot::Restore(snap) => {
                let mem = vm.memory_mut()?;
                let n = snap.memory.len().min(mem.len());
                mem[..n].copy_from_slice(&snap.memory[..n]);
                vm.restore_state(&snap.device)?;
            }
            Boot::Linux(image) => {
                let remote_irqchip = spec.irqchip == crate::kvm::IrqChipMode::Split;
                let b = linux::load_with(&mut vm, image, spec.vcpus.min(255) as u8, remote_irqchip)
                    .map_err(|error| MachineError::Linux { vm: id, error })?;
                linux_boot = Some(b);
            }
            Boot::Flat { image, entry, .. } => vm.load(*entry, image)?,
        }
        let _ = spec.irq_target.set(vm.irq_handle());
        let _ = spec.ram.set(vm.ram());
        let mut vcpus = Vec::new();
        for n in 0..spec.vcpus {
            let vcpu = match (&spec.boot, &linux_boot) {
                (_, Some(b)) if n == 0 => vm.linux_vcpu(0, b.entry, b.zero_page)?,
                (_, Some(_)) => vm.linux_ap(u64::from(n))?,
                (Boot::Flat { entry, args, .. }, None) => {
                    let a = args.get(usize::from(n)).or(args.last()).copied().unwrap_or_default();
                    vm.long_mode_vcpu(u64::from(n), *entry, a)?
                }
                (Boot::Restore(snap), None) => {
                    let v = vm.long_mode_vcpu(u64::from(n), 0, [0; 3])?;
                    let Some(state) = snap.vcpus.get(usize::from(n)) else {
                        let error = crate::migrate::SnapshotError::MissingVcpu(n);
                        return Err(MachineError::Snapshot { vm: id, error });
                    };
                    v.restore(state)?;
                    v
                }
                (Boot::Linux(_), None) => unreachable!("a Linux boot is loaded above"),
            };
            vcpus.push(vcpu);
        }
        Ok(NewVm { spec, vm, vcpus })
    }

    /// Start `new`'s vCPUs, held if the control panel wants it held.
    pub(crate) fn start(&mut self, new: NewVm) -> Result<(), MachineError> {
        let NewVm { spec, vm, vcpus } = new;
        let id = spec.id;
        if !spec.local.is_empty() {
            self.ticker.add(spec.local.clone());
        }
        let spec = Arc::new(spec);
        let held = self.control.as_ref().is_some_and(|c| c.desired(id) != Desired::Run);
        let mut handles = Vec::new();
        for (n, vcpu) in vcpus.into_iter().enumerate() {
            let n = n as u16;
            let live = self.opts.live.as_ref().map(|l| l.vcpu(id, n));
            let body =
                vcpu_body(spec.clone(), n, vcpu, self.port.clone(), self.ticker.clone(), self.opts.time_exits, live);
            let handle = VcpuHandle::spawn(id, n, held, self.responses.0.clone(), body)
                .map_err(|source| MachineError::Thread { vm: id, vcpu: n, source })?;
            handles.push(handle);
        }
        let report = VmReport { id, vcpus: Vec::new(), remote: None, memory: None, ended: None };
        let saved = (0..handles.len()).map(|_| None).collect();
        let mode = if held { Mode::Held } else { Mode::Running };
        self.vms.push(VmRun { id, vm, vcpus: handles, mode, saved, report });
        Ok(())
    }

    /// Supervise until every VM ended (and no more may come); the reports.
    pub(crate) fn run(mut self) -> Vec<VmReport> {
        let serve_stop = Arc::new(AtomicBool::new(false));
        let serve = self.port.clone().map(|p| {
            let stop = serve_stop.clone();
            std::thread::Builder::new().name("dmf-client-serve".into()).spawn(move || p.serve(&stop))
        });
        let ticker = {
            let t = self.ticker.clone();
            std::thread::Builder::new().name("dmf-local-timers".into()).spawn(move || t.run())
        };
        let never_unit = never::<()>();
        let changes = self.control.as_ref().and_then(|c| c.changes()).unwrap_or_else(|| never_unit.clone());
        let wake = self.opts.wake.clone().unwrap_or_else(|| never_unit.clone());
        let dump = self.opts.dump.clone().unwrap_or_else(|| never_unit.clone());
        let responses = self.responses.1.clone();
        let resets = self.resets.clone();
        self.follow_control();
        while !self.done() {
            let timeout = self.next_wake().saturating_duration_since(Instant::now());
            select! {
                recv(responses) -> m => if let Ok(m) = m { self.on_vcpu(m) },
                recv(resets) -> vm => if let Ok(vm) = vm { self.on_reset(vm) },
                recv(changes) -> _ => {},
                recv(wake) -> _ => {},
                recv(dump) -> _ => self.dump(),
                default(timeout) => {},
            }
            self.check_stop();
            self.follow_control();
            self.retry_delivery();
        }
        serve_stop.store(true, Ordering::Release);
        self.ticker.stop();
        if let Ok(t) = ticker {
            let _ = t.join();
        }
        let serve_failed = match serve.map(|s| s.map(|h| h.join())) {
            Some(Ok(Ok(Err(e)))) => Some(e),
            _ => None,
        };
        self.finish(serve_failed)
    }

    /// Whether the run is over: every VM ended, and none may still come.
    fn done(&self) -> bool {
        let more = self.stopping.is_none() && self.control.as_ref().is_some_and(|c| c.pending());
        self.vms.iter().all(VmRun::exited) && !more
    }

    /// The next time to wake without an event. (A control that keeps asking
    /// to look at a time already past is looked at every millisecond.)
    fn next_wake(&self) -> Instant {
        let limit = self.started + self.opts.timeout;
        let soonest = Instant::now() + Duration::from_millis(1);
        let look = self.control.as_ref().and_then(|c| c.next_look()).map(|at| at.max(soonest));
        [Some(limit), look, self.retry_at].into_iter().flatten().min().unwrap_or(limit)
    }

    /// Ctrl-C, or the run limit: everything stops.
    fn check_stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let why = if self.stop.load(Ordering::Acquire) {
            "stopped on request".to_string()
        } else if self.started.elapsed() >= self.opts.timeout {
            format!("the run limit of {:?} was reached", self.opts.timeout)
        } else {
            return;
        };
        tracing::info!("{why}: stopping every VM");
        for vm in &mut self.vms {
            vm.send_all(VcpuEvent::Fail(why.clone()));
        }
        self.stopping = Some(why);
    }

    /// A vCPU answered or ended.
    fn on_vcpu(&mut self, m: VcpuMessage) {
        let Some(i) = self.vms.iter().position(|v| v.id == m.vm) else { return };
        let vm = &mut self.vms[i];
        let n = usize::from(m.vcpu);
        match m.response {
            VcpuResponse::Paused(saved) => {
                if let Some(h) = vm.vcpus.get_mut(n) {
                    if h.state == RunState::Pausing {
                        h.state = RunState::Paused;
                    }
                }
                match saved {
                    Some(Ok(state)) => vm.saved[n] = Some(state),
                    Some(Err(e)) => vm.end(format!("cannot save vCPU {n} to migrate it: {e}")),
                    None => {}
                }
                if let Mode::Saving(since) = vm.mode {
                    if vm.saved.iter().all(Option::is_some) {
                        self.deliver(i, since);
                    }
                }
            }
            VcpuResponse::Exited(report) => {
                if let Some(h) = vm.vcpus.get_mut(n) {
                    h.state = RunState::Exited;
                    h.join();
                }
                match &report.result {
                    // One vCPU failing stops its VM.
                    Err(why) => {
                        let why = format!("vCPU {n} failed: {why}");
                        vm.send_all(VcpuEvent::Fail(why));
                    }
                    // A device model reset the VM: it stops, cleanly.
                    Ok(stats) if stats.reset && vm.mode != Mode::Ending => vm.end("the VM was reset".into()),
                    Ok(_) => {}
                }
                vm.report.vcpus.push(*report);
            }
        }
    }

    /// A remote device model asked for a reset of `vm`.
    fn on_reset(&mut self, vm: u32) {
        if let Some(v) = self.vms.iter_mut().find(|v| v.id == vm && v.mode != Mode::Ending) {
            v.end("reset by its i8042".into());
        }
    }

    /// Carry out what the control panel wants now, and start the VMs that
    /// joined this client platform.
    fn follow_control(&mut self) {
        let Some(c) = self.control.clone() else { return };
        if let (Some(keys), Some(p)) = (c.keys(), &self.port) {
            tracing::info!(keys = ?keys.ids().collect::<Vec<_>>(), "the control panel changed this client platform's keys");
            p.set_keys(keys);
        }
        for i in 0..self.vms.len() {
            self.supervise(c.as_ref(), i);
        }
        if self.stopping.is_some() {
            return;
        }
        for spec in c.arrivals() {
            let id = spec.id;
            let started = self.create(spec).and_then(|new| {
                if let Some(p) = &self.port {
                    p.add_vm(&new.entry());
                }
                self.start(new)
            });
            match started {
                Ok(()) => tracing::info!(vm = id, "VM joins this client platform"),
                Err(e) => tracing::error!(vm = id, "VM cannot start here: {e}"),
            }
        }
    }

    /// What the control panel wants of VM `i`.
    fn supervise(&mut self, c: &dyn VmControl, i: usize) {
        let port = self.port.clone();
        let vm = &mut self.vms[i];
        if vm.mode == Mode::Ending || vm.exited() {
            return;
        }
        let id = vm.id;
        let freeze = |on: bool| {
            if let Some(p) = &port {
                p.freeze(id, on);
            }
        };
        match (c.desired(id), vm.mode) {
            (Desired::End(why), _) => vm.end(why),
            (Desired::Run, Mode::Held) => {
                tracing::info!(vm = id, "running");
                vm.send_all(VcpuEvent::Resume);
                vm.mode = Mode::Running;
            }
            (Desired::Hold, Mode::Running) => {
                tracing::info!(vm = id, "suspended");
                vm.send_all(VcpuEvent::Pause { save: false });
                vm.mode = Mode::Held;
            }
            (Desired::MigrateOut, Mode::Running | Mode::Held) => {
                tracing::info!(vm = id, "holding its vCPUs to migrate it");
                freeze(true);
                vm.saved.iter_mut().for_each(|s| *s = None);
                vm.send_all(VcpuEvent::Pause { save: true });
                vm.mode = Mode::Saving(Instant::now());
            }
            // The migration was called off before it was delivered: the VM
            // goes back to what the control panel wants of it now.
            (Desired::Run, Mode::Saving(_)) => {
                freeze(false);
                vm.send_all(VcpuEvent::Resume);
                vm.mode = Mode::Running;
            }
            (Desired::Hold, Mode::Saving(_)) => {
                freeze(false);
                vm.mode = Mode::Held;
            }
            _ => {}
        }
    }

    /// Every vCPU of VM `i` is saved: save the VM and hand it over.
    fn deliver(&mut self, i: usize, since: Instant) {
        let Some(c) = self.control.clone() else { return };
        let vm = &mut self.vms[i];
        let id = vm.id;
        let device = match vm.vm.save_state() {
            Ok(d) => d,
            Err(e) => return vm.end(format!("cannot save the VM's device state to migrate it: {e}")),
        };
        let vcpus = vm.saved.iter().flatten().map(|s| (**s).clone()).collect();
        let snap = VmSnapshot { vm: id, device, vcpus, memory: vm.vm.all_memory().to_vec() };
        let bytes = snap.encode();
        match c.migrated_out(id, &bytes) {
            Ok(to) => vm.end(format!("migrated to {to} ({} KiB, held {:?})", bytes.len() / 1024, since.elapsed())),
            Err(e) => {
                tracing::warn!(vm = id, "the migration could not be delivered ({e}); trying again");
                self.retry_at = Some(Instant::now() + DELIVERY_RETRY);
            }
        }
    }

    /// Ask saving VMs for their states again once the retry time came.
    fn retry_delivery(&mut self) {
        if self.retry_at.is_none_or(|at| Instant::now() < at) {
            return;
        }
        self.retry_at = None;
        for vm in self.vms.iter_mut().filter(|v| matches!(v.mode, Mode::Saving(_))) {
            vm.saved.iter_mut().for_each(|s| *s = None);
            vm.send_all(VcpuEvent::Pause { save: true });
        }
    }

    /// SIGUSR1: the live remote counters.
    fn dump(&self) {
        let Some(p) = &self.port else { return };
        tracing::info!(link = ?p.stats(), "live counters");
        for vm in &self.vms {
            if let Some(s) = p.vm_stats(vm.id) {
                tracing::info!(vm = vm.id, stats = ?s, "live counters");
            }
        }
    }

    fn finish(self, serve_failed: Option<RemoteError>) -> Vec<VmReport> {
        let mut out = Vec::new();
        for mut vm in self.vms {
            vm.report.vcpus.sort_by_key(|v| v.vcpu);
            if let Some(p) = &self.port {
                vm.report.remote = p.vm_stats(vm.id);
            }
            if let Some((addr, len)) = self.opts.keep_memory {
                vm.report.memory = vm.vm.memory(addr, len).map(<[u8]>::to_vec);
            }
            if let Some(e) = &serve_failed {
                for v in vm.report.vcpus.iter_mut().filter(|v| v.result.is_ok()) {
                    v.result = Err(format!("the client's interrupt poller failed: {e}"));
                }
            }
            out.push(vm.report);
        }
        out
    }
}

/// What vCPU `n` of `spec`'s VM runs on its thread: the guest, its exits
/// routed by the VM's device map, until it ends; then what it did.
fn vcpu_body(
    spec: Arc<VmSpec>,
    n: u16,
    mut vcpu: Vcpu,
    port: Option<Arc<ClientPort>>,
    ticker: Arc<Ticker>,
    time_exits: bool,
    live: Option<Arc<Mailbox<VcpuCounters>>>,
) -> impl FnOnce(&mut crate::vcpu::VcpuEvents, &Arc<AtomicBool>) -> VcpuReport + Send + 'static {
    move |events, stopping| {
        let remote = match &port {
            Some(p) => match p.vcpu(spec.id, n, Some(stopping.clone())) {
                Ok(r) => Some(r),
                Err(e) => return VcpuReport::failed(n, e.to_string()),
            },
            None => None,
        };
        if let Some(l) = &live {
            // Seen (with nothing counted) from the start, even if it never exits.
            l.put(VcpuCounters::default());
        }
        let mut router = Router::new(&spec.map, &spec.local, remote);
        router.reset_on(&spec.reset);
        router.tick_with(&ticker);
        if let Some(port) = spec.console_port {
            router.tap_console(port);
        }
        let mut times =
            time_exits.then(|| Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"));
        let mut last: Option<Instant> = None;
        let t0 = Instant::now();
        let result = vcpu.run(&mut |v| events.before_entry(v), &mut |e| {
            if let Some(h) = times.as_mut() {
                let now = Instant::now();
                if let Some(l) = last {
                    h.saturating_record((now - l).as_nanos() as u64);
                }
                last = Some(now);
            }
            let flow = router.handle(e);
            // A metrics reader asked for a copy: one relaxed load per exit.
            if let Some(l) = live.as_ref().filter(|l| l.wanted()) {
                l.publish(VcpuCounters::of(router.stats(), router.per_device(), router.times()));
            }
            flow
        });
        if let Some(l) = &live {
            l.put(VcpuCounters::of(router.stats(), router.per_device(), router.times()));
        }
        let tail = router.console().map(|t| t.last_lines(8)).filter(|t| !t.is_empty());
        let result = match (result, tail) {
            (Err(e), Some(tail)) => Err(format!("{e}; the console's last lines:\n{tail}")),
            (Err(e), None) => Err(e.to_string()),
            // A kernel that panics (panic=-1) resets at once: that is a
            // failure, not a clean end.
            (Ok(r), Some(tail)) if r.reset && tail.contains("Kernel panic") => {
                Err(format!("the kernel panicked and reset the VM; the console's last lines:\n{tail}"))
            }
            (Ok(r), _) => Ok(r),
        };
        VcpuReport {
            vcpu: n,
            result,
            reports: router.reports().to_vec(),
            exits: router.stats(),
            per_device: router.per_device().to_vec(),
            device_times: router.times().to_vec(),
            exit_times: times,
            elapsed: t0.elapsed(),
        }
    }
}
