use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First two bytes of every dmfabric header ("DF").
pub const MAGIC: u16 = 0x4446;
/// The protocol version this build speaks.
pub const VERSION: u8 = 2;
/// Bytes in [`Header`].
pub const HEADER_LEN: usize = 56;
/// Bytes of the authentication tag after the payload ([`crate::auth`]).
pub const AUTH_TAG_LEN: usize = 16;

/// The fixed dmfabric header, in network byte order.
///
/// ```text
///  0 magic        u16    "DF"
///  2 version      u8
///  3 kind         u8     Kind
///  4 flags        u16    flags::*
///  6 payload_len  u16    bytes after the header, before the tag
///  8 server_id    u16
/// 10 hypervisor   u16
/// 12 client_id    u16    client platform
/// 14 vcpu_id      u16
/// 16 vm_id        u32
/// 20 device_id    u32
/// 24 seq          u64    per (client, VM, vCPU) stream, or per interrupt source
/// 32 space        u8     IoRequest/IoCompletion: Space; Interrupt: 1 line, 2 MSI;
///                        Control: ControlOp; Nack: the nacked Kind; DMA: 0
/// 33 size         u8     access size in bytes (I/O kinds), else 0
/// 34 status       u8     IoCompletion: Status; Nack: NackReason; else 0
/// 35 key_id       u8     which of the client platform's keys sealed the frame
/// 36 epoch        u32    the server's epoch (low 32 bits) as the sender knows
///                        it: a client starting a stream, a server's frames
///                        (see `session`); else 0
/// 40 addr         u64    port / MMIO address; Interrupt: line or MSI address;
///                        DMA: guest-physical address
/// 48 data         u64    write data / read result; Interrupt: MSI data;
///                        DMA: bytes read or written (the payload's length
///                        where the frame carries the data)
/// ```
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    pub magic: U16,
    pub version: u8,
    pub kind: u8,
    pub flags: U16,
    pub payload_len: U16,
    pub server_id: U16,
    pub hypervisor_id: U16,
    pub client_id: U16,
    pub vcpu_id: U16,
    pub vm_id: U32,
    pub device_id: U32,
    pub seq: U64,
    pub space: u8,
    pub size: u8,
    pub status: u8,
    pub key_id: u8,
    pub epoch: U32,
    pub addr: U64,
    pub data: U64,
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);

/// Header flag bits.
pub mod flags {
    /// I/O kinds: the access is a write (OUT / MMIO store).
    pub const WRITE: u16 = 1 << 0;
    /// An authentication tag of `AUTH_TAG_LEN` bytes follows the payload
    /// (every frame a dmfabric endpoint acts on carries one).
    pub const AUTH_TAG: u16 = 1 << 1;
    /// Interrupt: level-triggered (otherwise edge).
    pub const LEVEL: u16 = 1 << 2;
    /// Interrupt, level-triggered: the line is asserted (otherwise deasserted).
    pub const ASSERTED: u16 = 1 << 3;
    /// The sender retransmitted this frame (informational).
    pub const RETRANSMIT: u16 = 1 << 4;
    /// DmaRead / DmaWrite: the client's answer (otherwise the server's request).
    pub const REPLY: u16 = 1 << 5;
    /// Every defined bit.
    pub const ALL: u16 = WRITE | AUTH_TAG | LEVEL | ASSERTED | RETRANSMIT | REPLY;
}

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    IoRequest = 1,
    IoCompletion = 2,
    Interrupt = 3,
    InterruptAck = 4,
    Control = 5,
    Nack = 6,
    /// A device model on a server reads its VM's memory: the server asks
    /// (no payload), the client answers with the bytes (flag `REPLY`).
    DmaRead = 7,
    /// A device model on a server writes its VM's memory: the server sends
    /// the bytes, the client acknowledges (flag `REPLY`, no payload).
    DmaWrite = 8,
}

impl Kind {
    /// The kind for a raw byte, if defined.
    pub const fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::IoRequest,
            2 => Kind::IoCompletion,
            3 => Kind::Interrupt,
            4 => Kind::InterruptAck,
            5 => Kind::Control,
            6 => Kind::Nack,
            7 => Kind::DmaRead,
            8 => Kind::DmaWrite,
            _ => return None,
        })
    }
}

/// Completion status of an I/O access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// The device model handled the access.
    Ok = 0,
    /// The device has no register at that offset or of that size; reads
    /// returned all ones, writes were ignored (as real hardware does).
    Unclaimed = 1,
}

impl Status {
    pub const fn from_u8(v: u8) -> Option<Status> {
        match v {
            0 => Some(Status::Ok),
            1 => Some(Status::Unclaimed),
            _ => None,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NackReason {
    UnknownDevice = 1,
    UnknownVm = 2,
    NotAuthorised = 3,
    BadVersion = 4,
    WrongServer = 5,
    /// The frame's session is not (or no longer) one the server holds for
    /// the client platform: it restarted, or forgot an idle client. The
    /// client says Hello again and asks anew.
    NoSession = 6,
    /// DMA: the range is not the VM's memory.
    OutOfRange = 7,
}

impl NackReason {
    pub const fn from_u8(v: u8) -> Option<NackReason> {
        Some(match v {
            1 => NackReason::UnknownDevice,
            2 => NackReason::UnknownVm,
            3 => NackReason::NotAuthorised,
            4 => NackReason::BadVersion,
            5 => NackReason::WrongServer,
            6 => NackReason::NoSession,
            7 => NackReason::OutOfRange,
            _ => return None,
        })
    }
}

/// Control message operations; the body, if any, is the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ControlOp {
    /// A client platform opens a session with a server (payload
    /// [`crate::session::HelloBody`]); sent to broadcast to find its MAC.
    Hello = 1,
    /// The server's answer, from its MAC: the client's challenge, the
    /// server's epoch and the session offered ([`crate::session::HelloReplyBody`]).
    HelloReply = 2,
    Heartbeat = 3,
    Register = 4,
    Lifecycle = 5,
    RoutingUpdate = 6,
}

/// Payload byte of a `Lifecycle` control message from a server to a
/// client: a device model asks for a reset of the VM (the i8042's reset
/// line). Its route names the VM and the device.
pub const LIFECYCLE_RESET: u8 = 1;

impl ControlOp {
    pub const fn from_u8(v: u8) -> Option<ControlOp> {
        Some(match v {
            1 => ControlOp::Hello,
            2 => ControlOp::HelloReply,
            3 => ControlOp::Heartbeat,
            4 => ControlOp::Register,
            5 => ControlOp::Lifecycle,
            6 => ControlOp::RoutingUpdate,
            _ => return None,
        })
    }
}
