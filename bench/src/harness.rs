//! The end-to-end harness: make two test hosts, start a server in one and
//! the load in the other, pin both, run, tear everything down, and report
//! in JSON.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use dmfabric_dataplane::hello::Sealer;
use dmfabric_dataplane::netns::{self, TestNet};
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode, XdpProgram, XDP_PROG_ENV};
use dmfabric_dataplane::{mem, Transport, TransportKind, TransportSpec};
use dmfabric_devices::platform::pc::{self, PcLayout};
use dmfabric_dm_workers::backend::Inline;
use dmfabric_dm_workers::peers::{Client, Registry};
use dmfabric_dm_workers::server::{Server, ServerStats};
use dmfabric_wire::auth::{KeyRing, Secret};
use dmfabric_wire::MacAddr;

use crate::loadgen::{self, LoadError, Target};

/// UDP port of the baseline transport on test hosts.
pub const UDP_PORT: u16 = 47000;
/// Server id of the server the harness starts.
pub const SERVER_ID: u16 = 1;

/// How the server runs.
#[derive(Debug, Clone)]
pub enum ServerLaunch {
    /// A thread of this process, inside the server's namespace.
    Thread,
    /// A `dmfabric server` process started with `ip netns exec`.
    Process(PathBuf),
}

/// One harness run's set-up.
#[derive(Debug, Clone)]
pub struct Setup {
    pub transport: TransportKind,
    pub xdp_mode: XdpMode,
    /// The XDP program of both ends (`None`: as DMFABRIC_XDP_PROG says,
    /// dmfabric's own if unset).
    pub xdp_program: Option<XdpProgram>,
    pub launch: ServerLaunch,
    pub client_core: Option<usize>,
    pub server_core: Option<usize>,
    /// `--layout` of a server process (`rtc`, `split:1:W`); threads are rtc.
    pub server_layout: Option<String>,
    /// Test devices on the server; the load spreads its vCPUs over them.
    pub test_devices: u32,
    /// Also host a PC's devices for this VM (`dmfabric server --pc-vm`).
    pub pc_vm: Option<u32>,
    /// The load's client platform key (fresh for each set-up).
    pub secret: Secret,
    /// Seal and check every frame (off only to measure what that costs;
    /// a server thread only).
    pub authenticate: bool,
    /// Start a server process with `--metrics` and scrape it this often
    /// while the load runs (what a Prometheus does to the data plane).
    pub scrape: Option<Duration>,
    /// How a VM's client platform retransmits its requests (`bench exit`).
    pub client_retry: Retry,
}

impl Setup {
    /// Client on the first core and server on the last, as on a 2-core host.
    pub fn new(transport: TransportKind, launch: ServerLaunch) -> Setup {
        let cores = dmfabric_pinning::available_cores();
        let (client, server) =
            if cores.len() >= 2 { (Some(cores[0]), Some(cores[cores.len() - 1])) } else { (None, None) };
        Setup {
            transport,
            xdp_mode: XdpMode::Auto,
            xdp_program: None,
            launch,
            client_core: client,
            server_core: server,
            server_layout: None,
            test_devices: 1,
            pc_vm: None,
            secret: fresh_secret(),
            authenticate: true,
            scrape: None,
            client_retry: Retry::default(),
        }
    }

    /// How the load seals its frames.
    pub fn sealer(&self) -> Sealer {
        Sealer { keys: KeyRing::single(1, &self.secret), authenticate: self.authenticate }
    }

    /// The server's registry: the load's client platform at `mac`, its VM
    /// 1 with a vCPU per load slot, and the PC VM if any.
    fn registry(&self, mac: MacAddr) -> Registry {
        let mut vms = vec![(1, loadgen::MAX_INFLIGHT)];
        if let Some(vm) = self.pc_vm.filter(|&v| v != 1) {
            vms.push((vm, 1));
        }
        let keys = KeyRing::single(1, &self.secret);
        let client = Client { id: loadgen::CLIENT_ID, mac, hypervisor: 1, keys, vms };
        Registry::new(vec![client], Vec::new(), std::collections::HashMap::new())
    }

    /// A server thread's server for this set-up.
    pub fn server(
        &self,
        mac: MacAddr,
        client_mac: MacAddr,
        devices: &[dmfabric_devices::DeviceSpec],
    ) -> Server<Inline> {
        let s = Server::new(SERVER_ID, mac, devices, self.registry(client_mac));
        if self.authenticate {
            s
        } else {
            s.without_authentication()
        }
    }

    /// Write the load's key file and the server's client list into `dir`
    /// (for a server process); returns the client list's path.
    fn write_clients(&self, dir: &std::path::Path, client_mac: MacAddr) -> std::io::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let key = dir.join("bench-client.key");
        let _ = std::fs::remove_file(&key);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key)?;
        let c = loadgen::CLIENT_ID;
        writeln!(f, "client = {c}\nsend = 1\n\n[[key]]\nid = 1\nsecret = \"{}\"", self.secret.to_hex())?;
        let mut vms = format!("{{ id = 1, vcpus = {} }}", loadgen::MAX_INFLIGHT);
        if let Some(vm) = self.pc_vm.filter(|&v| v != 1) {
            vms.push_str(&format!(", {{ id = {vm}, vcpus = 1 }}"));
        }
        let clients = dir.join("clients.toml");
        std::fs::write(
            &clients,
            format!("[[client]]\nid = {c}\nmac = \"{client_mac}\"\nkey_file = \"bench-client.key\"\nvms = [{vms}]\n"),
        )?;
        Ok(clients)
    }
}

/// A fresh random secret (the OS's random source).
pub fn fresh_secret() -> Secret {
    let mut b = [0u8; 32];
    if getrandom::fill(&mut b).is_err() {
        // No random source: a bench still runs, with a clock-made key.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b[..16].copy_from_slice(&t.as_nanos().to_le_bytes());
    }
    Secret::from_bytes(b)
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("The server did not start: {0}")]
    ServerStart(String),
    #[error("Cannot start the server process: {0}")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Pin(#[from] dmfabric_pinning::PinError),
    #[error(transparent)]
    PcLayout(#[from] dmfabric_devices::platform::pc::VmOutOfRange),
}

/// `spec` with XDP program `program` (if set and an AF_XDP spec).
fn with_program(mut spec: TransportSpec, program: Option<XdpProgram>) -> TransportSpec {
    if let TransportSpec::Xdp(cfg) = &mut spec {
        cfg.program = program.or(cfg.program);
    }
    spec
}

/// The transport spec for host `me` talking to host `peer` of `net`.
pub fn spec_for(kind: TransportKind, net: &TestNet, me: usize, peer: usize, xdp_mode: XdpMode) -> TransportSpec {
    let host = net.host(me);
    match kind {
        TransportKind::Xdp => {
            let mut cfg = XdpConfig::new(&host.iface);
            cfg.mode = xdp_mode;
            TransportSpec::Xdp(cfg)
        }
        TransportKind::Packet => TransportSpec::Packet { iface: host.iface.clone() },
        TransportKind::Udp | TransportKind::Mem => TransportSpec::Udp {
            local: (host.ipv4, UDP_PORT).into(),
            peer: Some((net.host(peer).ipv4, UDP_PORT).into()),
            mac: host.mac,
        },
    }
}

/// What a run produced: the load's result and the server's counters (when
/// the server reported them).
#[derive(Debug)]
pub struct Outcome<R> {
    pub result: R,
    pub server: Option<ServerStats>,
    pub server_json: Option<String>,
}

/// Start a server per `setup`, then run `load` on the client side with a
/// connected transport and the discovered target.
pub fn run<R, F>(setup: &Setup, stop: &Arc<AtomicBool>, load: F) -> Result<Outcome<R>, HarnessError>
where
    F: FnOnce(Box<dyn Transport>, Target) -> Result<R, LoadError>,
{
    if setup.transport == TransportKind::Mem {
        return run_mem(setup, stop, load);
    }
    let net = TestNet::pair()?;
    match &setup.launch {
        ServerLaunch::Thread => {
            let server_stop = Arc::new(AtomicBool::new(false));
            let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
            let spec = with_program(spec_for(setup.transport, &net, 1, 0, setup.xdp_mode), setup.xdp_program);
            let ns = net.host(1).ns.clone();
            let core = setup.server_core;
            let mut devices = vec![pc::test_device(pc::TEST_DEVICE_ID)];
            if let Some(vm) = setup.pc_vm {
                devices.extend(PcLayout::new(vm)?.specs());
            }
            let flag = server_stop.clone();
            let (server_setup, client_mac) = (setup.clone(), net.host(0).mac);
            let server = std::thread::spawn(move || -> Option<ServerStats> {
                let started = (|| -> Result<(Box<dyn Transport>, Server<Inline>), String> {
                    netns::enter(&ns).map_err(|e| e.to_string())?;
                    if let Some(c) = core {
                        dmfabric_pinning::pin_current(c).map_err(|e| e.to_string())?;
                    }
                    let t = dmfabric_dataplane::open(&spec).map_err(|e| e.to_string())?;
                    let s = server_setup.server(t.mac(), client_mac, &devices);
                    Ok((t, s))
                })();
                let (mut t, mut s) = match started {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return None;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let cfg = PollConfig { spin: u32::MAX, ..PollConfig::default() };
                let _ = poll::run(t.as_mut(), &mut s, cfg, &flag);
                Some(s.stats())
            });
            let started = ready_rx
                .recv_timeout(Duration::from_secs(20))
                .map_err(|_| HarnessError::ServerStart("timed out".into()))?;
            let result = match started {
                Ok(()) => client_side(setup, &net, load),
                Err(e) => Err(HarnessError::ServerStart(e)),
            };
            server_stop.store(true, Ordering::Relaxed);
            let server = server.join().ok().flatten();
            Ok(Outcome { result: result?, server, server_json: None })
        }
        ServerLaunch::Process(exe) => {
            if !setup.authenticate {
                return Err(HarnessError::ServerStart(
                    "a server process always authenticates: measure without it with a server thread".into(),
                ));
            }
            // The load's key and the server's client list, in a directory of this run.
            let run_dir = std::env::temp_dir().join(format!("dmfabric-bench-{}", net.host(1).ns));
            let _remove = RemoveDir(run_dir.clone());
            let clients = setup.write_clients(&run_dir, net.host(0).mac).map_err(HarnessError::Spawn)?;
            let mut cmd = net.command(1, exe);
            cmd.args([
                "server",
                "--transport",
                setup.transport.name(),
                "--iface",
                &net.host(1).iface,
                "--server-id",
                &SERVER_ID.to_string(),
            ]);
            cmd.arg("--stats-json").arg("--clients").arg(&clients);
            // Busy-poll when the server has its own core; a split server on a
            // small host shares cores with the client and must nap when idle.
            if setup.server_layout.is_none() {
                cmd.arg("--busy-poll");
            }
            if setup.transport == TransportKind::Xdp {
                cmd.args([
                    "--xdp-mode",
                    match setup.xdp_mode {
                        XdpMode::Auto => "auto",
                        XdpMode::Generic => "generic",
                        XdpMode::Native => "native",
                    },
                ]);
                // The server picks its XDP program from the environment.
                if let Some(p) = setup.xdp_program {
                    cmd.env(XDP_PROG_ENV, p.to_string());
                }
            }
            if setup.transport == TransportKind::Udp {
                cmd.args(["--udp-bind", &format!("{}:{UDP_PORT}", net.host(1).ipv4)]);
            }
            match &setup.server_layout {
                // A split server spreads over every core, the client's included.
                Some(layout) => {
                    cmd.args(["--layout", layout]);
                }
                None => {
                    if let Some(c) = setup.server_core {
                        cmd.args(["--cores", &c.to_string()]);
                    }
                }
            }
            cmd.args(["--test-devices", &setup.test_devices.to_string()]);
            if setup.scrape.is_some() {
                cmd.args(["--metrics", METRICS_ADDR]);
            }
            // A PC's devices come with a console directory: one for this run.
            let console_dir = run_dir.join("consoles");
            if let Some(vm) = setup.pc_vm {
                cmd.args(["--pc-vm", &vm.to_string(), "--console-dir"]).arg(&console_dir);
            }
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
            let mut child = net.spawn(&mut cmd).map_err(HarnessError::Spawn)?;
            let stdout = child.child().stdout.take().ok_or_else(|| HarnessError::ServerStart("no stdout".into()))?;
            let (line_tx, line_rx) = mpsc::channel::<String>();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line_tx.send(line).is_err() {
                        break;
                    }
                }
            });
            wait_ready(&line_rx, stop)?;
            let scraper = setup.scrape.map(|every| Scraper::start(&net, every));
            let result = client_side(setup, &net, load);
            if let Some(s) = scraper {
                let (n, failed) = s.finish();
                eprintln!("dmfabric bench: scraped the server's metrics {n} times during the load ({failed} failed)");
            }
            let _ = child.interrupt(Duration::from_secs(5));
            drop(child);
            let _ = reader.join();
            let _ = std::fs::remove_dir_all(&console_dir);
            let server_json =
                line_rx.try_iter().filter_map(|l| l.strip_prefix("stats-json: ").map(str::to_string)).last();
            Ok(Outcome { result: result?, server: None, server_json })
        }
    }
}

/// Where a server process started with [`Setup::scrape`] serves its
/// metrics, inside its own namespace.
const METRICS_ADDR: &str = "127.0.0.1:9464";

/// GETs the server's metrics every so often, from inside its namespace.
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(u64, u64), netns::NetnsError>>,
}

impl Scraper {
    fn start(net: &TestNet, every: Duration) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = net.spawn_in(1, "dmf-bench-scrape", move || {
            let (mut ok, mut failed) = (0, 0);
            let mut next = std::time::Instant::now();
            while !flag.load(Ordering::Relaxed) {
                if std::time::Instant::now() >= next {
                    next += every;
                    if scrape_once().is_some() {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        });
        Scraper { stop, thread }
    }

    /// Stop; scrapes done and failed.
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok().and_then(Result::ok).unwrap_or_default()
    }
}

fn scrape_once() -> Option<usize> {
    use std::io::{Read, Write};
    let addr = METRICS_ADDR.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    body.starts_with(b"HTTP/1.1 200").then_some(body.len())
}

fn wait_ready(lines: &mpsc::Receiver<String>, stop: &AtomicBool) -> Result<(), HarnessError> {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.starts_with("dmfabric server ready") => return Ok(()),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(HarnessError::ServerStart("the server process exited (its error is above)".into()))
            }
        }
    }
    Err(HarnessError::ServerStart("no ready line within 30 s".into()))
}

fn client_side<R, F>(setup: &Setup, net: &TestNet, load: F) -> Result<R, HarnessError>
where
    F: FnOnce(Box<dyn Transport>, Target) -> Result<R, LoadError>,
{
    let spec = with_program(spec_for(setup.transport, net, 0, 1, setup.xdp_mode), setup.xdp_program);
    let core = setup.client_core;
    net.with_host(0, move || -> Result<R, HarnessError> {
        if let Some(c) = core {
            dmfabric_pinning::pin_current(c)?;
        }
        let mut t = dmfabric_dataplane::open(&spec).map_err(LoadError::from)?;
        let sealer = setup.sealer();
        let check = sealer.clone();
        t.check_senders(Box::new(move |f: &[u8]| check.verifies(f)));
        let session = loadgen::discover(t.as_mut(), loadgen::CLIENT_ID, &sealer, Duration::from_secs(5))?;
        let target = Target { devices: setup.test_devices, ..Target::test_device(&session, &sealer) };
        Ok(load(t, target)?)
    })?
}

fn run_mem<R, F>(setup: &Setup, stop: &Arc<AtomicBool>, load: F) -> Result<Outcome<R>, HarnessError>
where
    F: FnOnce(Box<dyn Transport>, Target) -> Result<R, LoadError>,
{
    let client_mac = MacAddr([2, 0, 0, 0, 0, 1]);
    let server_mac = MacAddr([2, 0, 0, 0, 0, 2]);
    let (mut client, mut server_t) = mem::pair(client_mac, server_mac, 1024);
    let server_stop = Arc::new(AtomicBool::new(false));
    let flag = server_stop.clone();
    let core = setup.server_core;
    let server_setup = setup.clone();
    let server = std::thread::spawn(move || {
        if let Some(c) = core {
            let _ = dmfabric_pinning::pin_current(c);
        }
        let mut s = server_setup.server(server_mac, client_mac, &[pc::test_device(pc::TEST_DEVICE_ID)]);
        let cfg = PollConfig { spin: u32::MAX, ..PollConfig::default() };
        let _ = poll::run(&mut server_t, &mut s, cfg, &flag);
        s.stats()
    });
    if let Some(c) = setup.client_core {
        dmfabric_pinning::pin_current(c)?;
    }
    let _ = stop;
    let sealer = setup.sealer();
    let result = loadgen::discover(&mut client, loadgen::CLIENT_ID, &sealer, Duration::from_secs(5))
        .and_then(|session| load(Box::new(client), Target::test_device(&session, &sealer)));
    server_stop.store(true, Ordering::Relaxed);
    let server = server.join().ok();
    Ok(Outcome { result: result?, server, server_json: None })
}

/// Removes a directory, also when a run fails.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
