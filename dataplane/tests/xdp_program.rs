//! dmfabric's XDP program on veth between two network namespaces (root;
//! skipped otherwise): the AF_XDP data plane gets the fabric's frames, the
//! kernel keeps everything else, so IPv6 and TCP share the interface. Each
//! check also runs with libxdp's default program, which takes every frame,
//! to show the check can fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{self, TestNet};
use dmfabric_dataplane::packet::PacketTransport;
use dmfabric_dataplane::poll::{self, PollConfig};
use dmfabric_dataplane::xdp::{XdpConfig, XdpProgram, XdpTransport};
use dmfabric_dataplane::{FrameBatch, Transport};
use dmfabric_testkit::{Echo, Need};
use dmfabric_wire::{Frame, WireError, ETHERTYPE_DMFABRIC};

const FRAMES: u32 = 200;
const TCP_PORT: u16 = 47100;

fn open_xdp(net: &TestNet, host: usize, program: XdpProgram) -> XdpTransport {
    let mut cfg = XdpConfig::new(&net.host(host).iface);
    cfg.program = Some(program);
    let t = XdpTransport::open(&cfg).expect("open AF_XDP");
    assert_eq!(t.program(), program);
    t
}

/// Send [`FRAMES`] dmfabric frames to host 1 and count the echoes (each
/// waited for at most 100 ms).
fn echoes(t: &mut XdpTransport, net: &TestNet) -> u32 {
    let mut got = 0;
    let mut batch = FrameBatch::new();
    for i in 0..FRAMES {
        let mut frame = vec![0u8; 64];
        frame[..6].copy_from_slice(&net.host(1).mac.0);
        frame[6..12].copy_from_slice(&t.mac().0);
        frame[12..14].copy_from_slice(&ETHERTYPE_DMFABRIC.to_be_bytes());
        frame[14..18].copy_from_slice(&i.to_be_bytes());
        batch.push(&frame);
        t.send(&mut batch).unwrap();
        let end = Instant::now() + Duration::from_millis(100);
        let mut seen = false;
        while !seen && Instant::now() < end {
            t.recv(64, &mut |f| seen |= f.len() == 64 && f[14..18] == i.to_be_bytes()).unwrap();
        }
        got += u32::from(seen);
    }
    got
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Shared {
    ping6: bool,
    tcp4: bool,
    tcp6: bool,
    echoes_before: u32,
    echoes_after: u32,
}

/// Both hosts serve AF_XDP with `program` (host 1 echoes dmfabric frames
/// until the end); meanwhile host 0 pings host 1 over IPv6 and opens TCP
/// connections to it over IPv4 and IPv6, on the same interface.
fn share_the_interface(program: XdpProgram) -> Shared {
    let net = TestNet::pair().expect("test net");
    let peer6 = net.enable_ipv6(1).expect("IPv6 on host 1");
    net.enable_ipv6(0).expect("IPv6 on host 0");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (net, stop) = (&net, &stop);
        let server = s.spawn(move || {
            netns::enter(&net.host(1).ns).unwrap();
            let mut t = open_xdp(net, 1, program);
            ready_tx.send(()).unwrap();
            let cfg = PollConfig { spin: 1000, wait: Duration::from_millis(5), ..PollConfig::default() };
            poll::run(&mut t, &mut Echo, cfg, stop).unwrap();
        });
        // Host 1 stops serving when this is done, also on a panic.
        let stop_server = StopOnDrop(stop);
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("host 1 ready");
        let mut client = net.with_host(0, || open_xdp(net, 0, program)).unwrap();
        let echoes_before = echoes(&mut client, net);
        let ping6 = net.ping6(0, peer6).expect("ping");
        let tcp4 = net.tcp_round_trip(0, 1, net.host(1).ipv4.into(), TCP_PORT).unwrap();
        let tcp6 = net.tcp_round_trip(0, 1, peer6.into(), TCP_PORT + 1).unwrap();
        let echoes_after = echoes(&mut client, net);
        // libxdp detaches its default program by interface index: in the
        // namespace the socket was opened in.
        net.with_host(0, || drop(client)).unwrap();
        drop(stop_server);
        server.join().unwrap();
        Shared { ping6, tcp4, tcp6, echoes_before, echoes_after }
    })
}

#[test]
fn ipv6_ping_and_tcp_share_the_interface_with_the_data_plane() {
    if !dmfabric_testkit::privileged_or_skip("ipv6_ping_and_tcp_share_the_interface_with_the_data_plane", &[Need::Root])
    {
        return;
    }
    let r = share_the_interface(XdpProgram::Dmfabric);
    assert_eq!((r.echoes_before, r.echoes_after), (FRAMES, FRAMES), "the data plane serves throughout");
    assert!(r.ping6, "ping -6 to the link-local address of the served interface");
    assert!(r.tcp4, "TCP over IPv4 (ARP) on the served interface");
    assert!(r.tcp6, "TCP over IPv6 link-local (neighbour discovery) on the served interface");
}

#[test]
fn libxdps_default_program_takes_ipv6_and_tcp_from_the_interface() {
    if !dmfabric_testkit::privileged_or_skip(
        "libxdps_default_program_takes_ipv6_and_tcp_from_the_interface",
        &[Need::Root],
    ) {
        return;
    }
    let r = share_the_interface(XdpProgram::LibxdpDefault);
    assert_eq!((r.echoes_before, r.echoes_after), (FRAMES, FRAMES));
    assert!(!r.ping6 && !r.tcp4 && !r.tcp6, "every frame went to the socket");
}

/// The test frames host 0 sends, each marked with its index at byte 20.
fn odd_frames(dst: [u8; 6], src: [u8; 6]) -> Vec<(&'static str, Vec<u8>)> {
    let frame = |ethertype: u16, len: usize, tag: u8| {
        let mut f = vec![0xA5u8; len];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        if len > 20 {
            f[20] = tag;
        }
        f
    };
    let mut vlan = frame(0x8100, 64, 5);
    vlan[14..16].copy_from_slice(&7u16.to_be_bytes());
    vlan[16..18].copy_from_slice(&ETHERTYPE_DMFABRIC.to_be_bytes());
    vec![
        // dmfabric frames that cannot be parsed: both must reach the socket.
        ("0x88B5, header only", frame(ETHERTYPE_DMFABRIC, 15, 0)),
        ("0x88B5, bad magic", frame(ETHERTYPE_DMFABRIC, 64, 1)),
        // Everything else belongs to the kernel.
        ("IPv4", frame(0x0800, 64, 2)),
        ("ARP", frame(0x0806, 64, 3)),
        ("0x88B6", frame(0x88B6, 64, 4)),
        ("VLAN-tagged 0x88B5", vlan),
    ]
}

/// Host 0 sends [`odd_frames`] over AF_PACKET; which of them does host 1's
/// AF_XDP socket (with `program`) receive?
fn odd_frames_received(program: XdpProgram) -> Vec<(&'static str, Vec<u8>)> {
    let net = TestNet::pair().expect("test net");
    let frames = odd_frames(net.host(1).mac.0, net.host(0).mac.0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (net, stop) = (&net, &stop);
        let receiver = s.spawn(move || {
            netns::enter(&net.host(1).ns).unwrap();
            let mut t = open_xdp(net, 1, program);
            ready_tx.send(()).unwrap();
            let mut got = Vec::new();
            // Until told to stop (bounded by the sender's timing below).
            let end = Instant::now() + Duration::from_secs(10);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                t.recv(64, &mut |f| got.push(f.to_vec())).unwrap();
                t.wait(Duration::from_millis(5)).unwrap();
            }
            got
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("host 1 ready");
        net.with_host(0, || {
            let mut t = PacketTransport::open(&net.host(0).iface).expect("open AF_PACKET");
            let mut batch = FrameBatch::new();
            for (_, f) in &frames {
                batch.push(f);
            }
            assert_eq!(t.send(&mut batch).unwrap(), frames.len());
        })
        .unwrap();
        // veth delivers at once; give the receiver time to see stragglers.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let got = receiver.join().unwrap();
        frames.into_iter().filter(|(_, f)| got.contains(f)).collect()
    })
}

#[test]
fn malformed_dmfabric_frames_reach_the_socket_and_other_ethertypes_never_do() {
    if !dmfabric_testkit::privileged_or_skip(
        "malformed_dmfabric_frames_reach_the_socket_and_other_ethertypes_never_do",
        &[Need::Root],
    ) {
        return;
    }
    let got = odd_frames_received(XdpProgram::Dmfabric);
    let names: Vec<_> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["0x88B5, header only", "0x88B5, bad magic"]);
    // Where the receive path counts them as malformed: the wire's checked
    // view refuses both (the server counts `malformed` by this error).
    assert_eq!(Frame::new_checked(&got[0].1).err(), Some(WireError::Truncated));
    assert!(Frame::new_checked(&got[1].1).is_err());

    // The same frames did reach host 1: libxdp's default program hands
    // every one of them to the socket.
    let all = odd_frames_received(XdpProgram::LibxdpDefault);
    assert_eq!(all.len(), 6, "{:?}", all.iter().map(|(n, _)| *n).collect::<Vec<_>>());
}
