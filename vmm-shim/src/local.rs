//! Device models kept in the client process (the hybrid case, and
//! `--devices local` for comparison with remote ones): built by the same
//! builder as a server's ([`dmfabric_devices::build`]), wired to the VM
//! itself — their interrupt lines drive KVM's irqchip and an i8042 reset
//! stops the VM as a remote one's request does.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use dmfabric_devices::platform::pc::Role;
use dmfabric_devices::{ByteSink, ByteSource, Device, DeviceSpec, IrqLine, ResetSink, WallClock, Wiring};
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

/// What a VM's local models are wired to: its irqchip, its reset flag,
/// and (for the first UART built) a console sink; there is no console input.
pub struct LocalWiring {
    pub target: IrqTarget,
    pub reset: Arc<AtomicBool>,
    console: RefCell<Option<Box<dyn ByteSink>>>,
}

impl std::fmt::Debug for LocalWiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWiring").finish_non_exhaustive()
    }
}

impl LocalWiring {
    /// Wiring into `target` and `reset`; the first UART writes to `console`.
    pub fn new(target: IrqTarget, reset: Arc<AtomicBool>, console: Box<dyn ByteSink>) -> LocalWiring {
        LocalWiring { target, reset, console: RefCell::new(Some(console)) }
    }
}

/// Output nobody reads (a second local UART).
struct Discard;

impl ByteSink for Discard {
    fn put(&mut self, _byte: u8) {}
}

impl Wiring for LocalWiring {
    type Line = LocalLine;

    fn line(&self, _device: u32, gsi: u32) -> LocalLine {
        LocalLine::new(gsi, self.target.clone())
    }

    fn console(&self, _vm: Option<u32>, _device: u32) -> (Box<dyn ByteSink>, Box<dyn ByteSource>) {
        let out = self.console.borrow_mut().take().unwrap_or_else(|| Box::new(Discard));
        (out, Box::new(VecDeque::<u8>::new()))
    }

    fn reset(&self, _device: u32) -> Box<dyn ResetSink> {
        Box::new(LocalReset(self.reset.clone()))
    }

    fn clock(&self) -> WallClock {
        WallClock::host()
    }
}

/// Local models and the ranges that reach them.
pub type LocalSet = (Vec<Box<dyn Device>>, Vec<(Space, u64, u64, Target)>);

/// The PC devices `roles` as models in this process, at the PC's ports;
/// their ranges point at `Target::Local(first..)` in the order of `roles`.
pub fn pc_devices(roles: &[Role], first: usize, wiring: &LocalWiring) -> LocalSet {
    let now = std::time::Instant::now();
    let mut devices = Vec::new();
    let mut ranges = Vec::new();
    for (i, &role) in roles.iter().enumerate() {
        let spec = DeviceSpec::at(i as u32, role.kind(), role.window().base, None);
        devices.push(dmfabric_devices::fresh(&spec, wiring, now));
        for p in role.vm_ranges() {
            ranges.push((Space::Pio, u64::from(p.base), u64::from(p.len), Target::Local(first + i)));
        }
    }
    (devices, ranges)
}
