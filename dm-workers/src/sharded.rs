//! The split layout as a [`Backend`]: worker cores each own a shard of
//! the device models; the data-plane core hands each request to the worker
//! whose shard holds the device, over an SPSC ring, and takes completions
//! back over a second one. Devices are added, taken out and moved in by
//! messages on the same rings, so placement and device moves work here as
//! in the run-to-completion layout.
//!
//! Back-pressure: when a worker's request ring is full, requests wait in a
//! bounded overflow queue on the data-plane core (counted); only past its
//! bound are they dropped (counted too), and the client's retransmit covers
//! them. Nothing is dropped silently; messages that add or remove a device
//! are never dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmfabric_dataplane::ring::{self, Consumer, Producer};
use dmfabric_devices::{Device, DeviceSpec, DmaRequest, DmaResult};
use hdrhistogram::Histogram;

use crate::backend::{Backend, BackendStats, Done, Job, ShardStats};
use crate::env::DeviceEnv;
use crate::table::Devices;

/// Slots of each ring between the data-plane core and a worker.
pub const RING_SLOTS: usize = 512;
/// Requests that may wait on the data-plane core for one worker's full ring.
pub const OVERFLOW_LIMIT: usize = 4096;

/// What the data-plane core asks of a worker.
enum Work {
    Run(Job),
    Install(Box<(DeviceSpec, Box<dyn Device>)>),
    Remove(u32),
    /// The answer to a model's DMA request.
    DmaDone {
        device: u32,
        tag: u64,
        result: DmaResult,
    },
}

/// What a worker hands back when it stops.
struct WorkerEnd {
    devices: Devices,
    handoff: Histogram<u64>,
}

/// How a worker waits when it has nothing to do.
#[derive(Debug, Clone, Copy)]
pub struct WorkerIdle {
    /// Empty polls before napping; `u32::MAX` spins forever (lowest latency).
    pub spin: u32,
    pub nap: Duration,
}

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("Worker {worker}: {source}")]
    Pin {
        worker: usize,
        #[source]
        source: dmfabric_pinning::PinError,
    },
    #[error("Cannot start worker thread {worker}: {source}")]
    Spawn {
        worker: usize,
        #[source]
        source: std::io::Error,
    },
}

/// The models on worker cores.
pub struct Sharded {
    /// Device id → worker, sorted by device id.
    shard_of: Vec<(u32, usize)>,
    /// The next worker a device with no shard of its own goes to.
    next_shard: usize,
    to_workers: Vec<Producer<Work>>,
    from_workers: Vec<Consumer<Done>>,
    /// Which worker `poll_done` looks at first (round robin).
    next_worker: usize,
    /// Per worker: work waiting for room in its ring, in order.
    overflow: Vec<VecDeque<Work>>,
    stats: ShardStats,
    workers: Vec<JoinHandle<WorkerEnd>>,
    stop_workers: Arc<AtomicBool>,
    pause_workers: Arc<AtomicBool>,
    /// What the workers counted, once they stopped.
    ended: Option<BackendStats>,
}

impl std::fmt::Debug for Sharded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded").field("workers", &self.to_workers.len()).finish()
    }
}

impl Sharded {
    /// Start one worker thread per entry of `worker_cores`, each pinned
    /// there (a failure to pin or to start one is an error, and no worker
    /// is left running), and give each device to its configured shard
    /// (modulo the workers), or device `i` of `devices` to worker `i % workers`.
    pub fn start(
        devices: &[DeviceSpec],
        env: &DeviceEnv,
        worker_cores: &[usize],
        idle: WorkerIdle,
    ) -> Result<Sharded, ShardError> {
        let n = worker_cores.len().max(1);
        let mut shards: Vec<Vec<DeviceSpec>> = vec![Vec::new(); n];
        let mut shard_of = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let w = d.shard.unwrap_or(i) % n;
            shards[w].push(d.clone());
            shard_of.push((d.id, w));
        }
        shard_of.sort_unstable();
        shard_of.dedup_by_key(|(id, _)| *id);
        let mut s = Sharded {
            shard_of,
            next_shard: devices.len(),
            to_workers: Vec::new(),
            from_workers: Vec::new(),
            next_worker: 0,
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            stats: ShardStats { executed: vec![0; n], ..ShardStats::default() },
            workers: Vec::new(),
            stop_workers: Arc::new(AtomicBool::new(false)),
            pause_workers: Arc::new(AtomicBool::new(false)),
            ended: None,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<(), dmfabric_pinning::PinError>)>();
        for (w, specs) in shards.into_iter().enumerate() {
            let (work_p, work_c) = ring::channel::<Work>(RING_SLOTS);
            let (done_p, done_c) = ring::channel::<Done>(RING_SLOTS);
            let core = worker_cores.get(w).copied();
            let (stop, pause, ready) = (s.stop_workers.clone(), s.pause_workers.clone(), ready_tx.clone());
            let table = Devices::new(&specs, env);
            let spawned = std::thread::Builder::new().name(format!("dmf-worker-{w}")).spawn(move || {
                let pinned = core.map_or(Ok(()), dmfabric_pinning::pin_current);
                let failed = pinned.is_err();
                let _ = ready.send((w, pinned));
                if failed {
                    return WorkerEnd { devices: table, handoff: new_histogram() };
                }
                worker_loop(table, work_c, done_p, &stop, &pause, idle)
            });
            match spawned {
                Ok(handle) => s.workers.push(handle),
                Err(source) => {
                    s.stop();
                    return Err(ShardError::Spawn { worker: w, source });
                }
            }
            s.to_workers.push(work_p);
            s.from_workers.push(done_c);
        }
        drop(ready_tx);
        for _ in 0..n {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((worker, Err(source))) => {
                    s.stop();
                    return Err(ShardError::Pin { worker, source });
                }
                Err(_) => break,
            }
        }
        Ok(s)
    }

    /// Hold every worker before its next request (requests queue up in the
    /// rings and then on the data-plane core), or let them go on.
    pub fn pause_workers(&self, paused: bool) {
        self.pause_workers.store(paused, Ordering::Release);
    }

    fn shard(&self, device: u32) -> Option<usize> {
        self.shard_of.binary_search_by_key(&device, |(d, _)| *d).ok().map(|i| self.shard_of[i].1)
    }

    /// Give `work` to worker `w`, in order behind anything waiting for it.
    fn send(&mut self, w: usize, work: Work) {
        let queue = &mut self.overflow[w];
        let work = if queue.is_empty() {
            match self.to_workers[w].push(work) {
                Ok(()) => return,
                Err(ring::PushError::Full(back)) => back,
            }
        } else {
            work
        };
        if let Work::Run(_) = work {
            self.stats.ring_full += 1;
            if queue.len() >= OVERFLOW_LIMIT {
                self.stats.overflow_dropped += 1;
                return;
            }
        }
        queue.push_back(work);
    }

    fn retry_overflow(&mut self) {
        for (queue, ring) in self.overflow.iter_mut().zip(&mut self.to_workers) {
            while let Some(work) = queue.pop_front() {
                if let Err(ring::PushError::Full(back)) = ring.push(work) {
                    queue.push_front(back);
                    break;
                }
            }
        }
    }

    /// Stop the workers and keep what they counted.
    fn stop(&mut self) -> BackendStats {
        if let Some(ended) = &self.ended {
            return ended.clone();
        }
        self.stop_workers.store(true, Ordering::Relaxed);
        let mut unclaimed = 0;
        let mut counters = Vec::new();
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for h in self.workers.drain(..) {
            if let Ok(end) = h.join() {
                unclaimed += end.devices.unclaimed();
                counters.extend(end.devices.counters());
                p50.push(end.handoff.value_at_quantile(0.5));
                p99.push(end.handoff.value_at_quantile(0.99));
            }
        }
        self.stats.handoff_p50_ns = p50;
        self.stats.handoff_p99_ns = p99;
        counters.sort_by_key(|c| c.id);
        let ended = BackendStats { unclaimed, devices: counters, shards: Some(self.stats.clone()) };
        self.ended = Some(ended.clone());
        ended
    }
}

impl Drop for Sharded {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Backend for Sharded {
    fn submit(&mut self, job: Job, _now: Instant) -> Option<Done> {
        match self.shard(job.req.route.device) {
            Some(w) => {
                self.send(w, Work::Run(job));
                None
            }
            None => {
                let why = crate::rx::Refusal::UnknownDevice;
                Some(Done::Ran { result: Err((job.req, why)), to: job.reply_to, named: job.named })
            }
        }
    }

    fn poll_done(&mut self) -> Option<Done> {
        let n = self.from_workers.len();
        for i in 0..n {
            let w = (self.next_worker + i) % n;
            if let Ok(done) = self.from_workers[w].pop() {
                self.next_worker = (w + 1) % n;
                if let Done::Ran { .. } = done {
                    self.stats.executed[w] += 1;
                }
                return Some(done);
            }
        }
        None
    }

    fn tick(&mut self, _now: Instant) {
        // The workers run their models' timers; here, only what waits for room.
        self.retry_overflow();
    }

    fn next_due(&self) -> Option<Instant> {
        // Workers raise interrupts on their own timers: look at least every
        // millisecond.
        Some(Instant::now() + Duration::from_millis(1))
    }

    fn install(&mut self, spec: &DeviceSpec, model: Box<dyn Device>, _now: Instant) {
        let n = self.to_workers.len().max(1);
        let w = spec.shard.unwrap_or_else(|| {
            self.next_shard += 1;
            self.next_shard - 1
        }) % n;
        match self.shard_of.binary_search_by_key(&spec.id, |(d, _)| *d) {
            Ok(i) => self.shard_of[i].1 = w,
            Err(i) => self.shard_of.insert(i, (spec.id, w)),
        }
        self.send(w, Work::Install(Box::new((spec.clone(), model))));
    }

    fn remove(&mut self, id: u32, _now: Instant) -> Option<Done> {
        let i = self.shard_of.binary_search_by_key(&id, |(d, _)| *d).ok()?;
        let (_, w) = self.shard_of.remove(i);
        self.send(w, Work::Remove(id));
        None
    }

    fn dma_done(&mut self, device: u32, tag: u64, result: DmaResult, _now: Instant) {
        if let Some(w) = self.shard(device) {
            self.send(w, Work::DmaDone { device, tag, result });
        }
    }

    fn stats(&self) -> BackendStats {
        match &self.ended {
            Some(e) => e.clone(),
            None => BackendStats { unclaimed: 0, devices: Vec::new(), shards: Some(self.stats.clone()) },
        }
    }

    fn finish(&mut self) -> BackendStats {
        self.stop()
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 2).expect("valid bounds")
}

fn worker_loop(
    mut devices: Devices,
    mut work: Consumer<Work>,
    mut done: Producer<Done>,
    stop: &AtomicBool,
    pause: &AtomicBool,
    idle: WorkerIdle,
) -> WorkerEnd {
    let mut handoff = new_histogram();
    let mut empty = 0u32;
    let mut dma: Vec<(u32, DmaRequest)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Timers and console input run on the shard's own loop.
        devices.tick(now);
        // DMA models waiting for their backends move on here too.
        if devices.dma_busy() {
            devices.pump_dma(&mut dma);
            for (device, req) in dma.drain(..) {
                if !push_done(&mut done, Done::Dma { device, req }, stop) {
                    return WorkerEnd { devices, handoff };
                }
            }
        }
        let next = if pause.load(Ordering::Acquire) { None } else { work.pop().ok() };
        let Some(next) = next else {
            empty = empty.saturating_add(1);
            if devices.dma_busy() {
                std::hint::spin_loop();
            } else if empty >= idle.spin {
                let nap = devices.next_due().map_or(idle.nap, |d| idle.nap.min(d.saturating_duration_since(now)));
                std::thread::sleep(nap);
                empty = 0;
            } else {
                std::hint::spin_loop();
            }
            continue;
        };
        empty = 0;
        let item = match next {
            Work::Run(job) => {
                handoff.saturating_record(now.saturating_duration_since(job.queued).as_nanos() as u64);
                let result = devices.execute(&job.req, now).map_err(|why| (job.req, why));
                Done::Ran { result, to: job.reply_to, named: job.named }
            }
            Work::Install(b) => {
                let (spec, model) = *b;
                devices.insert(&spec, model, now);
                continue;
            }
            Work::Remove(id) => match devices.remove(id, now) {
                Some(state) => Done::Removed { id, state },
                None => continue,
            },
            Work::DmaDone { device, tag, result } => {
                // The model goes on at the top of the loop.
                devices.dma_done(device, tag, result);
                continue;
            }
        };
        if !push_done(&mut done, item, stop) {
            return WorkerEnd { devices, handoff };
        }
    }
    WorkerEnd { devices, handoff }
}

/// Hand `item` back; a full completion ring waits for the data-plane core
/// to drain it. False if the workers are stopping.
fn push_done(done: &mut Producer<Done>, mut item: Done, stop: &AtomicBool) -> bool {
    loop {
        match done.push(item) {
            Ok(()) => return true,
            Err(ring::PushError::Full(back)) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                item = back;
                std::hint::spin_loop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Server;
    use crate::testing::{self, TestClient};
    use dmfabric_dataplane::poll::Handler;
    use dmfabric_dataplane::FrameBatch;
    use dmfabric_devices::platform::pc;
    use dmfabric_wire::{AccessSize, Direction, FrameRepr, MacAddr, Message, Space, Status};

    const IDLE: WorkerIdle = WorkerIdle { spin: 1000, nap: Duration::from_micros(50) };

    /// A sharded server for client 3 (VM 7), and that client with a session open.
    fn start(devices: &[DeviceSpec], cores: &[usize]) -> (Server<Sharded>, TestClient) {
        let env = DeviceEnv::new();
        let backend = Sharded::start(devices, &env, cores, IDLE).unwrap();
        let registry = testing::registry(vec![testing::client(3, CLIENT, &[(7, 1)])]);
        let mut s = Server::unplaced(1, SERVER, env, backend, devices, registry);
        let mut c = TestClient::new(3, CLIENT, 1, SERVER);
        c.open(&mut s);
        (s, c)
    }

    const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);

    fn request(c: &mut TestClient, device: u32, dir: Direction, data: u64) -> Vec<u8> {
        let addr = 0xd000_0000 + u64::from(device) * 8;
        c.request(7, 0, device, Space::Mmio, dir, AccessSize::B8, addr, data)
    }

    /// Feed frames and poll until `want` replies came back (bounded).
    fn exchange(s: &mut Server<Sharded>, frames: &[Vec<u8>], want: usize) -> Vec<Message<'static>> {
        let mut tx = FrameBatch::new();
        let mut out = Vec::new();
        for f in frames {
            s.on_frame(f, &mut tx, Instant::now());
        }
        let end = Instant::now() + Duration::from_secs(5);
        while out.len() < want && Instant::now() < end {
            s.on_poll(&mut tx, Instant::now());
            for f in tx.iter() {
                let owned: &'static [u8] = Box::leak(f.to_vec().into_boxed_slice());
                match FrameRepr::parse_bytes(owned).unwrap().msg {
                    // The server announcing its epoch at its first poll.
                    Message::Control(_) => {}
                    msg => out.push(msg),
                }
            }
            tx.clear();
        }
        out
    }

    #[test]
    fn requests_reach_the_owning_worker_and_come_back() {
        let devices: Vec<DeviceSpec> = (1..=4).map(|id| DeviceSpec { id, ..pc::test_device(1) }).collect();
        let (mut s, mut c) = start(&devices, &[0, 0]);
        let writes: Vec<Vec<u8>> = (1..=4).map(|d| request(&mut c, d, Direction::Write, 100 + u64::from(d))).collect();
        assert_eq!(exchange(&mut s, &writes, 4).len(), 4);
        let reads: Vec<Vec<u8>> = (1..=4).map(|d| request(&mut c, d, Direction::Read, 0)).collect();
        let mut got: Vec<(u32, u64)> = exchange(&mut s, &reads, 4)
            .into_iter()
            .map(|m| match m {
                Message::IoCompletion(c) => {
                    assert_eq!(c.status, Status::Ok);
                    (c.route.device, c.data)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, vec![(1, 101), (2, 102), (3, 103), (4, 104)]);
        // An unknown device is Nacked by the data-plane core itself.
        let nack = exchange(&mut s, &[request(&mut c, 9, Direction::Read, 0)], 1);
        assert!(matches!(nack[..], [Message::Nack(_)]));
        let (stats, shard) = s.finish();
        let shard = shard.unwrap();
        assert_eq!((stats.requests, stats.completions, stats.nack_unknown_device), (9, 8, 1));
        assert_eq!(shard.executed, vec![4, 4], "devices 1,3 on worker 0 and 2,4 on worker 1");
    }

    #[test]
    fn a_full_ring_waits_in_order_and_loses_nothing() {
        let devices = [pc::test_device(1)];
        let (mut s, mut c) = start(&devices, &[0]);
        // A held worker takes nothing, so its ring fills and the rest waits.
        s.backend().pause_workers(true);
        let n = RING_SLOTS + 300;
        let frames: Vec<Vec<u8>> = (0..n as u64).map(|i| request(&mut c, 1, Direction::Write, i)).collect();
        let mut tx = FrameBatch::new();
        for f in &frames {
            s.on_frame(f, &mut tx, Instant::now());
        }
        assert_eq!(s.shard_stats().unwrap().ring_full, 300);
        s.backend().pause_workers(false);
        let mut seqs = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while seqs.len() < n && Instant::now() < end {
            s.on_poll(&mut tx, Instant::now());
            for f in tx.iter() {
                if let Ok(FrameRepr { msg: Message::IoCompletion(cmp), .. }) = FrameRepr::parse_bytes(f) {
                    seqs.push(dmfabric_wire::session::Seq(cmp.seq).counter());
                }
            }
            tx.clear();
        }
        assert_eq!(seqs, (0..n as u32).collect::<Vec<_>>(), "all answered, in order");
        assert_eq!(s.shard_stats().unwrap().overflow_dropped, 0);
    }

    #[test]
    fn a_timer_on_a_worker_shard_interrupts_through_the_data_plane_core() {
        let devices = pc::PcLayout::new(7).unwrap().specs();
        let (mut s, mut c) = start(&devices, &[0, 0]);
        // Device 0: the server finds VM 7's timer at 0x700. 1 ms, periodic, edge.
        let frames = [c.outl(7, 0, 0x704, 1000), c.outl(7, 0, 0x700, 3)];
        let done = exchange(&mut s, &frames, 3);
        let completions: Vec<_> = done.iter().filter(|m| matches!(m, Message::IoCompletion(_))).collect();
        assert_eq!(completions.len(), 2, "{done:?}");
        assert!(completions
            .iter()
            .all(|m| matches!(m, Message::IoCompletion(c) if c.status == Status::Ok && c.route.device == 7004)));
        // (An interrupt may already have come with them: unacknowledged, it is sent again.)
        // Interrupts go one at a time until acknowledged: ack each.
        let mut tx = FrameBatch::new();
        let mut seen = 0;
        let end = Instant::now() + Duration::from_secs(5);
        while seen < 5 && Instant::now() < end {
            s.on_poll(&mut tx, Instant::now());
            let acks: Vec<Vec<u8>> = tx
                .iter()
                .filter_map(|f| match FrameRepr::parse_bytes(f).ok()?.msg {
                    Message::Interrupt(i) => {
                        assert_eq!((i.route.vm, i.route.device), (7, 7004));
                        Some(c.ack(i.route, i.seq))
                    }
                    _ => None,
                })
                .collect();
            tx.clear();
            seen += acks.len();
            for a in &acks {
                s.on_frame(a, &mut tx, Instant::now());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(seen >= 5, "timer interrupts from the worker: {seen}");
        let (stats, _) = s.finish();
        assert!(stats.interrupt_acks >= 5, "{stats}");
    }

    #[test]
    fn a_worker_that_cannot_be_pinned_is_an_error_not_a_silent_start() {
        let env = DeviceEnv::new();
        let err = Sharded::start(&[pc::test_device(1)], &env, &[0, 1000], IDLE).err();
        assert!(matches!(err, Some(ShardError::Pin { worker: 1, .. })), "{err:?}");
    }
}
