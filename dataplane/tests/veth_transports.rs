//! Real frames over veth between two network namespaces, on every
//! transport that needs them (root; skipped otherwise).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{self, TestNet};
use dmfabric_dataplane::packet::PacketTransport;
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::udp::UdpTransport;
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode, XdpTransport};
use dmfabric_dataplane::{FrameBatch, Transport, TransportKind};
use dmfabric_testkit::{Echo, Need};
use dmfabric_wire::ETHERTYPE_DMFABRIC;

const PORT: u16 = 47000;
const FRAMES: u32 = 300;

fn open(kind: TransportKind, net: &TestNet, me: usize, peer: usize, mode: XdpMode) -> Box<dyn Transport> {
    let host = net.host(me);
    match kind {
        TransportKind::Xdp => {
            let mut cfg = XdpConfig::new(&host.iface);
            cfg.mode = mode;
            Box::new(XdpTransport::open(&cfg).expect("open AF_XDP"))
        }
        TransportKind::Packet => Box::new(PacketTransport::open(&host.iface).expect("open AF_PACKET")),
        TransportKind::Udp => {
            let local = (host.ipv4, PORT).into();
            let peer = (net.host(peer).ipv4, PORT).into();
            Box::new(UdpTransport::bind(local, Some(peer), host.mac).expect("bind UDP"))
        }
        TransportKind::Mem => unreachable!(),
    }
}

fn echo_round_trips(kind: TransportKind, mode: XdpMode) {
    let net = TestNet::pair().expect("test net");
    let stop = Arc::new(AtomicBool::new(false));
    let (server_net, server_stop) = (&net, stop.clone());
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = s.spawn(move || {
            netns::enter(&server_net.host(1).ns).unwrap();
            let mut t = open(kind, server_net, 1, 0, mode);
            ready_tx.send(()).unwrap();
            let cfg = PollConfig { spin: 1000, wait: Duration::from_millis(5), ..PollConfig::default() };
            poll::run(t.as_mut(), &mut Echo, cfg, &server_stop).unwrap();
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("server ready");
        let result = net.run_in(0, || {
            let mut t = open(kind, &net, 0, 1, mode);
            let server_mac = net.host(1).mac;
            let mut batch = FrameBatch::new();
            let mut got = 0u32;
            for i in 0..FRAMES {
                let mut frame = vec![0u8; 70];
                frame[..6].copy_from_slice(&server_mac.0);
                frame[6..12].copy_from_slice(&t.mac().0);
                frame[12..14].copy_from_slice(&ETHERTYPE_DMFABRIC.to_be_bytes());
                frame[14..18].copy_from_slice(&i.to_be_bytes());
                batch.push(&frame);
                t.send(&mut batch).unwrap();
                let deadline = Instant::now() + Duration::from_secs(2);
                let mut matched = false;
                while !matched && Instant::now() < deadline {
                    t.recv(8, &mut |f| {
                        if f.len() == 70 && f[14..18] == i.to_be_bytes() && f[..6] == t_mac(&frame) {
                            matched = true;
                        }
                    })
                    .unwrap();
                }
                got += matched as u32;
            }
            (got, t.stats())
        });
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let (got, stats) = result.unwrap();
        assert_eq!(got, FRAMES, "{kind}: every frame comes back ({stats:?})");
        assert_eq!(stats.tx_frames, u64::from(FRAMES));
    });
}

/// The source MAC of a frame we sent is the destination of its echo.
fn t_mac(frame: &[u8]) -> [u8; 6] {
    frame[6..12].try_into().unwrap()
}

#[test]
fn xdp_generic_echo() {
    if dmfabric_testkit::privileged_or_skip("xdp_generic_echo", &[Need::Root]) {
        echo_round_trips(TransportKind::Xdp, XdpMode::Generic);
    }
}

#[test]
fn xdp_native_echo() {
    if dmfabric_testkit::privileged_or_skip("xdp_native_echo", &[Need::Root]) {
        echo_round_trips(TransportKind::Xdp, XdpMode::Native);
    }
}

#[test]
fn packet_echo() {
    if dmfabric_testkit::privileged_or_skip("packet_echo", &[Need::Root]) {
        echo_round_trips(TransportKind::Packet, XdpMode::Auto);
    }
}

#[test]
fn udp_echo() {
    if dmfabric_testkit::privileged_or_skip("udp_echo", &[Need::Root]) {
        echo_round_trips(TransportKind::Udp, XdpMode::Auto);
    }
}
