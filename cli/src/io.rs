//! `dmfabric io`: talk to a running server over the wire as a given client
//! platform and VM, read or write device registers, and print the
//! completions and any interrupt frames that arrive.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpMode};
use dmfabric_dataplane::{TransportKind, TransportSpec};
use dmfabric_vmm_shim::devmap::{DeviceMap, Remote, Target, ANY_DEVICE};
use dmfabric_vmm_shim::kvm::Exit;
use dmfabric_vmm_shim::kvm::{IrqSink, KvmError};
use dmfabric_vmm_shim::remote::{ClientConfig, ClientPort, VmEntry};
use dmfabric_wire::{AccessSize, Direction, IrqSource, MacAddr, Space, Status, Trigger};

#[derive(Debug, Args)]
pub struct IoArgs {
    /// Transport: xdp, packet or udp.
    #[arg(long, default_value = "xdp")]
    transport: TransportKind,
    /// Interface of the link to the server.
    #[arg(long)]
    iface: Option<String>,
    /// Where the XDP program runs: auto, native, generic.
    #[arg(long, default_value = "auto")]
    xdp_mode: XdpMode,
    /// With --transport udp: the server's address and ours.
    #[arg(long)]
    udp_peer: Option<std::net::SocketAddr>,
    #[arg(long, default_value = "127.0.0.1:47000")]
    udp_bind: std::net::SocketAddr,
    /// The server to talk to.
    #[arg(long, default_value_t = 1)]
    server_id: u16,
    /// The key file of the client platform to speak as (the server must
    /// list that platform; `dmfabric keygen` makes one).
    #[arg(long)]
    key_file: PathBuf,
    /// The client platform id to speak as [default: the key file's].
    #[arg(long)]
    client: Option<u16>,
    #[arg(long, default_value_t = 1)]
    hypervisor: u16,
    /// The VM to speak for: the server routes to that VM's devices.
    #[arg(long, default_value_t = 1)]
    vm: u32,
    #[arg(long, default_value_t = 0)]
    vcpu: u16,
    /// The device id; 0 lets the server pick the VM's device at the address.
    #[arg(long, default_value_t = 0)]
    device: u32,
    /// One access per line, `r|w pio|mmio ADDR SIZE [VALUE]` (# comments);
    /// `-` reads stdin.
    #[arg(long)]
    script: Option<PathBuf>,
    /// After the last access, keep printing interrupts this long.
    #[arg(long, default_value_t = 100)]
    linger_ms: u64,
    #[arg(long, default_value_t = 20)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 4)]
    retries: u32,
    /// One access: `read pio 0x3fd 1` or `write mmio 0xd0000000 4 0x1`.
    access: Vec<String>,
}

/// One register access to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub dir: Direction,
    pub space: Space,
    pub addr: u64,
    pub size: AccessSize,
    pub value: u64,
}

/// A decimal or 0x-hex number, as registers and addresses are written.
pub fn number(s: &str) -> anyhow::Result<u64> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| anyhow::anyhow!("{s:?} is not a number (decimal or 0x hex)"))
}

/// Parse `r|w|read|write pio|mmio ADDR SIZE [VALUE]`.
pub fn parse_access(words: &[&str]) -> anyhow::Result<Access> {
    let dir = match words.first().copied() {
        Some("r" | "read") => Direction::Read,
        Some("w" | "write") => Direction::Write,
        Some(other) => bail!("{other:?}: expected r/read or w/write"),
        None => bail!("empty access"),
    };
    let space = match words.get(1).copied() {
        Some("pio") => Space::Pio,
        Some("mmio") => Space::Mmio,
        Some(other) => bail!("{other:?}: expected pio or mmio"),
        None => bail!("missing pio|mmio"),
    };
    let addr = number(words.get(2).context("missing the address")?)?;
    let bytes = number(words.get(3).context("missing the size (1, 2, 4 or 8)")?)?;
    let size = u8::try_from(bytes).ok().and_then(|b| AccessSize::new(b, space)).with_context(|| {
        format!("size {bytes}: {space:?} accesses are 1, 2, 4{} bytes", if space == Space::Mmio { " or 8" } else { "" })
    })?;
    if space == Space::Pio && addr > 0xffff {
        bail!("port {addr:#x} is past 0xffff");
    }
    let value = match (dir, words.get(4)) {
        (Direction::Write, Some(v)) => number(v)?,
        (Direction::Write, None) => bail!("a write needs a value"),
        (Direction::Read, Some(v)) => bail!("a read takes no value ({v:?})"),
        (Direction::Read, None) => 0,
    };
    if words.len() > 5 {
        bail!("too many words: {:?}", &words[5..]);
    }
    if value & !size.mask() != 0 {
        bail!("value {value:#x} does not fit {} bytes", size.bytes());
    }
    Ok(Access { dir, space, addr, size, value })
}

/// Prints interrupts as they are delivered.
struct Printer(Mutex<Vec<String>>);

impl IrqSink for Printer {
    fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), KvmError> {
        let what = match source {
            IrqSource::Line(n) => format!("line {n}"),
            IrqSource::Msi { address, data } => format!("msi {address:#x}/{data:#x}"),
        };
        let how = match trigger {
            Trigger::Edge => "edge".to_string(),
            Trigger::Level { asserted: true } => "level high".to_string(),
            Trigger::Level { asserted: false } => "level low".to_string(),
        };
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(format!("interrupt {what} {how}"));
        Ok(())
    }
}

impl Printer {
    fn flush(&self) {
        for line in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            println!("{line}");
        }
    }
}

fn show(a: &Access) -> String {
    let space = if a.space == Space::Pio { "pio" } else { "mmio" };
    match a.dir {
        Direction::Read => format!("read {space} {:#x} {}", a.addr, a.size.bytes()),
        Direction::Write => format!("write {space} {:#x} {} {:#x}", a.addr, a.size.bytes(), a.value),
    }
}

pub fn run(args: IoArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut accesses = Vec::new();
    if !args.access.is_empty() {
        let words: Vec<&str> = args.access.iter().map(String::as_str).collect();
        accesses.push(parse_access(&words)?);
    }
    if let Some(path) = &args.script {
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(path).with_context(|| format!("Cannot read {}", path.display()))?,
            ))
        };
        for (n, line) in reader.lines().enumerate() {
            let line = line.context("Cannot read the script")?;
            let line = line.split('#').next().unwrap_or("").trim().to_string();
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            accesses.push(parse_access(&words).with_context(|| format!("script line {}", n + 1))?);
        }
    }
    if accesses.is_empty() {
        bail!("nothing to do: give an access (read pio 0x3fd 1) or --script FILE");
    }
    let key = dmfabric_control::keys::KeyFile::load(&args.key_file)?;
    let client = args.client.unwrap_or(key.client);
    if client != key.client {
        bail!("--client {client}: the key file {} is client platform {}'s", args.key_file.display(), key.client);
    }
    let spec = match args.transport {
        TransportKind::Xdp => {
            let Some(iface) = args.iface.clone() else { bail!("--iface is required with --transport xdp") };
            let mut x = XdpConfig::new(iface);
            x.mode = args.xdp_mode;
            TransportSpec::Xdp(x)
        }
        TransportKind::Packet => {
            let Some(iface) = args.iface.clone() else { bail!("--iface is required with --transport packet") };
            TransportSpec::Packet { iface }
        }
        TransportKind::Udp => {
            let Some(peer) = args.udp_peer else { bail!("--udp-peer is required with --transport udp") };
            let mac = MacAddr([0x02, 0xd1, 0, 0, (client >> 8) as u8, client as u8]);
            TransportSpec::Udp { local: args.udp_bind, peer: Some(peer), mac }
        }
        TransportKind::Mem => bail!("--transport mem exists only inside one process"),
    };
    let t = dmfabric_dataplane::open(&spec)?;
    let printer = Arc::new(Printer(Mutex::new(Vec::new())));
    let cfg = ClientConfig {
        client,
        hypervisor: args.hypervisor,
        servers: vec![args.server_id],
        retry: Retry { timeout: Duration::from_millis(args.timeout_ms.max(1)), retries: args.retries },
        hello_timeout: Duration::from_secs(3),
        sealer: dmfabric_dataplane::hello::Sealer::new(key.ring()?),
        open_on_demand: false,
    };
    // What the VM may be sent: any line of any device on the server (this
    // tool prints them; a VM's map names its devices' lines).
    let target = Remote::new(args.server_id, args.device).lines(&(0..24).collect::<Vec<u32>>()).resets();
    let mut map = DeviceMap::default();
    map.add(Space::Pio, 0, 1 << 16, Target::Remote(Remote { device: ANY_DEVICE, ..target }))?;
    let map = Arc::new(dmfabric_vmm_shim::exits::LiveMap::from_pointee(map));
    let vms = [VmEntry { id: args.vm, vcpus: args.vcpu.saturating_add(1), irq: printer.clone(), map, ram: None }];
    let port = Arc::new(ClientPort::connect(t, &cfg, &vms)?);
    let mut vcpu = port.vcpu(args.vm, args.vcpu, None)?;
    let mut failed = 0;
    for a in &accesses {
        if stop.load(Ordering::Relaxed) {
            bail!("Interrupted");
        }
        let exit = Exit { space: a.space, addr: a.addr, size: a.size, dir: a.dir, data: a.value };
        match vcpu.access_status(&target, &exit) {
            Ok((data, status)) => {
                let note = if status == Status::Unclaimed { " (no such register: unclaimed)" } else { "" };
                match a.dir {
                    Direction::Read => println!("{} = {data:#x}{note}", show(a)),
                    Direction::Write => println!("{} ok{note}", show(a)),
                }
            }
            Err(e) => {
                failed += 1;
                println!("{} failed: {e}", show(a));
            }
        }
        printer.flush();
    }
    let end = Instant::now() + Duration::from_millis(args.linger_ms);
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        port.poll_once()?;
        printer.flush();
        std::thread::sleep(Duration::from_millis(1));
    }
    printer.flush();
    if failed > 0 {
        bail!("{failed} of {} accesses failed", accesses.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_parse_and_bad_ones_say_why() {
        let a = parse_access(&["read", "pio", "0x3fd", "1"]).unwrap();
        assert_eq!((a.dir, a.space, a.addr, a.size), (Direction::Read, Space::Pio, 0x3fd, AccessSize::B1));
        let w = parse_access(&["w", "mmio", "0xd0000000", "4", "0x1"]).unwrap();
        assert_eq!(
            (w.dir, w.space, w.addr, w.size, w.value),
            (Direction::Write, Space::Mmio, 0xd000_0000, AccessSize::B4, 1)
        );
        let err = |w: &[&str]| parse_access(w).unwrap_err().to_string();
        assert!(err(&["peek", "pio", "1", "1"]).contains("r/read or w/write"));
        assert!(err(&["r", "io", "1", "1"]).contains("pio or mmio"));
        assert!(err(&["r", "pio", "0x3f8", "8"]).contains("1, 2, 4 bytes"));
        assert!(err(&["w", "pio", "0x3f8", "1"]).contains("needs a value"));
        assert!(err(&["w", "pio", "0x3f8", "1", "0x100"]).contains("does not fit"));
        assert!(err(&["r", "pio", "0x10000", "1"]).contains("past 0xffff"));
        assert!(err(&["r", "pio", "zz", "1"]).contains("not a number"));
    }
}
