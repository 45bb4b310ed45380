//! Test guests, assembled from `guests/*.S` by build.rs with the system
//! assembler, as flat binaries linked to run at [`LOAD_ADDR`].

/// Guest-physical address the guests are linked for and loaded at.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// `io_loop`: rdi iterations of OUT/IN on port rsi and an 8-byte MMIO
/// write/read at rdx; reports a checksum on the debug port, then halts.
pub const IO_LOOP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/io_loop.bin"));

/// The checksum `io_loop` reports against a device whose registers read
/// back what was written (a register file).
pub fn io_loop_checksum(iterations: u64) -> u64 {
    (0..iterations).fold(0u64, |sum, i| sum.wrapping_add(i & 0xffff_ffff).wrapping_add(i.wrapping_mul(3)))
}
