//! Real KVM guests in 64-bit long mode whose port I/O and MMIO go to local
//! device models or, over AF_XDP between two network namespaces, to a
//! `dmfabric` server (needs /dev/kvm and root; skipped without them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_dataplane::fault::{FaultConfig, FaultInjector};
use dmfabric_dataplane::netns::{self, Need, TestNet};
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_dataplane::Transport;
use dmfabric_dm_workers::regfile::RegisterFile;
use dmfabric_dm_workers::server::{DeviceSpec, Server, ServerStats};
use dmfabric_vmm_shim::debugport::{DebugPort, DEBUG_PORT};
use dmfabric_vmm_shim::devmap::{DeviceMap, Target};
use dmfabric_vmm_shim::exits::{ExitStats, Router};
use dmfabric_vmm_shim::guests::{self, IO_LOOP, LOAD_ADDR};
use dmfabric_vmm_shim::kvm::{KvmError, Vm};
use dmfabric_vmm_shim::remote::RemoteIo;
use dmfabric_wire::Space;

const PORT: u64 = 0x500;
const MMIO: u64 = 0xd000_0000;

/// Run io_loop aiming its port accesses at `port`, with the test device
/// local or remote. Returns the reported checksum and the exit counters.
fn run_io_loop<T: Transport>(
    iterations: u64,
    port: u64,
    remote: Option<RemoteIo<T>>,
) -> Result<(u64, ExitStats, Option<RemoteIo<T>>), KvmError> {
    let mut regfile = RegisterFile::new(Some((PORT as u16, 0x100)), Some((MMIO, 0x1000)));
    let mut debug = DebugPort::default();
    let mut map = DeviceMap::default();
    let device = if remote.is_some() { Target::Remote { server: 1, device: 1 } } else { Target::Local(1) };
    map.add(Space::Pio, PORT, 0x100, device).unwrap();
    map.add(Space::Mmio, MMIO, 0x1000, device).unwrap();
    map.add(Space::Pio, u64::from(DEBUG_PORT), 4, Target::Local(0)).unwrap();

    let mut vm = Vm::new(4 << 20)?;
    vm.load(LOAD_ADDR, IO_LOOP)?;
    let mut vcpu = vm.long_mode_vcpu(0, LOAD_ADDR, [iterations, port, MMIO])?;
    let mut router = Router::new(map, vec![&mut debug, &mut regfile], remote);
    vcpu.run_until_halt(&mut |e| router.handle(0, e))?;
    let stats = router.stats();
    let remote = router.into_remote();
    Ok((debug.u64_at(0).expect("checksum reported"), stats, remote))
}

#[test]
fn guest_port_and_mmio_io_reach_local_devices() {
    if !netns::privileged_or_skip("guest_port_and_mmio_io_reach_local_devices", &[Need::Kvm]) {
        return;
    }
    let (checksum, stats, _) = run_io_loop::<XdpTransport>(500, PORT, None).unwrap();
    assert_eq!(checksum, guests::io_loop_checksum(500));
    assert_eq!(stats, ExitStats { local: 4 * 500 + 2, ..ExitStats::default() });
}

#[test]
fn a_guest_touching_unmapped_ports_keeps_running_and_reads_all_ones() {
    if !netns::privileged_or_skip("a_guest_touching_unmapped_ports", &[Need::Kvm]) {
        return;
    }
    let (checksum, stats, _) = run_io_loop::<XdpTransport>(100, 0x900, None).unwrap();
    let expected = (0..100u64).fold(0u64, |s, i| s.wrapping_add(0xffff_ffff).wrapping_add(3 * i));
    assert_eq!(checksum, expected);
    assert_eq!((stats.unmapped_reads, stats.unmapped_writes), (100, 100));
}

/// A server thread in host 1 of `net`, until the returned flag is set.
fn start_server(net: &TestNet) -> (Arc<AtomicBool>, std::thread::JoinHandle<Result<ServerStats, netns::NetnsError>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = net.spawn_in(1, "server", move || {
        let mut t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("server AF_XDP");
        let mut s = Server::new(1, t.mac(), &[DeviceSpec::test_device()]);
        ready_tx.send(()).unwrap();
        let cfg = PollConfig { spin: 10_000, wait: Duration::from_millis(1), ..PollConfig::default() };
        poll::run(&mut t, &mut s, cfg, &flag).unwrap();
        s.stats()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("server ready");
    (stop, handle)
}

fn connect<T: Transport>(t: T, retry: Retry) -> RemoteIo<T> {
    RemoteIo::connect(t, 1, 1, 7, 1, retry, Duration::from_secs(5)).expect("server found")
}

#[test]
fn remote_device_gives_the_same_checksum_as_local() {
    if !netns::privileged_or_skip("remote_device_gives_the_same_checksum_as_local", &[Need::Kvm, Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    let (checksum, stats, remote) = net
        .with_host(0, || {
            let t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("client AF_XDP");
            run_io_loop(500, PORT, Some(connect(t, Retry::default())))
        })
        .unwrap()
        .expect("guest runs");
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap().unwrap();
    assert_eq!(checksum, guests::io_loop_checksum(500), "same as the local run");
    assert_eq!(stats, ExitStats { local: 2, remote: 4 * 500, ..ExitStats::default() });
    assert_eq!(remote.unwrap().stats().requests, 2000);
    assert_eq!(served.completions, 2000, "{served}");
}

#[test]
fn lost_and_duplicated_frames_change_nothing_the_guest_sees() {
    if !netns::privileged_or_skip("lost_and_duplicated_frames_change_nothing", &[Need::Kvm, Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    let faults = FaultConfig { drop: 0.05, duplicate: 0.05, reorder: 0.0, corrupt: 0.0, seed: 5 };
    let retry = Retry { timeout: Duration::from_millis(5), retries: 20 };
    let (checksum, _, remote) = net
        .with_host(0, || {
            let t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("client AF_XDP");
            run_io_loop(500, PORT, Some(connect(FaultInjector::new(t, faults), retry)))
        })
        .unwrap()
        .expect("guest runs");
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap().unwrap();
    let remote = remote.unwrap();
    let injected = remote.transport().fault_stats();
    assert!(injected.dropped > 50 && injected.duplicated > 50, "{injected:?}");
    assert_eq!(checksum, guests::io_loop_checksum(500), "right checksum despite the faults");
    assert!(remote.stats().retransmits > 0);
    // Every guest access ran exactly once on the device: duplicates were
    // answered from the server's cache.
    assert_eq!(served.completions, 2000, "{served}");
    assert!(served.duplicates_answered + served.duplicates_in_flight > 0, "{served}");
}

#[test]
fn a_vanished_server_stops_the_vm_with_a_clear_error() {
    if !netns::privileged_or_skip("a_vanished_server_stops_the_vm", &[Need::Kvm, Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let (stop, server) = start_server(&net);
    let retry = Retry { timeout: Duration::from_millis(20), retries: 4 };
    let result = net
        .with_host(0, || {
            let t = XdpTransport::open(&XdpConfig::new("dmf0")).expect("client AF_XDP");
            let remote = connect(t, retry);
            stop.store(true, Ordering::Relaxed);
            server.join().unwrap().unwrap();
            let start = Instant::now();
            (run_io_loop(10, PORT, Some(remote)).map(|r| r.0), start.elapsed())
        })
        .unwrap();
    let (Err(KvmError::Device(msg)), waited) = result else { panic!("the VM must stop: {:?}", result.0) };
    assert!(msg.contains("Server 1 did not answer device 1") && msg.contains("after 5 tries"), "{msg}");
    assert!(waited < Duration::from_secs(2), "bounded by the retry limit, took {waited:?}");
}
