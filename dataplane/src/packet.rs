//! AF_PACKET transport: a raw socket bound to one interface and to the
//! dmfabric EtherType. The fallback where XDP is missing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use dmfabric_wire::{MacAddr, ETHERTYPE_DMFABRIC};

use crate::batch::FrameBatch;
use crate::sys;
use crate::transport::{Transport, TransportError, TransportKind, TransportStats};
use crate::FRAME_CAP;

/// SOL_PACKET option: do not loop our own outgoing frames back to us.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

#[derive(Debug)]
pub struct PacketTransport {
    fd: OwnedFd,
    mac: MacAddr,
    buf: Box<[u8]>,
    stats: TransportStats,
}

impl PacketTransport {
    /// Open a raw socket on `iface` in the calling thread's network namespace.
    pub fn open(iface: &str) -> Result<Self, TransportError> {
        let missing = sys::missing_capabilities(&[(sys::CAP_NET_RAW, "CAP_NET_RAW")]);
        if !missing.is_empty() {
            return Err(TransportError::Privilege(
                "AF_PACKET needs CAP_NET_RAW: run as root or use --transport udp".into(),
            ));
        }
        let ifindex = sys::if_index(iface).ok_or_else(|| TransportError::NoSuchInterface(iface.into()))?;
        let mac = sys::if_mac(iface).map_err(|e| TransportError::io(format!("Cannot read the MAC of {iface}"), e))?;
        let proto = ETHERTYPE_DMFABRIC.to_be() as libc::c_int;
        // SAFETY: plain socket(2) call; the result is checked.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TransportError::Privilege("AF_PACKET needs CAP_NET_RAW: run as root or use --transport udp".into())
                }
                _ => TransportError::io("Cannot open an AF_PACKET socket", e),
            });
        }
        // SAFETY: `raw` is a freshly created descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: `fd` is open; the option value points to a c_int of the given size.
        // Older kernels lack the option: then our own frames come back and
        // are dropped by the receiver's MAC check, so failure is not fatal.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_IGNORE_OUTGOING,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETHERTYPE_DMFABRIC.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and the length matches it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(TransportError::io(
                format!("Cannot bind the AF_PACKET socket to {iface}"),
                io::Error::last_os_error(),
            ));
        }
        Ok(PacketTransport { fd, mac, buf: vec![0u8; FRAME_CAP].into_boxed_slice(), stats: TransportStats::default() })
    }
}

impl Transport for PacketTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Packet
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let mut n = 0;
        while n < max {
            // SAFETY: `buf` is valid for writes of its length; no address is requested.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if rc < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => {
                        self.stats.io_errors += 1;
                        break;
                    }
                }
            }
            let len = rc as usize;
            if len > self.buf.len() {
                // MSG_TRUNC reports the real length: too big for a dmfabric frame.
                self.stats.rx_dropped += 1;
                continue;
            }
            on_frame(&self.buf[..len]);
            n += 1;
        }
        self.stats.rx_frames += n as u64;
        Ok(n)
    }

    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError> {
        let mut sent = 0;
        for frame in batch.iter() {
            // SAFETY: `frame` is valid for reads of its length; the socket is bound,
            // so no destination address is needed.
            let rc = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
            if rc < 0 {
                self.stats.tx_dropped += 1;
                if io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                    self.stats.io_errors += 1;
                }
            } else {
                sent += 1;
            }
        }
        batch.clear();
        self.stats.tx_frames += sent as u64;
        Ok(sent)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        sys::poll_readable(self.fd.as_raw_fd(), timeout)
            .map_err(|e| TransportError::io("poll on the AF_PACKET socket failed", e))?;
        Ok(())
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn stats(&self) -> TransportStats {
        self.stats
    }
}
