//! The register-file test device: a window of plain memory in port space
//! and/or MMIO space. Reads return what was written (little-endian, as the
//! guest sees memory); a fresh device reads as zeros.

use dmfabric_wire::{AccessSize, Space};

use crate::device::{Device, DeviceState, Persist, RestoreError};

/// The most bytes a window may hold (16 MiB): the bytes are allocated, so a
/// spec asking for more is refused ([`crate::DeviceSpec::check`]) and
/// [`RegisterFile::new`] never allocates more.
pub const MAX_WINDOW: u32 = 16 << 20;

/// An address window `[base, base + len)` with its bytes.
#[derive(Debug, Clone)]
struct Window {
    base: u64,
    bytes: Vec<u8>,
}

impl Window {
    fn range(&self, addr: u64, size: AccessSize) -> Option<std::ops::Range<usize>> {
        let off = addr.checked_sub(self.base)?;
        let end = off.checked_add(u64::from(size.bytes()))?;
        (end <= self.bytes.len() as u64).then_some(off as usize..end as usize)
    }
}

/// What a register file holds: the bytes of its windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegisterFileState {
    pub pio: Vec<u8>,
    pub mmio: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct RegisterFile {
    pio: Option<Window>,
    mmio: Option<Window>,
}

impl RegisterFile {
    /// A device with `pio = (base, len)` ports and `mmio = (base, len)` bytes.
    /// A window is at most [`MAX_WINDOW`] bytes: past that, accesses are
    /// not claimed (specs are checked before they get here; this is the
    /// backstop).
    pub fn new(pio: Option<(u16, u16)>, mmio: Option<(u64, u32)>) -> Self {
        let bytes = |len: u32| vec![0; len.min(MAX_WINDOW) as usize];
        RegisterFile {
            pio: pio.map(|(base, len)| Window { base: u64::from(base), bytes: bytes(u32::from(len)) }),
            mmio: mmio.map(|(base, len)| Window { base, bytes: bytes(len) }),
        }
    }

    fn window(&mut self, space: Space) -> Option<&mut Window> {
        match space {
            Space::Pio => self.pio.as_mut(),
            Space::Mmio => self.mmio.as_mut(),
        }
    }
}

impl Persist for RegisterFile {
    type State = RegisterFileState;
    /// The port and MMIO windows, as for [`RegisterFile::new`].
    type ConstructorArgs = (Option<(u16, u16)>, Option<(u64, u32)>);

    fn save(&self) -> RegisterFileState {
        let bytes = |w: &Option<Window>| w.as_ref().map_or_else(Vec::new, |w| w.bytes.clone());
        RegisterFileState { pio: bytes(&self.pio), mmio: bytes(&self.mmio) }
    }

    /// The windows hold the saved bytes; a window longer than its state is
    /// zero past it, a state longer than its window is refused.
    fn restore((pio, mmio): Self::ConstructorArgs, state: RegisterFileState) -> Result<Self, RestoreError> {
        let mut d = RegisterFile::new(pio, mmio);
        for (name, w, saved) in [("port", &mut d.pio, &state.pio), ("MMIO", &mut d.mmio, &state.mmio)] {
            let room = w.as_ref().map_or(0, |w| w.bytes.len());
            if saved.len() > room {
                let what = format!("{} {name} bytes for a window of {room}", saved.len());
                return Err(RestoreError::invalid("regfile", what));
            }
            if let Some(w) = w {
                w.bytes[..saved.len()].copy_from_slice(saved);
            }
        }
        Ok(d)
    }
}

impl Device for RegisterFile {
    fn kind(&self) -> &'static str {
        "regfile"
    }

    fn save(&self) -> DeviceState {
        DeviceState::RegFile(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let w = self.window(space)?;
        let r = w.range(addr, size)?;
        let mut le = [0u8; 8];
        le[..r.len()].copy_from_slice(&w.bytes[r]);
        Some(u64::from_le_bytes(le))
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        let Some(w) = self.window(space) else {
            return false;
        };
        let Some(r) = w.range(addr, size) else {
            return false;
        };
        let n = r.len();
        w.bytes[r].copy_from_slice(&data.to_le_bytes()[..n]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_return_what_was_written() {
        let mut d = RegisterFile::new(Some((0x500, 16)), Some((0xd000_0000, 0x1000)));
        assert_eq!(d.read(Space::Pio, 0x500, AccessSize::B4), Some(0));
        assert!(d.write(Space::Pio, 0x500, AccessSize::B4, 0x1122_3344));
        assert_eq!(d.read(Space::Pio, 0x500, AccessSize::B4), Some(0x1122_3344));
        assert_eq!(d.read(Space::Pio, 0x501, AccessSize::B1), Some(0x33), "little-endian bytes");
        assert!(d.write(Space::Mmio, 0xd000_0ff8, AccessSize::B8, u64::MAX - 1));
        assert_eq!(d.read(Space::Mmio, 0xd000_0ff8, AccessSize::B8), Some(u64::MAX - 1));
        assert_eq!(d.read(Space::Mmio, 0xd000_0ffc, AccessSize::B2), Some(0xffff));
    }

    #[test]
    fn a_state_too_big_for_its_windows_is_refused() {
        let mut d = RegisterFile::new(Some((0x500, 16)), None);
        d.write(Space::Pio, 0x502, AccessSize::B1, 7);
        let saved = Persist::save(&d);
        let back = RegisterFile::restore((Some((0x500, 32)), None), saved.clone()).unwrap();
        assert_eq!(back.clone().read(Space::Pio, 0x502, AccessSize::B1), Some(7));
        assert!(RegisterFile::restore((Some((0x500, 8)), None), saved.clone()).is_err());
        assert!(RegisterFile::restore((None, None), saved).is_err());
    }

    #[test]
    fn accesses_outside_the_windows_are_unclaimed() {
        let mut d = RegisterFile::new(Some((0x500, 16)), None);
        assert_eq!(d.read(Space::Pio, 0x4ff, AccessSize::B1), None);
        assert_eq!(d.read(Space::Pio, 0x50e, AccessSize::B4), None, "straddles the end");
        assert!(!d.write(Space::Pio, 0x510, AccessSize::B1, 1));
        assert_eq!(d.read(Space::Mmio, 0xd000_0000, AccessSize::B4), None, "no MMIO window");
        assert_eq!(d.read(Space::Pio, u64::MAX, AccessSize::B8), None, "no overflow");
    }

    #[test]
    fn a_window_is_never_larger_than_the_cap() {
        let mut d = RegisterFile::new(None, Some((0x1_0000_0000, u32::MAX)));
        assert_eq!(d.mmio.as_ref().map(|w| w.bytes.len()), Some(MAX_WINDOW as usize), "4 GiB asked, 16 MiB held");
        let last = 0x1_0000_0000 + u64::from(MAX_WINDOW);
        assert!(d.write(Space::Mmio, last - 4, AccessSize::B4, 1));
        assert_eq!(d.read(Space::Mmio, last, AccessSize::B1), None, "past the cap: unclaimed");
        let mut at_top = RegisterFile::new(None, Some((u64::MAX - 3, 4)));
        assert!(at_top.write(Space::Mmio, u64::MAX - 3, AccessSize::B4, 0xaabb_ccdd));
        assert_eq!(at_top.read(Space::Mmio, u64::MAX, AccessSize::B1), Some(0xaa));
        assert_eq!(at_top.read(Space::Mmio, u64::MAX - 1, AccessSize::B4), None, "no wrap past the top");
    }
}
