//! A 16550A UART, at the register level (National Semiconductor PC16550D
//! datasheet): RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR, DLL/DLM, the
//! 16-byte receive FIFO with its trigger level and character timeout,
//! interrupt identification with its priorities, and loopback.
//!
//! Why not vm-superio's `Serial`: its `Trigger` can only fire an edge (no
//! way to lower a line, so the level could not be mirrored to the guest as
//! the wire does), it has no FCR trigger levels or character timeout (a
//! guest with a 14-byte trigger would never hear about 3 typed bytes), and
//! no line-status interrupt. This model is generic over [`IrqLine`] like
//! every other, and over where transmitted bytes go ([`ByteSink`]).
//!
//! Transmission takes no time: a byte written to THR is out at once (the
//! console is not a wire), so THR and the transmitter are empty again
//! right after every write. Received bytes come from the console through
//! [`Uart16550::receive`], only as far as the FIFO has room (flow control,
//! nothing lost); loopback can overrun it, as on hardware.
//!
//! The interrupt output is gated by MCR.OUT2, as on a PC (and disconnected
//! in loopback).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dmfabric_wire::{AccessSize, Space};

use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::irq::IrqLine;

/// Ports the UART takes.
pub const UART_PORTS: u16 = 8;
/// Depth of the receive FIFO.
pub const RX_FIFO: usize = 16;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_RLS: u8 = 0x04;
const IER_MS: u8 = 0x08;

const IIR_NONE: u8 = 0x01;
const IIR_MS: u8 = 0x00;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_RLS: u8 = 0x06;
const IIR_TIMEOUT: u8 = 0x0c;
const IIR_FIFO: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_PE: u8 = 0x04;
const LSR_FE: u8 = 0x08;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LSR_ERRORS: u8 = LSR_OE | LSR_PE | LSR_FE | LSR_BI;
/// Bit 7 in FIFO mode: "at least one parity error, framing error or break
/// indication in the FIFO" (PC16550D). An overrun alone leaves it clear.
const LSR_FIFO_ERROR: u8 = 0x80;
const LSR_FIFO_ERRORS: u8 = LSR_PE | LSR_FE | LSR_BI;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
/// What the modem lines read outside loopback: a terminal is attached.
const MSR_CONNECTED: u8 = MSR_CTS | MSR_DSR | MSR_DCD;

/// Where transmitted bytes go (the server's console).
pub trait ByteSink: Send {
    fn put(&mut self, byte: u8);
}

impl ByteSource for Box<dyn ByteSource> {
    fn take(&mut self, max: usize, into: &mut dyn FnMut(u8)) {
        (**self).take(max, into)
    }
}

impl ByteSink for Box<dyn ByteSink> {
    fn put(&mut self, byte: u8) {
        (**self).put(byte)
    }
}

/// Collects transmitted bytes (tests).
impl ByteSink for Vec<u8> {
    fn put(&mut self, byte: u8) {
        self.push(byte);
    }
}

/// Where received bytes come from (the server's console): the UART pulls as
/// many as its FIFO has room for.
pub trait ByteSource: Send {
    fn take(&mut self, max: usize, into: &mut dyn FnMut(u8));
}

/// A fixed buffer of input (tests).
impl ByteSource for VecDeque<u8> {
    fn take(&mut self, max: usize, into: &mut dyn FnMut(u8)) {
        for _ in 0..max {
            match self.pop_front() {
                Some(b) => into(b),
                None => break,
            }
        }
    }
}

/// The register state of a 16550A: a plain struct, saved and restored as is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub lsr: u8,
    pub msr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    pub fcr: u8,
    pub rx: VecDeque<u8>,
    /// A THRE interrupt is pending (set when THR empties, cleared by an IIR
    /// read that reports it or a THR write).
    pub thr_pending: bool,
    /// Receive-data timeout pending (bytes sit below the trigger level).
    pub timeout_pending: bool,
}

impl Default for UartState {
    fn default() -> Self {
        UartState {
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr: LSR_THRE | LSR_TEMT,
            msr: MSR_CONNECTED,
            scr: 0,
            dll: 0x0c, // 9600 baud, as a PC BIOS leaves it
            dlm: 0,
            fcr: 0,
            rx: VecDeque::with_capacity(RX_FIFO),
            thr_pending: false,
            timeout_pending: false,
        }
    }
}

/// A 16550A at ports `base..base + 8`.
#[derive(Debug)]
pub struct Uart16550<L, O, I> {
    base: u16,
    state: UartState,
    line: L,
    out: O,
    input: I,
    /// When the receive FIFO last changed (for the character timeout).
    rx_activity: Option<Instant>,
    now: Option<Instant>,
    /// Bytes received but lost to a full FIFO (loopback only).
    overruns: u64,
}

impl<L: IrqLine, O: ByteSink, I: ByteSource> Uart16550<L, O, I> {
    pub fn new(base: u16, line: L, out: O, input: I) -> Self {
        Self::with_state(base, UartState::default(), line, out, input)
    }

    /// A UART in a state already checked.
    fn with_state(base: u16, state: UartState, line: L, out: O, input: I) -> Self {
        let mut u = Uart16550 { base, state, line, out, input, rx_activity: None, now: None, overruns: 0 };
        u.update_irq();
        u
    }

    pub fn line(&self) -> &L {
        &self.line
    }

    pub fn output(&self) -> &O {
        &self.out
    }

    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    fn fifo_enabled(&self) -> bool {
        self.state.fcr & FCR_ENABLE != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            RX_FIFO
        } else {
            1
        }
    }

    fn trigger_level(&self) -> usize {
        if !self.fifo_enabled() {
            return 1;
        }
        [1, 4, 8, 14][usize::from(self.state.fcr >> 6)]
    }

    /// Four character times at the programmed rate (10 bits a character).
    fn char_timeout(&self) -> Duration {
        let divisor = u32::from(u16::from_le_bytes([self.state.dll, self.state.dlm])).max(1);
        let bits_per_s = 115_200 / divisor;
        Duration::from_micros(u64::from(4 * 10 * 1_000_000 / bits_per_s.max(1)))
    }

    /// One byte arrives at the receiver.
    fn receive_byte(&mut self, b: u8) {
        if self.state.rx.len() >= self.rx_capacity() {
            self.state.lsr |= LSR_OE;
            self.overruns += 1;
        } else {
            self.state.rx.push_back(b);
            self.state.lsr |= LSR_DR;
        }
        self.rx_activity = self.now;
        self.state.timeout_pending = false;
    }

    /// Take input from the source while the FIFO has room (not in
    /// loopback: the receiver is then wired to the transmitter).
    pub fn receive(&mut self) {
        if self.state.mcr & MCR_LOOP != 0 {
            return;
        }
        let room = self.rx_capacity().saturating_sub(self.state.rx.len());
        if room == 0 {
            return;
        }
        let mut got = Vec::new();
        self.input.take(room, &mut |b| got.push(b));
        for b in got {
            self.receive_byte(b);
        }
        self.update_irq();
    }

    /// The highest-priority pending interrupt, as IIR bits 0–3.
    fn pending(&self) -> u8 {
        let s = &self.state;
        if s.ier & IER_RLS != 0 && s.lsr & LSR_ERRORS != 0 {
            IIR_RLS
        } else if s.ier & IER_RDA != 0 && s.rx.len() >= self.trigger_level() {
            IIR_RDA
        } else if s.ier & IER_RDA != 0 && s.timeout_pending && !s.rx.is_empty() {
            IIR_TIMEOUT
        } else if s.ier & IER_THRE != 0 && s.thr_pending {
            IIR_THRE
        } else if s.ier & IER_MS != 0 && s.msr & (MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD) != 0 {
            IIR_MS
        } else {
            IIR_NONE
        }
    }

    fn update_irq(&mut self) {
        let gated = self.state.mcr & MCR_OUT2 != 0 && self.state.mcr & MCR_LOOP == 0;
        self.line.set_level(gated && self.pending() != IIR_NONE);
    }

    fn iir(&self) -> u8 {
        self.pending() | if self.fifo_enabled() { IIR_FIFO } else { 0 }
    }

    /// MSR as the lines read: looped back from MCR, or a connected terminal.
    fn modem_lines(&self) -> u8 {
        let mcr = self.state.mcr;
        if mcr & MCR_LOOP == 0 {
            return MSR_CONNECTED;
        }
        let mut m = 0;
        if mcr & MCR_RTS != 0 {
            m |= MSR_CTS;
        }
        if mcr & MCR_DTR != 0 {
            m |= MSR_DSR;
        }
        if mcr & MCR_OUT1 != 0 {
            m |= MSR_RI;
        }
        if mcr & MCR_OUT2 != 0 {
            m |= MSR_DCD;
        }
        m
    }

    fn set_modem_lines(&mut self, new: u8) {
        let old = self.state.msr & 0xf0;
        let mut delta = self.state.msr & 0x0f;
        if (old ^ new) & MSR_CTS != 0 {
            delta |= MSR_DCTS;
        }
        if (old ^ new) & MSR_DSR != 0 {
            delta |= MSR_DDSR;
        }
        if old & MSR_RI != 0 && new & MSR_RI == 0 {
            delta |= MSR_TERI; // trailing edge of RI
        }
        if (old ^ new) & MSR_DCD != 0 {
            delta |= MSR_DDCD;
        }
        self.state.msr = new | delta;
    }

    fn offset(&self, space: Space, addr: u64, size: AccessSize) -> Option<u8> {
        if space != Space::Pio || size != AccessSize::B1 {
            return None;
        }
        let off = addr.checked_sub(u64::from(self.base))?;
        (off < u64::from(UART_PORTS)).then_some(off as u8)
    }

    fn read_reg(&mut self, off: u8) -> u8 {
        let dlab = self.state.lcr & LCR_DLAB != 0;
        let v = match off {
            0 if dlab => self.state.dll,
            0 => {
                let b = self.state.rx.pop_front().unwrap_or(0);
                if self.state.rx.is_empty() {
                    self.state.lsr &= !LSR_DR;
                }
                self.state.timeout_pending = false;
                self.rx_activity = self.now;
                b
            }
            1 if dlab => self.state.dlm,
            1 => self.state.ier,
            2 => {
                let iir = self.iir();
                if iir & 0x0f == IIR_THRE {
                    // Reading IIR that reports THRE clears it.
                    self.state.thr_pending = false;
                }
                iir
            }
            3 => self.state.lcr,
            4 => self.state.mcr,
            5 => {
                let fifo_error = self.state.lsr & LSR_FIFO_ERRORS != 0 && self.fifo_enabled();
                let lsr = self.state.lsr | if fifo_error { LSR_FIFO_ERROR } else { 0 };
                self.state.lsr &= !LSR_ERRORS;
                lsr
            }
            6 => {
                let msr = self.state.msr;
                self.state.msr &= 0xf0;
                msr
            }
            _ => self.state.scr,
        };
        self.update_irq();
        v
    }

    fn write_reg(&mut self, off: u8, v: u8) {
        let dlab = self.state.lcr & LCR_DLAB != 0;
        match off {
            0 if dlab => self.state.dll = v,
            0 => {
                self.state.thr_pending = false;
                if self.state.mcr & MCR_LOOP != 0 {
                    self.receive_byte(v);
                } else {
                    self.out.put(v);
                }
                // Sent at once: THR and the shift register are empty again.
                self.state.lsr |= LSR_THRE | LSR_TEMT;
                self.state.thr_pending = true;
            }
            1 if dlab => self.state.dlm = v,
            1 => {
                let enabling_thre = v & IER_THRE != 0 && self.state.ier & IER_THRE == 0;
                self.state.ier = v & 0x0f;
                if enabling_thre && self.state.lsr & LSR_THRE != 0 {
                    self.state.thr_pending = true;
                }
            }
            2 => {
                if (v ^ self.state.fcr) & FCR_ENABLE != 0 || v & FCR_CLEAR_RX != 0 {
                    // Enabling or disabling the FIFOs clears them, as does bit 1.
                    self.state.rx.clear();
                    self.state.lsr &= !LSR_DR;
                    self.state.timeout_pending = false;
                }
                // Bits 1–2 self-clear; DMA mode (bit 3) has no effect here.
                self.state.fcr = v & 0xc1;
                if self.state.fcr & FCR_ENABLE == 0 {
                    self.state.fcr = 0;
                }
            }
            3 => self.state.lcr = v,
            4 => {
                self.state.mcr = v & 0x1f;
                let lines = self.modem_lines();
                self.set_modem_lines(lines);
            }
            5 | 6 => {} // LSR and MSR are read-only (factory test writes ignored)
            _ => self.state.scr = v,
        }
        self.update_irq();
    }
}

impl<L: IrqLine, O: ByteSink, I: ByteSource> Persist for Uart16550<L, O, I> {
    type State = UartState;
    /// The base port, the line, where output goes and input comes from.
    type ConstructorArgs = (u16, L, O, I);

    fn save(&self) -> UartState {
        self.state.clone()
    }

    fn restore((base, line, out, input): Self::ConstructorArgs, state: UartState) -> Result<Self, RestoreError> {
        let invalid = |what: String| Err(RestoreError::invalid("uart", what));
        if state.rx.len() > RX_FIFO {
            return invalid(format!("{} bytes in a {RX_FIFO}-byte receive FIFO", state.rx.len()));
        }
        if state.fcr & FCR_ENABLE == 0 && state.rx.len() > 1 {
            return invalid(format!("{} bytes received with the FIFO off", state.rx.len()));
        }
        if state.ier & 0xf0 != 0 || state.mcr & 0xe0 != 0 || state.fcr & !0xc1 != 0 {
            return invalid(format!(
                "IER {:#x}, MCR {:#x} or FCR {:#x} has bits no register keeps",
                state.ier, state.mcr, state.fcr
            ));
        }
        Ok(Self::with_state(base, state, line, out, input))
    }
}

impl<L: IrqLine, O: ByteSink, I: ByteSource> Device for Uart16550<L, O, I> {
    fn kind(&self) -> &'static str {
        "uart16550"
    }

    fn save(&self) -> DeviceState {
        DeviceState::Uart(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let off = self.offset(space, addr, size)?;
        Some(u64::from(self.read_reg(off)))
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        let Some(off) = self.offset(space, addr, size) else { return false };
        self.write_reg(off, data as u8);
        true
    }

    fn tick(&mut self, now: Instant) -> Option<Instant> {
        self.now = Some(now);
        self.receive();
        // Character timeout: data below the trigger level, untouched for
        // four character times.
        if !self.state.rx.is_empty() && !self.state.timeout_pending && self.fifo_enabled() {
            let since = self.rx_activity.get_or_insert(now);
            if now.saturating_duration_since(*since) >= self.char_timeout() {
                self.state.timeout_pending = true;
                self.update_irq();
            }
        }
        // Console input and the timeout both want a look soon.
        Some(now + Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingLine;

    type TestUart = Uart16550<CountingLine, Vec<u8>, VecDeque<u8>>;

    fn uart() -> TestUart {
        Uart16550::new(0x3f8, CountingLine::default(), Vec::new(), VecDeque::new())
    }

    fn rd(u: &mut TestUart, off: u8) -> u8 {
        u.read(Space::Pio, 0x3f8 + u64::from(off), AccessSize::B1).unwrap() as u8
    }

    fn wr(u: &mut TestUart, off: u8, v: u8) {
        assert!(u.write(Space::Pio, 0x3f8 + u64::from(off), AccessSize::B1, u64::from(v)));
    }

    #[test]
    fn reset_values_match_the_datasheet() {
        let mut u = uart();
        assert_eq!(rd(&mut u, 1), 0, "IER");
        assert_eq!(rd(&mut u, 2), 0x01, "IIR: no interrupt, FIFOs off");
        assert_eq!(rd(&mut u, 3), 0, "LCR");
        assert_eq!(rd(&mut u, 4), 0, "MCR");
        assert_eq!(rd(&mut u, 5), 0x60, "LSR: THRE and TEMT");
        assert_eq!(rd(&mut u, 6), 0xb0, "MSR: CTS, DSR, DCD of an attached terminal");
        assert_eq!(rd(&mut u, 7), 0, "SCR");
        assert!(!u.line().level);
    }

    #[test]
    fn divisor_latch_scratch_and_bad_accesses() {
        let mut u = uart();
        wr(&mut u, 3, 0x83);
        wr(&mut u, 0, 0x01);
        wr(&mut u, 1, 0x00);
        assert_eq!((rd(&mut u, 0), rd(&mut u, 1)), (0x01, 0x00), "DLL/DLM behind DLAB");
        wr(&mut u, 3, 0x03);
        assert_eq!(rd(&mut u, 3), 0x03);
        wr(&mut u, 7, 0x5a);
        assert_eq!(rd(&mut u, 7), 0x5a);
        assert!(u.output().is_empty(), "nothing transmitted while DLAB was set");
        assert_eq!(u.read(Space::Pio, 0x3f8, AccessSize::B2), None, "16-bit access: not a register");
        assert_eq!(u.read(Space::Pio, 0x400, AccessSize::B1), None);
        assert!(!u.write(Space::Mmio, 0x3f8, AccessSize::B1, 1));
    }

    #[test]
    fn transmit_and_thre_interrupt_with_out2_gating() {
        let mut u = uart();
        wr(&mut u, 1, IER_THRE);
        assert!(!u.line().level, "OUT2 low: the PC's IRQ line is gated off");
        wr(&mut u, 4, MCR_OUT2);
        assert!(u.line().level, "THR empty and ETBEI: interrupt");
        assert_eq!(rd(&mut u, 2), 0x02, "IIR says THRE");
        assert!(!u.line().level, "reading IIR cleared it");
        assert_eq!(rd(&mut u, 2), 0x01);
        for b in b"hi" {
            wr(&mut u, 0, *b);
        }
        assert_eq!(u.output(), b"hi");
        assert!(u.line().level, "THR empty again after the byte went out");
        assert_eq!(rd(&mut u, 5) & 0x60, 0x60);
    }

    #[test]
    fn receive_fifo_trigger_level_and_priorities() {
        let mut u = Uart16550::new(0x3f8, CountingLine::default(), Vec::new(), VecDeque::from(b"abcdefgh".to_vec()));
        wr(&mut u, 2, 0x81); // FIFO on, trigger 8
        wr(&mut u, 4, MCR_OUT2);
        wr(&mut u, 1, IER_RDA | IER_THRE);
        assert_eq!(rd(&mut u, 2), 0xc2, "FIFO bits; THRE pending (nothing received yet)");
        let t0 = Instant::now();
        u.tick(t0);
        assert_eq!(rd(&mut u, 5) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut u, 2), 0xc4, "8 bytes reached the trigger: RDA outranks THRE");
        assert!(u.line().level);
        let got: Vec<u8> = (0..8).map(|_| rd(&mut u, 0)).collect();
        assert_eq!(got, b"abcdefgh");
        assert_eq!(rd(&mut u, 5) & LSR_DR, 0);
        assert_eq!(rd(&mut u, 2), 0xc1, "THRE was cleared by the first IIR read");
        assert!(!u.line().level);
    }

    #[test]
    fn bytes_below_the_trigger_interrupt_after_the_character_timeout() {
        let mut u = Uart16550::new(0x3f8, CountingLine::default(), Vec::new(), VecDeque::from(b"ok".to_vec()));
        wr(&mut u, 2, 0xc1); // trigger 14
        wr(&mut u, 4, MCR_OUT2);
        wr(&mut u, 1, IER_RDA);
        let t0 = Instant::now();
        u.tick(t0);
        assert_eq!(rd(&mut u, 2), 0xc1, "two bytes, trigger 14: nothing yet");
        u.tick(t0 + Duration::from_millis(5)); // 4 chars at 9600 baud ≈ 4.2 ms
        assert_eq!(rd(&mut u, 2), 0xcc, "character timeout");
        assert!(u.line().level);
        assert_eq!((rd(&mut u, 0), rd(&mut u, 0)), (b'o', b'k'));
        assert!(!u.line().level, "reading the data clears the timeout");
    }

    #[test]
    fn flow_control_never_loses_console_input() {
        let input: VecDeque<u8> = (0..40).collect();
        let mut u = Uart16550::new(0x3f8, CountingLine::default(), Vec::new(), input);
        wr(&mut u, 2, 0x01);
        let mut got = Vec::new();
        let t = Instant::now();
        for _ in 0..5 {
            u.tick(t);
            while rd(&mut u, 5) & LSR_DR != 0 {
                got.push(rd(&mut u, 0));
            }
        }
        assert_eq!(got, (0..40).collect::<Vec<u8>>());
        assert_eq!(u.overruns(), 0);
    }

    #[test]
    fn loopback_wires_the_transmitter_to_the_receiver_and_mcr_to_msr() {
        let mut u = uart();
        wr(&mut u, 4, MCR_LOOP | MCR_RTS | MCR_OUT2);
        // From a connected terminal (CTS, DSR, DCD) to the loop: CTS=RTS and
        // DCD=OUT2 stay up, DSR (=DTR) drops: one delta.
        assert_eq!(rd(&mut u, 6), MSR_CTS | MSR_DCD | MSR_DDSR, "CTS=RTS, DCD=OUT2, delta DSR");
        assert_eq!(rd(&mut u, 6) & 0x0f, 0, "reading MSR cleared the deltas");
        wr(&mut u, 0, 0x42);
        assert!(u.output().is_empty(), "nothing leaves in loopback");
        assert_eq!(rd(&mut u, 5) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut u, 0), 0x42);
        // Without FIFOs a second byte before the first is read overruns.
        wr(&mut u, 0, 1);
        wr(&mut u, 0, 2);
        assert_eq!(rd(&mut u, 5) & LSR_OE, LSR_OE);
        assert_eq!(rd(&mut u, 5) & LSR_OE, 0, "reading LSR clears OE");
        assert_eq!(rd(&mut u, 0), 1);
        wr(&mut u, 1, IER_RLS);
        assert!(!u.line().level, "loopback disconnects the interrupt output");
    }

    #[test]
    fn line_status_interrupt_has_the_highest_priority() {
        let mut u = uart();
        wr(&mut u, 4, MCR_LOOP);
        wr(&mut u, 1, IER_RLS | IER_RDA | IER_THRE);
        wr(&mut u, 0, 1);
        wr(&mut u, 0, 2); // overrun
        assert_eq!(rd(&mut u, 2) & 0x0f, IIR_RLS);
        rd(&mut u, 5);
        assert_eq!(rd(&mut u, 2) & 0x0f, IIR_RDA, "then the data");
    }

    #[test]
    fn an_overrun_alone_leaves_lsr_bit_7_clear_in_fifo_mode() {
        let mut u = uart();
        wr(&mut u, 2, 0x01); // FIFO on
        wr(&mut u, 4, MCR_LOOP);
        for b in 0..=RX_FIFO as u8 {
            wr(&mut u, 0, b); // the 17th byte overruns the 16-byte FIFO
        }
        let lsr = rd(&mut u, 5);
        assert_eq!(lsr & LSR_OE, LSR_OE, "overrun");
        assert_eq!(lsr & 0x80, 0, "no parity, framing or break error in the FIFO: bit 7 clear");
    }

    #[test]
    fn bad_states_are_refused() {
        let restore =
            |s: UartState| Uart16550::restore((0x3f8, CountingLine::default(), Vec::new(), VecDeque::new()), s);
        let fifo = UartState { fcr: FCR_ENABLE, ..UartState::default() };
        assert!(restore(UartState { rx: (0..16).collect(), ..fifo.clone() }).is_ok());
        assert!(restore(UartState { rx: (0..17).collect(), ..fifo.clone() }).is_err(), "more than the FIFO holds");
        assert!(restore(UartState { rx: (0..2).collect(), ..UartState::default() }).is_err(), "FIFO off: one byte");
        assert!(restore(UartState { ier: 0xff, ..UartState::default() }).is_err());
    }

    #[test]
    fn state_round_trips() {
        let mut u = uart();
        wr(&mut u, 3, 0x03);
        wr(&mut u, 7, 9);
        wr(&mut u, 4, MCR_LOOP);
        wr(&mut u, 0, 7);
        let s = Persist::save(&u);
        let mut v =
            Uart16550::restore((0x3f8, CountingLine::default(), Vec::new(), VecDeque::new()), s.clone()).unwrap();
        assert_eq!(Persist::save(&v), s);
        assert_eq!((rd(&mut v, 7), rd(&mut v, 0)), (9, 7));
    }
}
