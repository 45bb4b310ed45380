//! Device models kept in the client process (the hybrid case, and
//! `--devices local` for comparison with remote ones): their interrupt
//! lines drive the VM directly (KVM_IRQ_LINE) and an i8042 reset stops the
//! VM as a remote one's request does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use dmfabric_dm_workers::device::Device;
use dmfabric_dm_workers::i8042::{ResetSink, I8042};
use dmfabric_dm_workers::irq::IrqLine;
use dmfabric_dm_workers::rtc::{Cmos, WallClock};
use dmfabric_dm_workers::timer::{EventTimer, TIMER_PORTS};
use dmfabric_dm_workers::uart::{ByteSink, Uart16550};
use dmfabric_wire::Space;

use crate::devmap::Target;
use crate::kvm::IrqHandle;

/// Where a VM's local interrupt lines go, known once the VM exists.
pub type IrqTarget = Arc<OnceLock<IrqHandle>>;

/// An interrupt line of a local model into its VM.
#[derive(Debug)]
pub struct LocalLine {
    gsi: u32,
    target: IrqTarget,
    level: bool,
}

impl LocalLine {
    pub fn new(gsi: u32, target: IrqTarget) -> LocalLine {
        LocalLine { gsi, target, level: false }
    }

    fn drive(&self, level: bool) {
        if let Some(h) = self.target.get() {
            let _ = h.set_line(self.gsi, level);
        }
    }
}

impl IrqLine for LocalLine {
    fn pulse(&mut self) {
        self.drive(true);
        self.drive(false);
    }

    fn set_level(&mut self, asserted: bool) {
        if asserted != self.level {
            self.level = asserted;
            self.drive(asserted);
        }
    }
}

/// A local i8042's reset line: the machine stops the VM when it is set.
#[derive(Debug, Clone)]
pub struct LocalReset(pub Arc<AtomicBool>);

impl ResetSink for LocalReset {
    fn reset(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// No console input for a local UART.
pub type NoInput = VecDeque<u8>;

/// Local models and the ranges that reach them.
pub type LocalSet = (Vec<Box<dyn Device>>, Vec<(Space, u64, u64, Target)>);

/// An event timer at 0x700 (IRQ 5) as local model `index`.
pub fn event_timer(index: usize, target: &IrqTarget) -> (Box<dyn Device>, (Space, u64, u64, Target)) {
    let timer = EventTimer::new(0x700, LocalLine::new(5, target.clone()), std::time::Instant::now());
    (Box::new(timer), (Space::Pio, 0x700, u64::from(TIMER_PORTS), Target::Local(index)))
}

/// COM1 (0x3f8, IRQ 4), the RTC (0x70, IRQ 8) and the i8042 (0x60/0x64,
/// IRQ 1/12) as local models, their ranges as `Target::Local(first..)`.
pub fn pc_devices(first: usize, target: &IrqTarget, reset: &Arc<AtomicBool>, console: Box<dyn ByteSink>) -> LocalSet {
    let line = |gsi| LocalLine::new(gsi, target.clone());
    let now = std::time::Instant::now();
    let devices: Vec<Box<dyn Device>> = vec![
        Box::new(Uart16550::new(0x3f8, line(4), console, NoInput::new())),
        Box::new(Cmos::new(0x70, line(8), WallClock::host(), now)),
        Box::new(I8042::new(line(1), line(12), LocalReset(reset.clone()))),
    ];
    let ranges = vec![
        (Space::Pio, 0x3f8, 8, Target::Local(first)),
        (Space::Pio, 0x70, 2, Target::Local(first + 1)),
        (Space::Pio, 0x60, 1, Target::Local(first + 2)),
        (Space::Pio, 0x64, 1, Target::Local(first + 2)),
    ];
    (devices, ranges)
}
