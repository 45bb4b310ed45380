//! A transport wrapper that injects faults: drop, duplicate, reorder and
//! corrupt, each with a probability, driven by a seeded generator so that a
//! failing run can be replayed (smoltcp's `FaultInjector` is the model).

use std::time::Duration;

use dmfabric_wire::MacAddr;

use crate::batch::FrameBatch;
use crate::transport::{Transport, TransportError, TransportKind, TransportStats};
use crate::FRAME_CAP;

/// Probabilities in `[0, 1]` per frame, and the seed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultConfig {
    pub drop: f64,
    pub duplicate: f64,
    /// Hold a sent frame back and send it after the next send call's frames.
    pub reorder: f64,
    /// Flip one random bit of the frame.
    pub corrupt: f64,
    pub seed: u64,
}

impl FaultConfig {
    /// Parse `drop=0.05,dup=0.05,reorder=0.01,corrupt=0.01,seed=7`.
    pub fn parse(spec: &str) -> Result<FaultConfig, String> {
        let mut cfg = FaultConfig { seed: 1, ..FaultConfig::default() };
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| format!("fault `{item}`: expected key=value"))?;
            if key == "seed" {
                cfg.seed = value.parse().map_err(|_| format!("fault seed `{value}` is not an integer"))?;
                continue;
            }
            let p: f64 = value.parse().map_err(|_| format!("fault `{key}`: `{value}` is not a number"))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("fault `{key}`: probability {p} is outside 0..=1"));
            }
            match key {
                "drop" => cfg.drop = p,
                "dup" | "duplicate" => cfg.duplicate = p,
                "reorder" => cfg.reorder = p,
                "corrupt" => cfg.corrupt = p,
                _ => return Err(format!("unknown fault `{key}`: expected drop, dup, reorder, corrupt or seed")),
            }
        }
        Ok(cfg)
    }
}

/// What the injector did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub corrupted: u64,
}

/// SplitMix64: tiny, seedable and good enough for fault decisions.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Wraps a transport and applies faults on both send and receive (reorder
/// only on send).
#[derive(Debug)]
pub struct FaultInjector<T> {
    inner: T,
    cfg: FaultConfig,
    rng: Rng,
    out: FrameBatch,
    held: FrameBatch,
    /// What `held` held at the start of the current send call.
    held_prev: FrameBatch,
    scratch: Box<[u8]>,
    stats: FaultStats,
    /// Where the counters go when the injector is dropped (it may have been
    /// handed away as a `Box<dyn Transport>`).
    report: Option<std::sync::Arc<std::sync::Mutex<FaultStats>>>,
}

impl<T: Transport> FaultInjector<T> {
    pub fn new(inner: T, cfg: FaultConfig) -> Self {
        FaultInjector {
            inner,
            rng: Rng(cfg.seed),
            cfg,
            out: FrameBatch::new(),
            held: FrameBatch::new(),
            held_prev: FrameBatch::new(),
            scratch: vec![0u8; FRAME_CAP].into_boxed_slice(),
            stats: FaultStats::default(),
            report: None,
        }
    }

    pub fn fault_stats(&self) -> FaultStats {
        self.stats
    }

    /// Leave the counters in `to` when dropped.
    pub fn report_to(mut self, to: std::sync::Arc<std::sync::Mutex<FaultStats>>) -> Self {
        self.report = Some(to);
        self
    }

    fn corrupt(rng: &mut Rng, frame: &mut [u8]) {
        if !frame.is_empty() {
            let bit = rng.next_u64() as usize % (frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
        }
    }
}

impl<T> Drop for FaultInjector<T> {
    fn drop(&mut self) {
        if let Some(to) = &self.report {
            *to.lock().unwrap_or_else(|e| e.into_inner()) = self.stats;
        }
    }
}

impl<T: Transport> Transport for FaultInjector<T> {
    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }

    fn mac(&self) -> MacAddr {
        self.inner.mac()
    }

    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let Self { inner, cfg, rng, scratch, stats, .. } = self;
        inner.recv(max, &mut |frame: &[u8]| {
            if rng.chance(cfg.drop) {
                stats.dropped += 1;
                return;
            }
            let frame = if rng.chance(cfg.corrupt) {
                stats.corrupted += 1;
                let n = frame.len().min(scratch.len());
                scratch[..n].copy_from_slice(&frame[..n]);
                Self::corrupt(rng, &mut scratch[..n]);
                &scratch[..n]
            } else {
                frame
            };
            on_frame(frame);
            if rng.chance(cfg.duplicate) {
                stats.duplicated += 1;
                on_frame(frame);
            }
        })
    }

    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError> {
        // Frames held back by the previous call go after this call's.
        std::mem::swap(&mut self.held_prev, &mut self.held);
        self.held.clear();
        for i in 0..batch.len() {
            if self.out.is_full() {
                break;
            }
            if self.rng.chance(self.cfg.drop) {
                self.stats.dropped += 1;
                continue;
            }
            if self.rng.chance(self.cfg.reorder) && !self.held.is_full() {
                self.stats.reordered += 1;
                self.held.push(batch.get(i));
                continue;
            }
            self.out.push(batch.get(i));
            if self.rng.chance(self.cfg.corrupt) {
                self.stats.corrupted += 1;
                let last = self.out.len() - 1;
                Self::corrupt(&mut self.rng, self.out.get_mut(last));
            }
            if self.rng.chance(self.cfg.duplicate) && !self.out.is_full() {
                self.stats.duplicated += 1;
                self.out.push(batch.get(i));
            }
        }
        for frame in self.held_prev.iter() {
            if !self.out.push(frame) {
                self.stats.dropped += 1;
            }
        }
        self.held_prev.clear();
        batch.clear();
        self.inner.send(&mut self.out)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.inner.wait(timeout)
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.wake_fd()
    }

    fn stats(&self) -> TransportStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem;

    fn run(cfg: FaultConfig, frames: u16) -> (Vec<Vec<u8>>, FaultStats) {
        let (a, mut b) = mem::pair(MacAddr::default(), MacAddr::default(), 4096);
        let mut a = FaultInjector::new(a, cfg);
        let mut got = Vec::new();
        for i in 0..frames {
            let mut batch = FrameBatch::new();
            batch.push(&i.to_be_bytes());
            a.send(&mut batch).unwrap();
            b.recv(64, &mut |f| got.push(f.to_vec())).unwrap();
        }
        (got, a.fault_stats())
    }

    #[test]
    fn no_faults_is_transparent() {
        let (got, stats) = run(FaultConfig::default(), 500);
        assert_eq!(got.len(), 500);
        assert_eq!(stats, FaultStats::default());
    }

    #[test]
    fn rates_are_roughly_honoured_and_seeded() {
        let cfg = FaultConfig { drop: 0.1, duplicate: 0.1, reorder: 0.05, corrupt: 0.05, seed: 42 };
        let (got, stats) = run(cfg, 5000);
        for (name, n) in [("dropped", stats.dropped), ("duplicated", stats.duplicated)] {
            assert!((300..=700).contains(&n), "{name} = {n}");
        }
        assert!((100..=450).contains(&stats.reordered), "reordered = {}", stats.reordered);
        assert!((100..=450).contains(&stats.corrupted), "corrupted = {}", stats.corrupted);
        // Out-of-order arrivals exist.
        let seqs: Vec<u16> = got.iter().filter(|f| f.len() == 2).map(|f| u16::from_be_bytes([f[0], f[1]])).collect();
        assert!(seqs.windows(2).any(|w| w[1] < w[0]), "some frames arrive out of order");
        // The same seed gives the same run.
        assert_eq!(run(cfg, 5000), (got, stats));
    }

    #[test]
    fn parse_spec() {
        let cfg = FaultConfig::parse("drop=0.05, dup=0.05,seed=9").unwrap();
        assert_eq!((cfg.drop, cfg.duplicate, cfg.seed), (0.05, 0.05, 9));
        assert!(FaultConfig::parse("drop=2").is_err());
        assert!(FaultConfig::parse("lose=0.1").is_err());
        assert!(FaultConfig::parse("drop").is_err());
    }
}
