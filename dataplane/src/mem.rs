//! In-memory transport: two endpoints joined by SPSC rings, for unit tests
//! and single-process runs that have no privileges.

use std::time::{Duration, Instant};

use dmfabric_wire::MacAddr;
use rtrb::{Consumer, Producer, RingBuffer};

use crate::batch::FrameBatch;
use crate::transport::{Transport, TransportError, TransportKind, TransportStats};
use crate::FRAME_CAP;

/// One end of an in-memory link. Frame buffers circulate between a data
/// ring and a free ring, so steady-state sending never allocates.
#[derive(Debug)]
pub struct MemTransport {
    mac: MacAddr,
    tx: Producer<Vec<u8>>,
    tx_free: Consumer<Vec<u8>>,
    rx: Consumer<Vec<u8>>,
    rx_free: Producer<Vec<u8>>,
    stats: TransportStats,
}

/// A connected pair of endpoints with `capacity` frames in flight per direction.
pub fn pair(mac_a: MacAddr, mac_b: MacAddr, capacity: usize) -> (MemTransport, MemTransport) {
    let (a_tx, b_rx, a_tx_free, b_rx_free) = direction(capacity);
    let (b_tx, a_rx, b_tx_free, a_rx_free) = direction(capacity);
    let a = MemTransport {
        mac: mac_a,
        tx: a_tx,
        tx_free: a_tx_free,
        rx: a_rx,
        rx_free: a_rx_free,
        stats: TransportStats::default(),
    };
    let b = MemTransport {
        mac: mac_b,
        tx: b_tx,
        tx_free: b_tx_free,
        rx: b_rx,
        rx_free: b_rx_free,
        stats: TransportStats::default(),
    };
    (a, b)
}

#[allow(clippy::type_complexity)]
fn direction(capacity: usize) -> (Producer<Vec<u8>>, Consumer<Vec<u8>>, Consumer<Vec<u8>>, Producer<Vec<u8>>) {
    let (data_p, data_c) = RingBuffer::new(capacity);
    let (mut free_p, free_c) = RingBuffer::new(capacity);
    for _ in 0..capacity {
        // Cannot fail: the ring has exactly `capacity` slots.
        let _ = free_p.push(Vec::with_capacity(FRAME_CAP));
    }
    (data_p, data_c, free_c, free_p)
}

impl Transport for MemTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Mem
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let mut n = 0;
        while n < max {
            let Ok(buf) = self.rx.pop() else { break };
            on_frame(&buf);
            n += 1;
            // Cannot fail: buffers only ever come from this free ring's peer.
            let _ = self.rx_free.push(buf);
        }
        if n == 0 && self.rx.is_abandoned() {
            return Err(TransportError::Disconnected);
        }
        self.stats.rx_frames += n as u64;
        Ok(n)
    }

    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError> {
        let mut sent = 0;
        for frame in batch.iter() {
            let Ok(mut buf) = self.tx_free.pop() else {
                self.stats.tx_dropped += 1;
                continue;
            };
            buf.clear();
            buf.extend_from_slice(frame);
            if self.tx.push(buf).is_err() {
                self.stats.tx_dropped += 1;
                continue;
            }
            sent += 1;
        }
        batch.clear();
        self.stats.tx_frames += sent as u64;
        Ok(sent)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        // No file descriptor to sleep on: nap in short steps.
        let end = Instant::now() + timeout;
        while self.rx.is_empty() && Instant::now() < end {
            if self.rx.is_abandoned() {
                return Err(TransportError::Disconnected);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    fn stats(&self) -> TransportStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_in_order_and_buffers_recycle() {
        let (mut a, mut b) = pair(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]), 4);
        let mut got = Vec::new();
        for round in 0..10u8 {
            let mut batch = FrameBatch::new();
            for i in 0..3u8 {
                batch.push(&[round, i]);
            }
            assert_eq!(a.send(&mut batch).unwrap(), 3);
            assert!(batch.is_empty());
            b.recv(64, &mut |f| got.push(f.to_vec())).unwrap();
        }
        assert_eq!(got.len(), 30);
        assert_eq!(got[29], vec![9, 2]);
        assert_eq!(a.stats().tx_frames, 30);
        assert_eq!(b.stats().rx_frames, 30);
    }

    #[test]
    fn full_ring_counts_drops() {
        let (mut a, _b) = pair(MacAddr::default(), MacAddr::default(), 2);
        let mut batch = FrameBatch::new();
        for _ in 0..5 {
            batch.push(&[1]);
        }
        assert_eq!(a.send(&mut batch).unwrap(), 2);
        assert_eq!(a.stats().tx_dropped, 3);
    }

    #[test]
    fn dropped_peer_is_reported() {
        let (mut a, b) = pair(MacAddr::default(), MacAddr::default(), 2);
        drop(b);
        assert!(matches!(a.recv(8, &mut |_| {}), Err(TransportError::Disconnected)));
    }
}
