//! The control panel end to end, as a user drives it: `dmfabric ctl`
//! edits the store, `dmfabric server --store` and `dmfabric client --store`
//! in their own network namespaces (hosts on a bridge, AF_XDP) follow it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use dmfabric_control::etcd::EtcdStore;
use dmfabric_dataplane::netns::{self, TestNet, TestNetConfig};
use dmfabric_testkit::etcd::{self, EtcdProcess};
use dmfabric_testkit::Need;

mod common;
use common::{spawn_logged, wait_for, wait_for_all, wait_for_within, Logged, BIN};

/// A store of this test's own: a redb file (removed on drop), or etcd
/// running in one of the test's namespaces (stopped on drop).
struct StoreFile {
    spec: String,
    file: Option<std::path::PathBuf>,
    /// etcd, and the namespace `dmfabric ctl` runs in to reach it.
    etcd: Option<(std::sync::Mutex<EtcdProcess>, String)>,
}

impl StoreFile {
    fn new(name: &str) -> StoreFile {
        let p = std::env::temp_dir().join(format!("dmfabric-{name}-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&p);
        StoreFile { spec: p.to_str().unwrap().to_string(), file: Some(p), etcd: None }
    }

    /// etcd on host `host` of `net`, on the same link as the data plane
    /// (None: skipped, etcd is not installed).
    fn etcd(test: &str, net: &TestNet, host: usize) -> Option<StoreFile> {
        let ns = net.host(host).ns.clone();
        let ip = net.host(host).ipv4.to_string();
        let ready = |endpoint: &str| net.with_host(host, || EtcdStore::connect(endpoint).is_ok()).unwrap_or(false);
        let p = etcd::start_or_skip(test, || EtcdProcess::start_in(&ns, &ip, &ready))?;
        Some(StoreFile {
            spec: format!("etcd://{}", p.endpoint),
            file: None,
            etcd: Some((std::sync::Mutex::new(p), ns)),
        })
    }

    fn path(&self) -> &str {
        &self.spec
    }

    /// `dmfabric ctl --store <this> args`; panics with its output unless it succeeds.
    fn ctl(&self, args: &[&str]) -> String {
        let mut cmd = match &self.etcd {
            Some((_, ns)) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => std::process::Command::new(BIN),
        };
        let out = cmd.args(["ctl", "--store", self.path()]).args(args).stdin(Stdio::null()).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ctl {args:?}: {stdout}{stderr}");
        stdout.into_owned()
    }
}

impl Drop for StoreFile {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            let _ = std::fs::remove_file(f);
            // Its writers' poke file.
            let _ = std::fs::remove_file(format!("{}.changed", f.display()));
        }
    }
}

const ITERATIONS: u64 = 20_000;

/// Client platforms `clients` and servers `servers` (id, host, role) on
/// `net`; VM 1 (io_loop over [`ITERATIONS`]) on the first client with
/// owner server `owner` (if any), its register file (device 1) on server
/// `device_on`.
fn populate(
    store: &StoreFile,
    net: &TestNet,
    clients: &[(u16, usize)],
    servers: &[(u16, usize, &str)],
    owner: Option<u16>,
    device_on: u16,
) {
    add_hosts(store, net, clients, servers);
    let args = format!("{ITERATIONS},0x500,0xd0000000");
    let client = clients[0].0.to_string();
    let mut vm = vec!["add", "vm", "--id", "1", "--client", &client, "--image", "io_loop", "--args", &args];
    let owner = owner.map(|o| o.to_string());
    if let Some(o) = &owner {
        vm.extend(["--owner", o.as_str()]);
    }
    store.ctl(&vm);
    let on = device_on.to_string();
    store.ctl(&[
        "add",
        "device",
        "--id",
        "1",
        "--kind",
        "regfile",
        "--server",
        &on,
        "--vm",
        "1",
        "--pio",
        "0x500:0x100",
        "--mmio",
        "0xd0000000:0x1000",
    ]);
}

/// Client platforms and servers (id, host, role) at their hosts' MACs.
fn add_hosts(store: &StoreFile, net: &TestNet, clients: &[(u16, usize)], servers: &[(u16, usize, &str)]) {
    for &(id, host) in clients {
        store.ctl(&["add", "client", "--id", &id.to_string(), "--mac", &net.host(host).mac.to_string()]);
    }
    for &(id, host, role) in servers {
        let (id, mac) = (id.to_string(), net.host(host).mac.to_string());
        store.ctl(&["add", "server", "--id", &id, "--mac", &mac, "--role", role]);
    }
}

/// `dmfabric server --store` for server `id` on `host`, once it is ready.
fn server(net: &TestNet, store: &StoreFile, host: usize, id: u16) -> Logged {
    let iface = net.host(host).iface.clone();
    let id = id.to_string();
    // Two servers and a client on two cores: servers sleep on their socket when idle.
    let args =
        ["server", "--iface", &iface, "--store", store.path(), "--server-id", &id, "--layout", "rtc", "--spin", "0"];
    let (child, rx) = spawn_logged(net, host, &args);
    wait_for(&rx, "dmfabric server ready").unwrap_or_else(|l| panic!("server {id} did not start: {l:?}"));
    (child, rx)
}

/// `dmfabric client --store` for client platform `id` on `host`.
fn client(net: &TestNet, store: &StoreFile, host: usize, id: u16) -> Logged {
    let iface = net.host(host).iface.clone();
    let id = id.to_string();
    spawn_logged(
        net,
        host,
        &["client", "--iface", &iface, "--store", store.path(), "--client-id", &id, "--seconds", "120"],
    )
}

/// Stop a server with Ctrl-C and return its reads and writes of device 1
/// (while it was there, if it has left).
fn device_counts(mut s: netns::ChildGuard, rx: &std::sync::mpsc::Receiver<String>) -> (u64, u64, Vec<String>) {
    assert!(s.interrupt(Duration::from_secs(5)).unwrap().success());
    let lines = wait_for(rx, "dmfabric server: transport").unwrap_or_else(|l| panic!("server's last lines: {l:?}"));
    let mut counts = (0, 0);
    for l in &lines {
        if let Some(rest) = l.split("device 1 (regfile").nth(1).and_then(|r| r.split("reads ").nth(1)) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            counts = (words[0].parse().unwrap(), words[2].parse().unwrap());
        }
    }
    (counts.0, counts.1, lines)
}

fn checksum_line() -> String {
    let sum = dmfabric_vmm_shim::guests::io_loop_checksum(ITERATIONS);
    format!("VM 1 vCPU 0: reported {:#x} {:#x}", sum as u32, (sum >> 32) as u32)
}

#[test]
fn a_guest_reaches_a_device_on_the_io_server_through_the_owner() {
    if !dmfabric_testkit::privileged_or_skip(
        "a_guest_reaches_a_device_on_the_io_server_through_the_owner",
        &[Need::Root, Need::Kvm],
    ) {
        return;
    }
    let net = TestNet::new(TestNetConfig { hosts: 3, ..TestNetConfig::default() }).unwrap();
    three_hosts(&net, &StoreFile::new("three-hosts"), &|| {});
}

#[test]
fn the_same_through_etcd_running_on_the_owners_host() {
    let name = "the_same_through_etcd_running_on_the_owners_host";
    if !dmfabric_testkit::privileged_or_skip(name, &[Need::Root, Need::Kvm]) {
        return;
    }
    // etcd's TCP shares the link with the AF_XDP data plane: dmfabric's
    // XDP program passes every frame that is not the fabric's.
    let net = TestNet::new(TestNetConfig { hosts: 3, ..TestNetConfig::default() }).unwrap();
    if let Some(store) = StoreFile::etcd(name, &net, 1) {
        // etcd goes away while the guest runs: the data planes keep their tables.
        three_hosts(&net, &store, &|| {
            std::thread::sleep(Duration::from_millis(500));
            store.etcd.as_ref().unwrap().0.lock().unwrap().stop();
        });
    }
}

/// Host 0: client platform 1; host 1: owner server 2; host 2: I/O server 3.
/// `meanwhile` runs while the guest does.
fn three_hosts(net: &TestNet, store: &StoreFile, meanwhile: &dyn Fn()) {
    populate(store, net, &[(1, 0)], &[(2, 1, "owner"), (3, 2, "io")], Some(2), 3);
    let said = store.ctl(&["vm", "launch", "1"]);
    assert!(said.starts_with("updated VM 1 (client platform 1, Running)"), "{said}");
    let (owner, owner_rx) = server(net, store, 1, 2);
    let (io, io_rx) = server(net, store, 2, 3);
    let start = Instant::now();
    let (c, c_rx) = client(net, store, 0, 1);
    meanwhile();
    let out = c.wait_with_output().unwrap();
    let lines: Vec<String> = common::rest(&c_rx);
    assert!(out.status.success(), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains(&checksum_line())), "{lines:#?}");
    // Every frame the client sent (its retransmissions too) went to the owner.
    let link = lines.iter().find(|l| l.contains("dmfabric client: link: requests")).expect("link counters");
    let count = |what: &str| -> u64 {
        link.split(what).nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap()
    };
    let sent = count("requests ") + count("retransmits ");
    let took = start.elapsed();
    eprintln!(
        "through the owner ({}): {} accesses in {took:.2?} with the client's start, {:.1} µs each",
        store.path(),
        4 * ITERATIONS,
        took.as_secs_f64() * 1e6 / (4 * ITERATIONS) as f64
    );
    // Every access went to the owner, which ran none and sent each on; the
    // I/O server ran each once and answered the client itself.
    let accesses = 2 * ITERATIONS;
    let (reads, writes, lines) = device_counts(io, &io_rx);
    assert_eq!((reads, writes), (accesses, accesses), "{lines:#?}");
    let (_, _, owner_lines) = device_counts(owner, &owner_rx);
    let stats = owner_lines
        .iter()
        .find(|l| l.contains("dmfabric server: requests"))
        .unwrap_or_else(|| panic!("{owner_lines:#?}"));
    // The owner ran none and sent on every frame it got: each request,
    // and each retransmission (the I/O server answers those from its cache).
    assert!(sent >= 2 * accesses, "{link}");
    assert!(
        stats.contains(&format!("requests {sent} ")) && stats.contains(&format!("forwarded {sent} ")),
        "{stats}\n{link}"
    );
    assert!(stats.contains("completions 0 "), "{stats}");
    if store.etcd.is_some() {
        // Both servers said the store was gone, once, and kept routing.
        for l in [&lines, &owner_lines] {
            let said = l.iter().filter(|l| l.contains("until it answers")).count();
            assert_eq!(said, 1, "{l:#?}");
        }
    }
}

#[test]
fn a_running_guest_migrates_and_its_device_moves_without_losing_a_request() {
    let name = "a_running_guest_migrates_and_its_device_moves_without_losing_a_request";
    if !dmfabric_testkit::privileged_or_skip(name, &[Need::Root, Need::Kvm]) {
        return;
    }
    let net = TestNet::new(TestNetConfig { hosts: 4, ..TestNetConfig::default() }).unwrap();
    let store = StoreFile::new("migrate");
    // Client platforms 1 (host 0) and 2 (host 1); owner server 10 (host 2), I/O server 11 (host 3).
    populate(&store, &net, &[(1, 0), (2, 1)], &[(10, 2, "owner"), (11, 3, "io")], Some(10), 11);
    store.ctl(&["vm", "launch", "1"]);
    // Client platform 2 runs already, with a VM of its own (held: never launched).
    store.ctl(&["add", "vm", "--id", "2", "--client", "2", "--image", "io_loop", "--args", "1,0x500,0xd0000000"]);
    let (s10, rx10) = server(&net, &store, 2, 10);
    let (s11, rx11) = server(&net, &store, 3, 11);
    let (c1, c1_rx) = client(&net, &store, 0, 1);
    let (c2, c2_rx) = client(&net, &store, 1, 2);
    wait_for(&c1_rx, "running 1 VM").unwrap_or_else(|l| panic!("client 1: {l:?}"));
    std::thread::sleep(Duration::from_millis(400));
    // Mid-run: the register file moves from server 11 to server 10 ...
    let said = store.ctl(&["device", "move", "1", "--to", "10"]);
    assert!(said.starts_with("updated device 1 (server 10, shard 0)"), "{said}");
    wait_for_all(&rx10, &["device arrived with its state", "device=1", "from=11"])
        .unwrap_or_else(|l| panic!("server 10: {l:?}"));
    std::thread::sleep(Duration::from_millis(200));
    // ... and the VM to client platform 2.
    let start = Instant::now();
    let wall = std::time::SystemTime::now();
    let said = store.ctl(&["vm", "migrate", "1", "--to", "2"]);
    let revision = said.split("(revision ").nth(1).and_then(|r| r.split(')').next()).unwrap_or("?").to_string();
    // The state taken on the new platform (waited for first: the old one's
    // exit, removing its XDP program, may take longer).
    let seen2 = wait_for_within(&c2_rx, "VM 1: state arrived", Duration::from_secs(10))
        .unwrap_or_else(|l| panic!("client 2: {l:?}"));
    let taken = start.elapsed();
    let out1 = c1.wait_with_output().unwrap();
    let lines1: Vec<String> = common::rest(&c1_rx);
    assert!(out1.status.success(), "{lines1:#?}");
    let moved = lines1.iter().find(|l| l.contains("VM 1: migrated to client platform 2"));
    eprintln!("migration: {}", moved.unwrap_or_else(|| panic!("{lines1:#?}")));
    assert!(!lines1.iter().any(|l| l.contains("reported")), "it had not finished: {lines1:#?}");
    eprintln!(
        "migration: the state taken on client platform 2 {taken:?} after the command; client platform 1 ended {:?} after it",
        start.elapsed()
    );
    // Where the time went, from the clients' log timestamps (ms after the command started).
    let at = |lines: &[String], parts: &[&str]| {
        let l = lines.iter().find(|l| parts.iter().all(|p| l.contains(p)))?;
        Some(format!("{:.0}", (log_time(l)? - since_midnight(wall)) * 1000.0))
    };
    let show = |o: Option<String>| o.unwrap_or_else(|| "?".into());
    let swapped = format!("revision={revision} ");
    eprintln!(
        "migration: ms after the command: client 1 sees it {}, client 2 {}; vCPUs held {}; state in the store {}; taken {}",
        show(at(&lines1, &["routing tables swapped in", &swapped])),
        show(at(&seen2, &["routing tables swapped in", &swapped])),
        show(at(&lines1, &["holding its vCPUs"])),
        show(at(&lines1, &["ending: migrated"])),
        show(at(&seen2, &["VM 1: state arrived"])),
    );
    store.ctl(&["vm", "shutdown", "2"]);
    let out2 = c2.wait_with_output().unwrap();
    let lines2: Vec<String> = common::rest(&c2_rx);
    assert!(out2.status.success(), "{lines2:#?}");
    assert!(lines2.iter().any(|l| l.contains(&checksum_line())), "{lines2:#?}");
    assert!(lines2.iter().any(|l| l.contains("VM 2: shut down by the control panel")), "{lines2:#?}");
    // Every access ran exactly once, on one server or the other.
    let (r11, w11, l11) = device_counts(s11, &rx11);
    let (r10, w10, l10) = device_counts(s10, &rx10);
    assert!(r11 > 0 && r10 > 0, "both servers served: {r11} / {r10}");
    assert_eq!((r10 + r11, w10 + w11), (2 * ITERATIONS, 2 * ITERATIONS), "{l10:#?}\n{l11:#?}");
    let show = store.ctl(&["show", "vm", "1", "--json"]);
    let vm: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!((vm["client"].as_u64(), vm["state"].as_str()), (Some(2), Some("running")));
}

/// Seconds since midnight (UTC) of a log line's timestamp
/// ("2026-12-01T03:15:18.204793Z ...").
fn log_time(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = t.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

fn since_midnight(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
}

/// The live request count of VM 1 as the client prints it on SIGUSR1.
fn live_requests(c: &mut netns::ChildGuard, rx: &std::sync::mpsc::Receiver<String>) -> u64 {
    // SAFETY: kill(2) on the pid of a child not reaped yet.
    unsafe { libc::kill(c.child().id() as i32, libc::SIGUSR1) };
    let lines = wait_for_all(rx, &["live counters", "vm=1"]).unwrap_or_else(|l| panic!("no live counters: {l:?}"));
    let line = lines.last().unwrap();
    let n = line.split("requests: ").nth(1).and_then(|r| r.split(',').next()).and_then(|n| n.parse().ok());
    n.unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn launch_suspend_resume_and_shutdown_from_ctl_reach_the_running_client() {
    let name = "launch_suspend_resume_and_shutdown_from_ctl_reach_the_running_client";
    if !dmfabric_testkit::privileged_or_skip(name, &[Need::Root, Need::Kvm]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let store = StoreFile::new("lifecycle");
    // VMs 1 to 3 (io_loop) on client platform 1 (host 0), device 1 of VM 1 on server 2 (host 1),
    // no owner; VM 2 gets its device while the client runs.
    populate(&store, &net, &[(1, 0)], &[(2, 1, "io")], None, 2);
    for vm in ["2", "3"] {
        store.ctl(&["add", "vm", "--id", vm, "--client", "1", "--image", "io_loop", "--args", "10,0x500,0xd0000000"]);
    }
    let (s, s_rx) = server(&net, &store, 1, 2);
    let (mut c, c_rx) = client(&net, &store, 0, 1);
    wait_for(&c_rx, "running 3 VM(s)").unwrap_or_else(|l| panic!("client: {l:?}"));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(live_requests(&mut c, &c_rx), 0, "defined, not launched: held");
    let said = store.ctl(&["vm", "launch", "1"]);
    assert!(said.starts_with("updated VM 1 (client platform 1, Running)"), "{said}");
    wait_for_all(&c_rx, &["running", "vm=1"]).unwrap_or_else(|l| panic!("client: {l:?}"));
    std::thread::sleep(Duration::from_millis(300));
    store.ctl(&["vm", "suspend", "1"]);
    wait_for_all(&c_rx, &["suspended", "vm=1"]).unwrap_or_else(|l| panic!("client: {l:?}"));
    let before = live_requests(&mut c, &c_rx);
    std::thread::sleep(Duration::from_millis(400));
    let after = live_requests(&mut c, &c_rx);
    assert!(before > 0 && before == after, "suspended: no progress ({before} → {after})");
    // Refused steps name the state; nothing changes.
    let out =
        std::process::Command::new(BIN).args(["ctl", "--store", store.path(), "vm", "launch", "1"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "dmfabric: VM 1 is Suspended: cannot launch it");
    store.ctl(&["vm", "resume", "1"]);
    // A device added to a VM reaches the running client's map; then the VM is launched.
    store.ctl(&[
        "add",
        "device",
        "--id",
        "2",
        "--kind",
        "regfile",
        "--server",
        "2",
        "--vm",
        "2",
        "--pio",
        "0x500:0x100",
        "--mmio",
        "0xd0000000:0x1000",
    ]);
    wait_for(&c_rx, "VM 2: device map of revision").unwrap_or_else(|l| panic!("client: {l:?}"));
    store.ctl(&["vm", "launch", "2"]);
    store.ctl(&["vm", "shutdown", "3"]);
    // A VM added while the client runs starts when it is launched.
    store.ctl(&["add", "vm", "--id", "4", "--client", "1", "--image", "io_loop", "--args", "10,0x500,0xd0000000"]);
    store.ctl(&[
        "add",
        "device",
        "--id",
        "4",
        "--kind",
        "regfile",
        "--server",
        "2",
        "--vm",
        "4",
        "--pio",
        "0x500:0x100",
        "--mmio",
        "0xd0000000:0x1000",
    ]);
    store.ctl(&["vm", "launch", "4"]);
    let out = c.wait_with_output().unwrap();
    let lines: Vec<String> = common::rest(&c_rx);
    assert!(out.status.success(), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains(&checksum_line())), "{lines:#?}");
    let sum = dmfabric_vmm_shim::guests::io_loop_checksum(10);
    for vm in [2, 4] {
        let want = format!("VM {vm} vCPU 0: reported {:#x} {:#x}", sum as u32, (sum >> 32) as u32);
        assert!(lines.iter().any(|l| l.contains(&want)), "{want}: {lines:#?}");
    }
    assert!(lines.iter().any(|l| l.contains("VM joins this client platform") && l.contains("vm=4")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("VM 3: shut down by the control panel")), "{lines:#?}");
    let (reads, writes, lines) = device_counts(s, &s_rx);
    assert_eq!((reads, writes), (2 * ITERATIONS, 2 * ITERATIONS), "{lines:#?}");
}

#[test]
fn a_guest_waiting_for_interrupts_migrates_and_gets_every_one_once() {
    let name = "a_guest_waiting_for_interrupts_migrates_and_gets_every_one_once";
    if !dmfabric_testkit::privileged_or_skip(name, &[Need::Root, Need::Kvm]) {
        return;
    }
    let net = TestNet::new(TestNetConfig { hosts: 3, ..TestNetConfig::default() }).unwrap();
    let store = StoreFile::new("irq-migrate");
    // Client platforms 1 (host 0) and 2 (host 1), server 10 (host 2) with VM 1's interrupt test device.
    add_hosts(&store, &net, &[(1, 0), (2, 1)], &[(10, 2, "io")]);
    let interrupts = 20_000u32;
    let args = format!("{interrupts},0x600,0");
    store.ctl(&["add", "vm", "--id", "1", "--client", "1", "--image", "irq_wait", "--args", &args]);
    store.ctl(&["add", "vm", "--id", "2", "--client", "2", "--image", "io_loop", "--args", "1,0x500,0xd0000000"]);
    store.ctl(&["add", "device", "--id", "1", "--kind", "irqtest", "--server", "10", "--vm", "1", "--pio", "0x600:8"]);
    store.ctl(&["vm", "launch", "1"]);
    let (s10, rx10) = server(&net, &store, 2, 10);
    let (c1, c1_rx) = client(&net, &store, 0, 1);
    let (c2, c2_rx) = client(&net, &store, 1, 2);
    wait_for(&c1_rx, "running 1 VM").unwrap_or_else(|l| panic!("client 1: {l:?}"));
    std::thread::sleep(Duration::from_millis(500));
    store.ctl(&["vm", "migrate", "1", "--to", "2"]);
    let out1 = c1.wait_with_output().unwrap();
    let lines1: Vec<String> = common::rest(&c1_rx);
    assert!(out1.status.success(), "{lines1:#?}");
    assert!(lines1.iter().any(|l| l.contains("VM 1: migrated to client platform 2")), "{lines1:#?}");
    let l2 = wait_for_within(&c2_rx, "VM 1: state arrived", Duration::from_secs(10))
        .unwrap_or_else(|l| panic!("client 2: {l:?}"));
    if std::env::var("DEBUG_MIGRATE").is_ok() {
        eprintln!("C1 {lines1:#?}\nC2 {l2:#?}");
    }
    store.ctl(&["vm", "shutdown", "2"]);
    let out2 = c2.wait_with_output().unwrap();
    let lines2: Vec<String> = common::rest(&c2_rx);
    assert!(out2.status.success(), "{lines2:#?}");
    // Every interrupt counted once by the guest, none on another vector,
    // and the device raised exactly that many.
    let want = format!("VM 1 vCPU 0: reported {interrupts:#x} 0x0 {interrupts:#x}");
    assert!(lines2.iter().any(|l| l.contains(&want)), "{want}: {lines2:#?}\n{lines1:#?}");
    let (_, _, lines) = device_counts(s10, &rx10);
    let stats = lines.iter().find(|l| l.contains("dmfabric server: requests")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(stats.contains("given up 0"), "{stats}");
    eprintln!("interrupts across the migration: {stats}");
}

/// etcd goes away under a running server and client and comes back on the
/// same data: the guest keeps running on the last tables meanwhile, and a
/// VM and device added once etcd is back reach both without a restart.
/// The server polls only once an hour (`--watch-ms 3600000`): what it
/// sees, etcd's watch pushed.
#[test]
fn servers_and_clients_follow_etcd_through_an_outage() {
    let name = "servers_and_clients_follow_etcd_through_an_outage";
    if !dmfabric_testkit::privileged_or_skip(name, &[Need::Root, Need::Kvm]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let Some(store) = StoreFile::etcd(name, &net, 1) else { return };
    // Client platform 1 (host 0), I/O server 2 (host 1, beside etcd); VM 1 runs until shut down.
    add_hosts(&store, &net, &[(1, 0)], &[(2, 1, "io")]);
    let add_vm = |id: &str, iterations: &str| {
        let args = format!("{iterations},0x500,0xd0000000");
        store.ctl(&["add", "vm", "--id", id, "--client", "1", "--image", "io_loop", "--args", &args]);
        store.ctl(&[
            "add",
            "device",
            "--id",
            id,
            "--kind",
            "regfile",
            "--server",
            "2",
            "--vm",
            id,
            "--pio",
            "0x500:0x100",
            "--mmio",
            "0xd0000000:0x1000",
        ]);
        store.ctl(&["vm", "launch", id]);
    };
    add_vm("1", "100000000");
    let iface = net.host(1).iface.clone();
    let args = [
        "server",
        "--iface",
        &iface,
        "--store",
        store.path(),
        "--server-id",
        "2",
        "--layout",
        "rtc",
        "--spin",
        "0",
        "--watch-ms",
        "3600000",
    ];
    let (_s, s_rx) = spawn_logged(&net, 1, &args);
    wait_for(&s_rx, "dmfabric server ready").unwrap_or_else(|l| panic!("server: {l:?}"));
    let (mut c, c_rx) = client(&net, &store, 0, 1);
    wait_for(&c_rx, "running 1 VM").unwrap_or_else(|l| panic!("client: {l:?}"));
    std::thread::sleep(Duration::from_millis(300));
    let before = live_requests(&mut c, &c_rx);
    store.etcd.as_ref().unwrap().0.lock().unwrap().stop();
    wait_for(&s_rx, "polling every").unwrap_or_else(|l| panic!("the server did not notice etcd went away: {l:?}"));
    let during = live_requests(&mut c, &c_rx);
    std::thread::sleep(Duration::from_millis(300));
    let later = live_requests(&mut c, &c_rx);
    assert!(before < during && during < later, "the guest runs on while etcd is away: {before} → {during} → {later}");
    // Back on the same data directory; then a new VM and its device.
    let endpoint_ready = |endpoint: &str| net.with_host(1, || EtcdStore::connect(endpoint).is_ok()).unwrap_or(false);
    store.etcd.as_ref().unwrap().0.lock().unwrap().restart(&endpoint_ready).unwrap();
    add_vm("2", "10");
    wait_for_all(&s_rx, &["device added", "device=2"]).unwrap_or_else(|l| panic!("server: {l:?}"));
    wait_for_all(&c_rx, &["VM joins this client platform", "vm=2"]).unwrap_or_else(|l| panic!("client: {l:?}"));
    store.ctl(&["vm", "shutdown", "1"]);
    // (VM 1 is shut down in the middle of an access: the client says so
    // and exits with an error; that is not what this test is about.)
    c.wait_with_output().unwrap();
    let lines: Vec<String> = common::rest(&c_rx);
    assert!(lines.iter().any(|l| l.contains("shut down by the control panel vm=1")), "{lines:#?}");
    // VM 2 ran to its end against the device the server added.
    let sum = dmfabric_vmm_shim::guests::io_loop_checksum(10);
    let want = format!("VM 2 vCPU 0: reported {:#x} {:#x}", sum as u32, (sum >> 32) as u32);
    assert!(lines.iter().any(|l| l.contains(&want)), "{want}: {lines:#?}");
    let s_lines: Vec<String> = s_rx.try_iter().collect();
    assert!(!s_lines.iter().any(|l| l.contains("dmfabric server ready")), "one server all along: {s_lines:#?}");
}
