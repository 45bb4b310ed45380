//! Virtio devices over the MMIO transport (virtio 1.2, "modern" only:
//! MMIO version 2, split virtqueues), for guests that find them on the
//! kernel command line (`virtio_mmio.device=512@0xfeb00000:10`) or in
//! their firmware tables.
//!
//! A virtio model is a [`crate::dma::DmaDevice`]: it never touches guest
//! memory itself. A notify makes it read the rings and buffers through DMA
//! requests its host carries out, in any order and possibly tens of
//! microseconds later; it writes results back the same way and publishes
//! a used buffer only once the host said every write for it is done.
//!
//! - [`mmio`]: the transport's registers, feature negotiation and status.
//! - [`queue`]: the split virtqueue's layout and its descriptor chains,
//!   each checked before it is used.
//! - [`blk`]: the block device (`virtio-blk`).

pub mod blk;
pub mod mmio;
pub mod queue;

/// The device follows virtio 1.x (no legacy interface): the driver must
/// accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    /// Set by the device: it hit an error it cannot recover from, and the
    /// driver must reset it.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
    /// Every bit a status may hold.
    pub const ALL: u32 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED;
}

/// InterruptStatus bit: a used buffer was published.
pub const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the configuration (or the device status) changed.
pub const INT_CONFIG_CHANGE: u32 = 2;
