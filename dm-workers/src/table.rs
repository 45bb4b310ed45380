//! The devices of a server, or of one worker shard: the table that runs
//! requests against their models, keeps their timers going and counts
//! ([`Devices`]), and which device holds an address ([`AddressMap`]).

use std::fmt;
use std::time::Instant;

use dmfabric_devices::{Device, DeviceSpec, DeviceState, DmaRequest, DmaResult};
use dmfabric_wire::{Direction, IoCompletion, IoRequest, Status};
use hdrhistogram::Histogram;

use crate::env::DeviceEnv;
use crate::rx::Refusal;

/// What one device did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounters {
    pub id: u32,
    pub kind: &'static str,
    pub reads: u64,
    pub writes: u64,
    /// Accesses to no register of the device.
    pub unclaimed: u64,
    /// Time the model took per access (tick included), nanoseconds.
    pub service_p50_ns: u64,
    pub service_p99_ns: u64,
    /// The device has left this server (moved or removed): what it did while here.
    pub gone: bool,
    /// The service times in a metrics endpoint's buckets.
    #[serde(skip)]
    pub service: dmfabric_dataplane::observe::LatencyBuckets,
    /// The model's own counters ([`Device::counters`]: a virtio-blk's
    /// requests and the bad rings it refused), those not zero.
    pub model: Vec<(&'static str, u64)>,
}

impl fmt::Display for DeviceCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gone = if self.gone { ", gone" } else { "" };
        write!(
            f,
            "device {} ({}{gone}): reads {} writes {} unclaimed {} service p50 {} ns p99 {} ns",
            self.id, self.kind, self.reads, self.writes, self.unclaimed, self.service_p50_ns, self.service_p99_ns
        )?;
        for (name, n) in &self.model {
            write!(f, " {name} {n}")?;
        }
        Ok(())
    }
}

struct Entry {
    id: u32,
    vm: Option<u32>,
    model: Box<dyn Device>,
    counters: DeviceCounters,
    service: Histogram<u64>,
    /// When the model wants its next tick.
    due: Option<Instant>,
    /// The model does DMA ([`Device::dma`]).
    dma: bool,
    /// A DMA model to poll at the next [`Devices::pump_dma`] (it was accessed or answered).
    poke: bool,
    /// The model is its VM's interrupt controller ([`Device::irqchip`]).
    chip: bool,
}

/// The devices of a server (or of one worker shard), sorted by id.
pub struct Devices {
    table: Vec<Entry>,
    /// Counters of devices that left.
    gone: Vec<DeviceCounters>,
    /// A DMA model waits for something or has work: pump it on every pass.
    dma_busy: bool,
    /// Where the lines of VMs with their controller here wait for it.
    pins: std::sync::Arc<crate::irqchip::Pins>,
    /// The table holds an interrupt controller.
    chips: bool,
    /// The earliest `due` of the table.
    next_due: Option<Instant>,
    unclaimed: u64,
}

impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Devices").field("count", &self.table.len()).finish()
    }
}

impl Entry {
    fn new(spec: &DeviceSpec, mut model: Box<dyn Device>, now: Instant) -> Entry {
        let counters = DeviceCounters { id: spec.id, kind: model.kind(), ..DeviceCounters::default() };
        let service = Histogram::new_with_bounds(1, 10_000_000_000, 2).expect("valid bounds");
        let dma = model.dma().is_some();
        let chip = model.irqchip().is_some();
        Entry { id: spec.id, vm: spec.vm, model, counters, service, due: Some(now), dma, poke: dma, chip }
    }
}

impl Devices {
    /// The models of `specs`, wired to `env`.
    pub fn new(specs: &[DeviceSpec], env: &DeviceEnv) -> Devices {
        let now = Instant::now();
        let mut table: Vec<Entry> = specs.iter().map(|s| Entry::new(s, env.build(s, now), now)).collect();
        table.sort_by_key(|e| e.id);
        table.dedup_by_key(|e| e.id);
        let chips = table.iter().any(|e| e.chip);
        Devices {
            table,
            gone: Vec::new(),
            dma_busy: false,
            pins: env.pins.clone(),
            chips,
            next_due: Some(now),
            unclaimed: 0,
        }
    }

    /// Whether device `id` is here.
    pub fn contains(&self, id: u32) -> bool {
        self.table.binary_search_by_key(&id, |e| e.id).is_ok()
    }

    /// Ids of the devices here.
    pub fn ids(&self) -> Vec<u32> {
        self.table.iter().map(|e| e.id).collect()
    }

    /// Add `model` as device `spec` (replacing one with its id).
    pub fn insert(&mut self, spec: &DeviceSpec, model: Box<dyn Device>, now: Instant) {
        let entry = Entry::new(spec, model, now);
        match self.table.binary_search_by_key(&spec.id, |e| e.id) {
            Ok(i) => self.table[i] = entry,
            Err(i) => self.table.insert(i, entry),
        }
        self.chips = self.table.iter().any(|e| e.chip);
        self.next_due = Some(now);
    }

    /// Take device `id` out; returns its saved state, brought to `now`.
    pub fn remove(&mut self, id: u32, now: Instant) -> Option<DeviceState> {
        let i = self.table.binary_search_by_key(&id, |e| e.id).ok()?;
        let mut e = self.table.remove(i);
        e.model.tick(now);
        self.recompute_due();
        self.gone.push(DeviceCounters { gone: true, ..Devices::counters_of(&e) });
        Some(e.model.save())
    }

    /// Per-device counters, by device id.
    pub fn counters(&self) -> Vec<DeviceCounters> {
        self.table.iter().map(Devices::counters_of).chain(self.gone.iter().cloned()).collect()
    }

    fn counters_of(e: &Entry) -> DeviceCounters {
        DeviceCounters {
            service_p50_ns: e.service.value_at_quantile(0.5),
            service_p99_ns: e.service.value_at_quantile(0.99),
            service: dmfabric_dataplane::observe::LatencyBuckets::of(&e.service),
            model: e.model.counters().into_iter().filter(|(_, n)| *n > 0).collect(),
            ..e.counters.clone()
        }
    }

    /// Accesses no device register claimed so far.
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed
    }

    /// When the next model wants a tick (now, while a DMA model is busy).
    pub fn next_due(&self) -> Option<Instant> {
        if self.dma_busy {
            return Some(Instant::now());
        }
        self.next_due
    }

    /// Move the DMA models on: what they ask of their VMs' memory goes to
    /// `out` as (device, request). Polls those accessed or answered since
    /// the last pump and those that wait for their backends.
    pub fn pump_dma(&mut self, out: &mut Vec<(u32, DmaRequest)>) {
        let mut busy = false;
        let mut reqs = Vec::new();
        for e in self.table.iter_mut().filter(|e| e.dma) {
            let Some(dma) = e.model.dma() else { continue };
            if e.poke || dma.busy() {
                e.poke = false;
                dma.poll(&mut reqs);
                out.extend(reqs.drain(..).map(|r| (e.id, r)));
                busy |= dma.busy();
            }
        }
        self.dma_busy = busy;
    }

    /// The answer to DMA request `tag` of `device`; false if the device is not here.
    pub fn dma_done(&mut self, device: u32, tag: u64, result: DmaResult) -> bool {
        let Ok(i) = self.table.binary_search_by_key(&device, |e| e.id) else { return false };
        let e = &mut self.table[i];
        let Some(dma) = e.model.dma() else { return false };
        dma.dma_done(tag, result);
        e.poke = true;
        self.dma_busy = true;
        true
    }

    /// Whether a DMA model has something to do.
    pub fn dma_busy(&self) -> bool {
        self.dma_busy
    }

    fn recompute_due(&mut self) {
        self.next_due = self.table.iter().filter_map(|e| e.due).min();
    }

    /// Drive the interrupt controllers here with what their VMs' lines did.
    fn drive_pins(&mut self) {
        for e in self.table.iter_mut().filter(|e| e.chip) {
            let Some(q) = e.vm.and_then(|vm| self.pins.queue(vm)) else { continue };
            if let Some(chip) = e.model.irqchip() {
                q.drive(chip);
            }
        }
    }

    /// Tick every model whose time has come.
    pub fn tick(&mut self, now: Instant) {
        if self.chips {
            self.drive_pins();
        }
        if self.next_due.is_none_or(|d| d > now) {
            return;
        }
        for e in &mut self.table {
            if e.due.is_some_and(|d| d <= now) {
                e.due = e.model.tick(now);
            }
        }
        self.recompute_due();
    }

    /// Run one request against its device.
    pub fn execute(&mut self, req: &IoRequest, now: Instant) -> Result<IoCompletion, Refusal> {
        let i = self.table.binary_search_by_key(&req.route.device, |e| e.id).map_err(|_| Refusal::UnknownDevice)?;
        let e = &mut self.table[i];
        if e.vm.is_some_and(|vm| vm != req.route.vm) {
            return Err(Refusal::OtherVm);
        }
        let start = Instant::now();
        // The model sees the time of the access; the access may reprogram
        // its timers, so ask again when it wants the next tick.
        e.model.tick(now);
        match req.dir {
            Direction::Read => e.counters.reads += 1,
            Direction::Write => e.counters.writes += 1,
        }
        let (data, claimed) = match req.dir {
            Direction::Read => match e.model.read(req.space, req.addr, req.size) {
                Some(v) => (v, true),
                None => (u64::MAX, false),
            },
            Direction::Write => (req.data, e.model.write(req.space, req.addr, req.size, req.data)),
        };
        let due = e.model.tick(now);
        if e.dma {
            e.poke = true;
            self.dma_busy = true;
        }
        let was = e.due;
        e.due = due;
        if !claimed {
            e.counters.unclaimed += 1;
        }
        e.service.saturating_record(start.elapsed().as_nanos() as u64);
        if !claimed {
            self.unclaimed += 1;
        }
        if due != was {
            self.recompute_due();
        }
        if self.chips {
            self.drive_pins();
        }
        let status = if claimed { Status::Ok } else { Status::Unclaimed };
        Ok(IoCompletion::for_request(req, data, status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::VmEvent;
    use dmfabric_wire::{AccessSize, Route, Space};
    use std::time::Duration;

    fn req(device: u32, vm: u32, dir: Direction, addr: u64, size: AccessSize, data: u64) -> IoRequest {
        IoRequest {
            route: Route { server: 1, hypervisor: 1, client: 3, vm, vcpu: 0, device },
            seq: 0,
            space: Space::Pio,
            dir,
            size,
            addr,
            data,
        }
    }

    /// VM `vm`'s PC devices numbered from `first` (the layout's models and ports).
    fn pc_devices(vm: u32, first: u32) -> Vec<DeviceSpec> {
        dmfabric_devices::platform::pc::Role::ALL
            .iter()
            .zip(first..)
            .map(|(r, id)| DeviceSpec::at(id, r.kind(), r.window().base, Some(vm)))
            .collect()
    }

    #[test]
    fn pc_devices_run_and_belong_to_their_vm() {
        let specs = pc_devices(7, 10);
        let env = DeviceEnv::new();
        let mut d = Devices::new(&specs, &env);
        let now = Instant::now();
        // The UART's scratch register, the RTC's register D, the i8042 status.
        let w = d.execute(&req(10, 7, Direction::Write, 0x3ff, AccessSize::B1, 0x5a), now).unwrap();
        assert_eq!(w.status, Status::Ok);
        assert_eq!(d.execute(&req(10, 7, Direction::Read, 0x3ff, AccessSize::B1, 0), now).unwrap().data, 0x5a);
        d.execute(&req(11, 7, Direction::Write, 0x70, AccessSize::B1, 0x0d), now).unwrap();
        assert_eq!(d.execute(&req(11, 7, Direction::Read, 0x71, AccessSize::B1, 0), now).unwrap().data, 0x80);
        assert_eq!(d.execute(&req(12, 7, Direction::Read, 0x64, AccessSize::B1, 0), now).unwrap().data & 0x04, 0x04);
        assert_eq!(d.execute(&req(10, 8, Direction::Read, 0x3ff, AccessSize::B1, 0), now), Err(Refusal::OtherVm));
        assert_eq!(d.execute(&req(99, 7, Direction::Read, 0x3ff, AccessSize::B1, 0), now), Err(Refusal::UnknownDevice));
        // A 4-byte access to the UART is no register: all ones, counted.
        let c = d.execute(&req(10, 7, Direction::Read, 0x3f8, AccessSize::B4, 0), now).unwrap();
        assert_eq!((c.status, d.unclaimed()), (Status::Unclaimed, 1));
        let counters = d.counters();
        assert_eq!((counters[0].reads, counters[0].writes, counters[0].unclaimed), (2, 1, 1));
    }

    #[test]
    fn timers_tick_on_their_deadlines_and_uart_output_reaches_the_console() {
        let specs = pc_devices(7, 10);
        let env = DeviceEnv::new();
        let mut d = Devices::new(&specs, &env);
        let t0 = Instant::now();
        d.execute(&req(13, 7, Direction::Write, 0x704, AccessSize::B4, 500), t0).unwrap();
        d.execute(&req(13, 7, Direction::Write, 0x700, AccessSize::B4, 3), t0).unwrap();
        assert!(d.next_due().unwrap() <= t0 + Duration::from_micros(500));
        let mut now = t0;
        for _ in 0..2000 {
            now += Duration::from_micros(5);
            d.tick(now);
        }
        // 10 ms of 500 µs periods: 20 interrupts queued for the frontend.
        let mut edges = 0;
        env.irqs.drain(&mut |e| {
            assert_eq!((e.device, e.source), (13, dmfabric_wire::IrqSource::Line(5)));
            edges += 1;
        });
        assert_eq!(edges, 20);
        for b in b"hi\n" {
            d.execute(&req(10, 7, Direction::Write, 0x3f8, AccessSize::B1, u64::from(*b)), now).unwrap();
        }
        let mut out = Vec::new();
        env.consoles.of_vm(7).unwrap().drain_output(&mut out);
        assert_eq!(out, b"hi\n");
        // The i8042's reset pulse becomes a request for VM events.
        d.execute(&req(12, 7, Direction::Write, 0x64, AccessSize::B1, 0xfe), now).unwrap();
        assert_eq!(env.events.pop(), Some((12, VmEvent::Reset)));
    }
}
