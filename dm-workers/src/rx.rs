//! The server's receive path as a pure function: [`classify`] takes a
//! frame's bytes and what the server knows ([`View`]) and says what to do
//! with the frame ([`Rx`]), changing nothing. The server carries the
//! verdict out ([`crate::server`]): duplicate cache, device, replies,
//! counters. Every received byte is untrusted; nothing here can panic.

use std::collections::HashSet;

use dmfabric_control::routing::RoutingTable;
use dmfabric_wire::{
    ControlMsg, ControlOp, FrameRepr, InterruptAck, IoRequest, MacAddr, Message, NackReason, Route, Space, WireError,
    ETHERTYPE_DMFABRIC,
};

use dmfabric_devices::DeviceSpec;

/// The device id a request may carry to mean "whichever device of my VM
/// holds this address" (debugging clients such as `dmfabric io`).
pub const ANY_DEVICE: u32 = 0;

/// Which device holds an address, for requests naming [`ANY_DEVICE`].
#[derive(Debug, Clone, Default)]
pub struct AddressMap {
    /// (vm, space, base, len, device)
    ranges: Vec<(Option<u32>, dmfabric_wire::Space, u64, u64, u32)>,
}

impl AddressMap {
    pub fn new(specs: &[DeviceSpec]) -> AddressMap {
        let mut ranges = Vec::new();
        for s in specs {
            if let Some((base, len)) = s.pio {
                ranges.push((s.vm, dmfabric_wire::Space::Pio, u64::from(base), u64::from(len), s.id));
            }
            if let Some((base, len)) = s.mmio {
                ranges.push((s.vm, dmfabric_wire::Space::Mmio, base, u64::from(len), s.id));
            }
        }
        AddressMap { ranges }
    }

    /// The device of `vm` (or of no VM in particular) holding `addr`.
    pub fn resolve(&self, vm: u32, space: dmfabric_wire::Space, addr: u64) -> Option<u32> {
        let hit = |want_vm: Option<u32>| {
            self.ranges.iter().find(|r| r.0 == want_vm && r.1 == space && addr >= r.2 && addr - r.2 < r.3)
        };
        hit(Some(vm)).or_else(|| hit(None)).map(|r| r.4)
    }

    /// Give `req` its device if it names [`ANY_DEVICE`]; false if none holds the address.
    pub fn fill(&self, req: &mut IoRequest) -> bool {
        if req.route.device != ANY_DEVICE {
            return true;
        }
        match self.resolve(req.route.vm, req.space, req.addr) {
            Some(d) => {
                req.route.device = d;
                true
            }
            None => false,
        }
    }
}

/// What the server knows when it classifies a frame.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub server: u16,
    pub mac: MacAddr,
    /// The devices served here, for requests that name none ([`ANY_DEVICE`]).
    pub addresses: &'a AddressMap,
    /// Placed by the control panel: its table and the devices served here.
    pub placed: Option<Placed<'a>>,
}

/// A server placed by the control panel.
#[derive(Debug, Clone, Copy)]
pub struct Placed<'a> {
    pub table: &'a RoutingTable,
    /// Devices served here (those waiting for their state included).
    pub here: &'a HashSet<u32>,
}

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rx {
    /// Run `req` here (after the duplicate check) and answer `reply_to`.
    Run { req: IoRequest, reply_to: MacAddr },
    /// Send `req` on to the server holding its device, at `to`.
    Forward { req: IoRequest, to: MacAddr, retransmit: bool },
    /// Refuse `req` with a Nack to `to`.
    Refuse { req: IoRequest, to: MacAddr, why: Refusal },
    /// A client (re)started: answer from our MAC.
    Hello { from: MacAddr, route: Route, seq: u64 },
    /// A client acknowledged an interrupt.
    Ack(InterruptAck),
    /// Count it and do nothing.
    Drop(Dropped),
}

/// Why a frame was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Another EtherType (ARP and the like on a shared link).
    Foreign,
    /// Not a valid dmfabric frame.
    Malformed(WireError),
    /// Unicast to another MAC.
    NotForUs,
    /// A valid frame of a kind a server does not take.
    UnexpectedKind,
}

/// Why a request is refused: the one place that says which Nack each gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It names another server.
    WrongServer,
    /// No device of its VM (here, or in the control panel's records).
    UnknownDevice,
    /// The device belongs to another VM.
    OtherVm,
    /// A VM the control panel does not know, or not on that client platform.
    UnknownVm,
    /// A client platform the control panel does not know.
    UnknownClient,
}

impl Refusal {
    pub fn nack_reason(self) -> NackReason {
        match self {
            Refusal::WrongServer => NackReason::WrongServer,
            Refusal::UnknownDevice => NackReason::UnknownDevice,
            Refusal::UnknownVm => NackReason::UnknownVm,
            Refusal::OtherVm | Refusal::UnknownClient => NackReason::NotAuthorised,
        }
    }
}

/// What to do with the frame in `bytes`.
pub fn classify(bytes: &[u8], v: &View<'_>) -> Rx {
    if bytes.len() >= 14 && bytes[12..14] != ETHERTYPE_DMFABRIC.to_be_bytes() {
        return Rx::Drop(Dropped::Foreign);
    }
    let repr = match FrameRepr::parse_bytes(bytes) {
        Ok(r) => r,
        Err(e) => return Rx::Drop(Dropped::Malformed(e)),
    };
    let from = repr.eth.src;
    if repr.eth.dst != v.mac && !repr.eth.dst.is_multicast() {
        return Rx::Drop(Dropped::NotForUs);
    }
    match repr.msg {
        Message::IoRequest(req) => request(req, from, repr.retransmit, v),
        Message::Control(ControlMsg { op: ControlOp::Hello, route, seq, .. }) => Rx::Hello { from, route, seq },
        Message::InterruptAck(ack) => Rx::Ack(ack),
        _ => Rx::Drop(Dropped::UnexpectedKind),
    }
}

fn request(mut req: IoRequest, from: MacAddr, retransmit: bool, v: &View<'_>) -> Rx {
    let refuse = |req: IoRequest, to: MacAddr, why: Refusal| Rx::Refuse { req, to, why };
    if req.route.server != v.server {
        return refuse(req, from, Refusal::WrongServer);
    }
    let Some(p) = v.placed else {
        // Not placed: any client, the devices of the config.
        return match v.addresses.fill(&mut req) {
            true => Rx::Run { req, reply_to: from },
            false => refuse(req, from, Refusal::UnknownDevice),
        };
    };
    let t = p.table;
    let Some(client) = t.client_mac(req.route.client) else {
        return refuse(req, from, Refusal::UnknownClient);
    };
    if !t.may_send(req.route.vm, req.route.client) {
        return refuse(req, from, Refusal::UnknownVm);
    }
    if !v.addresses.fill(&mut req) {
        match t.route(req.route.vm, req.space == Space::Mmio, req.addr) {
            Some(hit) => req.route.device = hit.device,
            None => return refuse(req, from, Refusal::UnknownDevice),
        }
    }
    if p.here.contains(&req.route.device) {
        // Answered at the client platform's registered MAC: a forwarded
        // request came from the owner server, not from the client.
        return Rx::Run { req, reply_to: client };
    }
    match t.placement(req.route.device).and_then(|pl| Some((t.server_mac(pl.server)?, pl.server))) {
        Some((to, server)) if server != v.server => {
            Rx::Forward { req: IoRequest { route: Route { server, ..req.route }, ..req }, to, retransmit }
        }
        _ => refuse(req, from, Refusal::UnknownDevice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_devices::platform::pc;
    use dmfabric_wire::{AccessSize, Direction, EthernetRepr, InterruptAck};

    const ME: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0a]);
    const IO: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0b]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x03]);
    const OWNER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0c]);

    fn frame(src: MacAddr, dst: MacAddr, msg: Message<'_>) -> Vec<u8> {
        let repr = FrameRepr::new(EthernetRepr { dst, src }, msg);
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    fn request(server: u16, client: u16, vm: u32, device: u32, addr: u64) -> IoRequest {
        IoRequest {
            route: Route { server, hypervisor: 1, client, vm, vcpu: 0, device },
            seq: 1,
            space: Space::Pio,
            dir: Direction::Read,
            size: AccessSize::B1,
            addr,
            data: 0,
        }
    }

    /// Client 3 runs VM 7; device 1 is on server 10 (here), device 2 on server 11.
    fn table() -> RoutingTable {
        RoutingTable::build(&dmfabric_testkit::fixtures::owner_and_io_server(), 1)
    }

    fn classify_placed(bytes: &[u8]) -> Rx {
        let t = table();
        let here: HashSet<u32> = [1].into();
        let addresses = AddressMap::default();
        classify(
            bytes,
            &View { server: 10, mac: ME, addresses: &addresses, placed: Some(Placed { table: &t, here: &here }) },
        )
    }

    #[test]
    fn bad_frames_are_dropped_by_reason() {
        let addresses = AddressMap::default();
        let v = View { server: 10, mac: ME, addresses: &addresses, placed: None };
        let good = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut bad_magic = good.clone();
        bad_magic[14] = 0;
        assert_eq!(classify(&arp, &v), Rx::Drop(Dropped::Foreign));
        assert_eq!(classify(&bad_magic, &v), Rx::Drop(Dropped::Malformed(WireError::BadMagic)));
        assert_eq!(classify(&good[..20], &v), Rx::Drop(Dropped::Malformed(WireError::Truncated)));
        assert_eq!(classify(&[], &v), Rx::Drop(Dropped::Malformed(WireError::Truncated)));
        let elsewhere = frame(CLIENT, IO, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        assert_eq!(classify(&elsewhere, &v), Rx::Drop(Dropped::NotForUs));
        let completion = frame(CLIENT, ME, Message::InterruptAck(InterruptAck { route: Route::default(), seq: 1 }));
        assert!(matches!(classify(&completion, &v), Rx::Ack(_)));
    }

    #[test]
    fn an_unplaced_server_runs_its_devices_and_resolves_addresses() {
        let addresses = AddressMap::new(&[pc::test_device(1)]);
        let v = View { server: 10, mac: ME, addresses: &addresses, placed: None };
        let named = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        assert!(matches!(classify(&named, &v), Rx::Run { reply_to: CLIENT, .. }));
        let any = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, ANY_DEVICE, 0x504)));
        let Rx::Run { req, .. } = classify(&any, &v) else { panic!("not run") };
        assert_eq!(req.route.device, 1, "resolved by address");
        let nowhere = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, ANY_DEVICE, 0x900)));
        assert!(matches!(classify(&nowhere, &v), Rx::Refuse { why: Refusal::UnknownDevice, .. }));
        let other = frame(CLIENT, ME, Message::IoRequest(request(11, 3, 7, 1, 0x500)));
        assert!(matches!(classify(&other, &v), Rx::Refuse { why: Refusal::WrongServer, to: CLIENT, .. }));
    }

    #[test]
    fn a_placed_server_runs_forwards_and_refuses_by_the_table() {
        // Device 1 is here: run, answered at the client's registered MAC
        // even when the frame came from an owner server.
        let here = frame(OWNER, ME, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        assert!(matches!(classify_placed(&here), Rx::Run { reply_to: CLIENT, .. }));
        // Device 2 is on server 11: forwarded there, with the route rewritten.
        let there = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, 2, 0x600)));
        let Rx::Forward { req, to, retransmit } = classify_placed(&there) else { panic!("not forwarded") };
        assert_eq!((req.route.server, to, retransmit), (11, IO, false));
        // By address, through the table.
        let any = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, ANY_DEVICE, 0x608)));
        assert!(matches!(
            classify_placed(&any),
            Rx::Forward { req: IoRequest { route: Route { device: 2, .. }, .. }, .. }
        ));
        for (r, why) in [
            (request(10, 4, 7, 1, 0x500), Refusal::UnknownClient),
            (request(10, 3, 8, 1, 0x500), Refusal::UnknownVm),
            (request(10, 3, 7, 9, 0x500), Refusal::UnknownDevice),
            (request(10, 3, 7, ANY_DEVICE, 0x900), Refusal::UnknownDevice),
        ] {
            let f = frame(CLIENT, ME, Message::IoRequest(r));
            assert!(matches!(classify_placed(&f), Rx::Refuse { why: w, .. } if w == why), "{r:?}");
        }
        assert_eq!(Refusal::UnknownClient.nack_reason(), NackReason::NotAuthorised);
    }

    #[test]
    fn hellos_are_answered_from_any_sender() {
        let hello = frame(
            CLIENT,
            MacAddr::BROADCAST,
            Message::Control(ControlMsg {
                route: Route { client: 3, ..Route::default() },
                seq: 9,
                op: ControlOp::Hello,
                payload: &[],
            }),
        );
        assert!(matches!(classify_placed(&hello), Rx::Hello { from: CLIENT, seq: 9, .. }));
    }
}
