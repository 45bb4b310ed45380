//! A client platform as tests drive a server with it (feature `testing`,
//! and this crate's own tests): a registry entry with the test key of
//! fixed test secrets (`dmfabric_wire::auth::testing`), an opened session, and
//! sealed requests numbered as a real client numbers them.

use std::collections::HashMap;
use std::time::Instant;

use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::FrameBatch;
pub use dmfabric_wire::auth::testing::{ring, secret};
use dmfabric_wire::session::{HelloBody, HelloReplyBody, Seq, CHALLENGE_LEN};
use dmfabric_wire::{
    AccessSize, ControlMsg, ControlOp, Direction, EthernetRepr, FrameRepr, InterruptAck, IoRequest, MacAddr, Message,
    Route, Space,
};

use crate::peers::{Client, Registry};

/// A registry entry for client platform `id` at `mac` running `vms` (id, vCPUs).
pub fn client(id: u16, mac: MacAddr, vms: &[(u32, u16)]) -> Client {
    Client { id, mac, hypervisor: 1, keys: ring(id), vms: vms.to_vec() }
}

/// A registry of `clients` and no other server.
pub fn registry(clients: Vec<Client>) -> Registry {
    Registry::new(clients, Vec::new(), HashMap::new())
}

/// One client platform talking to one server.
#[derive(Debug, Clone)]
pub struct TestClient {
    pub id: u16,
    pub mac: MacAddr,
    pub server: u16,
    pub server_mac: MacAddr,
    pub session: u32,
    pub epoch: u32,
    /// The next counter of each (VM, vCPU, device) stream.
    next: HashMap<(u32, u16, u32), u32>,
}

impl TestClient {
    pub fn new(id: u16, mac: MacAddr, server: u16, server_mac: MacAddr) -> TestClient {
        TestClient { id, mac, server, server_mac, session: 0, epoch: 0, next: HashMap::new() }
    }

    /// `msg` sealed with this client's key, naming the server's epoch.
    pub fn seal(&self, msg: Message<'_>) -> Vec<u8> {
        let mut repr = FrameRepr::new(EthernetRepr { dst: self.server_mac, src: self.mac }, msg);
        repr.epoch = self.epoch;
        let mut buf = vec![0u8; repr.sealed_len()];
        let n = repr.emit_sealed(&mut buf, &ring(self.id).sending()).unwrap_or(0);
        buf.truncate(n);
        buf
    }

    /// A Hello with challenge bytes `c`.
    pub fn hello(&self, c: u8) -> Vec<u8> {
        let body = HelloBody { challenge: [c; CHALLENGE_LEN] };
        let route = Route { client: self.id, hypervisor: 1, server: self.server, ..Route::default() };
        self.seal(Message::Control(ControlMsg { route, seq: 1, op: ControlOp::Hello, payload: body.bytes() }))
    }

    /// Say Hello to `server`, take the session it offers (its answer must
    /// come at once) and start using it (a Register), as a client does.
    pub fn open(&mut self, server: &mut impl Handler) {
        let mut tx = FrameBatch::new();
        server.on_frame(&self.hello(0x42), &mut tx, Instant::now());
        let offered = tx.iter().find_map(|f| match FrameRepr::parse_bytes(f) {
            Ok(FrameRepr { msg: Message::Control(c), .. }) => {
                HelloReplyBody::parse(c.payload).filter(|b| b.challenge == [0x42; CHALLENGE_LEN])
            }
            _ => None,
        });
        let Some(body) = offered else { panic!("the server did not answer the Hello") };
        self.session = body.session.get();
        self.epoch = body.epoch.get() as u32;
        self.next.clear();
        server.on_frame(&self.register(), &mut tx, Instant::now());
    }

    /// Take the session a HelloReply in `frame` offers for our Hello with
    /// challenge bytes `c`; false if `frame` is not that answer.
    pub fn take_reply(&mut self, frame: &[u8], c: u8) -> bool {
        let Ok(FrameRepr { msg: Message::Control(m), .. }) = FrameRepr::parse_bytes(frame) else { return false };
        let Some(body) = HelloReplyBody::parse(m.payload).filter(|b| b.challenge == [c; CHALLENGE_LEN]) else {
            return false;
        };
        self.session = body.session.get();
        self.epoch = body.epoch.get() as u32;
        self.next.clear();
        true
    }

    /// The Register that starts using the session.
    pub fn register(&self) -> Vec<u8> {
        let route = Route { client: self.id, hypervisor: 1, server: self.server, ..Route::default() };
        let seq = Seq::new(self.session, 0).0;
        self.seal(Message::Control(ControlMsg { route, seq, op: ControlOp::Register, payload: &[] }))
    }

    /// The next request of the stream (`vm`, `vcpu`, `device`).
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        vm: u32,
        vcpu: u16,
        device: u32,
        space: Space,
        dir: Direction,
        size: AccessSize,
        addr: u64,
        data: u64,
    ) -> Vec<u8> {
        let n = self.next.entry((vm, vcpu, device)).or_insert(0);
        let seq = Seq::new(self.session, *n).0;
        *n += 1;
        let route = Route { server: self.server, hypervisor: 1, client: self.id, vm, vcpu, device };
        self.seal(Message::IoRequest(IoRequest { route, seq, space, dir, size, addr, data }))
    }

    /// A 4-byte port write of `data` at `addr` by vCPU 0 of `vm`.
    pub fn outl(&mut self, vm: u32, device: u32, addr: u64, data: u64) -> Vec<u8> {
        self.request(vm, 0, device, Space::Pio, Direction::Write, AccessSize::B4, addr, data)
    }

    /// The ack of an interrupt (or reset) `route`/`seq`.
    pub fn ack(&self, route: Route, seq: u64) -> Vec<u8> {
        self.seal(Message::InterruptAck(InterruptAck { route, seq }))
    }
}
