//! The server side of dmfabric: device models and the server that runs them.
//!
//! Owns: the [`device::Device`] trait, the device models (so far the
//! register-file test device), the per-server device table and the server's
//! frame handling ([`server`]): validate, look up the device, run the
//! model, emit the completion, count everything that is dropped.
//!
//! Does not own: transports and poll loops (`dmfabric-dataplane`), the
//! frame format (`dmfabric-wire`) or placement (`dmfabric-control`).

#![forbid(unsafe_code)]

pub mod console;
pub mod devices;
pub mod irq;
pub mod placed;
pub mod server;
pub mod sharded;
