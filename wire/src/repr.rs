//! High-level representations of frames: what a frame *means*, with
//! `parse` from a checked [`Frame`] and `emit` into a byte buffer.

use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use crate::error::WireError;
use crate::ethernet::{EthernetHeader, MacAddr, ETHERNET_HEADER_LEN, ETHERTYPE_DMFABRIC};
use crate::frame::Frame;
use crate::header::{flags, ControlOp, Header, Kind, NackReason, Status, AUTH_TAG_LEN, HEADER_LEN, MAGIC, VERSION};

/// Where a message is going and on whose behalf: every id of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Route {
    pub server: u16,
    pub hypervisor: u16,
    /// The client platform.
    pub client: u16,
    pub vm: u32,
    pub vcpu: u16,
    pub device: u32,
}

/// Address space of an I/O access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Space {
    Pio = 1,
    Mmio = 2,
}

/// Direction of an I/O access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// IN / MMIO load: the completion carries the data.
    Read,
    /// OUT / MMIO store: the request carries the data.
    Write,
}

/// An access size in bytes: 1, 2, 4 or 8 (port I/O: at most 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccessSize(u8);

impl AccessSize {
    pub const B1: AccessSize = AccessSize(1);
    pub const B2: AccessSize = AccessSize(2);
    pub const B4: AccessSize = AccessSize(4);
    pub const B8: AccessSize = AccessSize(8);

    /// A size valid for `space`, or `None`.
    pub const fn new(bytes: u8, space: Space) -> Option<AccessSize> {
        match (bytes, space) {
            (1 | 2 | 4, _) | (8, Space::Mmio) => Some(AccessSize(bytes)),
            _ => None,
        }
    }

    pub const fn bytes(self) -> u8 {
        self.0
    }

    /// The bits an access of this size can carry.
    pub const fn mask(self) -> u64 {
        if self.0 == 8 {
            u64::MAX
        } else {
            (1u64 << (self.0 as u32 * 8)) - 1
        }
    }
}

/// A vCPU's port-I/O or MMIO access, sent from the client to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoRequest {
    pub route: Route,
    pub seq: u64,
    pub space: Space,
    pub dir: Direction,
    pub size: AccessSize,
    pub addr: u64,
    /// Write data (zero for reads); no wider than `size`.
    pub data: u64,
}

/// The server's answer to an [`IoRequest`]: read data, or the finish
/// notification of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoCompletion {
    pub route: Route,
    pub seq: u64,
    pub space: Space,
    pub dir: Direction,
    pub size: AccessSize,
    pub addr: u64,
    /// Read result (echoed write data for writes); no wider than `size`.
    pub data: u64,
    pub status: Status,
}

impl IoCompletion {
    /// The completion of `req` with `data` and `status`; the data is cut to the access size.
    pub fn for_request(req: &IoRequest, data: u64, status: Status) -> IoCompletion {
        IoCompletion {
            route: req.route,
            seq: req.seq,
            space: req.space,
            dir: req.dir,
            size: req.size,
            addr: req.addr,
            data: data & req.size.mask(),
            status,
        }
    }
}

/// What raised an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqSource {
    /// A GSI / IRQ line number.
    Line(u32),
    /// A message-signalled interrupt.
    Msi { address: u64, data: u32 },
}

/// How an interrupt is triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    Edge,
    /// Level-triggered, with the new line level.
    Level {
        asserted: bool,
    },
}

/// A device model raising or changing an interrupt, sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interrupt {
    pub route: Route,
    pub seq: u64,
    pub source: IrqSource,
    pub trigger: Trigger,
}

/// The client's acknowledgement of an [`Interrupt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterruptAck {
    pub route: Route,
    pub seq: u64,
}

/// A control-plane message; its body is the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ControlMsg<'a> {
    pub route: Route,
    pub seq: u64,
    pub op: ControlOp,
    pub payload: &'a [u8],
}

/// A refusal of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nack {
    pub route: Route,
    pub seq: u64,
    pub reason: NackReason,
    /// The kind of the refused frame.
    pub nacked: Kind,
}

/// Which way a DMA moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaDir {
    /// Guest memory to the device model (kind DmaRead).
    Read,
    /// The device model to guest memory (kind DmaWrite).
    Write,
}

/// The most bytes one DMA frame carries: the payload length is 16 bits.
pub const MAX_DMA_CHUNK: u32 = u16::MAX as u32;

/// A device model's access to its VM's memory, one chunk of it: the
/// server's request, or the client's answer (`reply`).
///
/// | | request (server) | reply (client) |
/// |---|---|---|
/// | read | `len` bytes wanted, no payload | the `len` bytes |
/// | write | the `len` bytes | no payload |
///
/// `len` is at least 1 and at most [`MAX_DMA_CHUNK`]; `addr + len` does not
/// pass the end of the address space. A client that will not do it answers
/// with a Nack (`OutOfRange`, `UnknownVm`, `NotAuthorised`) instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dma<'a> {
    pub route: Route,
    pub seq: u64,
    pub dir: DmaDir,
    pub reply: bool,
    /// Guest-physical address.
    pub addr: u64,
    pub len: u32,
    /// The bytes, where the frame carries them (write requests, read replies).
    pub payload: &'a [u8],
}

impl<'a> Dma<'a> {
    /// Whether this frame carries the data.
    pub fn carries_data(dir: DmaDir, reply: bool) -> bool {
        matches!((dir, reply), (DmaDir::Write, false) | (DmaDir::Read, true))
    }

    /// The answer to this request: `payload` is a read's bytes (empty for a write).
    pub fn reply_with(&self, payload: &'a [u8]) -> Dma<'a> {
        Dma { reply: true, payload, ..*self }
    }
}

/// One message of any kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message<'a> {
    IoRequest(IoRequest),
    IoCompletion(IoCompletion),
    Interrupt(Interrupt),
    InterruptAck(InterruptAck),
    Control(ControlMsg<'a>),
    Nack(Nack),
    Dma(Dma<'a>),
}

impl Message<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Message::IoRequest(_) => Kind::IoRequest,
            Message::IoCompletion(_) => Kind::IoCompletion,
            Message::Interrupt(_) => Kind::Interrupt,
            Message::InterruptAck(_) => Kind::InterruptAck,
            Message::Control(_) => Kind::Control,
            Message::Nack(_) => Kind::Nack,
            Message::Dma(m) => match m.dir {
                DmaDir::Read => Kind::DmaRead,
                DmaDir::Write => Kind::DmaWrite,
            },
        }
    }

    pub fn route(&self) -> &Route {
        match self {
            Message::IoRequest(m) => &m.route,
            Message::IoCompletion(m) => &m.route,
            Message::Interrupt(m) => &m.route,
            Message::InterruptAck(m) => &m.route,
            Message::Control(m) => &m.route,
            Message::Nack(m) => &m.route,
            Message::Dma(m) => &m.route,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Message::IoRequest(m) => m.seq,
            Message::IoCompletion(m) => m.seq,
            Message::Interrupt(m) => m.seq,
            Message::InterruptAck(m) => m.seq,
            Message::Control(m) => m.seq,
            Message::Nack(m) => m.seq,
            Message::Dma(m) => m.seq,
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            Message::Control(m) => m.payload,
            Message::Dma(m) => m.payload,
            _ => &[],
        }
    }
}

/// Ethernet addressing of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EthernetRepr {
    pub dst: MacAddr,
    pub src: MacAddr,
}

/// A whole frame: addressing, message and the optional tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameRepr<'a> {
    pub eth: EthernetRepr,
    pub msg: Message<'a>,
    /// Set by a sender that retransmits.
    pub retransmit: bool,
    /// Opaque authentication tag; verifying it is the receiver's job
    /// ([`crate::auth::KeyRing::verify`]).
    pub auth_tag: Option<[u8; AUTH_TAG_LEN]>,
    /// Which of the client platform's keys sealed the frame.
    pub key_id: u8,
    /// The server's epoch as the sender knows it ([`crate::session`]).
    pub epoch: u32,
}

impl<'a> FrameRepr<'a> {
    /// A frame without tag and retransmit mark.
    pub fn new(eth: EthernetRepr, msg: Message<'a>) -> Self {
        FrameRepr { eth, msg, retransmit: false, auth_tag: None, key_id: 0, epoch: 0 }
    }

    /// Parse bytes from the wire: the checked view, then [`FrameRepr::parse`].
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<Self, WireError> {
        FrameRepr::parse(&Frame::new_checked(bytes)?)
    }

    /// Parse and validate a checked frame.
    pub fn parse(frame: &Frame<&'a [u8]>) -> Result<Self, WireError> {
        let h = frame.header();
        let kind = frame.kind();
        let f = frame.flags();
        let route = Route {
            server: h.server_id.get(),
            hypervisor: h.hypervisor_id.get(),
            client: h.client_id.get(),
            vm: h.vm_id.get(),
            vcpu: h.vcpu_id.get(),
            device: h.device_id.get(),
        };
        let seq = h.seq.get();
        let payload = frame.payload_ref();

        // Which flag bits each kind may carry besides AUTH_TAG and RETRANSMIT.
        let kind_flags = match kind {
            Kind::IoRequest | Kind::IoCompletion => flags::WRITE,
            Kind::Interrupt => flags::LEVEL | flags::ASSERTED,
            Kind::DmaRead | Kind::DmaWrite => flags::REPLY,
            _ => 0,
        };
        if f & !(kind_flags | flags::AUTH_TAG | flags::RETRANSMIT) != 0 {
            return Err(WireError::BadFlags);
        }
        if !matches!(kind, Kind::Control | Kind::DmaRead | Kind::DmaWrite) && !payload.is_empty() {
            return Err(WireError::UnexpectedPayload);
        }
        let no_io_fields = |h: &Header, space_used: bool, status_used: bool| {
            if !space_used && h.space != 0 {
                return Err(WireError::BadSpace);
            }
            if h.size != 0 {
                return Err(WireError::BadSize);
            }
            if !status_used && h.status != 0 {
                return Err(WireError::BadStatus);
            }
            Ok(())
        };

        let msg = match kind {
            Kind::IoRequest | Kind::IoCompletion => {
                let space = match h.space {
                    1 => Space::Pio,
                    2 => Space::Mmio,
                    _ => return Err(WireError::BadSpace),
                };
                let size = AccessSize::new(h.size, space).ok_or(WireError::BadSize)?;
                let addr = h.addr.get();
                if space == Space::Pio && addr > u64::from(u16::MAX) {
                    return Err(WireError::BadSpace);
                }
                let data = h.data.get();
                if data & !size.mask() != 0 {
                    return Err(WireError::DataTooWide);
                }
                let dir = if f & flags::WRITE != 0 { Direction::Write } else { Direction::Read };
                if kind == Kind::IoRequest {
                    if h.status != 0 {
                        return Err(WireError::BadStatus);
                    }
                    Message::IoRequest(IoRequest { route, seq, space, dir, size, addr, data })
                } else {
                    let status = Status::from_u8(h.status).ok_or(WireError::BadStatus)?;
                    Message::IoCompletion(IoCompletion { route, seq, space, dir, size, addr, data, status })
                }
            }
            Kind::Interrupt => {
                no_io_fields(h, true, false)?;
                let source = match h.space {
                    1 => IrqSource::Line(u32::try_from(h.addr.get()).map_err(|_| WireError::DataTooWide)?),
                    2 => IrqSource::Msi {
                        address: h.addr.get(),
                        data: u32::try_from(h.data.get()).map_err(|_| WireError::DataTooWide)?,
                    },
                    _ => return Err(WireError::BadSpace),
                };
                let trigger = match (f & flags::LEVEL != 0, f & flags::ASSERTED != 0) {
                    (false, false) => Trigger::Edge,
                    (false, true) => return Err(WireError::BadFlags),
                    (true, asserted) => Trigger::Level { asserted },
                };
                if matches!(source, IrqSource::Msi { .. }) && trigger != Trigger::Edge {
                    return Err(WireError::BadFlags);
                }
                Message::Interrupt(Interrupt { route, seq, source, trigger })
            }
            Kind::InterruptAck => {
                no_io_fields(h, false, false)?;
                Message::InterruptAck(InterruptAck { route, seq })
            }
            Kind::Control => {
                no_io_fields(h, true, false)?;
                let op = ControlOp::from_u8(h.space).ok_or(WireError::BadSpace)?;
                Message::Control(ControlMsg { route, seq, op, payload })
            }
            Kind::Nack => {
                no_io_fields(h, true, true)?;
                let nacked = Kind::from_u8(h.space).ok_or(WireError::BadSpace)?;
                let reason = NackReason::from_u8(h.status).ok_or(WireError::BadStatus)?;
                Message::Nack(Nack { route, seq, reason, nacked })
            }
            Kind::DmaRead | Kind::DmaWrite => {
                no_io_fields(h, false, false)?;
                let dir = if kind == Kind::DmaRead { DmaDir::Read } else { DmaDir::Write };
                let reply = f & flags::REPLY != 0;
                let len = u32::try_from(h.data.get()).map_err(|_| WireError::DataTooWide)?;
                if len == 0 || len > MAX_DMA_CHUNK {
                    return Err(WireError::DataTooWide);
                }
                let addr = h.addr.get();
                if addr.checked_add(u64::from(len) - 1).is_none() {
                    return Err(WireError::DataTooWide);
                }
                let want = if Dma::carries_data(dir, reply) { len as usize } else { 0 };
                if payload.len() != want {
                    return Err(WireError::UnexpectedPayload);
                }
                Message::Dma(Dma { route, seq, dir, reply, addr, len, payload })
            }
        };

        Ok(FrameRepr {
            eth: EthernetRepr { dst: frame.dst(), src: frame.src() },
            msg,
            retransmit: f & flags::RETRANSMIT != 0,
            auth_tag: frame.auth_tag().copied(),
            key_id: h.key_id,
            epoch: h.epoch.get(),
        })
    }

    /// Bytes [`FrameRepr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        ETHERNET_HEADER_LEN
            + HEADER_LEN
            + self.msg.payload().len()
            + if self.auth_tag.is_some() { AUTH_TAG_LEN } else { 0 }
    }

    /// Bytes [`FrameRepr::emit_sealed`] writes.
    pub fn sealed_len(&self) -> usize {
        ETHERNET_HEADER_LEN + HEADER_LEN + self.msg.payload().len() + AUTH_TAG_LEN
    }

    /// Write the frame sealed with `key` (its id in the header, the tag
    /// after the payload; `auth_tag` and `key_id` of `self` are ignored);
    /// returns the bytes written.
    pub fn emit_sealed(&self, buf: &mut [u8], key: &crate::auth::SendKey) -> Result<usize, WireError> {
        let repr = FrameRepr { auth_tag: Some([0; AUTH_TAG_LEN]), key_id: key.id, ..*self };
        let n = repr.emit(buf)?;
        crate::auth::seal(buf, n, key);
        Ok(n)
    }

    /// Write the frame to the start of `buf`; returns the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let len = self.buffer_len();
        let payload = self.msg.payload();
        if buf.len() < len {
            return Err(WireError::BufferTooSmall);
        }
        let payload_len = u16::try_from(payload.len()).map_err(|_| WireError::BufferTooSmall)?;

        let eth = EthernetHeader { dst: self.eth.dst.0, src: self.eth.src.0, ethertype: U16::new(ETHERTYPE_DMFABRIC) };
        let route = *self.msg.route();
        let mut f = 0u16;
        if self.retransmit {
            f |= flags::RETRANSMIT;
        }
        if self.auth_tag.is_some() {
            f |= flags::AUTH_TAG;
        }
        let (mut space, mut size, mut status, mut addr, mut data) = (0u8, 0u8, 0u8, 0u64, 0u64);
        match &self.msg {
            Message::IoRequest(m) => {
                space = m.space as u8;
                size = m.size.bytes();
                addr = m.addr;
                data = m.data & m.size.mask();
                if m.dir == Direction::Write {
                    f |= flags::WRITE;
                }
            }
            Message::IoCompletion(m) => {
                space = m.space as u8;
                size = m.size.bytes();
                status = m.status as u8;
                addr = m.addr;
                data = m.data & m.size.mask();
                if m.dir == Direction::Write {
                    f |= flags::WRITE;
                }
            }
            Message::Interrupt(m) => {
                match m.source {
                    IrqSource::Line(line) => {
                        space = 1;
                        addr = u64::from(line);
                    }
                    IrqSource::Msi { address, data: d } => {
                        space = 2;
                        addr = address;
                        data = u64::from(d);
                    }
                }
                if let Trigger::Level { asserted } = m.trigger {
                    f |= flags::LEVEL;
                    if asserted {
                        f |= flags::ASSERTED;
                    }
                }
            }
            Message::InterruptAck(_) => {}
            Message::Control(m) => space = m.op as u8,
            Message::Nack(m) => {
                space = m.nacked as u8;
                status = m.reason as u8;
            }
            Message::Dma(m) => {
                addr = m.addr;
                data = u64::from(m.len);
                if m.reply {
                    f |= flags::REPLY;
                }
            }
        }
        let hdr = Header {
            magic: U16::new(MAGIC),
            version: VERSION,
            kind: self.msg.kind() as u8,
            flags: U16::new(f),
            payload_len: U16::new(payload_len),
            server_id: U16::new(route.server),
            hypervisor_id: U16::new(route.hypervisor),
            client_id: U16::new(route.client),
            vcpu_id: U16::new(route.vcpu),
            vm_id: U32::new(route.vm),
            device_id: U32::new(route.device),
            seq: U64::new(self.msg.seq()),
            space,
            size,
            status,
            key_id: self.key_id,
            epoch: U32::new(self.epoch),
            addr: U64::new(addr),
            data: U64::new(data),
        };
        buf[..ETHERNET_HEADER_LEN].copy_from_slice(eth.as_bytes());
        let mut at = ETHERNET_HEADER_LEN;
        buf[at..at + HEADER_LEN].copy_from_slice(hdr.as_bytes());
        at += HEADER_LEN;
        buf[at..at + payload.len()].copy_from_slice(payload);
        at += payload.len();
        if let Some(tag) = &self.auth_tag {
            buf[at..at + AUTH_TAG_LEN].copy_from_slice(tag);
            at += AUTH_TAG_LEN;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dma(dir: DmaDir, reply: bool, addr: u64, len: u32, payload: &[u8]) -> FrameRepr<'_> {
        let msg = Message::Dma(Dma { route: Route::default(), seq: 9, dir, reply, addr, len, payload });
        FrameRepr::new(EthernetRepr { dst: MacAddr([2; 6]), src: MacAddr([4; 6]) }, msg)
    }

    fn emitted(repr: &FrameRepr<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    #[test]
    fn dma_frames_round_trip_and_carry_data_only_where_they_should() {
        let bytes = [0xabu8; 1400];
        for repr in [
            dma(DmaDir::Read, false, 0x10_0000, 1400, &[]),
            dma(DmaDir::Read, true, 0x10_0000, 1400, &bytes),
            dma(DmaDir::Write, false, 0x10_0000, 1400, &bytes),
            dma(DmaDir::Write, true, 0x10_0000, 1400, &[]),
            dma(DmaDir::Read, false, u64::MAX, 1, &[]),
        ] {
            let buf = emitted(&repr);
            assert_eq!(FrameRepr::parse_bytes(&buf).unwrap(), repr);
        }
    }

    #[test]
    fn dma_frames_whose_length_and_payload_disagree_are_refused() {
        let bytes = [1u8; 16];
        let cases = [
            (dma(DmaDir::Read, false, 0x1000, 16, &bytes), WireError::UnexpectedPayload),
            (dma(DmaDir::Read, true, 0x1000, 17, &bytes), WireError::UnexpectedPayload),
            (dma(DmaDir::Write, false, 0x1000, 8, &bytes), WireError::UnexpectedPayload),
            (dma(DmaDir::Write, true, 0x1000, 16, &bytes), WireError::UnexpectedPayload),
            (dma(DmaDir::Read, false, 0x1000, 0, &[]), WireError::DataTooWide),
            (dma(DmaDir::Read, false, u64::MAX, 2, &[]), WireError::DataTooWide),
        ];
        for (repr, want) in cases {
            let buf = emitted(&repr);
            assert_eq!(FrameRepr::parse_bytes(&buf).err(), Some(want), "{repr:?}");
        }
        // A write flag on a DMA frame is not one of its flags.
        let mut buf = emitted(&dma(DmaDir::Read, false, 0x1000, 16, &[]));
        buf[ETHERNET_HEADER_LEN + 5] |= flags::WRITE as u8;
        assert_eq!(FrameRepr::parse_bytes(&buf).err(), Some(WireError::BadFlags));
    }
}
