//! A server placed by the control panel, driven frame by frame: it
//! forwards what another server holds, answers clients at the MACs the
//! control panel gave, refuses ids it does not know, and hands a device
//! over to another server with its state and its latest answers — in the
//! run-to-completion layout and with the models on worker shards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_control::model::{BlockImage, Change, ClientPlatform, Db, Device, Range, Vm};
use dmfabric_control::routing::{LiveRoutes, RoutingTable};
use dmfabric_control::store::RedbStore;
use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::FrameBatch;
use dmfabric_dm_workers::backend::{Backend, Inline};
use dmfabric_dm_workers::env::{DeviceEnv, ImageSpec};
use dmfabric_dm_workers::placement::{PlacementLink, Planner};
use dmfabric_dm_workers::server::Server;
use dmfabric_dm_workers::sharded::{Sharded, WorkerIdle};
use dmfabric_dm_workers::table::Devices;
use dmfabric_dm_workers::testing::{self, TestClient};
use dmfabric_wire::{AccessSize, Direction, EthernetRepr, FrameRepr, MacAddr, Message, NackReason, Space};

const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x03]);
const S10: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0a]);
const S11: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0b]);

use dmfabric_testkit::fixtures::{owner_and_io_server as db, regfile};

/// A 2-byte port access by client `c`'s VM 7 of `device` at `addr`.
fn access(c: &mut TestClient, device: u32, dir: Direction, addr: u64, data: u64) -> Vec<u8> {
    c.request(7, 0, device, Space::Pio, dir, AccessSize::B2, addr, data)
}

/// Client 3's path to a device on server `runs_on` through owner server 10:
/// a session with the server that runs the device, requests sent to the owner.
fn via_owner(runs_on: &mut TestServer, id: u16, mac: MacAddr) -> TestClient {
    let mut c = TestClient::new(3, CLIENT, id, mac);
    c.open(runs_on);
    c.server = 10;
    c.server_mac = S10;
    c
}

/// How a test server runs its models.
type MakeBackend = fn(&DeviceEnv) -> Box<dyn Backend>;

fn inline(env: &DeviceEnv) -> Box<dyn Backend> {
    Box::new(Inline::new(Devices::new(&[], env)))
}

fn sharded(env: &DeviceEnv) -> Box<dyn Backend> {
    let idle = WorkerIdle { spin: 1000, nap: Duration::from_micros(50) };
    Box::new(Sharded::start(&[], env, &[0, 0], idle).unwrap())
}

type TestServer = Server<Box<dyn Backend>>;

/// `f` in, and what comes out (the sharded backend answers from its
/// workers): at least `want` frames, waiting up to ten seconds for them.
fn feed_want(s: &mut TestServer, f: &[u8], want: usize) -> Vec<Vec<u8>> {
    let mut tx = FrameBatch::new();
    s.on_frame(f, &mut tx, Instant::now());
    let mut out: Vec<Vec<u8>> = tx.iter().map(<[u8]>::to_vec).collect();
    let end = Instant::now() + Duration::from_secs(10);
    while out.len() < want && Instant::now() < end {
        out.extend(poll(s));
    }
    out
}

/// `f` in, and what comes out at once.
fn feed(s: &mut TestServer, f: &[u8]) -> Vec<Vec<u8>> {
    feed_want(s, f, 0)
}

fn poll(s: &mut TestServer) -> Vec<Vec<u8>> {
    let mut tx = FrameBatch::new();
    s.on_poll(&mut tx, Instant::now());
    tx.iter().map(<[u8]>::to_vec).collect()
}

/// Poll until something comes out (or ten seconds passed: a loaded host
/// may keep a worker thread off its core that long).
fn poll_some(s: &mut TestServer) -> Vec<Vec<u8>> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let out = poll(s);
        if !out.is_empty() || Instant::now() > end {
            return out;
        }
    }
}

fn one(frames: &[Vec<u8>]) -> FrameRepr<'_> {
    assert_eq!(frames.len(), 1, "one frame out");
    FrameRepr::parse_bytes(&frames[0]).unwrap()
}

struct Pair {
    s10: TestServer,
    s11: TestServer,
    routes: [Arc<LiveRoutes>; 2],
    planners: [Planner; 2],
}

impl Pair {
    /// Both servers see table revision `revision` of `db`, planned.
    fn swap(&mut self, db: &Db, revision: u64) {
        for (r, p) in self.routes.iter().zip(&mut self.planners) {
            r.swap(RoutingTable::build(db, revision));
            p.plan();
        }
    }
}

fn pair(db: &Db, backend: MakeBackend) -> Pair {
    let routes = [0, 1].map(|_| Arc::new(LiveRoutes::new(RoutingTable::build(db, 1))));
    let make = |id: u16, mac: MacAddr, routes: &Arc<LiveRoutes>| {
        let (env, link) = (DeviceEnv::new(), PlacementLink::new());
        let keys = Box::new(|client| Ok(Some(testing::ring(client))));
        let planner = Planner::new(id, mac, routes.clone(), env.clone(), link.clone(), keys);
        let mut server = Server::placed(id, mac, env.clone(), backend(&env), link);
        // The first poll announces the server's epoch to its clients.
        let announced = poll(&mut server);
        assert!(announced.iter().all(|f| matches!(FrameRepr::parse_bytes(f).unwrap().msg, Message::Control(_))));
        (server, planner)
    };
    let (s10, p10) = make(10, S10, &routes[0]);
    let (s11, p11) = make(11, S11, &routes[1]);
    Pair { s10, s11, routes, planners: [p10, p11] }
}

#[test]
fn the_owner_forwards_and_the_io_server_answers_the_client_directly() {
    let mut p = pair(&db(), inline);
    let mut c = via_owner(&mut p.s11, 11, S11);
    // Device 2 is on server 11: the owner sends it on, with server 11's id, sealed again.
    let out = feed(&mut p.s10, &access(&mut c, 2, Direction::Write, 0x602, 0x1234));
    let fwd = one(&out);
    assert_eq!(fwd.eth, EthernetRepr { dst: S11, src: S10 });
    assert!(fwd.auth_tag.is_some());
    let Message::IoRequest(req) = fwd.msg else { panic!("{:?}", fwd.msg) };
    assert_eq!((req.route.server, req.route.client, req.route.device), (11, 3, 2));
    // The I/O server answers the client itself.
    let out = feed(&mut p.s11, &out[0]);
    let cmp = one(&out);
    assert_eq!(cmp.eth, EthernetRepr { dst: CLIENT, src: S11 });
    assert!(matches!(cmp.msg, Message::IoCompletion(c) if c.seq == req.seq && c.route.device == 2));
    // Device 0 = "whatever is at this address": forwarded as named, found there.
    let out = feed(&mut p.s10, &access(&mut c, 0, Direction::Read, 0x602, 0));
    assert!(matches!(one(&out).msg, Message::IoRequest(r) if r.route.device == 0 && r.route.server == 11));
    let out = feed(&mut p.s11, &out[0]);
    assert!(matches!(one(&out).msg, Message::IoCompletion(c) if c.route.device == 2 && c.data == 0x1234));
    // A VM the client does not run, a device the records do not have: refused.
    let mut eight = access(&mut c, 1, Direction::Read, 0x500, 0);
    let refused = |s: &mut TestServer, f: &[u8]| match one(&feed(s, f)).msg {
        Message::Nack(n) => n.reason,
        other => panic!("{other:?}"),
    };
    eight = {
        let mut r = FrameRepr::parse_bytes(&eight).unwrap();
        if let Message::IoRequest(q) = &mut r.msg {
            q.route.vm = 8;
        }
        c.seal(r.msg)
    };
    assert_eq!(refused(&mut p.s10, &eight), NackReason::UnknownVm);
    assert_eq!(refused(&mut p.s10, &access(&mut c, 9, Direction::Read, 0x500, 0)), NackReason::UnknownDevice);
    // A client platform the records do not have: no key, no answer at all.
    let mut stranger = TestClient::new(4, MacAddr([2, 0, 0, 0, 0, 4]), 10, S10);
    assert!(feed(&mut p.s10, &access(&mut stranger, 1, Direction::Read, 0x500, 0)).is_empty());
    let st = p.s10.stats();
    assert_eq!((st.forwarded, st.nack_unknown_vm, st.nack_unknown_device), (2, 1, 1));
    assert_eq!(st.unauthenticated, vec![("unknown_key", 1)]);
    assert_eq!(st.completions, 0, "the owner ran nothing");
}

#[test]
fn a_device_moves_with_its_state_and_its_latest_answer() {
    moves_with_its_state(inline);
}

#[test]
fn a_device_moves_between_sharded_servers_too() {
    moves_with_its_state(sharded);
}

fn moves_with_its_state(backend: MakeBackend) {
    /// Removes the store file, also when the test fails.
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            let mut poked = self.0.clone().into_os_string();
            poked.push(".changed");
            let _ = std::fs::remove_file(poked);
        }
    }
    // One file per run: the inline and sharded runs go in parallel in one process.
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = Remove(std::env::temp_dir().join(format!("dmfabric-placed-{}-{run}.redb", std::process::id())));
    let _ = std::fs::remove_file(&path.0);
    let store = RedbStore::open(&path.0).unwrap();
    let mut d = db();
    let mut p = pair(&d, backend);
    let mut c = via_owner(&mut p.s10, 10, S10);
    // Device 1 on server 10 gets a value.
    let write = access(&mut c, 1, Direction::Write, 0x504, 0xbeef);
    assert!(matches!(one(&feed_want(&mut p.s10, &write, 1)).msg, Message::IoCompletion(_)));
    // The control panel moves it to server 11; server 11 sees the table first.
    d.apply(&[Change::UpdateDevice(regfile(1, 11, 0x500))]).unwrap();
    p.swap(&d, 2);
    assert!(poll(&mut p.s11).is_empty());
    // Server 10 lets go (its planner will write the state) and forwards from now on.
    let end = Instant::now() + Duration::from_secs(10);
    while p.s10.stats().devices_left == 0 && Instant::now() < end {
        poll(&mut p.s10);
    }
    // The write's completion was lost: its retransmission goes to server 11 and waits there.
    let out = feed_want(&mut p.s10, &write, 1);
    assert!(matches!(one(&out).msg, Message::IoRequest(r) if r.route.server == 11));
    assert!(feed_want(&mut p.s11, &out[0], 0).is_empty(), "held until the state is there");
    p.planners[0].step(&store).unwrap();
    p.planners[1].step(&store).unwrap();
    // The held retransmission is answered from the cache that came along: not run again.
    let out = poll_some(&mut p.s11);
    let cmp = one(&out);
    assert_eq!(cmp.eth.dst, CLIENT);
    assert!(matches!(cmp.msg, Message::IoCompletion(c) if c.data == 0xbeef));
    // What server 10 wrote is there; the stream goes on at server 11 in
    // the session it started in.
    let out = feed_want(&mut p.s10, &access(&mut c, 1, Direction::Read, 0x504, 0), 1);
    let out = feed_want(&mut p.s11, &out[0], 1);
    assert!(matches!(one(&out).msg, Message::IoCompletion(c) if c.data == 0xbeef));
    let (st10, st11) = (p.s10.finish().0, p.s11.finish().0);
    assert_eq!((st10.devices_left, st11.devices_arrived, st11.held, st11.duplicates_answered), (1, 1, 1, 1));
    let dev1 = st11.devices.iter().find(|c| c.id == 1 && !c.gone).unwrap();
    assert_eq!((dev1.writes, dev1.reads), (0, 1), "the write ran once, on server 10");
}

#[test]
fn interrupts_follow_a_vm_to_its_new_client_platform() {
    const CLIENT4: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x04]);
    let mut d = db();
    d.apply(&[
        Change::AddClient(ClientPlatform {
            id: 4,
            mac: "02:00:00:00:00:04".into(),
            hypervisor: 1,
            hypervisor_kind: "kvm".into(),
        }),
        Change::AddDevice(Device {
            id: 3,
            kind: "irqtest".into(),
            ranges: vec![Range { mmio: false, base: 0x700, len: 8 }],
            irqs: vec![5],
            ..regfile(3, 10, 0)
        }),
    ])
    .unwrap();
    let mut p = pair(&d, inline);
    let mut c3 = TestClient::new(3, CLIENT, 10, S10);
    c3.open(&mut p.s10);
    let pulse = |c: &mut TestClient| c.outl(7, 3, 0x700, 1);
    // (destination, client platform, sequence number) of the interrupts sent.
    let interrupts = |frames: &[Vec<u8>]| -> Vec<(MacAddr, u16, u64)> {
        frames
            .iter()
            .filter_map(|f| match FrameRepr::parse_bytes(f).unwrap() {
                FrameRepr { eth, msg: Message::Interrupt(i), .. } => Some((eth.dst, i.route.client, i.seq)),
                _ => None,
            })
            .collect()
    };
    // Two pulses from client platform 3: the first goes out (and is not
    // acknowledged: platform 3 holds the VM to save it), the second waits.
    assert!(matches!(one(&feed(&mut p.s10, &pulse(&mut c3))).msg, Message::IoCompletion(_)));
    let sent = interrupts(&poll(&mut p.s10));
    assert_eq!(sent.iter().map(|i| (i.0, i.1)).collect::<Vec<_>>(), vec![(CLIENT, 3)]);
    feed(&mut p.s10, &pulse(&mut c3));
    assert_eq!(interrupts(&poll(&mut p.s10)), vec![], "stop-and-wait");
    // VM 7 moves to client platform 4, which opens its session here: both go there, in order.
    let moved = Vm { client: 4, ..d.vms[&7].clone() };
    d.apply(&[Change::UpdateVm(moved)]).unwrap();
    p.swap(&d, 2);
    let mut c4 = TestClient::new(4, CLIENT4, 10, S10);
    assert!(interrupts(&poll(&mut p.s10)).is_empty(), "no session of platform 4 yet");
    c4.open(&mut p.s10);
    let first = interrupts(&poll(&mut p.s10));
    assert_eq!(first.iter().map(|i| (i.0, i.1)).collect::<Vec<_>>(), vec![(CLIENT4, 4)]);
    let route = dmfabric_wire::Route { server: 10, hypervisor: 1, client: 4, vm: 7, vcpu: 0, device: 3 };
    feed(&mut p.s10, &c4.ack(route, first[0].2));
    let second = interrupts(&poll(&mut p.s10));
    assert_eq!(second.iter().map(|i| (i.0, i.1)).collect::<Vec<_>>(), vec![(CLIENT4, 4)]);
    assert_eq!(second[0].2, first[0].2 + 1, "the next in order");
    assert_eq!(p.s10.stats().interrupt_acks, 1);
    // And the VM's requests from there are answered there; platform 3,
    // which has no VM served here any more, is not listened to.
    let out = feed(&mut p.s10, &pulse(&mut c4));
    assert_eq!(one(&out).eth.dst, CLIENT4);
    assert!(feed(&mut p.s10, &pulse(&mut c3)).is_empty());
    assert_eq!(p.s10.stats().unauthenticated, vec![("unknown_key", 1)]);
}

#[test]
fn a_uart_placed_on_a_running_server_gets_a_console() {
    let mut d = db();
    let mut p = pair(&d, inline);
    let mut c = TestClient::new(3, CLIENT, 10, S10);
    c.open(&mut p.s10);
    assert!(p.s10.env().consoles.all().is_empty());
    d.apply(&[Change::AddDevice(Device {
        id: 5,
        kind: "uart".into(),
        ranges: vec![Range { mmio: false, base: 0x3f8, len: 8 }],
        irqs: vec![4],
        ..regfile(5, 10, 0)
    })])
    .unwrap();
    p.swap(&d, 2);
    poll(&mut p.s10);
    let out =
        feed(&mut p.s10, &c.request(7, 0, 5, Space::Pio, Direction::Write, AccessSize::B1, 0x3f8, u64::from(b'x')));
    assert!(matches!(one(&out).msg, Message::IoCompletion(_)));
    let console = p.s10.env().consoles.of_vm(7).expect("the UART's console, served with the others");
    let mut got = Vec::new();
    console.drain_output(&mut got);
    assert_eq!(got, b"x");
}

/// A virtio-blk of VM 7 on `server`, its image `path`, read-only.
fn virtio_blk(id: u32, server: u16, base: u64, path: &std::path::Path) -> Device {
    Device {
        id,
        kind: "virtio-blk".into(),
        ranges: vec![Range { mmio: true, base, len: 0x200 }],
        irqs: vec![10],
        image: Some(BlockImage { path: path.to_str().unwrap().into(), read_only: true }),
        ..regfile(id, server, 0)
    }
}

#[test]
fn a_placed_virtio_blk_is_given_its_image_here_and_where_it_moves() {
    let dir = std::env::temp_dir().join(format!("dmfabric-placed-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("vm7.img");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let mut d = db();
    d.apply(&[Change::AddDevice(virtio_blk(6, 10, 0xfeb0_0000, &img))]).unwrap();
    // Placed at start: set before its model was built.
    let mut p = pair(&d, inline);
    let want = ImageSpec { path: img.clone(), read_only: true };
    assert_eq!(p.s10.env().images.get(6), Some(want.clone()));
    assert_eq!(p.s11.env().images.get(6), None, "not placed there");
    assert_eq!(p.s10.env().images.get(1), None, "a register file has none");
    // Moved: the server it moves to opens the same path (shared storage).
    d.apply(&[Change::UpdateDevice(virtio_blk(6, 11, 0xfeb0_0000, &img))]).unwrap();
    p.swap(&d, 2);
    assert_eq!(p.s11.env().images.get(6), Some(want));
    // Placed on a running server, an image that is not there: still set
    // (it runs as an empty drive, counted; the planner said why).
    let failed = p.s10.env().images.failed();
    let missing = dir.join("not-there.img");
    d.apply(&[Change::AddDevice(virtio_blk(8, 10, 0xfeb0_0200, &missing))]).unwrap();
    p.swap(&d, 3);
    let got = p.s10.env().images.get(8).unwrap();
    assert_eq!(got.path, missing);
    assert_eq!(p.s10.env().images.failed(), failed + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A keys read that fails (etcd just back, its connection not up again)
/// keeps the keys the planner had: the client platform's frames are still
/// answered under a new table, and the planner asks to run again soon,
/// until the keys can be read.
#[test]
fn a_failed_keys_read_keeps_the_keys_in_use() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let db1 = db();
    let routes = Arc::new(LiveRoutes::new(RoutingTable::build(&db1, 1)));
    let (env, link) = (DeviceEnv::new(), PlacementLink::new());
    let fail = Arc::new(AtomicBool::new(false));
    let failing = fail.clone();
    let keys = Box::new(move |client| {
        if failing.load(Ordering::SeqCst) {
            Err("Unknown: transport error: broken pipe".to_string())
        } else {
            Ok(Some(testing::ring(client)))
        }
    });
    let mut planner = Planner::new(11, S11, routes.clone(), env.clone(), link.clone(), keys);
    let mut s11: TestServer = Server::placed(11, S11, env.clone(), inline(&env), link);
    poll(&mut s11);
    let mut c = TestClient::new(3, CLIENT, 11, S11);
    c.open(&mut s11);
    let answered = |s: &mut TestServer, c: &mut TestClient, data: u64| {
        let out = feed(s, &access(c, 2, Direction::Write, 0x602, data));
        matches!(one(&out).msg, Message::IoCompletion(_))
    };
    assert!(answered(&mut s11, &mut c, 1));
    let store_dir = std::env::temp_dir().join(format!("dmfabric-keys-retry-{}", std::process::id()));
    std::fs::create_dir_all(&store_dir).unwrap();
    let store = RedbStore::open(&store_dir.join("s.redb")).unwrap();
    // A new table while the keys cannot be read.
    fail.store(true, Ordering::SeqCst);
    let mut db2 = db1.clone();
    db2.apply(&[Change::AddDevice(regfile(3, 11, 0x700))]).unwrap();
    routes.swap(RoutingTable::build(&db2, 2));
    let again = planner.step(&store).unwrap();
    assert_eq!(again, Some(dmfabric_dm_workers::placement::KEYS_RETRY), "asks again soon");
    poll(&mut s11); // the loop takes the plan in
    assert!(answered(&mut s11, &mut c, 2), "the keys it had are kept");
    // Readable again: the next step plans with them and asks for nothing more.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(planner.step(&store).unwrap(), None);
    assert!(answered(&mut s11, &mut c, 3));
    let _ = std::fs::remove_dir_all(&store_dir);
}
