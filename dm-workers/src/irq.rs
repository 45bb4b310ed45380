//! A server's interrupt lines: a model's [`IrqLine`] is a [`WireLine`],
//! which queues an [`IrqEvent`] for the data-plane core to send as an
//! Interrupt frame to the VM's client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use dmfabric_devices::IrqLine;
use dmfabric_wire::{IrqSource, Trigger};

/// An interrupt a device raised, on its way to the frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqEvent {
    pub device: u32,
    pub source: IrqSource,
    pub trigger: Trigger,
}

/// Interrupts queued by device models (on any worker shard) for the
/// data-plane core: a bounded lock-free queue; what does not fit is counted.
#[derive(Debug)]
pub struct IrqQueue {
    queue: ArrayQueue<IrqEvent>,
    dropped: AtomicU64,
}

/// Interrupts that may wait for the data-plane core.
pub const IRQ_QUEUE_SLOTS: usize = 4096;

impl IrqQueue {
    pub fn new() -> Arc<IrqQueue> {
        Arc::new(IrqQueue { queue: ArrayQueue::new(IRQ_QUEUE_SLOTS), dropped: AtomicU64::new(0) })
    }

    pub fn push(&self, e: IrqEvent) {
        if self.queue.push(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn pop(&self) -> Option<IrqEvent> {
        self.queue.pop()
    }

    /// Interrupts lost because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A server's interrupt line: queues an event per edge and per level change.
#[derive(Debug, Clone)]
pub struct WireLine {
    device: u32,
    source: IrqSource,
    level: bool,
    queue: Arc<IrqQueue>,
}

impl WireLine {
    pub fn new(device: u32, source: IrqSource, queue: Arc<IrqQueue>) -> WireLine {
        WireLine { device, source, level: false, queue }
    }
}

impl IrqLine for WireLine {
    fn pulse(&mut self) {
        self.queue.push(IrqEvent { device: self.device, source: self.source, trigger: Trigger::Edge });
    }

    fn set_level(&mut self, asserted: bool) {
        if asserted != self.level {
            self.level = asserted;
            self.queue.push(IrqEvent {
                device: self.device,
                source: self.source,
                trigger: Trigger::Level { asserted },
            });
        }
    }
}
