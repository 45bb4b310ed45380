//! What a server's device models are wired to ([`DeviceEnv`]): interrupt
//! lines into the [`IrqQueue`], UARTs to the server's consoles, an i8042's
//! reset line to a request for the VM's client ([`VmEvents`]), block
//! devices to their image files ([`Images`], io_uring), and the host clock. Shared by every shard and by the thread that prepares models for
//! the data-plane core.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use dmfabric_devices::{
    BlockBackend, ByteSink, ByteSource, Device, DeviceSpec, DeviceState, ResetSink, RestoreError, WallClock, Wiring,
};
use dmfabric_storage::{ImageError, OpenOptions, UringImage};
use dmfabric_wire::IrqSource;

use crate::console::{ConsoleIn, ConsoleOut, Consoles};
use crate::irq::{IrqQueue, WireLine};

/// Something a device model asks of its VM's client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEvent {
    /// The i8042 pulsed the CPU reset line.
    Reset,
}

/// Requests from device models to their VMs, for the data-plane core.
#[derive(Debug)]
pub struct VmEvents {
    queue: ArrayQueue<(u32, VmEvent)>,
    dropped: AtomicU64,
}

impl VmEvents {
    pub fn new() -> Arc<VmEvents> {
        Arc::new(VmEvents { queue: ArrayQueue::new(1024), dropped: AtomicU64::new(0) })
    }

    pub fn push(&self, device: u32, e: VmEvent) {
        if self.queue.push((device, e)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn pop(&self) -> Option<(u32, VmEvent)> {
        self.queue.pop()
    }

    /// Requests lost because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The i8042's reset line on a server.
#[derive(Debug)]
pub struct VmReset {
    device: u32,
    events: Arc<VmEvents>,
}

impl ResetSink for VmReset {
    fn reset(&mut self) {
        self.events.push(self.device, VmEvent::Reset);
    }
}

/// A block device's image on this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

impl ImageSpec {
    /// Open the image (io_uring, O_DIRECT where the file system has it).
    pub fn open(&self) -> Result<UringImage, ImageError> {
        UringImage::open(&self.path, OpenOptions { read_only: self.read_only, ..OpenOptions::default() })
    }
}

/// The images of a server's block devices, by device id: set before the
/// device is built (from the config at start, from the control panel's
/// records when one is placed or moved here).
#[derive(Debug, Default)]
pub struct Images {
    by_device: RwLock<HashMap<u32, ImageSpec>>,
    /// Images that would not open when a device was built (the device runs
    /// as an empty drive; the cause was logged).
    failed: AtomicU64,
}

impl Images {
    pub fn set(&self, device: u32, image: ImageSpec) {
        self.by_device.write().unwrap_or_else(|e| e.into_inner()).insert(device, image);
    }

    pub fn get(&self, device: u32) -> Option<ImageSpec> {
        self.by_device.read().unwrap_or_else(|e| e.into_inner()).get(&device).cloned()
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// What models are wired to on a server.
#[derive(Debug, Clone)]
pub struct DeviceEnv {
    pub irqs: Arc<IrqQueue>,
    pub events: Arc<VmEvents>,
    /// One console per UART, made when the UART is built (at start, or
    /// placed or moved here later) and served by the console service.
    pub consoles: Arc<Consoles>,
    pub clock: WallClock,
    /// Block devices' image files.
    pub images: Arc<Images>,
    /// Lines of VMs whose interrupt controller is a model here.
    pub pins: Arc<crate::irqchip::Pins>,
}

impl Default for DeviceEnv {
    fn default() -> Self {
        DeviceEnv::new()
    }
}

impl DeviceEnv {
    /// Empty queues and consoles, the host clock.
    pub fn new() -> DeviceEnv {
        DeviceEnv {
            irqs: IrqQueue::new(),
            events: VmEvents::new(),
            consoles: Arc::new(Consoles::default()),
            clock: WallClock::host(),
            images: Arc::new(Images::default()),
            pins: Arc::new(crate::irqchip::Pins::default()),
        }
    }

    /// The model of `spec`, fresh.
    pub fn build(&self, spec: &DeviceSpec, now: Instant) -> Box<dyn Device> {
        dmfabric_devices::fresh(spec, self, now)
    }

    /// The model of `spec` from `saved` (what [`Device::save`] gave on the
    /// server it comes from), checked.
    pub fn restore(
        &self,
        spec: &DeviceSpec,
        saved: DeviceState,
        now: Instant,
    ) -> Result<Box<dyn Device>, RestoreError> {
        dmfabric_devices::build(spec, self, Some(saved), now)
    }
}

/// A model's line on a server: to the wire, or into its VM's interrupt
/// controller when that is a model here ([`crate::irqchip`]).
#[derive(Debug)]
pub enum ServerLine {
    Wire(WireLine),
    Pin(crate::irqchip::PinLine),
}

impl dmfabric_devices::IrqLine for ServerLine {
    fn pulse(&mut self) {
        match self {
            ServerLine::Wire(l) => l.pulse(),
            ServerLine::Pin(l) => l.pulse(),
        }
    }

    fn set_level(&mut self, asserted: bool) {
        match self {
            ServerLine::Wire(l) => l.set_level(asserted),
            ServerLine::Pin(l) => l.set_level(asserted),
        }
    }
}

impl Wiring for DeviceEnv {
    type Line = ServerLine;

    fn line(&self, device: u32, gsi: u32) -> ServerLine {
        match self.pins.vm_of(device).and_then(|vm| self.pins.queue(vm)) {
            Some(q) => ServerLine::Pin(crate::irqchip::PinLine::new(gsi, q)),
            None => ServerLine::Wire(WireLine::new(device, IrqSource::Line(gsi), self.irqs.clone())),
        }
    }

    fn msi(&self, device: u32) -> Box<dyn dmfabric_devices::ioapic::MsiSink> {
        Box::new(crate::irqchip::WireMsi::new(device, self.irqs.clone()))
    }

    fn console(&self, vm: Option<u32>, device: u32) -> (Box<dyn ByteSink>, Box<dyn ByteSource>) {
        let console = self.consoles.get_or_add(vm.unwrap_or(device), device);
        (Box::new(ConsoleOut(console.clone())), Box::new(ConsoleIn(console)))
    }

    fn reset(&self, device: u32) -> Box<dyn ResetSink> {
        Box::new(VmReset { device, events: self.events.clone() })
    }

    fn clock(&self) -> WallClock {
        self.clock
    }

    fn block(&self, device: u32) -> Option<Box<dyn BlockBackend>> {
        let image = self.images.get(device)?;
        match image.open() {
            Ok(i) => Some(Box::new(i)),
            Err(e) => {
                self.images.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(device, error = %e, "block device runs with no image");
                None
            }
        }
    }
}
