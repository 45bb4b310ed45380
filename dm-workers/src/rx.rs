//! The server's receive path as a pure function: [`classify`] takes a
//! frame's bytes and what the server knows ([`View`]) and says what to do
//! with the frame ([`Rx`]), changing nothing. The server carries the
//! verdict out ([`crate::server`]): sessions and streams, device, replies,
//! counters. Every received byte is untrusted; nothing here can panic.
//!
//! The order is the trust boundary: the frame's structure and fields (no
//! lookup, no state); its client platform's keys (the one lookup before
//! the tag is checked); the tag;
//! then the source (the client's registered MAC, or another server's for a
//! forwarded request, a line change for an interrupt controller here and
//! the acknowledgement of one sent there); then what the frame asks, against the registry
//! (the client's VMs and vCPUs) and the devices (each device's VM). A frame
//! failing before the identity checks is dropped with no answer at all;
//! one failing them is authentic, and is refused with a Nack to the
//! client's registered MAC — never to a frame's source.

use std::collections::HashMap;
use std::collections::HashSet;

use dmfabric_control::routing::RoutingTable;
use dmfabric_wire::auth::AuthError;
use dmfabric_wire::session::{HelloBody, CHALLENGE_LEN};
use dmfabric_wire::{
    ControlMsg, ControlOp, Dma, Frame, FrameRepr, Interrupt, InterruptAck, IoRequest, IrqSource, Kind, MacAddr,
    Message, NackReason, Route, Space, WireError, ETHERTYPE_DMFABRIC,
};

use dmfabric_devices::DeviceSpec;

use crate::peers::{Client, Registry};

/// The device id a request may carry to mean "whichever device of my VM
/// holds this address" (debugging clients such as `dmfabric io`).
pub const ANY_DEVICE: u32 = 0;

/// Which device holds an address, for requests naming [`ANY_DEVICE`], and
/// which VM each device belongs to.
#[derive(Debug, Clone, Default)]
pub struct AddressMap {
    /// (vm, space, base, len, device)
    ranges: Vec<(Option<u32>, Space, u64, u64, u32)>,
    /// device → its VM (None: any VM's, the shared test devices).
    vms: HashMap<u32, Option<u32>>,
}

impl AddressMap {
    pub fn new(specs: &[DeviceSpec]) -> AddressMap {
        let mut ranges = Vec::new();
        let mut vms = HashMap::new();
        for s in specs {
            if let Some((base, len)) = s.pio {
                ranges.push((s.vm, Space::Pio, u64::from(base), u64::from(len), s.id));
            }
            if let Some((base, len)) = s.mmio {
                ranges.push((s.vm, Space::Mmio, base, u64::from(len), s.id));
            }
            vms.insert(s.id, s.vm);
        }
        AddressMap { ranges, vms }
    }

    /// The device of `vm` (or of no VM in particular) holding `addr`.
    pub fn resolve(&self, vm: u32, space: Space, addr: u64) -> Option<u32> {
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

    /// The VM `device` belongs to: `Some(None)` for a device of any VM,
    /// `None` for a device not here.
    pub fn vm_of(&self, device: u32) -> Option<Option<u32>> {
        self.vms.get(&device).copied()
    }
}

/// What the server knows when it classifies a frame.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub server: u16,
    pub mac: MacAddr,
    /// The client platforms it acts for.
    pub registry: &'a Registry,
    /// The devices served here, for requests that name none ([`ANY_DEVICE`]).
    pub addresses: &'a AddressMap,
    /// Placed by the control panel: its table and the devices served here.
    pub placed: Option<Placed<'a>>,
    /// Check tags (false only to measure what checking costs).
    pub authenticate: bool,
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
    /// Run `req` here (after the stream check) and answer `reply_to`, the
    /// client's registered MAC. `named` is the device the request named
    /// (its stream), `epoch` the server epoch it named.
    Run { req: IoRequest, reply_to: MacAddr, named: u32, epoch: u32 },
    /// Send `req` on to the server holding its device, at `to`, sealed again.
    Forward { req: IoRequest, to: MacAddr, retransmit: bool, epoch: u32 },
    /// Refuse `req` with a Nack to the client at `to`.
    Refuse { req: IoRequest, to: MacAddr, why: Refusal },
    /// A client opens a session: answer it at `to`.
    Hello { to: MacAddr, route: Route, seq: u64, challenge: [u8; CHALLENGE_LEN] },
    /// A client starts using a session it was offered.
    Register { client: u16, seq: u64, epoch: u32 },
    /// A client (or the server holding a VM's interrupt controller)
    /// acknowledged an interrupt.
    Ack(InterruptAck),
    /// Another server (`from`, its registered MAC) changed a line of a
    /// device of one of the client's VMs: for that VM's interrupt
    /// controller, if it is here. Acknowledged to `from`.
    Line { from: MacAddr, irq: Interrupt },
    /// A client answered a DMA chunk: the answer without its payload (a
    /// read's bytes are the frame's payload, [`dma_payload`]).
    DmaAnswer { client: u16, answer: Dma<'static> },
    /// A client refused a DMA chunk.
    DmaRefused { client: u16, seq: u64, reason: NackReason },
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
    /// No tag, no key for its client platform, or a tag that does not match.
    Unauthenticated(AuthError),
    /// Authentic, but from neither the client's registered MAC nor a server.
    WrongSource,
    /// A valid frame of a kind a server does not take.
    UnexpectedKind,
    /// A Hello without its challenge.
    BadHello,
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
    /// Not one of the client platform's VMs.
    UnknownVm,
    /// A vCPU the VM does not have.
    BadVcpu,
    /// Its stream has no state here and it is not a start this server can
    /// take: the client opens a session again.
    NoSession,
}

impl Refusal {
    pub fn nack_reason(self) -> NackReason {
        match self {
            Refusal::WrongServer => NackReason::WrongServer,
            Refusal::UnknownDevice => NackReason::UnknownDevice,
            Refusal::UnknownVm => NackReason::UnknownVm,
            Refusal::OtherVm | Refusal::BadVcpu => NackReason::NotAuthorised,
            Refusal::NoSession => NackReason::NoSession,
        }
    }
}

/// `answer` with its payload: the bytes of `frame` (which [`classify`]
/// took as that [`Rx::DmaAnswer`], so their length was checked) after the
/// headers, for a read's answer.
pub fn dma_answer<'b>(frame: &'b [u8], answer: &Dma<'_>) -> Dma<'b> {
    let at = dmfabric_wire::ETHERNET_HEADER_LEN + dmfabric_wire::HEADER_LEN;
    let payload = match Dma::carries_data(answer.dir, true) {
        true => frame.get(at..at + answer.len as usize).unwrap_or(&[]),
        false => &[],
    };
    Dma {
        route: answer.route,
        seq: answer.seq,
        dir: answer.dir,
        reply: true,
        addr: answer.addr,
        len: answer.len,
        payload,
    }
}

/// What to do with the frame in `bytes`.
pub fn classify(bytes: &[u8], v: &View<'_>) -> Rx {
    if bytes.len() >= 14 && bytes[12..14] != ETHERTYPE_DMFABRIC.to_be_bytes() {
        return Rx::Drop(Dropped::Foreign);
    }
    let frame = match Frame::new_checked(bytes) {
        Ok(f) => f,
        Err(e) => return Rx::Drop(Dropped::Malformed(e)),
    };
    if frame.dst() != v.mac && !frame.dst().is_multicast() {
        return Rx::Drop(Dropped::NotForUs);
    }
    // What the bytes say (no lookup, no state): a malformed frame is
    // counted as such whatever its tag.
    let repr = match FrameRepr::parse(&frame) {
        Ok(r) => r,
        Err(e) => return Rx::Drop(Dropped::Malformed(e)),
    };
    // The one lookup before the tag: the keys of the client platform the
    // frame names.
    let Some(client) = v.registry.client(frame.header().client_id.get()) else {
        return Rx::Drop(Dropped::Unauthenticated(AuthError::UnknownKey));
    };
    if v.authenticate {
        if let Err(e) = client.keys.verify(&frame) {
            return Rx::Drop(Dropped::Unauthenticated(e));
        }
    }
    let from = repr.eth.src;
    let forwarded = from != client.mac;
    let server_may_send = matches!(repr.msg, Message::IoRequest(_) | Message::Interrupt(_) | Message::InterruptAck(_));
    if forwarded && !(server_may_send && v.registry.is_server(from)) {
        return Rx::Drop(Dropped::WrongSource);
    }
    match repr.msg {
        Message::IoRequest(req) => request(req, client, forwarded, repr.retransmit, repr.epoch, v),
        Message::Control(ControlMsg { op: ControlOp::Hello, route, seq, payload }) => match HelloBody::parse(payload) {
            Some(h) => Rx::Hello { to: client.mac, route, seq, challenge: h.challenge },
            None => Rx::Drop(Dropped::BadHello),
        },
        Message::Control(ControlMsg { op: ControlOp::Register, seq, .. }) => {
            Rx::Register { client: client.id, seq, epoch: repr.epoch }
        }
        Message::InterruptAck(ack) => Rx::Ack(ack),
        // A line change from the server it names, for a VM of the client.
        Message::Interrupt(irq) if forwarded => {
            if v.registry.server_mac(irq.route.server) != Some(from) {
                return Rx::Drop(Dropped::WrongSource);
            }
            match (irq.source, client.vcpus(irq.route.vm)) {
                (IrqSource::Line(_), Some(_)) => Rx::Line { from, irq },
                _ => Rx::Drop(Dropped::UnexpectedKind),
            }
        }
        Message::Dma(d) if d.reply && d.route.server == v.server => {
            let answer =
                Dma { route: d.route, seq: d.seq, dir: d.dir, reply: true, addr: d.addr, len: d.len, payload: &[] };
            Rx::DmaAnswer { client: client.id, answer }
        }
        Message::Nack(n) if matches!(n.nacked, Kind::DmaRead | Kind::DmaWrite) && n.route.server == v.server => {
            Rx::DmaRefused { client: client.id, seq: n.seq, reason: n.reason }
        }
        _ => Rx::Drop(Dropped::UnexpectedKind),
    }
}

fn request(mut req: IoRequest, client: &Client, forwarded: bool, retransmit: bool, epoch: u32, v: &View<'_>) -> Rx {
    let to = client.mac;
    let refuse = |req: IoRequest, why: Refusal| Rx::Refuse { req, to, why };
    if req.route.server != v.server {
        return refuse(req, Refusal::WrongServer);
    }
    let Some(vcpus) = client.vcpus(req.route.vm) else {
        return refuse(req, Refusal::UnknownVm);
    };
    if req.route.vcpu >= vcpus {
        return refuse(req, Refusal::BadVcpu);
    }
    let named = req.route.device;
    let Some(p) = v.placed else {
        // Not placed: the devices of the config.
        if !v.addresses.fill(&mut req) {
            return refuse(req, Refusal::UnknownDevice);
        }
        return match v.addresses.vm_of(req.route.device) {
            Some(None) => Rx::Run { req, reply_to: to, named, epoch },
            Some(Some(vm)) if vm == req.route.vm => Rx::Run { req, reply_to: to, named, epoch },
            Some(Some(_)) => refuse(req, Refusal::OtherVm),
            None => refuse(req, Refusal::UnknownDevice),
        };
    };
    let t = p.table;
    if !v.addresses.fill(&mut req) {
        match t.route(req.route.vm, req.space == Space::Mmio, req.addr) {
            Some(hit) => req.route.device = hit.device,
            None => return refuse(req, Refusal::UnknownDevice),
        }
    }
    match t.db.devices.get(&req.route.device).map(|d| d.vm) {
        None => return refuse(req, Refusal::UnknownDevice),
        Some(vm) if vm != req.route.vm => return refuse(req, Refusal::OtherVm),
        Some(_) => {}
    }
    if p.here.contains(&req.route.device) {
        return Rx::Run { req, reply_to: to, named, epoch };
    }
    // Forwarded once at most: a server does not pass on what another sent
    // it. The device stays as the client named it (the stream's name): the
    // server holding it finds it by address again if it was none.
    match t.placement(req.route.device).and_then(|pl| Some((t.server_mac(pl.server)?, pl.server))) {
        Some((to, server)) if server != v.server && !forwarded => {
            let route = Route { server, device: named, ..req.route };
            Rx::Forward { req: IoRequest { route, ..req }, to, retransmit, epoch }
        }
        _ => refuse(req, Refusal::UnknownDevice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_devices::platform::pc;
    use dmfabric_testkit::keys;
    use dmfabric_wire::session::HelloBody;
    use dmfabric_wire::{AccessSize, Direction, EthernetRepr, InterruptAck};

    const ME: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0a]);
    const IO: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0b]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x03]);
    const FORGER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x66]);

    /// Client 3 at CLIENT runs VM 7 (2 vCPUs); servers 10 (here) and 11 (IO).
    fn registry() -> Registry {
        let c = Client { id: 3, mac: CLIENT, hypervisor: 1, keys: keys::ring(3), vms: vec![(7, 2)] };
        Registry::new(vec![c], vec![(11, IO)], HashMap::new())
    }

    fn frame(src: MacAddr, dst: MacAddr, msg: Message<'_>) -> Vec<u8> {
        keys::sealed(&FrameRepr::new(EthernetRepr { dst, src }, msg), 3)
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

    fn unplaced<'a>(reg: &'a Registry, addresses: &'a AddressMap) -> View<'a> {
        View { server: 10, mac: ME, registry: reg, addresses, placed: None, authenticate: true }
    }

    /// Device 1 is on server 10 (here), device 2 on server 11.
    fn classify_placed(bytes: &[u8]) -> Rx {
        let t = RoutingTable::build(&dmfabric_testkit::fixtures::owner_and_io_server(), 1);
        let here: HashSet<u32> = [1].into();
        let (reg, addresses) = (registry(), AddressMap::default());
        let v = View { placed: Some(Placed { table: &t, here: &here }), ..unplaced(&reg, &addresses) };
        classify(bytes, &v)
    }

    #[test]
    fn bad_frames_are_dropped_by_reason() {
        let (reg, addresses) = (registry(), AddressMap::default());
        let v = unplaced(&reg, &addresses);
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
        let ack = frame(
            CLIENT,
            ME,
            Message::InterruptAck(InterruptAck { route: Route { client: 3, ..Route::default() }, seq: 1 }),
        );
        assert!(matches!(classify(&ack, &v), Rx::Ack(_)));
    }

    #[test]
    fn line_changes_are_taken_only_from_the_server_they_name_for_the_clients_vms() {
        let (reg, addresses) = (registry(), AddressMap::default());
        let v = unplaced(&reg, &addresses);
        let irq = |server: u16, vm: u32, source: IrqSource| {
            Message::Interrupt(Interrupt {
                route: Route { server, hypervisor: 1, client: 3, vm, vcpu: 0, device: 21 },
                seq: 5,
                source,
                trigger: dmfabric_wire::Trigger::Level { asserted: true },
            })
        };
        let line = irq(11, 7, IrqSource::Line(2));
        match classify(&frame(IO, ME, line), &v) {
            Rx::Line { from, irq } => assert_eq!((from, irq.route.device, irq.seq), (IO, 21, 5)),
            other => panic!("{other:?}"),
        }
        // Naming a server it is not; from a MAC no server has; from the
        // client (clients raise no lines); another client's VM; an MSI.
        assert_eq!(classify(&frame(IO, ME, irq(12, 7, IrqSource::Line(2))), &v), Rx::Drop(Dropped::WrongSource));
        assert_eq!(classify(&frame(FORGER, ME, line), &v), Rx::Drop(Dropped::WrongSource));
        assert_eq!(classify(&frame(CLIENT, ME, line), &v), Rx::Drop(Dropped::UnexpectedKind));
        assert_eq!(classify(&frame(IO, ME, irq(11, 8, IrqSource::Line(2))), &v), Rx::Drop(Dropped::UnexpectedKind));
        let Message::Interrupt(mut msi) = irq(11, 7, IrqSource::Msi { address: 0xfee0_0000, data: 0x30 }) else {
            unreachable!()
        };
        msi.trigger = dmfabric_wire::Trigger::Edge;
        let msi = Message::Interrupt(msi);
        assert_eq!(classify(&frame(IO, ME, msi), &v), Rx::Drop(Dropped::UnexpectedKind));
        // The controller's server acknowledges one sent there.
        let ack = Message::InterruptAck(InterruptAck { route: Route { client: 3, vm: 7, ..Route::default() }, seq: 5 });
        assert!(matches!(classify(&frame(IO, ME, ack), &v), Rx::Ack(_)));
        assert_eq!(classify(&frame(FORGER, ME, ack), &v), Rx::Drop(Dropped::WrongSource));
    }

    #[test]
    fn only_frames_sealed_with_the_clients_key_get_past_the_tag() {
        let (reg, addresses) = (registry(), AddressMap::new(&[pc::test_device(1)]));
        let v = unplaced(&reg, &addresses);
        let repr =
            FrameRepr::new(EthernetRepr { dst: ME, src: CLIENT }, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        // No tag; another client's key; a flipped bit; a key id nobody has; a client nobody registered.
        assert_eq!(classify(&keys::unsealed(&repr), &v), Rx::Drop(Dropped::Unauthenticated(AuthError::Missing)));
        assert_eq!(classify(&keys::sealed(&repr, 4), &v), Rx::Drop(Dropped::Unauthenticated(AuthError::BadTag)));
        let mut flipped = keys::sealed(&repr, 3);
        flipped[14 + 48 + 7] ^= 1; // a bit of the address
        assert_eq!(classify(&flipped, &v), Rx::Drop(Dropped::Unauthenticated(AuthError::BadTag)));
        let other_id = {
            let mut buf = vec![0u8; repr.sealed_len()];
            let key = dmfabric_wire::auth::SendKey { id: 9, key: keys::secret(3).frame_key() };
            repr.emit_sealed(&mut buf, &key).unwrap();
            buf
        };
        assert_eq!(classify(&other_id, &v), Rx::Drop(Dropped::Unauthenticated(AuthError::UnknownKey)));
        let stranger =
            FrameRepr::new(EthernetRepr { dst: ME, src: CLIENT }, Message::IoRequest(request(10, 5, 7, 1, 0x500)));
        assert_eq!(
            classify(&keys::sealed(&stranger, 5), &v),
            Rx::Drop(Dropped::Unauthenticated(AuthError::UnknownKey))
        );
        // Authentic but sent from another MAC: dropped, not answered there.
        let moved = frame(FORGER, ME, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        assert_eq!(classify(&moved, &v), Rx::Drop(Dropped::WrongSource));
        // Measuring without authentication: the untagged frame runs.
        let off = View { authenticate: false, ..v };
        assert!(matches!(classify(&keys::unsealed(&repr), &off), Rx::Run { .. }));
    }

    #[test]
    fn an_unplaced_server_acts_only_for_the_clients_vms_vcpus_and_devices() {
        let mut theirs = pc::test_device(2);
        theirs.vm = Some(8);
        let (reg, addresses) = (registry(), AddressMap::new(&[pc::test_device(1), theirs]));
        let v = unplaced(&reg, &addresses);
        let named = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        assert!(matches!(classify(&named, &v), Rx::Run { reply_to: CLIENT, named: 1, .. }));
        let any = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, ANY_DEVICE, 0x504)));
        let Rx::Run { req, named, .. } = classify(&any, &v) else { panic!("not run") };
        assert_eq!((req.route.device, named), (1, ANY_DEVICE), "resolved by address, its stream as named");
        let refused = |r: IoRequest| match classify(&frame(CLIENT, ME, Message::IoRequest(r)), &v) {
            Rx::Refuse { why, to, .. } => {
                assert_eq!(to, CLIENT);
                Some(why)
            }
            _ => None,
        };
        assert_eq!(refused(request(10, 3, 7, ANY_DEVICE, 0x900)), Some(Refusal::UnknownDevice));
        assert_eq!(refused(request(11, 3, 7, 1, 0x500)), Some(Refusal::WrongServer));
        assert_eq!(refused(request(10, 3, 8, 1, 0x500)), Some(Refusal::UnknownVm), "VM 8 is not client 3's");
        assert_eq!(refused(request(10, 3, 7, 2, 0x500)), Some(Refusal::OtherVm), "device 2 is VM 8's");
        let mut vcpu2 = request(10, 3, 7, 1, 0x500);
        vcpu2.route.vcpu = 2;
        assert_eq!(refused(vcpu2), Some(Refusal::BadVcpu), "VM 7 has vCPUs 0 and 1");
        assert_eq!(Refusal::BadVcpu.nack_reason(), NackReason::NotAuthorised);
    }

    #[test]
    fn a_placed_server_runs_forwards_and_refuses_by_the_table() {
        // Device 1 is here: run, answered at the client's registered MAC
        // even when the frame came from the owner server... which is not
        // a server this one knows as such in this registry: refused.
        let from_owner = frame(IO, ME, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        assert!(matches!(classify_placed(&from_owner), Rx::Run { reply_to: CLIENT, .. }));
        let from_stranger = frame(FORGER, ME, Message::IoRequest(request(10, 3, 7, 1, 0x500)));
        assert_eq!(classify_placed(&from_stranger), Rx::Drop(Dropped::WrongSource));
        // Device 2 is on server 11: forwarded there, with the route rewritten.
        let there = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, 2, 0x600)));
        let Rx::Forward { req, to, retransmit, .. } = classify_placed(&there) else { panic!("not forwarded") };
        assert_eq!((req.route.server, to, retransmit), (11, IO, false));
        // ... but not what another server forwarded here.
        let again = frame(IO, ME, Message::IoRequest(request(10, 3, 7, 2, 0x600)));
        assert!(matches!(classify_placed(&again), Rx::Refuse { why: Refusal::UnknownDevice, to: CLIENT, .. }));
        // By address, through the table: forwarded as named (the server there finds it again).
        let any = frame(CLIENT, ME, Message::IoRequest(request(10, 3, 7, ANY_DEVICE, 0x608)));
        assert!(matches!(
            classify_placed(&any),
            Rx::Forward { req: IoRequest { route: Route { device: ANY_DEVICE, server: 11, .. }, .. }, .. }
        ));
        for (r, why) in [
            (request(10, 3, 8, 1, 0x500), Refusal::UnknownVm),
            (request(10, 3, 7, 9, 0x500), Refusal::UnknownDevice),
            (request(10, 3, 7, ANY_DEVICE, 0x900), Refusal::UnknownDevice),
        ] {
            let f = frame(CLIENT, ME, Message::IoRequest(r));
            assert!(matches!(classify_placed(&f), Rx::Refuse { why: w, .. } if w == why), "{r:?}");
        }
    }

    #[test]
    fn hellos_need_their_challenge_and_are_answered_at_the_registered_mac() {
        let hello = |payload: &[u8]| {
            frame(
                CLIENT,
                MacAddr::BROADCAST,
                Message::Control(ControlMsg {
                    route: Route { client: 3, ..Route::default() },
                    seq: 9,
                    op: ControlOp::Hello,
                    payload,
                }),
            )
        };
        let body = HelloBody { challenge: [7; CHALLENGE_LEN] };
        assert!(matches!(
            classify_placed(&hello(body.bytes())),
            Rx::Hello { to: CLIENT, seq: 9, challenge: [7, ..], .. }
        ));
        assert_eq!(classify_placed(&hello(&[])), Rx::Drop(Dropped::BadHello));
    }
}
