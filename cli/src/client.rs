//! `dmfabric client`: run the VMs a config file describes on this client
//! platform, their remote devices served by `dmfabric server`s on the link.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dmfabric_control::keys::KeyFile;
use dmfabric_dataplane::hello::Sealer;
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode};
use dmfabric_dataplane::{TransportKind, TransportSpec};
use dmfabric_devices::platform::pc::{PcLayout, Role};
use dmfabric_devices::regfile::RegisterFile;
use dmfabric_devices::{ByteSink, Device};
use dmfabric_vmm_shim::devmap::{Remote, Target};
use dmfabric_vmm_shim::exits::LiveMap;
use dmfabric_vmm_shim::guests;
use dmfabric_vmm_shim::linux::LinuxImage;
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec};
use dmfabric_vmm_shim::remote::ClientConfig;
use dmfabric_wire::auth::KeyRing;
use dmfabric_wire::{MacAddr, Space};
use serde::{Deserialize, Serialize};

mod store;

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The VMs to run and where their devices are (TOML; see --example-config).
    #[arg(long, short, required_unless_present_any = ["example_config", "store"])]
    config: Option<PathBuf>,
    /// Take the VMs of this client platform (--client-id) from the control
    /// panel's store (a redb file or etcd://HOST:PORT) and follow it: VMs
    /// start when launched, suspend, resume, shut down and migrate as
    /// `dmfabric ctl vm ...` says; VMs migrating here when it starts arrive
    /// with their state. Needs --iface.
    #[arg(long, conflicts_with = "config")]
    store: Option<String>,
    /// This client platform's id in the store.
    #[arg(long, requires = "store")]
    client_id: Option<u16>,
    /// With --store: retransmit a request after this long ...
    #[arg(long, default_value_t = 20)]
    timeout_ms: u64,
    /// ... this many times before the VM stops (room for device moves,
    /// which hold requests until the device's state has arrived).
    #[arg(long, default_value_t = 250)]
    retries: u32,
    /// With --store: how long to wait for the state of a VM migrating here.
    #[arg(long, default_value_t = 30.0)]
    arrival_s: f64,
    /// Print an example config and exit.
    #[arg(long)]
    example_config: bool,
    /// Override the config's interface.
    #[arg(long)]
    iface: Option<String>,
    /// Override the config's run limit, in seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Also write the per-VM and per-device counters as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Serve the counters in the Prometheus text format at
    /// http://ADDR:PORT/metrics (overrides the config's `metrics`; off
    /// unless one of them gives it).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
}

pub const EXAMPLE: &str = r#"# dmfabric client config: the VMs of this client platform.
client = 3              # client platform id (unique on the link)
hypervisor = 1          # hypervisor id inside the client platform
key_file = "client-3.key"   # this platform's key (relative to this file; mode 0600):
                        # `dmfabric keygen --client 3 --out client-3.key`, the same file in the servers' [[client]]
run_seconds = 60        # stop every VM after this long
timeout_ms = 20         # retransmit a request after this long ...
retries = 4             # ... this many times, then stop the VM
# metrics = "127.0.0.1:9464"   # serve Prometheus metrics at http://ADDR:PORT/metrics (off unless given)

[link]
transport = "xdp"       # xdp | packet | udp
iface = "dmf0"
xdp_mode = "auto"       # auto | native | generic
# udp_bind = "169.254.77.1:47000"    # with transport = "udp"
# udp_peer = "169.254.77.2:47000"

[[vm]]
id = 1
vcpus = 1
memory_mib = 4
guest = "io_loop"       # built-in test guest (io_loop, pio_loop, irq_wait) or a flat binary's path
args = [1000, 0x500, 0xd0000000]   # rdi, rsi, rdx; vcpu_args = [[..], [..]] gives each vCPU its own

# Where the VM's port and MMIO ranges go: a device on a server ...
[[vm.device]]
space = "pio"
base = 0x500
len = 0x100
server = 1
device = 1

[[vm.device]]
space = "mmio"
base = 0xd0000000
len = 0x1000
server = 1
device = 1

[[vm]]
id = 2
guest = "irq_wait"
args = [100, 0x600, 0]  # wait for 100 edge interrupts from the irqtest device

[[vm.device]]
space = "pio"
base = 0x600
len = 8
server = 1
device = 102
irq = [5]               # the lines the device may raise on this VM (others are refused)

# A Linux VM (scripts/guest-images.sh fetches Debian's kernel and builds the initramfs):
# [[vm]]
# id = 3
# memory_mib = 512
# kernel = "/var/cache/dmfabric/linux-6.1.0-47/vmlinuz"
# initrd = "/var/cache/dmfabric/linux-6.1.0-47/initramfs.cpio.gz"
# pc = "remote"         # COM1, RTC, i8042 on server 1 (dmfabric server --pc-vm 3), with their
#                       # lines and the i8042's reset; "local": in this process

# ... or a model kept in this process (the hybrid case):
# [[vm.device]]
# space = "pio"
# base = 0x700
# len = 0x10
# local = "regfile"
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    client: u16,
    /// This client platform's key file (required when a device is remote).
    key_file: Option<PathBuf>,
    #[serde(default = "one")]
    hypervisor: u16,
    #[serde(default = "default_run_seconds")]
    run_seconds: f64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_retries")]
    retries: u32,
    /// Where to serve the Prometheus metrics (off unless given).
    metrics: Option<SocketAddr>,
    #[serde(default)]
    link: LinkConfig,
    #[serde(default)]
    vm: Vec<VmConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkConfig {
    #[serde(default = "default_transport")]
    transport: String,
    iface: Option<String>,
    #[serde(default = "default_xdp_mode")]
    xdp_mode: String,
    udp_bind: Option<SocketAddr>,
    udp_peer: Option<SocketAddr>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            transport: default_transport(),
            iface: None,
            xdp_mode: default_xdp_mode(),
            udp_bind: None,
            udp_peer: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmConfig {
    id: u32,
    #[serde(default = "one")]
    vcpus: u16,
    #[serde(default = "default_memory_mib")]
    memory_mib: usize,
    /// A built-in test guest or a flat binary (or give `kernel`).
    guest: Option<String>,
    /// A Linux bzImage to boot instead of a guest, with its initramfs and
    /// command line.
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    /// A PC's COM1, RTC and i8042: "remote" (on `pc_server`, devices
    /// 1000·id+1..3 as `dmfabric server --pc-vm <id>` has them) or "local".
    pc: Option<String>,
    #[serde(default = "one")]
    pc_server: u16,
    /// With pc = "local": where the UART's output goes (default: stdout).
    console_log: Option<String>,
    /// Where the VM's interrupt controllers are: "kernel" (KVM's PIC, I/O
    /// APIC and PIT; the default) or "remote" (KVM's split irqchip: the
    /// local APICs in KVM, the I/O APIC a device model on a server, mapped
    /// at 0xfec00000 with `msi = true`; no PIC or PIT; with pc = "remote",
    /// the PC devices' lines drive that I/O APIC's pins: it must run on
    /// `pc_server`).
    irqchip: Option<String>,
    #[serde(default)]
    args: [u64; 3],
    vcpu_args: Option<Vec<[u64; 3]>>,
    #[serde(default)]
    device: Vec<RangeConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeConfig {
    space: String,
    base: u64,
    len: u64,
    server: Option<u16>,
    device: Option<u32>,
    /// The server that runs the device when `server` is an owner that
    /// forwards (placed by the control panel).
    runs_on: Option<u16>,
    /// The IRQ lines the device may raise on this VM.
    #[serde(default)]
    irq: Vec<u32>,
    /// Whether the device may reset the VM.
    #[serde(default)]
    reset: bool,
    /// A model kept in this process: "regfile" or "virtio-blk".
    local: Option<String>,
    /// A local virtio-blk's image file (a raw image), and whether it is read-only.
    image: Option<PathBuf>,
    /// The range is a virtio-mmio device (a remote virtio-blk): a Linux
    /// guest is told where it is on its command line. Local virtio-blks are.
    #[serde(default)]
    virtio: bool,
    /// The device may send the VM MSIs (its remote I/O APIC).
    #[serde(default)]
    msi: bool,
    #[serde(default)]
    read_only: bool,
}

fn one() -> u16 {
    1
}
fn default_run_seconds() -> f64 {
    60.0
}
fn default_timeout_ms() -> u64 {
    20
}
fn default_retries() -> u32 {
    4
}
fn default_transport() -> String {
    "xdp".into()
}
fn default_xdp_mode() -> String {
    "auto".into()
}
fn default_memory_mib() -> usize {
    4
}

/// A config checked and turned into what the shim runs.
struct Plan {
    client: ClientConfig,
    /// None when every device is local.
    link: Option<(TransportSpec, String)>,
    vms: Vec<VmSpec>,
    run: Duration,
    metrics: Option<SocketAddr>,
}

fn load(path: &Path, iface: Option<&str>, seconds: Option<f64>) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let mut cfg: FileConfig = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().lines().collect::<Vec<_>>().join(" ")))?;
    if let Some(k) = &mut cfg.key_file {
        *k = path.parent().unwrap_or(Path::new(".")).join(&k);
    }
    plan(cfg, iface, seconds).with_context(|| format!("{}", path.display()))
}

fn plan(cfg: FileConfig, iface: Option<&str>, seconds: Option<f64>) -> anyhow::Result<Plan> {
    let keys = match &cfg.key_file {
        Some(path) => {
            let file = KeyFile::load(path)?;
            if file.client != cfg.client {
                bail!("key_file {} is client platform {}'s, not {}'s", path.display(), file.client, cfg.client);
            }
            Some(file.ring()?)
        }
        None => None,
    };
    plan_vms(cfg, iface, seconds, false, keys)
}

/// Parse and check the text of a client config, touching no file (the
/// guest, kernel and key files it names are read when it runs): what the
/// fuzz target drives.
pub fn parse_config(text: &str) -> anyhow::Result<()> {
    let cfg: FileConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().replace('\n', " ")))?;
    check_config(&cfg, false)
}

/// What can be checked of a config without reading files.
fn check_config(cfg: &FileConfig, may_be_empty: bool) -> anyhow::Result<()> {
    if cfg.vm.is_empty() && !may_be_empty {
        bail!("no [[vm]]: nothing to run");
    }
    if !(cfg.run_seconds > 0.0 && cfg.run_seconds <= 86_400.0) {
        bail!("run_seconds must be between 0 and 86400, not {}", cfg.run_seconds);
    }
    if cfg.timeout_ms == 0 || cfg.timeout_ms > 60_000 {
        bail!("timeout_ms must be between 1 and 60000, not {}", cfg.timeout_ms);
    }
    let mut ids = BTreeSet::new();
    let mut remote = false;
    for vm in &cfg.vm {
        if !ids.insert(vm.id) {
            bail!("VM {} is listed twice", vm.id);
        }
        remote |= check_vm(vm).with_context(|| format!("VM {}", vm.id))?;
    }
    if remote || may_be_empty {
        link_spec(cfg, None)?;
    }
    Ok(())
}

/// The address space a device range names.
fn space_of(name: &str) -> anyhow::Result<Space> {
    match name {
        "pio" => Ok(Space::Pio),
        "mmio" => Ok(Space::Mmio),
        other => bail!("device space {other:?}: expected \"pio\" or \"mmio\""),
    }
}

/// Check `vm`'s fields and device map (not its files); whether it has a
/// remote device.
fn check_vm(vm: &VmConfig) -> anyhow::Result<bool> {
    if !(1..=dmfabric_vmm_shim::kvm::MAX_VCPUS as u16).contains(&vm.vcpus) {
        bail!("vcpus must be between 1 and {}, not {}", dmfabric_vmm_shim::kvm::MAX_VCPUS, vm.vcpus);
    }
    if !(2..=4096).contains(&vm.memory_mib) {
        bail!("memory_mib must be between 2 and 4096, not {}", vm.memory_mib);
    }
    match (&vm.guest, &vm.kernel) {
        (Some(_), Some(_)) => bail!("give either guest or kernel, not both"),
        (None, None) => bail!("give a guest (a built-in test guest or a flat binary) or a kernel (a bzImage)"),
        _ => {}
    }
    let mut remote = false;
    let mut map = dmfabric_vmm_shim::devmap::DeviceMap::default();
    match vm.pc.as_deref() {
        None | Some("local") => {}
        Some("remote") => {
            remote = true;
            PcLayout::new(vm.id).context("pc")?;
        }
        Some(other) => bail!("pc = {other:?}: \"remote\" or \"local\""),
    }
    for r in &vm.device {
        let space = space_of(&r.space)?;
        match (r.server, r.device, r.local.as_deref()) {
            (Some(_), Some(device), None) => {
                remote = true;
                if let Some(l) = r.irq.iter().find(|&&l| l >= 24) {
                    bail!("device {device}: irq {l}: lines are 0 to 23");
                }
            }
            (None, None, Some("regfile" | "virtio-blk")) => {}
            (None, None, Some(other)) => {
                bail!("local model {other:?}: the client can keep \"regfile\" and \"virtio-blk\" models")
            }
            _ => bail!("device range {:#x}+{:#x}: give either server and device, or local", r.base, r.len),
        }
        map.add(space, r.base, r.len, ()).map_err(anyhow::Error::msg)?;
    }
    Ok(remote)
}

/// [`plan`]; `may_be_empty`: VMs may come later (placed by the control
/// panel); `keys`: this client platform's (needed when a device is remote).
fn plan_vms(
    cfg: FileConfig,
    iface: Option<&str>,
    seconds: Option<f64>,
    may_be_empty: bool,
    keys: Option<KeyRing>,
) -> anyhow::Result<Plan> {
    check_config(&cfg, may_be_empty)?;
    let run_seconds = seconds.unwrap_or(cfg.run_seconds);
    if !(run_seconds > 0.0 && run_seconds <= 86_400.0) {
        bail!("run_seconds must be between 0 and 86400, not {run_seconds}");
    }
    let mut servers = BTreeSet::new();
    let mut vms = Vec::new();
    for vm in &cfg.vm {
        vms.push(vm_spec(vm, &mut servers).with_context(|| format!("VM {}", vm.id))?);
    }
    let link = if servers.is_empty() && !may_be_empty { None } else { Some(link_spec(&cfg, iface)?) };
    let keys = match keys {
        Some(k) => k,
        None if link.is_none() => KeyRing::single(0, &dmfabric_wire::auth::Secret::from_bytes([0; 32])),
        None => bail!(
            "devices on servers need this client platform's key: key_file = \"client-{c}.key\" (make it with `dmfabric keygen --client {c} --out client-{c}.key`, and list it in the servers' [[client]] tables)",
            c = cfg.client
        ),
    };
    Ok(Plan {
        client: ClientConfig {
            client: cfg.client,
            hypervisor: cfg.hypervisor,
            servers: servers.into_iter().collect(),
            retry: Retry { timeout: Duration::from_millis(cfg.timeout_ms), retries: cfg.retries },
            hello_timeout: Duration::from_secs(5),
            sealer: Sealer::new(keys),
            open_on_demand: false,
        },
        link,
        vms,
        run: Duration::from_secs_f64(run_seconds),
        metrics: cfg.metrics,
    })
}

/// The transport of `cfg.link`, and a description of it.
fn link_spec(cfg: &FileConfig, iface: Option<&str>) -> anyhow::Result<(TransportSpec, String)> {
    let kind: TransportKind = cfg.link.transport.parse().map_err(|e| anyhow::anyhow!("link.transport: {e}"))?;
    let iface = iface.map(str::to_string).or(cfg.link.iface.clone());
    let link = match kind {
        TransportKind::Xdp | TransportKind::Packet => {
            let Some(iface) = iface else { bail!("link.iface (or --iface) is required with transport {kind}") };
            if kind == TransportKind::Xdp {
                let mut x = XdpConfig::new(iface);
                x.mode = cfg.link.xdp_mode.parse::<XdpMode>().map_err(|e| anyhow::anyhow!("link.xdp_mode: {e}"))?;
                TransportSpec::Xdp(x)
            } else {
                TransportSpec::Packet { iface }
            }
        }
        TransportKind::Udp => {
            let (Some(local), Some(peer)) = (cfg.link.udp_bind, cfg.link.udp_peer) else {
                bail!("link.udp_bind and link.udp_peer are required with transport udp");
            };
            let mac = MacAddr([0x02, 0xdc, 0, 0, (cfg.client >> 8) as u8, cfg.client as u8]);
            TransportSpec::Udp { local, peer: Some(peer), mac }
        }
        TransportKind::Mem => bail!("link.transport: mem exists only inside one process"),
    };
    let name = match &link {
        TransportSpec::Xdp(x) => format!("AF_XDP on {}", x.iface),
        TransportSpec::Packet { iface } => format!("AF_PACKET on {iface}"),
        TransportSpec::Udp { local, .. } => format!("UDP {local}"),
    };
    Ok((link, name))
}

fn vm_spec(vm: &VmConfig, servers: &mut BTreeSet<u16>) -> anyhow::Result<VmSpec> {
    check_vm(vm)?;
    // (Checked: a guest or a kernel, not both.)
    let image = match &vm.guest {
        None => Vec::new(),
        Some(guest) => match guests::ALL.iter().find(|(name, _)| name == guest) {
            Some((_, bytes)) => bytes.to_vec(),
            None if Path::new(guest).exists() => {
                std::fs::read(guest).with_context(|| format!("Cannot read the guest image {guest}"))?
            }
            None => {
                let names: Vec<&str> = guests::ALL.iter().map(|(n, _)| *n).collect();
                bail!("guest {guest:?} is neither a built-in guest ({}) nor a file", names.join(", "));
            }
        },
    };
    let mut ranges = Vec::new();
    let mut local: Vec<Box<dyn Device>> = Vec::new();
    // What local models are wired to: this VM's interrupt lines, RAM and
    // reset, the console (a local UART's output), the local disks' images.
    let sink: Box<dyn ByteSink> = match (&vm.console_log, vm.pc.as_deref()) {
        (Some(path), Some("local")) => Box::new(FileSink(
            std::fs::File::create(path).with_context(|| format!("Cannot create the console log {path}"))?,
        )),
        _ => Box::new(FileSink(std::io::stdout())),
    };
    let wiring = dmfabric_vmm_shim::local::LocalWiring::new(
        dmfabric_vmm_shim::local::IrqTarget::default(),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        sink,
    );
    const PC: [Role; 3] = [Role::Com1, Role::Rtc, Role::I8042];
    match vm.pc.as_deref() {
        None => {}
        Some("remote") => {
            servers.insert(vm.pc_server);
            let layout = PcLayout::new(vm.id).context("pc")?;
            ranges.extend(dmfabric_vmm_shim::devmap::pc_remote_ranges(vm.pc_server, &layout, &PC));
        }
        Some("local") => {
            let (models, pc_ranges) = dmfabric_vmm_shim::local::pc_devices(&PC, 0, &wiring);
            local.extend(models);
            ranges.extend(pc_ranges);
        }
        // (Checked by check_vm: "remote" or "local".)
        Some(_) => {}
    }
    for r in &vm.device {
        let space = space_of(&r.space)?;
        let target = match (r.server, r.device, r.local.as_deref()) {
            (Some(server), Some(device), None) => {
                servers.insert(server);
                let runs_on = r.runs_on.unwrap_or(server);
                servers.insert(runs_on);
                let mut remote = Remote::new(server, device).runs_on(runs_on).lines(&r.irq);
                if r.reset {
                    remote = remote.resets();
                }
                if r.msi {
                    remote = remote.msis();
                }
                Target::Remote(remote)
            }
            (None, None, Some("regfile")) => {
                let model = match space {
                    Space::Pio => {
                        let (Ok(base), Ok(len)) = (u16::try_from(r.base), u16::try_from(r.len)) else {
                            bail!("port range {:#x}+{:#x} does not fit the 64 KiB port space", r.base, r.len);
                        };
                        RegisterFile::new(Some((base, len)), None)
                    }
                    Space::Mmio => {
                        let Ok(len) = u32::try_from(r.len).map(|l| l.min(1 << 20)) else {
                            bail!("a local regfile holds at most 1 MiB of MMIO");
                        };
                        RegisterFile::new(None, Some((r.base, len)))
                    }
                };
                local.push(Box::new(model));
                Target::Local(local.len() - 1)
            }
            (None, None, Some("virtio-blk")) => {
                local.push(local_disk(r, space, local.len(), &wiring)?);
                Target::Local(local.len() - 1)
            }
            (None, None, Some(other)) => {
                bail!(
                    "device range {:#x}+{:#x}: local {other:?}: the local models are regfile and virtio-blk",
                    r.base,
                    r.len
                )
            }
            _ => bail!("device range {:#x}+{:#x}: give either server and device, or local", r.base, r.len),
        };
        ranges.push((space, r.base, r.len, target));
    }
    if let Some(kernel) = &vm.kernel {
        let read = |what: &str, p: &str| std::fs::read(p).with_context(|| format!("Cannot read the {what} {p}"));
        let image = LinuxImage {
            kernel: read("kernel", kernel)?,
            initrd: vm.initrd.as_deref().map(|p| read("initramfs", p)).transpose()?,
            cmdline: with_virtio_devices(
                vm.cmdline.clone().unwrap_or_else(|| dmfabric_vmm_shim::linux::DEFAULT_CMDLINE.to_string()),
                &vm.device,
            ),
        };
        dmfabric_vmm_shim::linux::check(&image, vm.memory_mib << 20)?;
        let mut spec =
            VmSpec::linux(vm.id, vm.vcpus, vm.memory_mib << 20, image, &ranges, local).map_err(anyhow::Error::msg)?;
        spec.wire_local(&wiring);
        spec.irqchip = irqchip_mode(vm)?;
        return Ok(spec);
    }
    let args = vm.vcpu_args.clone().unwrap_or_else(|| vec![vm.args]);
    let mut spec = VmSpec::test_guest(vm.id, vm.vcpus, &image, args, &ranges, local).map_err(anyhow::Error::msg)?;
    spec.mem_bytes = vm.memory_mib << 20;
    spec.wire_local(&wiring);
    spec.irqchip = irqchip_mode(vm)?;
    if guests::LOAD_ADDR as usize + image.len() > spec.mem_bytes {
        bail!(
            "the guest image ({} bytes at {:#x}) does not fit in {} MiB",
            image.len(),
            guests::LOAD_ADDR,
            vm.memory_mib
        );
    }
    Ok(spec)
}

/// Where VM `vm`'s interrupt controllers are. A remote one needs the
/// I/O APIC's window mapped to a device that may send MSIs.
fn irqchip_mode(vm: &VmConfig) -> anyhow::Result<dmfabric_vmm_shim::kvm::IrqChipMode> {
    use dmfabric_vmm_shim::kvm::IrqChipMode;
    match vm.irqchip.as_deref() {
        None | Some("kernel") => Ok(IrqChipMode::Kernel),
        Some("remote") => {
            let base = dmfabric_devices::platform::pc::IOAPIC_MMIO;
            let Some(ioapic) =
                vm.device.iter().find(|r| r.msi && r.space == "mmio" && r.base <= base && base < r.base + r.len)
            else {
                bail!(
                    "VM {}: irqchip = \"remote\" needs its I/O APIC: a device of kind ioapic (dmfabric ctl add device --kind ioapic --vm {} --server S), or in a config file a [[vm.device]] with space = \"mmio\", base = {base:#x}, len = 0x1000, server, device and msi = true",
                    vm.id,
                    vm.id
                );
            };
            // A remote PC's lines drive the I/O APIC of the server that
            // hosts the PC devices; local ones would need a PIC.
            match vm.pc.as_deref() {
                None => {}
                Some("remote") if ioapic.runs_on.or(ioapic.server) == Some(vm.pc_server) => {}
                Some("remote") => bail!(
                    "VM {}: irqchip = \"remote\" with pc = \"remote\": servers run from config files send the PC devices' lines only to an I/O APIC on their own server: run the I/O APIC on pc_server {} (or place the VM with the control panel, whose servers send them across)",
                    vm.id,
                    vm.pc_server
                ),
                Some(_) => bail!(
                    "VM {}: irqchip = \"remote\" has no PIC for local PC devices' lines: use pc = \"remote\" (on the I/O APIC's server) or leave out pc",
                    vm.id
                ),
            }
            Ok(IrqChipMode::Split)
        }
        Some(other) => bail!("VM {}: irqchip {other:?}: \"kernel\" or \"remote\"", vm.id),
    }
}

/// `cmdline` with a `virtio_mmio.device=SIZE@BASE:IRQ` for each virtio-mmio
/// range of the VM (Linux's virtio_mmio driver then finds the device:
/// there is no bus to discover it on), unless the command line names it.
fn with_virtio_devices(mut cmdline: String, ranges: &[RangeConfig]) -> String {
    for r in ranges.iter().filter(|r| r.virtio || r.local.as_deref() == Some("virtio-blk")) {
        let irq = r.irq.first().copied().unwrap_or(dmfabric_devices::platform::pc::VIRTIO_BLK_IRQ);
        let arg = format!("virtio_mmio.device={}@{:#x}:{irq}", r.len, r.base);
        if !cmdline.contains(&format!("@{:#x}:", r.base)) {
            cmdline.push(' ');
            cmdline.push_str(&arg);
        }
    }
    cmdline
}

/// A virtio-blk kept in this process over the image `r` names (the
/// hybrid case: the same model a server runs, its DMA done at once).
fn local_disk(
    r: &RangeConfig,
    space: Space,
    index: usize,
    wiring: &dmfabric_vmm_shim::local::LocalWiring,
) -> anyhow::Result<Box<dyn Device>> {
    use dmfabric_devices::{DeviceKind, DeviceSpec};
    let Some(path) = &r.image else {
        bail!("device range {:#x}: a local virtio-blk needs image = \"PATH\" (a raw image file)", r.base);
    };
    let len = dmfabric_devices::platform::pc::VIRTIO_MMIO_LEN;
    if space != Space::Mmio || r.len != u64::from(len) {
        bail!("device range {:#x}: a virtio-blk is {len:#x} bytes of MMIO (space = \"mmio\", len = {len:#x})", r.base);
    }
    let options = dmfabric_storage::OpenOptions { read_only: r.read_only, ..Default::default() };
    let image = dmfabric_storage::UringImage::open(path, options)?;
    // Local models are numbered by their place in the VM's list.
    let id = 0x4c00_0000 + index as u32;
    let line = r.irq.first().copied().unwrap_or(dmfabric_devices::platform::pc::VIRTIO_BLK_IRQ);
    let spec = DeviceSpec {
        id,
        kind: DeviceKind::VirtioBlk { line },
        pio: None,
        mmio: Some((r.base, len)),
        vm: None,
        shard: None,
    };
    wiring.add_block(id, Box::new(image));
    Ok(dmfabric_vmm_shim::local::local_device(&spec, wiring, std::time::Instant::now()))
}

/// A local UART's output into a file or stdout.
struct FileSink<W>(W);

impl<W: std::io::Write + Send> ByteSink for FileSink<W> {
    fn put(&mut self, b: u8) {
        let _ = self.0.write_all(&[b]);
        if b == b'\n' {
            let _ = self.0.flush();
        }
    }
}

/// `--json`: one object per VM, plus the client's counters.
#[derive(Debug, Serialize)]
struct ReportJson {
    vms: Vec<VmJson>,
    client: Option<dmfabric_vmm_shim::remote::ClientStats>,
}

#[derive(Debug, Serialize)]
struct VmJson {
    id: u32,
    ok: bool,
    error: Option<String>,
    exit_codes: Vec<Option<u32>>,
    reports: Vec<Vec<u32>>,
    exits: dmfabric_vmm_shim::exits::ExitStats,
    remote: Option<dmfabric_vmm_shim::remote::VmRemoteStats>,
    devices: Vec<DeviceJson>,
}

#[derive(Debug, Serialize)]
struct DeviceJson {
    target: String,
    reads: u64,
    writes: u64,
}

fn target_name(t: Target) -> String {
    match t {
        Target::Local(i) => format!("local {i}"),
        Target::Remote(r) => format!("server {} device {}", r.server, r.device),
        Target::Debug => "debug port".into(),
    }
}

fn to_json(report: &RunReport) -> ReportJson {
    ReportJson {
        vms: report
            .vms
            .iter()
            .map(|vm| VmJson {
                id: vm.id,
                ok: vm.error().is_none(),
                error: vm.error().map(str::to_string),
                exit_codes: vm.vcpus.iter().map(|v| v.result.as_ref().ok().map(|r| r.exit_code)).collect(),
                reports: vm.vcpus.iter().map(|v| v.reports.clone()).collect(),
                exits: vm.exits(),
                remote: vm.remote,
                devices: vm
                    .per_device()
                    .iter()
                    .map(|d| DeviceJson { target: target_name(d.target), reads: d.reads, writes: d.writes })
                    .collect(),
            })
            .collect(),
        client: report.client,
    }
}

fn print_report(report: &RunReport) {
    for vm in &report.vms {
        let e = vm.exits();
        let reset = vm.vcpus.iter().any(|v| v.result.as_ref().is_ok_and(|r| r.reset));
        match vm.error() {
            None if vm.ended.is_some() => {
                eprintln!("dmfabric client: VM {}: {}", vm.id, vm.ended.as_deref().unwrap_or_default())
            }
            None if reset => eprintln!("dmfabric client: VM {}: reset by its i8042: stopped", vm.id),
            None => {
                let codes: Vec<String> =
                    vm.vcpus.iter().map(|v| v.result.as_ref().map_or(0, |r| r.exit_code).to_string()).collect();
                eprintln!("dmfabric client: VM {}: exited (codes {})", vm.id, codes.join(","));
            }
            Some(err) => eprintln!("dmfabric client: VM {}: stopped: {err}", vm.id),
        }
        for v in vm.vcpus.iter().filter(|v| !v.reports.is_empty()) {
            let words: Vec<String> = v.reports.iter().map(|w| format!("{w:#x}")).collect();
            eprintln!("dmfabric client: VM {} vCPU {}: reported {}", vm.id, v.vcpu, words.join(" "));
        }
        eprintln!(
            "dmfabric client: VM {}: exits local {} remote {} unmapped reads {} writes {} reports {}",
            vm.id, e.local, e.remote, e.unmapped_reads, e.unmapped_writes, e.reports
        );
        if let Some(r) = vm.remote {
            eprintln!(
                "dmfabric client: VM {}: remote requests {} retransmits {} completions {} interrupts {}",
                vm.id, r.requests, r.retransmits, r.completions, r.interrupts
            );
        }
        for d in vm.per_device() {
            eprintln!(
                "dmfabric client: VM {}: {}: reads {} writes {}",
                vm.id,
                target_name(d.target),
                d.reads,
                d.writes
            );
        }
    }
    if let Some(c) = report.client {
        eprintln!(
            "dmfabric client: link: requests {} retransmits {} completions {} nacks {} interrupts {} (duplicates {}, stale {}, acks {}) stale completions {} unknown VM {} other client {} malformed {} foreign {}",
            c.requests,
            c.retransmits,
            c.completions,
            c.nacks,
            c.interrupts,
            c.interrupt_duplicates,
            c.interrupt_stale,
            c.interrupt_acks,
            c.stale_completions,
            c.unknown_vm,
            c.other_client,
            c.malformed,
            c.foreign
        );
    }
}

pub fn run(args: ClientArgs, signals: &crate::Signals) -> anyhow::Result<()> {
    let stop = &signals.stop;
    if args.example_config {
        print!("{EXAMPLE}");
        return Ok(());
    }
    // The metrics port first: one in use stops the client before it did anything.
    let mut endpoint = args.metrics.map(crate::metrics::Endpoint::bind).transpose()?;
    dmfabric_vmm_shim::kvm::probe()?;
    let (plan, control) = match (&args.store, args.config.as_deref()) {
        (Some(store), _) => {
            let (plan, control) = store::store_plan(store, &args)?;
            (plan, Some(control))
        }
        (None, Some(path)) => (load(path, args.iface.as_deref(), args.seconds)?, None),
        (None, None) => bail!("--config (or --store) is required"),
    };
    if endpoint.is_none() {
        endpoint = plan.metrics.map(crate::metrics::Endpoint::bind).transpose().context("metrics")?;
    }
    let live = match endpoint {
        Some(e) => {
            let live = dmfabric_vmm_shim::live::LiveRun::new();
            let (l, id, addr) = (live.clone(), plan.client.client, e.addr());
            // The vCPU threads are not pinned: any core will do.
            e.serve(None, move || crate::metrics::render(crate::metrics::client_families(id, &l)))?;
            eprintln!("dmfabric client: metrics at http://{addr}/metrics");
            Some(live)
        }
        None => None,
    };
    let opts = RunOptions {
        timeout: plan.run,
        dump: Some(signals.dump.clone()),
        wake: Some(signals.wake.clone()),
        control: control.clone().map(|c| machine::Control(c as Arc<dyn machine::VmControl>)),
        live,
        ..RunOptions::default()
    };
    let transport = match &plan.link {
        Some((spec, _)) => Some(dmfabric_dataplane::open(spec)?),
        None => None,
    };
    eprintln!(
        "dmfabric client: client {} running {} VM(s){}",
        plan.client.client,
        plan.vms.len(),
        match &plan.link {
            Some((_, name)) => format!(" with servers {:?} over {name}", plan.client.servers),
            None => ", all devices local".into(),
        }
    );
    let link = transport.map(|t| (t, plan.client.clone()));
    let report = machine::run(plan.vms, link, &opts, stop)?.0;
    print_report(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&to_json(&report))?;
        std::fs::write(path, text + "\n").with_context(|| format!("Cannot write {}", path.display()))?;
    }
    let failed: Vec<String> = report.vms.iter().filter(|v| v.error().is_some()).map(|v| v.id.to_string()).collect();
    if stop.load(Ordering::Relaxed) {
        bail!("Interrupted: VMs stopped");
    }
    if !failed.is_empty() {
        bail!("VM(s) {} stopped with an error (above)", failed.join(", "));
    }
    if let Some(c) = &control {
        if let Some(first) = c.failures().first() {
            bail!("{first}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let cfg: FileConfig = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(cfg.key_file.as_deref(), Some(Path::new("client-3.key")));
        let keys = dmfabric_wire::auth::KeyRing::single(1, &dmfabric_wire::auth::Secret::from_bytes([7; 32]));
        let plan = plan_vms(cfg, None, None, false, Some(keys)).unwrap();
        assert_eq!(plan.vms.len(), 2);
        assert_eq!(plan.client.servers, vec![1]);
        // VM 2's device may raise line 5 and nothing else.
        let map = plan.vms[1].map.load();
        let Some(Target::Remote(r)) = map.targets().find(|t| matches!(t, Target::Remote(_))) else {
            panic!("a remote device")
        };
        assert!(r.may_raise(5) && !r.may_raise(4) && !r.reset, "{r:?}");
        let machine::Boot::Flat { args, .. } = &plan.vms[0].boot else { panic!("a flat test guest") };
        assert_eq!(args, &vec![[1000, 0x500, 0xd000_0000]]);
    }

    fn error_of(text: &str) -> String {
        let cfg: FileConfig = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
        match plan(cfg, None, None) {
            Ok(_) => "no error".into(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_linux_guest_is_told_where_its_virtio_devices_are() {
        let text = "client = 3\nkey_file = \"k\"\n[[vm]]\nid = 1\nkernel = \"/k\"\n\
                    [[vm.device]]\nspace = \"mmio\"\nbase = 0xfeb00000\nlen = 0x200\nserver = 1\ndevice = 15\nirq = [10]\nvirtio = true\n\
                    [[vm.device]]\nspace = \"mmio\"\nbase = 0xfeb00200\nlen = 0x200\nlocal = \"virtio-blk\"\nimage = \"/d\"\n\
                    [[vm.device]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x100\nserver = 1\ndevice = 1\n";
        let cfg: FileConfig = toml::from_str(text).unwrap();
        let line = with_virtio_devices("console=ttyS0".into(), &cfg.vm[0].device);
        assert_eq!(line, "console=ttyS0 virtio_mmio.device=512@0xfeb00000:10 virtio_mmio.device=512@0xfeb00200:10");
        assert_eq!(with_virtio_devices(line.clone(), &cfg.vm[0].device), line, "named once");
    }

    #[test]
    fn a_remote_irqchip_takes_a_remote_pc_on_its_own_server() {
        let mode = |pc: &str, ioapic_server: u16| {
            let text = format!(
                "client = 3\n[[vm]]\nid = 1\nguest = \"demo_apic\"\nirqchip = \"remote\"\n{pc}\
                 [[vm.device]]\nspace = \"mmio\"\nbase = 0xfec00000\nlen = 0x1000\nserver = {ioapic_server}\ndevice = 1005\nmsi = true\n"
            );
            let cfg: FileConfig = toml::from_str(&text).unwrap();
            irqchip_mode(&cfg.vm[0]).map_err(|e| e.to_string())
        };
        use dmfabric_vmm_shim::kvm::IrqChipMode;
        assert_eq!(mode("", 1), Ok(IrqChipMode::Split));
        assert_eq!(mode("pc = \"remote\"\n", 1), Ok(IrqChipMode::Split));
        assert!(mode("pc = \"remote\"\n", 2).unwrap_err().contains("run the I/O APIC on pc_server 1"));
        assert!(mode("pc = \"local\"\n", 1).unwrap_err().contains("no PIC for local PC devices"));
    }

    #[test]
    fn bad_configs_name_what_is_wrong() {
        let vm = "client = 1\n[link]\niface = \"x\"\n[[vm]]\nid = 1\nguest = \"io_loop\"\n";
        assert!(error_of("client = 1\n").contains("nothing to run"));
        assert!(error_of(&format!("{vm}[[vm]]\nid = 1\nguest = \"io_loop\"\n")).contains("VM 1 is listed twice"));
        assert!(error_of(&vm.replace("io_loop", "nope")).contains("neither a built-in guest"));
        assert!(error_of(&format!("{vm}vcpus = 99\n")).contains("vcpus must be between"));
        assert!(error_of(&format!("{vm}colour = 1\n")).contains("unknown field"));
        let overlap = format!(
            "{vm}[[vm.device]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nlocal = \"regfile\"\n[[vm.device]]\nspace = \"pio\"\nbase = 0x508\nlen = 4\nserver = 1\ndevice = 1\n"
        );
        assert!(error_of(&overlap).contains("overlaps"), "{}", error_of(&overlap));
        let both =
            format!("{vm}[[vm.device]]\nspace = \"pio\"\nbase = 0x500\nlen = 1\nserver = 1\nlocal = \"regfile\"\n");
        assert!(error_of(&both).contains("either server and device, or local"));
        let remote = "[[vm.device]]\nspace = \"pio\"\nbase = 0x500\nlen = 1\nserver = 1\ndevice = 1\n";
        let no_iface = format!("client = 1\n[[vm]]\nid = 1\nguest = \"io_loop\"\n{remote}");
        assert!(error_of(&no_iface).contains("link.iface"), "{}", error_of(&no_iface));
        let no_key = format!("{vm}{remote}");
        assert!(error_of(&no_key).contains("dmfabric keygen --client 1"), "{}", error_of(&no_key));
        let bad_line = format!("{vm}{remote}irq = [30]\n");
        assert!(error_of(&bad_line).contains("irq 30: lines are 0 to 23"), "{}", error_of(&bad_line));
        let missing = format!("client = 1\nkey_file = \"/nonexistent.key\"\n{}", &vm["client = 1\n".len()..]);
        assert!(error_of(&missing).contains("/nonexistent.key"), "{}", error_of(&missing));
        assert_eq!(
            error_of("client = 1\n[[vm]]\nid = 1\nguest = \"io_loop\"\n"),
            "no error",
            "all local: no link needed"
        );
    }
}
