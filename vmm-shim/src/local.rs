//! Device models kept in the client process (the hybrid case, and
//! `--devices local` for comparison with remote ones): built by the same
//! builder as a server's ([`dmfabric_devices::build`]), wired to the VM
//! itself — their interrupt lines drive KVM's irqchip, an i8042 reset
//! stops the VM as a remote one's request does, and a model that does DMA
//! ([`Device::dma`]) has it served at once against the VM's RAM
//! ([`LocalDma`], [`crate::dma`]) with its storage from the wiring
//! ([`LocalWiring::with_block`]).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dmfabric_devices::platform::pc::Role;
use dmfabric_devices::{
    BlockBackend, ByteSink, ByteSource, Device, DeviceSpec, DeviceState, DmaDevice, DmaRequest, IrqLine, ResetSink,
    WallClock, Wiring,
};
use dmfabric_wire::{AccessSize, Space};

use crate::devmap::Target;
use crate::kvm::{GuestRam, IrqHandle, IrqSink};

/// The device models a VM keeps in the client process (the hybrid case),
/// shared by its vCPUs.
pub type LocalDevices = [Mutex<Box<dyn Device>>];

/// Where a VM's local interrupt lines go, known once the VM exists.
pub type IrqTarget = Arc<OnceLock<IrqHandle>>;

/// The RAM a VM's local models do DMA to, known once the VM exists (the
/// supervisor sets it from [`crate::machine::VmSpec::ram`]).
pub type RamTarget = Arc<OnceLock<GuestRam>>;

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
/// its RAM (for DMA), (for the first UART built) a console sink — there is
/// no console input — and the storage of its block devices, by device id.
///
/// A VM built with it must be given the same targets:
/// [`crate::machine::VmSpec::wire_local`].
pub struct LocalWiring {
    pub target: IrqTarget,
    pub reset: Arc<AtomicBool>,
    pub ram: RamTarget,
    console: RefCell<Option<Box<dyn ByteSink>>>,
    blocks: RefCell<HashMap<u32, Box<dyn BlockBackend>>>,
}

impl std::fmt::Debug for LocalWiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWiring").finish_non_exhaustive()
    }
}

impl LocalWiring {
    /// Wiring into `target` and `reset`; the first UART writes to `console`.
    pub fn new(target: IrqTarget, reset: Arc<AtomicBool>, console: Box<dyn ByteSink>) -> LocalWiring {
        LocalWiring {
            target,
            reset,
            ram: RamTarget::default(),
            console: RefCell::new(Some(console)),
            blocks: RefCell::new(HashMap::new()),
        }
    }

    /// Block device `device` (the id of its [`DeviceSpec`]) gets `backend`
    /// as its storage (an image: `dmfabric-storage`'s `UringImage`, or a
    /// test's memory). Each backend goes to the first model built for it; a
    /// block device without one is an empty drive.
    pub fn with_block(self, device: u32, backend: Box<dyn BlockBackend>) -> LocalWiring {
        self.add_block(device, backend);
        self
    }

    /// [`LocalWiring::with_block`] on a shared wiring.
    pub fn add_block(&self, device: u32, backend: Box<dyn BlockBackend>) {
        self.blocks.borrow_mut().insert(device, backend);
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

    fn block(&self, device: u32) -> Option<Box<dyn BlockBackend>> {
        self.blocks.borrow_mut().remove(&device)
    }
}

/// How soon a busy DMA model wants to be polled again (its backend's I/O
/// in flight): the local-timers thread comes back this often while it is.
pub const BUSY_POLL: Duration = Duration::from_micros(20);

/// A local model that does DMA ([`Device::dma`]), with its DMA served in
/// this process: after every register access and every tick the model is
/// polled and each request carried out at once against the VM's RAM
/// ([`crate::dma::pump`]); while it is busy its tick asks to come again
/// within [`BUSY_POLL`], so the [`Ticker`] keeps polling it (and stops
/// when it is idle). Until the RAM is known every request is refused.
pub struct LocalDma {
    inner: Box<dyn Device>,
    ram: RamTarget,
    scratch: Vec<DmaRequest>,
}

impl std::fmt::Debug for LocalDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDma").field("model", &self.inner.kind()).finish_non_exhaustive()
    }
}

impl LocalDma {
    /// `model` with its DMA served against `ram`; a model without DMA is
    /// given back as it is.
    pub fn wrap(mut model: Box<dyn Device>, ram: RamTarget) -> Box<dyn Device> {
        if model.dma().is_none() {
            return model;
        }
        Box::new(LocalDma { inner: model, ram, scratch: Vec::new() })
    }

    /// Serve what the model asks now; whether it is still busy.
    fn pump(&mut self) -> bool {
        let Some(dma) = self.inner.dma() else { return false };
        crate::dma::pump(dma, self.ram.get(), &mut self.scratch);
        dma.busy()
    }
}

impl Device for LocalDma {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let value = self.inner.read(space, addr, size);
        self.pump();
        value
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        let taken = self.inner.write(space, addr, size, data);
        self.pump();
        taken
    }

    fn tick(&mut self, now: Instant) -> Option<Instant> {
        let due = self.inner.tick(now);
        if !self.pump() {
            return due;
        }
        let soon = now + BUSY_POLL;
        Some(due.map_or(soon, |d| d.min(soon)))
    }

    fn save(&self) -> DeviceState {
        self.inner.save()
    }

    fn dma(&mut self) -> Option<&mut dyn DmaDevice> {
        self.inner.dma()
    }
}

/// The model `spec` describes, fresh, wired by `wiring` for a VM's local
/// devices: its DMA, if it does any, served against `wiring.ram`
/// ([`LocalDma`]).
pub fn local_device(spec: &DeviceSpec, wiring: &LocalWiring, now: Instant) -> Box<dyn Device> {
    LocalDma::wrap(dmfabric_devices::fresh(spec, wiring, now), wiring.ram.clone())
}

/// Models for `specs` kept in this process ([`local_device`]); the ranges
/// of their windows point at `Target::Local(first..)` in the order of
/// `specs`.
pub fn devices(specs: &[DeviceSpec], first: usize, wiring: &LocalWiring) -> LocalSet {
    let now = Instant::now();
    let mut devices = Vec::new();
    let mut ranges = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        devices.push(local_device(spec, wiring, now));
        let target = Target::Local(first + i);
        if let Some((base, len)) = spec.pio {
            ranges.push((Space::Pio, u64::from(base), u64::from(len), target));
        }
        if let Some((base, len)) = spec.mmio {
            ranges.push((Space::Mmio, base, u64::from(len), target));
        }
    }
    (devices, ranges)
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
        devices.push(local_device(&spec, wiring, now));
        for p in role.vm_ranges() {
            ranges.push((Space::Pio, u64::from(p.base), u64::from(p.len), Target::Local(first + i)));
        }
    }
    (devices, ranges)
}

/// A tick due within this long is waited for by yielding, not sleeping.
const SPIN_BELOW: Duration = Duration::from_micros(100);

/// Runs the timers of models kept in the client process while their vCPUs
/// are in the guest: a thread ([`Ticker::run`]) that sleeps until the
/// earliest model wants a tick, and is woken earlier when an access
/// reprograms one ([`Ticker::due`]). It also keeps busy DMA models moving:
/// their tick ([`LocalDma`]) serves their DMA and asks to come again within
/// [`BUSY_POLL`] while their backend has I/O in flight.
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
                Some(at) if at - now <= SPIN_BELOW => {
                    // A busy DMA model wants polling within microseconds: a
                    // condvar's timed wait would oversleep by the timer
                    // slack (~50 µs), so yield until then. Only while some
                    // model is busy (or a timer is that close): an idle
                    // VM's ticker sleeps.
                    drop(s);
                    std::thread::yield_now();
                    s = lock(&self.state);
                }
                Some(at) => s = self.wake.wait_timeout(s, at - now).unwrap_or_else(|e| e.into_inner()).0,
                None => s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}
