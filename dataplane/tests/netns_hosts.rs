//! The test-host library itself: bridged hosts, MTU, closures and
//! processes inside a namespace, and cleanup when a test panics.

use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{TestNet, TestNetConfig};
use dmfabric_dataplane::packet::PacketTransport;
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_dataplane::{FrameBatch, Transport};
use dmfabric_testkit::Need;
use dmfabric_wire::ETHERTYPE_DMFABRIC;

fn ns_exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

#[test]
fn three_hosts_on_a_bridge_reach_each_other_with_the_mtu_asked_for() {
    if !dmfabric_testkit::privileged_or_skip("three_hosts_on_a_bridge", &[Need::Root]) {
        return;
    }
    let net = TestNet::new(TestNetConfig { hosts: 3, mtu: 3000 }).unwrap();
    // A process inside host 2's namespace sees its own link and its MTU.
    let out = net.command(2, "ip").args(["-o", "link", "show", "dmf0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mtu 3000"), "{text}");
    let macs: Vec<_> = net.hosts().iter().map(|h| h.mac).collect();
    assert!(macs[0] != macs[1] && macs[1] != macs[2]);

    // Host 0 sends one frame to each of hosts 1 and 2 through the bridge.
    let receivers: Vec<_> = (1..3)
        .map(|i| {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let me = macs[i];
            let handle = net.spawn_in(i, "rx", move || {
                let mut t = PacketTransport::open("dmf0").unwrap();
                ready_tx.send(()).unwrap();
                let end = Instant::now() + Duration::from_secs(5);
                let mut got = None;
                // A bridge floods unicast to MACs it has not learnt yet, and
                // packet sockets see such frames: keep only ours.
                while got.is_none() && Instant::now() < end {
                    t.recv(8, &mut |f| {
                        if f[..6] == me.0 {
                            got = Some(f[14]);
                        }
                    })
                    .unwrap();
                }
                got
            });
            ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            handle
        })
        .collect();
    net.run_in(0, || {
        let mut t = PacketTransport::open("dmf0").unwrap();
        let mut batch = FrameBatch::new();
        for (i, mac) in macs.iter().enumerate().skip(1) {
            let mut frame = vec![0u8; 60];
            frame[..6].copy_from_slice(&mac.0);
            frame[6..12].copy_from_slice(&macs[0].0);
            frame[12..14].copy_from_slice(&ETHERTYPE_DMFABRIC.to_be_bytes());
            frame[14] = i as u8;
            batch.push(&frame);
        }
        assert_eq!(t.send(&mut batch).unwrap(), 2);
    })
    .unwrap();
    let got: Vec<_> = receivers.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    assert_eq!(got, vec![Some(1), Some(2)], "each host got the frame meant for it");
}

#[test]
fn a_panicking_test_leaves_no_namespace_or_xdp_program() {
    if !dmfabric_testkit::privileged_or_skip("a_panicking_test_leaves_nothing", &[Need::Root]) {
        return;
    }
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = TestNet::pair().unwrap();
        names = net.hosts().iter().map(|h| h.ns.clone()).collect();
        net.run_in(1, || {
            // Attach an XDP program, then leak the socket as a crash would.
            let t = XdpTransport::open(&XdpConfig::new("dmf0")).unwrap();
            std::mem::forget(t);
        })
        .unwrap();
        assert!(names.iter().all(|n| ns_exists(n)));
        panic!("the test fails here");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 2);
    for n in &names {
        assert!(!ns_exists(n), "{n} removed after the panic");
    }
}

#[test]
fn closures_run_inside_the_namespace_and_the_thread_returns_home() {
    if !dmfabric_testkit::privileged_or_skip("closures_run_inside_the_namespace", &[Need::Root]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let home = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let inside = net.with_host(0, || std::fs::read_link("/proc/thread-self/ns/net").unwrap()).unwrap();
    assert_ne!(inside, home);
    assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), home, "back home");
    // The interface of the host is visible inside, not outside.
    assert!(net.with_host(0, || dmfabric_dataplane::if_index("dmf0").is_some()).unwrap());
    assert!(dmfabric_dataplane::if_index("dmf0").is_none());
}
