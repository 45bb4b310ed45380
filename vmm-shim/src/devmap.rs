//! Dispatch by address (vm-device's `bus` is the model): a VM's port and
//! MMIO ranges, each pointing at a target, built once, overlaps rejected at
//! registration, looked up per exit by binary search.

use dmfabric_devices::platform::pc::{PcLayout, Role};
use dmfabric_wire::Space;

/// Where a range of a VM goes: a device model in this process (the hybrid
/// case), or a device on a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Local(usize),
    Remote(Remote),
    /// The debug port of test guests ([`crate::debugport`]), served by the
    /// vCPU's own router.
    Debug,
}

impl Target {
    /// Device `device` on `server`, which runs it itself and raises no
    /// interrupt (see [`Remote`] for the rest).
    pub const fn remote(server: u16, device: u32) -> Target {
        Target::Remote(Remote::new(server, device))
    }
}

/// The device id that means "whichever device of the VM the server finds
/// at the address" (the server resolves it); in a map's grants, any
/// device run by that server.
pub const ANY_DEVICE: u32 = 0;

/// A device on a server, and what it may send the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    /// Where requests go: the VM's owner server, or the device's own.
    pub server: u16,
    pub device: u32,
    /// The server that runs the model: the one whose session numbers the
    /// requests and whose interrupts for the device are taken.
    pub runs_on: u16,
    /// The IRQ lines the device may raise (bit n: line n; lines are < 32).
    pub lines: u32,
    /// Whether the device may reset the VM (an i8042).
    pub reset: bool,
    /// Whether the device may send the VM MSIs (its remote I/O APIC).
    pub msi: bool,
}

impl Remote {
    pub const fn new(server: u16, device: u32) -> Remote {
        Remote { server, device, runs_on: server, lines: 0, reset: false, msi: false }
    }

    /// The same, run by `server` (requests go to an owner server).
    pub const fn runs_on(self, server: u16) -> Remote {
        Remote { runs_on: server, ..self }
    }

    /// The same, allowed to raise `lines` (lines of 32 and up are ignored).
    pub fn lines(self, lines: &[u32]) -> Remote {
        let mask = lines.iter().filter(|&&l| l < 32).fold(0u32, |m, &l| m | (1 << l));
        Remote { lines: self.lines | mask, ..self }
    }

    /// The same, allowed to reset the VM.
    pub const fn resets(self) -> Remote {
        Remote { reset: true, ..self }
    }

    /// The same, allowed to send the VM MSIs (the VM's I/O APIC).
    pub const fn msis(self) -> Remote {
        Remote { msi: true, ..self }
    }

    /// Whether the device may raise IRQ line `line`.
    pub fn may_raise(&self, line: u32) -> bool {
        line < 32 && self.lines & (1 << line) != 0
    }
}

/// The ranges of `roles` of VM `layout`'s PC devices on `server`, as
/// [`PcLayout`] numbers them (`dmfabric server --pc-vm N` hosts them),
/// each allowed its own lines, the i8042 the reset.
pub fn pc_remote_ranges(server: u16, layout: &PcLayout, roles: &[Role]) -> Vec<(Space, u64, u64, Target)> {
    let specs = layout.specs();
    layout
        .vm_ranges(roles)
        .into_iter()
        .map(|(s, b, l, device)| {
            let mut r = Remote::new(server, device);
            if let Some(spec) = specs.iter().find(|d| d.id == device) {
                r = r.lines(&spec.kind.lines());
                if spec.kind.may_reset() {
                    r = r.resets();
                }
            }
            (s, b, l, Target::Remote(r))
        })
        .collect()
}

/// Why a range could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("{space:?} range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap { space: Space, base: u64, len: u64, other_base: u64, other_len: u64 },
    #[error("{space:?} range {base:#x}+{len:#x} is empty or runs past the end of the space")]
    BadRange { space: Space, base: u64, len: u64 },
}

#[derive(Debug, Clone)]
struct Entry<T> {
    base: u64,
    len: u64,
    target: T,
}

/// Where a VM's accesses go. `T` is what a range points at (a local device
/// index, a remote server and device, ...).
#[derive(Debug, Clone)]
pub struct DeviceMap<T> {
    pio: Vec<Entry<T>>,
    mmio: Vec<Entry<T>>,
}

impl<T> Default for DeviceMap<T> {
    fn default() -> Self {
        DeviceMap { pio: Vec::new(), mmio: Vec::new() }
    }
}

impl<T: Copy> DeviceMap<T> {
    /// Map `[base, base + len)` of `space` to `target`.
    pub fn add(&mut self, space: Space, base: u64, len: u64, target: T) -> Result<(), MapError> {
        let limit: u64 = match space {
            Space::Pio => 1 << 16,
            Space::Mmio => u64::MAX,
        };
        let end = base.checked_add(len).filter(|&e| len > 0 && e <= limit);
        if end.is_none() {
            return Err(MapError::BadRange { space, base, len });
        }
        let list = self.list_mut(space);
        let at = list.partition_point(|e| e.base < base);
        for neighbour in [at.checked_sub(1), Some(at)].into_iter().flatten() {
            if let Some(e) = list.get(neighbour) {
                if base < e.base + e.len && e.base < base + len {
                    return Err(MapError::Overlap { space, base, len, other_base: e.base, other_len: e.len });
                }
            }
        }
        list.insert(at, Entry { base, len, target });
        Ok(())
    }

    /// The target of an access of `size` bytes at `addr`, if a range holds
    /// all of it.
    pub fn lookup(&self, space: Space, addr: u64, size: u8) -> Option<T> {
        let list = match space {
            Space::Pio => &self.pio,
            Space::Mmio => &self.mmio,
        };
        let at = list.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let e = &list[at];
        let end = addr.checked_add(u64::from(size))?;
        (end <= e.base + e.len).then_some(e.target)
    }

    /// Every target, each range's once.
    pub fn targets(&self) -> impl Iterator<Item = &T> {
        self.pio.iter().chain(&self.mmio).map(|e| &e.target)
    }

    fn list_mut(&mut self, space: Space) -> &mut Vec<Entry<T>> {
        match space {
            Space::Pio => &mut self.pio,
            Space::Mmio => &mut self.mmio,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_find_the_range_holding_the_whole_access() {
        let mut m = DeviceMap::default();
        m.add(Space::Pio, 0x3f8, 8, 'u').unwrap();
        m.add(Space::Pio, 0x60, 1, 'k').unwrap();
        m.add(Space::Pio, 0x64, 1, 'c').unwrap();
        m.add(Space::Mmio, 0xd000_0000, 0x1000, 'm').unwrap();
        assert_eq!(m.lookup(Space::Pio, 0x3f8, 1), Some('u'));
        assert_eq!(m.lookup(Space::Pio, 0x3ff, 1), Some('u'));
        assert_eq!(m.lookup(Space::Pio, 0x3fe, 4), None, "runs past the range");
        assert_eq!(m.lookup(Space::Pio, 0x64, 1), Some('c'));
        assert_eq!(m.lookup(Space::Pio, 0x61, 1), None);
        assert_eq!(m.lookup(Space::Mmio, 0xd000_0ff8, 8), Some('m'));
        assert_eq!(m.lookup(Space::Mmio, 0xcfff_ffff, 1), None);
        assert_eq!(m.lookup(Space::Mmio, u64::MAX, 8), None, "no overflow");
        assert_eq!(m.lookup(Space::Pio, 0xd000_0000, 1), None, "spaces are apart");
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut m = DeviceMap::default();
        m.add(Space::Pio, 0x100, 0x10, 1).unwrap();
        for (base, len) in [(0x10f, 1), (0xf8, 0x10), (0x100, 0x10), (0x104, 2), (0x0, 0x1000)] {
            assert!(matches!(m.add(Space::Pio, base, len, 2), Err(MapError::Overlap { .. })), "{base:#x}+{len:#x}");
        }
        m.add(Space::Pio, 0x110, 1, 3).unwrap();
        m.add(Space::Pio, 0xff, 1, 4).unwrap();
        assert!(matches!(m.add(Space::Pio, 0xfff0, 0x20, 5), Err(MapError::BadRange { .. })));
        assert!(matches!(m.add(Space::Mmio, 1, 0, 5), Err(MapError::BadRange { .. })));
        assert!(matches!(m.add(Space::Mmio, u64::MAX, 2, 5), Err(MapError::BadRange { .. })));
    }
}
