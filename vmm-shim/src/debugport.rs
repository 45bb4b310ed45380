//! The debug port test guests report results through: every 32-bit OUT is
//! recorded; reads return all ones. A local device (a real one would not
//! be worth a round trip).

use dmfabric_dm_workers::device::Device;
use dmfabric_wire::{AccessSize, Space};

/// Port of the debug device in test guests.
pub const DEBUG_PORT: u16 = 0x4f0;

#[derive(Debug, Default, Clone)]
pub struct DebugPort {
    pub words: Vec<u32>,
}

impl DebugPort {
    /// Two reported dwords, low then high, as one u64.
    pub fn u64_at(&self, i: usize) -> Option<u64> {
        let lo = *self.words.get(i)?;
        let hi = *self.words.get(i + 1)?;
        Some(u64::from(lo) | (u64::from(hi) << 32))
    }
}

impl Device for DebugPort {
    fn kind(&self) -> &'static str {
        "debug-port"
    }

    fn read(&mut self, _space: Space, _addr: u64, _size: AccessSize) -> Option<u64> {
        None
    }

    fn write(&mut self, _space: Space, _addr: u64, size: AccessSize, data: u64) -> bool {
        if size != AccessSize::B4 {
            return false;
        }
        self.words.push(data as u32);
        true
    }
}
