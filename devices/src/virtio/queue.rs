//! The split virtqueue (virtio 1.2 §2.7): where its three areas sit, how
//! big they are, and walking a descriptor chain in a copy of the
//! descriptor table — every index, flag and range checked, every walk
//! bounded by the queue size.

use serde::{Deserialize, Serialize};

/// The largest queue a driver may choose (QueueNumMax).
pub const QUEUE_NUM_MAX: u16 = 256;

/// Bytes of one descriptor.
pub const DESC_SIZE: u64 = 16;

/// Descriptor flag: the chain goes on at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer (else it reads it).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (not offered).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// One queue as the driver configured it through the transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// QueueNum as written: only a power of two up to [`QUEUE_NUM_MAX`]
    /// makes the queue ready.
    pub size: u32,
    pub ready: bool,
    /// The descriptor table.
    pub desc: u64,
    /// The driver area (available ring).
    pub driver: u64,
    /// The device area (used ring).
    pub device: u64,
}

/// Why a queue cannot be made ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("Queue size {0} is not a power of two from 1 to {QUEUE_NUM_MAX}")]
    Size(u32),
    #[error("A ring is not aligned as virtio requires (descriptors 16, available ring 2, used ring 4 bytes)")]
    Misaligned,
    #[error("A ring runs past the end of the address space")]
    Wraps,
    #[error("The descriptor table, available ring and used ring overlap")]
    Overlap,
}

impl QueueConfig {
    /// The queue size, if it is one a queue may have.
    pub fn checked_size(&self) -> Result<u16, LayoutError> {
        let n = self.size;
        if n == 0 || n > u32::from(QUEUE_NUM_MAX) || !n.is_power_of_two() {
            return Err(LayoutError::Size(n));
        }
        Ok(n as u16)
    }

    /// The three areas `[start, end)`: descriptor table, available ring
    /// (with `used_event`), used ring (with `avail_event`).
    pub fn areas(&self) -> Result<[(u64, u64); 3], LayoutError> {
        let n = u64::from(self.checked_size()?);
        let area = |base: u64, len: u64| base.checked_add(len).map(|end| (base, end)).ok_or(LayoutError::Wraps);
        Ok([area(self.desc, DESC_SIZE * n)?, area(self.driver, 6 + 2 * n)?, area(self.device, 6 + 8 * n)?])
    }

    /// Whether the queue may be made ready: a valid size, aligned areas
    /// that neither wrap nor overlap. A driver that gets this wrong would
    /// have the device write its used ring over its descriptors.
    pub fn check(&self) -> Result<u16, LayoutError> {
        let n = self.checked_size()?;
        if self.desc % 16 != 0 || self.driver % 2 != 0 || self.device % 4 != 0 {
            return Err(LayoutError::Misaligned);
        }
        let areas = self.areas()?;
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                if a.0 < b.1 && b.0 < a.1 {
                    return Err(LayoutError::Overlap);
                }
            }
        }
        Ok(n)
    }

    /// Where the available ring's `idx` and entries start (read together:
    /// flags, idx, ring).
    pub fn avail_read(&self, n: u16) -> (u64, u32) {
        (self.driver, 4 + 2 * u32::from(n))
    }

    /// Where used element `pos` (already reduced modulo the size) sits.
    pub fn used_elem(&self, pos: u16) -> u64 {
        self.device + 4 + 8 * u64::from(pos)
    }

    /// Where the used ring's `idx` sits.
    pub fn used_idx(&self) -> u64 {
        self.device + 2
    }
}

/// One descriptor as read from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    /// Descriptor `i` of `table`, if the table holds it.
    pub fn at(table: &[u8], i: u16) -> Option<Descriptor> {
        let start = usize::from(i) * DESC_SIZE as usize;
        let b = table.get(start..start + DESC_SIZE as usize)?;
        Some(Descriptor {
            addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
            len: u32::from_le_bytes(b[8..12].try_into().ok()?),
            flags: u16::from_le_bytes(b[12..14].try_into().ok()?),
            next: u16::from_le_bytes(b[14..16].try_into().ok()?),
        })
    }

    pub fn writable(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }

    /// Whether `addr .. addr + len` is a range of the address space (its
    /// last byte addressable).
    pub fn in_address_space(&self) -> bool {
        self.len == 0 || self.addr.checked_add(u64::from(self.len) - 1).is_some()
    }
}

/// Why a chain cannot be walked: the driver broke the ring, and no status
/// can be reported for it (where its status byte is, is unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("The head {0} is not a descriptor of the table")]
    Head(u16),
    #[error("A descriptor's next {0} is not a descriptor of the table")]
    Next(u16),
    #[error("The chain comes back to descriptor {0}")]
    Loop(u16),
    #[error("The chain is longer than the queue")]
    TooLong,
    #[error("An indirect descriptor (not offered)")]
    Indirect,
    #[error("A device-readable descriptor follows a device-writable one")]
    Order,
}

/// The chain starting at `head` in `table` (a queue of `n` descriptors).
///
/// The walk visits each descriptor at most once and takes at most `n`
/// steps: a chain of direct descriptors that is longer than the queue has
/// to come back to a descriptor it passed, and is reported as the loop it
/// is ([`ChainError::Loop`]); [`ChainError::TooLong`] is the backstop for a
/// table shorter than `n` descriptors.
pub fn walk(table: &[u8], n: u16, head: u16) -> Result<Vec<Descriptor>, ChainError> {
    if head >= n {
        return Err(ChainError::Head(head));
    }
    let mut seen = vec![false; usize::from(n)];
    let mut chain = Vec::new();
    let mut i = head;
    let mut writing = false;
    // n + 1 steps: the last one, if reached, comes back to a descriptor seen.
    for _ in 0..=n {
        if std::mem::replace(&mut seen[usize::from(i)], true) {
            return Err(ChainError::Loop(i));
        }
        let d = Descriptor::at(table, i).ok_or(ChainError::TooLong)?;
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        if d.writable() {
            writing = true;
        } else if writing {
            return Err(ChainError::Order);
        }
        chain.push(d);
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        if d.next >= n {
            return Err(ChainError::Next(d.next));
        }
        i = d.next;
    }
    // n + 1 steps over n descriptors come back to one (caught above).
    Err(ChainError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(descs: &[(u64, u32, u16, u16)]) -> Vec<u8> {
        let mut t = Vec::new();
        for &(addr, len, flags, next) in descs {
            t.extend_from_slice(&addr.to_le_bytes());
            t.extend_from_slice(&len.to_le_bytes());
            t.extend_from_slice(&flags.to_le_bytes());
            t.extend_from_slice(&next.to_le_bytes());
        }
        t
    }

    #[test]
    fn layouts_are_checked() {
        let q = QueueConfig { size: 8, ready: false, desc: 0x1000, driver: 0x2000, device: 0x3000 };
        assert_eq!(q.check(), Ok(8));
        assert_eq!(QueueConfig { size: 6, ..q }.check(), Err(LayoutError::Size(6)));
        assert_eq!(QueueConfig { size: 512, ..q }.check(), Err(LayoutError::Size(512)));
        assert_eq!(QueueConfig { size: 0, ..q }.check(), Err(LayoutError::Size(0)));
        assert_eq!(QueueConfig { desc: 0x1008, ..q }.check(), Err(LayoutError::Misaligned));
        assert_eq!(QueueConfig { device: 0x2002, ..q }.check(), Err(LayoutError::Misaligned));
        // The available ring of 8 is 22 bytes: the used ring at +20 overlaps it.
        assert_eq!(QueueConfig { device: 0x2014, ..q }.check(), Err(LayoutError::Overlap));
        assert_eq!(QueueConfig { device: 0x2018, ..q }.check(), Ok(8));
        assert_eq!(QueueConfig { driver: 0x1070, ..q }.check(), Err(LayoutError::Overlap), "inside the table");
        assert_eq!(QueueConfig { device: u64::MAX - 3, ..q }.check(), Err(LayoutError::Wraps));
    }

    #[test]
    fn chains_are_walked_and_broken_ones_refused() {
        let ok = table(&[(0x100, 16, 1, 2), (0, 0, 0, 0), (0x200, 512, 3, 3), (0x300, 1, 2, 0)]);
        let c = walk(&ok, 4, 0).unwrap();
        assert_eq!(c.iter().map(|d| d.addr).collect::<Vec<_>>(), vec![0x100, 0x200, 0x300]);
        assert_eq!(walk(&ok, 4, 4), Err(ChainError::Head(4)));
        let looped = table(&[(0x100, 16, 1, 1), (0x200, 16, 1, 0)]);
        assert_eq!(walk(&looped, 2, 0), Err(ChainError::Loop(0)));
        let selfloop = table(&[(0x100, 16, 1, 0)]);
        assert_eq!(walk(&selfloop, 1, 0), Err(ChainError::Loop(0)));
        let far = table(&[(0x100, 16, 1, 9), (0, 0, 0, 0)]);
        assert_eq!(walk(&far, 2, 0), Err(ChainError::Next(9)));
        let indirect = table(&[(0x100, 16, 4, 0)]);
        assert_eq!(walk(&indirect, 1, 0), Err(ChainError::Indirect));
        let order = table(&[(0x100, 1, 3, 1), (0x200, 16, 0, 0)]);
        assert_eq!(walk(&order, 2, 0), Err(ChainError::Order));
        assert_eq!(walk(&ok[..32], 4, 0), Err(ChainError::TooLong), "a short table copy");
    }
}
