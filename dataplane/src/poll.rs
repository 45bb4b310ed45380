//! The bounded-burst poll loop: receive a burst, hand each frame to a
//! handler that may queue replies, flush the replies with one transmit
//! call, and back off to a blocking wait after a configurable number of
//! empty polls so that an idle core does not spin forever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::batch::FrameBatch;
use crate::transport::{Transport, TransportError};
use crate::MAX_BURST;

/// What a poll loop drives.
pub trait Handler {
    /// One received frame. Replies go into `tx` (which has room for at
    /// least two frames per received frame of the burst).
    fn on_frame(&mut self, frame: &[u8], tx: &mut FrameBatch, now: Instant);

    /// Called once per loop iteration after the burst: timers, retransmits.
    fn on_poll(&mut self, _tx: &mut FrameBatch, _now: Instant) {}

    /// When `on_poll` next has something to do (a timer): an idle loop
    /// wakes by then instead of sleeping its whole wait.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}

/// Poll loop settings.
#[derive(Debug, Clone, Copy)]
pub struct PollConfig {
    /// Frames per receive burst (at most MAX_BURST / 2).
    pub burst: usize,
    /// Empty polls before blocking; `u32::MAX` never blocks.
    pub spin: u32,
    /// Longest blocking wait; also how often the stop flag is checked when idle.
    pub wait: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig { burst: 32, spin: 200_000, wait: Duration::from_millis(10) }
    }
}

/// What a poll loop did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    pub iterations: u64,
    pub bursts: u64,
    pub waits: u64,
}

/// Run until `stop` is set (checked every iteration) or the transport fails.
pub fn run<T, H>(
    transport: &mut T,
    handler: &mut H,
    cfg: PollConfig,
    stop: &AtomicBool,
) -> Result<PollStats, TransportError>
where
    T: Transport + ?Sized,
    H: Handler + ?Sized,
{
    let burst = cfg.burst.clamp(1, MAX_BURST / 2);
    let mut tx = FrameBatch::new();
    let mut stats = PollStats::default();
    let mut idle = 0u32;
    while !stop.load(Ordering::Relaxed) {
        stats.iterations += 1;
        let now = Instant::now();
        let n = transport.recv(burst, &mut |frame| handler.on_frame(frame, &mut tx, now))?;
        handler.on_poll(&mut tx, now);
        if !tx.is_empty() {
            transport.send(&mut tx)?;
        }
        if n > 0 {
            stats.bursts += 1;
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            if idle >= cfg.spin {
                let wait = match handler.next_deadline() {
                    Some(d) => cfg.wait.min(d.saturating_duration_since(Instant::now())),
                    None => cfg.wait,
                };
                if !wait.is_zero() {
                    stats.waits += 1;
                    transport.wait(wait)?;
                }
                idle = 0;
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem;
    use dmfabric_wire::MacAddr;
    use std::sync::Arc;

    /// Echoes every frame back with a byte flipped; stops after `limit`.
    struct Echo {
        seen: usize,
        limit: usize,
        stop: Arc<AtomicBool>,
    }

    impl Handler for Echo {
        fn on_frame(&mut self, frame: &[u8], tx: &mut FrameBatch, _now: Instant) {
            let mut out = frame.to_vec();
            out[0] ^= 0xff;
            assert!(tx.push(&out));
            self.seen += 1;
            if self.seen == self.limit {
                self.stop.store(true, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn echoes_bursts_and_stops() {
        let (mut client, mut server) = mem::pair(MacAddr::default(), MacAddr::default(), 256);
        let stop = Arc::new(AtomicBool::new(false));
        let mut batch = FrameBatch::new();
        for i in 0..100u8 {
            batch.push(&[i, i]);
            if batch.is_full() {
                client.send(&mut batch).unwrap();
            }
        }
        client.send(&mut batch).unwrap();
        let mut echo = Echo { seen: 0, limit: 100, stop: stop.clone() };
        let cfg = PollConfig { burst: 16, spin: 4, wait: Duration::from_millis(1) };
        let stats = run(&mut server, &mut echo, cfg, &stop).unwrap();
        assert_eq!(echo.seen, 100);
        assert!(stats.bursts >= 100 / 16);
        let mut back = Vec::new();
        client.recv(64, &mut |f| back.push(f.to_vec())).unwrap();
        client.recv(64, &mut |f| back.push(f.to_vec())).unwrap();
        assert_eq!(back.len(), 100);
        assert_eq!(back[7], vec![7 ^ 0xff, 7]);
    }
}
