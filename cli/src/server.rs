//! `dmfabric server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dmfabric_control::keys::KeyFile;
use dmfabric_control::watch::{Follow, Watch};
use dmfabric_dataplane::observe::Mailbox;
use dmfabric_dataplane::poll::{self, Handler, PollConfig};
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode, XdpTransport, ZeroCopy};
use dmfabric_dataplane::{FrameBatch, Transport, TransportKind, TransportSpec};
use dmfabric_devices::platform::pc::{self, PcLayout};
use dmfabric_devices::{DeviceKind, DeviceSpec};
use dmfabric_dm_workers::backend::{Backend, Inline, ShardStats};
use dmfabric_dm_workers::console;
use dmfabric_dm_workers::env::DeviceEnv;
use dmfabric_dm_workers::peers::{Client, Registry};
use dmfabric_dm_workers::placement::{PlacementLink, Planner};
use dmfabric_dm_workers::server::{Server, ServerStats};
use dmfabric_dm_workers::sharded::{Sharded, WorkerIdle};
use dmfabric_dm_workers::table::Devices;
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
    /// UDP address to bind (udp transport): give the address of the
    /// interface the clients reach (the default is the loopback only).
    #[arg(long, default_value = "127.0.0.1:47000")]
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
    /// Inject faults on this server's transport (testing how clients and
    /// device DMA ride them out), e.g. drop=0.05,dup=0.05,seed=7.
    #[arg(long, value_name = "SPEC")]
    faults: Option<String>,
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
    /// Serve the counters in the Prometheus text format at
    /// http://ADDR:PORT/metrics (off unless given), from a thread off the
    /// data-plane core.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// The devices to host and the client platforms that may use them
    /// (TOML; see --example-config). Without it: the test devices, and the
    /// PC devices of each --pc-vm, for the clients of --clients.
    #[arg(long, conflicts_with_all = ["pc_vm"])]
    config: Option<PathBuf>,
    /// The client platforms this server acts for — each one's id, MAC, key
    /// file and VMs (TOML `[[client]]` tables, as in --example-config) —
    /// when the devices come from flags (or in addition to --config's).
    #[arg(long, conflicts_with = "store")]
    clients: Option<PathBuf>,
    /// Take the devices from the control panel's store (a redb file or
    /// etcd://HOST:PORT) and follow its changes while running: devices
    /// placed on --server-id run here, requests for other servers' devices
    /// are forwarded there, device models move with their state.
    #[arg(long, conflicts_with_all = ["config", "pc_vm"])]
    store: Option<String>,
    /// How often the store is asked for changes when it cannot push them
    /// (etcd away), in milliseconds; a store that pushes is read when told.
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

/// The server in either layout (the backend runs the models inline or on
/// worker shards), with periodic reporting.
struct Reporting {
    server: Server<Box<dyn Backend>>,
    every: Option<Duration>,
    next: Instant,
    /// Where a metrics scrape asks for a copy of the counters.
    metrics: Option<Arc<Mailbox<Snapshot>>>,
}

/// The counters a metrics scrape reads.
type Snapshot = (ServerStats, Option<ShardStats>);

impl Handler for Reporting {
    fn on_frame(&mut self, frame: &[u8], tx: &mut FrameBatch, now: Instant) {
        self.server.on_frame(frame, tx, now);
    }

    fn on_poll(&mut self, tx: &mut FrameBatch, now: Instant) {
        self.server.on_poll(tx, now);
        use std::sync::atomic::Ordering::Relaxed;
        // SIGUSR1 asks for the counters now; --stats-interval every so often.
        let asked = crate::DUMP.load(Relaxed) && crate::DUMP.swap(false, Relaxed);
        let due = self.every.is_some_and(|_| now >= self.next);
        if due {
            self.next = now + self.every.unwrap_or_default();
        }
        if asked || due {
            print_stats(&self.server.stats(), self.server.shard_stats().as_ref());
        }
        // A scrape asked for a copy (one relaxed load per poll, as above).
        if let Some(m) = self.metrics.as_ref().filter(|m| m.wanted()) {
            m.publish((self.server.stats(), self.server.shard_stats()));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.server.next_deadline()
    }
}

fn print_stats(stats: &ServerStats, shards: Option<&ShardStats>) {
    eprintln!("dmfabric server: {stats}{}", shard_summary(shards));
    for d in &stats.devices {
        eprintln!("dmfabric server: {d}");
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

/// The thread layout the flags ask for, on the cores they allow.
fn layout(args: &ServerArgs) -> anyhow::Result<Layout> {
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
    if let Layout::Split { dataplane, .. } = &layout {
        if dataplane.len() > 1 {
            bail!("This server drives one AF_XDP queue, so the split layout takes one data-plane core: use split:1:<workers>");
        }
    }
    Ok(layout)
}

/// The client platforms an unplaced server acts for, with their keys: those
/// of --config and --clients.
fn registry(args: &ServerArgs) -> anyhow::Result<Registry> {
    let mut entries = Vec::new();
    for path in [&args.config, &args.clients].into_iter().flatten() {
        entries.extend(crate::server_config::load(path)?.clients);
    }
    if entries.is_empty() {
        bail!(
            "no client platform may use this server: list them (id, MAC, key file, VMs) in --clients FILE or in --config's [[client]] tables (see --example-config), or place the server with --store"
        );
    }
    let mut clients = Vec::new();
    for e in entries {
        let file = KeyFile::load(&e.key_file).with_context(|| format!("client {}", e.id))?;
        if file.client != e.id {
            bail!(
                "client {}: its key file {} is client {}'s: give each client platform its own key",
                e.id,
                e.key_file.display(),
                file.client
            );
        }
        let keys = file.ring().with_context(|| format!("client {}: {}", e.id, e.key_file.display()))?;
        clients.push(Client { id: e.id, mac: e.mac, hypervisor: e.hypervisor, keys, vms: e.vms });
    }
    let mut ids: Vec<u16> = clients.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        bail!("a client platform is listed twice (in --config and --clients?)");
    }
    Ok(Registry::new(clients, Vec::new(), std::collections::HashMap::new()))
}

/// The devices of an unplaced server: its config, or the test devices and
/// the PC devices of each --pc-vm.
fn devices(args: &ServerArgs) -> anyhow::Result<Vec<DeviceSpec>> {
    if let Some(path) = &args.config {
        return Ok(crate::server_config::load(path)?.devices);
    }
    if args.test_devices == 0 {
        bail!("--test-devices must be at least 1");
    }
    if args.irq_test_devices > 1000 {
        bail!("--irq-test-devices: at most 1000");
    }
    let mut devices: Vec<DeviceSpec> = (1..=args.test_devices).map(pc::test_device).collect();
    devices.extend((0..args.irq_test_devices).map(pc::irq_test_device));
    for &vm in &args.pc_vm {
        devices.extend(PcLayout::new(vm).context("--pc-vm")?.specs());
    }
    crate::server_config::check(&devices)?;
    Ok(devices)
}

/// Make (if asked) and open each block device's image once, so that a
/// missing, too small or read-only one stops the server now with one line;
/// the devices open them again when they are built.
fn open_images(images: &[crate::server_config::BlockImage], env: &DeviceEnv) -> anyhow::Result<()> {
    for i in images {
        if let Some(size) = i.create {
            if !i.path.exists() {
                dmfabric_storage::create_image(&i.path, size).with_context(|| format!("device {}", i.device))?;
                println!("dmfabric server: device {}: created {} ({} MiB)", i.device, i.path.display(), size >> 20);
            }
        }
        let spec = dmfabric_dm_workers::env::ImageSpec { path: i.path.clone(), read_only: i.read_only };
        let opened = spec.open().with_context(|| format!("device {}", i.device))?;
        use dmfabric_devices::BlockBackend;
        println!(
            "dmfabric server: device {}: image {} ({} MiB, {}{})",
            i.device,
            i.path.display(),
            opened.capacity() >> 20,
            if opened.direct() { "O_DIRECT" } else { "buffered" },
            if i.read_only { ", read-only" } else { "" }
        );
        env.images.set(i.device, spec);
    }
    Ok(())
}

/// Where the models run: on this core, or on the layout's worker cores.
fn backend(
    layout: &Layout,
    devices: &[DeviceSpec],
    env: &DeviceEnv,
    args: &ServerArgs,
) -> anyhow::Result<Box<dyn Backend>> {
    Ok(match layout {
        Layout::RunToCompletion { .. } => Box::new(Inline::new(Devices::new(devices, env))),
        Layout::Split { workers, .. } => {
            let idle =
                WorkerIdle { spin: if args.busy_poll { u32::MAX } else { args.spin }, nap: Duration::from_micros(50) };
            Box::new(Sharded::start(devices, env, workers, idle)?)
        }
    })
}

/// The console service on a thread of its own, off the data-plane core, so
/// that no terminal or disk holds up the data plane. It opens the console
/// directory when there is a console: at once for UARTs the server starts
/// with (an unusable directory is an error now), later for a UART placed on
/// it while it runs.
struct ConsoleThread {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<console::ServiceStats>,
}

impl ConsoleThread {
    fn start(consoles: Arc<console::Consoles>, dir: &std::path::Path) -> anyhow::Result<ConsoleThread> {
        let service = console::Service::open(&consoles, dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new().name("dmf-consoles".into()).spawn(move || {
            let _ = dmfabric_pinning::pin_current(dmfabric_pinning::available_cores()[0]);
            service.run(&consoles, &flag)
        })?;
        Ok(ConsoleThread { stop, handle })
    }

    fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.handle.join() {
            Ok(s) if s.bytes_logged + s.bytes_typed + s.attaches + s.refused > 0 => eprintln!(
                "dmfabric server: consoles: {} bytes logged, {} typed, {} attaches ({} refused)",
                s.bytes_logged, s.bytes_typed, s.attaches, s.refused
            ),
            Ok(_) => {}
            Err(_) => eprintln!("dmfabric server: the console thread panicked"),
        }
    }
}

pub fn run(args: ServerArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    if args.example_config {
        print!("{}", crate::server_config::EXAMPLE);
        return Ok(());
    }
    // The metrics port first: one in use stops the server before it did anything.
    let endpoint = args.metrics.map(crate::metrics::Endpoint::bind).transpose()?;
    let layout = layout(&args)?;
    let dp_core = match &layout {
        Layout::RunToCompletion { core } => *core,
        Layout::Split { dataplane, .. } => dataplane[0],
    };
    let faults = args
        .faults
        .as_deref()
        .map(dmfabric_dataplane::fault::FaultConfig::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--faults: {e}"))?;
    let spec = transport_spec(&args)?;
    let (mut transport, description) = open_transport(&spec)?;
    let mac = transport.mac();
    let env = DeviceEnv::new();
    if let Some(path) = &args.config {
        open_images(&crate::server_config::load(path)?.images, &env)?;
    }
    // The store's watch thread starts before this thread is pinned: it
    // must not share the data-plane core.
    let placed = match &args.store {
        Some(store) => Some(placement(store, args.server_id, mac, &env, Duration::from_millis(args.watch_ms))?),
        None => None,
    };
    dmfabric_pinning::pin_current(dp_core)?;
    let (devices, registry) = match &placed {
        Some(_) => (Vec::new(), None),
        None => (devices(&args)?, Some(registry(&args)?)),
    };
    if let Some(r) = &registry {
        // A UDP peer's address is learnt only from frames sealed with a
        // registered client's key.
        let r = r.clone();
        transport.check_senders(Box::new(move |f: &[u8]| {
            dmfabric_wire::Frame::new_checked(f)
                .is_ok_and(|f| r.client(f.header().client_id.get()).is_some_and(|c| c.keys.verify(&f).is_ok()))
        }));
    }
    // The lines of a VM whose I/O APIC is here drive it, not the wire.
    env.pins.route(&devices);
    let backend = backend(&layout, &devices, &env, &args)?;
    let clients = registry.as_ref().map_or(0, |r| r.clients().len());
    let server = match (&placed, registry) {
        (Some(p), _) => Server::placed(args.server_id, mac, env.clone(), backend, p.link.clone()),
        (None, Some(registry)) => Server::unplaced(args.server_id, mac, env.clone(), backend, &devices, registry),
        (None, None) => unreachable!("an unplaced server has its registry"),
    };
    let console_dir = args.console_dir.clone().unwrap_or_else(|| default_console_dir(args.server_id));
    let consoles = ConsoleThread::start(env.consoles.clone(), &console_dir)?;
    let where_ = match &spec {
        TransportSpec::Udp { local, .. } => format!("udp {local}"),
        _ => format!("{description} on {}", args.iface.as_deref().unwrap_or("?")),
    };
    match (&placed, &args.store) {
        (Some(p), Some(store)) => println!(
            "dmfabric server ready: server {} ({where_}, mac {mac}), {layout}; placed by the control panel ({store}, revision {}): {} devices here",
            args.server_id,
            p.watch.routes().revision(),
            p.devices
        ),
        _ => {
            announce(&args, &where_, mac, &layout, &devices);
            println!("dmfabric server: acting for {clients} client platform(s), every frame authenticated");
        }
    }
    if !env.consoles.all().is_empty() {
        println!(
            "dmfabric server: consoles in {} (attach: dmfabric console <vm> --console-dir {})",
            console_dir.display(),
            console_dir.display()
        );
    }
    let mailbox = match endpoint {
        Some(e) => {
            let mailbox = Arc::new(Mailbox::<Snapshot>::new());
            let (m, id) = (mailbox.clone(), args.server_id);
            let busy: Vec<usize> = match &layout {
                Layout::RunToCompletion { core } => vec![*core],
                Layout::Split { dataplane, workers } => dataplane.iter().chain(workers).copied().collect(),
            };
            let core = crate::metrics::off_core(&busy).or_else(|| crate::metrics::off_core(&[dp_core]));
            let addr = e.addr();
            e.serve(core, move || {
                let families = match m.fetch(crate::metrics::FETCH_WAIT) {
                    Some((stats, shards)) => crate::metrics::server_families(id, &stats, shards.as_ref()),
                    None => Vec::new(),
                };
                crate::metrics::render(families)
            })?;
            println!("dmfabric server: metrics at http://{addr}/metrics");
            Some(mailbox)
        }
        None => None,
    };
    let every = (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    let mut handler =
        Reporting { server, every, next: Instant::now() + every.unwrap_or_default(), metrics: mailbox.clone() };
    let cfg = PollConfig { spin: if args.busy_poll { u32::MAX } else { args.spin }, ..PollConfig::default() };
    let result = match faults {
        Some(f) => {
            let mut faulty = dmfabric_dataplane::fault::FaultInjector::new(transport.as_mut(), f);
            let r = poll::run(&mut faulty, &mut handler, cfg, &stop);
            let f = faulty.fault_stats();
            eprintln!(
                "dmfabric server: faults injected: dropped {} duplicated {} reordered {} corrupted {}",
                f.dropped, f.duplicated, f.reordered, f.corrupted
            );
            r
        }
        None => poll::run(transport.as_mut(), &mut handler, cfg, &stop),
    };
    consoles.finish();
    let (stats, shards) = handler.server.finish();
    print_stats(&stats, shards.as_ref());
    let dma = &stats.dma;
    if dma.requests > 0 {
        eprintln!(
            "dmfabric server: device DMA: requests {} completed {} failed {} read {} B written {} B; chunks sent {} retransmitted {}, answers stale {} bad {}, refused {}, given up {}",
            dma.requests,
            dma.completed,
            dma.failed,
            dma.bytes_read,
            dma.bytes_written,
            dma.chunks_sent,
            dma.retransmits,
            dma.stale_answers,
            dma.bad_answers,
            dma.refused,
            dma.gave_up
        );
    }
    if let Some(m) = &mailbox {
        // Scrapes until the process exits see every counter.
        m.put((stats.clone(), shards.clone()));
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

/// The ready lines of an unplaced server: where it listens, what it hosts.
fn announce(args: &ServerArgs, where_: &str, mac: MacAddr, layout: &Layout, devices: &[DeviceSpec]) {
    println!(
        "dmfabric server ready: server {} ({where_}, mac {mac}), {layout}; test devices 1..={}: ports {:#x}-{:#x}, mmio {:#x}-{:#x}",
        args.server_id,
        args.test_devices,
        pc::TEST_DEVICE_PIO.base,
        pc::TEST_DEVICE_PIO.base + (pc::TEST_DEVICE_PIO.len - 1),
        pc::TEST_DEVICE_MMIO,
        pc::TEST_DEVICE_MMIO + u64::from(pc::TEST_DEVICE_MMIO_LEN - 1)
    );
    for d in devices.iter().filter(|d| !matches!(d.kind, DeviceKind::RegFile | DeviceKind::IrqTest { .. })) {
        println!(
            "dmfabric server: device {} {} for {} at {}",
            d.id,
            d.kind.name(),
            d.vm.map_or("any VM".to_string(), |v| format!("VM {v}")),
            match (d.pio, d.mmio) {
                (None, Some((base, _))) => format!("mmio {base:#x}"),
                _ => format!("port {:#x}", d.base()),
            }
        );
    }
    if args.config.is_none() && args.irq_test_devices > 0 {
        println!(
            "dmfabric server: interrupt test devices {}..={}: ports {:#x}-{:#x}, IRQ {}",
            pc::IRQ_TEST_FIRST_ID,
            pc::IRQ_TEST_FIRST_ID + args.irq_test_devices - 1,
            pc::IRQ_TEST.base,
            pc::IRQ_TEST.base + (pc::IRQ_TEST.len - 1),
            pc::IRQ_TEST_IRQ
        );
    }
}

/// A server placed by the control panel: its watch (whose thread runs the
/// planner), the link its loop follows, and how many devices it starts with.
struct Placement {
    watch: Watch,
    link: Arc<PlacementLink>,
    devices: usize,
}

fn placement(store: &str, id: u16, mac: MacAddr, env: &DeviceEnv, period: Duration) -> anyhow::Result<Placement> {
    let opened = dmfabric_control::store::open(store)?;
    let db = opened.load()?;
    let Some(me) = db.servers.get(&id) else {
        bail!(
            "server {id} is not in the store ({store}): add it with `dmfabric ctl --store {store} add server --id {id} --mac {mac}`"
        );
    };
    if dmfabric_control::routing::parse_mac(&me.mac) != Some(mac) {
        bail!(
            "the store has server {id} at MAC {}, but this interface's is {mac}: clients would send elsewhere (fix the record, or run on the right interface)",
            me.mac
        );
    }
    let mut devices = Vec::new();
    for spec in dmfabric_dm_workers::placement::specs_in(&db, id) {
        devices.push(spec?);
    }
    crate::server_config::check(&devices)?;
    let link = PlacementLink::new();
    // The planner reads the keys of the client platforms this server serves
    // (the store lets a server read only those).
    let keys_store = dmfabric_control::store::open(store)?;
    let keys: dmfabric_dm_workers::placement::KeySource = Box::new(move |client| {
        let keys = keys_store.client_keys(client).map_err(|e| e.to_string())?;
        keys.map(|k| k.ring().map_err(|e| e.to_string())).transpose()
    });
    let follow = Follow::new(format!("dmfabric server {id}"), period).with_states("device/");
    let watch = Watch::start_with(opened, follow, |routes| {
        Some(Planner::new(id, mac, routes, env.clone(), link.clone(), keys).chores())
    })?;
    Ok(Placement { watch, link, devices: devices.len() })
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
