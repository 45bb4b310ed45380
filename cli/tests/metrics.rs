//! `--metrics` scraped by a real Prometheus, and `dmfabric top` under tmux.
//!
//! A server (host 1) and a client (host 0) on a test net; their metrics
//! listeners on the data link itself (169.254.77.x: dmfabric's XDP program
//! passes every frame that is not 0x88B5 to the kernel), Prometheus and `dmfabric top` in the client's
//! namespace. The load is bounded: VM 1 runs io_loop for a fixed number of
//! iterations; VM 2 only keeps the client up afterwards (it waits, halted,
//! for an interrupt no device sends) until the test stops it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{ChildGuard, TestNet};
use dmfabric_testkit::Need;

mod common;
use common::{spawn_logged, wait_for, Keys, BIN};

const SERVER_METRICS: &str = "169.254.77.2:9464";
const CLIENT_METRICS: &str = "169.254.77.1:9465";
/// io_loop's iterations: four remote requests each (OUT, IN, MMIO write, read).
const ITERATIONS: u64 = 40_000;

fn require_privileged() -> bool {
    std::env::var("DMFABRIC_REQUIRE_PRIVILEGED").as_deref() == Ok("1")
}

/// Whether `tool` is installed: a skip of one line if not, a failure if
/// DMFABRIC_REQUIRE_PRIVILEGED=1 (CI: scripts/setup.sh installs it).
fn installed_or_skip(test: &str, tool: &str, package: &str) -> bool {
    let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        let msg = format!("{test}: skipped, needs {tool} (apt-get install {package}; scripts/setup.sh installs it)");
        assert!(!require_privileged(), "{msg} (DMFABRIC_REQUIRE_PRIVILEGED=1 makes this a failure)");
        eprintln!("{msg}");
    }
    found
}

/// A directory of the test's own, removed when dropped (on failure too).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("dmfabric-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server and a client with their metrics endpoints, the client's load running.
struct Rig {
    net: TestNet,
    _keys: Keys,
    _server: (ChildGuard, mpsc::Receiver<String>),
    client: (ChildGuard, mpsc::Receiver<String>),
    json: PathBuf,
}

fn client_config(dir: &Path, iterations: u64) -> PathBuf {
    let text = format!(
        r#"client = 3
key_file = "client-3.key"
run_seconds = 120
metrics = "{CLIENT_METRICS}"

[link]
transport = "xdp"
iface = "dmf0"

[[vm]]
id = 1
guest = "io_loop"
args = [{iterations}, 0x500, 0xd0000000]

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

# Keeps the client up once VM 1 is done: waits for an interrupt the
# local register file never raises.
[[vm]]
id = 2
guest = "irq_wait"
args = [1, 0x600, 0]

[[vm.device]]
space = "pio"
base = 0x600
len = 8
local = "regfile"
"#
    );
    let path = dir.join("client.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Rig {
    fn start(name: &str, iterations: u64) -> Rig {
        let net = TestNet::pair().unwrap();
        let keys = Keys::new(name, net.host(0).mac, &[(3, &[(1, 1), (2, 1)])]);
        let clients = keys.clients();
        let server = spawn_logged(
            &net,
            1,
            &["server", "--transport", "xdp", "--iface", "dmf0", "--clients", &clients, "--metrics", SERVER_METRICS],
        );
        let lines = wait_for(&server.1, "dmfabric server ready").expect("server ready");
        let _ = wait_for(&server.1, "metrics at").unwrap_or_else(|l| panic!("metrics line: {lines:?} {l:?}"));
        let config = client_config(&keys.dir, iterations);
        let json = keys.dir.join("client.json");
        let config_s = config.to_string_lossy().into_owned();
        let json_s = json.to_string_lossy().into_owned();
        let client = spawn_logged(&net, 0, &["client", "--config", &config_s, "--json", &json_s]);
        wait_for(&client.1, &format!("metrics at http://{CLIENT_METRICS}/metrics")).expect("client metrics");
        Rig { net, _keys: keys, _server: server, client, json }
    }

    /// GET `path` at `addr` from host `host`; the body.
    fn get(&self, host: usize, addr: &str, path: &str) -> Option<String> {
        http_get(&self.net, host, addr.parse().unwrap(), path)
    }

    /// A counter of the client's endpoint (summed over its series), if shown.
    fn client_counter(&self, name: &str) -> Option<f64> {
        let text = self.get(0, CLIENT_METRICS, "/metrics")?;
        sum_of(&text, name)
    }

    /// Stop the client (Ctrl-C) and read what it counted from its --json.
    fn stop_client(&mut self) -> serde_json::Value {
        let _ = self.client.0.interrupt(Duration::from_secs(20));
        let text = std::fs::read_to_string(&self.json)
            .unwrap_or_else(|e| panic!("{}: {e}; client said {:?}", self.json.display(), drain(&self.client.1)));
        serde_json::from_str(&text).unwrap()
    }
}

fn drain(rx: &mpsc::Receiver<String>) -> Vec<String> {
    rx.try_iter().collect()
}

fn http_get(net: &TestNet, host: usize, addr: SocketAddr, path: &str) -> Option<String> {
    net.with_host(host, || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        let status = head.lines().next()?.split_whitespace().nth(1)?;
        (status == "200").then(|| body.to_string())
    })
    .ok()
    .flatten()
}

/// The sum of the samples of `name` in a Prometheus text exposition.
fn sum_of(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let metric = series.split('{').next().unwrap_or_default();
        if metric == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus in host 0's namespace, scraping both endpoints every second.
struct Prometheus {
    _child: ChildGuard,
    dir: TempDir,
}

const PROMETHEUS: &str = "127.0.0.1:9090";

impl Prometheus {
    fn start(net: &TestNet) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\nscrape_configs:\n  - job_name: dmfabric\n    static_configs:\n      - targets: ['{SERVER_METRICS}', '{CLIENT_METRICS}']\n"
            ),
        )
        .unwrap();
        let out = Command::new("promtool").arg("check").arg("config").arg(&config).output().unwrap();
        assert!(out.status.success(), "promtool check config: {}", String::from_utf8_lossy(&out.stderr));
        let mut cmd = net.command(0, "prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log")).unwrap());
        let child = net.spawn(&mut cmd).expect("start prometheus");
        Prometheus { _child: child, dir }
    }

    /// What Prometheus says of its targets, and its log: for a failure's message.
    fn diagnose(&self, net: &TestNet) -> String {
        let targets = http_get(net, 0, PROMETHEUS.parse().unwrap(), "/api/v1/targets");
        let log = std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default();
        format!("targets: {targets:?}\nlog: {log}")
    }

    /// The value of `query`'s first result, if there is one.
    fn query(net: &TestNet, query: &str) -> Option<f64> {
        let body = http_get(net, 0, PROMETHEUS.parse().unwrap(), &format!("/api/v1/query?query={}", urlencode(query)))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        assert_eq!(v["status"], "success", "{query}: {body}");
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Wait up to `within` for `query` to have a value that passes `ok`; the last value seen.
    fn wait(net: &TestNet, query: &str, within: Duration, ok: impl Fn(f64) -> bool) -> Option<f64> {
        let end = Instant::now() + within;
        let mut last = None;
        while Instant::now() < end {
            last = Prometheus::query(net, query);
            if last.is_some_and(&ok) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        last
    }
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

#[test]
fn a_real_prometheus_scrapes_server_and_client_and_holds_what_the_client_counted() {
    let test = "a_real_prometheus_scrapes_server_and_client";
    if !dmfabric_testkit::privileged_or_skip(test, &[Need::Root, Need::Kvm])
        || !installed_or_skip(test, "prometheus", "prometheus")
    {
        return;
    }
    let mut rig = Rig::start("prom", ITERATIONS);
    let prometheus = Prometheus::start(&rig.net);
    let want = (4 * ITERATIONS) as f64;

    // Both endpoints pass promtool's lint, mid-load.
    for (host, addr) in [(1, SERVER_METRICS), (0, CLIENT_METRICS)] {
        let text = rig.get(host, addr, "/metrics").unwrap_or_else(|| panic!("GET {addr}/metrics"));
        assert!(text.contains("dmfabric_"), "{text}");
        promtool_check(&text).unwrap_or_else(|e| panic!("promtool check metrics on {addr}: {e}\n{text}"));
    }

    // Prometheus sees the load: requests went up at a non-zero rate, at
    // the server and at the client.
    let seen = Prometheus::wait(&rig.net, "dmfabric_client_requests_total", Duration::from_secs(120), |v| v >= want);
    assert_eq!(seen, Some(want), "Prometheus's last value of the client's requests; {}", prometheus.diagnose(&rig.net));
    // On a quiet host the load takes a second or two, a scrape or two: the
    // rate is over the last minute, which holds the samples before and
    // after it (waited for, bounded, in case the last scrape is still due).
    for series in ["dmfabric_client_requests_total", "dmfabric_server_requests_total"] {
        let within = Duration::from_secs(30);
        let rate = Prometheus::wait(&rig.net, &format!("sum(rate({series}[1m]))"), within, |r| r > 0.0);
        assert!(rate.is_some_and(|r| r > 0.0), "rate of {series}: {rate:?}; {}", prometheus.diagnose(&rig.net));
        let increase = Prometheus::wait(&rig.net, &format!("sum(increase({series}[5m]))"), within, |r| r > 0.0);
        assert!(increase.is_some_and(|r| r > 0.0), "increase of {series}: {increase:?}");
    }
    // VM 1's vCPU hands over its last copy when it ends, a moment after its last request.
    let exits = Prometheus::wait(
        &rig.net,
        r#"sum(dmfabric_client_vm_exits_total{vm="1",kind="remote"})"#,
        Duration::from_secs(30),
        |v| v >= want,
    );
    assert_eq!(exits, Some(want), "VM 1's remote exits: one per request");
    // The server's last requests reach Prometheus a scrape later than the
    // client's exits did: wait for them too (bounded).
    let server_reads = Prometheus::wait(
        &rig.net,
        r#"sum(dmfabric_server_device_reads_total{server="1",device="1"})"#,
        Duration::from_secs(30),
        |n| n >= want / 2.0,
    );
    let service = Prometheus::wait(
        &rig.net,
        r#"sum(dmfabric_server_device_service_seconds_count{device="1"})"#,
        Duration::from_secs(30),
        |n| n >= want,
    );
    let rtt_count = Prometheus::query(&rig.net, r#"sum(dmfabric_client_exit_round_trip_seconds_count{vm="1"})"#);
    assert!(server_reads.is_some_and(|n| n >= want / 2.0), "server reads of device 1: {server_reads:?}");
    assert!(service.is_some_and(|n| n >= want), "service times of device 1: {service:?}");
    let drops = Prometheus::query(&rig.net, r#"count(dmfabric_server_drops_total{reason="unauthenticated_bad_tag"})"#);
    assert_eq!(drops, Some(1.0), "every drop reason is a series, zero or not");

    // What Prometheus holds is what the client counted when it ended.
    let report = rig.stop_client();
    let counted = report["client"]["requests"].as_f64().expect("client requests in --json");
    assert_eq!(Some(counted), seen, "client --json vs Prometheus");
    assert_eq!(counted, want);
    let vm1 = &report["vms"][0];
    assert_eq!(exits, vm1["exits"]["remote"].as_f64(), "remote exits of VM 1");
    assert!(rtt_count.is_some_and(|n| n >= want), "round trips timed: {rtt_count:?}");
    drop(rig);
}

#[test]
fn a_metrics_port_in_use_is_one_line_and_nothing_starts() {
    if !dmfabric_testkit::privileged_or_skip("a_metrics_port_in_use", &[Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let held = net.with_host(1, || std::net::TcpListener::bind("127.0.0.1:9464").unwrap()).unwrap();
    let keys = Keys::new("port-in-use", net.host(0).mac, &[(3, &[(1, 1)])]);
    let clients = keys.clients();
    let out = net
        .command(1, BIN)
        .args(["server", "--transport", "xdp", "--iface", "dmf0", "--clients", &clients])
        .args(["--metrics", "127.0.0.1:9464"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_port_in_use(&out);
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "nothing started: {:?}", out.stdout);
    let link = Command::new("ip").args(["-n", &net.host(1).ns, "-d", "link", "show", "dmf0"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("prog/xdp"), "no XDP program was attached");
    // The client too, before it opens its link or starts a VM.
    let out = net.command(1, BIN).args(["client", "--example-config"]).stdin(Stdio::null()).output().unwrap();
    let config = keys.dir.join("client.toml");
    std::fs::write(&config, &out.stdout).unwrap();
    let out = net
        .command(1, BIN)
        .args(["client", "--metrics", "127.0.0.1:9464", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_port_in_use(&out);
    drop(held);
}

/// A tmux server of the test's own (its socket in the test's directory),
/// killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn new(dir: &TempDir) -> Tmux {
        Tmux { socket: dir.0.join("tmux.sock") }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-S").arg(&self.socket).args(args).stdin(Stdio::null()).output().unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The req/s of server `id` in a screen of `dmfabric top`.
fn server_rate(screen: &str, id: &str) -> Option<f64> {
    let mut in_servers = false;
    for line in screen.lines() {
        if line.starts_with("SERVER ") && line.contains("Mreq/s") {
            in_servers = true;
            continue;
        }
        if in_servers {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.first() == Some(&id) {
                return f.get(2)?.parse().ok();
            }
        }
    }
    None
}

#[test]
fn dmfabric_top_shows_live_rates_under_tmux_and_its_json_parses() {
    let test = "dmfabric_top_shows_live_rates_under_tmux";
    if !dmfabric_testkit::privileged_or_skip(test, &[Need::Root, Need::Kvm]) || !installed_or_skip(test, "tmux", "tmux")
    {
        return;
    }
    let mut rig = Rig::start("top", ITERATIONS);
    let end = Instant::now() + Duration::from_secs(30);
    while rig.client_counter("dmfabric_client_requests_total").unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < end, "the client's load did not start: {:?}", drain(&rig.client.1));
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoints = ["--endpoint", SERVER_METRICS, "--endpoint", CLIENT_METRICS];

    // --once --json: one sample over a second, for scripts.
    let out = rig.net.command(0, BIN).args(["top", "--once", "--json"]).args(endpoints).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("top --once --json is JSON");
    assert!(v["interval_s"].as_f64().is_some_and(|s| s > 0.5), "{v}");
    assert!(v["endpoints"].as_array().unwrap().iter().all(|e| e["error"].is_null()), "{v}");
    let server = &v["servers"][0];
    assert_eq!(server["server"], "1", "{v}");
    assert!(server["requests_per_s"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    assert!(server["mreq_per_s"].as_f64().is_some() && server["drops"].is_object(), "{v}");
    let vm1 = v["vms"].as_array().unwrap().iter().find(|m| m["vm"] == "1").unwrap_or_else(|| panic!("{v}"));
    assert!(vm1["exits_per_s"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    assert!(vm1["p50_us"].as_f64().is_some_and(|p| p > 0.0), "{v}");
    assert!(vm1["p99_us"].as_f64() >= vm1["p50_us"].as_f64(), "{v}");
    assert!(vm1["interrupts_per_s"].is_number(), "{v}");
    let dev = v["devices"].as_array().unwrap().iter().find(|d| d["vm"] == "1" && d["server"] == "1");
    assert!(dev.is_some_and(|d| d["device"] == "1" && d["exits_per_s"].as_f64() > Some(0.0)), "{v}");
    let sdev = v["server_devices"].as_array().unwrap().iter().find(|d| d["device"] == "1");
    assert!(sdev.is_some_and(|d| d["kind"] == "regfile" && d["service_p50_us"].is_number()), "{v}");

    // The live view in a terminal: rates that move, q quits and gives the
    // terminal back as it was.
    let dir = TempDir::new("top");
    let stty = dir.0.join("stty");
    let tmux = Tmux::new(&dir);
    let script =
        format!("{BIN} top {}; echo \"top exited $?\"; stty -a > {}; sleep 60", endpoints.join(" "), stty.display());
    let ns = rig.net.host(0).ns.clone();
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "45",
        "ip",
        "netns",
        "exec",
        &ns,
        "sh",
        "-c",
        &script,
    ]);
    assert!(out.status.success(), "tmux: {}", String::from_utf8_lossy(&out.stderr));
    let end = Instant::now() + Duration::from_secs(20);
    let mut screen = String::new();
    while Instant::now() < end {
        screen = tmux.screen();
        if server_rate(&screen, "1").is_some_and(|r| r > 0.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(server_rate(&screen, "1").is_some_and(|r| r > 0.0), "a non-zero req/s for server 1:\n{screen}");
    assert!(screen.contains("exits/s") && screen.contains("p99 us"), "{screen}");
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let end = Instant::now() + Duration::from_secs(10);
    while !tmux.screen().contains("top exited 0") {
        assert!(Instant::now() < end, "q did not end top:\n{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    while !stty.exists() || std::fs::read_to_string(&stty).unwrap_or_default().is_empty() {
        assert!(Instant::now() < end, "stty -a after top");
        std::thread::sleep(Duration::from_millis(100));
    }
    let modes = std::fs::read_to_string(&stty).unwrap();
    for mode in ["icanon", "echo", "isig"] {
        assert!(modes.split_whitespace().any(|m| m == mode), "{mode} restored: {modes}");
    }
    let _ = rig.stop_client();
}

/// A process that stopped before starting, with one line naming the port it could not take.
fn assert_port_in_use(out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("port 9464 is already in use"), "{stderr}");
}
