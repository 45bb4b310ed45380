//! Running VMs: what to run ([`VmSpec`], [`Boot`]), how ([`RunOptions`],
//! [`VmControl`] for a control panel that changes its mind while they
//! run), and what they did ([`RunReport`]). [`run`] hands them to the
//! [`crate::supervisor`]: several VMs in one client process, each vCPU on a
//! thread of its own ([`crate::vcpu`]), remote devices over one shared
//! [`ClientPort`].

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmfabric_dataplane::Transport;
use dmfabric_devices::Device;

use crate::devmap::{DeviceMap, MapError, Target};
use crate::exits::{AccessTimes, DeviceCount, ExitStats, LiveMap, LocalDevices};
use crate::kvm::KvmError;
use crate::linux::{LinuxError, LinuxImage};
use crate::local::{IrqTarget, LocalWiring, RamTarget};
use crate::migrate::{SnapshotError, VmSnapshot};
use crate::remote::{ClientConfig, ClientPort, ClientStats, RemoteError, VmRemoteStats};
pub use crate::vcpu::VcpuReport;

/// How a VM starts.
#[derive(Debug)]
pub enum Boot {
    /// A flat image loaded at `entry`; each vCPU starts in 64-bit long mode
    /// with `args` in rdi, rsi, rdx (the last entry serves the rest).
    Flat { image: Vec<u8>, entry: u64, args: Vec<[u64; 3]> },
    /// A Linux bzImage and initramfs: vCPU 0 enters the kernel, the others
    /// wait for its INIT/SIPI.
    Linux(LinuxImage),
    /// The state of a VM migrated here.
    Restore(Box<VmSnapshot>),
}

/// One VM to run.
pub struct VmSpec {
    pub id: u32,
    pub vcpus: u16,
    pub mem_bytes: usize,
    pub boot: Boot,
    /// Where its ports and MMIO go; the control panel may replace it while
    /// the VM runs (each exit reads the current one).
    pub map: Arc<LiveMap>,
    /// Device models kept in the client process, by `Target::Local` index.
    pub local: Arc<LocalDevices>,
    /// Where local models' interrupt lines go (set when the VM exists).
    pub irq_target: IrqTarget,
    /// The RAM local models do DMA to (set when the VM exists).
    pub ram: RamTarget,
    /// Set by a local i8042's reset pulse: the VM stops, reset.
    pub reset: Arc<AtomicBool>,
    /// A 16550's base port whose output to keep the end of, for reports
    /// of a VM that stops (Linux VMs: COM1).
    /// Where its interrupt controllers are: KVM's, or the I/O APIC a
    /// device model (KVM's split irqchip).
    pub irqchip: crate::kvm::IrqChipMode,
    pub console_port: Option<u64>,
}

impl std::fmt::Debug for VmSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSpec")
            .field("id", &self.id)
            .field("vcpus", &self.vcpus)
            .field("mem_bytes", &self.mem_bytes)
            .field("boot", &self.boot)
            .finish()
    }
}

/// A test guest's device map: the debug port and `ranges` (space, base,
/// length, target).
pub fn test_guest_map(ranges: &[(dmfabric_wire::Space, u64, u64, Target)]) -> Result<DeviceMap<Target>, MapError> {
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
    ) -> Result<VmSpec, MapError> {
        let map = test_guest_map(ranges)?;
        Ok(VmSpec {
            id,
            vcpus,
            mem_bytes: TEST_VM_MEM,
            boot: Boot::Flat { image: image.to_vec(), entry: crate::guests::LOAD_ADDR, args },
            map: Arc::new(LiveMap::from_pointee(map)),
            local: local.into_iter().map(Mutex::new).collect::<Vec<_>>().into(),
            irq_target: IrqTarget::default(),
            ram: RamTarget::default(),
            reset: Arc::new(AtomicBool::new(false)),
            irqchip: crate::kvm::IrqChipMode::Kernel,
            console_port: None,
        })
    }

    /// Give the VM the targets the local models built with `wiring` use:
    /// their interrupt lines, their DMA and an i8042's reset reach this VM.
    pub fn wire_local(&mut self, wiring: &LocalWiring) {
        self.irq_target = wiring.target.clone();
        self.ram = wiring.ram.clone();
        self.reset = wiring.reset.clone();
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
    ) -> Result<VmSpec, MapError> {
        let mut spec = VmSpec::test_guest(id, vcpus, &[], Vec::new(), ranges, local)?;
        spec.mem_bytes = mem_bytes;
        spec.boot = Boot::Linux(image);
        spec.console_port = Some(u64::from(dmfabric_devices::platform::pc::COM1.base));
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
    /// Each message asks for the live remote counters on stderr (SIGUSR1).
    pub dump: Option<crossbeam_channel::Receiver<()>>,
    /// A message here stops the run at once (Ctrl-C); the `stop` flag of
    /// [`run`] is looked at whenever the supervisor wakes.
    pub wake: Option<crossbeam_channel::Receiver<()>>,
    /// Copy this guest-physical range `(addr, len)` of every VM into its
    /// report when the run ends (what a guest left in memory).
    pub keep_memory: Option<(u64, usize)>,
    /// What the control panel wants of each VM while it runs.
    pub control: Option<Control>,
    /// Where a metrics endpoint reads the run's counters while it runs.
    pub live: Option<Arc<crate::live::LiveRun>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(30),
            time_exits: false,
            dump: None,
            wake: None,
            keep_memory: None,
            control: None,
            live: None,
        }
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

/// Why the control panel could not take a migrating VM's state.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("The migration was called off")]
    CalledOff,
    #[error("The store did not take it: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The control panel as the supervisor of a run sees it.
pub trait VmControl: Send + Sync {
    fn desired(&self, vm: u32) -> Desired;
    /// `vm` was saved for its move: deliver the snapshot to where it goes;
    /// returns where that is (for the VM's report). On an error the VM
    /// stays held and it is tried again.
    fn migrated_out(&self, vm: u32, snapshot: &[u8]) -> Result<String, ControlError>;
    /// VMs to start now (launched, or migrated here) while the run goes on.
    fn arrivals(&self) -> Vec<VmSpec> {
        Vec::new()
    }
    /// Whether VMs may still arrive: the run does not end while they may.
    fn pending(&self) -> bool {
        false
    }
    /// A message here each time what the control panel wants may have
    /// changed (a new revision of its tables).
    fn changes(&self) -> Option<crossbeam_channel::Receiver<()>> {
        None
    }
    /// When to ask again even without a change (a state of a VM migrating
    /// here may be in the store by then).
    fn next_look(&self) -> Option<Instant> {
        None
    }
    /// This client platform's keys, when they changed since the last call
    /// (a rekey by the control panel): the port seals and checks with them
    /// from then on.
    fn keys(&self) -> Option<dmfabric_wire::auth::KeyRing> {
        None
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
    #[error("VM {vm}: its migrated state cannot be used: {error}")]
    Snapshot { vm: u32, error: SnapshotError },
    #[error("VM {vm}: cannot start a thread for vCPU {vcpu}: {source}")]
    Thread {
        vm: u32,
        vcpu: u16,
        #[source]
        source: std::io::Error,
    },
}

/// The transport of a run and who the client is on it.
pub type Link = (Box<dyn Transport>, ClientConfig);

/// Run `specs` until every vCPU has exited, `opts.timeout` passed, `stop`
/// was set, or a vCPU failed (which stops the other vCPUs of its VM).
/// Remote ranges go over the transport of `link` to the servers of its
/// config; the transport is given back at the end. With a control
/// ([`RunOptions::control`]) VMs may also join while it runs
/// ([`VmControl::arrivals`]); the run then lasts while the control says
/// more may come ([`VmControl::pending`]).
pub fn run(
    specs: Vec<VmSpec>,
    link: Option<Link>,
    opts: &RunOptions,
    stop: &AtomicBool,
) -> Result<(RunReport, Option<Box<dyn Transport>>), MachineError> {
    let mut ids: Vec<u32> = specs.iter().map(|s| s.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(MachineError::DuplicateVm(w[0]));
    }
    let started = Instant::now();
    let mut sup = crate::supervisor::Supervisor::new(opts, stop, started);
    let vms = specs.into_iter().map(|s| sup.create(s)).collect::<Result<Vec<_>, _>>()?;
    let port = match link {
        Some((t, cfg)) => {
            let entries = vms.iter().map(|v| v.entry()).collect::<Vec<_>>();
            Some(Arc::new(ClientPort::connect(t, &cfg, &entries)?))
        }
        None => None,
    };
    sup.set_port(port.clone());
    if let Some(l) = &opts.live {
        l.set_port(port.clone());
    }
    for vm in vms {
        sup.start(vm)?;
    }
    let reports = sup.run();
    if let Some(l) = &opts.live {
        l.end();
    }
    let client = port.as_ref().map(|p| p.stats());
    let transport = port.and_then(|p| Arc::try_unwrap(p).ok()).map(ClientPort::into_transport);
    Ok((RunReport { vms: reports, client }, transport))
}
