//! What dmfabric's fuzz targets share: a host to wire device models to
//! ([`FuzzWiring`]), the models every saved state is tried on ([`specs`]),
//! and a script of register accesses to drive a model with ([`drive`]).
//!
//! The targets (`fuzz_targets/`) each take bytes from outside — a frame,
//! a device state in transit, a VM snapshot, a control-panel record, what a
//! terminal sends the console socket — through the parser the product uses,
//! and use what it accepts the way the product would.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dmfabric_devices::platform::pc::{self, PcLayout};
use dmfabric_devices::{ByteSink, ByteSource, Device, DeviceSpec, IrqLine, ResetSink, WallClock, Wiring};
use dmfabric_wire::{AccessSize, Space};

/// The wall clock's time at the start of every run (2026-11-21 13:45:30 UTC).
pub const UNIX_TIME: i64 = 1_795_268_730;

/// An interrupt line that keeps its level.
#[derive(Debug, Default)]
pub struct Line(pub bool);

impl IrqLine for Line {
    fn pulse(&mut self) {}
    fn set_level(&mut self, asserted: bool) {
        self.0 = asserted;
    }
}

/// What a fuzzed model is wired to: lines that keep their level, a console
/// that swallows output and has a line of input, a reset that is counted,
/// a wall clock fixed at [`UNIX_TIME`] at `at`.
#[derive(Debug)]
pub struct FuzzWiring {
    pub at: Instant,
}

impl FuzzWiring {
    pub fn new(at: Instant) -> FuzzWiring {
        FuzzWiring { at }
    }
}

impl Wiring for FuzzWiring {
    type Line = Line;

    fn line(&self, _device: u32, _gsi: u32) -> Line {
        Line::default()
    }

    fn console(&self, _vm: Option<u32>, _device: u32) -> (Box<dyn ByteSink>, Box<dyn ByteSource>) {
        (Box::new(Vec::new()), Box::new(VecDeque::from(b"ls\n".to_vec())))
    }

    fn reset(&self, _device: u32) -> Box<dyn ResetSink> {
        Box::new(0u64)
    }

    fn clock(&self) -> WallClock {
        WallClock::fixed(self.at, UNIX_TIME)
    }
}

/// One of each model, where a PC (or a server's defaults) has it: every
/// saved state is tried on each. The register file is the server's test
/// device with small windows (16 ports, 64 bytes of MMIO): the same code,
/// and its state is quick to parse and save.
pub fn specs() -> Vec<DeviceSpec> {
    let mut specs = PcLayout::new(1).map(|l| l.specs()).unwrap_or_default();
    let regfile = pc::test_device(pc::TEST_DEVICE_ID);
    specs.push(DeviceSpec {
        pio: Some((pc::TEST_DEVICE_PIO.base, 16)),
        mmio: Some((pc::TEST_DEVICE_MMIO, 64)),
        ..regfile
    });
    specs.push(pc::irq_test_device(0));
    specs
}

/// Accesses a script may hold (4 bytes each).
pub const MAX_ACCESSES: usize = 64;

/// Drive `d` (built from `spec`) with `script`, 4 bytes an access, from
/// `now`; returns the time after the last one. An access is
/// `[op, offset, data lo, data hi]`: op bit 0 write (else read), bit 1 MMIO
/// (else port), bits 2–3 the size (1, 2, 4, 8 bytes), bits 4–7 how much
/// time passes first (in 250 µs steps); the address is the device's base
/// port or MMIO base, minus 8, plus the offset (so accesses just below
/// and past a device are tried too). Before each access the model is
/// ticked, as hosts do.
pub fn drive(d: &mut dyn Device, spec: &DeviceSpec, script: &[u8], mut now: Instant) -> Instant {
    for a in script.chunks_exact(4).take(MAX_ACCESSES) {
        let (op, off, data) = (a[0], u64::from(a[1]), u64::from(u16::from_le_bytes([a[2], a[3]])));
        let size = [AccessSize::B1, AccessSize::B2, AccessSize::B4, AccessSize::B8][usize::from(op >> 2 & 3)];
        let (space, base) = if op & 2 == 0 {
            (Space::Pio, u64::from(spec.base()))
        } else {
            (Space::Mmio, spec.mmio.map_or(0, |(b, _)| b))
        };
        let addr = base.wrapping_sub(8).wrapping_add(off);
        now += Duration::from_micros(250 * u64::from(op >> 4));
        d.tick(now);
        if op & 1 == 1 {
            // Data spread over all 8 bytes, so wide writes carry something.
            d.write(space, addr, size, data | data << 16 | data << 32 | data << 48);
        } else {
            d.read(space, addr, size);
        }
    }
    now
}
