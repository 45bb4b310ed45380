//! Where device models run, behind one trait: [`Inline`] runs them on the
//! data-plane core itself (run to completion, a small host), the sharded
//! backend ([`crate::sharded::Sharded`]) on worker cores joined by SPSC
//! rings (a large host). The server ([`crate::server::Server`]) drives
//! either the same way — requests, placement, device moves — so every
//! feature works in both layouts.

use std::time::Instant;

use std::collections::VecDeque;

use dmfabric_devices::{Device, DeviceSpec, DeviceState, DmaRequest, DmaResult};
use dmfabric_wire::{IoCompletion, IoRequest, MacAddr};

use crate::rx::Refusal;
use crate::table::{DeviceCounters, Devices};

/// A request for a device model, with whom to answer.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub req: IoRequest,
    pub reply_to: MacAddr,
    /// The device the request named (its stream's; 0: found by address).
    pub named: u32,
    /// When the data-plane core handed it over (a shard's hand-off latency).
    pub queued: Instant,
}

/// What comes back from the models.
#[derive(Debug)]
pub enum Done {
    /// A request ran: its completion, or why its device refused it.
    Ran { result: Result<IoCompletion, (IoRequest, Refusal)>, to: MacAddr, named: u32 },
    /// A device taken out ([`Backend::remove`]), brought to the time of
    /// its removal, with its state.
    Removed { id: u32, state: DeviceState },
    /// Device `device` asks for DMA to or from its VM's memory; the answer
    /// goes back through [`Backend::dma_done`].
    Dma { device: u32, req: DmaRequest },
}

/// Counters of the split layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardStats {
    /// Requests each worker executed.
    pub executed: Vec<u64>,
    /// Requests that found their worker's ring full and waited.
    pub ring_full: u64,
    /// Requests dropped because the overflow queue was full too.
    pub overflow_dropped: u64,
    /// Per worker: time from the data-plane core's hand-off to the worker
    /// taking the request, p50 and p99 in nanoseconds (after `finish`).
    pub handoff_p50_ns: Vec<u64>,
    pub handoff_p99_ns: Vec<u64>,
}

/// What the models did, as far as the backend knows it now.
#[derive(Debug, Clone, Default)]
pub struct BackendStats {
    /// Accesses no device register claimed.
    pub unclaimed: u64,
    /// Per device, by id (a sharded backend knows them after `finish`).
    pub devices: Vec<DeviceCounters>,
    /// The split layout's own counters.
    pub shards: Option<ShardStats>,
}

/// Where the models run.
pub trait Backend: Send {
    /// Run `job` on its device now, or hand it to the core that will (its
    /// [`Done`] then comes from [`Backend::poll_done`]).
    fn submit(&mut self, job: Job, now: Instant) -> Option<Done>;
    /// The next [`Done`] that came back from another core.
    fn poll_done(&mut self) -> Option<Done>;
    /// Housekeeping at `now`: the models' timers, requests waiting for room.
    fn tick(&mut self, now: Instant);
    /// When [`Backend::tick`] next has something to do.
    fn next_due(&self) -> Option<Instant>;
    /// Add a prebuilt model (placed here, or moved here with its state).
    fn install(&mut self, spec: &DeviceSpec, model: Box<dyn Device>, now: Instant);
    /// Take device `id` out; its state comes back as [`Done::Removed`], now or later.
    fn remove(&mut self, id: u32, now: Instant) -> Option<Done>;
    /// The answer to DMA request `tag` of device `device`.
    fn dma_done(&mut self, device: u32, tag: u64, result: DmaResult, now: Instant);
    /// What the models did so far.
    fn stats(&self) -> BackendStats;
    /// Stop any worker cores; everything counted.
    fn finish(&mut self) -> BackendStats;
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn submit(&mut self, job: Job, now: Instant) -> Option<Done> {
        (**self).submit(job, now)
    }
    fn poll_done(&mut self) -> Option<Done> {
        (**self).poll_done()
    }
    fn tick(&mut self, now: Instant) {
        (**self).tick(now)
    }
    fn next_due(&self) -> Option<Instant> {
        (**self).next_due()
    }
    fn install(&mut self, spec: &DeviceSpec, model: Box<dyn Device>, now: Instant) {
        (**self).install(spec, model, now)
    }
    fn remove(&mut self, id: u32, now: Instant) -> Option<Done> {
        (**self).remove(id, now)
    }
    fn dma_done(&mut self, device: u32, tag: u64, result: DmaResult, now: Instant) {
        (**self).dma_done(device, tag, result, now)
    }
    fn stats(&self) -> BackendStats {
        (**self).stats()
    }
    fn finish(&mut self) -> BackendStats {
        (**self).finish()
    }
}

/// The models on the data-plane core (run to completion).
#[derive(Debug)]
pub struct Inline {
    devices: Devices,
    /// DMA the models asked for, for `poll_done`.
    dma: VecDeque<Done>,
    scratch: Vec<(u32, DmaRequest)>,
}

impl Inline {
    pub fn new(devices: Devices) -> Inline {
        Inline { devices, dma: VecDeque::new(), scratch: Vec::new() }
    }

    fn pump(&mut self) {
        self.devices.pump_dma(&mut self.scratch);
        self.dma.extend(self.scratch.drain(..).map(|(device, req)| Done::Dma { device, req }));
    }
}

impl Backend for Inline {
    fn submit(&mut self, job: Job, now: Instant) -> Option<Done> {
        let result = self.devices.execute(&job.req, now).map_err(|why| (job.req, why));
        if self.devices.dma_busy() {
            self.pump();
        }
        Some(Done::Ran { result, to: job.reply_to, named: job.named })
    }

    fn poll_done(&mut self) -> Option<Done> {
        self.dma.pop_front()
    }

    fn tick(&mut self, now: Instant) {
        self.devices.tick(now);
        if self.devices.dma_busy() {
            self.pump();
        }
    }

    fn dma_done(&mut self, device: u32, tag: u64, result: DmaResult, _now: Instant) {
        if self.devices.dma_done(device, tag, result) {
            self.pump();
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.devices.next_due()
    }

    fn install(&mut self, spec: &DeviceSpec, model: Box<dyn Device>, now: Instant) {
        self.devices.insert(spec, model, now);
    }

    fn remove(&mut self, id: u32, now: Instant) -> Option<Done> {
        self.devices.remove(id, now).map(|state| Done::Removed { id, state })
    }

    fn stats(&self) -> BackendStats {
        BackendStats { unclaimed: self.devices.unclaimed(), devices: self.devices.counters(), shards: None }
    }

    fn finish(&mut self) -> BackendStats {
        self.stats()
    }
}
