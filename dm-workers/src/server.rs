//! The server's frame handling: receive, validate, run the device model,
//! transmit the completion. [`Server`] does all of it on one core; the
//! split layout ([`crate::sharded`]) runs the [`Frontend`] on a data-plane
//! core and [`Devices`] shards on worker cores.
//!
//! Every frame that is not answered is counted by reason; nothing received
//! from the wire can make this code panic.

use std::fmt;
use std::time::Instant;

use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::FrameBatch;
use dmfabric_wire::{
    ControlMsg, ControlOp, Direction, EthernetRepr, FrameRepr, IoCompletion, IoRequest, Kind, MacAddr, Message, Nack,
    NackReason, Route, Status, WireError, ETHERTYPE_DMFABRIC,
};

use dmfabric_dataplane::reliable::{DupCache, Seen, StreamKey};

use crate::device::Device;
use crate::regfile::RegisterFile;

/// One device a server hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub id: u32,
    /// Ports `(base, len)`.
    pub pio: Option<(u16, u16)>,
    /// MMIO `(base, len)`.
    pub mmio: Option<(u64, u32)>,
}

impl DeviceSpec {
    /// The register-file test device every dmfabric server has by default:
    /// device 1, ports 0x500–0x5ff and MMIO 0xd000_0000–0xd000_0fff.
    pub fn test_device() -> Self {
        DeviceSpec {
            id: TEST_DEVICE_ID,
            pio: Some((TEST_DEVICE_PIO, TEST_DEVICE_PIO_LEN)),
            mmio: Some((TEST_DEVICE_MMIO, TEST_DEVICE_MMIO_LEN)),
        }
    }
}

/// Device id of the default register-file test device.
pub const TEST_DEVICE_ID: u32 = 1;
/// First port of the test device.
pub const TEST_DEVICE_PIO: u16 = 0x500;
/// Ports of the test device.
pub const TEST_DEVICE_PIO_LEN: u16 = 0x100;
/// First MMIO address of the test device.
pub const TEST_DEVICE_MMIO: u64 = 0xd000_0000;
/// MMIO bytes of the test device.
pub const TEST_DEVICE_MMIO_LEN: u32 = 0x1000;

/// Counters of a server. Plain integers: owned by the server's core.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    pub requests: u64,
    pub completions: u64,
    /// Accesses the device did not claim (completed as real hardware would).
    pub unclaimed: u64,
    pub nack_unknown_device: u64,
    pub nack_wrong_server: u64,
    pub hellos: u64,
    /// Frames of another EtherType (ARP and the like on a shared link).
    pub foreign: u64,
    /// Unicast frames addressed to another MAC.
    pub not_for_us: u64,
    /// Valid frames of a kind a server does not accept.
    pub unexpected_kind: u64,
    /// Replies that did not fit the TX burst.
    pub tx_full: u64,
    /// Retransmitted requests answered again from the stream's cache,
    /// without running the device model twice.
    pub duplicates_answered: u64,
    /// Retransmitted requests still being executed (their answer follows).
    pub duplicates_in_flight: u64,
    /// Requests older than their stream's latest: dropped.
    pub stale: u64,
    /// Streams forgotten because their client said Hello again (restarted).
    pub streams_reset: u64,
    /// Malformed frames by reason (WireError::name → count, non-zero only).
    pub malformed: Vec<(&'static str, u64)>,
}

impl ServerStats {
    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for ServerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests {} completions {} unclaimed {} nack(unknown device {}, wrong server {}) duplicates {} (in flight {}) stale {} hellos {} foreign {} not-for-us {} unexpected-kind {} tx-full {} malformed {}",
            self.requests,
            self.completions,
            self.unclaimed,
            self.nack_unknown_device,
            self.nack_wrong_server,
            self.duplicates_answered,
            self.duplicates_in_flight,
            self.stale,
            self.hellos,
            self.foreign,
            self.not_for_us,
            self.unexpected_kind,
            self.tx_full,
            self.malformed_total()
        )?;
        for (name, n) in &self.malformed {
            write!(f, " {name}={n}")?;
        }
        Ok(())
    }
}

/// The devices of a server (or of one worker shard), sorted by id.
pub struct Devices {
    table: Vec<(u32, Box<dyn Device>)>,
    unclaimed: u64,
}

impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Devices").field("count", &self.table.len()).finish()
    }
}

impl Devices {
    pub fn new(specs: &[DeviceSpec]) -> Devices {
        let mut table: Vec<(u32, Box<dyn Device>)> =
            specs.iter().map(|d| (d.id, Box::new(RegisterFile::new(d.pio, d.mmio)) as Box<dyn Device>)).collect();
        table.sort_by_key(|(id, _)| *id);
        table.dedup_by_key(|(id, _)| *id);
        Devices { table, unclaimed: 0 }
    }

    /// Accesses no device register claimed so far.
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed
    }

    /// Run one request against its device; `None` if the device is unknown.
    pub fn execute(&mut self, req: &IoRequest) -> Option<IoCompletion> {
        let i = self.table.binary_search_by_key(&req.route.device, |(d, _)| *d).ok()?;
        let dev = self.table[i].1.as_mut();
        let (data, claimed) = match req.dir {
            Direction::Read => match dev.read(req.space, req.addr, req.size) {
                Some(v) => (v, true),
                None => (u64::MAX, false),
            },
            Direction::Write => (req.data, dev.write(req.space, req.addr, req.size, req.data)),
        };
        if !claimed {
            self.unclaimed += 1;
        }
        let status = if claimed { Status::Ok } else { Status::Unclaimed };
        Some(IoCompletion::for_request(req, data, status))
    }
}

/// The part of a server that faces the wire: validates every frame,
/// answers Hellos, Nacks what it cannot serve, and emits completions. In
/// the run-to-completion layout it shares a core with the devices; in the
/// split layout it is the data-plane core.
#[derive(Debug)]
pub struct Frontend {
    id: u16,
    mac: MacAddr,
    stats: ServerStats,
    malformed: [u64; WireError::ALL.len()],
    streams: DupCache<IoCompletion>,
}

fn stream_of(route: &Route) -> StreamKey {
    StreamKey::new(route.client, route.vm, route.vcpu)
}

impl Frontend {
    pub fn new(id: u16, mac: MacAddr) -> Frontend {
        Frontend {
            id,
            mac,
            stats: ServerStats::default(),
            malformed: [0; WireError::ALL.len()],
            streams: DupCache::default(),
        }
    }

    /// Counters so far (`unclaimed` is the devices' to add).
    pub fn stats(&self) -> ServerStats {
        let mut s = self.stats.clone();
        s.malformed = WireError::ALL
            .iter()
            .filter(|e| self.malformed[e.index()] > 0)
            .map(|e| (e.name(), self.malformed[e.index()]))
            .collect();
        s
    }

    /// Handle everything about a received frame except running a device:
    /// returns the request to execute and whom to answer, if any.
    pub fn classify(&mut self, bytes: &[u8], tx: &mut FrameBatch) -> Option<(IoRequest, MacAddr)> {
        if bytes.len() >= 14 && bytes[12..14] != ETHERTYPE_DMFABRIC.to_be_bytes() {
            self.stats.foreign += 1;
            return None;
        }
        let repr = match FrameRepr::parse_bytes(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.malformed[e.index()] += 1;
                return None;
            }
        };
        let from = repr.eth.src;
        if repr.eth.dst != self.mac && !repr.eth.dst.is_multicast() {
            self.stats.not_for_us += 1;
            return None;
        }
        match repr.msg {
            Message::IoRequest(req) => {
                self.stats.requests += 1;
                if req.route.server != self.id {
                    self.nack(tx, from, &req, NackReason::WrongServer);
                    return None;
                }
                match self.streams.check(stream_of(&req.route), req.seq) {
                    Seen::New => Some((req, from)),
                    Seen::Duplicate(Some(&answer)) => {
                        self.stats.duplicates_answered += 1;
                        self.reply(tx, from, Message::IoCompletion(answer));
                        None
                    }
                    Seen::Duplicate(None) => {
                        self.stats.duplicates_in_flight += 1;
                        None
                    }
                    Seen::Stale => {
                        self.stats.stale += 1;
                        None
                    }
                }
            }
            Message::Control(ControlMsg { op: ControlOp::Hello, route, seq, .. }) => {
                self.stats.hellos += 1;
                // A client says Hello when it starts: its sequence numbers start over.
                self.stats.streams_reset += self.streams.forget_client(route.client) as u64;
                let route = Route { server: self.id, ..route };
                let reply = ControlMsg { route, seq, op: ControlOp::HelloReply, payload: &[] };
                self.reply(tx, from, Message::Control(reply));
                None
            }
            _ => {
                self.stats.unexpected_kind += 1;
                None
            }
        }
    }

    /// Send a completion to `to`.
    pub fn complete(&mut self, tx: &mut FrameBatch, to: MacAddr, cmp: IoCompletion) {
        self.stats.completions += 1;
        self.streams.answered(stream_of(&cmp.route), cmp.seq, cmp);
        self.reply(tx, to, Message::IoCompletion(cmp));
    }

    /// Refuse `req`.
    pub fn nack(&mut self, tx: &mut FrameBatch, to: MacAddr, req: &IoRequest, reason: NackReason) {
        match reason {
            NackReason::UnknownDevice => self.stats.nack_unknown_device += 1,
            NackReason::WrongServer => self.stats.nack_wrong_server += 1,
            _ => {}
        }
        let msg = Message::Nack(Nack { route: req.route, seq: req.seq, reason, nacked: Kind::IoRequest });
        self.reply(tx, to, msg);
    }

    fn reply(&mut self, tx: &mut FrameBatch, to: MacAddr, msg: Message<'_>) {
        let repr = FrameRepr::new(EthernetRepr { dst: to, src: self.mac }, msg);
        if !tx.push_with(|buf| repr.emit(buf).ok()) {
            self.stats.tx_full += 1;
        }
    }
}

/// A whole server on one core (run-to-completion): a poll-loop [`Handler`].
#[derive(Debug)]
pub struct Server {
    frontend: Frontend,
    devices: Devices,
}

impl Server {
    /// A server with id `id` answering from `mac` for `devices`.
    pub fn new(id: u16, mac: MacAddr, devices: &[DeviceSpec]) -> Server {
        Server { frontend: Frontend::new(id, mac), devices: Devices::new(devices) }
    }

    pub fn id(&self) -> u16 {
        self.frontend.id
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats { unclaimed: self.devices.unclaimed(), ..self.frontend.stats() }
    }
}

impl Handler for Server {
    fn on_frame(&mut self, bytes: &[u8], tx: &mut FrameBatch, _now: Instant) {
        if let Some((req, from)) = self.frontend.classify(bytes, tx) {
            match self.devices.execute(&req) {
                Some(cmp) => self.frontend.complete(tx, from, cmp),
                None => self.frontend.nack(tx, from, &req, NackReason::UnknownDevice),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_wire::{AccessSize, Space};

    const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);

    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);

    /// A request with the next sequence number of the test stream.
    fn request(device: u32, server: u16, dir: Direction, addr: u64, data: u64) -> Vec<u8> {
        request_seq(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed), device, server, dir, addr, data)
    }

    fn request_seq(seq: u64, device: u32, server: u16, dir: Direction, addr: u64, data: u64) -> Vec<u8> {
        let req = IoRequest {
            route: Route { server, client: 3, vm: 7, vcpu: 0, device, hypervisor: 1 },
            seq,
            space: Space::Pio,
            dir,
            size: AccessSize::B2,
            addr,
            data,
        };
        let repr = FrameRepr::new(EthernetRepr { dst: SERVER, src: CLIENT }, Message::IoRequest(req));
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    fn answer(server: &mut Server, frame: &[u8]) -> Vec<Vec<u8>> {
        let mut tx = FrameBatch::new();
        server.on_frame(frame, &mut tx, Instant::now());
        tx.iter().map(<[u8]>::to_vec).collect()
    }

    fn only_msg(frames: &[Vec<u8>]) -> Message<'_> {
        assert_eq!(frames.len(), 1);
        let repr = FrameRepr::parse_bytes(&frames[0]).unwrap();
        assert_eq!(repr.eth, EthernetRepr { dst: CLIENT, src: SERVER });
        repr.msg
    }

    #[test]
    fn write_then_read_back() {
        let mut s = Server::new(1, SERVER, &[DeviceSpec::test_device()]);
        let out = answer(&mut s, &request(1, 1, Direction::Write, 0x502, 0xbeef));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!((c.status, c.dir), (Status::Ok, Direction::Write));
        let out = answer(&mut s, &request(1, 1, Direction::Read, 0x502, 0));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!((c.data, c.route.vm, c.route.client), (0xbeef, 7, 3));
        assert_eq!(s.stats().completions, 2);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let mut s = Server::new(1, SERVER, &[DeviceSpec::test_device()]);
        let out = answer(&mut s, &request(1, 1, Direction::Read, 0x600, 0));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!((c.data, c.status), (0xffff, Status::Unclaimed));
        assert_eq!(s.stats().unclaimed, 1);
    }

    #[test]
    fn unknown_device_and_wrong_server_are_nacked() {
        let mut s = Server::new(1, SERVER, &[DeviceSpec::test_device()]);
        let out = answer(&mut s, &request(99, 1, Direction::Read, 0x500, 0));
        assert!(matches!(only_msg(&out), Message::Nack(Nack { reason: NackReason::UnknownDevice, .. })));
        let out = answer(&mut s, &request(1, 2, Direction::Read, 0x500, 0));
        assert!(matches!(only_msg(&out), Message::Nack(Nack { reason: NackReason::WrongServer, .. })));
        let st = s.stats();
        assert_eq!((st.nack_unknown_device, st.nack_wrong_server, st.completions), (1, 1, 0));
    }

    #[test]
    fn bad_frames_are_counted_by_reason_and_not_answered() {
        let mut s = Server::new(1, SERVER, &[DeviceSpec::test_device()]);
        let good = request(1, 1, Direction::Read, 0x500, 0);
        let mut bad_magic = good.clone();
        bad_magic[14] = 0;
        let mut bad_version = good.clone();
        bad_version[16] = 2;
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut other_mac = good.clone();
        other_mac[5] = 0x99;
        for f in [&good[..20], &bad_magic[..], &bad_version[..], &arp[..], &other_mac[..], &[][..]] {
            assert!(answer(&mut s, f).is_empty());
        }
        let st = s.stats();
        assert_eq!(st.malformed, vec![("truncated", 2), ("bad_magic", 1), ("bad_version", 1)]);
        assert_eq!((st.foreign, st.not_for_us, st.requests), (1, 1, 0));
        // And the server still answers.
        assert_eq!(answer(&mut s, &good).len(), 1);
    }

    #[test]
    fn a_retransmitted_write_is_answered_from_the_cache_not_run_twice() {
        let mut s = Server::new(1, SERVER, &[DeviceSpec::test_device()]);
        let first = request_seq(10, 1, 1, Direction::Write, 0x500, 0xaa);
        let first_answer = answer(&mut s, &first);
        // The same frame again (the client did not see the answer): same answer.
        assert_eq!(answer(&mut s, &first), first_answer);
        // The next write, then the first one arriving late: stale, dropped.
        answer(&mut s, &request_seq(11, 1, 1, Direction::Write, 0x500, 0xbb));
        assert!(answer(&mut s, &first).is_empty());
        let out = answer(&mut s, &request_seq(12, 1, 1, Direction::Read, 0x500, 0));
        let Message::IoCompletion(c) = only_msg(&out) else { panic!("not a completion") };
        assert_eq!(c.data, 0xbb, "the old write was not applied again");
        let st = s.stats();
        assert_eq!((st.requests, st.completions, st.duplicates_answered, st.stale), (5, 3, 1, 1));
    }

    #[test]
    fn hello_resets_the_clients_streams() {
        let mut s = Server::new(1, SERVER, &[DeviceSpec::test_device()]);
        answer(&mut s, &request_seq(1000, 1, 1, Direction::Write, 0x500, 1));
        assert!(answer(&mut s, &request_seq(5, 1, 1, Direction::Write, 0x500, 2)).is_empty(), "stale");
        let hello = FrameRepr::new(
            EthernetRepr { dst: MacAddr::BROADCAST, src: CLIENT },
            Message::Control(ControlMsg {
                route: Route { client: 3, ..Route::default() },
                seq: 1,
                op: ControlOp::Hello,
                payload: &[],
            }),
        );
        let mut buf = vec![0u8; hello.buffer_len()];
        hello.emit(&mut buf).unwrap();
        answer(&mut s, &buf);
        assert_eq!(answer(&mut s, &request_seq(5, 1, 1, Direction::Write, 0x500, 2)).len(), 1, "new again");
        assert_eq!(s.stats().streams_reset, 1);
    }

    #[test]
    fn hello_is_answered_from_our_mac() {
        let mut s = Server::new(5, SERVER, &[]);
        let hello = FrameRepr::new(
            EthernetRepr { dst: MacAddr::BROADCAST, src: CLIENT },
            Message::Control(ControlMsg { route: Route::default(), seq: 9, op: ControlOp::Hello, payload: &[] }),
        );
        let mut buf = vec![0u8; hello.buffer_len()];
        hello.emit(&mut buf).unwrap();
        let out = answer(&mut s, &buf);
        let Message::Control(c) = only_msg(&out) else { panic!("not control") };
        assert_eq!((c.op, c.route.server, c.seq), (ControlOp::HelloReply, 5, 9));
    }
}
