//! `dmfabric server`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dmfabric_dataplane::poll::{self, Handler, PollConfig};
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode, XdpTransport, ZeroCopy};
use dmfabric_dataplane::{FrameBatch, Transport, TransportKind, TransportSpec};
use dmfabric_dm_workers::server::{
    DeviceSpec, Server, TEST_DEVICE_ID, TEST_DEVICE_MMIO, TEST_DEVICE_MMIO_LEN, TEST_DEVICE_PIO,
    TEST_DEVICE_PIO_LEN,
};
use dmfabric_wire::MacAddr;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Transport: xdp (AF_XDP), packet (AF_PACKET) or udp.
    #[arg(long, default_value = "xdp")]
    transport: TransportKind,
    /// Network interface to serve on (xdp, packet; for udp it gives the MAC identity).
    #[arg(long)]
    iface: Option<String>,
    /// This server's id; requests naming another server are Nacked.
    #[arg(long, default_value_t = 1)]
    server_id: u16,
    /// UDP address to bind (udp transport).
    #[arg(long, default_value = "0.0.0.0:47000")]
    udp_bind: SocketAddr,
    /// Where the XDP program runs: auto (native, else generic), native, generic.
    #[arg(long, default_value = "auto")]
    xdp_mode: XdpMode,
    /// AF_XDP zero-copy: auto (where the driver has it), on, off.
    #[arg(long, default_value = "auto")]
    zero_copy: ZeroCopy,
    /// NIC queue to bind the AF_XDP socket to.
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Fail instead of removing an XDP program left by a killed run.
    #[arg(long)]
    keep_stale_xdp: bool,
    /// Cores to run on, e.g. `1` or `2-3` (default: the last available core).
    #[arg(long)]
    cores: Option<String>,
    /// Never block when idle: lowest latency, one core at 100 %.
    #[arg(long)]
    busy_poll: bool,
    /// Empty polls before an idle server blocks (ignored with --busy-poll).
    #[arg(long, default_value_t = 200_000)]
    spin: u32,
    /// Print counters to stderr every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
    /// Print the final counters as one `stats-json: {...}` line on stdout.
    #[arg(long)]
    stats_json: bool,
}

/// The server plus periodic reporting, as a poll-loop handler.
struct Reporting {
    server: Server,
    every: Option<Duration>,
    next: Instant,
}

impl Handler for Reporting {
    fn on_frame(&mut self, frame: &[u8], tx: &mut FrameBatch, now: Instant) {
        self.server.on_frame(frame, tx, now);
    }

    fn on_poll(&mut self, _tx: &mut FrameBatch, now: Instant) {
        if let Some(every) = self.every {
            if now >= self.next {
                self.next = now + every;
                eprintln!("dmfabric server: {}", self.server.stats());
            }
        }
    }
}

pub fn run(args: ServerArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let available = dmfabric_pinning::available_cores();
    let core = match &args.cores {
        Some(list) => {
            let cores = dmfabric_pinning::parse_core_list(list)?;
            dmfabric_pinning::check_allowed(&cores, &available)?;
            cores[0]
        }
        None => *available.last().unwrap_or(&0),
    };
    dmfabric_pinning::pin_current(core)?;

    let spec = match args.transport {
        TransportKind::Xdp | TransportKind::Packet => {
            let Some(iface) = args.iface.clone() else {
                bail!("--iface is required with --transport {}", args.transport)
            };
            if args.transport == TransportKind::Xdp {
                let mut cfg = XdpConfig::new(iface);
                cfg.mode = args.xdp_mode;
                cfg.zero_copy = args.zero_copy;
                cfg.queue = args.queue;
                cfg.clear_stale_program = !args.keep_stale_xdp;
                TransportSpec::Xdp(cfg)
            } else {
                TransportSpec::Packet { iface }
            }
        }
        TransportKind::Udp => {
            let mac = match &args.iface {
                Some(i) => dmfabric_dataplane::if_mac(i)
                    .with_context(|| format!("Cannot read the MAC of {i}"))?,
                None => MacAddr([
                    0x02,
                    0xdf,
                    0,
                    0,
                    (args.server_id >> 8) as u8,
                    args.server_id as u8,
                ]),
            };
            TransportSpec::Udp {
                local: args.udp_bind,
                peer: None,
                mac,
            }
        }
        TransportKind::Mem => {
            bail!("--transport mem exists only inside one process (bench --transport mem)")
        }
    };
    let (mut transport, description) = open_transport(&spec)?;
    let devices = [DeviceSpec::test_device()];
    let server = Server::new(args.server_id, transport.mac(), &devices);
    let where_ = match &spec {
        TransportSpec::Udp { local, .. } => format!("udp {local}"),
        _ => format!("{description} on {}", args.iface.as_deref().unwrap_or("?")),
    };
    println!(
        "dmfabric server ready: server {} ({where_}, mac {}) on core {core}; test device {TEST_DEVICE_ID}: ports {:#x}-{:#x}, mmio {:#x}-{:#x}",
        args.server_id,
        transport.mac(),
        TEST_DEVICE_PIO,
        TEST_DEVICE_PIO + (TEST_DEVICE_PIO_LEN - 1),
        TEST_DEVICE_MMIO,
        TEST_DEVICE_MMIO + u64::from(TEST_DEVICE_MMIO_LEN - 1)
    );
    let every = (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    let mut handler = Reporting {
        server,
        every,
        next: Instant::now() + every.unwrap_or_default(),
    };
    let cfg = PollConfig {
        spin: if args.busy_poll { u32::MAX } else { args.spin },
        ..PollConfig::default()
    };
    let result = poll::run(&mut transport, &mut handler, cfg, &stop);
    let stats = handler.server.stats();
    eprintln!("dmfabric server: {stats}");
    let t = transport.stats();
    eprintln!(
        "dmfabric server: transport {}: rx {} tx {} rx-dropped {} tx-dropped {} io-errors {}",
        transport.kind(),
        t.rx_frames,
        t.tx_frames,
        t.rx_dropped,
        t.tx_dropped,
        t.io_errors
    );
    if args.stats_json {
        println!(
            "stats-json: {}",
            serde_json::json!({ "server": stats, "transport": {
            "rx_frames": t.rx_frames, "tx_frames": t.tx_frames, "rx_dropped": t.rx_dropped,
            "tx_dropped": t.tx_dropped, "io_errors": t.io_errors } })
        );
    }
    result.context("The data plane stopped")?;
    Ok(())
}

/// Open the transport; returns it with a description of how it attached.
fn open_transport(spec: &TransportSpec) -> anyhow::Result<(Box<dyn Transport>, String)> {
    Ok(match spec {
        TransportSpec::Xdp(cfg) => {
            let t = XdpTransport::open(cfg)?;
            if let Some(removed) = t.removed_stale_program() {
                eprintln!("dmfabric server: {removed}");
            }
            let d = format!("AF_XDP, {}", t.attachment());
            (Box::new(t), d)
        }
        TransportSpec::Packet { .. } => (dmfabric_dataplane::open(spec)?, "AF_PACKET".into()),
        TransportSpec::Udp { .. } => (dmfabric_dataplane::open(spec)?, "UDP".into()),
    })
}
