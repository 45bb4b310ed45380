//! Real KVM guests in 64-bit long mode whose port I/O and MMIO go to local
//! device models or, over AF_XDP between two network namespaces, to a
//! dmfabric server; interrupts raised by the server's device models reach
//! the right guest. Needs /dev/kvm and root; skipped without them (failed
//! under DMFABRIC_REQUIRE_PRIVILEGED=1).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_dataplane::fault::{FaultConfig, FaultInjector};
use dmfabric_dataplane::hello::Sealer;
use dmfabric_dataplane::netns::{self, TestNet};
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_dataplane::Transport;
use dmfabric_devices::platform::pc;
use dmfabric_devices::regfile::RegisterFile;
use dmfabric_devices::{Device, DeviceState, Persist};
use dmfabric_dm_workers::server::{Server, ServerStats};
use dmfabric_dm_workers::testing;
use dmfabric_testkit::Need;
use dmfabric_vmm_shim::debugport::u64_at;
use dmfabric_vmm_shim::devmap::{Remote, Target};
use dmfabric_vmm_shim::exits::ExitStats;
use dmfabric_vmm_shim::guests::{self, IO_LOOP, IRQ_WAIT};
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec};
use dmfabric_vmm_shim::remote::ClientConfig;
use dmfabric_wire::Space;

const PORT: u64 = 0x500;
const MMIO: u64 = 0xd000_0000;
const CLIENT: u16 = 3;

fn regfile() -> Box<dyn Device> {
    Box::new(RegisterFile::new(Some((PORT as u16, 0x100)), Some((MMIO, 0x1000))))
}

/// io_loop on `vcpus` vCPUs, vCPU n using ports PORT + 0x10 n and MMIO + 0x10 n
/// of the test device, local or remote (server 1, device 1).
fn io_loop_vm(id: u32, vcpus: u16, iterations: u64, port: u64, remote: bool) -> VmSpec {
    let target = if remote { Target::remote(1, 1) } else { Target::Local(0) };
    let args = (0..u64::from(vcpus)).map(|n| [iterations, port + 0x10 * n, MMIO + 0x10 * n]).collect();
    let ranges = [(Space::Pio, PORT, 0x100, target), (Space::Mmio, MMIO, 0x1000, target)];
    let local = if remote { Vec::new() } else { vec![regfile()] };
    VmSpec::test_guest(id, vcpus, IO_LOOP, args, &ranges, local).unwrap()
}

fn checksum(report: &RunReport, vm: u32, vcpu: usize) -> u64 {
    let v = &report.vm(vm).expect("vm ran").vcpus[vcpu];
    assert_eq!(v.result.as_ref().map(|r| r.exit_code), Ok(0), "vCPU {vcpu} of VM {vm} exits cleanly");
    u64_at(&v.reports, 0).expect("checksum reported")
}

fn run_local(specs: Vec<VmSpec>) -> RunReport {
    let stop = AtomicBool::new(false);
    machine::run(specs, None, &RunOptions::default(), &stop).expect("VMs run").0
}

#[test]
fn guest_port_and_mmio_io_reach_local_devices() {
    if !dmfabric_testkit::privileged_or_skip("guest_port_and_mmio_io_reach_local_devices", &[Need::Kvm]) {
        return;
    }
    let report = run_local(vec![io_loop_vm(1, 1, 500, PORT, false)]);
    assert_eq!(checksum(&report, 1, 0), guests::io_loop_checksum(500));
    assert_eq!(report.vm(1).unwrap().exits(), ExitStats { local: 4 * 500, reports: 2, ..ExitStats::default() });
}

#[test]
fn a_guest_touching_unmapped_ports_keeps_running_and_reads_all_ones() {
    if !dmfabric_testkit::privileged_or_skip("a_guest_touching_unmapped_ports", &[Need::Kvm]) {
        return;
    }
    let report = run_local(vec![io_loop_vm(1, 1, 100, 0x900, false)]);
    let expected = (0..100u64).fold(0u64, |s, i| s.wrapping_add(0xffff_ffff).wrapping_add(3 * i));
    assert_eq!(checksum(&report, 1, 0), expected);
    let exits = report.vm(1).unwrap().exits();
    assert_eq!((exits.unmapped_reads, exits.unmapped_writes), (100, 100));
}

#[test]
fn a_guest_waiting_for_an_interrupt_that_never_comes_is_stopped_at_the_run_limit() {
    if !dmfabric_testkit::privileged_or_skip("a_guest_waiting_forever_is_stopped", &[Need::Kvm]) {
        return;
    }
    // The irqtest port is unmapped: no interrupt will ever come and the
    // guest sits in `hlt` inside KVM_RUN.
    let spec = VmSpec::test_guest(1, 1, IRQ_WAIT, vec![[1, u64::from(pc::IRQ_TEST.base), 0]], &[], Vec::new()).unwrap();
    let stop = AtomicBool::new(false);
    let opts = RunOptions { timeout: Duration::from_millis(300), ..RunOptions::default() };
    let start = Instant::now();
    let (report, _) = machine::run(vec![spec], None, &opts, &stop).unwrap();
    let err = report.vm(1).unwrap().error().expect("stopped").to_string();
    assert!(err.contains("run limit"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3), "kicked out of KVM_RUN, took {:?}", start.elapsed());
}

#[test]
fn a_vm_with_a_split_irqchip_refuses_lines() {
    if !dmfabric_testkit::privileged_or_skip("a_vm_with_a_split_irqchip_refuses_lines", &[Need::Kvm]) {
        return;
    }
    use dmfabric_vmm_shim::kvm::{IrqChipMode, IrqSink, Vm};
    use dmfabric_wire::{IrqSource, Trigger};
    // Its GSIs below 24 route the level MSIs it was sent: a line from a
    // server must not reach one.
    let split = Vm::with_irqchip(1 << 20, IrqChipMode::Split).unwrap().irq_handle();
    let err = split.inject(IrqSource::Line(0), Trigger::Edge).unwrap_err().to_string();
    assert!(err.contains("split irqchip"), "{err}");
    assert!(split.inject(IrqSource::Line(4), Trigger::Level { asserted: true }).is_err());
    let kernel = Vm::with_irqchip(1 << 20, IrqChipMode::Kernel).unwrap().irq_handle();
    kernel.inject(IrqSource::Line(4), Trigger::Edge).unwrap();
}

#[test]
fn two_vcpus_run_on_their_own_threads() {
    if !dmfabric_testkit::privileged_or_skip("two_vcpus_run_on_their_own_threads", &[Need::Kvm]) {
        return;
    }
    let report = run_local(vec![io_loop_vm(1, 2, 300, PORT, false)]);
    assert_eq!(checksum(&report, 1, 0), guests::io_loop_checksum(300));
    assert_eq!(checksum(&report, 1, 1), guests::io_loop_checksum(300));
}

/// A server thread in host 1 of `net` with the test device and interrupt
/// test devices 101 and 102, until the returned flag is set.
fn start_server(net: &TestNet) -> (Arc<AtomicBool>, std::thread::JoinHandle<Result<ServerStats, netns::NetnsError>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Client platform 3 (host 0) runs VMs 1 to 8, up to 4 vCPUs each.
    let vms: Vec<(u32, u16)> = (1..=8).map(|vm| (vm, 4)).collect();
    let registry = testing::registry(vec![testing::client(CLIENT, net.host(0).mac, &vms)]);
    let handle = net.spawn_in(1, "server", move || {
        let mut t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("server AF_XDP");
        let devices = [pc::test_device(1), pc::irq_test_device(0), pc::irq_test_device(1)];
        let mut s = Server::new(1, t.mac(), &devices, registry);
        ready_tx.send(()).unwrap();
        let cfg = PollConfig { spin: 10_000, wait: Duration::from_millis(1), ..PollConfig::default() };
        poll::run(&mut t, &mut s, cfg, &flag).unwrap();
        s.stats()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("server ready");
    (stop, handle)
}

/// Interrupt test device `device` on server 1, raising its line.
fn irq_test(device: u32) -> Target {
    Target::Remote(Remote::new(1, device).lines(&[pc::IRQ_TEST_IRQ]))
}

fn client_config(retry: Retry) -> ClientConfig {
    ClientConfig {
        client: CLIENT,
        hypervisor: 1,
        servers: vec![1],
        retry,
        hello_timeout: Duration::from_secs(5),
        sealer: Sealer::new(dmfabric_testkit::keys::ring(CLIENT)),
        open_on_demand: false,
    }
}

/// Run `specs` in host 0 over AF_XDP (optionally through the fault
/// injector) against the server in host 1.
fn run_remote(
    net: &TestNet,
    specs: Vec<VmSpec>,
    faults: Option<FaultConfig>,
    retry: Retry,
) -> (RunReport, Option<dmfabric_dataplane::fault::FaultStats>) {
    net.with_host(0, || {
        let t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("client AF_XDP");
        let stop = AtomicBool::new(false);
        let opts = RunOptions { timeout: Duration::from_secs(60), ..RunOptions::default() };
        let injected = Arc::new(std::sync::Mutex::new(Default::default()));
        let t: Box<dyn dmfabric_dataplane::Transport> = match faults {
            None => Box::new(t),
            Some(f) => Box::new(FaultInjector::new(t, f).report_to(injected.clone())),
        };
        let (report, t) = machine::run(specs, Some((t, client_config(retry))), &opts, &stop).expect("VMs run");
        drop(t);
        let injected = *injected.lock().unwrap();
        (report, faults.map(|_| injected))
    })
    .unwrap()
}

#[test]
fn remote_device_gives_the_same_checksum_as_local() {
    if !dmfabric_testkit::privileged_or_skip("remote_device_gives_the_same_checksum_as_local", &[Need::Kvm, Need::Root])
    {
        return;
    }
    let local = run_local(vec![io_loop_vm(7, 1, 500, PORT, false)]);
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    let (report, _) = run_remote(&net, vec![io_loop_vm(7, 1, 500, PORT, true)], None, Retry::default());
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap().unwrap();
    assert_eq!(checksum(&report, 7, 0), checksum(&local, 7, 0), "same as the local run");
    assert_eq!(checksum(&report, 7, 0), guests::io_loop_checksum(500));
    assert_eq!(report.vm(7).unwrap().exits(), ExitStats { remote: 4 * 500, reports: 2, ..ExitStats::default() });
    assert_eq!(report.vm(7).unwrap().remote.unwrap().requests, 2000);
    assert_eq!(served.completions, 2000, "{served}");
}

#[test]
fn lost_duplicated_and_corrupted_frames_change_nothing_the_guest_sees() {
    if !dmfabric_testkit::privileged_or_skip(
        "lost_duplicated_corrupted_frames_change_nothing",
        &[Need::Kvm, Need::Root],
    ) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    // Corrupted frames still parse often enough (a bit of the data, the
    // address, the WRITE flag): only their tag tells them apart.
    let faults = FaultConfig { drop: 0.05, duplicate: 0.05, reorder: 0.0, corrupt: 0.05, seed: 5 };
    let retry = Retry { timeout: Duration::from_millis(5), retries: 20 };
    // Two vCPUs, so that a vCPU also picks up the other's completions.
    let (report, injected) = run_remote(&net, vec![io_loop_vm(7, 2, 250, PORT, true)], Some(faults), retry);
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap().unwrap();
    let injected = injected.unwrap();
    assert!(injected.dropped > 50 && injected.duplicated > 50 && injected.corrupted > 50, "{injected:?}");
    assert_eq!(checksum(&report, 7, 0), guests::io_loop_checksum(250), "right checksum despite the faults");
    assert_eq!(checksum(&report, 7, 1), guests::io_loop_checksum(250));
    let client = report.client.unwrap();
    assert!(client.retransmits > 0, "{client:?}");
    // Every guest access ran exactly once on the device: duplicates were
    // answered from the server's cache, never executed twice.
    assert_eq!(served.completions, 2000, "{served}");
    assert!(served.duplicates_answered + served.duplicates_in_flight > 0, "{served}");
    // The corrupted ones (the injector corrupts what the client receives)
    // were dropped at the tag, or as malformed or foreign.
    assert!(client.unauthenticated + client.malformed + client.foreign > 0, "{client:?}");
}

#[test]
fn interrupts_from_remote_device_models_reach_only_their_own_vm() {
    if !dmfabric_testkit::privileged_or_skip("interrupts_reach_only_their_own_vm", &[Need::Kvm, Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    const N: u64 = 40;
    let irq_vm = |id: u32, device: u32, mode: u64| {
        let ranges = [
            (Space::Pio, u64::from(pc::IRQ_TEST.base), 8, irq_test(device)),
            (Space::Pio, PORT, 0x100, Target::remote(1, 1)),
        ];
        VmSpec::test_guest(id, 1, IRQ_WAIT, vec![[N, u64::from(pc::IRQ_TEST.base), mode]], &ranges, Vec::new()).unwrap()
    };
    // VM 1: edge interrupts from device 101; VM 2: level from device 102;
    // VM 3 runs io_loop on the test device and must see no interrupt.
    let specs = [irq_vm(1, 101, 0), irq_vm(2, 102, 1), io_loop_vm(3, 1, 200, PORT, true)];
    let (report, _) = run_remote(&net, specs.into(), None, Retry::default());
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap().unwrap();
    for id in [1, 2] {
        let v = &report.vm(id).unwrap().vcpus[0];
        assert!(v.result.is_ok(), "VM {id}: {:?}", v.result);
        // Counted by the guest's handler, none on other vectors, and the
        // device's own count agrees.
        assert_eq!(v.reports, vec![N as u32, 0, N as u32], "VM {id}");
    }
    assert_eq!(checksum(&report, 3, 0), guests::io_loop_checksum(200));
    let (r1, r2, r3) =
        (report.vm(1).unwrap().remote.unwrap(), report.vm(2).unwrap().remote.unwrap(), report.vm(3).unwrap().remote);
    assert_eq!(r1.interrupts, N, "one edge per interrupt");
    assert_eq!(r2.interrupts, 2 * N, "level: raised and lowered, mirrored");
    assert_eq!(r3.unwrap().interrupts, 0);
    let client = report.client.unwrap();
    assert_eq!((client.interrupts, client.other_client, client.unknown_vm), (3 * N, 0, 0), "{client:?}");
    assert_eq!(served.interrupts, 3 * N, "{served}");
    assert_eq!(served.interrupt_acks, 3 * N, "every interrupt acknowledged: {served}");
}

#[test]
fn interrupts_survive_lost_and_duplicated_frames() {
    if !dmfabric_testkit::privileged_or_skip("interrupts_survive_lost_frames", &[Need::Kvm, Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    const N: u64 = 60;
    let ranges = [(Space::Pio, u64::from(pc::IRQ_TEST.base), 8, irq_test(102))];
    let spec =
        VmSpec::test_guest(2, 1, IRQ_WAIT, vec![[N, u64::from(pc::IRQ_TEST.base), 1]], &ranges, Vec::new()).unwrap();
    let faults = FaultConfig { drop: 0.05, duplicate: 0.05, reorder: 0.0, corrupt: 0.0, seed: 11 };
    let retry = Retry { timeout: Duration::from_millis(5), retries: 20 };
    let (report, injected) = run_remote(&net, vec![spec], Some(faults), retry);
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap().unwrap();
    let v = &report.vm(2).unwrap().vcpus[0];
    assert!(v.result.is_ok(), "{:?}", v.result);
    assert_eq!(v.reports, vec![N as u32, 0, N as u32], "every interrupt once: {injected:?}");
    // The level changes went out in order (raise, lower, raise, ...) and each
    // was injected at most once. The very last lowering may not have made it
    // before the guest exited: if the fault injector dropped it (or the ack
    // of the raise before it, which holds it back), its retransmit comes
    // 20 ms later.
    let injected_irqs = report.vm(2).unwrap().remote.unwrap().interrupts;
    assert!(served.interrupts == 2 * N || served.interrupts == 2 * N - 1, "{served}");
    assert!(injected_irqs == served.interrupts || injected_irqs == served.interrupts - 1, "{injected_irqs} injected");
    assert!(injected_irqs >= 2 * N - 1, "{injected_irqs} injected");
}

#[test]
fn a_server_that_dies_mid_run_stops_the_vm_with_a_clear_error() {
    if !dmfabric_testkit::privileged_or_skip("a_server_that_dies_mid_run_stops_the_vm", &[Need::Kvm, Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    let retry = Retry { timeout: Duration::from_millis(20), retries: 4 };
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap().unwrap();
        Instant::now()
    });
    // Far more iterations than fit in 300 ms.
    let (report, _) = run_remote(&net, vec![io_loop_vm(7, 1, 10_000_000, PORT, true)], None, retry);
    let ended = Instant::now();
    let died = killer.join().unwrap();
    let msg = report.vm(7).unwrap().error().expect("the VM must stop").to_string();
    assert!(msg.contains("Server 1 did not answer device 1") && msg.contains("after 5 tries"), "{msg}");
    let waited = ended.saturating_duration_since(died);
    assert!(waited < Duration::from_secs(2), "bounded by the retry limit, took {waited:?}");
}

/// A control panel that lets a VM run for `after`, then migrates it out
/// (the snapshot is kept here).
struct MigrateAfter {
    start: Instant,
    after: Duration,
    snapshot: std::sync::Mutex<Option<Vec<u8>>>,
}

impl machine::VmControl for MigrateAfter {
    fn desired(&self, _vm: u32) -> machine::Desired {
        if self.start.elapsed() < self.after {
            machine::Desired::Run
        } else {
            machine::Desired::MigrateOut
        }
    }

    fn migrated_out(&self, _vm: u32, snapshot: &[u8]) -> Result<String, machine::ControlError> {
        *self.snapshot.lock().unwrap() = Some(snapshot.to_vec());
        Ok("the test".into())
    }

    /// Its mind changes at `start + after`: the supervisor asks then.
    fn next_look(&self) -> Option<Instant> {
        (self.start.elapsed() < self.after).then_some(self.start + self.after)
    }
}

#[test]
fn a_guest_saved_mid_run_finishes_in_a_new_vm_with_the_right_checksum() {
    if !dmfabric_testkit::privileged_or_skip("a_guest_saved_mid_run_finishes_in_a_new_vm", &[Need::Kvm]) {
        return;
    }
    let iterations = 20_000;
    let control = Arc::new(MigrateAfter {
        start: Instant::now(),
        after: Duration::from_millis(300),
        snapshot: std::sync::Mutex::new(None),
    });
    let spec = io_loop_vm(1, 2, iterations, PORT, false);
    let local = spec.local.clone();
    let opts = RunOptions { control: Some(machine::Control(control.clone())), ..RunOptions::default() };
    let report = machine::run(vec![spec], None, &opts, &AtomicBool::new(false)).unwrap().0;
    let vm = report.vm(1).unwrap();
    assert_eq!(vm.ended.as_deref().map(|e| e.starts_with("migrated to the test")), Some(true), "{:?}", vm.ended);
    assert!(vm.vcpus.iter().all(|v| v.reports.is_empty()), "stopped before it finished");
    let bytes = control.snapshot.lock().unwrap().take().expect("a snapshot");
    let snap = dmfabric_vmm_shim::migrate::VmSnapshot::decode(&bytes, machine::TEST_VM_MEM).unwrap();
    assert_eq!((snap.vm, snap.vcpus.len(), snap.memory.len()), (1, 2, machine::TEST_VM_MEM));
    assert!(bytes.len() < 256 << 10, "zero pages stay behind: {} bytes", bytes.len());
    // The local register file goes along by hand (local models are the client's own).
    let saved = local[0].lock().unwrap().save();
    let DeviceState::RegFile(state) = saved else { panic!("not a register file's state: {saved:?}") };
    let moved: Box<dyn Device> =
        Box::new(RegisterFile::restore((Some((PORT as u16, 0x100)), Some((MMIO, 0x1000))), state).unwrap());
    let mut spec = io_loop_vm(1, 2, iterations, PORT, false);
    spec.local = vec![std::sync::Mutex::new(moved)].into();
    spec.boot = machine::Boot::Restore(Box::new(snap));
    let report = run_local(vec![spec]);
    assert_eq!(checksum(&report, 1, 0), guests::io_loop_checksum(iterations));
    assert_eq!(checksum(&report, 1, 1), guests::io_loop_checksum(iterations));
}

/// A local model with a bug: it panics on any access.
struct Panics;

impl Device for Panics {
    fn kind(&self) -> &'static str {
        "panics"
    }
    fn read(&mut self, _: Space, _: u64, _: dmfabric_wire::AccessSize) -> Option<u64> {
        panic!("a model bug")
    }
    fn write(&mut self, _: Space, _: u64, _: dmfabric_wire::AccessSize, _: u64) -> bool {
        panic!("a model bug")
    }
    fn save(&self) -> DeviceState {
        DeviceState::RegFile(Default::default())
    }
}

#[test]
fn a_vcpu_thread_that_panics_stops_its_vm_with_an_error_naming_it() {
    if !dmfabric_testkit::privileged_or_skip("a_vcpu_thread_that_panics", &[Need::Kvm]) {
        return;
    }
    let ranges = [(Space::Pio, PORT, 0x100, Target::Local(0))];
    let spec = VmSpec::test_guest(1, 1, IO_LOOP, vec![[10, PORT, MMIO]], &ranges, vec![Box::new(Panics)]).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(machine::run(vec![spec], None, &RunOptions::default(), &AtomicBool::new(false)));
    });
    let report = rx.recv_timeout(Duration::from_secs(20)).expect("the run ends: a panicking vCPU must not hang it");
    let report = report.unwrap().0;
    let err = report.vm(1).unwrap().error().expect("the VM failed").to_string();
    assert!(err.contains("vCPU 0 panicked") && err.contains("a model bug"), "{err}");
}

/// A register file that counts the accesses it serves.
struct Counting(RegisterFile, Arc<std::sync::atomic::AtomicU64>);

impl Device for Counting {
    fn kind(&self) -> &'static str {
        "counting"
    }
    fn read(&mut self, space: Space, addr: u64, size: dmfabric_wire::AccessSize) -> Option<u64> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.read(space, addr, size)
    }
    fn write(&mut self, space: Space, addr: u64, size: dmfabric_wire::AccessSize, data: u64) -> bool {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.write(space, addr, size, data)
    }
    fn save(&self) -> DeviceState {
        Device::save(&self.0)
    }
}

/// Runs a VM, starts migrating it (its state can never be delivered), then
/// calls the migration off wanting it held, then ends it.
struct CalledOff {
    start: Instant,
}

impl CalledOff {
    const MIGRATE: Duration = Duration::from_millis(200);
    const HOLD: Duration = Duration::from_millis(500);
    const END: Duration = Duration::from_millis(1300);
}

impl machine::VmControl for CalledOff {
    fn desired(&self, _vm: u32) -> machine::Desired {
        match self.start.elapsed() {
            t if t < Self::MIGRATE => machine::Desired::Run,
            t if t < Self::HOLD => machine::Desired::MigrateOut,
            t if t < Self::END => machine::Desired::Hold,
            _ => machine::Desired::End("the test is over".into()),
        }
    }

    fn migrated_out(&self, _vm: u32, _snapshot: &[u8]) -> Result<String, machine::ControlError> {
        Err(machine::ControlError::CalledOff)
    }

    fn next_look(&self) -> Option<Instant> {
        let t = self.start.elapsed();
        [Self::MIGRATE, Self::HOLD, Self::END].into_iter().find(|b| t < *b).map(|b| self.start + b)
    }
}

#[test]
fn a_migration_called_off_leaves_the_vm_held_when_the_control_panel_wants_it_held() {
    if !dmfabric_testkit::privileged_or_skip("a_migration_called_off", &[Need::Kvm]) {
        return;
    }
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let model = Counting(RegisterFile::new(Some((PORT as u16, 0x100)), Some((MMIO, 0x1000))), served.clone());
    let ranges = [(Space::Pio, PORT, 0x100, Target::Local(0)), (Space::Mmio, MMIO, 0x1000, Target::Local(0))];
    let spec =
        VmSpec::test_guest(1, 1, IO_LOOP, vec![[100_000_000, PORT, MMIO]], &ranges, vec![Box::new(model)]).unwrap();
    let control = Arc::new(CalledOff { start: Instant::now() });
    let opts = RunOptions { control: Some(machine::Control(control.clone())), ..RunOptions::default() };
    let counts = std::thread::spawn(move || {
        let at = |t: Duration| {
            std::thread::sleep((control.start + t).saturating_duration_since(Instant::now()));
            served.load(Ordering::Relaxed)
        };
        let ms = |n| at(Duration::from_millis(n));
        (ms(100), ms(450), ms(700), ms(1200))
    });
    let report = machine::run(vec![spec], None, &opts, &AtomicBool::new(false)).unwrap().0;
    let (running, saving, held_early, held_late) = counts.join().unwrap();
    assert!(running > 0, "it ran before the migration");
    // Held from the migration on: not one access when it is called off
    // (not even a moment's run before the hold).
    assert_eq!((saving, held_early, held_late), (saving, saving, saving), "held: no access");
    assert_eq!(report.vm(1).unwrap().ended.as_deref(), Some("the test is over"));
}

/// Whether one mapping of this process covers all of `[addr, addr + len)`.
/// (The guest memory's own mapping may have been merged with a neighbour
/// that another test thread mapped: its exact size says nothing.)
fn mapped(addr: u64, len: u64) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().filter_map(|l| l.split_whitespace().next()?.split_once('-')).any(|(a, b)| {
        let (a, b) = (u64::from_str_radix(a, 16).unwrap_or(0), u64::from_str_radix(b, 16).unwrap_or(0));
        a <= addr && addr + len <= b
    })
}

#[test]
fn guest_memory_lives_as_long_as_anything_that_holds_the_vm() {
    if !dmfabric_testkit::privileged_or_skip("guest_memory_lives_as_long_as_the_vm_fd", &[Need::Kvm]) {
        return;
    }
    // An unusual size, so that a mapping made in its place afterwards is unlikely to cover it exactly.
    const MEM: usize = (5 << 20) + (13 << 12);
    let vm = dmfabric_vmm_shim::kvm::Vm::new(MEM).unwrap();
    let addr = vm.memory(0, 1).unwrap().as_ptr() as u64;
    assert!(mapped(addr, MEM as u64));
    let irq = vm.irq_handle();
    drop(vm);
    // The VM fd is still open (the handle injects through it): the memory
    // registered with it must still be there.
    assert!(mapped(addr, MEM as u64), "memory unmapped while the VM fd lives");
    assert!(irq.set_line(4, false).is_ok());
    drop(irq);
    assert!(!mapped(addr, MEM as u64), "and gone with the last holder");
}
