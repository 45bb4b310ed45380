//! The `dmfabric` binary as a user runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use dmfabric_bench::loadgen::{self, Target};
use dmfabric_dataplane::netns::{ChildGuard, TestNet};
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_testkit::Need;

mod common;
use common::{leftover_namespaces, spawn_logged, wait_for, Keys, BIN};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("run dmfabric");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The load generator's client platform (VM 1, a vCPU per load slot) on host 0.
fn load_keys(net: &TestNet, name: &str) -> Keys {
    Keys::new(name, net.host(0).mac, &[(loadgen::CLIENT_ID, &[(1, loadgen::MAX_INFLIGHT)])])
}

/// Start `dmfabric server` on host 1 for the client platforms of `keys`;
/// read its output with [`wait_for`].
fn start_server(net: &TestNet, keys: &Keys, extra: &[&str]) -> (ChildGuard, mpsc::Receiver<String>) {
    let iface = net.host(1).iface.clone();
    let clients = keys.clients();
    let mut args = vec!["server", "--transport", "xdp", "--iface", &iface, "--clients", &clients];
    args.extend_from_slice(extra);
    spawn_logged(net, 1, &args)
}

fn xdp_attached(net: &TestNet, host: usize) -> bool {
    let out = Command::new("ip")
        .args(["-n", &net.host(host).ns, "-d", "link", "show", &net.host(host).iface])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// Requests from host 0 over AF_XDP are answered.
fn server_answers(net: &TestNet) -> bool {
    net.with_host(0, || {
        let mut t = XdpTransport::open(&XdpConfig::new(&net.host(0).iface)).expect("client AF_XDP");
        let sealer = dmfabric_dataplane::hello::Sealer::new(dmfabric_testkit::keys::ring(loadgen::CLIENT_ID));
        let Ok(session) = loadgen::discover(&mut t, loadgen::CLIENT_ID, &sealer, Duration::from_secs(3)) else {
            return false;
        };
        let r = loadgen::rtt(
            &mut t,
            &Target::test_device(&session, &sealer),
            200,
            0,
            loadgen::Retry::default(),
            &AtomicBool::new(false),
        )
        .unwrap();
        r.completed == 200 && r.wrong == 0
    })
    .unwrap()
}

#[test]
fn leftover_xdp_program_of_a_killed_server_is_removed() {
    if !dmfabric_testkit::privileged_or_skip("leftover_xdp_program_of_a_killed_server_is_removed", &[Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let keys = load_keys(&net, "leftover");
    let (mut first, rx) = start_server(&net, &keys, &[]);
    wait_for(&rx, "dmfabric server ready").expect("first server ready");
    first.child().kill().unwrap(); // SIGKILL: no cleanup runs
    first.child().wait().unwrap();
    assert!(xdp_attached(&net, 1), "a killed server leaves its program behind");

    let (_second, rx) = start_server(&net, &keys, &[]);
    // stdout and stderr are read by two threads: wait for each line itself.
    let mut lines = wait_for(&rx, "removed leftover XDP program `dmfabric_xsk`")
        .unwrap_or_else(|l| panic!("second server did not remove the program: {l:?}"));
    if !lines.iter().any(|l| l.contains("dmfabric server ready")) {
        lines.extend(wait_for(&rx, "dmfabric server ready").unwrap_or_else(|l| panic!("second server: {l:?}")));
    }
    assert!(server_answers(&net), "the new server serves");
}

/// While a server serves requests over AF_XDP on host 1's interface, IPv6
/// (link-local ping, neighbour discovery) and TCP (over IPv4, so ARP too)
/// reach host 1 on the same interface: dmfabric's XDP program passes them
/// to the kernel. A 0x88B5 frame too short to parse still reaches the
/// server, which counts it as malformed; other EtherTypes never reach it.
#[test]
fn the_served_interface_keeps_ipv6_and_tcp_and_short_fabric_frames_are_counted() {
    let name = "the_served_interface_keeps_ipv6_and_tcp_and_short_fabric_frames_are_counted";
    if !dmfabric_testkit::privileged_or_skip(name, &[Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let peer6 = net.enable_ipv6(1).unwrap();
    net.enable_ipv6(0).unwrap();
    let keys = load_keys(&net, "shared-link");
    let (mut server, rx) = start_server(&net, &keys, &[]);
    wait_for(&rx, "dmfabric server ready").expect("server ready");

    let stop = AtomicBool::new(false);
    let (ping6, tcp4, tcp6, load) = std::thread::scope(|s| {
        // Requests from host 0 until the other traffic is done (bounded by
        // the request count).
        let load = s.spawn(|| {
            net.with_host(0, || {
                let mut t = XdpTransport::open(&XdpConfig::new(&net.host(0).iface)).expect("client AF_XDP");
                let sealer = dmfabric_dataplane::hello::Sealer::new(dmfabric_testkit::keys::ring(loadgen::CLIENT_ID));
                let session = loadgen::discover(&mut t, loadgen::CLIENT_ID, &sealer, Duration::from_secs(3))
                    .expect("session with the server");
                let target = Target::test_device(&session, &sealer);
                loadgen::rtt(&mut t, &target, 2_000_000, 0, loadgen::Retry::default(), &stop).unwrap()
            })
            .unwrap()
        });
        // The load stops when the other traffic is done, also on a panic.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let stop_load = StopOnDrop(&stop);
        // Let the load start before the other traffic.
        std::thread::sleep(Duration::from_millis(300));
        let ping6 = net.ping6(0, peer6).expect("ping");
        let tcp4 = net.tcp_round_trip(0, 1, net.host(1).ipv4.into(), 47200).unwrap();
        let tcp6 = net.tcp_round_trip(0, 1, peer6.into(), 47201).unwrap();
        drop(stop_load);
        (ping6, tcp4, tcp6, load.join().unwrap())
    });
    // (A request lost to a busy host's scheduling is not this test's subject.)
    assert!(load.completed > 0 && load.wrong == 0, "served {} requests, {} wrong", load.completed, load.wrong);
    assert!(ping6, "ping -6 to the served interface's link-local address");
    assert!(tcp4 && tcp6, "TCP over IPv4 {tcp4}, over IPv6 link-local {tcp6}");

    // A 0x88B5 frame of a header and one byte, and frames of other
    // EtherTypes, from host 0 by AF_PACKET.
    net.with_host(0, || {
        let mut t = dmfabric_dataplane::packet::PacketTransport::open(&net.host(0).iface).unwrap();
        let mut batch = dmfabric_dataplane::FrameBatch::new();
        for (ethertype, len) in [(0x88B5u16, 15), (0x0800, 64), (0x88B6, 64)] {
            let mut f = vec![0u8; len];
            f[..6].copy_from_slice(&net.host(1).mac.0);
            f[6..12].copy_from_slice(&net.host(0).mac.0);
            f[12..14].copy_from_slice(&ethertype.to_be_bytes());
            batch.push(&f);
        }
        use dmfabric_dataplane::Transport;
        assert_eq!(t.send(&mut batch).unwrap(), 3);
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.interrupt(Duration::from_secs(5)).unwrap().success());
    let lines = wait_for(&rx, "dmfabric server: transport").unwrap_or_else(|l| panic!("server's last lines: {l:?}"));
    let stats = lines.iter().find(|l| l.contains("dmfabric server: requests")).unwrap_or_else(|| panic!("{lines:?}"));
    assert!(stats.contains(" malformed 1") && stats.contains(" truncated=1"), "{stats}");
    // No IPv4, IPv6, ARP or 0x88B6 frame reached the server.
    assert!(stats.contains(" foreign 0 "), "{stats}");
}

#[test]
fn a_live_server_is_never_disturbed_by_a_second_one() {
    if !dmfabric_testkit::privileged_or_skip("a_live_server_is_never_disturbed_by_a_second_one", &[Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let keys = load_keys(&net, "live");
    let (_first, rx) = start_server(&net, &keys, &[]);
    wait_for(&rx, "dmfabric server ready").expect("first server ready");
    let (mut second, rx2) = start_server(&net, &keys, &[]);
    let lines = wait_for(&rx2, "in use by another AF_XDP socket").unwrap_or_else(|l| panic!("second server: {l:?}"));
    let status = second.child().wait().unwrap();
    assert_eq!(status.code(), Some(1), "{lines:?}");
    assert!(server_answers(&net), "the first server still serves");
}

#[test]
fn missing_privileges_give_one_line_naming_the_fallback() {
    if !dmfabric_testkit::privileged_or_skip("missing_privileges_give_one_line_naming_the_fallback", &[Need::Root]) {
        return;
    }
    // Drop to an unprivileged user with no capabilities.
    let drop_privs = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", BIN])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv (util-linux)");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = drop_privs(&["server", "--transport", "xdp", "--iface", "lo", "--cores", "0"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("CAP_NET_ADMIN") && err.contains("--transport packet"), "{err}");
    let (code, err) = drop_privs(&["server", "--transport", "packet", "--iface", "lo", "--cores", "0"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("CAP_NET_RAW") && err.contains("--transport udp"), "{err}");
    // KVM without permission on /dev/kvm (a config readable by anyone),
    // where /dev/kvm is closed to others as on this machine kind.
    use std::os::unix::fs::PermissionsExt;
    let open_to_all = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode() & 0o006 != 0).unwrap_or(false);
    if open_to_all {
        eprintln!("/dev/kvm is open to every user here: its permission error is not tested");
        return;
    }
    let config = std::env::temp_dir().join(format!("dmfabric-nokvm-{}.toml", std::process::id()));
    std::fs::write(&config, "client = 1\n[[vm]]\nid = 1\nguest = \"io_loop\"\n").unwrap();
    let (code, err) = drop_privs(&["client", "--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_file(&config);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("/dev/kvm") && (err.contains("permission denied") || err.contains("No /dev/kvm")), "{err}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let (code, _, err) = run(&["server", "--transport", "xdp"]);
    assert_eq!((code, err.trim()), (1, "dmfabric: --iface is required with --transport xdp"));
    let (code, _, err) = run(&["bench", "throughput", "--transport", "mem", "--inflight", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("--inflight must be between 1 and 512"), "{err}");
    let (code, _, err) = run(&["bench", "rtt", "--transport", "carrier-pigeon"]);
    assert_eq!(code, 2, "clap usage error");
    assert!(err.contains("unknown transport `carrier-pigeon`"), "{err}");
    let (code, _, err) = run(&["server", "--transport", "xdp", "--iface", "no-such-if0", "--cores", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("No interface `no-such-if0`") || err.contains("CAP_"), "{err}");
}

#[test]
fn bench_rtt_writes_json_and_leaves_nothing_behind() {
    if !dmfabric_testkit::privileged_or_skip("bench_rtt_writes_json_and_leaves_nothing_behind", &[Need::Root]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-cli-{}", std::process::id()));
    let json = dir.join("rtt.json");
    let spawned = Command::new(BIN)
        .args(["bench", "rtt", "--transport", "xdp,udp", "--requests", "3000", "--warmup", "500", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(dir.join("rtt.svg"))
        .arg("--hgrm")
        .arg(dir.join("rtt.hgrm"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = spawned.id();
    let child = spawned.wait_with_output().unwrap();
    assert!(child.status.success(), "{}", String::from_utf8_lossy(&child.stderr));
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().expect("an array for two transports");
    assert_eq!(rows.len(), 2);
    for (row, name) in rows.iter().zip(["xdp", "udp"]) {
        assert_eq!(row["transport"], name);
        assert_eq!(row["requests"], 3000);
        assert_eq!(row["lost"], 0);
        for key in ["p50_us", "p99_us", "p999_us", "max_us"] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key} in {row}");
        }
        // Its percentile distribution: every timed request, up to its max.
        let hgrm = std::fs::read_to_string(dir.join(format!("rtt-{name}.hgrm"))).unwrap();
        let last = hgrm.lines().take_while(|l| !l.starts_with('#')).last().unwrap().to_string();
        let fields: Vec<f64> = last.split_whitespace().map(|f| f.parse().unwrap()).collect();
        assert_eq!((fields[1], fields[2]), (1.0, 3000.0), "{hgrm}");
        let max = row["max_us"].as_f64().unwrap();
        assert!((fields[0] - max).abs() <= max * 0.01 + 0.01, "max {max} vs {last}");
    }
    let svg = std::fs::read_to_string(dir.join("rtt.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.matches(r#"stroke-width="2""#).count() == 4,
        "a curve and a legend mark per run"
    );
    let _ = std::fs::remove_dir_all(&dir);
    // The bench made its namespaces (named after its pid) and removed them.
    let left = leftover_namespaces(pid);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn bench_throughput_over_mem_needs_no_privileges() {
    let dir = std::env::temp_dir().join(format!("dmfabric-cli-tput-{}", std::process::id()));
    let json = dir.join("t.json");
    let (code, out, err) =
        run(&["bench", "throughput", "--transport", "mem", "--seconds", "0.3", "--json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Mreq/s"), "{out}");
    let row: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in ["transport", "seconds", "completed", "lost", "mreq_per_s"] {
        assert!(!row[key].is_null(), "{key} missing in {row}");
    }
    assert_eq!(row["lost"], 0);
    assert_eq!(row["wrong"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn split_layout_serves_over_xdp_with_every_worker_busy() {
    if !dmfabric_testkit::privileged_or_skip("split_layout_serves_over_xdp_with_every_worker_busy", &[Need::Root]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-cli-split-{}", std::process::id()));
    let json = dir.join("t.json");
    // On a 2-core host the workers share cores with the client, so answers
    // are slow (scheduler time slices): give them time, check correctness.
    let out = Command::new(BIN)
        .args(["bench", "throughput", "--transport", "xdp", "--seconds", "1", "--inflight", "16"])
        .args([
            "--server-layout",
            "split:1:2",
            "--test-devices",
            "2",
            "--timeout-ms",
            "3000",
            "--retries",
            "0",
            "--json",
        ])
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let row: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((row["lost"].as_u64(), row["wrong"].as_u64()), (Some(0), Some(0)), "{row}");
    assert!(row["completed"].as_u64().unwrap() > 0);
    let counters = err
        .lines()
        .find_map(|l| l.split_once("server counters ").map(|(_, j)| j.to_string()))
        .expect("server counters");
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    let executed: Vec<u64> =
        counters["shards"]["executed"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(executed.len(), 2);
    assert!(executed.iter().all(|&n| n > 0), "both workers served: {executed:?}");
    assert_eq!(executed.iter().sum::<u64>(), counters["server"]["completions"].as_u64().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The example config with io_loop doing `iterations`.
fn example_config(dir: &std::path::Path, iterations: u64) -> std::path::PathBuf {
    let (code, example, _) = run(&["client", "--example-config"]);
    assert_eq!(code, 0);
    let path = dir.join("client.toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&path, example.replace("args = [1000,", &format!("args = [{iterations},"))).unwrap();
    path
}

#[test]
fn client_runs_the_example_config_against_a_server_and_prints_counters() {
    if !dmfabric_testkit::privileged_or_skip("client_runs_the_example_config", &[Need::Root, Need::Kvm]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    // The example's client platform 3: VMs 1 and 2, its key beside the config.
    let keys = Keys::new("example", net.host(0).mac, &[(3, &[(1, 1), (2, 1)])]);
    let (mut server, rx) = start_server(&net, &keys, &[]);
    wait_for(&rx, "dmfabric server ready").expect("server ready");
    let dir = keys.dir.clone();
    let config = example_config(&dir, 300);
    let json = dir.join("client.json");
    let mut cmd = net.command(0, BIN);
    cmd.args(["client", "--iface", &net.host(0).iface, "--seconds", "60", "--config"]).arg(&config).arg("--json");
    cmd.arg(&json);
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // VM 1: io_loop's checksum; VM 2: 100 interrupts counted, none stray,
    // and the device's own count.
    let sum = dmfabric_vmm_shim::guests::io_loop_checksum(300);
    let want = format!("VM 1 vCPU 0: reported {:#x} {:#x}", sum as u32, (sum >> 32) as u32);
    assert!(stderr.contains(&want), "{want} in {stderr}");
    assert!(stderr.contains("VM 2 vCPU 0: reported 0x64 0x0 0x64"), "{stderr}");
    assert!(stderr.contains("VM 1: server 1 device 1: reads 600 writes 600"), "{stderr}");
    // (Retransmits depend on how busy the host is: not checked.)
    let vm2 = stderr.lines().find(|l| l.contains("VM 2: remote requests")).unwrap_or_else(|| panic!("{stderr}"));
    let field = |name: &str| -> u64 {
        let rest = &vm2[vm2.find(name).unwrap_or_else(|| panic!("{name} in {vm2}")) + name.len() + 1..];
        rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{name} in {vm2}"))
    };
    assert_eq!((field("requests"), field("completions"), field("interrupts")), (101, 101, 100), "{vm2}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["vms"][1]["remote"]["interrupts"], 100);
    assert_eq!(report["client"]["other_client"], 0);
    // The server's own per-device counters on exit.
    assert!(server.interrupt(Duration::from_secs(5)).unwrap().success());
    let lines = wait_for(&rx, "dmfabric server: transport").unwrap_or_else(|l| panic!("server's last lines: {l:?}"));
    assert!(lines.iter().any(|l| l.contains("device 1 (regfile): reads 600 writes 600")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("device 102 (irqtest): reads 1 writes 100")), "{lines:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_errors_are_one_line() {
    let dir = std::env::temp_dir().join(format!("dmfabric-client-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "client = 1\n[[vm]]\nid = 1\nguest = \"nope\"\n").unwrap();
    let (code, _, err) = run(&["client", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("VM 1") && err.contains("neither a built-in guest"), "{err}");
    let (code, _, err) = run(&["client", "--config", "/nonexistent.toml"]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("Cannot read /nonexistent.toml"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A remote `bench exit` in a test: what it reports is checked, not how fast
/// it is, and the tests beside it load both cores (busy-polling servers,
/// floods of frames), so its client waits up to 2 s for an answer, not 100 ms.
const PATIENT: [&str; 4] = ["--timeout-ms", "50", "--retries", "40"];

#[test]
fn bench_exit_reports_local_and_remote() {
    if !dmfabric_testkit::privileged_or_skip("bench_exit_reports_local_and_remote", &[Need::Root, Need::Kvm]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-exit-{}", std::process::id()));
    let json = dir.join("exit.json");
    let out = Command::new(BIN)
        .args(["bench", "exit", "--mode", "local,remote", "--transport", "xdp", "--exits", "4000"])
        .args(PATIENT)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(dir.join("exit.svg"))
        .arg("--hgrm")
        .arg(dir.join("exit.hgrm"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().expect("two runs");
    assert_eq!((rows[0]["mode"].as_str(), rows[1]["mode"].as_str()), (Some("local"), Some("remote")));
    assert_eq!(rows[1]["transport"], "xdp");
    for row in rows {
        assert_eq!(row["exits"], 4000);
        for key in ["p50_us", "p99_us", "exits_per_s"] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key} in {row}");
        }
    }
    // A distribution per run, of every exit (the loop's, and the few of the
    // guest's report at its end); one plot with both curves.
    for name in ["local", "remote-xdp"] {
        let hgrm = std::fs::read_to_string(dir.join(format!("exit-{name}.hgrm"))).unwrap();
        let last = hgrm.lines().take_while(|l| !l.starts_with('#')).last().unwrap().to_string();
        let count: u64 = last.split_whitespace().nth(2).and_then(|c| c.parse().ok()).unwrap_or(0);
        assert!((4000..4016).contains(&count), "{name}: {last}");
    }
    let svg = std::fs::read_to_string(dir.join("exit.svg")).unwrap();
    assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 4, "a curve and a legend mark per run");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn text_typed_at_dmfabric_console_reaches_the_guest_through_the_remote_uart() {
    if !dmfabric_testkit::privileged_or_skip("console_typing_reaches_the_guest", &[Need::Root, Need::Kvm]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let net = TestNet::pair().unwrap();
    let keys = Keys::new("console", net.host(0).mac, &[(3, &[(1, 1)])]);
    let (mut server, rx) = start_server(&net, &keys, &["--pc-vm", "1", "--console-dir", dir.to_str().unwrap()]);
    wait_for(&rx, "dmfabric server ready").expect("server ready");
    let config = dir.join("echo.toml");
    std::fs::write(
        &config,
        format!(
            "client = 3\nkey_file = {:?}\n[link]\niface = \"dmf0\"\n[[vm]]\nid = 1\nguest = \"uart_echo\"\nargs = [0x3f8, 0x24, 0]\n\
             [[vm.device]]\nspace = \"pio\"\nbase = 0x3f8\nlen = 8\nserver = 1\ndevice = 1001\nirq = [4]\n",
            keys.key(3)
        ),
    )
    .unwrap();
    let mut cmd = net.command(0, BIN);
    cmd.args(["client", "--seconds", "60", "--config"]).arg(&config);
    let client = net.spawn(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped())).unwrap();
    // (If an assertion below fails, dropping the guard kills the client.)
    // The guest says it is ready on its UART: the server's console log has it.
    let log = dir.join("vm-1.log");
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log).unwrap_or_default() != "ready\n" {
        assert!(std::time::Instant::now() < end, "no ready line: {:?}", std::fs::read_to_string(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut console = Command::new(BIN)
        .args(["console", "1", "--linger-ms", "1000", "--console-dir"])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    console.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let typed = console.wait_with_output().unwrap();
    assert!(typed.status.success(), "{}", String::from_utf8_lossy(&typed.stderr));
    assert_eq!(String::from_utf8_lossy(&typed.stdout), "hello\n", "the guest's echo, seen at the console");
    let out = client.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("VM 1 vCPU 0: reported 0x6 0x0"), "6 bytes received, no stray interrupt: {stderr}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ready\nhello\n");
    // Attaching to a VM without a console is one clear line.
    let (code, _, err) = run(&["console", "7", "--console-dir", dir.to_str().unwrap()]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("no console for \"attach 7\"") && err.contains("VMs with a console: 1"), "{err}");
    assert!(server.interrupt(Duration::from_secs(5)).unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dmfabric_io_replays_register_scripts_and_prints_interrupts() {
    if !dmfabric_testkit::privileged_or_skip("dmfabric_io_scripts", &[Need::Root]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-io-{}", std::process::id()));
    let net = TestNet::pair().unwrap();
    let keys = Keys::new("io", net.host(0).mac, &[(250, &[(1, 1), (2, 1)])]);
    let (mut server, rx) = start_server(&net, &keys, &["--pc-vm", "1", "--console-dir", dir.to_str().unwrap()]);
    wait_for(&rx, "dmfabric server ready").expect("server ready");
    let script = "w pio 0x3ff 1 0x5a   # UART scratch\n\
                  r pio 0x3ff 1\n\
                  r pio 0x3f8 4        # no 32-bit register\n\
                  \n\
                  w pio 0x70 1 0x0d\n\
                  r pio 0x71 1         # RTC register D\n\
                  w pio 0x704 4 1000\n\
                  w pio 0x700 4 1      # event timer: one-shot, edge\n";
    let mut cmd = net.command(0, BIN);
    cmd.args(["io", "--iface", &net.host(0).iface, "--key-file", &keys.key(250), "--vm", "1", "--script", "-"]);
    cmd.args(["--linger-ms", "300"]);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("interrupt")).collect();
    assert_eq!(
        lines,
        [
            "write pio 0x3ff 1 0x5a ok",
            "read pio 0x3ff 1 = 0x5a",
            "read pio 0x3f8 4 = 0xffffffff (no such register: unclaimed)",
            "write pio 0x70 1 0xd ok",
            "read pio 0x71 1 = 0x80",
            "write pio 0x704 4 0x3e8 ok",
            "write pio 0x700 4 0x1 ok",
        ]
    );
    assert_eq!(stdout.lines().filter(|l| *l == "interrupt line 5 edge").count(), 1, "{stdout}");
    // Another VM's devices are not this VM's: Nacked, one line each.
    let mut cmd = net.command(0, BIN);
    cmd.args(["io", "--iface", &net.host(0).iface, "--key-file", &keys.key(250), "--vm", "2", "read", "pio", "0x3ff"]);
    cmd.arg("1");
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused device 0: UnknownDevice"));
    assert!(server.interrupt(Duration::from_secs(5)).unwrap().success());
    let lines = wait_for(&rx, "dmfabric server: transport").unwrap_or_else(|l| panic!("{l:?}"));
    assert!(lines.iter().any(|l| l.contains("device 1001 (uart16550): reads 2 writes 1 unclaimed 1")), "{lines:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_boots_the_guest_shows_banner_and_clock_and_leaves_nothing() {
    if !dmfabric_testkit::privileged_or_skip("demo_boots_the_guest", &[Need::Root, Need::Kvm]) {
        return;
    }
    let child = Command::new(BIN)
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("│ dmfabric demo guest:"), "{stdout}");
    // The clock came from the remote RTC, from the host's clock.
    let year = std::process::Command::new("date").arg("-u").arg("+%Y-%m-%d").output().unwrap();
    let today = String::from_utf8_lossy(&year.stdout).trim().to_string();
    assert!(stdout.contains(&format!("time from the RTC: {today} ")), "{today} in {stdout}");
    // The ticks came from the remote HPET, through the remote I/O APIC.
    assert!(stdout.contains("│ HPET tick 5 (through the remote I/O APIC)"), "{stdout}");
    assert!(!stdout.contains("event timer tick"), "{stdout}");
    assert!(stdout.contains("echo> hello from the server's console"), "{stdout}");
    assert!(stdout.contains("reset itself through the remote i8042"), "{stdout}");
    for device in ["COM1 (16550 UART)", "I/O APIC", "HPET"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(device) && l.contains(" exits (")),
            "{device}: {stdout}"
        );
    }
    assert!(stdout.contains("(MSIs from the remote I/O APIC)"), "{stdout}");
    assert!(leftover_namespaces(pid).is_empty());
    assert!(!std::env::temp_dir().join(format!("dmfabric-demo-{pid}")).exists(), "console directory removed");
}

#[test]
fn demo_with_the_kernel_irqchip_ticks_with_the_event_timer() {
    if !dmfabric_testkit::privileged_or_skip("demo_with_the_kernel_irqchip", &[Need::Root, Need::Kvm]) {
        return;
    }
    let out = Command::new(BIN).args(["demo", "--irqchip", "kernel"]).stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("│ event timer tick 5"), "{stdout}");
    assert!(stdout.contains("echo> hello from the server's console"), "{stdout}");
    assert!(stdout.contains("reset itself through the remote i8042"), "{stdout}");
    assert!(
        !stdout.contains("HPET tick") && !stdout.lines().any(|l| l.trim_start().starts_with("I/O APIC")),
        "{stdout}"
    );
}

#[test]
fn ctrl_c_during_the_demo_leaves_nothing_behind() {
    if !dmfabric_testkit::privileged_or_skip("ctrl_c_during_the_demo", &[Need::Root, Need::Kvm]) {
        return;
    }
    // --interactive: the guest waits for a line nobody types.
    let mut child = Command::new(BIN)
        .args(["demo", "--interactive"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // After the ticks the guest prompts (no newline) and waits for a line.
    wait_for(&rx, "HPET tick 5").expect("the guest ran");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "interrupted is an error exit");
    assert!(leftover_namespaces(pid).is_empty(), "{:?}", leftover_namespaces(pid));
    assert!(!std::env::temp_dir().join(format!("dmfabric-demo-{pid}")).exists());
}

#[test]
fn bench_exit_uart_scratch_compares_local_remote_and_qemu() {
    if !dmfabric_testkit::privileged_or_skip("bench_exit_uart_scratch", &[Need::Root, Need::Kvm]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-scratch-{}", std::process::id()));
    let json = dir.join("scratch.json");
    let out = Command::new(BIN)
        .args(["bench", "exit", "--device", "uart-scratch", "--mode", "local,remote,qemu", "--exits", "4000"])
        .args(PATIENT)
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().expect("three runs");
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["local", "remote", "qemu"]);
    for row in rows {
        assert_eq!(row["exits"], 4000, "{row}");
        for key in ["p50_us", "p99_us", "exits_per_s"] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key} in {row}");
        }
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("remote (xdp) / qemu p50:"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
    // QEMU has no test device.
    let (code, _, err) = run(&["bench", "exit", "--mode", "qemu"]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("--device uart-scratch"), "{err}");
}

#[test]
fn a_bad_kernel_or_too_little_memory_is_one_line() {
    if !dmfabric_testkit::privileged_or_skip("bad_kernel_one_line", &[Need::Kvm]) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-badkernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vm.toml");
    // Not a bzImage at all.
    std::fs::write(&config, "client = 1\n[[vm]]\nid = 1\nkernel = \"/bin/true\"\npc = \"local\"\n").unwrap();
    let (code, _, err) = run(&["client", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("VM 1: The kernel image is not a bzImage"), "{err}");
    // A kernel that does not fit.
    let kernel = dmfabric_vmm_shim::linux::image_dir(dmfabric_vmm_shim::linux::PINNED_VERSION).join("vmlinuz");
    if kernel.exists() {
        let text = format!("client = 1\n[[vm]]\nid = 1\nmemory_mib = 16\nkernel = {:?}\npc = \"local\"\n", kernel);
        std::fs::write(&config, text).unwrap();
        let (code, _, err) = run(&["client", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(err.lines().last().unwrap_or("").contains("needs") && err.contains("give it more memory"), "{err}");
    }
    let (code, _, err) = run(&["client", "--config", "/nonexistent"]);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctl_edits_the_store_checks_every_change_and_lists_as_table_or_json() {
    let store = std::env::temp_dir().join(format!("dmfabric-ctl-{}.redb", std::process::id()));
    let _ = std::fs::remove_file(&store);
    let s = store.to_str().unwrap();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--store", s];
        all.extend_from_slice(args);
        run(&all)
    };
    assert_eq!(ctl(&["add", "client", "--id", "1", "--mac", "02:00:00:00:00:01"]).0, 0);
    assert_eq!(ctl(&["add", "server", "--id", "10", "--mac", "02:00:00:00:00:0a"]).0, 0);
    assert_eq!(ctl(&["add", "vm", "--id", "100", "--client", "1"]).0, 0);
    let (code, out, _) =
        ctl(&["add", "device", "--id", "1", "--kind", "uart", "--server", "10", "--vm", "100", "--pio", "0x3f8:8"]);
    assert_eq!((code, out.lines().next()), (0, Some("added device 1 (uart) of VM 100 on server 10")));
    // Conflicts: one line naming them, nothing written.
    let (code, _, err) =
        ctl(&["add", "device", "--id", "2", "--kind", "timer", "--server", "10", "--vm", "100", "--pio", "0x3fc:0x14"]);
    assert_eq!(
        (code, err.trim()),
        (1, "dmfabric: device 2's pio 0x3fc+0x14 overlaps device 1's pio 0x3f8+0x8 in VM 100")
    );
    let (code, _, err) = ctl(&["rm", "server", "10"]);
    assert_eq!((code, err.trim()), (1, "dmfabric: server 10 is still used by device 1: move or remove that first"));
    let (code, _, err) = ctl(&["add", "vm", "--id", "101", "--client", "9"]);
    assert_eq!((code, err.trim()), (1, "dmfabric: VM 101 refers to client platform 9, which does not exist"));
    // Placement edits say what they changed.
    assert_eq!(ctl(&["add", "server", "--id", "11", "--mac", "02:00:00:00:00:0b", "--role", "io"]).0, 0);
    let (code, out, _) = ctl(&["device", "move", "1", "--to", "11", "--shard", "2"]);
    assert_eq!((code, out.lines().next()), (0, Some("updated device 1 (server 11, shard 2)")));
    let (_, out, _) = ctl(&["ls", "devices", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((rows[0]["server"].as_u64(), rows[0]["shard"].as_u64()), (Some(11), Some(2)));
    assert_eq!(rows.as_array().unwrap().len(), 1, "the refused device was not written");
    let (_, out, _) = ctl(&["ls", "vms"]);
    assert!(out.contains("100      1        1      4        Defined    kernel   io_loop"), "{out}");
    let _ = std::fs::remove_file(&store);
    let _ = std::fs::remove_file(format!("{s}.changed")); // its writers' poke file
}
