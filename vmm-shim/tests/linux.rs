//! Debian's cloud kernel boots with its console, RTC and i8042 served by a
//! dmfabric server in another network namespace over AF_XDP, and the same
//! kernel boots with those models in the client process; the two consoles
//! match apart from timestamps and measured values.
//!
//! On this host (a nested PVM hypervisor that emulates guest kernel mode)
//! the kernel gets through decompression, e820, the early serial console
//! and the 8250 console driver and then stops at its int3 self-test with
//! KVM_EXIT_INTERNAL_ERROR, a few minutes in: the test checks the console up
//! to there and that the stop is reported clearly. On a host that can run
//! it the kernel reaches the init script instead: then the test checks its
//! banner, the date against the host clock and the reboot through the i8042.
//!
//! Needs root, /dev/kvm and the guest images (scripts/guest-images.sh, run
//! by the set-up); skipped without them unless DMFABRIC_REQUIRE_PRIVILEGED=1.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmfabric_dataplane::netns::TestNet;
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_dataplane::Transport;
use dmfabric_devices::platform::pc::{PcLayout, Role};
use dmfabric_devices::ByteSink;
use dmfabric_dm_workers::console;
use dmfabric_dm_workers::env::DeviceEnv;
use dmfabric_dm_workers::server::Server;
use dmfabric_dm_workers::testing;
use dmfabric_testkit::Need;
use dmfabric_vmm_shim::linux::{self, LinuxImage};
use dmfabric_vmm_shim::local;
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec};
use dmfabric_vmm_shim::remote::ClientConfig;

const VM: u32 = 1;
/// Long enough for decompression and early boot under this host's emulation.
const BOOT_LIMIT: Duration = Duration::from_secs(900);
const MEM: usize = 512 << 20;

fn image() -> Option<LinuxImage> {
    let dir = linux::image_dir(linux::PINNED_VERSION);
    let kernel = std::fs::read(dir.join("vmlinuz")).ok()?;
    let initrd = std::fs::read(dir.join("initramfs.cpio.gz")).ok()?;
    Some(LinuxImage { kernel, initrd: Some(initrd), cmdline: linux::DEFAULT_CMDLINE.to_string() })
}

/// Collects a local UART's output.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<u8>>>);

impl ByteSink for Collect {
    fn put(&mut self, b: u8) {
        self.0.lock().unwrap().push(b);
    }
}

/// The console without timestamps and with the lines that hold measured,
/// run-dependent values left out: clock calibration, the sched offset, and
/// the free-memory count (KASLR places the kernel differently each boot,
/// which moves it by a page or so).
fn comparable(console: &str) -> Vec<String> {
    const MEASURED: [&str; 9] =
        ["tsc:", "sched offset", "Calibrating", "BogoMIPS", "lpj=", "clocksource:", "hpet", "Memory KASLR", "Memory: "];
    console
        .replace('\r', "")
        .lines()
        .map(|l| match (l.starts_with('['), l.find("] ")) {
            (true, Some(end)) => l[end + 2..].to_string(),
            _ => l.to_string(),
        })
        .filter(|l| !MEASURED.iter().any(|m| l.contains(m)))
        .collect()
}

fn boot_remote(net: &TestNet, image: LinuxImage, dir: PathBuf) -> (RunReport, String) {
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, service_dir) = (stop.clone(), dir.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let registry = testing::registry(vec![testing::client(3, net.host(0).mac, &[(VM, 1)])]);
    let server = net.spawn_in(1, "server", move || {
        let mut t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("server AF_XDP");
        let devices = PcLayout::new(VM).unwrap().specs();
        let env = DeviceEnv::new();
        let consoles = env.consoles.clone();
        let mut s = Server::with_env(1, t.mac(), &devices, env, registry);
        std::thread::scope(|sc| {
            let service = console::Service::open(&consoles, &service_dir).expect("console service");
            let (c, f) = (&consoles, &flag);
            let svc = sc.spawn(move || service.run(c, f));
            ready_tx.send(()).unwrap();
            // Not busy-polling: the guest needs the other core for minutes.
            let cfg = PollConfig { spin: 2000, wait: Duration::from_millis(1), ..PollConfig::default() };
            poll::run(&mut t, &mut s, cfg, &flag).unwrap();
            svc.join().unwrap();
        });
        s.stats()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("server ready");
    let pc = PcLayout::new(VM).unwrap();
    let ranges = dmfabric_vmm_shim::devmap::pc_remote_ranges(1, &pc, &[Role::Com1, Role::Rtc, Role::I8042]);
    let spec = VmSpec::linux(VM, 1, MEM, image, &ranges, vec![]).unwrap();
    let report = net
        .with_host(0, || {
            let t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("client AF_XDP");
            let cfg = ClientConfig {
                client: 3,
                hypervisor: 1,
                servers: vec![1],
                retry: Retry { timeout: Duration::from_millis(50), retries: 20 },
                hello_timeout: Duration::from_secs(5),
                sealer: dmfabric_dataplane::hello::Sealer::new(dmfabric_testkit::keys::ring(3)),
                open_on_demand: false,
            };
            let opts = RunOptions { timeout: BOOT_LIMIT, ..RunOptions::default() };
            machine::run(vec![spec], Some((Box::new(t), cfg)), &opts, &AtomicBool::new(false)).expect("VM runs").0
        })
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let stats = server.join().unwrap().unwrap();
    assert_eq!(stats.nack_unknown_device + stats.nack_other_vm, 0, "{stats}");
    let log = std::fs::read_to_string(console::log_path(&dir, VM)).unwrap();
    (report, log)
}

fn boot_local(image: LinuxImage) -> (RunReport, String) {
    let out = Collect::default();
    let wiring = local::LocalWiring::new(Default::default(), Default::default(), Box::new(out.clone()));
    let (devices, ranges) = local::pc_devices(&[Role::Com1, Role::Rtc, Role::I8042], 0, &wiring);
    let mut spec = VmSpec::linux(VM, 1, MEM, image, &ranges, devices).unwrap();
    spec.irq_target = wiring.target.clone();
    spec.reset = wiring.reset.clone();
    let opts = RunOptions { timeout: BOOT_LIMIT, ..RunOptions::default() };
    let report = machine::run(vec![spec], None, &opts, &AtomicBool::new(false)).expect("VM runs").0;
    let log = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    (report, log)
}

#[test]
fn linux_boots_with_remote_devices_as_with_local_ones() {
    if !dmfabric_testkit::privileged_or_skip("linux_boots_with_remote_devices", &[Need::Root, Need::Kvm]) {
        return;
    }
    let Some(img) = image() else {
        assert!(
            std::env::var_os("DMFABRIC_REQUIRE_PRIVILEGED").is_none(),
            "no guest images in {}: run scripts/guest-images.sh",
            linux::image_dir(linux::PINNED_VERSION).display()
        );
        eprintln!("linux_boots_with_remote_devices: skipped, no guest images (scripts/guest-images.sh)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("dmfabric-linux-{}", std::process::id()));
    let net = TestNet::pair().unwrap();
    let (remote, remote_log) = boot_remote(&net, img.clone(), dir.clone());
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);

    // The server's console log has the kernel's early boot.
    for want in [
        "Linux version",
        &format!("Command line: {}", linux::DEFAULT_CMDLINE),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x0000000000100000-",
        "printk: console [ttyS0] enabled",
    ] {
        assert!(remote_log.contains(want), "{want:?} not in the server's console log:\n{remote_log}");
    }
    let vcpu = &remote.vm(VM).unwrap().vcpus[0];
    let reached_init = remote_log.contains("dmfabric Linux guest:");
    if reached_init {
        // A host that runs the whole boot: init's banner, the clock, a reboot.
        assert!(vcpu.result.as_ref().is_ok_and(|r| r.reset), "{:?}", vcpu.result);
        let date_line = remote_log.lines().find(|l| l.starts_with("date: ")).expect("a date line");
        let stamp = date_line.trim_start_matches("date: ").trim_end_matches(" UTC");
        let host = std::process::Command::new("date").args(["-u", "+%s"]).output().unwrap();
        let host: i64 = String::from_utf8_lossy(&host.stdout).trim().parse().unwrap();
        let guest = std::process::Command::new("date").args(["-u", "-d", stamp, "+%s"]).output().unwrap();
        let guest: i64 = String::from_utf8_lossy(&guest.stdout).trim().parse().unwrap();
        assert!((host - guest).abs() <= 2 + 5, "guest clock {stamp} vs host");
    } else {
        // This host: the stop at the int3 self-test, reported clearly.
        let err = vcpu.result.as_ref().expect_err("the VM stops");
        assert!(err.contains("KVM_EXIT_INTERNAL_ERROR") && err.contains("at rip 0x"), "{err}");
        assert!(err.contains("instruction bytes cc"), "the int3: {err}");
        assert!(err.contains("the console's last lines"), "{err}");
    }

    // The same boot with the models in the client process.
    let (local, local_log) = boot_local(img);
    let local_vcpu = &local.vm(VM).unwrap().vcpus[0];
    assert_eq!(local_vcpu.result.is_ok(), vcpu.result.is_ok(), "{:?} vs {:?}", local_vcpu.result, vcpu.result);
    let (a, b) = (comparable(&remote_log), comparable(&local_log));
    let n = a.len().min(b.len());
    assert!(n > 50, "both consoles have the early boot: {} and {} lines", a.len(), b.len());
    if let Some(i) = (0..n).find(|&i| a[i] != b[i]) {
        panic!("remote and local consoles differ at line {i}:\n remote: {}\n local:  {}", a[i], b[i]);
    }
}
