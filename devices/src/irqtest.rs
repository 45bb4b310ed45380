//! The interrupt test device: raises interrupts when a guest asks, so the
//! interrupt path can be tested end to end without timing.
//!
//! Register map (port space, 8 ports from the base):
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0 | write dword | command: 1 pulse (edge), 2 assert the level, 3 lower it |
//! | 0 | read dword | the line's level (0 or 1) |
//! | 4 | read dword | interrupts raised so far (pulses + asserts) |
//!
//! Any other access is not claimed (reads all ones, writes ignored).

use dmfabric_wire::{AccessSize, Space};

use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::irq::IrqLine;

/// Ports the device takes.
pub const IRQ_TEST_PORTS: u16 = 8;

/// Saved state of an [`IrqTester`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IrqTesterState {
    pub level: bool,
    pub raised: u32,
}

#[derive(Debug)]
pub struct IrqTester<L> {
    base: u16,
    line: L,
    state: IrqTesterState,
}

impl<L: IrqLine> IrqTester<L> {
    pub fn new(base: u16, line: L) -> Self {
        IrqTester { base, line, state: IrqTesterState::default() }
    }

    pub fn line(&self) -> &L {
        &self.line
    }

    fn offset(&self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        (space == Space::Pio && size == AccessSize::B4).then_some(())?;
        addr.checked_sub(u64::from(self.base)).filter(|o| *o < u64::from(IRQ_TEST_PORTS))
    }
}

impl<L: IrqLine> Persist for IrqTester<L> {
    type State = IrqTesterState;
    /// The base port and the line.
    type ConstructorArgs = (u16, L);

    fn save(&self) -> IrqTesterState {
        self.state
    }

    /// Any state is valid; the line is driven to the saved level.
    fn restore((base, mut line): (u16, L), state: IrqTesterState) -> Result<Self, RestoreError> {
        line.set_level(state.level);
        Ok(IrqTester { base, line, state })
    }
}

impl<L: IrqLine> Device for IrqTester<L> {
    fn kind(&self) -> &'static str {
        "irqtest"
    }

    fn save(&self) -> DeviceState {
        DeviceState::IrqTest(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        match self.offset(space, addr, size)? {
            0 => Some(u64::from(self.state.level)),
            4 => Some(u64::from(self.state.raised)),
            _ => None,
        }
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        if self.offset(space, addr, size) != Some(0) {
            return false;
        }
        match data {
            1 => {
                self.state.raised = self.state.raised.wrapping_add(1);
                self.line.pulse();
            }
            2 => {
                if !self.state.level {
                    self.state.raised = self.state.raised.wrapping_add(1);
                }
                self.state.level = true;
                self.line.set_level(true);
            }
            3 => {
                self.state.level = false;
                self.line.set_level(false);
            }
            _ => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingLine;

    fn w(d: &mut IrqTester<CountingLine>, v: u64) -> bool {
        d.write(Space::Pio, 0x600, AccessSize::B4, v)
    }

    #[test]
    fn commands_drive_the_line() {
        let mut d = IrqTester::new(0x600, CountingLine::default());
        assert!(w(&mut d, 1) && w(&mut d, 1));
        assert_eq!(d.line().pulses, 2);
        assert!(w(&mut d, 2) && w(&mut d, 2), "asserting twice is one change");
        assert_eq!(d.read(Space::Pio, 0x600, AccessSize::B4), Some(1));
        assert!(w(&mut d, 3));
        assert_eq!((d.line().level, d.line().level_changes), (false, 2));
        assert_eq!(d.read(Space::Pio, 0x604, AccessSize::B4), Some(3), "two pulses and one assert");
    }

    #[test]
    fn other_accesses_are_not_claimed() {
        let mut d = IrqTester::new(0x600, CountingLine::default());
        assert!(!w(&mut d, 9));
        assert!(!d.write(Space::Pio, 0x600, AccessSize::B1, 1));
        assert!(!d.write(Space::Pio, 0x604, AccessSize::B4, 1));
        assert_eq!(d.read(Space::Pio, 0x602, AccessSize::B4), None);
        assert_eq!(d.read(Space::Pio, 0x608, AccessSize::B4), None);
        assert_eq!(d.read(Space::Mmio, 0x600, AccessSize::B4), None);
        assert_eq!(d.line(), &CountingLine::default());
    }
}
