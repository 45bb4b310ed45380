//! The server side of dmfabric: what a server platform does with frames.
//!
//! Owns: the receive path as a pure classification of each frame
//! ([`rx`]), the server that carries it out ([`server`]) over a backend
//! that runs the device models inline or on worker shards ([`backend`],
//! [`sharded`], [`table`]), interrupt streams to the VMs ([`interrupts`],
//! [`irq`]), what models are wired to ([`env`]), consoles ([`console`]),
//! and the adapter that follows the control panel's placement
//! ([`placement`]).
//!
//! Does not own: the device models (`dmfabric-devices`), transports and
//! poll loops (`dmfabric-dataplane`), the frame format (`dmfabric-wire`) or
//! the database (`dmfabric-control`, reached only from [`placement`] and
//! the routing table [`rx`] reads).

#![forbid(unsafe_code)]

pub mod backend;
pub mod console;
pub mod dma;
pub mod env;
pub mod interrupts;
pub mod irq;
pub mod irqchip;
pub mod peers;
pub mod placement;
pub mod rx;
pub mod server;
pub mod sharded;
pub mod stats;
pub mod table;
/// A test client platform (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
