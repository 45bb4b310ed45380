//! The dmfabric data plane.
//!
//! Owns: the [`Transport`] trait (burst receive/transmit of whole Ethernet
//! frames) and its implementations — AF_XDP ([`xdp`]), AF_PACKET
//! ([`packet`]), UDP ([`udp`]), in-memory ([`mem`]) and a fault-injecting
//! wrapper ([`fault`]); the bounded-burst poll loop with buffered TX
//! ([`poll`]); the SPSC rings between cores ([`ring`]); and the test hosts
//! (network namespaces joined by veth, [`netns`]); how a reader off the
//! data plane gets a copy of a core's counters ([`observe`]).
//!
//! Does not own: what frames mean (that is `dmfabric-wire`) or what a
//! server or client does with them.
//!
//! `unsafe` is confined to `sys`, `packet`, `xdp` and `netns`.

pub mod batch;
pub mod fault;
pub mod hello;
pub mod mem;
pub mod netns;
pub mod observe;
pub mod packet;
pub mod poll;
pub mod reliable;
pub mod ring;
mod sys;
pub mod transport;
pub mod udp;
pub mod xdp;

pub use batch::FrameBatch;
pub use transport::{Transport, TransportError, TransportKind, TransportStats};

/// Largest frame a transport carries (the UMEM frame size).
pub const FRAME_CAP: usize = 2048;
/// Most frames handled in one burst.
pub const MAX_BURST: usize = 64;

pub use sys::{if_index, if_mac, poll_readable};

/// How to open one transport (everything but the in-memory one, which
/// comes in connected pairs from [`mem::pair`]).
#[derive(Debug, Clone)]
pub enum TransportSpec {
    Xdp(xdp::XdpConfig),
    Packet {
        iface: String,
    },
    Udp {
        local: std::net::SocketAddr,
        peer: Option<std::net::SocketAddr>,
        /// The MAC this endpoint uses as its identity inside frames.
        mac: dmfabric_wire::MacAddr,
    },
}

impl TransportSpec {
    pub fn kind(&self) -> TransportKind {
        match self {
            TransportSpec::Xdp(_) => TransportKind::Xdp,
            TransportSpec::Packet { .. } => TransportKind::Packet,
            TransportSpec::Udp { .. } => TransportKind::Udp,
        }
    }
}

/// Open the transport `spec` describes, in the calling thread's network namespace.
pub fn open(spec: &TransportSpec) -> Result<Box<dyn Transport>, TransportError> {
    Ok(match spec {
        TransportSpec::Xdp(cfg) => Box::new(xdp::XdpTransport::open(cfg)?),
        TransportSpec::Packet { iface } => Box::new(packet::PacketTransport::open(iface)?),
        TransportSpec::Udp { local, peer, mac } => Box::new(udp::UdpTransport::bind(*local, *peer, *mac)?),
    })
}
