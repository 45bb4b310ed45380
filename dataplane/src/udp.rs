//! UDP transport: each dmfabric frame (Ethernet header included) is the
//! payload of one datagram. This is the baseline a user would build first,
//! one `send_to` / `recv_from` per frame, and the comparison in every bench.
//!
//! Where a MAC lives is learnt from what arrives, so a datagram must not
//! be able to re-point a peer: with a sender check installed
//! ([`Transport::check_senders`], the client's and server's key check),
//! only an authentic frame teaches or changes an address; without one, an
//! address is learnt once and never changed.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use dmfabric_wire::MacAddr;

use crate::batch::FrameBatch;
use crate::sys;
use crate::transport::{SenderCheck, Transport, TransportError, TransportKind, TransportStats};
use crate::FRAME_CAP;

/// Peers learnt from received datagrams, so replies find their way back.
const MAX_PEERS: usize = 64;

pub struct UdpTransport {
    sock: UdpSocket,
    mac: MacAddr,
    default_peer: Option<SocketAddr>,
    peers: Vec<(MacAddr, SocketAddr)>,
    buf: Box<[u8]>,
    stats: TransportStats,
    check: Option<SenderCheck>,
}

impl std::fmt::Debug for UdpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpTransport").field("mac", &self.mac).field("peers", &self.peers.len()).finish()
    }
}

impl UdpTransport {
    /// Bind to `local`. Frames to a MAC not yet heard from go to `peer`.
    pub fn bind(local: SocketAddr, peer: Option<SocketAddr>, mac: MacAddr) -> Result<Self, TransportError> {
        let sock =
            UdpSocket::bind(local).map_err(|e| TransportError::io(format!("Cannot bind UDP socket to {local}"), e))?;
        sock.set_nonblocking(true).map_err(|e| TransportError::io("Cannot make the UDP socket non-blocking", e))?;
        Ok(UdpTransport {
            sock,
            mac,
            default_peer: peer,
            peers: Vec::with_capacity(MAX_PEERS),
            buf: vec![0u8; FRAME_CAP].into_boxed_slice(),
            stats: TransportStats::default(),
            check: None,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// `mac` spoke from `addr` (in `frame`): learn it if the sender check
    /// passes the frame; without a check, only a MAC not known yet.
    fn learn(&mut self, mac: MacAddr, addr: SocketAddr, len: usize) {
        let known = self.peers.iter().position(|(m, _)| *m == mac);
        let authentic = match &mut self.check {
            Some(check) => check(&self.buf[..len]),
            None => known.is_none(),
        };
        if !authentic {
            return;
        }
        match known {
            Some(i) => self.peers[i].1 = addr,
            None if self.peers.len() < MAX_PEERS => self.peers.push((mac, addr)),
            None => {}
        }
    }

    fn route(&self, dst: MacAddr) -> Option<SocketAddr> {
        self.peers.iter().find(|(m, _)| *m == dst).map(|(_, a)| *a).or(self.default_peer)
    }
}

impl Transport for UdpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Udp
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let mut n = 0;
        while n < max {
            match self.sock.recv_from(&mut self.buf) {
                Ok((len, from)) => {
                    if len >= 12 {
                        let mut src = [0u8; 6];
                        src.copy_from_slice(&self.buf[6..12]);
                        if !MacAddr(src).is_multicast() && self.route(MacAddr(src)) != Some(from) {
                            self.learn(MacAddr(src), from, len);
                        }
                    }
                    on_frame(&self.buf[..len]);
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // ICMP errors (port unreachable) surface here; count and go on.
                    self.stats.io_errors += 1;
                    break;
                }
            }
        }
        self.stats.rx_frames += n as u64;
        Ok(n)
    }

    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError> {
        let mut sent = 0;
        for frame in batch.iter() {
            let dst = if frame.len() >= 6 {
                let mut d = [0u8; 6];
                d.copy_from_slice(&frame[..6]);
                MacAddr(d)
            } else {
                MacAddr::BROADCAST
            };
            let Some(addr) = self.route(dst) else {
                self.stats.tx_dropped += 1;
                continue;
            };
            match self.sock.send_to(frame, addr) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stats.tx_dropped += 1,
                Err(_) => {
                    self.stats.io_errors += 1;
                    self.stats.tx_dropped += 1;
                }
            }
        }
        batch.clear();
        self.stats.tx_frames += sent as u64;
        Ok(sent)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        sys::poll_readable(self.sock.as_raw_fd(), timeout)
            .map_err(|e| TransportError::io("poll on the UDP socket failed", e))?;
        Ok(())
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }

    fn stats(&self) -> TransportStats {
        self.stats
    }

    fn check_senders(&mut self, check: SenderCheck) {
        self.check = Some(check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_round_trip_learns_the_peer() {
        let mac_a = MacAddr([2, 0, 0, 0, 0, 0xa]);
        let mac_b = MacAddr([2, 0, 0, 0, 0, 0xb]);
        let mut b = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None, mac_b).unwrap();
        let mut a = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), Some(b.local_addr().unwrap()), mac_a).unwrap();
        let mut frame = [0u8; 20];
        frame[..6].copy_from_slice(&mac_b.0);
        frame[6..12].copy_from_slice(&mac_a.0);
        let mut batch = FrameBatch::new();
        batch.push(&frame);
        assert_eq!(a.send(&mut batch).unwrap(), 1);
        let mut got = Vec::new();
        for _ in 0..100 {
            b.wait(Duration::from_millis(10)).unwrap();
            b.recv(8, &mut |f| got.push(f.to_vec())).unwrap();
            if !got.is_empty() {
                break;
            }
        }
        assert_eq!(got, vec![frame.to_vec()]);
        // b has no default peer: it can answer only because it learnt a's address.
        let mut reply = [0u8; 20];
        reply[..6].copy_from_slice(&mac_a.0);
        batch.push(&reply);
        assert_eq!(b.send(&mut batch).unwrap(), 1);
        // A frame to an unknown MAC with no default peer is dropped and counted.
        let mut stray = [0u8; 20];
        stray[..6].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
        batch.push(&stray);
        assert_eq!(b.send(&mut batch).unwrap(), 0);
        assert_eq!(b.stats().tx_dropped, 1);
    }

    /// Datagrams naming `mac` as their source, from a socket of their own.
    fn from_elsewhere(to: SocketAddr, mac: MacAddr, marked: bool) -> UdpTransport {
        let mut t = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), Some(to), mac).unwrap();
        let mut frame = [0u8; 20];
        frame[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0xb]);
        frame[6..12].copy_from_slice(&mac.0);
        frame[19] = u8::from(marked);
        let mut batch = FrameBatch::new();
        batch.push(&frame);
        t.send(&mut batch).unwrap();
        t
    }

    fn drain(t: &mut UdpTransport) {
        for _ in 0..100 {
            t.wait(Duration::from_millis(10)).unwrap();
            if t.recv(8, &mut |_| {}).unwrap() > 0 {
                return;
            }
        }
    }

    #[test]
    fn a_datagram_cannot_re_point_a_peer_without_passing_the_check() {
        let mac_a = MacAddr([2, 0, 0, 0, 0, 0xa]);
        let mut b = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None, MacAddr([2, 0, 0, 0, 0, 0xb])).unwrap();
        let to = b.local_addr().unwrap();
        let real = from_elsewhere(to, mac_a, false);
        drain(&mut b);
        let real_addr = real.local_addr().unwrap();
        assert_eq!(b.route(mac_a), Some(real_addr));
        // Unchecked: a second sender claiming the MAC does not move it.
        let _forger = from_elsewhere(to, mac_a, false);
        drain(&mut b);
        assert_eq!(b.route(mac_a), Some(real_addr));
        // Checked: only a frame the check passes moves it.
        b.check_senders(Box::new(|f: &[u8]| f[19] == 1));
        let _forger = from_elsewhere(to, mac_a, false);
        drain(&mut b);
        assert_eq!(b.route(mac_a), Some(real_addr));
        let moved = from_elsewhere(to, mac_a, true);
        drain(&mut b);
        assert_eq!(b.route(mac_a), Some(moved.local_addr().unwrap()));
    }
}
