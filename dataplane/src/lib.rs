//! The dmfabric data plane.
//!
//! Owns: the [`Transport`] trait (burst receive/transmit of whole Ethernet
//! frames) and its implementations — AF_XDP ([`xdp`]), AF_PACKET
//! ([`packet`]), UDP ([`udp`]), in-memory ([`mem`]) and a fault-injecting
//! wrapper ([`fault`]); the bounded-burst poll loop with buffered TX
//! ([`poll`]); the SPSC rings between cores ([`ring`]); and the test hosts
//! (network namespaces joined by veth, [`netns`]).
//!
//! Does not own: what frames mean (that is `dmfabric-wire`) or what a
//! server or client does with them.
//!
//! `unsafe` is confined to `sys`, `packet`, `xdp` and `netns`.

pub mod batch;
pub mod fault;
pub mod mem;
pub mod netns;
pub mod packet;
pub mod poll;
pub mod ring;
mod sys;
pub mod transport;
pub mod udp;
pub mod xdp;

pub use batch::FrameBatch;
pub use transport::{Transport, TransportError, TransportKind, TransportStats};

/// Largest frame a transport carries (the UMEM frame size).
pub const FRAME_CAP: usize = 2048;
/// Most frames handled in one burst.
pub const MAX_BURST: usize = 64;

pub use sys::{if_index, if_mac};
