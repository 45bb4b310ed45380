//! `dmfabric bench rtt|throughput` and `dmfabric demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use dmfabric_bench::blk;
use dmfabric_bench::exit::{self, ExitMode};
use dmfabric_bench::flood;
use dmfabric_bench::harness::{self, ServerLaunch, Setup};
use dmfabric_bench::irq;
use dmfabric_bench::loadgen::{self, LoadReport, Retry, Target};
use dmfabric_bench::plot;
use dmfabric_bench::report::{RttJson, ThroughputJson};
use dmfabric_bench::scratch::{self, ScratchMode};
use dmfabric_dataplane::fault::{FaultConfig, FaultInjector};
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode, XdpProgram};
use dmfabric_dataplane::{Transport, TransportKind, TransportSpec};

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Round-trip latency: one request outstanding at a time.
    Rtt(RttArgs),
    /// Request throughput with many requests in flight (as from many vCPUs).
    Throughput(ThroughputArgs),
    /// VM exit round trips: a KVM test guest doing port OUT/IN against the
    /// test device, served in-process (local) or by a server in another
    /// network namespace (remote).
    Exit(ExitArgs),
    /// A client loads a server over AF_XDP while a third host on the bridge
    /// floods the server with forged, untagged, malformed and replayed
    /// frames: throughput without and with the flood, and the server's
    /// drop counters by reason.
    Flood(FloodArgs),
    /// Block I/O: the block test guest keeps --qd requests of --bs bytes in
    /// flight against a virtio-blk over an image file, in the client
    /// process (local), on a server in another network namespace (remote)
    /// and in QEMU (qemu): IOPS, MB/s and per-request latency.
    Blk(BlkArgs),
    /// Interrupts: the apic_hpet guest's periodic HPET timer, the HPET and
    /// I/O APIC in the client process (local), on a server in another
    /// network namespace (remote) or QEMU's (qemu: kernel-irqchip=split;
    /// qemu-kernel: KVM's in-kernel I/O APIC): lateness from the
    /// comparator's match to the guest's handler (p50/p99), and interrupts
    /// a second sustained at a short period.
    Irq(IrqArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IrqModeArg {
    /// dmfabric's HPET in the client process, KVM's in-kernel I/O APIC.
    Local,
    /// dmfabric's I/O APIC and HPET on a `dmfabric server` in another network namespace (split irqchip).
    Remote,
    /// QEMU's HPET and I/O APIC (pc, kernel-irqchip=split).
    Qemu,
    /// QEMU's HPET, KVM's in-kernel I/O APIC (pc).
    QemuKernel,
}

#[derive(Debug, Args)]
pub struct IrqArgs {
    /// Where the HPET and I/O APIC run; several (comma-separated) run one after the other.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "local,remote,qemu")]
    mode: Vec<IrqModeArg>,
    #[command(flatten)]
    hosts: Hosts,
    /// Periodic interrupts per run (each mode runs twice: at --period-us
    /// for the lateness, at --rate-period-us for the rate).
    #[arg(long, default_value_t = 1000)]
    interrupts: u32,
    /// The period of the lateness run, µs (long beside the lateness: a
    /// sample is exact while the interrupt is less than a period late;
    /// with a remote HPET at 1 ms some are, see the README).
    #[arg(long, default_value_t = 10_000)]
    period_us: u32,
    /// The period of the rate run, µs (100: dmfabric's HPET fires at most
    /// every 100 µs).
    #[arg(long, default_value_t = irq::RATE_PERIOD_US)]
    rate_period_us: u32,
    /// Write the results as JSON here (an array of rows).
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    latency: LatencyOut,
    /// How the VM's client platform retransmits (remote runs).
    #[command(flatten)]
    retry: RetryArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BlkModeArg {
    /// dmfabric's virtio-blk in the client process (the hybrid case).
    Local,
    /// dmfabric's virtio-blk on a `dmfabric server` in another network namespace.
    Remote,
    /// QEMU's virtio-blk (microvm, virtio-mmio): the same guest under qemu-system-x86_64 -enable-kvm.
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BlkPattern {
    Randread,
    Randwrite,
    Seqread,
}

#[derive(Debug, Args)]
pub struct BlkArgs {
    /// Where the virtio-blk runs; several (comma-separated) run one after the other.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "local,remote,qemu")]
    mode: Vec<BlkModeArg>,
    #[command(flatten)]
    hosts: Hosts,
    /// What the guest does.
    #[arg(long, value_enum, default_value = "randread")]
    pattern: BlkPattern,
    /// Bytes per request: 512 to 128k, a multiple of 512 (4k, 128k, 4096).
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Requests in flight (1-42); several (comma-separated): one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    qd: Vec<u8>,
    /// Requests per run.
    #[arg(long, default_value_t = 2000)]
    requests: u32,
    /// The image's size (a file filled with data, in a temporary directory).
    #[arg(long, default_value = "64M")]
    image_size: String,
    /// Write the results as JSON here (an array of rows).
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    latency: LatencyOut,
    /// How the VM's client platform retransmits (remote runs).
    #[command(flatten)]
    retry: RetryArgs,
}

#[derive(Debug, Args)]
pub struct FloodArgs {
    /// Seconds of each phase (without, then with the flood).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// The client's requests in flight.
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    /// Flood frames per valid request of the first phase (1.0: the flood
    /// matches the valid request rate).
    #[arg(long, default_value_t = 1.5)]
    ratio: f64,
    /// Or a fixed flood rate, frames per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExitModeArg {
    /// The device model runs in the shim's process, on the vCPU thread.
    Local,
    /// A dmfabric server in another network namespace serves it.
    Remote,
    /// QEMU's own device (with --device uart-scratch): the same guest under qemu-system-x86_64 -enable-kvm.
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExitDevice {
    /// The register-file test device (ports 0x500..), timed from the exits.
    Test,
    /// COM1's scratch register (0x3ff) of a 16550, timed with the guest's TSC.
    UartScratch,
}

#[derive(Debug, Args)]
pub struct ExitArgs {
    /// Where the test device is served; several (comma-separated) run one after the other.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "local,remote")]
    mode: Vec<ExitModeArg>,
    #[command(flatten)]
    hosts: Hosts,
    /// The device the guest talks to.
    #[arg(long, value_enum, default_value = "test")]
    device: ExitDevice,
    /// Exits to time (half OUT, half IN).
    #[arg(long, default_value_t = 20_000)]
    exits: u64,
    /// Write the results as JSON here (an object for one run, an array for several).
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    latency: LatencyOut,
    /// How the VM's client platform retransmits (remote runs).
    #[command(flatten)]
    retry: RetryArgs,
}

/// Latency distributions written beside the figures.
#[derive(Debug, Args)]
pub struct LatencyOut {
    /// Draw each run's latency percentile curve (log scale of 1/(1-p), as
    /// HdrHistogram plots it) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Write each run's HdrHistogram percentile distribution (µs) here; with
    /// several runs, one file each: FILE-<run>.hgrm.
    #[arg(long, value_name = "FILE")]
    hgrm: Option<PathBuf>,
}

impl LatencyOut {
    /// Make the files' directories before a long run, so that what could
    /// not be written after it fails now.
    fn check(&self) -> anyhow::Result<()> {
        for path in [&self.plot, &self.hgrm].into_iter().flatten() {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
            }
        }
        Ok(())
    }

    fn write(&self, title: &str, curves: &[plot::Curve<'_>]) -> anyhow::Result<()> {
        if let Some(path) = &self.hgrm {
            for file in plot::write_hgrm(path, curves)? {
                eprintln!("dmfabric bench: wrote {}", file.display());
            }
        }
        if let Some(path) = &self.plot {
            plot::svg(path, title, curves)?;
            eprintln!("dmfabric bench: wrote {}", path.display());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthArg {
    On,
    Off,
    Both,
}

impl AuthArg {
    fn runs(self) -> &'static [bool] {
        match self {
            AuthArg::On => &[true],
            AuthArg::Off => &[false],
            AuthArg::Both => &[true, false],
        }
    }
}

/// One measured configuration: a transport, with or without
/// authentication; for AF_XDP, with which XDP program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    kind: TransportKind,
    authenticated: bool,
    program: Option<XdpProgram>,
    /// The server's metrics were scraped every second meanwhile.
    scraped: bool,
}

impl Run {
    /// The transport's name in reports: `xdp-default` for AF_XDP with
    /// libxdp's default program.
    fn name(&self) -> &'static str {
        match (self.kind, self.program) {
            (TransportKind::Xdp, Some(XdpProgram::LibxdpDefault)) => "xdp-default",
            (kind, _) => kind.name(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServerMode {
    /// `dmfabric server` as its own process in the server namespace.
    Process,
    /// A thread of this process in the server namespace.
    Thread,
}

/// The test hosts of a bench: what links them and how the server runs.
#[derive(Debug, Args)]
pub struct Hosts {
    /// Transports to measure, one after the other: xdp, packet, udp, mem (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "xdp")]
    transport: Vec<TransportKind>,
    /// Where the XDP program runs: auto (native, else generic), native, generic.
    #[arg(long, default_value = "auto")]
    xdp_mode: XdpMode,
    /// With xdp: the XDP program(s), one run each: dmfabric (its own: only
    /// the fabric's frames to the socket) or default (libxdp's: every
    /// frame), e.g. `dmfabric,default` to compare them in one run. Unset:
    /// as DMFABRIC_XDP_PROG says, dmfabric if that is unset.
    #[arg(long, value_delimiter = ',')]
    xdp_prog: Vec<XdpProgram>,
    /// How to run the server on the test host.
    #[arg(long, value_enum, default_value = "process")]
    server: ServerMode,
}

/// How the load's client retransmits.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Send a request again when its answer has not come after this long.
    #[arg(long, default_value_t = 20)]
    timeout_ms: u64,
    /// Retransmissions before a request counts as lost.
    #[arg(long, default_value_t = 4)]
    retries: u32,
}

impl RetryArgs {
    fn retry(&self) -> Retry {
        Retry { timeout: Duration::from_millis(self.timeout_ms.max(1)), retries: self.retries }
    }
}

#[derive(Debug, Args)]
pub struct Common {
    #[command(flatten)]
    hosts: Hosts,
    /// Write the results as JSON here (an object for one transport, an array for several).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Use this interface in the current namespace instead of creating test
    /// hosts; a `dmfabric server` must already answer on the link.
    #[arg(long)]
    iface: Option<String>,
    /// With --iface and --transport udp: the server's UDP address.
    #[arg(long)]
    udp_peer: Option<SocketAddr>,
    /// With --iface and --transport udp: the local UDP address.
    #[arg(long, default_value = "127.0.0.1:47000")]
    udp_bind: SocketAddr,
    /// With --iface: the key file of the client platform the load speaks as
    /// (the server must list it; `dmfabric keygen --client 1 --out FILE`).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Seal and check every frame (on), neither (off), or both one after the
    /// other to measure what authentication costs (off and both need
    /// --server thread: a server process always authenticates).
    #[arg(long, value_enum, default_value = "on")]
    auth: AuthArg,
    #[command(flatten)]
    retry: RetryArgs,
    /// Inject faults on the client's transport, e.g. drop=0.05,dup=0.05,reorder=0.01,seed=7.
    #[arg(long)]
    faults: Option<String>,
    /// The server process's thread layout: rtc or split:1:W (see `dmfabric server --help`).
    #[arg(long)]
    server_layout: Option<String>,
    /// Test devices on the server; the load spreads its vCPUs over them.
    #[arg(long, default_value_t = 1)]
    test_devices: u32,
    /// Start the server with --metrics and scrape it every second during
    /// the load (on), not (off), or both one after the other, to measure
    /// what a Prometheus scraping does to the data plane (a server process
    /// only).
    #[arg(long, value_enum, default_value = "off")]
    scrape: ScrapeArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScrapeArg {
    Off,
    On,
    Both,
}

impl ScrapeArg {
    fn runs(self) -> &'static [bool] {
        match self {
            ScrapeArg::Off => &[false],
            ScrapeArg::On => &[true],
            ScrapeArg::Both => &[false, true],
        }
    }
}

#[derive(Debug, Args)]
pub struct RttArgs {
    #[command(flatten)]
    common: Common,
    /// Requests to time (after the warm-up).
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Untimed requests first, to reach steady state (a short warm-up
    /// measurably inflates the percentiles on virtualised hosts).
    #[arg(long, default_value_t = 50_000)]
    warmup: u64,
    #[command(flatten)]
    latency: LatencyOut,
}

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    common: Common,
    /// How long to load the server.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Requests in flight (one per simulated vCPU).
    #[arg(long, default_value_t = 64)]
    inflight: u16,
}

pub fn run(cmd: BenchCmd, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Exit(a) => bench_exit(&a, &stop),
        BenchCmd::Flood(a) => bench_flood(&a, &stop),
        BenchCmd::Blk(a) => bench_blk(&a, &stop),
        BenchCmd::Irq(a) => bench_irq(&a, &stop),
        BenchCmd::Rtt(a) => {
            a.latency.check()?;
            let reports = for_each_transport(&a.common, &stop, |t, target, stop| {
                loadgen::rtt(t, &target, a.requests, a.warmup, a.common.retry.retry(), stop)
            })?;
            let rows: Vec<RttJson> = reports
                .iter()
                .map(|(run, r)| RttJson { scraped: run.scraped, ..RttJson::new(run.name(), run.authenticated, r) })
                .collect();
            for row in &rows {
                print_rtt(row);
            }
            print_scrape_cost(&rows);
            print_ratio(&rows, |r| r.p50_us, "p50 latency");
            print_program_ratio(&rows, |r| r.p50_us, "p50 latency");
            print_auth_cost(&rows, |r| (r.transport.clone(), r.authenticated), |r| r.p50_us, "p50 latency");
            write_json(&a.common.json, &rows)?;
            let labels: Vec<String> = rows.iter().map(|r| label(&r.transport, r.authenticated)).collect();
            let curves: Vec<plot::Curve<'_>> =
                reports.iter().zip(&labels).map(|((_, r), label)| plot::Curve { label, hist: &r.hist }).collect();
            a.latency.write("dmfabric bench rtt: request round trip", &curves)?;
            fail_on_loss(&reports)
        }
        BenchCmd::Throughput(a) => {
            if !(a.seconds > 0.0 && a.seconds <= 3600.0) {
                bail!("--seconds must be between 0 and 3600, not {}", a.seconds);
            }
            if a.inflight == 0 || a.inflight > loadgen::MAX_INFLIGHT {
                bail!("--inflight must be between 1 and {}, not {}", loadgen::MAX_INFLIGHT, a.inflight);
            }
            let reports = for_each_transport(&a.common, &stop, |t, target, stop| {
                loadgen::throughput(
                    t,
                    &target,
                    Duration::from_secs_f64(a.seconds),
                    a.inflight,
                    a.common.retry.retry(),
                    stop,
                )
            })?;
            let rows: Vec<ThroughputJson> = reports
                .iter()
                .map(|(run, r)| ThroughputJson::new(run.name(), run.authenticated, a.inflight, r))
                .collect();
            for row in &rows {
                print_throughput(row);
            }
            print_ratio(&rows, |r| r.mreq_per_s, "throughput");
            print_program_ratio(&rows, |r| r.mreq_per_s, "throughput");
            print_auth_cost(
                &rows,
                |r| (r.transport.clone(), r.authenticated),
                |r| 1.0 / r.mreq_per_s.max(1e-9),
                "time per request",
            );
            write_json(&a.common.json, &rows)?;
            let wrong: u64 = reports.iter().map(|(_, r)| r.wrong).sum();
            if wrong > 0 {
                bail!("{wrong} answers carried wrong data");
            }
            Ok(())
        }
    }
}

type LoadFn<'a> = dyn FnMut(&mut dyn Transport, Target, &AtomicBool) -> Result<LoadReport, loadgen::LoadError> + 'a;

fn for_each_transport(
    common: &Common,
    stop: &Arc<AtomicBool>,
    mut load: impl FnMut(&mut dyn Transport, Target, &AtomicBool) -> Result<LoadReport, loadgen::LoadError>,
) -> anyhow::Result<Vec<(Run, LoadReport)>> {
    let load: &mut LoadFn<'_> = &mut load;
    if let Some(spec) = &common.faults {
        FaultConfig::parse(spec).map_err(|e| anyhow::anyhow!("--faults: {e}"))?;
    }
    if let Some(iface) = &common.iface {
        let [kind] = common.hosts.transport[..] else {
            bail!("--iface measures one transport at a time");
        };
        if common.auth != AuthArg::On {
            bail!("--iface talks to a running server, which always authenticates: --auth on");
        }
        if common.scrape != ScrapeArg::Off {
            bail!("--scrape starts the server itself: not with --iface (scrape your server's --metrics yourself)");
        }
        let run = Run { kind, authenticated: true, program: common.hosts.xdp_prog.first().copied(), scraped: false };
        return Ok(vec![(run, on_given_interface(common, kind, iface, stop, load)?)]);
    }
    if common.auth != AuthArg::On && common.hosts.server != ServerMode::Thread {
        bail!("--auth {:?} measures a server without authentication: add --server thread (a server process always authenticates)", common.auth);
    }
    if common.scrape != ScrapeArg::Off && common.hosts.server != ServerMode::Process {
        bail!("--scrape scrapes a server process's --metrics: not with --server thread");
    }
    let exe = std::env::current_exe().context("Cannot find the dmfabric executable")?;
    let mut out = Vec::new();
    let runs = common
        .hosts
        .transport
        .iter()
        .flat_map(|&kind| common.auth.runs().iter().map(move |&authenticated| (kind, authenticated)))
        .flat_map(|(kind, authenticated)| {
            let programs: Vec<Option<XdpProgram>> = if kind == TransportKind::Xdp && !common.hosts.xdp_prog.is_empty() {
                common.hosts.xdp_prog.iter().map(|&p| Some(p)).collect()
            } else {
                vec![None]
            };
            programs.into_iter().map(move |program| (kind, authenticated, program))
        })
        .flat_map(|(kind, authenticated, program)| {
            common.scrape.runs().iter().map(move |&scraped| Run { kind, authenticated, program, scraped })
        });
    for run in runs {
        let kind = run.kind;
        if stop.load(Ordering::Relaxed) {
            bail!("Interrupted");
        }
        let mut setup = setup_for(kind, &common.hosts, &exe);
        setup.server_layout = common.server_layout.clone();
        setup.test_devices = common.test_devices.max(1);
        setup.authenticate = run.authenticated;
        setup.xdp_program = run.program;
        setup.scrape = run.scraped.then_some(Duration::from_secs(1));
        let mut notes = Vec::new();
        if !run.authenticated {
            notes.push("no authentication");
        }
        if run.program == Some(XdpProgram::LibxdpDefault) {
            notes.push("libxdp's default XDP program");
        }
        if run.scraped {
            notes.push("its metrics scraped every second");
        }
        let auth = if notes.is_empty() { String::new() } else { format!(" ({}, for comparison)", notes.join(", ")) };
        eprintln!("dmfabric bench: {kind}{auth}: test hosts up, server starting ...");
        let flag = stop.clone();
        let outcome =
            harness::run(&setup, stop, |mut t, target| with_faults(common, t.as_mut(), |t| load(t, target, &flag)))
                .with_context(|| format!("{kind} run failed"))?;
        if let Some(json) = &outcome.server_json {
            eprintln!("dmfabric bench: {kind}: server counters {json}");
        }
        out.push((run, outcome.result));
    }
    Ok(out)
}

fn on_given_interface(
    common: &Common,
    kind: TransportKind,
    iface: &str,
    stop: &Arc<AtomicBool>,
    load: &mut LoadFn<'_>,
) -> anyhow::Result<LoadReport> {
    let spec = match kind {
        TransportKind::Xdp => {
            let mut cfg = XdpConfig::new(iface);
            cfg.mode = common.hosts.xdp_mode;
            cfg.program = common.hosts.xdp_prog.first().copied();
            TransportSpec::Xdp(cfg)
        }
        TransportKind::Packet => TransportSpec::Packet { iface: iface.to_string() },
        TransportKind::Udp => {
            let Some(peer) = common.udp_peer else { bail!("--transport udp with --iface needs --udp-peer") };
            let mac = dmfabric_dataplane::if_mac(iface).with_context(|| format!("Cannot read the MAC of {iface}"))?;
            TransportSpec::Udp { local: common.udp_bind, peer: Some(peer), mac }
        }
        TransportKind::Mem => bail!("--transport mem cannot use an interface"),
    };
    let Some(key_file) = &common.key_file else {
        bail!("--iface needs --key-file: the key of the client platform the load speaks as, listed by the server")
    };
    let key = dmfabric_control::keys::KeyFile::load(key_file)?;
    let sealer = dmfabric_dataplane::hello::Sealer::new(key.ring()?);
    let mut t = dmfabric_dataplane::open(&spec)?;
    let check = sealer.clone();
    t.check_senders(Box::new(move |f: &[u8]| check.verifies(f)));
    let session = loadgen::discover(t.as_mut(), key.client, &sealer, Duration::from_secs(5))?;
    let target =
        Target { devices: common.test_devices.max(1), client_id: key.client, ..Target::test_device(&session, &sealer) };
    Ok(with_faults(common, t.as_mut(), |t| load(t, target, stop))?)
}

/// Run `load` on `t`, through the fault injector if `--faults` asks for it.
fn with_faults<R>(
    common: &Common,
    t: &mut dyn Transport,
    load: impl FnOnce(&mut dyn Transport) -> Result<R, loadgen::LoadError>,
) -> Result<R, loadgen::LoadError> {
    let Some(spec) = &common.faults else { return load(t) };
    // Validated before any test host was made (see `check_faults`).
    let cfg = FaultConfig::parse(spec).unwrap_or_default();
    let mut faulty = FaultInjector::new(t, cfg);
    let r = load(&mut faulty);
    let f = faulty.fault_stats();
    eprintln!(
        "dmfabric bench: faults injected on the client: dropped {} duplicated {} reordered {} corrupted {}",
        f.dropped, f.duplicated, f.reordered, f.corrupted
    );
    r
}

/// A row's label: the transport, marked when not authenticated.
fn label(transport: &str, authenticated: bool) -> String {
    if authenticated {
        transport.to_string()
    } else {
        format!("{transport}/noauth")
    }
}

/// With runs scraped and not, the p50 ratio of each transport.
fn print_scrape_cost(rows: &[RttJson]) {
    for on in rows.iter().filter(|r| r.scraped) {
        let off =
            rows.iter().find(|r| !r.scraped && r.transport == on.transport && r.authenticated == on.authenticated);
        if let Some(off) = off.filter(|o| o.p50_us > 0.0) {
            println!(
                "  {} p50 with a 1 s metrics scrape / without: {:.3}x ({:.2} / {:.2} µs; p99 {:.2} / {:.2} µs)",
                on.transport,
                on.p50_us / off.p50_us,
                on.p50_us,
                off.p50_us,
                on.p99_us,
                off.p99_us
            );
        }
    }
}

fn print_rtt(r: &RttJson) {
    let label = if r.scraped {
        format!("{}+scrape", label(&r.transport, r.authenticated))
    } else {
        label(&r.transport, r.authenticated)
    };
    println!(
        "  {:<12} requests {:>8}  lost {}  wrong {}  p50 {:>7.2} µs  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>8.2}  max {:>9.2}",
        label,
        r.requests,
        r.lost,
        r.wrong,
        r.p50_us,
        r.p90_us,
        r.p99_us,
        r.p999_us,
        r.max_us
    );
}

fn print_throughput(r: &ThroughputJson) {
    println!(
        "  {:<12} {:>7.3} Mreq/s  completed {:>9} in {:.2} s  lost {}  wrong {}  p50 {:.2} µs  p99 {:.2} µs",
        label(&r.transport, r.authenticated),
        r.mreq_per_s,
        r.completed,
        r.seconds,
        r.lost,
        r.wrong,
        r.p50_us,
        r.p99_us
    );
}

/// With a transport measured with and without authentication, print what
/// authentication costs (`cost` grows with the cost: a latency, or the
/// inverse of a rate).
fn print_auth_cost<T>(rows: &[T], key: impl Fn(&T) -> (String, bool), cost: impl Fn(&T) -> f64, what: &str) {
    for on in rows.iter().filter(|r| key(r).1) {
        let transport = key(on).0;
        if let Some(off) = rows.iter().find(|r| key(r) == (transport.clone(), false)) {
            let base = cost(off);
            if base > 0.0 {
                println!("  {transport} authenticated / not, {what}: {:.3}x", cost(on) / base);
            }
        }
    }
}

/// With AF_XDP measured under both XDP programs, print dmfabric's over
/// libxdp's default (per authentication setting).
fn print_program_ratio<T: serde::Serialize>(rows: &[T], value: impl Fn(&T) -> f64, what: &str) {
    let field = |r: &T, name: &str| serde_json::to_value(r).ok().and_then(|v| v.get(name).cloned());
    for own in rows.iter().filter(|r| field(r, "transport") == Some("xdp".into())) {
        let auth = field(own, "authenticated");
        let Some(def) = rows
            .iter()
            .find(|r| field(r, "transport") == Some("xdp-default".into()) && field(r, "authenticated") == auth)
        else {
            continue;
        };
        if value(def) > 0.0 {
            println!("  xdp dmfabric's XDP program / libxdp's default, {what}: {:.3}x", value(own) / value(def));
        }
    }
}

/// With both AF_XDP and UDP in the run, print their ratio.
fn print_ratio<T: serde::Serialize>(rows: &[T], value: impl Fn(&T) -> f64, what: &str) {
    let get = |name: &str| {
        rows.iter()
            .find(|r| serde_json::to_value(r).ok().and_then(|v| v.get("transport").cloned()) == Some(name.into()))
            .map(&value)
    };
    if rows.len() > 2 {
        // With and without authentication the pairs are not comparable this way.
        return;
    }
    if let (Some(x), Some(u)) = (get("xdp"), get("udp")) {
        if u > 0.0 {
            println!("  xdp/udp {what}: {:.2}x", x / u);
        }
    }
}

fn write_json<T: serde::Serialize>(path: &Option<PathBuf>, rows: &[T]) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text =
        if rows.len() == 1 { serde_json::to_string_pretty(&rows[0])? } else { serde_json::to_string_pretty(rows)? };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text + "\n").with_context(|| format!("Cannot write {}", path.display()))?;
    eprintln!("dmfabric bench: wrote {}", path.display());
    Ok(())
}

fn fail_on_loss(reports: &[(Run, LoadReport)]) -> anyhow::Result<()> {
    let lost: u64 = reports.iter().map(|(_, r)| r.lost).sum();
    let wrong: u64 = reports.iter().map(|(_, r)| r.wrong).sum();
    if lost > 0 || wrong > 0 {
        bail!("{lost} requests lost and {wrong} answered with wrong data");
    }
    Ok(())
}

fn bench_flood(a: &FloodArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    if !(a.seconds > 0.0 && a.seconds <= 600.0) {
        bail!("--seconds must be between 0 and 600, not {}", a.seconds);
    }
    if a.inflight == 0 || a.inflight > loadgen::MAX_INFLIGHT {
        bail!("--inflight must be between 1 and {}, not {}", loadgen::MAX_INFLIGHT, a.inflight);
    }
    if !(a.ratio > 0.0 && a.ratio <= 100.0) {
        bail!("--ratio must be between 0 and 100, not {}", a.ratio);
    }
    let cfg = flood::FloodConfig { seconds: a.seconds, inflight: a.inflight, ratio: a.ratio, rate: a.rate };
    eprintln!("dmfabric bench flood: three hosts on a bridge; {} s alone, then {} s flooded ...", a.seconds, a.seconds);
    let r = flood::run(&cfg, stop).context("flood run failed")?;
    println!(
        "  alone   {:>7.3} Mreq/s\n  flooded {:>7.3} Mreq/s ({:.1} % kept) under {:.0} flood frames/s ({:.2} per valid request)",
        r.mreq_per_s_alone,
        r.mreq_per_s_flooded,
        r.kept * 100.0,
        r.flood_pps,
        r.flood_per_valid
    );
    let [server_core, client_core, flood_core] = r.cores;
    if client_core == flood_core {
        println!(
            "  cores: server {server_core}, client and flooder sharing {client_core} (two cores: the flooded figure \
             includes the client's lost CPU share; the flooder gets a core of its own on three)"
        );
    } else {
        println!("  cores: server {server_core}, client {client_core}, flooder {flood_core}");
    }
    let (s, c) = (&r.sent, &r.counted);
    println!(
        "  flood sent: forged {} untagged {} malformed {} replayed {} (total {})",
        s.forged,
        s.untagged,
        s.malformed,
        s.replayed,
        s.total()
    );
    println!(
        "  server counted: bad tag {} no tag {} malformed {} stale {} answered again {} (transport drops {}): {}",
        c.bad_tag,
        c.no_tag,
        c.malformed,
        c.stale,
        c.duplicates,
        c.rx_dropped,
        if r.accounted { "every flood frame accounted for" } else { "NOT every flood frame accounted for" }
    );
    write_json(&a.json, std::slice::from_ref(&r))?;
    if r.wrong > 0 || !r.accounted {
        bail!("{} wrong answers; flood accounted for: {}", r.wrong, r.accounted);
    }
    Ok(())
}

fn bench_exit(a: &ExitArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    if !(2..=100_000_000).contains(&a.exits) {
        bail!("--exits must be between 2 and 100000000, not {}", a.exits);
    }
    if a.device == ExitDevice::UartScratch && a.exits > 2_000_000 {
        bail!("--device uart-scratch keeps a sample per exit in guest memory: at most 2000000 exits");
    }
    a.latency.check()?;
    if a.hosts.xdp_prog.len() > 1 {
        bail!(
            "bench exit measures one XDP program at a time: give --xdp-prog once (rtt and throughput compare several)"
        );
    }
    let exe = std::env::current_exe().context("Cannot find the dmfabric executable")?;
    let mut runs: Vec<(ExitModeArg, TransportKind)> = Vec::new();
    for &mode in &a.mode {
        match mode {
            ExitModeArg::Remote => runs.extend(a.hosts.transport.iter().map(|&k| (mode, k))),
            ExitModeArg::Qemu if a.device == ExitDevice::Test => {
                bail!("--mode qemu times QEMU's own 16550: use it with --device uart-scratch")
            }
            _ => runs.push((mode, TransportKind::Mem)),
        }
    }
    let mut rows = Vec::new();
    for (mode, kind) in runs {
        if stop.load(Ordering::Relaxed) {
            bail!("Interrupted");
        }
        let mut setup = setup_for(kind, &a.hosts, &exe);
        setup.client_retry = a.retry.retry();
        let what = match mode {
            ExitModeArg::Local => "local".to_string(),
            ExitModeArg::Remote => format!("remote over {kind}"),
            ExitModeArg::Qemu => "QEMU".to_string(),
        };
        eprintln!("dmfabric bench exit: {what}: {} exits ...", a.exits);
        let row = match (a.device, mode) {
            (ExitDevice::Test, ExitModeArg::Local) => exit::run(ExitMode::Local, &setup, a.exits, stop),
            (ExitDevice::Test, _) => exit::run(ExitMode::Remote, &setup, a.exits, stop),
            (ExitDevice::UartScratch, ExitModeArg::Local) => scratch::run(ScratchMode::Local, &setup, a.exits, stop),
            (ExitDevice::UartScratch, ExitModeArg::Remote) => scratch::run(ScratchMode::Remote, &setup, a.exits, stop),
            (ExitDevice::UartScratch, ExitModeArg::Qemu) => scratch::run(ScratchMode::Qemu, &setup, a.exits, stop),
        }
        .with_context(|| format!("{what} run failed"))?;
        println!(
            "  {:<6} {:<6} p50 {:>7.2} µs  p99 {:>7.2} µs  mean {:>7.2} µs  {:>9.0} exits/s  retransmits {}",
            row.mode, row.transport, row.p50_us, row.p99_us, row.mean_us, row.exits_per_s, row.retransmits
        );
        rows.push(row);
    }
    for base in ["local", "qemu"] {
        if let Some(b) = rows.iter().find(|r| r.mode == base) {
            for r in rows.iter().filter(|r| r.mode == "remote") {
                println!("  remote ({}) / {base} p50: {:.2}x", r.transport, r.p50_us / b.p50_us.max(1e-9));
            }
        }
    }
    write_json(&a.json, &rows)?;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| if r.mode == "remote" { format!("remote {}", r.transport) } else { r.mode.clone() })
        .collect();
    let curves: Vec<plot::Curve<'_>> =
        rows.iter().zip(&labels).map(|(r, label)| plot::Curve { label, hist: &r.hist }).collect();
    a.latency.write("dmfabric bench exit: VM exit round trip", &curves)
}

fn bench_blk(a: &BlkArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let bs = dmfabric_storage::parse_size(&a.bs).map_err(|e| anyhow::anyhow!("--bs: {e}"))?;
    if bs == 0 || !bs.is_multiple_of(512) || bs > u64::from(blk::MAX_BS) {
        bail!("--bs must be a multiple of 512 up to 128k, not {}", a.bs);
    }
    let image_bytes = dmfabric_storage::parse_size(&a.image_size).map_err(|e| anyhow::anyhow!("--image-size: {e}"))?;
    if image_bytes < 1 << 20 || !image_bytes.is_multiple_of(1 << 20) || image_bytes > 64 << 30 {
        bail!("--image-size must be a whole number of MiB between 1M and 64G, not {}", a.image_size);
    }
    if bs > image_bytes {
        bail!("--bs {} is larger than the image ({})", a.bs, a.image_size);
    }
    if let Some(&qd) = a.qd.iter().find(|&&q| q == 0 || q > blk::MAX_QD) {
        bail!("--qd must be between 1 and {}, not {qd}", blk::MAX_QD);
    }
    if !(1..=1_000_000).contains(&a.requests) {
        bail!("--requests must be between 1 and 1000000, not {}", a.requests);
    }
    if a.hosts.server == ServerMode::Thread {
        bail!("bench blk runs its server as `dmfabric server --config` (--server process)");
    }
    if a.hosts.xdp_prog.len() > 1 || a.hosts.transport.contains(&TransportKind::Mem) {
        bail!("bench blk's remote runs take one --xdp-prog and a network transport (xdp, packet, udp)");
    }
    a.latency.check()?;
    let exe = std::env::current_exe().context("Cannot find the dmfabric executable")?;
    let pattern = match a.pattern {
        BlkPattern::Randread => blk::Pattern::RandRead,
        BlkPattern::Randwrite => blk::Pattern::RandWrite,
        BlkPattern::Seqread => blk::Pattern::SeqRead,
    };
    let mut runs: Vec<(blk::BlkMode, TransportKind)> = Vec::new();
    for &mode in &a.mode {
        match mode {
            BlkModeArg::Local => runs.push((blk::BlkMode::Local, TransportKind::Mem)),
            BlkModeArg::Remote => runs.extend(a.hosts.transport.iter().map(|&k| (blk::BlkMode::Remote, k))),
            BlkModeArg::Qemu => runs.push((blk::BlkMode::Qemu, TransportKind::Mem)),
        }
    }
    let image = blk::BenchImage::new(image_bytes).context("Cannot make the bench's image")?;
    eprintln!(
        "dmfabric bench blk: {} {} B, {} requests per run, image {} MiB (O_DIRECT, io_uring); the guest does its I/O in user mode (CPL3: this host emulates guest kernel mode)",
        pattern.name(),
        bs,
        a.requests,
        image_bytes >> 20
    );
    let mut rows = Vec::new();
    for (mode, kind) in runs {
        for &qd in &a.qd {
            if stop.load(Ordering::Relaxed) {
                bail!("Interrupted");
            }
            let mut setup = setup_for(kind, &a.hosts, &exe);
            setup.client_retry = a.retry.retry();
            let what = match mode {
                blk::BlkMode::Remote => format!("remote over {kind}"),
                m => m.name().to_string(),
            };
            eprintln!("dmfabric bench blk: {what}, qd {qd} ...");
            let cfg = blk::BlkConfig { pattern, bs: bs as u32, qd, requests: a.requests };
            let row = blk::run(mode, &setup, &exe, &image, &cfg, stop)
                .with_context(|| format!("{what} qd {qd} run failed"))?;
            println!(
                "  {:<6} {:<6} qd {:>2}  {:>8.0} IOPS  {:>8.2} MB/s  p50 {:>8.2} µs  p99 {:>8.2} µs  mean {:>8.2} µs  retransmits {}",
                row.mode, row.transport, row.qd, row.iops, row.mb_per_s, row.p50_us, row.p99_us, row.mean_us, row.retransmits
            );
            rows.push(row);
        }
    }
    for r in rows.iter().filter(|r| r.mode == "remote") {
        for base in ["local", "qemu"] {
            if let Some(b) = rows.iter().find(|b| b.mode == base && b.qd == r.qd).filter(|b| b.iops > 0.0) {
                println!(
                    "  remote ({}) / {base} IOPS at qd {}: {:.2}x (p50 {:.2}x)",
                    r.transport,
                    r.qd,
                    r.iops / b.iops,
                    r.p50_us / b.p50_us.max(1e-9)
                );
            }
        }
    }
    let Some(path) = &a.json else { return write_blk_curves(a, &rows) };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")
        .with_context(|| format!("Cannot write {}", path.display()))?;
    eprintln!("dmfabric bench: wrote {}", path.display());
    write_blk_curves(a, &rows)
}

fn write_blk_curves(a: &BlkArgs, rows: &[blk::BlkJson]) -> anyhow::Result<()> {
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            let m = if r.mode == "remote" { format!("remote {}", r.transport) } else { r.mode.clone() };
            format!("{m} qd{}", r.qd)
        })
        .collect();
    let curves: Vec<plot::Curve<'_>> =
        rows.iter().zip(&labels).map(|(r, label)| plot::Curve { label, hist: &r.hist }).collect();
    a.latency.write("dmfabric bench blk: request latency", &curves)
}

fn bench_irq(a: &IrqArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    if !(2..=dmfabric_vmm_shim::guests::APIC_HPET_SAMPLES_MAX).contains(&a.interrupts) {
        bail!(
            "--interrupts must be between 2 and {}, not {}",
            dmfabric_vmm_shim::guests::APIC_HPET_SAMPLES_MAX,
            a.interrupts
        );
    }
    if !(1..=10_000_000).contains(&a.period_us) || !(1..=10_000_000).contains(&a.rate_period_us) {
        bail!("--period-us and --rate-period-us must be between 1 and 10000000");
    }
    if a.hosts.server == ServerMode::Thread {
        bail!("bench irq runs its server as `dmfabric server --config` (--server process)");
    }
    if a.hosts.xdp_prog.len() > 1 || a.hosts.transport.contains(&TransportKind::Mem) {
        bail!("bench irq's remote runs take one --xdp-prog and a network transport (xdp, packet, udp)");
    }
    a.latency.check()?;
    let exe = std::env::current_exe().context("Cannot find the dmfabric executable")?;
    let mut runs: Vec<(irq::IrqMode, TransportKind)> = Vec::new();
    for &mode in &a.mode {
        match mode {
            IrqModeArg::Local => runs.push((irq::IrqMode::Local, TransportKind::Mem)),
            IrqModeArg::Remote => runs.extend(a.hosts.transport.iter().map(|&k| (irq::IrqMode::Remote, k))),
            IrqModeArg::Qemu => runs.push((irq::IrqMode::Qemu, TransportKind::Mem)),
            IrqModeArg::QemuKernel => runs.push((irq::IrqMode::QemuKernel, TransportKind::Mem)),
        }
    }
    let cfg = irq::IrqConfig { interrupts: a.interrupts, period_us: a.period_us, rate_period_us: a.rate_period_us };
    let dir = irq::bench_dir()?;
    eprintln!(
        "dmfabric bench irq: apic_hpet, {} periodic HPET interrupts a run: lateness at a {} µs period, the rate at {} µs",
        a.interrupts, a.period_us, a.rate_period_us
    );
    let mut rows = Vec::new();
    for (mode, kind) in runs {
        if stop.load(Ordering::Relaxed) {
            bail!("Interrupted");
        }
        let mut setup = setup_for(kind, &a.hosts, &exe);
        setup.client_retry = a.retry.retry();
        let what = match mode {
            irq::IrqMode::Remote => format!("remote over {kind}"),
            m => m.name().to_string(),
        };
        eprintln!("dmfabric bench irq: {what} ...");
        let row = irq::run(mode, &setup, &exe, &dir, &cfg, stop).with_context(|| format!("{what} run failed"))?;
        println!(
            "  {:<11} irqchip {:<6} lateness p50 {:>8.2} µs  p99 {:>8.2} µs  max {:>8.2} µs  missed {}  |  at {} µs: {:>7.0} /s of {:.0} ({} of {} periods missed)  retransmits {}",
            row.mode,
            row.irqchip,
            row.p50_us,
            row.p99_us,
            row.max_us,
            row.missed,
            row.rate_period_us,
            row.interrupts_per_s,
            row.nominal_per_s,
            row.rate_missed,
            row.rate_periods,
            row.retransmits
        );
        if row.missed > 0 {
            eprintln!(
                "dmfabric bench irq: {}: {} periods missed at {} µs: some interrupts came a period or more late, and their samples wrapped (a longer --period-us measures them)",
                row.mode, row.missed, row.period_us
            );
        }
        rows.push(row);
    }
    drop(dir);
    if let Some(path) = &a.json {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).with_context(|| format!("Cannot create {}", d.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&rows)? + "\n")
            .with_context(|| format!("Cannot write {}", path.display()))?;
        eprintln!("dmfabric bench: wrote {}", path.display());
    }
    let labels: Vec<String> = rows.iter().map(|r| r.mode.clone()).collect();
    let curves: Vec<plot::Curve<'_>> =
        rows.iter().zip(&labels).map(|(r, label)| plot::Curve { label, hist: &r.hist }).collect();
    a.latency.write("dmfabric bench irq: HPET interrupt lateness", &curves)
}

/// The harness set-up for one transport: the server as `dmfabric server`
/// (this executable) or a thread.
fn setup_for(kind: TransportKind, hosts: &Hosts, exe: &std::path::Path) -> Setup {
    let launch = match hosts.server {
        ServerMode::Process => ServerLaunch::Process(exe.to_path_buf()),
        ServerMode::Thread => ServerLaunch::Thread,
    };
    let mut setup = Setup::new(kind, launch);
    setup.xdp_mode = hosts.xdp_mode;
    setup.xdp_program = hosts.xdp_prog.first().copied();
    setup
}
