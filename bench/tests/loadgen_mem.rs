//! The load generator against a real server over the in-memory transport:
//! every answer is checked, so a server (or a pattern) that mixes up
//! registers is caught.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmfabric_bench::harness::{ServerLaunch, Setup};
use dmfabric_bench::loadgen::{self, Retry, Target, MAX_INFLIGHT};
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::{mem, Transport, TransportKind};
use dmfabric_devices::platform::pc;
use dmfabric_devices::DeviceSpec;
use dmfabric_wire::MacAddr;

fn with_server<R>(device: DeviceSpec, f: impl FnOnce(&mut dyn Transport, Target) -> R) -> R {
    let (client_mac, server_mac) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
    let (mut client, mut server_t) = mem::pair(client_mac, server_mac, 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let setup = Setup::new(TransportKind::Mem, ServerLaunch::Thread);
    let mut s = setup.server(server_mac, client_mac, &[device]);
    let server = std::thread::spawn(move || {
        let cfg = PollConfig { spin: 1000, wait: Duration::from_millis(1), ..PollConfig::default() };
        poll::run(&mut server_t, &mut s, cfg, &flag).unwrap();
        s.stats()
    });
    let sealer = setup.sealer();
    let session = loadgen::discover(&mut client, loadgen::CLIENT_ID, &sealer, Duration::from_secs(5)).unwrap();
    assert_eq!((session.mac, session.server), (server_mac, 1));
    let r = f(&mut client, Target::test_device(&session, &sealer));
    stop.store(true, Ordering::Relaxed);
    let stats = server.join().unwrap();
    assert_eq!(stats.malformed_total(), 0);
    r
}

#[test]
fn throughput_at_full_depth_gets_every_answer_right() {
    let never = AtomicBool::new(false);
    let r = with_server(pc::test_device(1), |t, target| {
        loadgen::throughput(
            t,
            &target,
            Duration::from_millis(300),
            MAX_INFLIGHT,
            Retry { timeout: Duration::from_millis(500), retries: 0 },
            &never,
        )
        .unwrap()
    });
    assert!(r.completed > 1000, "completed {}", r.completed);
    assert_eq!((r.lost, r.wrong, r.late), (0, 0, 0));
    assert_eq!(r.sent, r.completed);
}

#[test]
fn rtt_gets_every_answer_right_and_records_each() {
    let never = AtomicBool::new(false);
    let r = with_server(pc::test_device(1), |t, target| {
        loadgen::rtt(t, &target, 2000, 100, Retry { timeout: Duration::from_millis(500), retries: 0 }, &never).unwrap()
    });
    assert_eq!((r.sent, r.completed, r.lost, r.wrong), (2000, 2000, 0, 0));
    assert_eq!(r.hist.len(), 2000);
}

/// A device whose port window is too small answers some reads with all
/// ones (unclaimed): the generator must notice.
#[test]
fn a_device_that_loses_registers_is_caught() {
    let never = AtomicBool::new(false);
    let small = DeviceSpec { pio: Some((0x500, 16)), ..pc::test_device(1) };
    let r = with_server(small, |t, target| {
        loadgen::throughput(
            t,
            &target,
            Duration::from_millis(200),
            16,
            Retry { timeout: Duration::from_millis(500), retries: 0 },
            &never,
        )
        .unwrap()
    });
    assert!(r.wrong > 0, "wrong answers must be detected");
}

/// With no server, discovery fails with a clear error instead of hanging.
#[test]
fn no_server_is_a_clear_error() {
    let (mut client, _silent) = mem::pair(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), 16);
    let sealer = Setup::new(TransportKind::Mem, ServerLaunch::Thread).sealer();
    let err = loadgen::discover(&mut client, loadgen::CLIENT_ID, &sealer, Duration::from_millis(300)).unwrap_err();
    assert!(err.to_string().contains("No dmfabric server answered"), "{err}");
}

/// Drops, duplicates, reordering and corruption on the client's link:
/// retransmits recover every request, corrupted frames fail their tag and
/// are dropped (and sent again), and the server's per-stream cache answers
/// duplicates without applying a write twice (an old write applied again
/// after a newer one would make the next read wrong).
#[test]
fn lossy_corrupting_link_loses_nothing_and_applies_no_write_twice() {
    use dmfabric_dataplane::fault::{FaultConfig, FaultInjector};
    let never = AtomicBool::new(false);
    let (client_mac, server_mac) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
    let (client, mut server_t) = mem::pair(client_mac, server_mac, 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let setup = Setup::new(TransportKind::Mem, ServerLaunch::Thread);
    let mut s = setup.server(server_mac, client_mac, &[pc::test_device(1)]);
    let server = std::thread::spawn(move || {
        let cfg = PollConfig { spin: 1000, wait: Duration::from_millis(1), ..PollConfig::default() };
        poll::run(&mut server_t, &mut s, cfg, &flag).unwrap();
        s.stats()
    });
    let cfg = FaultConfig { drop: 0.05, duplicate: 0.05, reorder: 0.02, corrupt: 0.05, seed: 11 };
    let mut client = FaultInjector::new(client, cfg);
    let sealer = setup.sealer();
    let session = loadgen::discover(&mut client, loadgen::CLIENT_ID, &sealer, Duration::from_secs(5)).unwrap();
    let target = Target::test_device(&session, &sealer);
    let retry = Retry { timeout: Duration::from_millis(5), retries: 20 };
    let tput = loadgen::throughput(&mut client, &target, Duration::from_millis(500), 32, retry, &never).unwrap();
    // A new run numbers from 0 again: in a new session, as a restarted client does.
    let session = loadgen::discover(&mut client, loadgen::CLIENT_ID, &sealer, Duration::from_secs(5)).unwrap();
    let target = Target::test_device(&session, &sealer);
    let rtt = loadgen::rtt(&mut client, &target, 3000, 0, retry, &never).unwrap();
    stop.store(true, Ordering::Relaxed);
    let stats = server.join().unwrap();
    let faults = client.fault_stats();
    assert!(faults.dropped > 50 && faults.duplicated > 50 && faults.reordered > 10, "{faults:?}");
    assert!(faults.corrupted > 50, "{faults:?}");
    for r in [&tput, &rtt] {
        assert_eq!((r.lost, r.wrong), (0, 0), "{r:?}");
        assert!(r.retransmits > 0, "drops were recovered by retransmits");
    }
    assert_eq!(rtt.completed, 3000);
    assert!(stats.duplicates_answered > 0, "{stats}");
    // Every corrupted request failed its tag (or its structure) at the server.
    assert!(stats.unauthenticated_total() + stats.malformed_total() > 0, "{stats}");
}
