//! KVM test guests against the server's device models (UART, event timer,
//! i8042) over AF_XDP between two network namespaces. Needs /dev/kvm and
//! root; skipped without them (failed under DMFABRIC_REQUIRE_PRIVILEGED=1).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{self, TestNet};
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_dataplane::Transport;
use dmfabric_devices::platform::pc::PcLayout;
use dmfabric_dm_workers::console;
use dmfabric_dm_workers::env::DeviceEnv;
use dmfabric_dm_workers::server::{Server, ServerStats};
use dmfabric_dm_workers::testing;
use dmfabric_testkit::Need;
use dmfabric_vmm_shim::devmap::Target;
use dmfabric_vmm_shim::guests::{KBD_RESET, TIMER_COUNT, UART_HELLO, UART_HELLO_TEXT};
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec};
use dmfabric_vmm_shim::remote::ClientConfig;
use dmfabric_wire::Space;

const VM: u32 = 1;
// As `PcLayout::new(VM)` numbers them.
const UART: u32 = 1001;
const KBC: u32 = 1003;
const TIMER: u32 = 1004;

/// A server thread in host 1 with the PC devices of VM 1 (ids 1001..1004) and
/// their console service writing to `dir`.
struct PcServer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<ServerStats, netns::NetnsError>>,
    dir: PathBuf,
}

impl PcServer {
    fn start(net: &TestNet, name: &str) -> PcServer {
        let dir = std::env::temp_dir().join(format!("dmfabric-{name}-{}", std::process::id()));
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, service_dir) = (stop.clone(), dir.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let registry = testing::registry(vec![testing::client(3, net.host(0).mac, &[(VM, 1)])]);
        let handle = net.spawn_in(1, "server", move || {
            let mut t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("server AF_XDP");
            let devices = PcLayout::new(VM).unwrap().specs();
            let env = DeviceEnv::new();
            let consoles = env.consoles.clone();
            let mut s = Server::with_env(1, t.mac(), &devices, env, registry);
            std::thread::scope(|sc| {
                let service = console::Service::open(&consoles, &service_dir).expect("console service");
                let consoles_ref = &consoles;
                let flag_ref = &flag;
                let svc = sc.spawn(move || service.run(consoles_ref, flag_ref));
                ready_tx.send(()).unwrap();
                let cfg = PollConfig { spin: 10_000, wait: Duration::from_millis(1), ..PollConfig::default() };
                poll::run(&mut t, &mut s, cfg, &flag).unwrap();
                svc.join().unwrap();
            });
            s.stats()
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("server ready");
        PcServer { stop, handle, dir }
    }

    fn finish(self) -> (ServerStats, PathBuf) {
        self.stop.store(true, Ordering::Relaxed);
        (self.handle.join().unwrap().unwrap(), self.dir)
    }
}

/// PC device `device` of VM `VM` on server 1, with its lines (and the
/// i8042 its reset).
fn remote(device: u32) -> Target {
    let pc = PcLayout::new(VM).unwrap();
    let all = dmfabric_vmm_shim::devmap::pc_remote_ranges(1, &pc, &dmfabric_devices::platform::pc::Role::ALL);
    all.into_iter().map(|r| r.3).find(|t| matches!(t, Target::Remote(r) if r.device == device)).unwrap()
}

fn run(net: &TestNet, spec: VmSpec) -> RunReport {
    net.with_host(0, || {
        let t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("client AF_XDP");
        let cfg = ClientConfig {
            client: 3,
            hypervisor: 1,
            servers: vec![1],
            retry: Retry::default(),
            hello_timeout: Duration::from_secs(5),
            sealer: dmfabric_dataplane::hello::Sealer::new(dmfabric_testkit::keys::ring(3)),
            open_on_demand: false,
        };
        let opts = RunOptions { timeout: Duration::from_secs(60), ..RunOptions::default() };
        machine::run(vec![spec], Some((Box::new(t), cfg)), &opts, &AtomicBool::new(false)).expect("VM runs").0
    })
    .unwrap()
}

fn reports(report: &RunReport) -> &[u32] {
    let v = &report.vm(VM).unwrap().vcpus[0];
    assert!(v.result.is_ok(), "{:?}", v.result);
    &v.reports
}

#[test]
fn a_guest_line_on_the_remote_uart_lands_exactly_in_the_console_log() {
    if !dmfabric_testkit::privileged_or_skip("remote_uart_console_log", &[Need::Kvm, Need::Root]) {
        return;
    }
    // Not while the timing test runs.
    let _one_at_a_time = dmfabric_testkit::timing_test();
    let net = TestNet::pair().unwrap();
    let server = PcServer::start(&net, "uart-log");
    let spec =
        VmSpec::test_guest(VM, 1, UART_HELLO, vec![[0x3f8, 0, 0]], &[(Space::Pio, 0x3f8, 8, remote(UART))], vec![])
            .unwrap();
    let report = run(&net, spec);
    let (stats, dir) = server.finish();
    assert_eq!(reports(&report), &[UART_HELLO_TEXT.len() as u32]);
    let log = std::fs::read_to_string(console::log_path(&dir, VM)).unwrap();
    assert_eq!(log, UART_HELLO_TEXT, "exactly the string, once");
    let uart = stats.devices.iter().find(|d| d.id == UART).unwrap();
    assert_eq!(uart.unclaimed, 0, "{uart}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn event_timer_interrupts_arrive_at_the_programmed_rate() {
    if !dmfabric_testkit::privileged_or_skip("event_timer_rate", &[Need::Kvm, Need::Root]) {
        return;
    }
    let _one_at_a_time = dmfabric_testkit::timing_test();
    let net = TestNet::pair().unwrap();
    let server = PcServer::start(&net, "timer");
    const PERIOD_US: u64 = 2000;
    const N: u64 = 100;
    let spec = VmSpec::test_guest(
        VM,
        1,
        TIMER_COUNT,
        vec![[PERIOD_US, 0x700, N]],
        &[(Space::Pio, 0x700, 0x14, remote(TIMER))],
        vec![],
    )
    .unwrap();
    let start = Instant::now();
    let report = run(&net, spec);
    let wall = start.elapsed();
    let (stats, dir) = server.finish();
    let r = reports(&report);
    assert_eq!((r[0], r[1]), (N as u32, 0), "counted, none stray");
    // Measured on the device's own clock, between the first and the last
    // interrupt the guest handled: one period each (within 20 %: on a busy
    // 2-core host a delivery late by more than a period merges two).
    let per = f64::from(r[3].wrapping_sub(r[2])) / (N - 1) as f64;
    assert!((per - PERIOD_US as f64).abs() < PERIOD_US as f64 * 0.2, "{per} µs per interrupt");
    assert!(r[4] >= N as u32, "the timer counted {} expirations", r[4]);
    assert!(wall >= Duration::from_micros(PERIOD_US * (N - 1)), "{wall:?}");
    // Every interrupt the client took was injected once and acknowledged
    // once (a few more than N fire before the guest stops the timer; the one
    // in flight when the VM ends is sent and never taken).
    let injected = report.vm(VM).unwrap().remote.unwrap().interrupts;
    assert!(injected >= N, "{injected}");
    assert_eq!(injected, stats.interrupt_acks, "{stats}\n{:?}", report.client);
    assert!(stats.interrupts - stats.interrupt_acks <= 1, "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_i8042_reset_pulse_resets_the_vm() {
    if !dmfabric_testkit::privileged_or_skip("i8042_reset", &[Need::Kvm, Need::Root]) {
        return;
    }
    // Not while the timing test runs.
    let _one_at_a_time = dmfabric_testkit::timing_test();
    let net = TestNet::pair().unwrap();
    let server = PcServer::start(&net, "reset");
    let ranges = [(Space::Pio, 0x60, 1, remote(KBC)), (Space::Pio, 0x64, 1, remote(KBC))];
    let spec = VmSpec::test_guest(VM, 1, KBD_RESET, vec![[0, 0, 0]], &ranges, vec![]).unwrap();
    let report = run(&net, spec);
    let (stats, dir) = server.finish();
    let v = &report.vm(VM).unwrap().vcpus[0];
    assert_eq!(v.reports, vec![0x55], "self-test passed");
    assert!(v.result.as_ref().is_ok_and(|r| r.reset), "{:?}", v.result);
    assert_eq!((stats.vm_resets, report.client.unwrap().resets), (1, 1));
    let _ = std::fs::remove_dir_all(&dir);
}
