//! A server's interrupt lines: a model's [`IrqLine`] is a [`WireLine`],
//! which hands what the model did to the data-plane core through an
//! [`IrqQueue`]; the core sends it to the VM's client as Interrupt frames
//! ([`crate::interrupts`]).
//!
//! An edge is an event: queued, and counted when the queue is full. A level
//! is state: every change is queued while there is room, and when there is
//! none the line's latest level is kept aside (the line is "diverted") and
//! delivered right after everything queued before it. A level can
//! therefore never be lost, and a line never sticks: while diverted, its
//! changes update the kept level instead of queueing behind it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::ArrayQueue;
use dmfabric_devices::IrqLine;
use dmfabric_wire::{IrqSource, Trigger};

/// An interrupt a device raised, on its way to the data-plane core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqEvent {
    pub device: u32,
    pub source: IrqSource,
    pub trigger: Trigger,
}

/// Interrupts queued by device models (on any worker shard) for the
/// data-plane core: a bounded lock-free queue, and the levels that did not
/// fit it.
#[derive(Debug)]
pub struct IrqQueue {
    queue: ArrayQueue<IrqEvent>,
    /// Latest level of each diverted line (device, source); touched only
    /// when the queue overflowed.
    diverted: Mutex<HashMap<(u32, IrqSource), bool>>,
    any_diverted: AtomicBool,
    edges_dropped: AtomicU64,
}

/// Interrupts that may wait for the data-plane core.
pub const IRQ_QUEUE_SLOTS: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IrqQueue {
    pub fn new() -> Arc<IrqQueue> {
        IrqQueue::with_slots(IRQ_QUEUE_SLOTS)
    }

    pub fn with_slots(slots: usize) -> Arc<IrqQueue> {
        Arc::new(IrqQueue {
            queue: ArrayQueue::new(slots.max(1)),
            diverted: Mutex::new(HashMap::new()),
            any_diverted: AtomicBool::new(false),
            edges_dropped: AtomicU64::new(0),
        })
    }

    /// Everything raised since the last call, in order: the queue, then the
    /// levels of diverted lines (newer than anything of theirs queued).
    pub fn drain(&self, into: &mut dyn FnMut(IrqEvent)) {
        while let Some(e) = self.queue.pop() {
            into(e);
        }
        if self.any_diverted.swap(false, Ordering::AcqRel) {
            let levels = std::mem::take(&mut *lock(&self.diverted));
            for ((device, source), asserted) in levels {
                into(IrqEvent { device, source, trigger: Trigger::Level { asserted } });
            }
        }
    }

    /// Queue an edge (counted if the queue is full).
    pub fn push_edge(&self, e: IrqEvent) {
        if self.queue.push(e).is_err() {
            self.edges_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Edges lost because the queue was full.
    pub fn edges_dropped(&self) -> u64 {
        self.edges_dropped.load(Ordering::Relaxed)
    }
}

/// A server's interrupt line.
#[derive(Debug, Clone)]
pub struct WireLine {
    device: u32,
    source: IrqSource,
    level: bool,
    /// This line's level waits in the queue's side table.
    diverted: bool,
    queue: Arc<IrqQueue>,
}

impl WireLine {
    pub fn new(device: u32, source: IrqSource, queue: Arc<IrqQueue>) -> WireLine {
        WireLine { device, source, level: false, diverted: false, queue }
    }
}

impl IrqLine for WireLine {
    fn pulse(&mut self) {
        let e = IrqEvent { device: self.device, source: self.source, trigger: Trigger::Edge };
        if self.queue.queue.push(e).is_err() {
            self.queue.edges_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn set_level(&mut self, asserted: bool) {
        if asserted == self.level {
            return;
        }
        self.level = asserted;
        let key = (self.device, self.source);
        if self.diverted {
            let mut side = lock(&self.queue.diverted);
            if let Some(kept) = side.get_mut(&key) {
                *kept = asserted;
                return;
            }
            // The core took the kept level: queue again (behind it).
            self.diverted = false;
        }
        let e = IrqEvent { device: self.device, source: self.source, trigger: Trigger::Level { asserted } };
        if self.queue.queue.push(e).is_err() {
            self.diverted = true;
            lock(&self.queue.diverted).insert(key, asserted);
            self.queue.any_diverted.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(q: &IrqQueue) -> Vec<IrqEvent> {
        let mut out = Vec::new();
        q.drain(&mut |e| out.push(e));
        out
    }

    fn level(device: u32, asserted: bool) -> IrqEvent {
        IrqEvent { device, source: IrqSource::Line(4), trigger: Trigger::Level { asserted } }
    }

    #[test]
    fn a_level_change_that_finds_the_queue_full_is_kept_not_lost() {
        let q = IrqQueue::with_slots(2);
        let mut other = WireLine::new(9, IrqSource::Line(5), q.clone());
        other.pulse();
        other.pulse();
        other.pulse(); // full: an edge is dropped and counted
        assert_eq!(q.edges_dropped(), 1);
        let mut line = WireLine::new(1, IrqSource::Line(4), q.clone());
        line.set_level(true); // full: kept aside
                              // The same level again is a no-op for the line; it must not stick.
        line.set_level(true);
        let got = drained(&q);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], level(1, true), "delivered after what was queued before it");
        line.set_level(false);
        assert_eq!(drained(&q), vec![level(1, false)], "and the line goes on");
    }

    #[test]
    fn changes_while_diverted_update_the_kept_level() {
        let q = IrqQueue::with_slots(1);
        let mut filler = WireLine::new(9, IrqSource::Line(5), q.clone());
        filler.pulse();
        let mut line = WireLine::new(1, IrqSource::Line(4), q.clone());
        line.set_level(true);
        line.set_level(false);
        line.set_level(true);
        let got = drained(&q);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], level(1, true), "the latest level");
        line.set_level(false);
        assert_eq!(drained(&q), vec![level(1, false)]);
    }
}
