//! Device models kept in the client process (the hybrid case, and
//! `--devices local` for comparison with remote ones): built by the same
//! builder as a server's ([`dmfabric_devices::build`]), wired to the VM
//! itself — their interrupt lines drive KVM's irqchip and an i8042 reset
//! stops the VM as a remote one's request does.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use dmfabric_devices::platform::pc::Role;
use dmfabric_devices::{ByteSink, ByteSource, Device, DeviceSpec, IrqLine, ResetSink, WallClock, Wiring};
use dmfabric_wire::Space;

use crate::devmap::Target;
use crate::kvm::{IrqHandle, IrqSink};

/// The device models a VM keeps in the client process (the hybrid case),
/// shared by its vCPUs.
pub type LocalDevices = [Mutex<Box<dyn Device>>];

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

    fn inject(&self, trigger: dmfabric_wire::Trigger) {
        if let Some(h) = self.target.get() {
            let _ = h.inject(dmfabric_wire::IrqSource::Line(self.gsi), trigger);
        }
    }
}

impl IrqLine for LocalLine {
    fn pulse(&mut self) {
        self.inject(dmfabric_wire::Trigger::Edge);
    }

    fn set_level(&mut self, asserted: bool) {
        if asserted != self.level {
            self.level = asserted;
            self.inject(dmfabric_wire::Trigger::Level { asserted });
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

/// Runs the timers of models kept in the client process while their vCPUs
/// are in the guest: a thread ([`Ticker::run`]) that sleeps until the
/// earliest model wants a tick, and is woken earlier when an access
/// reprograms one ([`Ticker::due`]).
#[derive(Default)]
pub struct Ticker {
    state: Mutex<TickerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TickerState {
    sets: Vec<Arc<LocalDevices>>,
    next: Option<Instant>,
    stop: bool,
}

impl std::fmt::Debug for Ticker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticker").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ticker {
    pub fn new() -> Arc<Ticker> {
        Arc::new(Ticker::default())
    }

    /// Tick a VM's models from now on.
    pub fn add(&self, devices: Arc<LocalDevices>) {
        let mut s = lock(&self.state);
        s.sets.push(devices);
        s.next = Some(Instant::now());
        self.wake.notify_one();
    }

    /// A model wants a tick at `at` (it said so after an access).
    pub fn due(&self, at: Option<Instant>) {
        let Some(at) = at else { return };
        let mut s = lock(&self.state);
        if s.next.is_none_or(|n| at < n) {
            s.next = Some(at);
            self.wake.notify_one();
        }
    }

    pub fn stop(&self) {
        lock(&self.state).stop = true;
        self.wake.notify_one();
    }

    /// Tick the models when they want it, until [`Ticker::stop`].
    pub fn run(&self) {
        let mut s = lock(&self.state);
        loop {
            if s.stop {
                return;
            }
            let now = Instant::now();
            match s.next {
                Some(at) if at <= now => {
                    s.next = None;
                    let sets = s.sets.clone();
                    drop(s);
                    // Devices are locked without the ticker's own lock (a
                    // vCPU holds a device while it reports a new due time).
                    let mut next: Option<Instant> = None;
                    for d in sets.iter().flat_map(|set| set.iter()) {
                        let due = lock(d).tick(now);
                        next = match (next, due) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    s = lock(&self.state);
                    s.next = match (s.next, next) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Some(at) => s = self.wake.wait_timeout(s, at - now).unwrap_or_else(|e| e.into_inner()).0,
                None => s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}
