//! The load generator against a real server over the in-memory transport:
//! every answer is checked, so a server (or a pattern) that mixes up
//! registers is caught.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmfabric_bench::loadgen::{self, Target, MAX_INFLIGHT};
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::{mem, Transport};
use dmfabric_dm_workers::server::{DeviceSpec, Server};
use dmfabric_wire::MacAddr;

fn with_server<R>(device: DeviceSpec, f: impl FnOnce(&mut dyn Transport, Target) -> R) -> R {
    let (client_mac, server_mac) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
    let (mut client, mut server_t) = mem::pair(client_mac, server_mac, 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let server = std::thread::spawn(move || {
        let mut s = Server::new(1, server_mac, &[device]);
        let cfg = PollConfig { spin: 1000, wait: Duration::from_millis(1), ..PollConfig::default() };
        poll::run(&mut server_t, &mut s, cfg, &flag).unwrap();
        s.stats()
    });
    let (mac, id) = loadgen::discover(&mut client, Duration::from_secs(5)).unwrap();
    assert_eq!((mac, id), (server_mac, 1));
    let r = f(&mut client, Target::test_device(mac, id));
    stop.store(true, Ordering::Relaxed);
    let stats = server.join().unwrap();
    assert_eq!(stats.malformed_total(), 0);
    r
}

#[test]
fn throughput_at_full_depth_gets_every_answer_right() {
    let never = AtomicBool::new(false);
    let r = with_server(DeviceSpec::test_device(), |t, target| {
        loadgen::throughput(t, &target, Duration::from_millis(300), MAX_INFLIGHT, Duration::from_millis(500), &never)
            .unwrap()
    });
    assert!(r.completed > 1000, "completed {}", r.completed);
    assert_eq!((r.lost, r.wrong, r.late), (0, 0, 0));
    assert_eq!(r.sent, r.completed);
}

#[test]
fn rtt_gets_every_answer_right_and_records_each() {
    let never = AtomicBool::new(false);
    let r = with_server(DeviceSpec::test_device(), |t, target| {
        loadgen::rtt(t, &target, 2000, 100, Duration::from_millis(500), &never).unwrap()
    });
    assert_eq!((r.sent, r.completed, r.lost, r.wrong), (2000, 2000, 0, 0));
    assert_eq!(r.hist.len(), 2000);
}

/// A device whose port window is too small answers some reads with all
/// ones (unclaimed): the generator must notice.
#[test]
fn a_device_that_loses_registers_is_caught() {
    let never = AtomicBool::new(false);
    let small = DeviceSpec { pio: Some((0x500, 16)), ..DeviceSpec::test_device() };
    let r = with_server(small, |t, target| {
        loadgen::throughput(t, &target, Duration::from_millis(200), 16, Duration::from_millis(500), &never).unwrap()
    });
    assert!(r.wrong > 0, "wrong answers must be detected");
}

/// With no server, discovery fails with a clear error instead of hanging.
#[test]
fn no_server_is_a_clear_error() {
    let (mut client, _silent) = mem::pair(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), 16);
    let err = loadgen::discover(&mut client, Duration::from_millis(300)).unwrap_err();
    assert!(err.to_string().contains("No dmfabric server answered"), "{err}");
}
