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

use crate::irq::IrqQueue;
use crate::server::{DeviceSpec, Devices, Frontend, ServerStats};

/// Slots of each ring between the data-plane core and a worker.
pub const RING_SLOTS: usize = 512;
/// Requests that may wait on the data-plane core for one worker's full ring.
pub const OVERFLOW_LIMIT: usize = 4096;

/// A request for a worker, with whom to answer.
#[derive(Debug, Clone, Copy)]
struct Job {
    req: IoRequest,
    reply_to: MacAddr,
}

/// A worker's answer.
#[derive(Debug, Clone, Copy)]
struct Done {
    cmp: IoCompletion,
    to: MacAddr,
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
    workers: Vec<JoinHandle<Devices>>,
    stop_workers: Arc<AtomicBool>,
    pause_workers: Arc<AtomicBool>,
    /// Interrupts raised on any worker, sent by the data-plane core.
    irqs: Arc<IrqQueue>,
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
    /// and assign device `i` of `devices` to worker `i % workers`.
    pub fn start(
        id: u16,
        mac: MacAddr,
        devices: &[DeviceSpec],
        worker_cores: &[usize],
        idle: WorkerIdle,
    ) -> Result<ShardedServer, dmfabric_pinning::PinError> {
        let n = worker_cores.len().max(1);
        let mut shards: Vec<Vec<DeviceSpec>> = vec![Vec::new(); n];
        let mut shard_of = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            shards[i % n].push(d.clone());
            shard_of.push((d.id, i % n));
        }
        shard_of.sort_unstable();
        shard_of.dedup_by_key(|(id, _)| *id);
        let stop_workers = Arc::new(AtomicBool::new(false));
        let pause_workers = Arc::new(AtomicBool::new(false));
        let (mut to_workers, mut from_workers, mut workers) = (Vec::new(), Vec::new(), Vec::new());
        let irqs = IrqQueue::new();
        for (w, specs) in shards.into_iter().enumerate() {
            let (job_p, job_c) = ring::channel::<Job>(RING_SLOTS);
            let (done_p, done_c) = ring::channel::<Done>(RING_SLOTS);
            let core = worker_cores.get(w).copied();
            let stop = stop_workers.clone();
            let pause = pause_workers.clone();
            let irq_queue = irqs.clone();
            let handle = std::thread::Builder::new()
                .name(format!("dmf-worker-{w}"))
                .spawn(move || {
                    if let Some(c) = core {
                        let _ = dmfabric_pinning::pin_current(c);
                    }
                    worker_loop(Devices::new(&specs, &irq_queue), job_c, done_p, &stop, &pause, idle)
                })
                .expect("spawning a worker thread");
            to_workers.push(job_p);
            from_workers.push(done_c);
            workers.push(handle);
        }
        Ok(ShardedServer {
            frontend: Frontend::new(id, mac),
            shard_of,
            to_workers,
            from_workers,
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            stats: ShardStats { executed: vec![0; n], ..ShardStats::default() },
            workers,
            stop_workers,
            pause_workers,
            irqs,
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
        for h in self.workers.drain(..) {
            if let Ok(devices) = h.join() {
                unclaimed += devices.unclaimed();
                counters.extend_from_slice(devices.counters());
            }
        }
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
                self.frontend.complete(tx, done.to, done.cmp);
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
    fn on_frame(&mut self, bytes: &[u8], tx: &mut FrameBatch, _now: Instant) {
        let Some((req, from)) = self.frontend.classify(bytes, tx) else { return };
        let Some(w) = self.shard(req.route.device) else {
            self.frontend.nack(tx, from, &req, NackReason::UnknownDevice);
            return;
        };
        let job = Job { req, reply_to: from };
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
        self.frontend.send_interrupts(&self.irqs, tx, now);
        self.retry_overflow();
    }
}

fn worker_loop(
    mut devices: Devices,
    mut jobs: Consumer<Job>,
    mut done: Producer<Done>,
    stop: &AtomicBool,
    pause: &AtomicBool,
    idle: WorkerIdle,
) -> Devices {
    let mut empty = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let job = if pause.load(Ordering::Acquire) { None } else { jobs.pop().ok() };
        let Some(job) = job else {
            empty = empty.saturating_add(1);
            if empty >= idle.spin {
                std::thread::sleep(idle.nap);
                empty = 0;
            } else {
                std::hint::spin_loop();
            }
            continue;
        };
        empty = 0;
        // The data-plane core checked that this shard has the device.
        let Some(cmp) = devices.execute(&job.req) else { continue };
        let mut item = Done { cmp, to: job.reply_to };
        // A full completion ring waits for the data-plane core to drain it.
        loop {
            match done.push(item) {
                Ok(()) => break,
                Err(ring::PushError::Full(back)) => {
                    if stop.load(Ordering::Relaxed) {
                        return devices;
                    }
                    item = back;
                    std::hint::spin_loop();
                }
            }
        }
    }
    devices
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let devices: Vec<DeviceSpec> = (1..=4).map(|id| DeviceSpec { id, ..DeviceSpec::test_device() }).collect();
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
        let devices = [DeviceSpec::test_device()];
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
}
