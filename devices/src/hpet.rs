//! The HPET: an IA-PC High Precision Event Timer (specification 1.0a) with
//! a 64-bit main counter and three timers, as QEMU's `hw/timer/hpet.c`
//! implements it, in MMIO space at [`crate::platform::pc::HPET_MMIO`].
//!
//! Register map (offsets from the base; 32- and 64-bit accesses, naturally
//! aligned; a 32-bit access reads or writes one half of a 64-bit register):
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x000 | general capabilities and ID: revision 1, 3 timers (NUM_TIM_CAP 2), 64-bit counter, LEG_RT_CAP, vendor 0x8086; [`PERIOD_FS`] in the high dword | ro |
//! | 0x010 | general configuration: ENABLE_CNF (bit 0), LEG_RT_CNF (bit 1) | rw |
//! | 0x020 | general interrupt status: bit n, timer n's level interrupt is active | r / w1c |
//! | 0x0f0 | main counter | rw, writes only while halted |
//! | 0x100 + 0x20·n | timer n configuration and capabilities | rw / ro |
//! | 0x108 + 0x20·n | timer n comparator | rw |
//! | 0x110 + 0x20·n | timer n FSB interrupt route (kept, never used: no FSB delivery) | rw |
//!
//! Other offsets of the 1 KiB window read 0 and ignore writes.
//!
//! Timer n's configuration: Tn_INT_TYPE_CNF (bit 1, level), Tn_INT_ENB_CNF
//! (bit 2), Tn_TYPE_CNF (bit 3, periodic), Tn_PER_INT_CAP (bit 4, ro 1 on
//! all three timers, as in QEMU), Tn_SIZE_CAP (bit 5, ro 1: 64-bit),
//! Tn_VAL_SET_CNF (bit 6), Tn_32MODE_CNF (bit 8), Tn_INT_ROUTE_CNF (bits
//! 9–13), Tn_FSB_EN_CNF (bit 14, ro 0) and Tn_FSB_INT_DEL_CAP (bit 15, ro 0);
//! the high dword is Tn_INT_ROUTE_CAP, [`ROUTE_CAP`] (ro).
//!
//! Behaviour:
//!
//! - The main counter counts at [`PERIOD_FS`] (10 ns, 100 MHz: QEMU's
//!   period, so guests see the frequency they see under QEMU, and a whole
//!   number of nanoseconds, so a tick is exact) from the `now` the host
//!   passes in, while ENABLE_CNF is set; it holds its value while halted.
//! - A timer fires when the counter reaches its comparator (in 32-bit mode:
//!   when the counter's low 32 bits reach it). A comparator already passed
//!   when the timer is armed fires at once in 64-bit mode (as QEMU does).
//!   Timers run whether or not their interrupt is enabled: a level-triggered
//!   timer sets its status bit either way (as the specification says); the
//!   line is driven only with Tn_INT_ENB_CNF and ENABLE_CNF. Edge: the line
//!   is pulsed. Level: the status bit is set and the line stays asserted
//!   until the guest writes 1 to the status bit (or disables the interrupt,
//!   the HPET, or level mode).
//! - Periodic: the comparator advances by the period, the last value
//!   written to the comparator (with Tn_VAL_SET_CNF the write also sets the
//!   comparator itself). A host that comes late finds several periods passed:
//!   they are coalesced into one interrupt and the others counted
//!   (`missed_periods`), and the comparator stays on the period's grid. A
//!   periodic timer fires at most once per [`MIN_PERIODIC_REARM`], counted
//!   from when its last period was due, so longer periods are never delayed
//!   (QEMU clamps to 1 µs; a model served over the network should not be
//!   asked for a million interrupts a second): a period of 1 tick costs a
//!   tick call and an interrupt every 100 µs, never a loop or a flood. Period 0 (as in
//!   QEMU): the timer fires once at its comparator and stops until it is
//!   programmed again.
//! - 32-bit mode: the comparator and period are 32 bits (their high dwords
//!   read 0, writes to them are ignored), matches are on the counter's low
//!   32 bits; the main counter stays 64 bits. A one-shot 32-bit timer whose
//!   match lies past the next wrap of the low 32 bits also fires at the wrap
//!   (the specification's wrap interrupt, as in QEMU).
//! - Routing: with LEG_RT_CNF, timer 0 drives line 0 (ISA IRQ 0: the
//!   8259's IRQ 0, and the I/O APIC's pin 2 through the platform's usual
//!   interrupt source override) and timer 1 line 8 (IRQ 8, the RTC's);
//!   otherwise timer n drives the line Tn_INT_ROUTE_CNF names. Lines are
//!   numbered as every dmfabric line is (GSIs, ISA IRQs below 16), and the
//!   model holds the [`LINES`] it can ever drive. A route outside
//!   [`ROUTE_CAP`] is refused (the field keeps its value and reads back
//!   unchanged, as the specification allows; counted `refused_routes`);
//!   QEMU keeps it and raises an unconnected line.
//! - A timer's configuration write re-arms it only when it changes
//!   periodic or 32-bit mode; QEMU re-arms on every write, which makes a
//!   one-shot whose comparator has passed fire again.
//!
//! All time arithmetic is in `u128` ticks (the counter's value without its
//! 64-bit wrap) with checked conversion to instants: no overflow, no panic,
//! whatever the guest or a saved state holds.

use std::time::{Duration, Instant};

use dmfabric_wire::{AccessSize, Space};
use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::irq::IrqLine;

/// Bytes of MMIO the HPET decodes.
pub const WINDOW: u32 = 0x400;
/// The main counter's period in femtoseconds: 10 ns, 100 MHz, as QEMU.
pub const PERIOD_FS: u64 = 10_000_000;
const FS_PER_NS: u128 = 1_000_000;
/// Timers of the block.
pub const TIMERS: usize = 3;
/// I/O APIC inputs a timer may be routed to (Tn_INT_ROUTE_CAP): pins 2, 8
/// and 16–23, what QEMU's q35 machine advertises.
pub const ROUTE_CAP: u32 = 0x00ff_0104;
/// The lines of legacy replacement: timer 0, timer 1.
pub const LEGACY_LINES: [u32; 2] = [0, 8];
/// Every line the HPET may drive: the legacy ones and [`ROUTE_CAP`]'s.
pub const LINES: [u32; 11] = [0, 2, 8, 16, 17, 18, 19, 20, 21, 22, 23];
/// How often a periodic timer fires at most, whatever its period.
pub const MIN_PERIODIC_REARM: Duration = Duration::from_micros(100);

/// The general capabilities and ID register: revision 1, NUM_TIM_CAP 2,
/// COUNT_SIZE_CAP, LEG_RT_CAP, vendor 0x8086, the period.
pub const CAPABILITIES: u64 =
    (PERIOD_FS << 32) | (0x8086 << 16) | (1 << 15) | (1 << 13) | (((TIMERS as u64) - 1) << 8) | 0x01;

pub const CFG_ENABLE: u64 = 1 << 0;
pub const CFG_LEGACY: u64 = 1 << 1;
const CFG_WRITABLE: u64 = CFG_ENABLE | CFG_LEGACY;

pub const TN_LEVEL: u64 = 1 << 1;
pub const TN_INT_ENB: u64 = 1 << 2;
pub const TN_PERIODIC: u64 = 1 << 3;
pub const TN_PER_INT_CAP: u64 = 1 << 4;
pub const TN_SIZE_CAP: u64 = 1 << 5;
pub const TN_VAL_SET: u64 = 1 << 6;
pub const TN_32BIT: u64 = 1 << 8;
pub const TN_ROUTE_SHIFT: u32 = 9;
pub const TN_ROUTE_MASK: u64 = 0x1f << TN_ROUTE_SHIFT;
pub const TN_FSB_EN: u64 = 1 << 14;
pub const TN_FSB_CAP: u64 = 1 << 15;
/// The bits of a timer's configuration a guest may write.
const TN_WRITABLE: u64 = TN_LEVEL | TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32BIT | TN_ROUTE_MASK;
/// A timer's read-only capability bits, as they read.
const TN_CAPS: u64 = ((ROUTE_CAP as u64) << 32) | TN_SIZE_CAP | TN_PER_INT_CAP;

const REG_CAP: u64 = 0x000;
const REG_CONFIG: u64 = 0x010;
const REG_STATUS: u64 = 0x020;
const REG_COUNTER: u64 = 0x0f0;
const REG_TIMERS: u64 = 0x100;
const TIMER_STRIDE: u64 = 0x20;

const LOW32: u128 = 0xffff_ffff;
const LOW64: u128 = u64::MAX as u128;

/// The saved state of one timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HpetTimerState {
    /// The writable bits of the configuration (capabilities are not saved).
    pub config: u64,
    pub comparator: u64,
    /// The period of a periodic timer (the last value written to the comparator).
    pub period: u64,
    pub fsb_route: u64,
    /// Whether a match is still to come (a one-shot that fired is not).
    /// Only while the HPET is enabled.
    pub armed: bool,
    /// A one-shot 32-bit timer fires at the next wrap of the counter's low
    /// 32 bits before its match.
    pub wrap_pending: bool,
}

impl Default for HpetTimerState {
    fn default() -> Self {
        HpetTimerState { config: 0, comparator: u64::MAX, period: 0, fsb_route: 0, armed: false, wrap_pending: false }
    }
}

/// The saved state of the HPET: the counter's value when it was saved (a
/// restored HPET counts on from it at the instant it is restored, so a
/// deadline keeps its distance across a move), registers and timers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HpetState {
    pub config: u64,
    pub status: u64,
    pub counter: u64,
    /// [`TIMERS`] of them (a `Vec` keeps [`DeviceState`] small; checked).
    pub timers: Vec<HpetTimerState>,
}

impl Default for HpetState {
    fn default() -> Self {
        HpetState { config: 0, status: 0, counter: 0, timers: vec![HpetTimerState::default(); TIMERS] }
    }
}

/// The lines an HPET drives: one per entry of [`LINES`], in that order.
#[derive(Debug)]
pub struct HpetLines<L>([L; LINES.len()]);

impl<L> HpetLines<L> {
    /// Each of [`LINES`] from `line` (a host's `Wiring::line(device, gsi)`).
    pub fn wire(mut line: impl FnMut(u32) -> L) -> HpetLines<L> {
        HpetLines(std::array::from_fn(|i| line(LINES[i])))
    }
}

/// What the HPET did and what it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HpetCounters {
    /// Timer expirations (a wrap interrupt counts as one).
    pub expirations: u64,
    /// Periods (or a wrap) passed without an interrupt of their own: coalesced.
    pub missed_periods: u64,
    /// Accesses of a size or alignment the HPET has no register for.
    pub bad_accesses: u64,
    /// Writes to the main counter while it runs (ignored).
    pub counter_writes_while_running: u64,
    /// Routes outside [`ROUTE_CAP`] a guest wrote (refused).
    pub refused_routes: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Timer {
    config: u64,
    cmp: u64,
    period: u64,
    fsb: u64,
    /// The tick the next match comes at, while armed.
    target: Option<u128>,
    /// The tick of the wrap interrupt that comes first.
    wrap_at: Option<u128>,
    /// When the last period a periodic timer fired for was due (not saved).
    last_fire: Option<Instant>,
}

impl Timer {
    fn from_state(s: &HpetTimerState) -> Timer {
        Timer { config: s.config, cmp: s.comparator, period: s.period, fsb: s.fsb_route, ..Timer::default() }
    }

    fn has(&self, bit: u64) -> bool {
        self.config & bit != 0
    }

    fn route(&self) -> u32 {
        ((self.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT) as u32
    }

    /// The next tick at or after `cur` that matches the comparator (32-bit
    /// mode), or the comparator in the counter's current 64-bit epoch.
    fn match_tick(&self, cur: u128) -> u128 {
        if self.has(TN_32BIT) {
            let at = (cur & !LOW32) | u128::from(self.cmp as u32);
            if at < cur {
                at + (1 << 32)
            } else {
                at
            }
        } else {
            (cur & !LOW64) | u128::from(self.cmp)
        }
    }
}

/// Whether route `r` may be written: one of [`ROUTE_CAP`]'s pins (or 0,
/// the reset value, which drives line 0).
fn route_allowed(r: u32) -> bool {
    r == 0 || (r < 32 && ROUTE_CAP & (1 << r) != 0)
}

fn deposit(old: u64, value: u64, mask: u64) -> u64 {
    (old & !mask) | (value & mask)
}

/// The HPET in a MMIO window.
#[derive(Debug)]
pub struct Hpet<L> {
    mmio: Option<(u64, u32)>,
    config: u64,
    status: u64,
    /// The counter while halted; while running, its value at `base`.
    counter: u64,
    /// When the counter last started (or was restored) running.
    base: Instant,
    now: Instant,
    timers: [Timer; TIMERS],
    lines: HpetLines<L>,
    /// The level each of [`LINES`] was last driven to.
    driven: [bool; LINES.len()],
    counters: HpetCounters,
}

impl<L: IrqLine> Hpet<L> {
    /// A fresh HPET decoding `mmio` (none: it decodes nothing).
    pub fn new(mmio: Option<(u64, u32)>, lines: HpetLines<L>, now: Instant) -> Self {
        Self::with_state(mmio, lines, now, &HpetState::default())
    }

    /// An HPET in a state already checked.
    fn with_state(mmio: Option<(u64, u32)>, lines: HpetLines<L>, now: Instant, s: &HpetState) -> Self {
        let mut h = Hpet {
            mmio,
            config: s.config,
            status: s.status,
            counter: s.counter,
            base: now,
            now,
            timers: std::array::from_fn(|n| s.timers.get(n).map(Timer::from_state).unwrap_or_default()),
            lines,
            driven: [false; LINES.len()],
            counters: HpetCounters::default(),
        };
        if h.enabled() {
            let cur = h.ticks();
            for (t, st) in h.timers.iter_mut().zip(&s.timers) {
                if st.armed {
                    t.target = Some(t.match_tick(cur));
                }
                if st.wrap_pending {
                    t.wrap_at = Some((cur | LOW32) + 1);
                }
            }
        }
        h.sync_lines();
        h
    }

    /// Line `gsi`, if the HPET drives it.
    pub fn line(&self, gsi: u32) -> Option<&L> {
        LINES.iter().position(|&g| g == gsi).map(|i| &self.lines.0[i])
    }

    pub fn counters(&self) -> HpetCounters {
        self.counters
    }

    fn enabled(&self) -> bool {
        self.config & CFG_ENABLE != 0
    }

    /// The counter now, without its 64-bit wrap.
    fn ticks(&self) -> u128 {
        let start = u128::from(self.counter);
        if !self.enabled() {
            return start;
        }
        let ns = self.now.saturating_duration_since(self.base).as_nanos();
        start + ns * FS_PER_NS / u128::from(PERIOD_FS)
    }

    /// When the counter reaches tick `at` (now if it has); None if that is
    /// further away than an `Instant` reaches.
    fn instant_of(&self, at: u128) -> Option<Instant> {
        if at <= self.ticks() {
            return Some(self.now);
        }
        self.instant_exact(at)
    }

    /// When the counter reached or reaches tick `at` while running (None
    /// before it started, or further away than an `Instant` reaches).
    fn instant_exact(&self, at: u128) -> Option<Instant> {
        let ns = at.checked_sub(u128::from(self.counter))?.checked_mul(u128::from(PERIOD_FS))?.div_ceil(FS_PER_NS);
        self.base.checked_add(Duration::from_nanos(u64::try_from(ns).ok()?))
    }

    /// The line timer `n` drives.
    fn route_of(&self, n: usize) -> u32 {
        if self.config & CFG_LEGACY != 0 && n < LEGACY_LINES.len() {
            LEGACY_LINES[n]
        } else {
            self.timers[n].route()
        }
    }

    /// Drive every line to the level the timers want: a level-triggered
    /// timer with its status bit and interrupt enabled, in an enabled HPET.
    fn sync_lines(&mut self) {
        let mut want = [false; LINES.len()];
        if self.enabled() {
            for n in 0..TIMERS {
                let t = &self.timers[n];
                if t.has(TN_LEVEL) && t.has(TN_INT_ENB) && self.status & (1 << n) != 0 {
                    if let Some(i) = LINES.iter().position(|&g| g == self.route_of(n)) {
                        want[i] = true;
                    }
                }
            }
        }
        for (i, &level) in want.iter().enumerate() {
            if self.driven[i] != level {
                self.driven[i] = level;
                self.lines.0[i].set_level(level);
            }
        }
    }

    /// Timer `n` expires: its status bit (level) and an edge (edge).
    fn fire(&mut self, n: usize) {
        self.counters.expirations += 1;
        let t = self.timers[n];
        if t.has(TN_LEVEL) {
            self.status |= 1 << n;
        } else {
            self.status &= !(1 << n);
            if t.has(TN_INT_ENB) && self.enabled() {
                if let Some(i) = LINES.iter().position(|&g| g == self.route_of(n)) {
                    self.lines.0[i].pulse();
                }
            }
        }
    }

    /// (Re)start timer `n` from its comparator (QEMU's `hpet_set_timer`).
    fn arm(&mut self, n: usize) {
        let cur = self.ticks();
        let t = &mut self.timers[n];
        let target = t.match_tick(cur);
        t.target = Some(target);
        t.wrap_at = None;
        if t.has(TN_32BIT) && !t.has(TN_PERIODIC) {
            let wrap = (cur | LOW32) + 1;
            if target > wrap {
                t.wrap_at = Some(wrap);
            }
        }
    }

    /// Fire timer `n` if its wrap or match has come: once, however many
    /// periods passed.
    fn expire(&mut self, n: usize, cur: u128) {
        let now = self.now;
        let t = &mut self.timers[n];
        let periodic = t.has(TN_PERIODIC) && t.period != 0;
        if periodic && t.last_fire.is_some_and(|last| now < last + MIN_PERIODIC_REARM) {
            return;
        }
        let mut fired = 0u64;
        let mut last_due = None;
        if let Some(wrap) = t.wrap_at {
            if cur < wrap {
                return;
            }
            t.wrap_at = None;
            fired += 1;
        }
        if let Some(target) = t.target.filter(|&at| at <= cur) {
            if periodic {
                let period = u128::from(t.period);
                let passed = (cur - target) / period + 1;
                let next = target + passed * period;
                last_due = Some(next - period);
                t.target = Some(next);
                t.cmp = if t.has(TN_32BIT) { u64::from(next as u32) } else { next as u64 };
                fired += u64::try_from(passed).unwrap_or(u64::MAX);
            } else {
                // One-shot, or periodic with period 0: once, then stopped.
                t.target = None;
                fired += 1;
            }
        }
        if fired > 0 {
            // QEMU's clamp counts from when the period was due, so a period
            // of MIN_PERIODIC_REARM or more is never pushed back by it.
            let due = last_due.and_then(|at| self.instant_exact(at));
            let t = &mut self.timers[n];
            t.last_fire = Some(due.map_or(now, |d| d.min(now)));
            self.counters.missed_periods = self.counters.missed_periods.saturating_add(fired - 1);
            self.fire(n);
        }
    }

    /// When timer `n` next wants a tick.
    fn deadline(&self, n: usize) -> Option<Instant> {
        let t = &self.timers[n];
        let at = self.instant_of(t.wrap_at.or(t.target)?)?;
        match t.last_fire {
            Some(last) if t.has(TN_PERIODIC) && t.period != 0 => {
                Some(at.max(last.checked_add(MIN_PERIODIC_REARM).unwrap_or(at)))
            }
            _ => Some(at),
        }
    }

    /// The offset of an access in the window, if the HPET has a register
    /// of that size there.
    fn offset(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let (base, len) = self.mmio?;
        if space != Space::Mmio {
            return None;
        }
        let off = addr.checked_sub(base).filter(|&o| o < u64::from(len.min(WINDOW)))?;
        let bytes = u64::from(size.bytes());
        if (bytes != 4 && bytes != 8) || off % bytes != 0 {
            self.counters.bad_accesses += 1;
            return None;
        }
        Some(off)
    }

    /// The 64-bit register at `reg` (8-byte aligned).
    fn read_reg(&self, reg: u64) -> u64 {
        match reg {
            REG_CAP => CAPABILITIES,
            REG_CONFIG => self.config,
            REG_STATUS => self.status,
            REG_COUNTER => self.ticks() as u64,
            _ => match self.timer_reg(reg) {
                Some((n, 0x00)) => self.timers[n].config | TN_CAPS,
                Some((n, 0x08)) => self.timers[n].cmp,
                Some((n, 0x10)) => self.timers[n].fsb,
                _ => 0,
            },
        }
    }

    /// Timer and register offset (0x00, 0x08, 0x10, 0x18) of a timer register.
    fn timer_reg(&self, reg: u64) -> Option<(usize, u64)> {
        let rel = reg.checked_sub(REG_TIMERS)?;
        let n = usize::try_from(rel / TIMER_STRIDE).ok().filter(|&n| n < TIMERS)?;
        Some((n, rel % TIMER_STRIDE))
    }

    /// Write the bits of `mask` of the 64-bit register at `reg`.
    fn write_reg(&mut self, reg: u64, value: u64, mask: u64) {
        match reg {
            REG_CONFIG => self.write_config(deposit(self.config, value, mask) & CFG_WRITABLE),
            REG_STATUS => {
                self.status &= !(value & mask);
                self.sync_lines();
            }
            REG_COUNTER if self.enabled() => self.counters.counter_writes_while_running += 1,
            REG_COUNTER => self.counter = deposit(self.counter, value, mask),
            _ => match self.timer_reg(reg) {
                Some((n, 0x00)) => self.write_timer_config(n, value, mask),
                Some((n, 0x08)) => self.write_comparator(n, value, mask),
                Some((n, 0x10)) => self.timers[n].fsb = deposit(self.timers[n].fsb, value, mask),
                _ => {} // capabilities, reserved
            },
        }
    }

    fn write_config(&mut self, new: u64) {
        let was = self.enabled();
        let cur = self.ticks();
        self.config = new;
        match (was, self.enabled()) {
            (false, true) => {
                self.base = self.now;
                for n in 0..TIMERS {
                    self.arm(n);
                }
            }
            (true, false) => {
                self.counter = cur as u64;
                for t in &mut self.timers {
                    t.target = None;
                    t.wrap_at = None;
                }
            }
            _ => {}
        }
        self.sync_lines();
    }

    fn write_timer_config(&mut self, n: usize, value: u64, mask: u64) {
        let old = self.timers[n].config;
        let mut new = deposit(old, value, mask) & TN_WRITABLE;
        let route = ((new & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT) as u32;
        if !route_allowed(route) {
            self.counters.refused_routes += 1;
            new = (new & !TN_ROUTE_MASK) | (old & TN_ROUTE_MASK);
        }
        let t = &mut self.timers[n];
        t.config = new;
        if old & TN_LEVEL != 0 && new & TN_LEVEL == 0 {
            self.status &= !(1 << n);
        }
        if new & TN_32BIT != 0 {
            t.cmp = u64::from(t.cmp as u32);
            t.period = u64::from(t.period as u32);
        }
        if (old ^ new) & (TN_PERIODIC | TN_32BIT) != 0 && self.enabled() {
            self.arm(n);
        }
        self.sync_lines();
    }

    fn write_comparator(&mut self, n: usize, value: u64, mask: u64) {
        let t = &mut self.timers[n];
        let (cmp, period) = if t.has(TN_32BIT) {
            if mask & 0xffff_ffff == 0 {
                return; // the high dword of a 32-bit comparator
            }
            let v = u64::from(value as u32);
            (v, v)
        } else {
            (deposit(t.cmp, value, mask), deposit(t.period, value, mask))
        };
        if !t.has(TN_PERIODIC) || t.has(TN_VAL_SET) {
            t.cmp = cmp;
        }
        if t.has(TN_PERIODIC) {
            t.period = period;
        }
        t.config &= !TN_VAL_SET;
        if self.enabled() {
            self.arm(n);
        }
    }
}

impl<L: IrqLine> Persist for Hpet<L> {
    type State = HpetState;
    /// The MMIO window, the lines, and the time the state is restored at.
    type ConstructorArgs = (Option<(u64, u32)>, HpetLines<L>, Instant);

    fn save(&self) -> HpetState {
        HpetState {
            config: self.config,
            status: self.status,
            counter: self.ticks() as u64,
            timers: self
                .timers
                .iter()
                .map(|t| HpetTimerState {
                    config: t.config,
                    comparator: t.cmp,
                    period: t.period,
                    fsb_route: t.fsb,
                    armed: t.target.is_some(),
                    wrap_pending: t.wrap_at.is_some(),
                })
                .collect(),
        }
    }

    fn restore((mmio, lines, now): Self::ConstructorArgs, s: HpetState) -> Result<Self, RestoreError> {
        let invalid = |what: String| Err(RestoreError::invalid("hpet", what));
        if s.config & !CFG_WRITABLE != 0 {
            return invalid(format!("configuration {:#x} has bits past ENABLE and LEG_RT", s.config));
        }
        let enabled = s.config & CFG_ENABLE != 0;
        if s.timers.len() != TIMERS {
            return invalid(format!("{} timers, not {TIMERS}", s.timers.len()));
        }
        if s.status >> TIMERS != 0 {
            return invalid(format!("status {:#x} names a timer past the {TIMERS}", s.status));
        }
        for (n, t) in s.timers.iter().enumerate() {
            if t.config & !TN_WRITABLE != 0 {
                return invalid(format!("timer {n}'s configuration {:#x} has read-only or reserved bits", t.config));
            }
            let route = ((t.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT) as u32;
            if !route_allowed(route) {
                return invalid(format!("timer {n} is routed to {route}, not one of its pins ({ROUTE_CAP:#x})"));
            }
            if s.status & (1 << n) != 0 && t.config & TN_LEVEL == 0 {
                return invalid(format!("timer {n} is edge-triggered with its status bit set"));
            }
            let wide = t.comparator > u64::from(u32::MAX) || t.period > u64::from(u32::MAX);
            if t.config & TN_32BIT != 0 && wide {
                return invalid(format!("timer {n} is in 32-bit mode with a comparator or period past 32 bits"));
            }
            if !enabled && (t.armed || t.wrap_pending) {
                return invalid(format!("timer {n} is armed in a halted HPET"));
            }
            if t.wrap_pending {
                let one_shot_32 = t.config & (TN_32BIT | TN_PERIODIC) == TN_32BIT;
                let cur = u128::from(s.counter);
                let timer = Timer::from_state(t);
                if !(one_shot_32 && t.armed && timer.match_tick(cur) > (cur | LOW32) + 1) {
                    return invalid(format!("timer {n} waits for a wrap it has no reason to"));
                }
            }
        }
        Ok(Self::with_state(mmio, lines, now, &s))
    }
}

impl<L: IrqLine> Device for Hpet<L> {
    fn kind(&self) -> &'static str {
        "hpet"
    }

    fn save(&self) -> DeviceState {
        DeviceState::Hpet(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let off = self.offset(space, addr, size)?;
        let reg = self.read_reg(off & !7);
        Some(if size.bytes() == 8 { reg } else { u64::from((reg >> ((off & 4) * 8)) as u32) })
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        let Some(off) = self.offset(space, addr, size) else { return false };
        let (value, mask) = if size.bytes() == 8 {
            (data, u64::MAX)
        } else {
            let shift = (off & 4) * 8;
            ((data & 0xffff_ffff) << shift, 0xffff_ffff << shift)
        };
        self.write_reg(off & !7, value, mask);
        true
    }

    fn tick(&mut self, now: Instant) -> Option<Instant> {
        if now > self.now {
            self.now = now;
        }
        if !self.enabled() {
            return None;
        }
        let cur = self.ticks();
        for n in 0..TIMERS {
            self.expire(n, cur);
        }
        self.sync_lines();
        (0..TIMERS).filter_map(|n| self.deadline(n)).min()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("expirations", c.expirations),
            ("missed_periods", c.missed_periods),
            ("bad_accesses", c.bad_accesses),
            ("counter_writes_while_running", c.counter_writes_while_running),
            ("refused_routes", c.refused_routes),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingLine;

    const B: u64 = 0xfed0_0000;
    type H = Hpet<CountingLine>;

    fn lines() -> HpetLines<CountingLine> {
        HpetLines::wire(|_| CountingLine::default())
    }

    fn hpet(t0: Instant) -> H {
        Hpet::new(Some((B, WINDOW)), lines(), t0)
    }

    fn r8(h: &mut H, off: u64) -> u64 {
        h.read(Space::Mmio, B + off, AccessSize::B8).expect("a 64-bit register")
    }

    fn r4(h: &mut H, off: u64) -> u32 {
        h.read(Space::Mmio, B + off, AccessSize::B4).expect("a 32-bit half") as u32
    }

    fn w8(h: &mut H, off: u64, v: u64) {
        assert!(h.write(Space::Mmio, B + off, AccessSize::B8, v));
    }

    fn w4(h: &mut H, off: u64, v: u32) {
        assert!(h.write(Space::Mmio, B + off, AccessSize::B4, u64::from(v)));
    }

    /// Timer n's configuration register.
    fn tn(n: u64) -> u64 {
        0x100 + 0x20 * n
    }

    fn route(pin: u64) -> u64 {
        pin << TN_ROUTE_SHIFT
    }

    /// The instant the counter, started at `t0`, reaches `ticks`.
    fn at(t0: Instant, ticks: u64) -> Instant {
        t0 + Duration::from_nanos(ticks * 10)
    }

    fn pulses(h: &H, gsi: u32) -> u64 {
        h.line(gsi).unwrap().pulses
    }

    fn level(h: &H, gsi: u32) -> bool {
        h.line(gsi).unwrap().level
    }

    fn all_quiet(h: &H) -> bool {
        LINES.iter().all(|&g| pulses(h, g) == 0 && !level(h, g))
    }

    /// Tick at every deadline up to `end`; returns the number of ticks.
    fn run_until(h: &mut H, from: Instant, end: Instant) -> u64 {
        let mut calls = 0;
        let mut due = h.tick(from);
        while let Some(d) = due.filter(|d| *d <= end) {
            due = h.tick(d);
            calls += 1;
            assert!(calls < 1_000_000, "a runaway timer");
        }
        calls
    }

    #[test]
    fn reset_values_and_capabilities() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        let cap = r8(&mut h, 0x000);
        assert_eq!(cap, 0x0098_9680_8086_a201);
        assert_eq!(cap & 0xff, 1, "revision 1");
        assert_eq!((cap >> 8) & 0x1f, 2, "three timers");
        assert_eq!((cap >> 13) & 1, 1, "64-bit counter");
        assert_eq!((cap >> 15) & 1, 1, "legacy replacement capable");
        assert_eq!((cap >> 16) & 0xffff, 0x8086, "vendor");
        assert_eq!(r4(&mut h, 0x004), 10_000_000, "10 ns in femtoseconds");
        assert_eq!(r4(&mut h, 0x000), 0x8086_a201);
        for off in [0x010, 0x020, 0x0f0] {
            assert_eq!(r8(&mut h, off), 0, "{off:#x}");
        }
        for n in 0..3 {
            assert_eq!(r8(&mut h, tn(n)), 0x00ff_0104_0000_0030, "timer {n}: periodic and 64-bit capable, pins");
            assert_eq!(r8(&mut h, tn(n) + 8), u64::MAX, "timer {n}'s comparator");
            assert_eq!(r8(&mut h, tn(n) + 0x10), 0);
        }
        for reserved in [0x008, 0x018, 0x028, 0x030, 0x0e8, 0x0f8, 0x118, 0x160, 0x168, 0x3f8] {
            assert_eq!(r8(&mut h, reserved), 0, "{reserved:#x}");
        }
        assert_eq!(h.tick(t0 + Duration::from_secs(1)), None, "halted: nothing to do");
        assert_eq!(r8(&mut h, 0xf0), 0, "halted counter");
        assert!(all_quiet(&h));
    }

    #[test]
    fn read_only_bits_stay_as_they_are() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, 0x000, u64::MAX);
        w4(&mut h, 0x004, 0);
        assert_eq!(r8(&mut h, 0x000), CAPABILITIES);
        // Every bit of a timer's configuration: the writable ones stick, the
        // capabilities and FSB bits do not, route 31 is not one of its pins.
        w8(&mut h, tn(0), u64::MAX);
        let expect = 0x00ff_0104_0000_0030 | TN_LEVEL | TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | TN_32BIT;
        assert_eq!(r8(&mut h, tn(0)), expect);
        assert_eq!(r8(&mut h, tn(0)) & (TN_FSB_EN | TN_FSB_CAP), 0, "no FSB delivery");
        assert_eq!(h.counters().refused_routes, 1);
        w4(&mut h, tn(0) + 4, 0);
        w8(&mut h, tn(1), 0);
        assert_eq!(r4(&mut h, tn(0) + 4), ROUTE_CAP, "the route capability is read-only");
        assert_eq!(r8(&mut h, tn(1)), 0x00ff_0104_0000_0030, "clearing does not clear capabilities");
        // General configuration: two bits; status: only timers' bits.
        w8(&mut h, 0x010, !CFG_ENABLE);
        assert_eq!(r8(&mut h, 0x010), CFG_LEGACY);
        w8(&mut h, 0x020, u64::MAX);
        assert_eq!(r8(&mut h, 0x020), 0);
    }

    #[test]
    fn routes_outside_the_capability_are_refused() {
        let mut h = hpet(Instant::now());
        for pin in [2u64, 8, 16, 23] {
            w8(&mut h, tn(2), route(pin));
            assert_eq!((r8(&mut h, tn(2)) & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT, pin);
        }
        for pin in [1u64, 3, 4, 5, 9, 15, 24, 31] {
            w8(&mut h, tn(2), route(pin) | TN_LEVEL);
            assert_eq!(r8(&mut h, tn(2)) & (TN_ROUTE_MASK | TN_LEVEL), route(23) | TN_LEVEL, "pin {pin}");
        }
        assert_eq!(h.counters().refused_routes, 8);
    }

    #[test]
    fn each_half_of_every_64_bit_register() {
        let mut h = hpet(Instant::now());
        // The main counter, halted.
        w4(&mut h, 0xf0, 0x89ab_cdef);
        w4(&mut h, 0xf4, 0x0123_4567);
        assert_eq!(r8(&mut h, 0xf0), 0x0123_4567_89ab_cdef);
        assert_eq!((r4(&mut h, 0xf0), r4(&mut h, 0xf4)), (0x89ab_cdef, 0x0123_4567));
        w8(&mut h, 0xf0, 0x1111_2222_3333_4444);
        assert_eq!((r4(&mut h, 0xf0), r4(&mut h, 0xf4)), (0x3333_4444, 0x1111_2222));
        // A 64-bit one-shot comparator.
        w4(&mut h, tn(1) + 8, 0x1111_2222);
        assert_eq!(r8(&mut h, tn(1) + 8), 0xffff_ffff_1111_2222);
        w4(&mut h, tn(1) + 0xc, 0x3333_4444);
        assert_eq!(r8(&mut h, tn(1) + 8), 0x3333_4444_1111_2222);
        assert_eq!((r4(&mut h, tn(1) + 8), r4(&mut h, tn(1) + 0xc)), (0x1111_2222, 0x3333_4444));
        // The FSB route register (kept).
        w4(&mut h, tn(2) + 0x14, 0xfee0_0000);
        w4(&mut h, tn(2) + 0x10, 0x41);
        assert_eq!(r8(&mut h, tn(2) + 0x10), 0xfee0_0000_0000_0041);
        // A timer's configuration: low half written, high half the pins.
        w4(&mut h, tn(2), (TN_LEVEL | route(16)) as u32);
        assert_eq!((r4(&mut h, tn(2)), r4(&mut h, tn(2) + 4)), (0x2032, ROUTE_CAP));
        // General configuration and status: the high halves are reserved.
        w4(&mut h, 0x014, u32::MAX);
        assert_eq!((r4(&mut h, 0x010), r4(&mut h, 0x014)), (0, 0));
        w4(&mut h, 0x010, CFG_LEGACY as u32);
        assert_eq!(r8(&mut h, 0x010), CFG_LEGACY);
        assert_eq!((r4(&mut h, 0x020), r4(&mut h, 0x024)), (0, 0));
        assert_eq!((r4(&mut h, 0x000), r4(&mut h, 0x004)), (CAPABILITIES as u32, (CAPABILITIES >> 32) as u32));
    }

    #[test]
    fn the_main_counter_counts_at_the_advertised_period() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        h.tick(t0);
        w8(&mut h, 0x010, CFG_ENABLE);
        h.tick(t0 + Duration::from_millis(1));
        assert_eq!(r8(&mut h, 0xf0), 100_000, "1 ms at 10 ns");
        h.tick(t0 + Duration::from_secs(1));
        let period_fs = u64::from(r4(&mut h, 0x004));
        assert_eq!(r8(&mut h, 0xf0), 1_000_000_000_000_000 / period_fs, "a second at the advertised period");
        h.tick(t0 + Duration::from_secs(1) + Duration::from_nanos(9));
        assert_eq!(r8(&mut h, 0xf0), 100_000_000, "not a whole tick more");
        h.tick(t0);
        assert_eq!(r8(&mut h, 0xf0), 100_000_000, "time does not go back");
        // Carry into the high half.
        let t1 = t0 + Duration::from_secs(2);
        h.tick(t1);
        w8(&mut h, 0x010, 0);
        w8(&mut h, 0xf0, 0xffff_ff00);
        w8(&mut h, 0x010, CFG_ENABLE);
        h.tick(t1 + Duration::from_micros(10));
        assert_eq!(r8(&mut h, 0xf0), 0xffff_ff00 + 1000);
        assert_eq!((r4(&mut h, 0xf4), r4(&mut h, 0xf0)), (1, 0x2e8));
    }

    #[test]
    fn the_counter_takes_writes_only_while_halted() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, 0x010, CFG_ENABLE);
        h.tick(t0 + Duration::from_millis(1));
        w8(&mut h, 0xf0, 5);
        w4(&mut h, 0xf4, 5);
        assert_eq!(r8(&mut h, 0xf0), 100_000, "ignored while running");
        assert_eq!(h.counters().counter_writes_while_running, 2);
        h.tick(t0 + Duration::from_millis(2));
        w8(&mut h, 0x010, 0);
        h.tick(t0 + Duration::from_millis(5));
        assert_eq!(r8(&mut h, 0xf0), 200_000, "halted where it was");
        w8(&mut h, 0xf0, 7);
        assert_eq!(r8(&mut h, 0xf0), 7);
        w8(&mut h, 0x010, CFG_ENABLE);
        h.tick(t0 + Duration::from_millis(6));
        assert_eq!(r8(&mut h, 0xf0), 100_007, "counts on from the value written");
    }

    #[test]
    fn a_one_shot_edge_timer_fires_once() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, tn(0), TN_INT_ENB | route(2));
        w8(&mut h, tn(0) + 8, 1000);
        w8(&mut h, 0x010, CFG_ENABLE);
        let due = h.tick(t0).expect("armed");
        assert_eq!(due, at(t0, 1000), "10 µs");
        assert_eq!(h.tick(due - Duration::from_nanos(1)), Some(due));
        assert_eq!(pulses(&h, 2), 0);
        assert_eq!(h.tick(due), None, "fired: nothing more to come");
        assert_eq!(pulses(&h, 2), 1);
        h.tick(t0 + Duration::from_secs(10));
        assert_eq!(pulses(&h, 2), 1, "once");
        assert_eq!(r8(&mut h, 0x020), 0, "edge: no status");
        assert_eq!(r8(&mut h, tn(0) + 8), 1000, "a one-shot comparator stays");
        assert_eq!(h.counters().expirations, 1);
        // Programming it again arms it again.
        let soon = r8(&mut h, 0xf0) + 500;
        w8(&mut h, tn(0) + 8, soon);
        let due = h.tick(t0 + Duration::from_secs(10)).unwrap();
        h.tick(due);
        assert_eq!(pulses(&h, 2), 2);
    }

    #[test]
    fn a_periodic_timer_fires_every_period_for_a_second() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        h.tick(t0);
        // As Linux sets one up: the accumulator with VAL_SET, then the period.
        w8(&mut h, tn(0), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(2));
        w8(&mut h, tn(0) + 8, 100_000);
        assert_eq!(r8(&mut h, tn(0)) & TN_VAL_SET, 0, "VAL_SET clears itself");
        w8(&mut h, tn(0) + 8, 100_000);
        assert_eq!(r8(&mut h, tn(0) + 8), 100_000);
        w8(&mut h, 0x010, CFG_ENABLE);
        let calls = run_until(&mut h, t0, t0 + Duration::from_secs(1));
        assert_eq!((pulses(&h, 2), calls), (1000, 1000), "1 kHz");
        assert_eq!(r8(&mut h, tn(0) + 8), 1001 * 100_000, "the comparator advanced by the period");
        assert_eq!(h.counters().missed_periods, 0);
        // Without VAL_SET a write changes the period, not the comparator.
        w8(&mut h, tn(0) + 8, 50_000);
        assert_eq!(r8(&mut h, tn(0) + 8), 1001 * 100_000);
        let start = t0 + Duration::from_secs(1);
        run_until(&mut h, start, start + Duration::from_millis(100));
        assert_eq!(pulses(&h, 2), 1000 + 199, "2 kHz from the next match (at 1.001 s) on");
    }

    #[test]
    fn a_late_host_gets_one_interrupt_for_the_periods_it_missed() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, tn(1), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(8));
        w8(&mut h, tn(1) + 8, 10_000); // 100 µs
        w8(&mut h, 0x010, CFG_ENABLE);
        let due = h.tick(t0 + Duration::from_micros(550)).unwrap();
        assert_eq!(pulses(&h, 8), 1);
        assert_eq!(h.counters().missed_periods, 4);
        assert_eq!(due, t0 + Duration::from_micros(600), "stays on the period's grid");
        assert_eq!(r8(&mut h, tn(1) + 8), 60_000);
    }

    #[test]
    fn a_level_interrupt_stays_asserted_until_its_status_bit_is_cleared() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, tn(1), TN_LEVEL | TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(16));
        w8(&mut h, tn(1) + 8, 100_000);
        w8(&mut h, 0x010, CFG_ENABLE);
        let due = h.tick(t0).unwrap();
        h.tick(due);
        assert!(level(&h, 16));
        assert_eq!(r8(&mut h, 0x020), 0b010);
        h.tick(due + Duration::from_micros(500));
        assert!(level(&h, 16), "still asserted");
        w4(&mut h, 0x020, 0b101);
        assert!(level(&h, 16), "other timers' bits do not clear it");
        w4(&mut h, 0x020, 0b010);
        assert!(!level(&h, 16), "write 1 to clear lowers the line");
        assert_eq!(r8(&mut h, 0x020), 0);
        h.tick(due + Duration::from_millis(1));
        assert!(level(&h, 16), "the next period asserts it again");
        // Interrupt off: the line drops, the status stays (the timer runs on).
        w8(&mut h, tn(1), TN_LEVEL | TN_PERIODIC | route(16));
        assert!(!level(&h, 16));
        assert_eq!(r8(&mut h, 0x020), 0b010);
        w8(&mut h, tn(1), TN_LEVEL | TN_INT_ENB | TN_PERIODIC | route(16));
        assert!(level(&h, 16), "enabled again with its status set");
        // Edge mode clears the status and the line.
        w8(&mut h, tn(1), TN_INT_ENB | TN_PERIODIC | route(16));
        assert_eq!((r8(&mut h, 0x020), level(&h, 16)), (0, false));
        assert_eq!(h.line(16).unwrap().level_changes, 6);
    }

    #[test]
    fn a_32_bit_timer_matches_the_low_half_and_fires_at_the_wrap() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, 0xf0, 0xffff_fff0);
        w8(&mut h, tn(0), TN_32BIT | TN_INT_ENB | route(2));
        assert_eq!(r8(&mut h, tn(0) + 8), 0xffff_ffff, "the comparator cut to 32 bits");
        w8(&mut h, tn(0) + 8, 0xdead_beef_0000_0010);
        assert_eq!(r8(&mut h, tn(0) + 8), 0x10, "the high half is not kept");
        w4(&mut h, tn(0) + 0xc, 5);
        assert_eq!(r4(&mut h, tn(0) + 0xc), 0, "nor written");
        w8(&mut h, 0x010, CFG_ENABLE);
        let wrap = h.tick(t0).unwrap();
        assert_eq!(wrap, at(t0, 0x10), "the wrap of the low half comes first");
        let matched = h.tick(wrap).unwrap();
        assert_eq!(pulses(&h, 2), 1);
        assert_eq!(matched, at(t0, 0x20), "then the match on the low half");
        assert_eq!(h.tick(matched), None);
        assert_eq!(pulses(&h, 2), 2);
        assert_eq!(r8(&mut h, 0xf0), 0x1_0000_0010, "the main counter stays 64 bits");

        // Periodic across the wrap: the comparator wraps with it.
        let t1 = t0 + Duration::from_secs(1);
        h.tick(t1);
        w8(&mut h, 0x010, 0);
        w8(&mut h, tn(0), 0);
        w8(&mut h, tn(0) + 8, u64::MAX);
        w8(&mut h, 0xf0, 0xfff0_0000);
        w8(&mut h, tn(1), TN_32BIT | TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(8));
        w8(&mut h, tn(1) + 8, 0xfff8_0000);
        w8(&mut h, tn(1) + 8, 0x10_0000);
        w8(&mut h, 0x010, CFG_ENABLE);
        let first = h.tick(t1).unwrap();
        assert_eq!(first, at(t1, 0x8_0000));
        let second = h.tick(first).unwrap();
        assert_eq!(r8(&mut h, tn(1) + 8), 0x0008_0000, "past the wrap");
        assert_eq!(second, at(t1, 0x18_0000));
        h.tick(second);
        assert_eq!((pulses(&h, 8), r8(&mut h, tn(1) + 8)), (2, 0x0018_0000));
    }

    #[test]
    fn legacy_replacement_routes_timers_0_and_1_to_lines_0_and_8() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        for (n, pin) in [(0, 16), (1, 17), (2, 18)] {
            w8(&mut h, tn(n), TN_INT_ENB | route(pin));
            w8(&mut h, tn(n) + 8, 100 * (n + 1));
        }
        w8(&mut h, 0x010, CFG_ENABLE | CFG_LEGACY);
        run_until(&mut h, t0, t0 + Duration::from_millis(1));
        let got: Vec<u64> = [0, 8, 16, 17, 18].iter().map(|&g| pulses(&h, g)).collect();
        assert_eq!(got, vec![1, 1, 0, 0, 1], "timer 2 keeps its route");
        // A level timer 0 moves from line 0 to its own route when legacy mode ends.
        w8(&mut h, tn(0), TN_LEVEL | TN_INT_ENB | route(16));
        let soon = r8(&mut h, 0xf0) + 10;
        w8(&mut h, tn(0) + 8, soon);
        let t1 = t0 + Duration::from_millis(1);
        run_until(&mut h, t1, t1 + Duration::from_millis(1));
        assert!(level(&h, 0) && !level(&h, 16));
        w8(&mut h, 0x010, CFG_ENABLE);
        assert!(!level(&h, 0) && level(&h, 16));
    }

    #[test]
    fn disabled_timers_and_a_halted_hpet_raise_nothing() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, tn(0), route(2));
        w8(&mut h, tn(0) + 8, 100);
        w8(&mut h, tn(1), TN_LEVEL | route(16));
        w8(&mut h, tn(1) + 8, 100);
        w8(&mut h, tn(2), TN_INT_ENB | TN_LEVEL | route(17));
        w8(&mut h, tn(2) + 8, 100);
        // Halted: the counter stands still and no timer runs.
        assert_eq!(h.tick(t0 + Duration::from_secs(1)), None);
        assert!(all_quiet(&h));
        assert_eq!((r8(&mut h, 0xf0), r8(&mut h, 0x020)), (0, 0));
        // Enabled: timers without their interrupt run (a level one sets its
        // status bit) but drive no line.
        let t1 = t0 + Duration::from_secs(1);
        w8(&mut h, 0x010, CFG_ENABLE);
        run_until(&mut h, t1, t1 + Duration::from_millis(1));
        assert_eq!(r8(&mut h, 0x020), 0b110);
        assert!(level(&h, 17));
        assert!(LINES.iter().filter(|&&g| g != 17).all(|&g| pulses(&h, g) == 0 && !level(&h, g)));
        // Halting the HPET lowers the line and keeps the status; enabling it raises it again.
        w8(&mut h, 0x010, 0);
        assert!(!level(&h, 17));
        assert_eq!(r8(&mut h, 0x020), 0b110);
        w8(&mut h, 0x010, CFG_ENABLE);
        assert!(level(&h, 17));
    }

    #[test]
    fn periods_of_zero_and_one_tick_do_not_flood() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        // Period 0: fires once at its comparator and stops.
        w8(&mut h, tn(0), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(2));
        w8(&mut h, tn(0) + 8, 1000);
        w8(&mut h, tn(0) + 8, 0);
        assert_eq!(r8(&mut h, tn(0) + 8), 1000);
        w8(&mut h, 0x010, CFG_ENABLE);
        run_until(&mut h, t0, t0 + Duration::from_secs(1));
        assert_eq!(pulses(&h, 2), 1);
        assert_eq!(h.tick(t0 + Duration::from_secs(2)), None, "stopped");

        // Period 1 (10 ns): an interrupt per MIN_PERIODIC_REARM at most,
        // every period passed counted.
        let t1 = t0 + Duration::from_secs(2);
        let mut h = hpet(t1);
        w8(&mut h, tn(1), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(8));
        w8(&mut h, tn(1) + 8, 1);
        w8(&mut h, 0x010, CFG_ENABLE);
        let end = t1 + Duration::from_secs(1);
        let calls = run_until(&mut h, t1, end);
        let per_second = (Duration::from_secs(1).as_nanos() / MIN_PERIODIC_REARM.as_nanos()) as u64;
        assert!(calls <= per_second + 1, "{calls} ticks");
        assert!((per_second - 1..=per_second + 1).contains(&pulses(&h, 8)), "{} interrupts", pulses(&h, 8));
        for _ in 0..100 {
            h.tick(end); // every access ticks the model first
        }
        assert!(pulses(&h, 8) <= per_second + 1, "ticks at one instant add nothing");
        h.tick(end + MIN_PERIODIC_REARM);
        let c = h.counters();
        let counter = r8(&mut h, 0xf0);
        assert!(counter >= 100_000_000);
        assert_eq!(c.expirations + c.missed_periods, counter, "every period passed is counted");
    }

    #[test]
    fn extreme_values_neither_overflow_nor_panic() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, 0xf0, u64::MAX - 5);
        w8(&mut h, tn(0), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(2));
        w8(&mut h, tn(0) + 8, u64::MAX);
        w8(&mut h, tn(1), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(8));
        w8(&mut h, tn(1) + 8, 3);
        w8(&mut h, tn(2), TN_INT_ENB | TN_32BIT | route(16));
        w8(&mut h, tn(2) + 8, 0);
        w8(&mut h, 0x010, CFG_ENABLE);
        for secs in [0, 1, 1 << 20, 1 << 33] {
            h.tick(t0 + Duration::from_secs(secs));
            r8(&mut h, 0xf0);
        }
        assert!(pulses(&h, 2) >= 1 && pulses(&h, 8) >= 1 && pulses(&h, 16) >= 1);
        let saved = Persist::save(&h);
        let t1 = t0 + Duration::from_secs(1 << 33);
        assert!(Hpet::restore((Some((B, WINDOW)), lines(), t1), saved).is_ok());
    }

    #[test]
    fn save_and_restore_mid_period_keep_the_next_deadline() {
        let t0 = Instant::now();
        let mut h = hpet(t0);
        w8(&mut h, tn(0), TN_INT_ENB | TN_PERIODIC | TN_VAL_SET | route(2));
        w8(&mut h, tn(0) + 8, 100_000);
        w8(&mut h, tn(1), TN_LEVEL | TN_INT_ENB | route(16));
        w8(&mut h, tn(1) + 8, 1000);
        w8(&mut h, tn(2), TN_32BIT | TN_INT_ENB | route(17));
        w8(&mut h, 0x010, CFG_ENABLE);
        run_until(&mut h, t0, t0 + Duration::from_micros(400));
        h.tick(t0 + Duration::from_micros(400));
        assert!(level(&h, 16));
        w8(&mut h, tn(2) + 8, 100); // behind the counter's low half: after a wrap
        let s = Persist::save(&h);
        assert_eq!(s.counter, 40_000);
        assert_eq!((s.status, s.timers[0].armed, s.timers[1].armed), (0b010, true, false));
        assert!(s.timers[2].wrap_pending, "a 32-bit one-shot behind the counter waits for the wrap");
        let same = Hpet::restore((Some((B, WINDOW)), lines(), t0 + Duration::from_micros(400)), s.clone()).unwrap();
        assert_eq!(Persist::save(&same), s, "a round trip");

        let t1 = t0 + Duration::from_secs(7);
        let mut u = Hpet::restore((Some((B, WINDOW)), lines(), t1), s).unwrap();
        assert!(level(&u, 16), "the level line is raised again where it is restored");
        assert_eq!(r8(&mut u, 0xf0), 40_000, "the counter goes on from where it was");
        assert_eq!(u.tick(t1), Some(t1 + Duration::from_micros(600)), "the rest of the period");
        u.tick(t1 + Duration::from_micros(600));
        assert_eq!(pulses(&u, 2), 1);
        assert_eq!(r8(&mut u, tn(0) + 8), 200_000);
    }

    #[test]
    fn bad_states_are_refused_not_run() {
        let t0 = Instant::now();
        let mut good = HpetState { config: CFG_ENABLE, status: 0b001, counter: 10, ..HpetState::default() };
        good.timers[0] =
            HpetTimerState { config: TN_LEVEL | TN_INT_ENB | route(2), comparator: 5, ..HpetTimerState::default() };
        good.timers[1] = HpetTimerState {
            config: TN_32BIT,
            comparator: 3,
            armed: true,
            wrap_pending: true,
            ..HpetTimerState::default()
        };
        let restore = |s: HpetState| Hpet::restore((Some((B, WINDOW)), lines(), t0), s);
        assert!(restore(good.clone()).is_ok());
        let bad = |f: &dyn Fn(&mut HpetState)| {
            let mut s = good.clone();
            f(&mut s);
            s
        };
        for (why, s) in [
            ("config bits", bad(&|s| s.config |= 4)),
            ("too few timers", bad(&|s| s.timers.truncate(2))),
            ("too many timers", bad(&|s| s.timers.push(HpetTimerState::default()))),
            ("status of timer 3", bad(&|s| s.status |= 0b1000)),
            ("capability bits", bad(&|s| s.timers[0].config |= TN_PER_INT_CAP)),
            ("FSB enable", bad(&|s| s.timers[0].config |= TN_FSB_EN)),
            ("route cap", bad(&|s| s.timers[2].config = route(5))),
            ("status of an edge timer", bad(&|s| s.timers[0].config &= !TN_LEVEL)),
            ("32-bit comparator", bad(&|s| s.timers[1].comparator = 1 << 32)),
            ("32-bit period", bad(&|s| s.timers[1].period = 1 << 32)),
            ("armed while halted", bad(&|s| s.config = 0)),
            ("wrap of a periodic timer", bad(&|s| s.timers[1].config |= TN_PERIODIC)),
            ("wrap of a 64-bit timer", bad(&|s| s.timers[1].config = 0)),
            ("wrap not armed", bad(&|s| s.timers[1].armed = false)),
            ("wrap with the match before it", bad(&|s| s.timers[1].comparator = 20)),
        ] {
            let err = restore(s).err().unwrap_or_else(|| panic!("{why}: accepted"));
            assert!(matches!(err, RestoreError::Invalid { model: "hpet", .. }), "{why}: {err}");
        }
    }

    #[test]
    fn accesses_of_other_sizes_or_places_are_not_claimed() {
        let mut h = hpet(Instant::now());
        for (addr, size) in
            [(B, AccessSize::B1), (B + 0xf0, AccessSize::B2), (B + 0xf2, AccessSize::B4), (B + 0xf4, AccessSize::B8)]
        {
            assert_eq!(h.read(Space::Mmio, addr, size), None, "{addr:#x}");
            assert!(!h.write(Space::Mmio, addr, size, 0), "{addr:#x}");
        }
        assert_eq!(h.counters().bad_accesses, 8);
        assert_eq!(h.read(Space::Mmio, B + 0x400, AccessSize::B4), None, "past the window");
        assert_eq!(h.read(Space::Mmio, B - 4, AccessSize::B4), None, "before it");
        assert_eq!(h.read(Space::Pio, B, AccessSize::B4), None, "port space");
        assert_eq!(h.counters().bad_accesses, 8, "not ours: the host counts those");
        let mut nowhere = Hpet::new(None, lines(), Instant::now());
        assert_eq!(nowhere.read(Space::Mmio, B, AccessSize::B4), None);
        assert_eq!(h.read(Space::Mmio, B + 0x3fc, AccessSize::B4), Some(0), "reserved, in the window");
    }
}
