//! The dmfabric frame format.
//!
//! Owns: the Ethernet header, the fixed dmfabric header (zerocopy types in
//! network byte order), the checked view [`Frame`] over untrusted bytes and
//! the [`FrameRepr`] / [`Message`] types with `parse` and `emit`.
//!
//! Does not own: any I/O, routing or reliability. No `unsafe` here.
//!
//! Layout of a frame on the wire:
//!
//! ```text
//! | Ethernet II (14) | dmfabric header (56) | payload (payload_len) | auth tag (16, if FLAG_AUTH_TAG) |
//! ```
//!
//! [`auth`] seals and checks the tag (SipHash-2-4-128 with a client
//! platform's key); [`session`] holds the Hello bodies and the layout of
//! sequence numbers (a session id and a counter).
//!
//! Receive paths construct a [`Frame`] only through [`Frame::new_checked`];
//! after it succeeds no accessor panics, and [`FrameRepr::parse`] finishes
//! the per-kind validation.

#![forbid(unsafe_code)]

pub mod auth;
mod error;
mod ethernet;
mod frame;
mod header;
mod repr;
pub mod session;

pub use error::WireError;
pub use ethernet::{EthernetHeader, MacAddr, ETHERNET_HEADER_LEN, ETHERTYPE_DMFABRIC};
pub use frame::Frame;
pub use header::{
    flags, ControlOp, Header, Kind, NackReason, Status, AUTH_TAG_LEN, HEADER_LEN, LIFECYCLE_RESET, MAGIC, VERSION,
};
pub use repr::{
    AccessSize, ControlMsg, Direction, Dma, DmaDir, EthernetRepr, FrameRepr, Interrupt, InterruptAck, IoCompletion,
    IoRequest, IrqSource, Message, Nack, Route, Space, Trigger, MAX_DMA_CHUNK,
};

/// Bytes of Ethernet plus dmfabric header: the smallest valid frame.
pub const MIN_FRAME_LEN: usize = ETHERNET_HEADER_LEN + HEADER_LEN;
