//! The trust boundary, attacked as the issue tried it: a third network
//! namespace on the bridge, a raw socket, no keys. Each test is one attack
//! class against a real `dmfabric server` (and a real client and KVM guest
//! where the client is the target), and checks that it changed nothing.
//!
//! Hosts: 0 the client platform (3), 1 the server, 2 the attacker (its
//! bridge port does not learn, as with port security, so frames it sends
//! with the client's source MAC cannot pull the client's traffic to it).
//! Client platform 4, with a key of its own, lives at the attacker's MAC:
//! a genuine client naming another client's VM.

use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{ChildGuard, TestNet, TestNetConfig, HOST_IFACE};
use dmfabric_dataplane::packet::PacketTransport;
use dmfabric_dataplane::{FrameBatch, Transport};
use dmfabric_dm_workers::testing::TestClient;
use dmfabric_testkit::Need;
use dmfabric_wire::session::{HelloReplyBody, Seq, CHALLENGE_LEN};
use dmfabric_wire::{
    AccessSize, ControlMsg, ControlOp, Direction, EthernetRepr, FrameRepr, Interrupt, IoCompletion, IoRequest,
    IrqSource, Kind, Message, Nack, NackReason, Route, Space, Status, Trigger, LIFECYCLE_RESET,
};

mod common;
use common::{wait_for, Keys, BIN};

/// The register-file test device and a port of it.
const REGFILE: u32 = 1;
const PORT: u64 = 0x500;

struct Rig {
    net: TestNet,
    keys: Keys,
    server: ChildGuard,
    rx: mpsc::Receiver<String>,
}

impl Rig {
    fn start(name: &str) -> Option<Rig> {
        if !dmfabric_testkit::privileged_or_skip(name, &[Need::Root]) {
            return None;
        }
        let net = TestNet::new(TestNetConfig { hosts: 3, ..TestNetConfig::default() }).unwrap();
        net.set_port_learning(2, false).unwrap();
        let keys = Keys::new(name, net.host(0).mac, &[(3, &[(1, 1)])]);
        // Client platform 4 at the attacker's MAC, with VM 2.
        dmfabric_testkit::keys::write_key_file(&keys.dir.join("client-4.key"), 4).unwrap();
        let mut list = std::fs::read_to_string(keys.clients()).unwrap();
        list.push_str(&format!(
            "[[client]]\nid = 4\nmac = \"{}\"\nkey_file = \"client-4.key\"\nvms = [{{ id = 2, vcpus = 1 }}]\n",
            net.host(2).mac
        ));
        std::fs::write(keys.clients(), list).unwrap();
        let clients = keys.clients();
        let (server, rx) = common::spawn_logged(
            &net,
            1,
            &[
                "server",
                "--transport",
                "xdp",
                "--iface",
                HOST_IFACE,
                "--clients",
                &clients,
                "--irq-test-devices",
                "0",
                "--stats-json",
                "--busy-poll",
                "--cores",
                "1",
            ],
        );
        wait_for(&rx, "dmfabric server ready").expect("server ready");
        Some(Rig { net, keys, server, rx })
    }

    /// An AF_PACKET socket on host `i`.
    fn socket(&self, i: usize) -> PacketTransport {
        self.net.with_host(i, || PacketTransport::open(HOST_IFACE).expect("AF_PACKET")).unwrap()
    }

    /// Client platform `id` speaking from host `i`, with a session open.
    fn client(&self, id: u16, i: usize) -> Speaker {
        let mut s =
            Speaker { t: self.socket(i), c: TestClient::new(id, self.net.host(i).mac, 1, self.net.host(1).mac) };
        s.open();
        s
    }

    /// Stop the server; its final counters.
    fn finish(self) -> serde_json::Value {
        self.finish_with_transport().0
    }

    /// Stop the server; its final counters and its transport's.
    fn finish_with_transport(mut self) -> (serde_json::Value, serde_json::Value) {
        assert!(self.server.interrupt(Duration::from_secs(5)).unwrap().success());
        let lines = wait_for(&self.rx, "stats-json: ").unwrap_or_else(|l| panic!("{l:?}"));
        let line = lines.iter().find_map(|l| l.strip_prefix("stats-json: ")).unwrap();
        let _ = &self.keys;
        let v = serde_json::from_str::<serde_json::Value>(line).unwrap();
        (v["server"].clone(), v["transport"].clone())
    }
}

/// A client platform played by the test: it seals as the real one does.
struct Speaker {
    t: PacketTransport,
    c: TestClient,
}

impl Speaker {
    fn send(&mut self, frame: &[u8]) {
        let mut b = FrameBatch::new();
        b.push(frame);
        self.t.send(&mut b).unwrap();
    }

    /// Frames that arrive within `within`.
    fn recv_for(&mut self, within: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let end = Instant::now() + within;
        while Instant::now() < end {
            self.t.recv(64, &mut |f| out.push(f.to_vec())).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        out
    }

    /// Hello, its answer, Register: returns the Hello sent.
    fn open(&mut self) -> Vec<u8> {
        let hello = self.c.hello(0x33);
        for _ in 0..20 {
            self.send(&hello);
            for f in self.recv_for(Duration::from_millis(100)) {
                if self.c.take_reply(&f, 0x33) {
                    let reg = self.c.register();
                    self.send(&reg);
                    return hello;
                }
            }
        }
        panic!("no answer to the Hello of client {}", self.c.id);
    }

    /// The answer to `req` (a frame from it), sent and re-sent until one comes.
    fn ask(&mut self, req: &[u8]) -> Message<'static> {
        let want = FrameRepr::parse_bytes(req).unwrap().msg.seq();
        for _ in 0..20 {
            self.send(req);
            for f in self.recv_for(Duration::from_millis(50)) {
                let f: &'static [u8] = Box::leak(f.into_boxed_slice());
                match FrameRepr::parse_bytes(f).map(|r| r.msg) {
                    Ok(m @ (Message::IoCompletion(_) | Message::Nack(_))) if m.seq() == want => return m,
                    _ => {}
                }
            }
        }
        panic!("no answer to {:?}", FrameRepr::parse_bytes(req).unwrap().msg);
    }

    fn write(&mut self, vm: u32, data: u64) -> Vec<u8> {
        self.c.request(vm, 0, REGFILE, Space::Pio, Direction::Write, AccessSize::B4, PORT, data)
    }

    fn read(&mut self, vm: u32) -> u64 {
        let req = self.c.request(vm, 0, REGFILE, Space::Pio, Direction::Read, AccessSize::B4, PORT, 0);
        match self.ask(&req) {
            Message::IoCompletion(c) => c.data,
            other => panic!("{other:?}"),
        }
    }
}

/// A request of client 3's VM 1 to the register file, from the client's
/// MAC to the server's, as a forger makes it: every field right, the tag
/// made up (or none).
fn forged_request(rig: &Rig, seq: u64, data: u64, tag: Option<[u8; 16]>) -> Vec<u8> {
    let req = IoRequest {
        route: Route { server: 1, hypervisor: 1, client: 3, vm: 1, vcpu: 0, device: REGFILE },
        seq,
        space: Space::Pio,
        dir: Direction::Write,
        size: AccessSize::B4,
        addr: PORT,
        data,
    };
    let mut repr =
        FrameRepr::new(EthernetRepr { dst: rig.net.host(1).mac, src: rig.net.host(0).mac }, Message::IoRequest(req));
    repr.auth_tag = tag;
    repr.key_id = 1;
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut buf).unwrap();
    buf
}

fn raw_send(t: &mut PacketTransport, frames: &[Vec<u8>]) {
    let mut b = FrameBatch::new();
    for f in frames {
        if !b.push(f) {
            t.send(&mut b).unwrap();
            b.push(f);
        }
    }
    t.send(&mut b).unwrap();
}

#[test]
fn a_forged_request_changes_no_register_and_gets_no_reply() {
    let Some(rig) = Rig::start("attack-forged-request") else { return };
    let mut client = rig.client(3, 0);
    let w = client.write(1, 0x1111);
    assert!(matches!(client.ask(&w), Message::IoCompletion(_)));
    let mut attacker = rig.socket(2);
    // Made-up tags, no tag, every sequence number a stream could want (the
    // next, the one after, a huge one that would make the rest stale).
    let next = Seq::new(client.c.session, 1).0;
    let mut forged = Vec::new();
    for (i, seq) in [next, next + 1, u64::MAX, Seq::new(client.c.session, u32::MAX).0].into_iter().enumerate() {
        forged.push(forged_request(&rig, seq, 0xbad0 + i as u64, Some([i as u8; 16])));
        forged.push(forged_request(&rig, seq, 0xbad0 + i as u64, None));
    }
    raw_send(&mut attacker, &forged);
    let mut heard = Vec::new();
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        attacker.recv(64, &mut |f| heard.push(f.to_vec())).unwrap();
    }
    assert!(heard.is_empty(), "the forger is answered nothing");
    // The register holds the client's value, and the stream goes on (not poisoned).
    assert_eq!(client.read(1), 0x1111);
    let stats = rig.finish();
    assert_eq!(stats["unauthenticated"], serde_json::json!([["no_tag", 4], ["bad_tag", 4]]), "{stats}");
    assert_eq!(stats["completions"], 2, "{stats}");
}

#[test]
fn a_replayed_hello_and_a_replayed_write_have_no_effect() {
    let Some(rig) = Rig::start("attack-replay") else { return };
    let mut client = rig.client(3, 0);
    // What a recorder of the link has: the client's Hello (broadcast) and
    // its writes, byte for byte.
    let hello = client.c.hello(0x44);
    client.send(&hello);
    let first = client.write(1, 0x1111);
    assert!(matches!(client.ask(&first), Message::IoCompletion(_)));
    let second = client.write(1, 0x2222);
    assert!(matches!(client.ask(&second), Message::IoCompletion(_)));
    let mut attacker = rig.socket(2);
    for _ in 0..3 {
        raw_send(&mut attacker, &[hello.clone(), first.clone()]);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old write did not run again, and the Hellos wiped nothing: the
    // client's stream goes on in its session.
    assert_eq!(client.read(1), 0x2222);
    let stats = rig.finish();
    assert_eq!(stats["stale"], 3, "the replayed write, each time: {stats}");
    assert_eq!(stats["completions"], 3, "two writes and the read: {stats}");
}

#[test]
fn a_client_naming_another_clients_vm_is_refused() {
    let Some(rig) = Rig::start("attack-other-vm") else { return };
    let mut owner = rig.client(3, 0);
    let w = owner.write(1, 0x3333);
    assert!(matches!(owner.ask(&w), Message::IoCompletion(_)));
    // Client platform 4 has a key of its own, and VM 2: not VM 1.
    let mut other = rig.client(4, 2);
    let write = other.write(1, 0x4444);
    assert!(matches!(other.ask(&write), Message::Nack(Nack { reason: NackReason::UnknownVm, .. })));
    // Claiming to be client 3 with its own key fails the tag; the register stays.
    let mut as_three = other.write(2, 0x5555);
    as_three[14 + 12..14 + 14].copy_from_slice(&3u16.to_be_bytes());
    other.send(&as_three);
    assert_eq!(owner.read(1), 0x3333);
    let stats = rig.finish();
    assert!(stats["nack_unknown_vm"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["unauthenticated"], serde_json::json!([["bad_tag", 1]]), "{stats}");
}

/// The server's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_million_forged_stream_ids_grow_the_server_by_less_than_a_mib() {
    let Some(mut rig) = Rig::start("attack-million") else { return };
    let mut client = rig.client(3, 0);
    let w = client.write(1, 0x6666);
    assert!(matches!(client.ask(&w), Message::IoCompletion(_)));
    let pid = rig.server.child().id();
    let before = rss_kib(pid);
    let mut attacker = rig.socket(2);
    const N: u32 = 1_000_000;
    let (dst, src) = (rig.net.host(1).mac, rig.net.host(2).mac);
    let mut batch = FrameBatch::new();
    let mut sent = 0u64;
    let start = Instant::now();
    for i in 0..N {
        // Every id different: client (registered ones included), VM, vCPU,
        // device, sequence number; a made-up tag.
        let req = IoRequest {
            route: Route {
                server: 1,
                hypervisor: 1,
                client: (i % 5) as u16,
                vm: i,
                vcpu: (i % 251) as u16,
                device: i.rotate_left(7),
            },
            seq: u64::from(i) << 20 | 1,
            space: Space::Pio,
            dir: Direction::Write,
            size: AccessSize::B4,
            addr: PORT,
            data: u64::from(i),
        };
        let mut repr = FrameRepr::new(EthernetRepr { dst, src }, Message::IoRequest(req));
        repr.auth_tag = Some([(i >> 3) as u8; 16]);
        repr.key_id = 1;
        if !batch.push_with(|buf| repr.emit(buf).ok()) {
            sent += attacker.send(&mut batch).unwrap() as u64;
            batch.push_with(|buf| repr.emit(buf).ok());
        }
        // Paced a little: the point is the state, not the link's drops.
        if i % 1024 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    sent += attacker.send(&mut batch).unwrap() as u64;
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    // The real client is served as before.
    assert_eq!(client.read(1), 0x6666);
    let (stats, transport) = rig.finish_with_transport();
    let dropped: u64 = stats["unauthenticated"].as_array().unwrap().iter().map(|r| r[1].as_u64().unwrap()).sum();
    let ring = transport["rx_dropped"].as_u64().unwrap();
    eprintln!(
        "{sent} forged frames in {took:?}; server RSS {before} -> {after} KiB; {dropped} dropped at the tag, {ring} by the AF_XDP ring"
    );
    assert!(after.saturating_sub(before) < 1024, "server RSS grew {before} -> {after} KiB");
    assert!(dropped >= 100_000, "a good part reached the server's tag check: {dropped} of {sent}");
    assert!(dropped + ring >= sent * 95 / 100, "accounted for: {dropped} + {ring} of {sent}");
    assert_eq!(stats["completions"], 2, "{stats}");
    assert_eq!(stats["nack_unknown_vm"], 0, "no forged frame got as far as an answer: {stats}");
}

#[test]
fn forged_interrupts_resets_nacks_and_hello_replies_do_not_reach_a_running_vm() {
    let Some(rig) = Rig::start("attack-client") else { return };
    if !dmfabric_testkit::privileged_or_skip("attack-client", &[Need::Kvm]) {
        return;
    }
    // Client platform 3 runs VM 1: io_loop against the register file, its
    // map allowing line 5 of device 1 (so a forgery names a real grant).
    let config = rig.keys.dir.join("client.toml");
    let iterations = 20_000u64;
    std::fs::write(
        &config,
        format!(
            "client = 3\nkey_file = \"client-3.key\"\nrun_seconds = 60\n[link]\niface = \"{HOST_IFACE}\"\n\
             [[vm]]\nid = 1\nguest = \"io_loop\"\nargs = [{iterations}, {PORT:#x}, 0]\n\
             [[vm.device]]\nspace = \"pio\"\nbase = {PORT:#x}\nlen = 0x100\nserver = 1\ndevice = {REGFILE}\nirq = [5]\nreset = true\n"
        ),
    )
    .unwrap();
    let json = rig.keys.dir.join("client.json");
    let mut cmd = rig.net.command(0, BIN);
    cmd.args(["client", "--config"]).arg(&config).arg("--json").arg(&json);
    let client = rig.net.spawn(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped())).unwrap();
    // While it runs: from the attacker, with the server's MAC and ids and
    // made-up tags (and none), every kind a client takes.
    let (dst, src) = (rig.net.host(0).mac, rig.net.host(1).mac);
    let route = Route { server: 1, hypervisor: 1, client: 3, vm: 1, vcpu: 0, device: REGFILE };
    let reset = [LIFECYCLE_RESET];
    let body = HelloReplyBody::new([0; CHALLENGE_LEN], 0xdead, 77);
    let mut frames = Vec::new();
    for n in 0..50u32 {
        let seq = Seq::new(n.wrapping_mul(7919), n).0;
        let msgs = [
            Message::Interrupt(Interrupt { route, seq, source: IrqSource::Line(5), trigger: Trigger::Edge }),
            Message::Interrupt(Interrupt {
                route,
                seq: u64::MAX,
                source: IrqSource::Msi { address: 0xfee0_0000, data: 0x4400 },
                trigger: Trigger::Edge,
            }),
            Message::Control(ControlMsg { route, seq, op: ControlOp::Lifecycle, payload: &reset }),
            Message::Nack(Nack { route, seq, reason: NackReason::WrongServer, nacked: Kind::IoRequest }),
            Message::Control(ControlMsg { route, seq: 0, op: ControlOp::HelloReply, payload: body.bytes() }),
            Message::IoCompletion(IoCompletion {
                route,
                seq,
                space: Space::Pio,
                dir: Direction::Read,
                size: AccessSize::B4,
                addr: PORT,
                data: 0xbad,
                status: Status::Ok,
            }),
        ];
        for (i, msg) in msgs.into_iter().enumerate() {
            let mut repr = FrameRepr::new(EthernetRepr { dst, src }, msg);
            if i % 2 == 0 {
                repr.auth_tag = Some([n as u8; 16]);
                repr.key_id = 1;
            }
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf).unwrap();
            frames.push(buf);
        }
    }
    let mut attacker = rig.socket(2);
    let end = Instant::now() + Duration::from_secs(30);
    let mut rounds = 0;
    let mut client = client;
    while client.child().try_wait().unwrap().is_none() && Instant::now() < end {
        raw_send(&mut attacker, &frames);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = client.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(rounds > 0, "the attack ran while the VM did");
    // The guest finished with the right checksum: no completion, Nack or
    // reset was taken; nothing was injected.
    let sum = dmfabric_vmm_shim::guests::io_loop_checksum(iterations);
    let want = format!("VM 1 vCPU 0: reported {:#x} {:#x}", sum as u32, (sum >> 32) as u32);
    assert!(stderr.contains(&want), "{want} in {stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let c = &report["client"];
    assert_eq!(
        (c["interrupts"].as_u64(), c["resets"].as_u64(), c["nacks"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{c}"
    );
    assert_eq!(c["sessions_reopened"], 0, "{c}");
    assert!(c["unauthenticated"].as_u64().unwrap() >= 300, "every forgery counted: {c}");
    let _ = rig.finish();
}
