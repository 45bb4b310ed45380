//! The event timer: a programmable one-shot / periodic timer that raises
//! interrupts, the device that proves device-initiated interrupts under load.
//!
//! Register map (port space, 32-bit accesses, from the base):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x00 | CTRL | rw | bit 0 ENABLE, bit 1 PERIODIC (else one-shot), bit 2 LEVEL (level-triggered interrupt, else edge) |
//! | 0x04 | PERIOD_US | rw | period (or delay) in microseconds; 0 stops the timer |
//! | 0x08 | STATUS | r / w1c | bit 0: expired and not yet acknowledged; writing 1 clears it (and lowers a level interrupt) |
//! | 0x0c | COUNT | r / w | expirations so far (wraps); any write zeroes it |
//! | 0x10 | NOW_US | r | the device's clock, microseconds since it was created (low 32 bits) |
//!
//! Writing CTRL with ENABLE, or PERIOD_US while enabled, (re)starts the
//! countdown from the time of the write. A one-shot timer clears ENABLE
//! when it fires. If the worker comes late and several periods have passed,
//! COUNT counts each of them but a single interrupt is raised (as a
//! hardware timer whose interrupt was still pending).

use std::time::{Duration, Instant};

use dmfabric_wire::{AccessSize, Space};

use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::irq::IrqLine;

/// Ports the timer takes.
pub const TIMER_PORTS: u16 = 0x14;

pub const CTRL_ENABLE: u32 = 0x1;
pub const CTRL_PERIODIC: u32 = 0x2;
pub const CTRL_LEVEL: u32 = 0x4;

/// The saved state of the timer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimerState {
    pub ctrl: u32,
    pub period_us: u32,
    pub status: u32,
    pub count: u32,
    /// Microseconds until the next expiry, if running.
    pub remaining_us: Option<u64>,
}

#[derive(Debug)]
pub struct EventTimer<L> {
    base: u16,
    ctrl: u32,
    period_us: u32,
    status: u32,
    count: u32,
    due: Option<Instant>,
    created: Instant,
    now: Instant,
    line: L,
}

impl<L: IrqLine> EventTimer<L> {
    pub fn new(base: u16, line: L, now: Instant) -> Self {
        EventTimer { base, ctrl: 0, period_us: 0, status: 0, count: 0, due: None, created: now, now, line }
    }

    pub fn line(&self) -> &L {
        &self.line
    }

    fn period(&self) -> Option<Duration> {
        (self.period_us > 0).then(|| Duration::from_micros(u64::from(self.period_us)))
    }

    fn restart(&mut self) {
        self.due = match self.period() {
            Some(p) if self.ctrl & CTRL_ENABLE != 0 => Some(self.now + p),
            _ => None,
        };
    }

    fn fire(&mut self) {
        let Some(due) = self.due else { return };
        if self.now < due {
            return;
        }
        let mut expired = 1u64;
        if self.ctrl & CTRL_PERIODIC != 0 {
            let p = self.period().unwrap_or(Duration::from_micros(1));
            let behind = ((self.now - due).as_nanos() / p.as_nanos().max(1)) as u64;
            expired += behind;
            self.due = Some(due + p * (behind as u32).saturating_add(1));
        } else {
            self.ctrl &= !CTRL_ENABLE;
            self.due = None;
        }
        self.count = self.count.wrapping_add(expired as u32);
        self.status |= 1;
        if self.ctrl & CTRL_LEVEL != 0 {
            self.line.set_level(true);
        } else {
            self.line.pulse();
        }
    }

    fn offset(&self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        if space != Space::Pio || size != AccessSize::B4 {
            return None;
        }
        addr.checked_sub(u64::from(self.base)).filter(|o| *o < u64::from(TIMER_PORTS) && o % 4 == 0)
    }
}

impl<L: IrqLine> Persist for EventTimer<L> {
    type State = TimerState;
    /// The base port, the line, and the time the state is restored at.
    type ConstructorArgs = (u16, L, Instant);

    fn save(&self) -> TimerState {
        TimerState {
            ctrl: self.ctrl,
            period_us: self.period_us,
            status: self.status,
            count: self.count,
            remaining_us: self.due.map(|d| d.saturating_duration_since(self.now).as_micros() as u64),
        }
    }

    fn restore((base, line, now): Self::ConstructorArgs, s: TimerState) -> Result<Self, RestoreError> {
        let invalid = |what: String| Err(RestoreError::invalid("timer", what));
        if s.ctrl & !(CTRL_ENABLE | CTRL_PERIODIC | CTRL_LEVEL) != 0 {
            return invalid(format!("CTRL {:#x} has undefined bits", s.ctrl));
        }
        if s.status > 1 {
            return invalid(format!("STATUS {:#x} has undefined bits", s.status));
        }
        // A countdown is at most one period: PERIOD_US is 32 bits.
        if s.remaining_us.is_some_and(|us| us > u64::from(u32::MAX)) {
            return invalid(format!("a countdown of {:?} µs is longer than any period", s.remaining_us));
        }
        let mut t = EventTimer::new(base, line, now);
        t.ctrl = s.ctrl;
        t.period_us = s.period_us;
        t.status = s.status;
        t.count = s.count;
        t.due = s.remaining_us.map(|us| now + Duration::from_micros(us));
        if s.ctrl & CTRL_LEVEL != 0 {
            t.line.set_level(s.status & 1 != 0);
        }
        Ok(t)
    }
}

impl<L: IrqLine> Device for EventTimer<L> {
    fn kind(&self) -> &'static str {
        "event-timer"
    }

    fn save(&self) -> DeviceState {
        DeviceState::Timer(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let v = match self.offset(space, addr, size)? {
            0x00 => self.ctrl,
            0x04 => self.period_us,
            0x08 => self.status,
            0x0c => self.count,
            _ => (self.now - self.created).as_micros() as u32,
        };
        Some(u64::from(v))
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        let v = data as u32;
        match self.offset(space, addr, size) {
            Some(0x00) => {
                let level_before = self.ctrl & CTRL_LEVEL != 0;
                self.ctrl = v & (CTRL_ENABLE | CTRL_PERIODIC | CTRL_LEVEL);
                if level_before && self.ctrl & CTRL_LEVEL == 0 {
                    self.line.set_level(false);
                }
                self.restart();
            }
            Some(0x04) => {
                self.period_us = v;
                self.restart();
            }
            Some(0x08) => {
                if v & 1 != 0 {
                    self.status &= !1;
                    if self.ctrl & CTRL_LEVEL != 0 {
                        self.line.set_level(false);
                    }
                }
            }
            Some(0x0c) => self.count = 0,
            _ => return false,
        }
        true
    }

    fn tick(&mut self, now: Instant) -> Option<Instant> {
        if now > self.now {
            self.now = now;
        }
        self.fire();
        self.due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingLine;

    fn w(t: &mut EventTimer<CountingLine>, off: u64, v: u32) {
        assert!(t.write(Space::Pio, 0x700 + off, AccessSize::B4, u64::from(v)));
    }

    fn r(t: &mut EventTimer<CountingLine>, off: u64) -> u32 {
        t.read(Space::Pio, 0x700 + off, AccessSize::B4).unwrap() as u32
    }

    #[test]
    fn periodic_edges_at_the_programmed_rate() {
        let t0 = Instant::now();
        let mut t = EventTimer::new(0x700, CountingLine::default(), t0);
        assert_eq!((r(&mut t, 0), r(&mut t, 4), r(&mut t, 8), r(&mut t, 0xc)), (0, 0, 0, 0), "reset values");
        w(&mut t, 4, 1000);
        w(&mut t, 0, CTRL_ENABLE | CTRL_PERIODIC);
        let mut due = t.tick(t0).expect("running");
        assert_eq!(due, t0 + Duration::from_millis(1));
        for _ in 0..10 {
            due = t.tick(due).unwrap();
        }
        assert_eq!(due, t0 + Duration::from_millis(11));
        assert_eq!((t.line().pulses, r(&mut t, 0xc)), (10, 10));
        assert_eq!(r(&mut t, 0x10), 10_000, "the device's clock in µs");
    }

    #[test]
    fn a_late_tick_counts_every_period_but_raises_once() {
        let t0 = Instant::now();
        let mut t = EventTimer::new(0x700, CountingLine::default(), t0);
        w(&mut t, 4, 100);
        w(&mut t, 0, CTRL_ENABLE | CTRL_PERIODIC);
        let due = t.tick(t0 + Duration::from_micros(550)).unwrap();
        assert_eq!((t.line().pulses, r(&mut t, 0xc)), (1, 5));
        assert_eq!(due, t0 + Duration::from_micros(600), "stays on the period grid");
    }

    #[test]
    fn one_shot_level_interrupt_until_acknowledged() {
        let t0 = Instant::now();
        let mut t = EventTimer::new(0x700, CountingLine::default(), t0);
        w(&mut t, 4, 250);
        w(&mut t, 0, CTRL_ENABLE | CTRL_LEVEL);
        assert!(t.tick(t0 + Duration::from_micros(100)).is_some());
        assert!(!t.line().level);
        assert_eq!(t.tick(t0 + Duration::from_micros(250)), None, "one-shot: done");
        assert!(t.line().level);
        assert_eq!((r(&mut t, 0), r(&mut t, 8)), (CTRL_LEVEL, 1), "ENABLE cleared, expired");
        w(&mut t, 8, 1);
        assert!(!t.line().level, "w1c lowers the level");
        assert_eq!(r(&mut t, 8), 0);
        w(&mut t, 0xc, 0);
        assert_eq!(r(&mut t, 0xc), 0);
    }

    #[test]
    fn zero_period_or_disable_stops_and_bad_accesses_are_not_claimed() {
        let t0 = Instant::now();
        let mut t = EventTimer::new(0x700, CountingLine::default(), t0);
        w(&mut t, 0, CTRL_ENABLE | CTRL_PERIODIC);
        assert_eq!(t.tick(t0), None, "no period: not running");
        w(&mut t, 4, 10);
        assert!(t.tick(t0).is_some());
        w(&mut t, 0, 0);
        assert_eq!(t.tick(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.line().pulses, 0);
        assert_eq!(t.read(Space::Pio, 0x702, AccessSize::B4), None, "unaligned");
        assert_eq!(t.read(Space::Pio, 0x700, AccessSize::B2), None, "16-bit");
        assert_eq!(t.read(Space::Pio, 0x714, AccessSize::B4), None, "past the end");
        assert!(!t.write(Space::Pio, 0x710, AccessSize::B4, 5), "NOW_US is read-only");
    }

    #[test]
    fn state_round_trips_with_the_countdown() {
        let t0 = Instant::now();
        let mut t = EventTimer::new(0x700, CountingLine::default(), t0);
        w(&mut t, 4, 1000);
        w(&mut t, 0, CTRL_ENABLE | CTRL_PERIODIC);
        t.tick(t0 + Duration::from_micros(400));
        let s = Persist::save(&t);
        assert_eq!(s.remaining_us, Some(600));
        let t1 = t0 + Duration::from_secs(7);
        let mut u = EventTimer::restore((0x700, CountingLine::default(), t1), s).unwrap();
        assert_eq!(u.tick(t1), Some(t1 + Duration::from_micros(600)));
    }

    #[test]
    fn bad_states_are_refused_not_run() {
        let t0 = Instant::now();
        let good = TimerState { ctrl: CTRL_ENABLE, period_us: 10, remaining_us: Some(10), ..TimerState::default() };
        assert!(EventTimer::restore((0x700, CountingLine::default(), t0), good).is_ok());
        for bad in [
            TimerState { remaining_us: Some(u64::MAX), ..good },
            TimerState { ctrl: 0x80, ..good },
            TimerState { status: 2, ..good },
        ] {
            assert!(EventTimer::restore((0x700, CountingLine::default(), t0), bad).is_err(), "{bad:?}");
        }
    }
}
