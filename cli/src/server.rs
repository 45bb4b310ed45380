//! `dmfabric server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dmfabric_control::watch::Watch;
use dmfabric_dataplane::poll::{self, Handler, PollConfig};
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode, XdpTransport, ZeroCopy};
use dmfabric_dataplane::{FrameBatch, Transport, TransportKind, TransportSpec};
use dmfabric_devices::platform::pc::{self, PcLayout};
use dmfabric_devices::{DeviceKind, DeviceSpec};
use dmfabric_dm_workers::placed::Transit;
use dmfabric_dm_workers::server::{DeviceEnv, Server, ServerStats};
use dmfabric_dm_workers::sharded::{ShardStats, ShardedServer, WorkerIdle};
use dmfabric_pinning::{Layout, LayoutSpec};
use dmfabric_wire::MacAddr;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Transport: xdp (AF_XDP), packet (AF_PACKET) or udp.
    #[arg(long, default_value = "xdp")]
    transport: TransportKind,
    /// Network interface to serve on (xdp, packet; for udp it gives the MAC identity).
    #[arg(long)]
    iface: Option<String>,
    /// This server's id; requests naming another server are Nacked.
    #[arg(long, default_value_t = 1)]
    server_id: u16,
    /// UDP address to bind (udp transport).
    #[arg(long, default_value = "0.0.0.0:47000")]
    udp_bind: SocketAddr,
    /// Where the XDP program runs: auto (native, else generic; generic on veth), native, generic.
    #[arg(long, default_value = "auto")]
    xdp_mode: XdpMode,
    /// AF_XDP zero-copy: auto (where the driver has it), on, off.
    #[arg(long, default_value = "auto")]
    zero_copy: ZeroCopy,
    /// NIC queue to bind the AF_XDP socket to.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Fail instead of removing an XDP program left by a killed run.
    #[arg(long)]
    keep_stale_xdp: bool,
    /// Thread layout: auto (from the core count), rtc (one core receives,
    /// runs the devices and transmits) or split:1:W (one data-plane core,
    /// W worker cores joined by SPSC rings).
    #[arg(long, default_value = "auto")]
    layout: LayoutSpec,
    /// Cores to use, e.g. `1` or `2-5` (default: every online core; the
    /// run-to-completion layout takes the last).
    #[arg(long)]
    cores: Option<String>,
    /// Register-file test devices to host, ids 1..=N (spread over the workers).
    #[arg(long, default_value_t = 1)]
    test_devices: u32,
    /// Interrupt test devices to host, ids 101..: each at ports 0x600-0x607
    /// (every VM maps its own), raising IRQ 5 on the VM that used it last.
    #[arg(long, default_value_t = 2)]
    irq_test_devices: u32,
    /// Never block when idle: lowest latency, each core at 100 %.
    #[arg(long)]
    busy_poll: bool,
    /// Empty polls before an idle core naps (ignored with --busy-poll).
    #[arg(long, default_value_t = 200_000)]
    spin: u32,
    /// Print counters to stderr every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
    /// Print the final counters as one `stats-json: {...}` line on stdout.
    #[arg(long)]
    stats_json: bool,
    /// The devices to host (TOML; see --example-config). Without it: the
    /// test devices, and the PC devices of each --pc-vm.
    #[arg(long, conflicts_with_all = ["pc_vm"])]
    config: Option<PathBuf>,
    /// Take the devices from the control panel's store (a redb file or
    /// etcd://HOST:PORT) and follow its changes while running: devices
    /// placed on --server-id run here, requests for other servers' devices
    /// are forwarded there, device models move with their state.
    #[arg(long, conflicts_with_all = ["config", "pc_vm"])]
    store: Option<String>,
    /// How often the store is asked for changes, in milliseconds.
    #[arg(long, default_value_t = 50)]
    watch_ms: u64,
    /// Print an example device config and exit.
    #[arg(long)]
    example_config: bool,
    /// Host a PC's devices for VM N (repeatable): COM1 (0x3f8, IRQ 4) as
    /// device 1000N+1, the RTC (0x70, IRQ 8) 1000N+2, the i8042 (0x60/0x64,
    /// IRQ 1/12) 1000N+3 and an event timer (0x700, IRQ 5) 1000N+4.
    #[arg(long, value_name = "VM")]
    pc_vm: Vec<u32>,
    /// Where VM console logs (vm-<id>.log) and the console socket live
    /// [default: /run/dmfabric/server-<id>].
    #[arg(long)]
    console_dir: Option<PathBuf>,
}

/// The console directory of server `id` unless told otherwise.
pub fn default_console_dir(id: u16) -> PathBuf {
    PathBuf::from(format!("/run/dmfabric/server-{id}"))
}

/// Either layout's handler, with periodic reporting.
enum Served {
    Rtc(Server),
    Split(ShardedServer),
}

impl Served {
    fn stats(&self) -> (ServerStats, Option<ShardStats>) {
        match self {
            Served::Rtc(s) => (s.stats(), None),
            Served::Split(s) => {
                let (a, b) = s.stats();
                (a, Some(b))
            }
        }
    }
}

struct Reporting {
    served: Served,
    every: Option<Duration>,
    next: Instant,
}

impl Handler for Reporting {
    fn on_frame(&mut self, frame: &[u8], tx: &mut FrameBatch, now: Instant) {
        match &mut self.served {
            Served::Rtc(s) => s.on_frame(frame, tx, now),
            Served::Split(s) => s.on_frame(frame, tx, now),
        }
    }

    fn on_poll(&mut self, tx: &mut FrameBatch, now: Instant) {
        match &mut self.served {
            Served::Rtc(s) => s.on_poll(tx, now),
            Served::Split(s) => s.on_poll(tx, now),
        }
        use std::sync::atomic::Ordering::Relaxed;
        // SIGUSR1 asks for the counters now; --stats-interval every so often.
        let asked = crate::DUMP.load(Relaxed) && crate::DUMP.swap(false, Relaxed);
        let due = self.every.is_some_and(|_| now >= self.next);
        if due {
            self.next = now + self.every.unwrap_or_default();
        }
        if asked || due {
            let (stats, shards) = self.served.stats();
            eprintln!("dmfabric server: {stats}{}", shard_summary(shards.as_ref()));
            for d in &stats.devices {
                eprintln!("dmfabric server: {d}");
            }
        }
    }
}

fn shard_summary(s: Option<&ShardStats>) -> String {
    match s {
        None => String::new(),
        Some(s) => format!(
            " | workers executed {:?} ring-full {} overflow-dropped {} hand-off p50 {:?} ns p99 {:?} ns",
            s.executed, s.ring_full, s.overflow_dropped, s.handoff_p50_ns, s.handoff_p99_ns
        ),
    }
}

pub fn run(args: ServerArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    if args.example_config {
        print!("{}", crate::server_config::EXAMPLE);
        return Ok(());
    }
    let online = dmfabric_pinning::available_cores();
    let cores = match &args.cores {
        Some(list) => {
            let cores = dmfabric_pinning::parse_core_list(list)?;
            dmfabric_pinning::check_allowed(&cores, &online)?;
            cores
        }
        None => online,
    };
    let layout = dmfabric_pinning::choose_shared(args.layout, &cores)?;
    if args.store.is_some() && !matches!(layout, Layout::RunToCompletion { .. }) {
        bail!(
            "--store: a server placed by the control panel runs the run-to-completion layout for now: add --layout rtc"
        );
    }
    if let Layout::Split { dataplane, .. } = &layout {
        if dataplane.len() > 1 {
            bail!("This server drives one AF_XDP queue, so the split layout takes one data-plane core: use split:1:<workers>");
        }
    }
    let dp_core = match &layout {
        Layout::RunToCompletion { core } => *core,
        Layout::Split { dataplane, .. } => dataplane[0],
    };
    if args.test_devices == 0 {
        bail!("--test-devices must be at least 1");
    }

    let spec = transport_spec(&args)?;
    let (mut transport, description) = open_transport(&spec)?;
    // The store's watch thread starts before this thread is pinned: it
    // must not share the data-plane core.
    let placed = match &args.store {
        Some(store) => Some(placement(store, args.server_id, transport.mac(), Duration::from_millis(args.watch_ms))?),
        None => None,
    };
    dmfabric_pinning::pin_current(dp_core)?;
    if args.irq_test_devices > 1000 {
        bail!("--irq-test-devices: at most 1000");
    }
    let devices = match (&args.config, &placed) {
        (_, Some(p)) => p.devices.clone(),
        (Some(path), None) => crate::server_config::load(path)?,
        (None, None) => {
            let mut devices: Vec<DeviceSpec> = (1..=args.test_devices).map(pc::test_device).collect();
            devices.extend((0..args.irq_test_devices).map(pc::irq_test_device));
            for &vm in &args.pc_vm {
                devices.extend(PcLayout::new(vm).context("--pc-vm")?.specs());
            }
            crate::server_config::check(&devices)?;
            devices
        }
    };
    let env = DeviceEnv::new(&devices);
    let console_dir = args.console_dir.clone().unwrap_or_else(|| default_console_dir(args.server_id));
    let served = match &layout {
        Layout::RunToCompletion { .. } => match &placed {
            Some(p) => Served::Rtc(Server::placed(
                args.server_id,
                transport.mac(),
                env.clone(),
                p.watch.routes(),
                p.transit.clone(),
            )),
            None => Served::Rtc(Server::with_env(args.server_id, transport.mac(), &devices, env.clone())),
        },
        Layout::Split { workers, .. } => {
            let idle =
                WorkerIdle { spin: if args.busy_poll { u32::MAX } else { args.spin }, nap: Duration::from_micros(50) };
            Served::Split(ShardedServer::start_with_env(
                args.server_id,
                transport.mac(),
                &devices,
                workers,
                idle,
                env.clone(),
            )?)
        }
    };
    // The consoles: logs and `dmfabric console` attachments, on a thread
    // of their own so that no terminal or disk holds up the data plane.
    let consoles_stop = Arc::new(AtomicBool::new(false));
    let consoles = if env.consoles.all().is_empty() {
        None
    } else {
        let (flag, consoles, dir) = (consoles_stop.clone(), env.consoles.clone(), console_dir.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new().name("dmf-consoles".into()).spawn(move || {
            // Stay off the data-plane core.
            let _ = dmfabric_pinning::pin_current(dmfabric_pinning::available_cores()[0]);
            match dmfabric_dm_workers::console::Service::open(&consoles, &dir) {
                Ok(service) => {
                    let _ = ready_tx.send(Ok(()));
                    Ok(service.run(&consoles, &flag))
                }
                Err(e) => {
                    let msg = e.to_string();
                    let _ = ready_tx.send(Err(msg));
                    Err(e)
                }
            }
        })?;
        if let Ok(Err(e)) = ready_rx.recv() {
            bail!("{e}");
        }
        Some(handle)
    };
    let where_ = match &spec {
        TransportSpec::Udp { local, .. } => format!("udp {local}"),
        _ => format!("{description} on {}", args.iface.as_deref().unwrap_or("?")),
    };
    if let (Some(p), Some(store)) = (&placed, &args.store) {
        println!(
            "dmfabric server ready: server {} ({where_}, mac {}), {layout}; placed by the control panel ({store}, revision {}): {} devices here",
            args.server_id,
            transport.mac(),
            p.watch.routes().revision(),
            devices.len()
        );
    } else {
        println!(
        "dmfabric server ready: server {} ({where_}, mac {}), {layout}; test devices 1..={}: ports {:#x}-{:#x}, mmio {:#x}-{:#x}",
        args.server_id,
        transport.mac(),
        args.test_devices,
        pc::TEST_DEVICE_PIO.base,
        pc::TEST_DEVICE_PIO.base + (pc::TEST_DEVICE_PIO.len - 1),
        pc::TEST_DEVICE_MMIO,
        pc::TEST_DEVICE_MMIO + u64::from(pc::TEST_DEVICE_MMIO_LEN - 1)
    );
    }
    for d in devices.iter().filter(|d| !matches!(d.kind, DeviceKind::RegFile | DeviceKind::IrqTest { .. })) {
        println!(
            "dmfabric server: device {} {} for {} at port {:#x}",
            d.id,
            d.kind.name(),
            d.vm.map_or("any VM".to_string(), |v| format!("VM {v}")),
            d.pio.map_or(0, |p| p.0)
        );
    }
    if !env.consoles.all().is_empty() {
        println!(
            "dmfabric server: consoles in {} (attach: dmfabric console <vm> --console-dir {})",
            console_dir.display(),
            console_dir.display()
        );
    }
    if args.config.is_none() && placed.is_none() && args.irq_test_devices > 0 {
        println!(
            "dmfabric server: interrupt test devices {}..={}: ports {:#x}-{:#x}, IRQ {}",
            pc::IRQ_TEST_FIRST_ID,
            pc::IRQ_TEST_FIRST_ID + args.irq_test_devices - 1,
            pc::IRQ_TEST.base,
            pc::IRQ_TEST.base + (pc::IRQ_TEST.len - 1),
            pc::IRQ_TEST_IRQ
        );
    }
    let every = (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    let mut handler = Reporting { served, every, next: Instant::now() + every.unwrap_or_default() };
    let cfg = PollConfig { spin: if args.busy_poll { u32::MAX } else { args.spin }, ..PollConfig::default() };
    let result = poll::run(transport.as_mut(), &mut handler, cfg, &stop);
    consoles_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = consoles {
        match h.join() {
            Ok(Ok(s)) => eprintln!(
                "dmfabric server: consoles: {} bytes logged, {} typed, {} attaches ({} refused)",
                s.bytes_logged, s.bytes_typed, s.attaches, s.refused
            ),
            Ok(Err(e)) => eprintln!("dmfabric server: consoles stopped: {e}"),
            Err(_) => eprintln!("dmfabric server: the console thread panicked"),
        }
    }
    let (stats, shards) = match handler.served {
        Served::Rtc(s) => (s.stats(), None),
        Served::Split(s) => {
            let (a, b) = s.finish();
            (a, Some(b))
        }
    };
    eprintln!("dmfabric server: {stats}{}", shard_summary(shards.as_ref()));
    for d in &stats.devices {
        eprintln!("dmfabric server: {d}");
    }
    if let Some(p) = &placed {
        use std::sync::atomic::Ordering::Relaxed;
        let h = p.watch.health();
        eprintln!(
            "dmfabric server: store: tables swapped {} times, {} failed calls, last revision {}",
            h.swaps.load(Relaxed),
            h.errors.load(Relaxed),
            p.watch.routes().revision()
        );
    }
    let t = transport.stats();
    eprintln!(
        "dmfabric server: transport {}: rx {} tx {} rx-dropped {} tx-dropped {} io-errors {}",
        transport.kind(),
        t.rx_frames,
        t.tx_frames,
        t.rx_dropped,
        t.tx_dropped,
        t.io_errors
    );
    if args.stats_json {
        let transport = serde_json::json!({
            "rx_frames": t.rx_frames, "tx_frames": t.tx_frames, "rx_dropped": t.rx_dropped,
            "tx_dropped": t.tx_dropped, "io_errors": t.io_errors });
        println!("stats-json: {}", serde_json::json!({ "server": stats, "shards": shards, "transport": transport }));
    }
    result.context("The data plane stopped")?;
    Ok(())
}

/// A server placed by the control panel: its watch, the device states in
/// transit, and the devices placed on it when it started.
struct Placement {
    watch: Watch,
    transit: Arc<Transit>,
    devices: Vec<DeviceSpec>,
}

fn placement(store: &str, id: u16, mac: MacAddr, period: Duration) -> anyhow::Result<Placement> {
    let opened = dmfabric_control::store::open(store)?;
    let db = opened.load()?;
    let Some(me) = db.servers.get(&id) else {
        bail!(
            "server {id} is not in the store ({store}): add it with `dmfabric ctl --store {store} add server --id {id} --mac {mac}`"
        );
    };
    if dmfabric_control::routing::parse_mac(&me.mac) != Some(mac.0) {
        bail!(
            "the store has server {id} at MAC {}, but this interface's is {mac}: clients would send elsewhere (fix the record, or run on the right interface)",
            me.mac
        );
    }
    let mut devices = Vec::new();
    for spec in dmfabric_dm_workers::placed::specs_in(&db, id) {
        devices.push(spec.map_err(anyhow::Error::msg)?);
    }
    crate::server_config::check(&devices)?;
    let transit = Transit::new();
    let watch = Watch::start(opened, format!("dmfabric server {id}"), period, Some(transit.clone().chores()))?;
    Ok(Placement { watch, transit, devices })
}

fn transport_spec(args: &ServerArgs) -> anyhow::Result<TransportSpec> {
    Ok(match args.transport {
        TransportKind::Xdp | TransportKind::Packet => {
            let Some(iface) = args.iface.clone() else {
                bail!("--iface is required with --transport {}", args.transport)
            };
            if args.transport == TransportKind::Xdp {
                let mut cfg = XdpConfig::new(iface);
                cfg.mode = args.xdp_mode;
                cfg.zero_copy = args.zero_copy;
                cfg.queue = args.queue;
                cfg.clear_stale_program = !args.keep_stale_xdp;
                TransportSpec::Xdp(cfg)
            } else {
                TransportSpec::Packet { iface }
            }
        }
        TransportKind::Udp => {
            let mac = match &args.iface {
                Some(i) => dmfabric_dataplane::if_mac(i).with_context(|| format!("Cannot read the MAC of {i}"))?,
                None => MacAddr([0x02, 0xdf, 0, 0, (args.server_id >> 8) as u8, args.server_id as u8]),
            };
            TransportSpec::Udp { local: args.udp_bind, peer: None, mac }
        }
        TransportKind::Mem => bail!("--transport mem exists only inside one process (bench --transport mem)"),
    })
}

/// Open the transport; returns it with a description of how it attached.
fn open_transport(spec: &TransportSpec) -> anyhow::Result<(Box<dyn Transport>, String)> {
    Ok(match spec {
        TransportSpec::Xdp(cfg) => {
            let t = XdpTransport::open(cfg)?;
            if let Some(removed) = t.removed_stale_program() {
                eprintln!("dmfabric server: {removed}");
            }
            let d = format!("AF_XDP, {}", t.attachment());
            (Box::new(t), d)
        }
        TransportSpec::Packet { .. } => (dmfabric_dataplane::open(spec)?, "AF_PACKET".into()),
        TransportSpec::Udp { .. } => (dmfabric_dataplane::open(spec)?, "UDP".into()),
    })
}
