//! The split layout: a data-plane core runs the [`Frontend`] and hands each
//! request to the worker core that owns the device's shard, over an SPSC
//! ring; workers run the device models and hand completions back over a
//! second ring; the data-plane core transmits them.
//!
//! Back-pressure: when a worker's request ring is full, requests wait in a
//! bounded overflow queue on the data-plane core (counted); only past its
//! bound are they dropped (counted too), and the client's retransmit covers
//! them. Nothing is dropped silently.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmfabric_dataplane::poll::Handler;
use dmfabric_dataplane::ring::{self, Consumer, Producer};
use dmfabric_dataplane::FrameBatch;
use dmfabric_wire::{IoCompletion, IoRequest, MacAddr, NackReason};
use hdrhistogram::Histogram;

use crate::devices::{DeviceEnv, Devices, Refused};
use crate::server::{Frontend, ServerStats};
use dmfabric_devices::DeviceSpec;

/// Slots of each ring between the data-plane core and a worker.
pub const RING_SLOTS: usize = 512;
/// Requests that may wait on the data-plane core for one worker's full ring.
pub const OVERFLOW_LIMIT: usize = 4096;

/// A request for a worker, with whom to answer.
#[derive(Debug, Clone, Copy)]
struct Job {
    req: IoRequest,
    reply_to: MacAddr,
    /// When the data-plane core handed it over (for the shard's hand-off latency).
    queued: Instant,
}

/// A worker's answer: the completion, or why the device refused.
#[derive(Debug, Clone, Copy)]
struct Done {
    result: Result<IoCompletion, (IoRequest, Refused)>,
    to: MacAddr,
}

/// What a worker hands back when it stops.
struct WorkerEnd {
    devices: Devices,
    handoff: Histogram<u64>,
}

/// Counters of the split layout on top of [`ServerStats`].
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

/// The data-plane side: a poll-loop [`Handler`].
pub struct ShardedServer {
    frontend: Frontend,
    /// Device id → worker, sorted by device id.
    shard_of: Vec<(u32, usize)>,
    to_workers: Vec<Producer<Job>>,
    from_workers: Vec<Consumer<Done>>,
    /// Per worker: requests waiting for room in its ring, in arrival order.
    overflow: Vec<VecDeque<Job>>,
    stats: ShardStats,
    workers: Vec<JoinHandle<WorkerEnd>>,
    stop_workers: Arc<AtomicBool>,
    pause_workers: Arc<AtomicBool>,
    /// Interrupts and VM requests raised on any worker, consoles: sent or
    /// served from the data-plane side.
    env: DeviceEnv,
}

impl std::fmt::Debug for ShardedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedServer").field("workers", &self.to_workers.len()).finish()
    }
}

/// How a worker waits when it has nothing to do.
#[derive(Debug, Clone, Copy)]
pub struct WorkerIdle {
    /// Empty polls before napping; `u32::MAX` spins forever (lowest latency).
    pub spin: u32,
    pub nap: Duration,
}

impl ShardedServer {
    /// Start one worker thread per entry of `worker_cores` (pinned there)
    /// and give each device to its configured shard (modulo the workers), or
    /// device `i` of `devices` to worker `i % workers`.
    pub fn start(
        id: u16,
        mac: MacAddr,
        devices: &[DeviceSpec],
        worker_cores: &[usize],
        idle: WorkerIdle,
    ) -> Result<ShardedServer, dmfabric_pinning::PinError> {
        ShardedServer::start_with_env(id, mac, devices, worker_cores, idle, DeviceEnv::new(devices))
    }

    /// The same, wired to `env` (whose consoles the caller serves).
    pub fn start_with_env(
        id: u16,
        mac: MacAddr,
        devices: &[DeviceSpec],
        worker_cores: &[usize],
        idle: WorkerIdle,
        env: DeviceEnv,
    ) -> Result<ShardedServer, dmfabric_pinning::PinError> {
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
        let stop_workers = Arc::new(AtomicBool::new(false));
        let pause_workers = Arc::new(AtomicBool::new(false));
        let (mut to_workers, mut from_workers, mut workers) = (Vec::new(), Vec::new(), Vec::new());

        for (w, specs) in shards.into_iter().enumerate() {
            let (job_p, job_c) = ring::channel::<Job>(RING_SLOTS);
            let (done_p, done_c) = ring::channel::<Done>(RING_SLOTS);
            let core = worker_cores.get(w).copied();
            let stop = stop_workers.clone();
            let pause = pause_workers.clone();
            let worker_env = env.clone();
            let handle = std::thread::Builder::new()
                .name(format!("dmf-worker-{w}"))
                .spawn(move || {
                    if let Some(c) = core {
                        let _ = dmfabric_pinning::pin_current(c);
                    }
                    worker_loop(Devices::new(&specs, &worker_env), job_c, done_p, &stop, &pause, idle)
                })
                .expect("spawning a worker thread");
            to_workers.push(job_p);
            from_workers.push(done_c);
            workers.push(handle);
        }
        let mut frontend = Frontend::new(id, mac);
        frontend.set_devices(devices);
        Ok(ShardedServer {
            frontend,
            shard_of,
            to_workers,
            from_workers,
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            stats: ShardStats { executed: vec![0; n], ..ShardStats::default() },
            workers,
            stop_workers,
            pause_workers,
            env,
        })
    }

    /// Hold every worker before its next request (requests queue up in the
    /// rings and then on the data-plane core), or let them go on.
    pub fn pause_workers(&self, paused: bool) {
        self.pause_workers.store(paused, Ordering::Release);
    }

    fn shard(&self, device: u32) -> Option<usize> {
        self.shard_of.binary_search_by_key(&device, |(d, _)| *d).ok().map(|i| self.shard_of[i].1)
    }

    /// Stop the workers and return the counters of the whole server.
    pub fn finish(mut self) -> (ServerStats, ShardStats) {
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
        let mut s = self.frontend.stats();
        s.unclaimed = unclaimed;
        s.devices = counters;
        (s, self.stats.clone())
    }

    /// Counters so far (worker-side `unclaimed` only after [`finish`](Self::finish)).
    pub fn stats(&self) -> (ServerStats, ShardStats) {
        (self.frontend.stats(), self.stats.clone())
    }

    /// Move completions from the workers into `tx` while it has room.
    fn drain_completions(&mut self, tx: &mut FrameBatch) {
        for (w, ring) in self.from_workers.iter_mut().enumerate() {
            while !tx.is_full() {
                let Ok(done) = ring.pop() else { break };
                self.stats.executed[w] += 1;
                match done.result {
                    Ok(cmp) => self.frontend.complete(tx, done.to, cmp),
                    Err((req, Refused::UnknownDevice)) => {
                        self.frontend.nack(tx, done.to, &req, NackReason::UnknownDevice)
                    }
                    Err((req, Refused::OtherVm)) => self.frontend.nack(tx, done.to, &req, NackReason::NotAuthorised),
                }
            }
        }
    }

    fn retry_overflow(&mut self) {
        for (queue, ring) in self.overflow.iter_mut().zip(&mut self.to_workers) {
            while let Some(&job) = queue.front() {
                if ring.push(job).is_err() {
                    break;
                }
                queue.pop_front();
            }
        }
    }
}

impl Drop for ShardedServer {
    fn drop(&mut self) {
        self.stop_workers.store(true, Ordering::Relaxed);
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Handler for ShardedServer {
    fn on_frame(&mut self, bytes: &[u8], tx: &mut FrameBatch, now: Instant) {
        let Some((req, from)) = self.frontend.classify(bytes, tx) else { return };
        let Some(w) = self.shard(req.route.device) else {
            self.frontend.nack(tx, from, &req, NackReason::UnknownDevice);
            return;
        };
        let job = Job { req, reply_to: from, queued: now };
        // Keep order per worker: once something waits, everything for that
        // worker waits behind it.
        let queue = &mut self.overflow[w];
        if queue.is_empty() && self.to_workers[w].push(job).is_ok() {
            return;
        }
        self.stats.ring_full += 1;
        if queue.len() < OVERFLOW_LIMIT {
            queue.push_back(job);
        } else {
            self.stats.overflow_dropped += 1;
        }
    }

    fn on_poll(&mut self, tx: &mut FrameBatch, now: Instant) {
        self.drain_completions(tx);
        self.frontend.send_vm_events(&self.env.events, tx);
        self.frontend.send_interrupts(&self.env.irqs, tx, now);
        self.retry_overflow();
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Workers raise interrupts on their own timers: look at least every
        // millisecond, sooner for a retransmit.
        let soon = Instant::now() + Duration::from_millis(1);
        Some(self.frontend.next_retransmit().map_or(soon, |r| r.min(soon)))
    }
}

fn worker_loop(
    mut devices: Devices,
    mut jobs: Consumer<Job>,
    mut done: Producer<Done>,
    stop: &AtomicBool,
    pause: &AtomicBool,
    idle: WorkerIdle,
) -> WorkerEnd {
    let mut handoff = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 2).expect("valid bounds");
    let mut empty = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Timers and console input run on the shard's own loop.
        devices.tick(now);
        let job = if pause.load(Ordering::Acquire) { None } else { jobs.pop().ok() };
        let Some(job) = job else {
            empty = empty.saturating_add(1);
            if empty >= idle.spin {
                let nap = devices.next_due().map_or(idle.nap, |d| idle.nap.min(d.saturating_duration_since(now)));
                std::thread::sleep(nap);
                empty = 0;
            } else {
                std::hint::spin_loop();
            }
            continue;
        };
        empty = 0;
        handoff.saturating_record(now.saturating_duration_since(job.queued).as_nanos() as u64);
        let result = devices.execute(&job.req, now).map_err(|why| (job.req, why));
        let mut item = Done { result, to: job.reply_to };
        // A full completion ring waits for the data-plane core to drain it.
        loop {
            match done.push(item) {
                Ok(()) => break,
                Err(ring::PushError::Full(back)) => {
                    if stop.load(Ordering::Relaxed) {
                        return WorkerEnd { devices, handoff };
                    }
                    item = back;
                    std::hint::spin_loop();
                }
            }
        }
    }
    WorkerEnd { devices, handoff }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_devices::platform::pc;
    use dmfabric_wire::{AccessSize, Direction, EthernetRepr, FrameRepr, Message, Route, Space, Status};

    const SERVER: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
    const CLIENT: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);

    fn request(device: u32, seq: u64, dir: Direction, data: u64) -> Vec<u8> {
        let req = IoRequest {
            route: Route { server: 1, client: 3, vm: 7, vcpu: 0, device, hypervisor: 1 },
            seq,
            space: Space::Mmio,
            dir,
            size: AccessSize::B8,
            addr: 0xd000_0000 + u64::from(device) * 8,
            data,
        };
        let repr = FrameRepr::new(EthernetRepr { dst: SERVER, src: CLIENT }, Message::IoRequest(req));
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    /// Feed frames and poll until `want` replies came back (bounded).
    fn exchange(s: &mut ShardedServer, frames: &[Vec<u8>], want: usize) -> Vec<Message<'static>> {
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
                out.push(FrameRepr::parse_bytes(owned).unwrap().msg);
            }
            tx.clear();
        }
        out
    }

    #[test]
    fn requests_reach_the_owning_worker_and_come_back() {
        let devices: Vec<DeviceSpec> = (1..=4).map(|id| DeviceSpec { id, ..pc::test_device(1) }).collect();
        let idle = WorkerIdle { spin: 1000, nap: Duration::from_micros(50) };
        let mut s = ShardedServer::start(1, SERVER, &devices, &[0, 0], idle).unwrap();
        let writes: Vec<Vec<u8>> =
            (1..=4).map(|d| request(d, u64::from(d), Direction::Write, 100 + u64::from(d))).collect();
        assert_eq!(exchange(&mut s, &writes, 4).len(), 4);
        let reads: Vec<Vec<u8>> = (1..=4).map(|d| request(d, 10 + u64::from(d), Direction::Read, 0)).collect();
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
        let nack = exchange(&mut s, &[request(9, 99, Direction::Read, 0)], 1);
        assert!(matches!(nack[..], [Message::Nack(_)]));
        let (stats, shard) = s.finish();
        assert_eq!((stats.requests, stats.completions, stats.nack_unknown_device), (9, 8, 1));
        assert_eq!(shard.executed, vec![4, 4], "devices 1,3 on worker 0 and 2,4 on worker 1");
    }

    #[test]
    fn a_full_ring_waits_in_order_and_loses_nothing() {
        let devices = [pc::test_device(1)];
        let idle = WorkerIdle { spin: 1000, nap: Duration::from_micros(50) };
        let mut s = ShardedServer::start(1, SERVER, &devices, &[0], idle).unwrap();
        // A held worker takes nothing, so its ring fills and the rest waits.
        s.pause_workers(true);
        let n = RING_SLOTS + 300;
        let frames: Vec<Vec<u8>> = (0..n as u64).map(|i| request(1, i, Direction::Write, i)).collect();
        let mut tx = FrameBatch::new();
        for f in &frames {
            s.on_frame(f, &mut tx, Instant::now());
        }
        assert_eq!(s.stats().1.ring_full, 300);
        s.pause_workers(false);
        let mut seqs = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while seqs.len() < n && Instant::now() < end {
            s.on_poll(&mut tx, Instant::now());
            for f in tx.iter() {
                if let Ok(FrameRepr { msg: Message::IoCompletion(c), .. }) = FrameRepr::parse_bytes(f) {
                    seqs.push(c.seq);
                }
            }
            tx.clear();
        }
        assert_eq!(seqs, (0..n as u64).collect::<Vec<_>>(), "all answered, in order");
        assert_eq!(s.stats().1.overflow_dropped, 0);
    }

    #[test]
    fn a_timer_on_a_worker_shard_interrupts_through_the_data_plane_core() {
        let devices = pc::PcLayout::new(7).unwrap().specs();
        let idle = WorkerIdle { spin: 1000, nap: Duration::from_micros(50) };
        let mut s = ShardedServer::start(1, SERVER, &devices, &[0, 0], idle).unwrap();
        let pio = |seq: u64, addr: u64, data: u64| {
            let req = IoRequest {
                route: Route { server: 1, client: 3, vm: 7, vcpu: 0, device: 0, hypervisor: 1 },
                seq,
                space: Space::Pio,
                dir: Direction::Write,
                size: AccessSize::B4,
                addr,
                data,
            };
            let repr = FrameRepr::new(EthernetRepr { dst: SERVER, src: CLIENT }, Message::IoRequest(req));
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf).unwrap();
            buf
        };
        // Device 0: the server finds VM 7's timer at 0x700. 1 ms, periodic, edge.
        let done = exchange(&mut s, &[pio(0, 0x704, 1000), pio(1, 0x700, 3)], 3);
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
                        let ack = dmfabric_wire::InterruptAck { route: i.route, seq: i.seq };
                        let repr =
                            FrameRepr::new(EthernetRepr { dst: SERVER, src: CLIENT }, Message::InterruptAck(ack));
                        let mut buf = vec![0u8; repr.buffer_len()];
                        repr.emit(&mut buf).unwrap();
                        Some(buf)
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
}
