//! What a device model is to the server.

use std::time::Instant;

use dmfabric_wire::{AccessSize, Space};

/// A device model: register reads and writes in one or both address spaces.
///
/// `addr` is the full guest address of the access. A model that has no
/// register of that size at that address returns `None` from `read` and
/// `false` from `write`; the server then completes the access the way real
/// hardware would (reads all ones, writes ignored) and counts it.
///
/// Time is passed in: the server calls [`Device::tick`] with the current
/// instant before every access and whenever the deadline it returned has
/// come, so timers and console input are testable without sleeping.
pub trait Device: Send {
    /// A short kind name for counters.
    fn kind(&self) -> &'static str;
    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64>;
    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool;
    /// Bring the model to `now` (timers fire, input arrives); returns when
    /// it next wants a tick, if ever.
    fn tick(&mut self, _now: Instant) -> Option<Instant> {
        None
    }
    /// The model's state, to move it to another server
    /// ([`crate::devices::DeviceEnv::restore`] builds it again there).
    fn save(&self) -> serde_json::Value;
}
