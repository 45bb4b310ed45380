//! The CMOS real-time clock and NVRAM of a PC: a Motorola MC146818A behind
//! the index port 0x70 (bit 7: NMI disable) and the data port 0x71.
//!
//! - Time and date (seconds … year, and the IBM century byte 0x32) from
//!   the host clock, in BCD or binary (register B bit 2) and 24- or 12-hour
//!   format (B bit 1; 12-hour: bit 7 of the hour is PM). With B.SET the
//!   guest freezes the update and writes a new time; clearing SET makes it
//!   the guest's time from then on (an offset from the host clock).
//! - Register A: UIP (bit 7) reads 1 for the 244 µs before each second
//!   changes; DV and the periodic rate select RS.
//! - Register C: IRQF, PF, AF, UF; reading it clears them and lowers IRQ 8.
//!   Periodic (B.PIE, rate from RS), alarm (B.AIE; an alarm byte with both
//!   top bits set matches anything) and update-ended (B.UIE) interrupts.
//! - Register D: VRT (battery good). Bytes 0x0e–0x7f: NVRAM.
//!
//! The IRQ line is a level: high while C.IRQF is set.

use std::time::{Duration, Instant, SystemTime};

use dmfabric_wire::{AccessSize, Space};

use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::irq::IrqLine;

const REG_SEC: usize = 0x00;
const REG_SEC_ALARM: usize = 0x01;
const REG_MIN: usize = 0x02;
const REG_MIN_ALARM: usize = 0x03;
const REG_HOUR: usize = 0x04;
const REG_HOUR_ALARM: usize = 0x05;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

/// How long before a second changes UIP reads 1.
pub const UIP_WINDOW: Duration = Duration::from_micros(244);

/// Maps instants to the host's wall-clock time (passed in, so tests can
/// set any date).
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    unix_ns: i128,
}

impl WallClock {
    /// The host clock now.
    pub fn host() -> WallClock {
        let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        WallClock { at: Instant::now(), unix_ns: unix }
    }

    /// `at` is `unix_s` seconds after the epoch.
    pub fn fixed(at: Instant, unix_s: i64) -> WallClock {
        WallClock { at, unix_ns: i128::from(unix_s) * 1_000_000_000 }
    }

    fn unix_ns(&self, now: Instant) -> i128 {
        if now >= self.at {
            self.unix_ns + (now - self.at).as_nanos() as i128
        } else {
            self.unix_ns - (self.at - now).as_nanos() as i128
        }
    }
}

/// The saved state of the RTC: a plain struct.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    /// All 128 bytes: time registers as last latched, A–D, NVRAM.
    pub cmos: Vec<u8>,
    pub index: u8,
    pub nmi_disabled: bool,
    /// Guest time minus host time, in nanoseconds.
    pub offset_ns: i128,
}

impl Default for RtcState {
    fn default() -> Self {
        let mut cmos = vec![0u8; 128];
        cmos[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        RtcState { cmos, index: 0, nmi_disabled: false, offset_ns: 0 }
    }
}

/// The RTC at ports `base` (index) and `base + 1` (data).
#[derive(Debug)]
pub struct Cmos<L> {
    base: u16,
    state: RtcState,
    line: L,
    clock: WallClock,
    now: Instant,
    /// The guest second last latched into the registers.
    last_second: Option<i64>,
    next_periodic: Option<Instant>,
}

/// Days since 1970-01-01 → (year, month 1–12, day 1–31) (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// The periodic interrupt's period for rate select `rs` (32.768 kHz base).
fn periodic(rs: u8) -> Option<Duration> {
    let hz: u64 = match rs & 0x0f {
        0 => return None,
        1 => 256,
        2 => 128,
        n => 32_768 >> (n - 1),
    };
    Some(Duration::from_nanos(1_000_000_000 / hz))
}

impl<L: IrqLine> Cmos<L> {
    pub fn new(base: u16, line: L, clock: WallClock, now: Instant) -> Self {
        Self::with_state(base, RtcState::default(), line, clock, now)
    }

    /// An RTC in a state already checked: 128 bytes, an index below 128.
    fn with_state(base: u16, state: RtcState, line: L, clock: WallClock, now: Instant) -> Self {
        let mut c = Cmos { base, state, line, clock, now, last_second: None, next_periodic: None };
        c.latch();
        c.schedule_periodic();
        c.update_irq();
        c
    }

    /// The state as [`Persist::save`] gives it (the index and NMI bit, say).
    pub fn state(&self) -> &RtcState {
        &self.state
    }

    pub fn line(&self) -> &L {
        &self.line
    }

    fn reg(&self, r: usize) -> u8 {
        self.state.cmos[r]
    }

    fn guest_ns(&self) -> i128 {
        self.clock.unix_ns(self.now) + self.state.offset_ns
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    /// Copy the guest time into the time registers (unless SET freezes them).
    fn latch(&mut self) {
        if self.reg(REG_B) & B_SET != 0 {
            return;
        }
        let secs = self.guest_ns().div_euclid(1_000_000_000) as i64;
        if self.last_second == Some(secs) {
            return;
        }
        self.last_second = Some(secs);
        let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil(days);
        let weekday = ((days + 4).rem_euclid(7) + 1) as u8; // 1 = Sunday; 1970-01-01 was a Thursday
        let fields = [
            (REG_SEC, self.encode((sod % 60) as u8)),
            (REG_MIN, self.encode((sod / 60 % 60) as u8)),
            (REG_HOUR, self.encode_hour((sod / 3600) as u8)),
            (REG_WEEKDAY, self.encode(weekday)),
            (REG_DAY, self.encode(d as u8)),
            (REG_MONTH, self.encode(m as u8)),
            (REG_YEAR, self.encode(y.rem_euclid(100) as u8)),
            (REG_CENTURY, self.encode(y.div_euclid(100).clamp(0, 99) as u8)),
        ];
        for (r, v) in fields {
            self.state.cmos[r] = v;
        }
    }

    /// The guest wrote a time while SET was on: make it the guest's clock.
    fn adopt_written_time(&mut self) {
        let sec = i64::from(self.decode(self.reg(REG_SEC)));
        let min = i64::from(self.decode(self.reg(REG_MIN)));
        let hour = i64::from(self.decode_hour(self.reg(REG_HOUR)));
        let day = u32::from(self.decode(self.reg(REG_DAY))).clamp(1, 31);
        let month = u32::from(self.decode(self.reg(REG_MONTH))).clamp(1, 12);
        let year = i64::from(self.decode(self.reg(REG_CENTURY))) * 100 + i64::from(self.decode(self.reg(REG_YEAR)));
        let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec;
        let host = self.clock.unix_ns(self.now);
        self.state.offset_ns = i128::from(secs) * 1_000_000_000 - host;
        self.last_second = None;
    }

    fn schedule_periodic(&mut self) {
        self.next_periodic =
            if self.reg(REG_B) & B_PIE != 0 { periodic(self.reg(REG_A)).map(|p| self.now + p) } else { None };
    }

    fn update_irq(&mut self) {
        let c = self.reg(REG_C);
        let b = self.reg(REG_B);
        let irq =
            (c & C_PF != 0 && b & B_PIE != 0) || (c & C_AF != 0 && b & B_AIE != 0) || (c & C_UF != 0 && b & B_UIE != 0);
        if irq {
            self.state.cmos[REG_C] |= C_IRQF;
        }
        self.line.set_level(self.reg(REG_C) & C_IRQF != 0);
    }

    fn alarm_matches(&self) -> bool {
        let pairs = [(REG_SEC_ALARM, REG_SEC), (REG_MIN_ALARM, REG_MIN), (REG_HOUR_ALARM, REG_HOUR)];
        pairs.iter().all(|&(a, t)| self.reg(a) & 0xc0 == 0xc0 || self.reg(a) == self.reg(t))
    }

    fn uip(&self) -> bool {
        if self.reg(REG_B) & B_SET != 0 || self.reg(REG_A) & 0x70 != 0x20 {
            return false;
        }
        let frac = self.guest_ns().rem_euclid(1_000_000_000);
        frac >= 1_000_000_000 - UIP_WINDOW.as_nanos() as i128
    }

    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        // Periodic flag.
        if let Some(due) = self.next_periodic {
            if self.now >= due {
                self.state.cmos[REG_C] |= C_PF;
                let p = periodic(self.reg(REG_A)).unwrap_or(Duration::from_secs(1));
                let behind = (self.now - due).as_nanos() / p.as_nanos().max(1);
                self.next_periodic = Some(due + p * (behind as u32 + 1));
            }
        }
        // A new second: update-ended, alarm.
        let before = self.last_second;
        self.latch();
        if before.is_some() && self.last_second != before {
            self.state.cmos[REG_C] |= C_UF;
            if self.alarm_matches() {
                self.state.cmos[REG_C] |= C_AF;
            }
        }
        self.update_irq();
    }

    fn offset(&self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        if space != Space::Pio || size != AccessSize::B1 {
            return None;
        }
        addr.checked_sub(u64::from(self.base)).filter(|o| *o < 2)
    }

    fn read_data(&mut self) -> u8 {
        let i = usize::from(self.state.index);
        match i {
            REG_A => self.reg(REG_A) | if self.uip() { A_UIP } else { 0 },
            REG_C => {
                let c = self.reg(REG_C);
                self.state.cmos[REG_C] = 0;
                self.update_irq();
                c
            }
            _ => self.reg(i),
        }
    }

    fn write_data(&mut self, v: u8) {
        let i = usize::from(self.state.index);
        match i {
            REG_A => {
                self.state.cmos[REG_A] = v & 0x7f; // UIP is read-only
                self.schedule_periodic();
            }
            REG_B => {
                let was_set = self.reg(REG_B) & B_SET != 0;
                // SET also stops update-ended interrupts from being enabled.
                let v = if v & B_SET != 0 { v & !B_UIE } else { v };
                self.state.cmos[REG_B] = v;
                if was_set && v & B_SET == 0 {
                    self.adopt_written_time();
                    self.latch();
                }
                if !was_set && v & B_SET == 0 {
                    // A format change shows at once.
                    self.last_second = None;
                    self.latch();
                }
                self.schedule_periodic();
                self.update_irq();
            }
            REG_C | REG_D => {} // read-only
            _ => self.state.cmos[i] = v,
        }
    }
}

/// Bytes of CMOS: time, registers A–D, NVRAM.
pub const CMOS_BYTES: usize = 128;
/// Largest guest-time offset a saved state may carry (about 31,700 years):
/// more than any time a guest can write into the registers (BCD bytes past
/// 0x99 decode up to 165, so the year up to 16665, hours up to 165), so that
/// every state a model saves restores, and small enough that guest time in
/// nanoseconds stays far inside an `i128` and its seconds inside an `i64`.
const MAX_OFFSET_NS: i128 = 1_000_000_000_000_000_000_000;

impl<L: IrqLine> Persist for Cmos<L> {
    type State = RtcState;
    /// The base port, the line, the wall clock and the time the state is restored at.
    type ConstructorArgs = (u16, L, WallClock, Instant);

    fn save(&self) -> RtcState {
        self.state.clone()
    }

    fn restore((base, line, clock, now): Self::ConstructorArgs, state: RtcState) -> Result<Self, RestoreError> {
        let invalid = |what: String| Err(RestoreError::invalid("rtc", what));
        if state.cmos.len() != CMOS_BYTES {
            return invalid(format!("{} bytes of CMOS, not {CMOS_BYTES}", state.cmos.len()));
        }
        if usize::from(state.index) >= CMOS_BYTES {
            return invalid(format!("index {:#x} is past the CMOS", state.index));
        }
        if !(-MAX_OFFSET_NS..=MAX_OFFSET_NS).contains(&state.offset_ns) {
            return invalid(format!("a guest clock {} ns away from the host's", state.offset_ns));
        }
        Ok(Self::with_state(base, state, line, clock, now))
    }
}

impl<L: IrqLine> Device for Cmos<L> {
    fn kind(&self) -> &'static str {
        "cmos-rtc"
    }

    fn save(&self) -> DeviceState {
        DeviceState::Rtc(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        match self.offset(space, addr, size)? {
            1 => Some(u64::from(self.read_data())),
            _ => None, // the index port is write-only
        }
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        match self.offset(space, addr, size) {
            Some(0) => {
                self.state.index = data as u8 & 0x7f;
                self.state.nmi_disabled = data & 0x80 != 0;
                true
            }
            Some(_) => {
                self.write_data(data as u8);
                true
            }
            None => false,
        }
    }

    fn tick(&mut self, now: Instant) -> Option<Instant> {
        self.advance(now);
        let to_next_second = 1_000_000_000 - self.guest_ns().rem_euclid(1_000_000_000) as u64;
        let second = self.now + Duration::from_nanos(to_next_second);
        Some(self.next_periodic.map_or(second, |p| p.min(second)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingLine;

    // 2026-11-21 (a Saturday) 13:45:30 UTC.
    const T: i64 = 1_795_268_730;

    fn rtc(t0: Instant) -> Cmos<CountingLine> {
        Cmos::new(0x70, CountingLine::default(), WallClock::fixed(t0, T), t0)
    }

    fn get(c: &mut Cmos<CountingLine>, now: Instant, r: u8) -> u8 {
        c.tick(now);
        assert!(c.write(Space::Pio, 0x70, AccessSize::B1, u64::from(r)));
        c.read(Space::Pio, 0x71, AccessSize::B1).unwrap() as u8
    }

    fn set(c: &mut Cmos<CountingLine>, r: u8, v: u8) {
        assert!(c.write(Space::Pio, 0x70, AccessSize::B1, u64::from(r)));
        assert!(c.write(Space::Pio, 0x71, AccessSize::B1, u64::from(v)));
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(T / 86_400), (2026, 11, 21));
        assert_eq!(civil(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        for d in [-1000, 0, 11_016, 20_000, 60_000] {
            let (y, m, dd) = civil(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn reset_values() {
        let t0 = Instant::now();
        let mut c = rtc(t0);
        assert_eq!(get(&mut c, t0, 0x0a) & 0x7f, 0x26);
        assert_eq!(get(&mut c, t0, 0x0b), 0x02, "24-hour BCD");
        assert_eq!(get(&mut c, t0, 0x0c), 0);
        assert_eq!(get(&mut c, t0, 0x0d), 0x80, "battery good");
        assert_eq!(c.read(Space::Pio, 0x70, AccessSize::B1), None, "the index port is write-only");
    }

    #[test]
    fn time_in_bcd_and_binary_24_and_12_hour() {
        let t0 = Instant::now();
        let mut c = rtc(t0);
        let fields: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32].iter().map(|&r| get(&mut c, t0, r)).collect();
        assert_eq!(fields, vec![0x30, 0x45, 0x13, 0x07, 0x21, 0x11, 0x26, 0x20], "BCD, Saturday = 7");
        set(&mut c, 0x0b, B_24H | B_BINARY);
        let fields: Vec<u8> = [0, 2, 4, 7, 8, 9].iter().map(|&r| get(&mut c, t0, r)).collect();
        assert_eq!(fields, vec![30, 45, 13, 21, 11, 26], "binary");
        set(&mut c, 0x0b, B_BINARY);
        assert_eq!(get(&mut c, t0, 4), 0x80 | 1, "1 PM in 12-hour binary");
        set(&mut c, 0x0b, 0);
        assert_eq!(get(&mut c, t0, 4), 0x81, "1 PM in 12-hour BCD");
        // Time moves on with `now`.
        set(&mut c, 0x0b, B_24H);
        assert_eq!(get(&mut c, t0 + Duration::from_secs(95), 2), 0x47);
    }

    #[test]
    fn set_freezes_and_the_written_time_sticks() {
        let t0 = Instant::now();
        let mut c = rtc(t0);
        set(&mut c, 0x0b, B_SET | B_24H);
        for (r, v) in [(0, 0x00), (2, 0x30), (4, 0x08), (7, 0x01), (8, 0x01), (9, 0x30), (0x32, 0x20)] {
            set(&mut c, r, v);
        }
        assert_eq!(get(&mut c, t0 + Duration::from_secs(5), 0), 0x00, "frozen while SET");
        assert_eq!(get(&mut c, t0, 0x0a) & A_UIP, 0, "no update in progress while SET");
        set(&mut c, 0x0b, B_24H); // at t0 + 5 s, the latest instant the RTC has seen
        let later = t0 + Duration::from_secs(5 + 61);
        assert_eq!(
            [2, 4, 7, 8, 9].map(|r| get(&mut c, later, r)),
            [0x31, 0x08, 0x01, 0x01, 0x30],
            "2030-01-01 08:31, a minute on"
        );
    }

    #[test]
    fn uip_shows_just_before_the_second_changes() {
        let t0 = Instant::now();
        let mut c = rtc(t0);
        assert_eq!(get(&mut c, t0 + Duration::from_millis(500), 0x0a) & A_UIP, 0);
        assert_eq!(get(&mut c, t0 + Duration::from_micros(999_900), 0x0a) & A_UIP, A_UIP);
        assert_eq!(get(&mut c, t0 + Duration::from_millis(1001), 0x0a) & A_UIP, 0);
    }

    #[test]
    fn periodic_update_and_alarm_interrupts_raise_and_reading_c_lowers() {
        let t0 = Instant::now();
        let mut c = rtc(t0);
        set(&mut c, 0x0a, 0x2f); // RS 15: 2 Hz
        set(&mut c, 0x0b, B_24H | B_PIE);
        let due = c.tick(t0).unwrap();
        assert_eq!(due, t0 + Duration::from_millis(500));
        c.tick(due);
        assert!(c.line().level, "periodic");
        assert_eq!(get(&mut c, due, 0x0c), C_IRQF | C_PF);
        assert!(!c.line().level, "reading C lowered IRQ 8");
        assert_eq!(get(&mut c, due, 0x0c), 0);
        // Update-ended at the next second, and an alarm for 13:45:31.
        set(&mut c, 0x0b, B_24H | B_UIE | B_AIE);
        set(&mut c, 0x01, 0x31);
        set(&mut c, 0x03, 0xc0); // any minute
        set(&mut c, 0x05, 0x13);
        let second = t0 + Duration::from_secs(1);
        c.tick(second);
        assert_eq!(get(&mut c, second, 0x0c), C_IRQF | C_AF | C_UF);
        assert_eq!(c.line().level_changes, 4);
    }

    #[test]
    fn nvram_keeps_bytes_and_the_state_round_trips() {
        let t0 = Instant::now();
        let mut c = rtc(t0);
        set(&mut c, 0x40, 0xab);
        set(&mut c, 0x7f, 0xcd);
        assert_eq!((get(&mut c, t0, 0x40), get(&mut c, t0, 0x7f)), (0xab, 0xcd));
        set(&mut c, 0x8e, 0x11); // bit 7 of the index is NMI disable
        assert!(c.state().nmi_disabled);
        assert_eq!(get(&mut c, t0, 0x0e), 0x11);
        let args = || (0x70, CountingLine::default(), WallClock::fixed(t0, T), t0);
        let mut d = Cmos::restore(args(), Persist::save(&c)).unwrap();
        assert_eq!(get(&mut d, t0, 0x40), 0xab);
        assert_eq!(c.read(Space::Pio, 0x71, AccessSize::B2), None, "a 16-bit access is not a register");
    }

    #[test]
    fn any_time_a_guest_can_write_is_kept_across_a_restore() {
        let t0 = Instant::now();
        let args = || (0x70, CountingLine::default(), WallClock::fixed(t0, T), t0);
        // The latest and the earliest a guest can write (BCD nibbles past 9
        // decode past 99: 0xff is 165), and the year 9999.
        for (century, year, hour) in [(0xff, 0xff, 0xff), (0x99, 0x99, 0x23), (0x00, 0x00, 0x00)] {
            let mut c = rtc(t0);
            set(&mut c, 0x0b, B_SET | B_24H);
            for (r, v) in [(0x00, 0xff), (0x02, 0xff), (0x04, hour), (0x07, 0x31), (0x08, 0x12), (0x09, year)] {
                set(&mut c, r, v);
            }
            set(&mut c, 0x32, century);
            set(&mut c, 0x0b, B_24H);
            let saved = Persist::save(&c);
            let back = Cmos::restore(args(), saved.clone());
            assert!(back.is_ok(), "century {century:#x}, year {year:#x}: {:?}", back.err());
            assert_eq!(back.unwrap().state().offset_ns, saved.offset_ns);
        }
    }

    #[test]
    fn a_short_cmos_or_a_wild_index_is_refused_not_indexed() {
        let t0 = Instant::now();
        let args = || (0x70, CountingLine::default(), WallClock::fixed(t0, T), t0);
        for bad in [
            RtcState { cmos: vec![0; 10], ..RtcState::default() },
            RtcState { cmos: vec![0; 4096], ..RtcState::default() },
            RtcState { index: 0xff, ..RtcState::default() },
            RtcState { offset_ns: i128::MAX, ..RtcState::default() },
        ] {
            assert!(Cmos::restore(args(), bad).is_err());
        }
    }
}
