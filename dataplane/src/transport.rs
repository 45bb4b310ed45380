//! The `Transport` trait: burst receive and transmit of whole Ethernet frames.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use dmfabric_wire::MacAddr;

use crate::batch::FrameBatch;

/// Which implementation a transport is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// AF_XDP through xsk-rs: the production transport.
    Xdp,
    /// AF_PACKET raw socket: the fallback where XDP is missing.
    Packet,
    /// UDP datagrams carrying the frames: the baseline.
    Udp,
    /// In-process rings: unit tests and single-process runs.
    Mem,
}

impl TransportKind {
    pub const ALL: [TransportKind; 4] =
        [TransportKind::Xdp, TransportKind::Packet, TransportKind::Udp, TransportKind::Mem];

    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Xdp => "xdp",
            TransportKind::Packet => "packet",
            TransportKind::Udp => "udp",
            TransportKind::Mem => "mem",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown transport `{s}`: expected one of xdp, packet, udp, mem"))
    }
}

/// Counters every transport keeps. Owned by the transport's core; read
/// with [`Transport::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames the transport could not queue for sending (ring full, no route).
    pub tx_dropped: u64,
    /// Frames dropped before they reached us (kernel ring full, fill ring
    /// empty, truncated), as far as the transport can tell.
    pub rx_dropped: u64,
    /// Send or receive calls that failed with an error other than "would block".
    pub io_errors: u64,
}

impl TransportStats {
    /// Field names and values, for printing and JSON.
    pub fn fields(&self) -> [(&'static str, u64); 5] {
        [
            ("rx_frames", self.rx_frames),
            ("tx_frames", self.tx_frames),
            ("tx_dropped", self.tx_dropped),
            ("rx_dropped", self.rx_dropped),
            ("io_errors", self.io_errors),
        ]
    }
}

/// Errors opening or driving a transport. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Privilege(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("No interface `{0}` in this network namespace: check the name with `ip link`")]
    NoSuchInterface(String),
    #[error("{0}")]
    Busy(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("The peer of this in-memory transport is gone")]
    Disconnected,
}

impl TransportError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        TransportError::Io { what: what.into(), source }
    }
}

/// Says whether a received frame is authentic, for transports that learn
/// where a peer is from what it sends (UDP): only a frame that passes may
/// tell where its source MAC lives.
pub type SenderCheck = Box<dyn FnMut(&[u8]) -> bool + Send>;

/// Burst receive and transmit of whole Ethernet frames.
///
/// A transport belongs to one core: methods take `&mut self`, never block
/// except [`Transport::wait`], and do not allocate per frame.
pub trait Transport: Send {
    fn kind(&self) -> TransportKind;

    /// The MAC this transport sends from (for UDP: a configured identity).
    fn mac(&self) -> MacAddr;

    /// Receive up to `max` frames (at most [`crate::MAX_BURST`]), calling
    /// `on_frame` for each; returns how many. Does not block.
    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError>;

    /// Send every frame of `batch` and clear it; returns how many were
    /// sent. Frames that could not be queued are counted in `tx_dropped`.
    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError>;

    /// Sleep until a frame may have arrived or `timeout` passed: the idle
    /// back-off of a poll loop.
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError>;

    /// A descriptor that polls readable when frames may have arrived, so
    /// another thread can sleep on it without owning the transport (a
    /// client's interrupt poller). None: no such descriptor (memory).
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }

    fn stats(&self) -> TransportStats;

    /// Learn peers' addresses only from frames `check` passes (transports
    /// that learn them: UDP; the others address by MAC and ignore it).
    fn check_senders(&mut self, check: SenderCheck) {
        let _ = check;
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn kind(&self) -> TransportKind {
        (**self).kind()
    }
    fn mac(&self) -> MacAddr {
        (**self).mac()
    }
    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        (**self).recv(max, on_frame)
    }
    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError> {
        (**self).send(batch)
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        (**self).wait(timeout)
    }
    fn wake_fd(&self) -> Option<RawFd> {
        (**self).wake_fd()
    }
    fn stats(&self) -> TransportStats {
        (**self).stats()
    }
    fn check_senders(&mut self, check: SenderCheck) {
        (**self).check_senders(check)
    }
}
