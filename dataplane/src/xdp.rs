//! AF_XDP transport through xsk-rs: the production transport.
//!
//! One socket on one (interface, queue), its own UMEM split in two halves:
//! receive frames circulate between the fill ring and the RX ring, transmit
//! frames between a free list, the TX ring and the completion ring. Both
//! attach modes (native/driver and generic/SKB) and both bind modes
//! (zero-copy where the driver has it, copy otherwise) are supported; `Auto`
//! tries the fastest first. On veth only copy mode exists.
//!
//! The XDP program that steers frames to the socket is dmfabric's own by
//! default ([`XdpProgram::Dmfabric`], `bpf/dmfabric_xsk.c`): it redirects
//! only EtherType 0x88B5 frames and passes every other frame to the kernel,
//! so the interface stays usable for ARP, IPv6, SSH and the control panel's
//! TCP. It is loaded through libxdp (its dispatcher, where bpffs is mounted,
//! lets other XDP programs run beside it) and detached when the transport
//! drops. libxdp's default program, which takes every frame of the queue,
//! stays selectable for comparison ([`XDP_PROG_ENV`]).

use std::ffi::{c_void, CStr};
use std::fmt;
use std::io::{self, Write};
use std::num::NonZeroU32;
use std::process::Command;
use std::time::Duration;

use dmfabric_wire::MacAddr;
use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use crate::batch::FrameBatch;
use crate::sys;
use crate::transport::{Transport, TransportError, TransportKind, TransportStats};
use crate::MAX_BURST;

/// Name of the program libxdp loads for AF_XDP sockets, and of its dispatcher.
const LIBXDP_XSK_PROG: &str = "xsk_def_prog";
const LIBXDP_DISPATCHER: &str = "xdp_dispatcher";
/// Name of dmfabric's own program (its function in `bpf/dmfabric_xsk.c`).
pub const DMFABRIC_XDP_PROG: &str = "dmfabric_xsk";

/// dmfabric's XDP program, built by build.rs from `bpf/dmfabric_xsk.c`.
/// Aligned so that libbpf may read the ELF headers in place.
static DMFABRIC_XDP_OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/dmfabric_xsk.o")));

#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

/// Environment variable that picks the XDP program when the configuration
/// does not ([`XdpConfig::program`] is `None`): `dmfabric` or `default`.
pub const XDP_PROG_ENV: &str = "DMFABRIC_XDP_PROG";

/// Frames the kernel sends per TX kick in copy mode.
const COPY_MODE_TX_BATCH: usize = 32;

/// Where the XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Native first, generic if the driver has no XDP; generic first on
    /// veth, where copy-mode native XDP measured slower (README, bench rtt).
    Auto,
    /// Generic (SKB) mode: works on every interface, slower.
    Generic,
    /// Native (driver) mode.
    Native,
}

impl std::str::FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(XdpMode::Auto),
            "generic" | "skb" => Ok(XdpMode::Generic),
            "native" | "drv" => Ok(XdpMode::Native),
            _ => Err(format!("unknown XDP mode `{s}`: expected auto, generic or native")),
        }
    }
}

/// Whether to bind in zero-copy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Zero-copy where the driver supports it, copy otherwise.
    Auto,
    Off,
    On,
}

impl std::str::FromStr for ZeroCopy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ZeroCopy::Auto),
            "off" | "copy" => Ok(ZeroCopy::Off),
            "on" | "zc" => Ok(ZeroCopy::On),
            _ => Err(format!("unknown zero-copy setting `{s}`: expected auto, on or off")),
        }
    }
}

/// The XDP program that steers received frames to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpProgram {
    /// dmfabric's own: EtherType 0x88B5 frames (malformed ones too) go to
    /// the socket, every other frame to the kernel stack.
    Dmfabric,
    /// libxdp's default program: every frame of the queue goes to the
    /// socket, so nothing else can use the interface (for comparison).
    LibxdpDefault,
}

impl std::str::FromStr for XdpProgram {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dmfabric" => Ok(XdpProgram::Dmfabric),
            "default" | "libxdp" => Ok(XdpProgram::LibxdpDefault),
            _ => Err(format!("unknown XDP program `{s}`: expected dmfabric or default")),
        }
    }
}

impl fmt::Display for XdpProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpProgram::Dmfabric => "dmfabric",
            XdpProgram::LibxdpDefault => "default",
        })
    }
}

impl XdpProgram {
    /// The program [`XDP_PROG_ENV`] names; dmfabric's own if it is unset.
    pub fn from_env() -> Result<XdpProgram, String> {
        match std::env::var(XDP_PROG_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(XdpProgram::Dmfabric),
            Ok(v) if v.is_empty() => Ok(XdpProgram::Dmfabric),
            Ok(v) => v.parse().map_err(|e| format!("{XDP_PROG_ENV}: {e}")),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{XDP_PROG_ENV} is not UTF-8: set it to dmfabric or default"))
            }
        }
    }
}

/// How to open an AF_XDP transport.
#[derive(Debug, Clone)]
pub struct XdpConfig {
    pub iface: String,
    pub queue: u32,
    pub mode: XdpMode,
    pub zero_copy: ZeroCopy,
    /// UMEM frames (half receive, half transmit); a power of two.
    pub frames: u32,
    /// Remove a program left on the interface by a killed dmfabric run.
    pub clear_stale_program: bool,
    /// The XDP program; `None`: the one [`XDP_PROG_ENV`] names, dmfabric's
    /// own if it is unset.
    pub program: Option<XdpProgram>,
}

impl XdpConfig {
    pub fn new(iface: impl Into<String>) -> Self {
        XdpConfig {
            iface: iface.into(),
            queue: 0,
            mode: XdpMode::Auto,
            zero_copy: ZeroCopy::Auto,
            frames: 1024,
            clear_stale_program: true,
            program: None,
        }
    }
}

/// How the socket ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    pub native: bool,
    pub zero_copy: bool,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mode, {}",
            if self.native { "native" } else { "generic" },
            if self.zero_copy { "zero-copy" } else { "copy" }
        )
    }
}

pub struct XdpTransport {
    // Field order is drop order: the program first (frames stop coming),
    // then the queues (which hold the socket), then the UMEM.
    program: Option<OwnProgram>,
    tx_q: TxQueue,
    rx_q: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    umem: Umem,
    rx_descs: Vec<FrameDesc>,
    tx_free: Vec<FrameDesc>,
    tx_pending: Vec<FrameDesc>,
    comp_descs: Vec<FrameDesc>,
    mac: MacAddr,
    attachment: Attachment,
    removed_stale: Option<String>,
    stats: TransportStats,
}

impl fmt::Debug for XdpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpTransport")
            .field("mac", &self.mac)
            .field("attachment", &self.attachment)
            .field("program", &self.program())
            .finish()
    }
}

const PRIVILEGE_HINT: &str = "run as root or use --transport packet";

impl XdpTransport {
    /// Open an AF_XDP socket on `cfg.iface` in the calling thread's network namespace.
    pub fn open(cfg: &XdpConfig) -> Result<Self, TransportError> {
        let missing = sys::missing_capabilities(&[
            (sys::CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (sys::CAP_NET_RAW, "CAP_NET_RAW"),
            (sys::CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        ]);
        if !missing.is_empty() {
            return Err(TransportError::Privilege(format!(
                "AF_XDP needs CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_ADMIN (missing {}): {PRIVILEGE_HINT}",
                missing.join(", ")
            )));
        }
        if !cfg.frames.is_power_of_two() || cfg.frames < 2 * MAX_BURST as u32 {
            return Err(TransportError::Unsupported(format!(
                "AF_XDP UMEM frames must be a power of two of at least {}, not {}",
                2 * MAX_BURST,
                cfg.frames
            )));
        }
        let program = match cfg.program {
            Some(p) => p,
            None => XdpProgram::from_env().map_err(TransportError::Unsupported)?,
        };
        sys::raise_memlock_limit();
        quiet_libxdp();
        let ifindex = sys::if_index(&cfg.iface).ok_or_else(|| TransportError::NoSuchInterface(cfg.iface.clone()))?;
        let mac = sys::if_mac(&cfg.iface)
            .map_err(|e| TransportError::io(format!("Cannot read the MAC of {}", cfg.iface), e))?;

        // Someone else's program is never touched.
        if let Some(prog) = attached_program(ifindex) {
            if !prog.is_libxdp() {
                return Err(TransportError::Busy(format!(
                    "{} already has XDP program `{}` (id {}) that dmfabric did not load: detach it with `ip link set dev {} xdp off`, or use --transport packet",
                    cfg.iface, prog.name, prog.id, cfg.iface
                )));
            }
        }
        // libxdp's own program may be a leftover of a killed run; whether
        // libxdp would replace it or fail with EBUSY depends on its version
        // and on bpffs, so decide here: leftover if no socket holds the queue.
        let removed = if cfg.clear_stale_program { clear_stale_program(cfg, ifindex)? } else { None };
        let mut t =
            retry_busy(|| Self::open_any_mode(cfg, mac, program, ifindex)).map_err(|e| explain_open_error(cfg, e))?;
        if let Some(what) = &removed {
            tracing::warn!(iface = %cfg.iface, "{what}");
        }
        tracing::info!(iface = %cfg.iface, queue = cfg.queue, %mac, attachment = %t.attachment(), %program, "AF_XDP socket bound");
        t.removed_stale = removed;
        Ok(t)
    }

    fn open_any_mode(cfg: &XdpConfig, mac: MacAddr, program: XdpProgram, ifindex: u32) -> Result<Self, io::Error> {
        let natives: &[bool] = match cfg.mode {
            XdpMode::Auto if sys::if_driver(&cfg.iface).as_deref() == Some("veth") => &[false, true],
            XdpMode::Auto => &[true, false],
            XdpMode::Native => &[true],
            XdpMode::Generic => &[false],
        };
        let zcs: &[bool] = match cfg.zero_copy {
            ZeroCopy::Auto => &[true, false],
            ZeroCopy::On => &[true],
            ZeroCopy::Off => &[false],
        };
        let mut last_err = None;
        for &native in natives {
            for &zc in zcs {
                if zc && !native {
                    continue; // generic mode is always copy mode
                }
                match Self::try_open(cfg, mac, Attachment { native, zero_copy: zc }, Some((program, ifindex))) {
                    Ok(t) => return Ok(t),
                    // Busy is busy in every mode: stop trying.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)) => return Err(e),
                    Err(e) => last_err = Some(e),
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no attach mode to try")))
    }

    /// `program`: the XDP program to attach and the interface's index;
    /// `None` binds without any program, only to learn whether a socket
    /// already holds the queue (a probe).
    fn try_open(
        cfg: &XdpConfig,
        mac: MacAddr,
        att: Attachment,
        program: Option<(XdpProgram, u32)>,
    ) -> Result<Self, io::Error> {
        let half = cfg.frames / 2;
        let ring = QueueSize::new(half).map_err(|e| io::Error::other(e.to_string()))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(2048).map_err(|e| io::Error::other(e.to_string()))?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let frames = NonZeroU32::new(cfg.frames).ok_or_else(|| io::Error::other("zero UMEM frames"))?;
        let (umem, mut descs) = Umem::new(umem_cfg, frames, false).map_err(source_io)?;

        let mut xdp_flags = XdpFlags::empty();
        xdp_flags |= if att.native { XdpFlags::XDP_FLAGS_DRV_MODE } else { XdpFlags::XDP_FLAGS_SKB_MODE };
        // Copy mode: the kernel fills the RX ring from the network stack and
        // sends during our TX kick, so wake-up flags would only add checks to
        // every poll. Zero-copy drivers sleep: there they pay off.
        let bind_flags =
            if att.zero_copy { BindFlags::XDP_ZEROCOPY | BindFlags::XDP_USE_NEED_WAKEUP } else { BindFlags::XDP_COPY };
        // libxdp loads its default program only when asked for; dmfabric's
        // own is attached below, once the socket is bound.
        let mut libxdp_flags = LibxdpFlags::empty();
        if program.map(|(p, _)| p) != Some(XdpProgram::LibxdpDefault) {
            libxdp_flags |= LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD;
        }
        let sock_cfg = SocketConfig::builder()
            .libxdp_flags(libxdp_flags)
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .xdp_flags(xdp_flags)
            .bind_flags(bind_flags)
            .build();
        let iface: Interface = cfg.iface.parse().map_err(|_| io::Error::other("interface name contains NUL"))?;
        // SAFETY: the UMEM is new and used by this socket only, so the
        // shared-UMEM contract of `Socket::new` does not apply.
        let (tx_q, rx_q, fq_cq) = unsafe { Socket::new(sock_cfg, &umem, &iface, cfg.queue) }.map_err(source_io)?;
        let (mut fq, cq) = fq_cq.ok_or_else(|| io::Error::other("libxdp returned no fill/completion queue"))?;
        let own = match program {
            Some((XdpProgram::Dmfabric, ifindex)) => {
                use std::os::fd::AsRawFd;
                Some(OwnProgram::attach(ifindex, cfg.queue, att.native, rx_q.fd().as_raw_fd())?)
            }
            _ => None,
        };

        let tx_free = descs.split_off(half as usize);
        // SAFETY: the descriptors came from this UMEM and none is in use.
        let filled = unsafe { fq.produce(&descs) };
        if filled != descs.len() {
            return Err(io::Error::other("fill queue took fewer frames than it has slots"));
        }
        let blank = tx_free[0];
        Ok(XdpTransport {
            program: own,
            tx_q,
            rx_q,
            fq,
            cq,
            umem,
            rx_descs: vec![blank; MAX_BURST],
            tx_pending: Vec::with_capacity(MAX_BURST),
            comp_descs: vec![blank; half as usize],
            tx_free,
            mac,
            attachment: att,
            removed_stale: None,
            stats: TransportStats::default(),
        })
    }

    /// How the socket is attached.
    pub fn attachment(&self) -> Attachment {
        self.attachment
    }

    /// The XDP program steering frames to this socket.
    pub fn program(&self) -> XdpProgram {
        if self.program.is_some() {
            XdpProgram::Dmfabric
        } else {
            XdpProgram::LibxdpDefault
        }
    }

    /// The stale program this open removed, if any (for the log).
    pub fn removed_stale_program(&self) -> Option<&str> {
        self.removed_stale.as_deref()
    }

    fn reclaim_tx(&mut self) {
        // SAFETY: completion descriptors are frames of this UMEM that the
        // kernel has finished sending.
        let n = unsafe { self.cq.consume(&mut self.comp_descs) };
        self.tx_free.extend_from_slice(&self.comp_descs[..n]);
    }

    fn kick_tx(&mut self, queued: usize) {
        // In copy mode the kernel sends during the syscall, at most 32
        // frames per call: kick until the ring is drained (bounded).
        let ring_size = self.comp_descs.len() as u32;
        let kicks = queued.div_ceil(COPY_MODE_TX_BATCH) + 2;
        for _ in 0..kicks {
            if (!self.attachment.zero_copy || self.tx_q.needs_wakeup()) && self.tx_q.wakeup().is_err() {
                self.stats.io_errors += 1;
            }
            if self.attachment.zero_copy || self.tx_q.nb_free_exact() == ring_size {
                break;
            }
        }
    }
}

/// The kernel releases a closed AF_XDP socket's queue asynchronously, so a
/// bind right after a close (or a killed process) can briefly fail with
/// EBUSY. Retry for up to a second; a queue held by a live socket stays busy.
fn retry_busy<T>(mut f: impl FnMut() -> Result<T, io::Error>) -> Result<T, io::Error> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn source_io<E: std::error::Error>(e: E) -> io::Error {
    let msg = e.to_string();
    let code = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<io::Error>()).and_then(|s| s.raw_os_error());
    match code {
        Some(c) => io::Error::from_raw_os_error(c),
        None => io::Error::other(msg),
    }
}

fn explain_open_error(cfg: &XdpConfig, err: io::Error) -> TransportError {
    let iface = &cfg.iface;
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TransportError::Privilege(format!(
            "AF_XDP on {iface} was refused (EPERM): it needs CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_ADMIN; {PRIVILEGE_HINT}"
        )),
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => TransportError::Privilege(format!(
            "AF_XDP could not lock its UMEM memory on {iface}: raise `ulimit -l` (RLIMIT_MEMLOCK) or grant CAP_IPC_LOCK, or use --transport packet"
        )),
        Some(libc::EBUSY) | Some(libc::EEXIST) => TransportError::Busy(format!(
            "{iface} queue {} is busy: another AF_XDP socket or XDP program holds it (see `ss -a --xdp` and `ip link show {iface}`); stop it, or detach with `ip link set dev {iface} xdp off`",
            cfg.queue
        )),
        Some(libc::EAFNOSUPPORT) | Some(libc::ENOPROTOOPT) => TransportError::Unsupported(
            "This kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS): use --transport packet".into(),
        ),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => TransportError::Unsupported(format!(
            "{iface} does not support the requested XDP mode ({:?}, zero-copy {:?}): try --xdp-mode generic --zero-copy off, or --transport packet",
            cfg.mode, cfg.zero_copy
        )),
        Some(libc::EINTR) => TransportError::io(format!("AF_XDP socket creation on {iface} was interrupted"), err),
        _ => TransportError::io(format!("Cannot create an AF_XDP socket on {iface} queue {}", cfg.queue), err),
    }
}

/// libxdp and libbpf print warnings on stderr (for example that bpffs is not
/// mounted and the dispatcher is skipped, which is expected on test hosts).
/// Our errors carry the errno and a hint instead, so silence them unless
/// DMFABRIC_LIBXDP_DEBUG is set.
fn quiet_libxdp() {
    if std::env::var_os("DMFABRIC_LIBXDP_DEBUG").is_some() {
        return;
    }
    // SAFETY: setting the print callbacks to NULL disables printing; both
    // calls only store a function pointer.
    unsafe {
        libxdp_sys::libxdp_set_print(None);
        libbpf_sys::libbpf_set_print(None);
    }
}

/// If `cfg.iface` carries libxdp's AF_XDP program and no socket holds the
/// queue (a bind that loads no program succeeds), the program was left by a
/// killed run: detach it. If a socket holds the queue, refuse.
/// Returns a description of what was removed.
fn clear_stale_program(cfg: &XdpConfig, ifindex: u32) -> Result<Option<String>, TransportError> {
    let iface = &cfg.iface;
    let Some(prog) = attached_program(ifindex) else {
        return Ok(None);
    };
    let generic_copy = Attachment { native: false, zero_copy: false };
    let probe = retry_busy(|| XdpTransport::try_open(cfg, MacAddr::default(), generic_copy, None));
    match probe {
        Ok(probe) => drop(probe),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(TransportError::Busy(format!(
                "{iface} queue {} is in use by another AF_XDP socket (a running dmfabric server?): stop it or use another interface or queue",
                cfg.queue
            )))
        }
        Err(e) => return Err(explain_open_error(cfg, e)),
    }
    // Nothing holds the queue: the program is a leftover of a killed run.
    // Behind libxdp's dispatcher, take out only dmfabric's or libxdp's
    // AF_XDP program, never another program sharing the dispatcher.
    if prog.name == LIBXDP_DISPATCHER {
        return Ok(detach_from_dispatcher(ifindex).map(|removed| {
            format!("removed leftover XDP program {removed} from {iface}'s dispatcher, left by a run that was killed")
        }));
    }
    for mode in ["xdp", "xdpgeneric", "xdpdrv"] {
        let _ = Command::new("ip")
            .args(["link", "set", "dev", iface, mode, "off"])
            .stderr(std::process::Stdio::null())
            .status();
    }
    if attached_program(ifindex).is_some() {
        return Err(TransportError::Busy(format!(
            "{iface} has a leftover XDP program `{}` (id {}) that could not be removed: run `ip link set dev {iface} xdp off`",
            prog.name, prog.id
        )));
    }
    Ok(Some(format!(
        "removed leftover XDP program `{}` (id {}) from {iface}, left by a run that was killed",
        prog.name, prog.id
    )))
}

#[derive(Debug)]
struct AttachedProgram {
    name: String,
    id: u32,
}

impl AttachedProgram {
    /// dmfabric's program, or one loaded by libxdp for AF_XDP sockets (ours
    /// or another AF_XDP user's), or libxdp's dispatcher.
    fn is_libxdp(&self) -> bool {
        is_xsk_program(&self.name) || self.name == LIBXDP_DISPATCHER
    }
}

/// A program that steers frames to AF_XDP sockets for dmfabric: its own,
/// or libxdp's default.
fn is_xsk_program(name: &str) -> bool {
    name == DMFABRIC_XDP_PROG || name == LIBXDP_XSK_PROG
}

/// Detach every [`is_xsk_program`] program from the libxdp dispatcher on
/// `ifindex`, leaving the dispatcher's other programs in place. Returns
/// what was removed (`None`: nothing was).
fn detach_from_dispatcher(ifindex: u32) -> Option<String> {
    let mut removed = Vec::new();
    // SAFETY: libxdp returns NULL, an error pointer or a multiprog we own
    // and close below; the programs it yields live as long as it does.
    unsafe {
        let mp = libxdp_sys::xdp_multiprog__get_from_ifindex(ifindex as i32);
        if mp.is_null() || libxdp_sys::libxdp_get_error(mp.cast()) != 0 {
            return None;
        }
        let mut found = Vec::new();
        let mut p = std::ptr::null_mut();
        loop {
            p = libxdp_sys::xdp_multiprog__next_prog(p, mp);
            if p.is_null() {
                break;
            }
            let name_ptr = libxdp_sys::xdp_program__name(p);
            if !name_ptr.is_null() {
                let name = CStr::from_ptr(name_ptr).to_string_lossy().into_owned();
                if is_xsk_program(&name) {
                    found.push((p, name));
                }
            }
        }
        let mode = libxdp_sys::xdp_multiprog__attach_mode(mp);
        for (p, name) in found {
            let id = libxdp_sys::xdp_program__id(p);
            if libxdp_sys::xdp_program__detach(p, ifindex as i32, mode, 0) == 0 {
                removed.push(format!("`{name}` (id {id})"));
            }
        }
        libxdp_sys::xdp_multiprog__close(mp);
    }
    (!removed.is_empty()).then(|| removed.join(", "))
}

/// dmfabric's XDP program attached to one interface through libxdp, with
/// one AF_XDP socket in its map; detached on drop.
struct OwnProgram {
    obj: *mut libxdp_sys::bpf_object,
    prog: *mut libxdp_sys::xdp_program,
    ifindex: i32,
    mode: libxdp_sys::xdp_attach_mode,
    /// The network namespace `ifindex` belongs to: a transport may be
    /// dropped by a thread in another one, where the index names another
    /// interface.
    netns: Option<std::fs::File>,
}

// SAFETY: the libbpf object and libxdp program are plain heap objects and
// file descriptors, not tied to the thread that made them; `OwnProgram` is
// their only owner.
unsafe impl Send for OwnProgram {}

impl OwnProgram {
    /// Load dmfabric's program, attach it to `ifindex` (native or generic
    /// mode) and put socket `xsk_fd` in its map for `queue`.
    fn attach(ifindex: u32, queue: u32, native: bool, xsk_fd: i32) -> Result<OwnProgram, io::Error> {
        let mode =
            if native { libxdp_sys::xdp_attach_mode_XDP_MODE_NATIVE } else { libxdp_sys::xdp_attach_mode_XDP_MODE_SKB };
        let bytes = &DMFABRIC_XDP_OBJECT.0;
        // SAFETY: the object bytes are static; libbpf returns NULL on
        // failure or an object we own, and `Drop` (reached from here on through `own`) closes it.
        let obj = unsafe {
            // libbpf 1.x returns NULL and sets errno on failure.
            let obj = libxdp_sys::bpf_object__open_mem(bytes.as_ptr().cast(), bytes.len(), std::ptr::null());
            if obj.is_null() {
                return Err(libxdp_error(0, "libbpf could not open dmfabric's XDP program"));
            }
            obj
        };
        let netns = std::fs::File::open("/proc/thread-self/ns/net").ok();
        let mut own = OwnProgram { obj, prog: std::ptr::null_mut(), ifindex: ifindex as i32, mode, netns };
        // SAFETY: `obj` is open and not loaded yet (a map's size can still
        // change); the map pointer lives as long as `obj`.
        let map = unsafe {
            let map = libxdp_sys::bpf_object__find_map_by_name(own.obj, c"xsks_map".as_ptr());
            if map.is_null() {
                return Err(io::Error::other("dmfabric's XDP program has no `xsks_map`"));
            }
            let rc = libxdp_sys::bpf_map__set_max_entries(map, queue.saturating_add(1).max(64));
            if rc != 0 {
                return Err(libxdp_error(rc.into(), "Cannot size the AF_XDP socket map"));
            }
            map
        };
        // SAFETY: `obj` is open; the program libxdp makes of it is closed in
        // `Drop` before the object.
        unsafe {
            let prog = libxdp_sys::xdp_program__from_bpf_obj(own.obj, c"xdp".as_ptr());
            let err = libxdp_sys::libxdp_get_error(prog.cast());
            if prog.is_null() || err != 0 {
                return Err(libxdp_error(err, "libxdp could not open dmfabric's XDP program"));
            }
            own.prog = prog;
            let rc = libxdp_sys::xdp_program__attach(own.prog, own.ifindex, mode, 0);
            if rc != 0 {
                own.prog_attached_failed();
                return Err(libxdp_error(rc.into(), "Cannot attach dmfabric's XDP program"));
            }
        }
        // SAFETY: the program is loaded, so the map has a descriptor; key and
        // value point to live u32/i32 values of the sizes the map declares.
        let rc = unsafe {
            let fd = libxdp_sys::bpf_map__fd(map);
            libxdp_sys::bpf_map_update_elem(
                fd,
                (&queue as *const u32).cast::<c_void>(),
                (&xsk_fd as *const i32).cast::<c_void>(),
                0,
            )
        };
        if rc != 0 {
            // `own` drops here and detaches the program again.
            return Err(libxdp_error(rc.into(), "Cannot put the AF_XDP socket in the XDP program's map"));
        }
        Ok(own)
    }

    /// After a failed attach there is nothing to detach: only close.
    fn prog_attached_failed(&mut self) {
        // SAFETY: `self.prog` is an open program that was not attached;
        // it is not used after this.
        unsafe { libxdp_sys::xdp_program__close(self.prog) };
        self.prog = std::ptr::null_mut();
    }
}

impl OwnProgram {
    /// Run `f` in the network namespace the program was attached in, then
    /// return the thread to its own (`f` runs in place when they are the
    /// same, or when the namespace cannot be entered).
    fn in_own_netns<R>(&self, f: impl FnOnce() -> R) -> R {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let here = std::fs::File::open("/proc/thread-self/ns/net").ok();
        let id = |f: &std::fs::File| f.metadata().ok().map(|m| (m.dev(), m.ino()));
        let (Some(own), Some(here)) = (&self.netns, here) else {
            return f();
        };
        if id(own).is_none() || id(own) == id(&here) {
            return f();
        }
        // SAFETY: setns(2) on an open network namespace file changes only
        // the calling thread's namespace; it is switched back below.
        if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return f();
        }
        let r = f();
        // SAFETY: as above, back to the namespace the thread was in.
        if unsafe { libc::setns(here.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "cannot return to this thread's network namespace after detaching the XDP program");
        }
        r
    }
}

impl Drop for OwnProgram {
    fn drop(&mut self) {
        // SAFETY: `prog` (if set) is attached to `ifindex` in `mode` and
        // was made from `obj`, which is closed last; neither is used after.
        unsafe {
            if !self.prog.is_null() {
                let (prog, ifindex, mode) = (self.prog, self.ifindex, self.mode);
                let rc = self.in_own_netns(|| libxdp_sys::xdp_program__detach(prog, ifindex, mode, 0));
                if rc != 0 {
                    tracing::warn!(
                        ifindex = self.ifindex,
                        error = %io::Error::from_raw_os_error(-rc),
                        "could not detach dmfabric's XDP program; the next start removes it"
                    );
                }
                libxdp_sys::xdp_program__close(self.prog);
            }
            libxdp_sys::bpf_object__close(self.obj);
        }
    }
}

/// An io::Error for a negative errno from libbpf/libxdp (or errno itself
/// when the call returned a bare failure), with what failed.
fn libxdp_error(rc: i64, what: &str) -> io::Error {
    let code = if rc < 0 { (-rc) as i32 } else { io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL) };
    let err = io::Error::from_raw_os_error(code);
    // Keep the errno (explain_open_error maps it) and say what failed in the log.
    tracing::debug!(error = %err, "{what}");
    err
}

fn attached_program(ifindex: u32) -> Option<AttachedProgram> {
    // SAFETY: libxdp returns NULL, an error pointer or a multiprog we own
    // and close below; `libxdp_get_error` tells the cases apart.
    unsafe {
        let mp = libxdp_sys::xdp_multiprog__get_from_ifindex(ifindex as i32);
        if mp.is_null() || libxdp_sys::libxdp_get_error(mp.cast()) != 0 {
            return None;
        }
        let main = libxdp_sys::xdp_multiprog__main_prog(mp);
        let found = if main.is_null() {
            None
        } else {
            let name_ptr = libxdp_sys::xdp_program__name(main);
            let name = if name_ptr.is_null() {
                String::from("?")
            } else {
                CStr::from_ptr(name_ptr).to_string_lossy().into_owned()
            };
            Some(AttachedProgram { name, id: libxdp_sys::xdp_program__id(main) })
        };
        libxdp_sys::xdp_multiprog__close(mp);
        found
    }
}

impl Transport for XdpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Xdp
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        let max = max.min(MAX_BURST);
        // SAFETY: the descriptors are filled in from the RX ring of this
        // socket, whose frames belong to `self.umem`.
        let n = unsafe { self.rx_q.consume(&mut self.rx_descs[..max]) };
        if n == 0 {
            if self.attachment.zero_copy && self.fq.needs_wakeup() {
                let _ = self.rx_q.poll(0);
            }
            return Ok(0);
        }
        for desc in &self.rx_descs[..n] {
            // SAFETY: the frame was just received into this UMEM and is not
            // on the fill ring until it is produced back below.
            let data = unsafe { self.umem.data(desc) };
            on_frame(data.contents());
        }
        // SAFETY: the frames are ours again and go back to the kernel.
        let back = unsafe { self.fq.produce(&self.rx_descs[..n]) };
        if back < n {
            // The fill ring is sized for every receive frame, so this cannot
            // happen; count it rather than leak silently.
            self.stats.rx_dropped += (n - back) as u64;
        }
        self.stats.rx_frames += n as u64;
        Ok(n)
    }

    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError> {
        if batch.is_empty() {
            return Ok(0);
        }
        self.reclaim_tx();
        self.tx_pending.clear();
        for frame in batch.iter() {
            let Some(mut desc) = self.tx_free.pop() else {
                break;
            };
            {
                // SAFETY: `desc` is a free TX frame of this UMEM: neither on a
                // ring nor referenced anywhere else.
                let mut data = unsafe { self.umem.data_mut(&mut desc) };
                let mut cursor = data.cursor();
                cursor.set_pos(0);
                if cursor.write_all(frame).is_err() {
                    self.tx_free.push(desc);
                    continue;
                }
            }
            self.tx_pending.push(desc);
        }
        // SAFETY: every pending descriptor is a filled frame of this UMEM.
        let queued = unsafe { self.tx_q.produce(&self.tx_pending) };
        self.tx_free.extend_from_slice(&self.tx_pending[queued..]);
        self.stats.tx_dropped += (batch.len() - queued) as u64;
        self.stats.tx_frames += queued as u64;
        batch.clear();
        if queued > 0 {
            self.kick_tx(queued);
        }
        Ok(queued)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        self.rx_q.poll(ms).map_err(|e| TransportError::io("poll on the AF_XDP socket failed", e))?;
        Ok(())
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.rx_q.fd().as_raw_fd())
    }

    fn stats(&self) -> TransportStats {
        let mut s = self.stats;
        if let Ok(x) = self.rx_q.fd().xdp_statistics() {
            s.rx_dropped += x.rx_dropped() + x.rx_ring_full() + x.rx_invalid_descs();
        }
        s
    }
}
