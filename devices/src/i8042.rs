//! The i8042 keyboard controller of a PC at ports 0x60 (data) and 0x64
//! (status / command), with a keyboard behind it and no mouse.
//!
//! - Status: OBF, SYS (from the command byte), A2 (last write went to the
//!   command port), INH (keyboard not inhibited), AUXB (the output byte is
//!   from the aux port). Input is taken at once, so IBF never shows.
//! - Controller commands: read/write the command byte (0x20/0x60), the
//!   self-test (0xAA → 0x55), interface tests (0xA9, 0xAB → 0x00),
//!   enable/disable keyboard and aux (0xAE/0xAD, 0xA8/0xA7), read the
//!   input and output ports (0xC0, 0xD0), write the output port (0xD1),
//!   write the keyboard or aux output buffer (0xD2, 0xD3), write to the aux
//!   device (0xD4: no mouse, answered 0xFE), and pulse output-port lines
//!   (0xF0–0xFF).
//! - **CPU reset**: pulsing output-port bit 0 (0xFE, or any 0xF0–0xFF with
//!   bit 0 clear) or writing the output port with bit 0 clear asks for a
//!   reset of the VM through the [`ResetSink`] (on a server: a lifecycle
//!   frame to the VM's client).
//! - Keyboard commands on the data port: reset (0xFF → 0xFA 0xAA), identify
//!   (0xF2 → 0xFA 0xAB 0x83), echo (0xEE), LEDs (0xED + byte), typematic
//!   (0xF3 + byte), scan code set (0xF0 + byte; 0 reads back set 2),
//!   enable/disable/defaults (0xF4/0xF5/0xF6), each acknowledged with 0xFA;
//!   anything else gets 0xFE (resend).
//! - IRQ 1 is high while a keyboard byte waits and command-byte bit 0 is
//!   set; IRQ 12 likewise for aux bytes and bit 1. Both are levels.

use std::collections::VecDeque;

use dmfabric_wire::{AccessSize, Space};

use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::irq::IrqLine;

const DATA_PORT: u64 = crate::platform::pc::I8042_DATA as u64;
const COMMAND_PORT: u64 = crate::platform::pc::I8042_COMMAND as u64;

const ST_OBF: u8 = 0x01;
const ST_SYS: u8 = 0x04;
const ST_A2: u8 = 0x08;
const ST_INH: u8 = 0x10;
const ST_AUXB: u8 = 0x20;

const CB_KBD_INT: u8 = 0x01;
const CB_AUX_INT: u8 = 0x02;
const CB_SYS: u8 = 0x04;
const CB_KBD_OFF: u8 = 0x10;
const CB_AUX_OFF: u8 = 0x20;

/// Output bytes the controller keeps waiting for the guest to read.
pub const OUT_QUEUE: usize = 16;

/// Output-port bit 0: the CPU runs while it is 1.
const OUT_RESET: u8 = 0x01;

/// Where a reset of the VM is requested.
pub trait ResetSink: Send {
    fn reset(&mut self);
}

/// Counts reset requests (tests).
impl ResetSink for Box<dyn ResetSink> {
    fn reset(&mut self) {
        (**self).reset()
    }
}

impl ResetSink for u64 {
    fn reset(&mut self) {
        *self += 1;
    }
}

/// A byte waiting in the output buffer, from the keyboard or the aux port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutByte {
    pub byte: u8,
    pub aux: bool,
}

/// The saved state of the controller.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub command_byte: u8,
    pub output_port: u8,
    pub a2: bool,
    pub out: VecDeque<OutByte>,
    /// The last byte read from the data port (read again when empty).
    pub last: u8,
    /// A controller command waiting for its data byte.
    pub pending_controller: Option<u8>,
    /// A keyboard command waiting for its data byte.
    pub pending_keyboard: Option<u8>,
    pub scan_set: u8,
    pub scanning: bool,
}

impl Default for I8042State {
    fn default() -> Self {
        I8042State {
            // As a PC BIOS leaves it: keyboard and aux interrupts, system flag, translation.
            command_byte: CB_KBD_INT | CB_AUX_INT | CB_SYS | 0x40,
            output_port: OUT_RESET | 0x02, // CPU running, A20 on
            a2: false,
            out: VecDeque::new(),
            last: 0,
            pending_controller: None,
            pending_keyboard: None,
            scan_set: 2,
            scanning: true,
        }
    }
}

/// The controller; `L` drives IRQ 1 and IRQ 12.
#[derive(Debug)]
pub struct I8042<L, R> {
    state: I8042State,
    kbd_irq: L,
    aux_irq: L,
    reset: R,
}

impl<L: IrqLine, R: ResetSink> I8042<L, R> {
    pub fn new(kbd_irq: L, aux_irq: L, reset: R) -> Self {
        Self::with_state(I8042State::default(), kbd_irq, aux_irq, reset)
    }

    fn with_state(state: I8042State, kbd_irq: L, aux_irq: L, reset: R) -> Self {
        let mut c = I8042 { state, kbd_irq, aux_irq, reset };
        c.update_irq();
        c
    }

    pub fn lines(&self) -> (&L, &L) {
        (&self.kbd_irq, &self.aux_irq)
    }

    pub fn resets(&self) -> &R {
        &self.reset
    }

    /// Queue an output byte; a guest that never reads loses the newest
    /// (the hardware has one byte of buffer; a few are kept for replies).
    fn push(&mut self, byte: u8, aux: bool) {
        if self.state.out.len() < OUT_QUEUE {
            self.state.out.push_back(OutByte { byte, aux });
        }
    }

    fn status(&self) -> u8 {
        let s = &self.state;
        let mut st = ST_INH;
        if let Some(front) = s.out.front() {
            st |= ST_OBF;
            if front.aux {
                st |= ST_AUXB;
            }
        }
        if s.command_byte & CB_SYS != 0 {
            st |= ST_SYS;
        }
        if s.a2 {
            st |= ST_A2;
        }
        st
    }

    fn update_irq(&mut self) {
        let front = self.state.out.front().copied();
        let cb = self.state.command_byte;
        self.kbd_irq.set_level(front.is_some_and(|b| !b.aux) && cb & CB_KBD_INT != 0);
        self.aux_irq.set_level(front.is_some_and(|b| b.aux) && cb & CB_AUX_INT != 0);
    }

    fn write_output_port(&mut self, v: u8) {
        self.state.output_port = v | OUT_RESET;
        if v & OUT_RESET == 0 {
            self.reset.reset();
        }
    }

    fn controller_command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push(self.state.command_byte, false),
            0x21..=0x3f => self.push(0, false), // internal RAM: nothing kept
            0x60..=0x7f | 0xd1..=0xd4 => self.state.pending_controller = Some(cmd),
            0xa7 => self.state.command_byte |= CB_AUX_OFF,
            0xa8 => self.state.command_byte &= !CB_AUX_OFF,
            0xa9 | 0xab => self.push(0x00, false),
            0xaa => {
                self.state.command_byte |= CB_SYS;
                self.push(0x55, false);
            }
            0xad => self.state.command_byte |= CB_KBD_OFF,
            0xae => self.state.command_byte &= !CB_KBD_OFF,
            0xc0 => self.push(0x80, false), // input port: keyboard not inhibited
            0xd0 => self.push(self.state.output_port, false),
            0xe0 => self.push(0x00, false),
            // Pulse the output-port lines whose command bit is 0.
            0xf0..=0xff if cmd & OUT_RESET == 0 => self.reset.reset(),
            _ => {}
        }
    }

    fn controller_data(&mut self, cmd: u8, v: u8) {
        match cmd {
            0x60 => self.state.command_byte = v,
            0x61..=0x7f => {}
            0xd1 => self.write_output_port(v),
            0xd2 => self.push(v, false),
            0xd3 => self.push(v, true),
            _ => self.push(0xfe, true), // 0xd4: no mouse answers
        }
    }

    fn keyboard(&mut self, v: u8) {
        if let Some(cmd) = self.state.pending_keyboard.take() {
            match cmd {
                0xf0 if v == 0 => {
                    self.push(0xfa, false);
                    let set = self.state.scan_set;
                    self.push(set, false);
                }
                0xf0 if (1..=3).contains(&v) => {
                    self.state.scan_set = v;
                    self.push(0xfa, false);
                }
                0xf0 => self.push(0xfe, false),
                _ => self.push(0xfa, false), // LEDs, typematic
            }
            return;
        }
        match v {
            0xff => {
                self.state.scan_set = 2;
                self.state.scanning = true;
                self.push(0xfa, false);
                self.push(0xaa, false);
            }
            0xf2 => {
                for b in [0xfa, 0xab, 0x83] {
                    self.push(b, false);
                }
            }
            0xee => self.push(0xee, false),
            0xed | 0xf3 | 0xf0 => {
                self.state.pending_keyboard = Some(v);
                self.push(0xfa, false);
            }
            0xf4..=0xf6 => {
                self.state.scanning = v != 0xf5;
                self.push(0xfa, false);
            }
            _ => self.push(0xfe, false),
        }
    }
}

impl<L: IrqLine, R: ResetSink> Persist for I8042<L, R> {
    type State = I8042State;
    /// The keyboard and aux lines and the reset line.
    type ConstructorArgs = (L, L, R);

    fn save(&self) -> I8042State {
        self.state.clone()
    }

    fn restore((kbd_irq, aux_irq, reset): Self::ConstructorArgs, state: I8042State) -> Result<Self, RestoreError> {
        let invalid = |what: String| Err(RestoreError::invalid("i8042", what));
        if state.out.len() > OUT_QUEUE {
            return invalid(format!("{} output bytes waiting, at most {OUT_QUEUE}", state.out.len()));
        }
        if !(1..=3).contains(&state.scan_set) {
            return invalid(format!("scan code set {}", state.scan_set));
        }
        if state.pending_controller.is_some_and(|c| !matches!(c, 0x60..=0x7f | 0xd1..=0xd4)) {
            return invalid(format!("controller command {:#x?} takes no data byte", state.pending_controller));
        }
        if state.pending_keyboard.is_some_and(|c| !matches!(c, 0xed | 0xf0 | 0xf3)) {
            return invalid(format!("keyboard command {:#x?} takes no data byte", state.pending_keyboard));
        }
        Ok(Self::with_state(state, kbd_irq, aux_irq, reset))
    }
}

impl<L: IrqLine, R: ResetSink> Device for I8042<L, R> {
    fn kind(&self) -> &'static str {
        "i8042"
    }

    fn save(&self) -> DeviceState {
        DeviceState::I8042(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        if space != Space::Pio || size != AccessSize::B1 {
            return None;
        }
        let v = match addr {
            DATA_PORT => {
                if let Some(b) = self.state.out.pop_front() {
                    self.state.last = b.byte;
                }
                self.update_irq();
                self.state.last
            }
            COMMAND_PORT => self.status(),
            _ => return None,
        };
        Some(u64::from(v))
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        if space != Space::Pio || size != AccessSize::B1 {
            return false;
        }
        let v = data as u8;
        match addr {
            DATA_PORT => {
                self.state.a2 = false;
                match self.state.pending_controller.take() {
                    Some(cmd) => self.controller_data(cmd, v),
                    None => self.keyboard(v),
                }
            }
            COMMAND_PORT => {
                self.state.a2 = true;
                self.state.pending_controller = None;
                self.controller_command(v);
            }
            _ => return false,
        }
        self.update_irq();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingLine;

    type Kbc = I8042<CountingLine, u64>;

    fn kbc() -> Kbc {
        I8042::new(CountingLine::default(), CountingLine::default(), 0)
    }

    fn status(c: &mut Kbc) -> u8 {
        c.read(Space::Pio, COMMAND_PORT, AccessSize::B1).unwrap() as u8
    }

    fn data(c: &mut Kbc) -> u8 {
        c.read(Space::Pio, DATA_PORT, AccessSize::B1).unwrap() as u8
    }

    fn command(c: &mut Kbc, v: u8) {
        assert!(c.write(Space::Pio, COMMAND_PORT, AccessSize::B1, u64::from(v)));
    }

    fn send(c: &mut Kbc, v: u8) {
        assert!(c.write(Space::Pio, DATA_PORT, AccessSize::B1, u64::from(v)));
    }

    #[test]
    fn reset_state_self_test_and_command_byte() {
        let mut c = kbc();
        assert_eq!(status(&mut c), ST_INH | ST_SYS, "empty, system flag, not inhibited");
        command(&mut c, 0xaa);
        assert_eq!(status(&mut c), ST_INH | ST_SYS | ST_A2 | ST_OBF);
        assert!(c.lines().0.level, "IRQ 1 while the answer waits");
        assert_eq!(data(&mut c), 0x55);
        assert!(!c.lines().0.level);
        command(&mut c, 0x20);
        assert_eq!(data(&mut c), 0x47);
        command(&mut c, 0x60);
        send(&mut c, 0x44); // no keyboard interrupt
        command(&mut c, 0x20);
        assert!(!c.lines().0.level, "interrupts off: no IRQ 1 though OBF");
        assert_eq!(data(&mut c), 0x44);
        command(&mut c, 0xab);
        assert_eq!(data(&mut c), 0x00, "keyboard interface test passed");
        assert_eq!(data(&mut c), 0x00, "an empty buffer reads the last byte again");
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let mut c = kbc();
        send(&mut c, 0xff);
        assert_eq!((data(&mut c), data(&mut c)), (0xfa, 0xaa), "reset: ack, self-test passed");
        send(&mut c, 0xf2);
        assert_eq!([data(&mut c), data(&mut c), data(&mut c)], [0xfa, 0xab, 0x83], "an MF2 keyboard");
        send(&mut c, 0xed);
        send(&mut c, 0x07);
        assert_eq!((data(&mut c), data(&mut c)), (0xfa, 0xfa), "LEDs and their byte");
        send(&mut c, 0xf0);
        send(&mut c, 0x00);
        assert_eq!([data(&mut c), data(&mut c), data(&mut c)], [0xfa, 0xfa, 0x02], "scan code set 2");
        send(&mut c, 0xee);
        assert_eq!(data(&mut c), 0xee);
        send(&mut c, 0x12);
        assert_eq!(data(&mut c), 0xfe, "unknown: resend");
        assert_eq!(status(&mut c) & ST_A2, 0, "last write went to the data port");
    }

    #[test]
    fn reset_pulse_and_output_port_ask_for_a_vm_reset() {
        let mut c = kbc();
        command(&mut c, 0xfe);
        assert_eq!(*c.resets(), 1, "0xFE pulses the reset line");
        command(&mut c, 0xff);
        assert_eq!(*c.resets(), 1, "0xFF pulses nothing");
        command(&mut c, 0xd0);
        assert_eq!(data(&mut c), 0x03, "CPU running, A20 on");
        command(&mut c, 0xd1);
        send(&mut c, 0x02);
        assert_eq!(*c.resets(), 2, "output port bit 0 low: reset");
        command(&mut c, 0xd1);
        send(&mut c, 0x03);
        assert_eq!(*c.resets(), 2);
    }

    #[test]
    fn aux_bytes_raise_irq12_and_there_is_no_mouse() {
        let mut c = kbc();
        command(&mut c, 0xd3);
        send(&mut c, 0x5a);
        assert_eq!(status(&mut c) & (ST_OBF | ST_AUXB), ST_OBF | ST_AUXB);
        assert!(c.lines().1.level && !c.lines().0.level);
        assert_eq!(data(&mut c), 0x5a);
        command(&mut c, 0xd4);
        send(&mut c, 0xf4);
        assert_eq!(data(&mut c), 0xfe, "no mouse behind the aux port");
        command(&mut c, 0xa9);
        assert_eq!(data(&mut c), 0x00);
    }

    #[test]
    fn other_accesses_are_not_claimed_and_state_round_trips() {
        let mut c = kbc();
        assert_eq!(c.read(Space::Pio, 0x61, AccessSize::B1), None);
        assert_eq!(c.read(Space::Pio, DATA_PORT, AccessSize::B2), None);
        assert!(!c.write(Space::Mmio, DATA_PORT, AccessSize::B1, 0));
        command(&mut c, 0xaa);
        let saved = Persist::save(&c);
        let mut d = I8042::restore((CountingLine::default(), CountingLine::default(), 0u64), saved.clone()).unwrap();
        assert!(d.lines().0.level, "restored with a byte waiting: IRQ 1 up");
        assert_eq!(data(&mut d), 0x55);
        let bad = |s: I8042State| I8042::restore((CountingLine::default(), CountingLine::default(), 0u64), s).is_err();
        assert!(bad(I8042State { scan_set: 9, ..saved.clone() }));
        assert!(bad(I8042State { pending_controller: Some(0xaa), ..saved.clone() }));
        assert!(bad(I8042State { out: (0..100).map(|byte| OutByte { byte, aux: false }).collect(), ..saved }));
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_output_queue() {
        let mut c = kbc();
        for _ in 0..1000 {
            command(&mut c, 0xd2);
            send(&mut c, 0x42);
        }
        assert_eq!(Persist::save(&c).out.len(), OUT_QUEUE);
    }
}
