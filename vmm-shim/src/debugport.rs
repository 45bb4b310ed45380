//! The debug port test guests talk to the shim through, served by the
//! vCPU's router (a real device would not be worth a round trip):
//!
//! | port | access | meaning |
//! |---|---|---|
//! | base + 0 | OUT dword | report a value (kept in order, per vCPU) |
//! | base + 4 | OUT dword | exit with that code: the vCPU stops |
//!
//! Anything else there behaves as unmapped (reads all ones).

use dmfabric_wire::{AccessSize, Direction};

use crate::kvm::Exit;

/// Port of the debug device in test guests.
pub const DEBUG_PORT: u16 = 0x4f0;
/// Ports the debug device takes.
pub const DEBUG_PORT_LEN: u16 = 8;

/// What a debug-port access means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugOp {
    Report(u32),
    Exit(u32),
    Nothing,
}

/// Decode an access to the debug device at `base`.
pub fn decode(base: u64, exit: &Exit) -> DebugOp {
    if exit.dir != Direction::Write || exit.size != AccessSize::B4 {
        return DebugOp::Nothing;
    }
    match exit.addr.wrapping_sub(base) {
        0 => DebugOp::Report(exit.data as u32),
        4 => DebugOp::Exit(exit.data as u32),
        _ => DebugOp::Nothing,
    }
}

/// Two reported dwords at `i`, low then high, as one u64.
pub fn u64_at(words: &[u32], i: usize) -> Option<u64> {
    let lo = *words.get(i)?;
    let hi = *words.get(i + 1)?;
    Some(u64::from(lo) | (u64::from(hi) << 32))
}
