//! The client platform's data plane: one transport shared by every VM and
//! vCPU of this client process.
//!
//! - **Sessions.** The client opens a session with each server it uses
//!   ([`dmfabric_dataplane::hello`]): a sealed Hello with a fresh challenge,
//!   the server's sealed answer naming it, its epoch and a session id, then
//!   a Register. Every frame both ways is sealed with this client
//!   platform's key ([`dmfabric_wire::auth`]); what does not verify is
//!   dropped and counted, never answered. A server that lost the state of
//!   a stream (it restarted, or forgot an idle client) refuses it with
//!   `NoSession`: the client opens a new session and starts the stream
//!   again in it; a server that announces a new epoch (it restarted) is
//!   given a new session at once.
//! - **Requests.** An exit aimed at a device on a server becomes one
//!   IoRequest frame carrying every id of the wire header. Each vCPU's
//!   requests to a device are a stop-and-wait stream ([`StopAndWait`]),
//!   numbered in the session of the server that runs the device
//!   ([`dmfabric_wire::session::Seq`]); its numbers survive the vCPU (a VM
//!   launched again continues them). A vCPU puts its request in the port's
//!   outbox (lock-free), then waits on its own slot; whichever thread holds
//!   the link — the waiting vCPU itself when nobody else does (run to
//!   completion, DESIGN.md's small-host layout) — sends what is in the
//!   outbox and delivers what arrives. No vCPU ever blocks on the link. A
//!   request unanswered after the timeout is sent again; past the retry
//!   limit the VM stops with a clear error. A completion is taken only if
//!   it matches the request's sequence number, server, address, direction
//!   and size.
//! - **Interrupts.** An Interrupt (or Lifecycle reset) frame is taken only
//!   from a server this client has a session with, at that server's MAC,
//!   naming its epoch, for one of this client's VMs, from a device of that
//!   VM's map that runs on that server and may raise that line (or reset
//!   the VM, or send MSIs). Each (VM,
//!   server) is a stream: the next number is injected and acknowledged,
//!   the last again only acknowledged, anything else dropped. MSIs are
//!   taken only from a device the map lets send them (a VM's remote I/O
//!   APIC). Whoever
//!   holds the link delivers them: a waiting vCPU, or the
//!   [`ClientPort::serve`] thread while every vCPU is in its guest.
//! - **Device DMA.** A device model on a server reads and writes its VM's
//!   memory with DmaRead / DmaWrite frames, answered here without stopping
//!   a vCPU. A chunk is done only if it comes from a server with a session,
//!   at its MAC, naming its epoch and numbered in that session, for one of
//!   this client's VMs, from a device of that VM's map that runs on that
//!   server, and lies inside the VM's RAM; otherwise it is refused with a
//!   Nack (counted). Each server's chunks are numbered in one sequence: a
//!   write is applied once, its duplicates only acknowledged
//!   ([`DmaWindow`]); a read is answered from memory each time it comes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use dmfabric_dataplane::hello::{self, Sealer, Session};
use dmfabric_dataplane::reliable::{Due, Retry, StopAndWait};
use dmfabric_dataplane::{FrameBatch, Transport, TransportError};
use dmfabric_wire::auth::{AuthError, KeyRing};
use dmfabric_wire::session::{HelloReplyBody, Seq, CHALLENGE_LEN};
use dmfabric_wire::{
    ControlMsg, ControlOp, Direction, Dma, DmaDir, EthernetRepr, Frame, FrameRepr, InterruptAck, IoRequest, IrqSource,
    Kind, MacAddr, Message, Nack, NackReason, Route, Status, LIFECYCLE_RESET,
};

use crate::devmap::{Remote, Target, ANY_DEVICE};
use crate::exits::LiveMap;
use crate::kvm::{Exit, IrqSink};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("No answer from server {server} to Hello within {waited:?}: is `dmfabric server --server-id {server}` running on this link, and does it have this client platform's key?")]
    NoServer { server: u16, waited: Duration },
    #[error("Device {device} is on server {server}, which is not one of this client's servers ({known:?}): add it to the config")]
    NotConfigured { server: u16, device: u32, known: Vec<u16> },
    #[error("Server {server} did not answer device {device} at {addr:#x} after {tries} tries over {waited:?}: stopping the VM")]
    Unreachable { server: u16, device: u32, addr: u64, tries: u32, waited: Duration },
    #[error("Server {server} refused device {device}: {reason:?}")]
    Nacked { server: u16, device: u32, reason: NackReason },
    #[error(
        "Server {server} gave no new session within {waited:?} after it lost device {device}'s stream: stopping the VM"
    )]
    NoSession { server: u16, device: u32, waited: Duration },
    #[error("VM {0} is not one of this client's VMs")]
    UnknownVm(u32),
    #[error("vCPU {vcpu} is out of range: VM {vm} has {vcpus}")]
    UnknownVcpu { vm: u32, vcpu: u16, vcpus: usize },
    #[error("Stopped while waiting for server {server}")]
    Stopped { server: u16 },
}

/// Counters of a client's data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientStats {
    pub requests: u64,
    pub retransmits: u64,
    pub completions: u64,
    pub nacks: u64,
    pub interrupts: u64,
    /// Retransmitted interrupts already delivered: acknowledged again, not injected.
    pub interrupt_duplicates: u64,
    /// Interrupts that are neither the next of their stream nor its last
    /// (old, replayed, or of an earlier life of the server): dropped.
    pub interrupt_stale: u64,
    pub interrupt_acks: u64,
    /// Interrupts KVM refused (the VM is gone or the line is bad).
    pub inject_errors: u64,
    /// Completions nobody waits for: duplicates, late answers to retransmits.
    pub stale_completions: u64,
    /// Frames for VMs (or vCPUs) this client does not run.
    pub unknown_vm: u64,
    /// Frames naming another client platform.
    pub other_client: u64,
    pub malformed: u64,
    /// Frames of another EtherType.
    pub foreign: u64,
    /// Valid frames of a kind a client does not take (requests, Hellos).
    pub unexpected_kind: u64,
    /// Frames that did not fit a TX burst.
    pub tx_full: u64,
    /// Resets of a VM its devices asked for (an i8042's reset pulse).
    pub resets: u64,
    /// Interrupts for a VM being saved to migrate: neither injected nor
    /// acknowledged, so the server sends them on to where the VM goes.
    pub interrupts_refused: u64,
    /// Frames whose tag did not verify: none, another key, or changed.
    pub unauthenticated: u64,
    /// Authentic frames naming a server this client has no session with,
    /// or not from that server's MAC.
    pub wrong_source: u64,
    /// Interrupts or resets from a device that may not send them to that
    /// VM (another line, an MSI, another server, no reset line).
    pub not_granted: u64,
    /// Sessions opened after the first (a server restarted or forgot us).
    pub sessions_reopened: u64,
    /// HelloReplies answering no Hello of ours (replays), and announcements
    /// of an epoch already known.
    pub stale_hellos: u64,
    /// Device DMA done for servers: chunks and bytes.
    pub dma_reads: u64,
    pub dma_writes: u64,
    pub dma_bytes: u64,
    /// Write chunks that came again: acknowledged, not applied again.
    pub dma_duplicates: u64,
    /// Chunks refused: outside the VM's RAM, a VM not here, a device not
    /// of that VM on that server, or not of the session in force.
    pub dma_refused: u64,
}

/// A VM's memory as a device's DMA sees it: copies in and out, every range
/// checked (false: not all of it is the VM's RAM, nothing was copied).
pub trait DmaMemory: Send + Sync {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
    fn write(&self, addr: u64, data: &[u8]) -> bool;
}

impl DmaMemory for crate::kvm::GuestRam {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        crate::kvm::GuestRam::read(self, addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> bool {
        crate::kvm::GuestRam::write(self, addr, data)
    }
}

/// Bits of [`DmaWindow`]: how far behind the newest chunk a duplicate is still told.
const DMA_WINDOW_BITS: u32 = 1024;

/// Which chunk numbers of one server's DMA sequence were applied: the
/// newest and a bitmap of the [`DMA_WINDOW_BITS`] before it. A number older
/// than that is taken as applied (the server gives up long before).
#[derive(Debug, Clone)]
struct DmaWindow {
    server: u16,
    session: u32,
    /// One past the newest counter seen.
    top: u32,
    bits: [u64; (DMA_WINDOW_BITS / 64) as usize],
}

impl DmaWindow {
    fn new(server: u16, session: u32) -> DmaWindow {
        DmaWindow { server, session, top: 0, bits: [0; (DMA_WINDOW_BITS / 64) as usize] }
    }

    fn bit(c: u32) -> (usize, u64) {
        let i = c % DMA_WINDOW_BITS;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Whether chunk `c` was applied already.
    fn seen(&self, c: u32) -> bool {
        if c >= self.top {
            return false;
        }
        if self.top - c > DMA_WINDOW_BITS {
            return true;
        }
        let (w, b) = DmaWindow::bit(c);
        self.bits[w] & b != 0
    }

    /// Chunk `c` is applied.
    fn mark(&mut self, c: u32) {
        if c >= self.top {
            if c - self.top >= DMA_WINDOW_BITS {
                self.bits = [0; (DMA_WINDOW_BITS / 64) as usize];
            } else {
                for k in self.top..c {
                    let (w, b) = DmaWindow::bit(k);
                    self.bits[w] &= !b;
                }
            }
            self.top = c + 1;
        } else if self.top - c > DMA_WINDOW_BITS {
            return;
        }
        let (w, b) = DmaWindow::bit(c);
        self.bits[w] |= b;
    }
}

/// Counters of one VM's remote traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmRemoteStats {
    pub requests: u64,
    pub retransmits: u64,
    pub completions: u64,
    pub interrupts: u64,
}

const EMPTY: u8 = 0;
const DONE: u8 = 1;
const NACKED: u8 = 2;

/// Where a vCPU's answer lands. Written only by whoever holds the link.
#[derive(Debug)]
struct Slot {
    /// The sequence number the vCPU waits for (u64::MAX: none).
    expect: AtomicU64,
    /// What the answer must match besides it: the address ...
    addr: AtomicU64,
    /// ... (server addressed << 16 | direction << 8 | size), and the
    /// servers that may answer besides the one addressed: (the server that
    /// runs the device by the map << 16 | the one whose session the stream
    /// is numbered in, which ran it when the stream started — a device that
    /// moves takes its stream along, and an answer may still come from
    /// where it was).
    meta: AtomicU32,
    runs_on: AtomicU32,
    state: AtomicU8,
    data: AtomicU64,
    nack: AtomicU8,
    /// The completion's Status (as u8).
    status: AtomicU8,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            expect: AtomicU64::new(u64::MAX),
            addr: AtomicU64::new(0),
            meta: AtomicU32::new(0),
            runs_on: AtomicU32::new(0),
            state: AtomicU8::new(EMPTY),
            data: AtomicU64::new(0),
            nack: AtomicU8::new(0),
            status: AtomicU8::new(0),
        }
    }
}

/// The direction and size of an access, as [`Slot::meta`] keeps them.
fn access_bits(dir: Direction, size: u8) -> u32 {
    (u32::from(dir == Direction::Write) << 8) | u32::from(size)
}

fn meta(server: u16, dir: Direction, size: u8) -> u32 {
    (u32::from(server) << 16) | access_bits(dir, size)
}

struct VmPort {
    irq: Arc<dyn IrqSink>,
    /// The VM's device map: which devices (on which server) may raise
    /// which lines, or reset it.
    map: Arc<LiveMap>,
    slots: Box<[Slot]>,
    /// Being saved to migrate: its interrupts are refused.
    frozen: AtomicBool,
    /// Its memory, for device DMA (None: DMA is refused).
    ram: Option<Arc<dyn DmaMemory>>,
}

impl VmPort {
    fn new(e: &VmEntry) -> VmPort {
        VmPort {
            irq: e.irq.clone(),
            map: e.map.clone(),
            ram: e.ram.clone(),
            slots: (0..e.vcpus.max(1)).map(|_| Slot::new()).collect(),
            frozen: AtomicBool::new(false),
        }
    }

    /// The device `device` run by `server` in this VM's map (an
    /// [`ANY_DEVICE`] entry stands for every device of its server).
    fn device(&self, server: u16, device: u32) -> Option<Remote> {
        self.map.load().targets().find_map(|t| match t {
            Target::Remote(r) if (r.device == device || r.device == ANY_DEVICE) && r.runs_on == server => Some(*r),
            _ => None,
        })
    }
}

/// The VMs of a port: indices never change (a VM that joins again gets
/// its old index), so counters and vCPUs can keep them.
#[derive(Default)]
struct VmTable {
    ports: Vec<Arc<VmPort>>,
    by_id: std::collections::HashMap<u32, usize>,
}

impl VmTable {
    fn find(&self, vm: u32) -> Option<(usize, &Arc<VmPort>)> {
        let &i = self.by_id.get(&vm)?;
        Some((i, &self.ports[i]))
    }
}

/// A request waiting in the outbox for whoever holds the link.
#[derive(Debug, Clone, Copy)]
struct Outgoing {
    to: MacAddr,
    req: IoRequest,
    /// The epoch of the server that runs the device.
    epoch: u32,
    /// The VM's index, for its counters.
    index: usize,
    retransmit: bool,
}

/// A server this client has a session with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    session: Session,
    /// Bumped at each new session: a vCPU waiting for one watches it.
    generation: u64,
}

/// A session being opened again (by the link holder).
#[derive(Debug)]
struct Opening {
    server: u16,
    /// The challenges of the Hellos sent (the newest last).
    challenges: VecDeque<[u8; CHALLENGE_LEN]>,
    next_send: Instant,
}

/// Hellos of one opening whose answer is still taken.
const OPENING_CHALLENGES: usize = 8;
/// How often a Hello is sent again while a session is being opened.
const HELLO_EVERY: Duration = Duration::from_millis(100);
/// A server announcing a new epoch is given a new session at most this often.
const REOPEN_MIN: Duration = Duration::from_secs(1);
/// How often the VMs' maps are looked at for servers to open a session with.
const MAP_SCAN_EVERY: Duration = Duration::from_millis(100);

/// Everything that changes per frame: only the thread holding the link touches it.
struct Link {
    t: Box<dyn Transport>,
    tx: FrameBatch,
    stats: ClientStats,
    vm_stats: Vec<VmRemoteStats>,
    /// Last interrupt (or reset) delivered per (VM index, server).
    irq_last: Vec<(usize, u16, Seq)>,
    sealer: Sealer,
    opening: Vec<Opening>,
    /// When each server was last given a new session because it announced one.
    reopened: Vec<(u16, Instant)>,
    /// When the VMs' maps are next looked at for servers with no session.
    next_scan: Instant,
    /// Which DMA write chunks of each server were applied.
    dma_windows: Vec<DmaWindow>,
    /// Received frames, copied out of the transport (kept between polls).
    rx: Vec<Vec<u8>>,
}

/// A VM this client runs: its id, vCPU count, where its interrupts go and
/// its device map (which says what its devices may send it).
#[derive(Clone)]
pub struct VmEntry {
    pub id: u32,
    pub vcpus: u16,
    pub irq: Arc<dyn IrqSink>,
    pub map: Arc<LiveMap>,
    /// Its memory, for device DMA (None: the VM's devices do none).
    pub ram: Option<Arc<dyn DmaMemory>>,
}

impl std::fmt::Debug for VmEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmEntry").field("id", &self.id).field("vcpus", &self.vcpus).finish()
    }
}

/// Who this client is, its keys and how patient it is.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub client: u16,
    pub hypervisor: u16,
    /// The servers to find on the link.
    pub servers: Vec<u16>,
    pub retry: Retry,
    /// How long to wait for each server's Hello reply.
    pub hello_timeout: Duration,
    /// This client platform's keys (and whether to seal at all: only off
    /// to measure what sealing costs).
    pub sealer: Sealer,
    /// Open a session with a server not in `servers` when a device on it
    /// is first used (a client placed by the control panel: servers serve
    /// it only once one of its VMs has a device there); otherwise such a
    /// device is an error ([`RemoteError::NotConfigured`]).
    pub open_on_demand: bool,
}

/// Requests that may wait in the outbox (one per vCPU at most).
const OUTBOX: usize = 4096;

/// One stream of a vCPU: its requests to one device (as the map names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stream {
    device: u32,
    session: u32,
    /// The server whose session it is.
    server: u16,
    next: u32,
}

/// A client platform's connection to its servers, shared by all its vCPUs.
pub struct ClientPort {
    client: u16,
    hypervisor: u16,
    mac: MacAddr,
    peers: RwLock<Vec<Peer>>,
    /// Servers a vCPU needs a new session with (it lost a stream there).
    reopen: ArrayQueue<u16>,
    vms: RwLock<VmTable>,
    retry: Retry,
    hello_timeout: Duration,
    open_on_demand: bool,
    link: Mutex<Link>,
    /// Someone holds the link: a waiting vCPU looks at this before it tries.
    busy: AtomicBool,
    outbox: ArrayQueue<Outgoing>,
    /// vCPUs inside [`VcpuRemote::access`]: they deliver what arrives, so
    /// the [`ClientPort::serve`] thread stays out of their way.
    waiters: AtomicUsize,
    /// Remote accesses started so far: while it moves, the vCPUs deliver
    /// what arrives within one exit and the serve thread only naps.
    activity: AtomicU64,
    /// When a server's device DMA last arrived (ns since `born`): while it
    /// is recent the serve thread does not nap after a vCPU's exit — DMA
    /// comes while the vCPUs are in their guests, after a notify.
    dma_at: AtomicU64,
    born: Instant,
    /// Told the id of a VM whose device model asked for a reset.
    resets: Mutex<Option<crossbeam_channel::Sender<u32>>>,
    /// The streams of vCPUs not running now, by (VM, vCPU): a VM that
    /// starts again continues their numbers.
    parked: Mutex<HashMap<(u32, u16), Vec<Stream>>>,
}

impl std::fmt::Debug for ClientPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPort")
            .field("client", &self.client)
            .field("servers", &self.servers())
            .field("vms", &self.vms.read().map_or(0, |t| t.ports.len()))
            .finish()
    }
}

/// Holds the link; clears the busy hint when dropped.
struct Held<'p> {
    link: MutexGuard<'p, Link>,
    busy: &'p AtomicBool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while holding the lock left plain counters
    // behind, nothing half-written that matters: carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What to do with an interrupt or reset of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    New,
    Again,
    Stale,
}

impl ClientPort {
    /// Open a session with every server of `cfg` (a sealed Hello to
    /// broadcast, their sealed answers) and serve `vms`.
    pub fn connect(mut t: Box<dyn Transport>, cfg: &ClientConfig, vms: &[VmEntry]) -> Result<Self, RemoteError> {
        let check = cfg.sealer.clone();
        t.check_senders(Box::new(move |f: &[u8]| check.verifies(f)));
        let mut peers = Vec::new();
        for &server in &cfg.servers {
            let route = Route { server, client: cfg.client, hypervisor: cfg.hypervisor, ..Route::default() };
            let Some(session) = hello::open_session(t.as_mut(), route, Some(server), &cfg.sealer, cfg.hello_timeout)?
            else {
                return Err(RemoteError::NoServer { server, waited: cfg.hello_timeout });
            };
            tracing::debug!(client = cfg.client, server, mac = %session.mac, session = session.id, "session opened");
            peers.push(Peer { session, generation: 0 });
        }
        let mut table = VmTable::default();
        for v in vms {
            table.by_id.insert(v.id, table.ports.len());
            table.ports.push(Arc::new(VmPort::new(v)));
        }
        let link = Link {
            tx: FrameBatch::new(),
            stats: ClientStats::default(),
            vm_stats: vec![VmRemoteStats::default(); table.ports.len()],
            irq_last: Vec::new(),
            dma_windows: Vec::new(),
            rx: Vec::new(),
            sealer: cfg.sealer.clone(),
            opening: Vec::new(),
            reopened: Vec::new(),
            next_scan: Instant::now(),
            t,
        };
        Ok(ClientPort {
            client: cfg.client,
            hypervisor: cfg.hypervisor,
            mac: link.t.mac(),
            peers: RwLock::new(peers),
            reopen: ArrayQueue::new(64),
            vms: RwLock::new(table),
            retry: cfg.retry,
            hello_timeout: cfg.hello_timeout,
            open_on_demand: cfg.open_on_demand,
            link: Mutex::new(link),
            busy: AtomicBool::new(false),
            outbox: ArrayQueue::new(OUTBOX),
            waiters: AtomicUsize::new(0),
            activity: AtomicU64::new(0),
            dma_at: AtomicU64::new(u64::MAX),
            born: Instant::now(),
            resets: Mutex::new(None),
            parked: Mutex::new(HashMap::new()),
        })
    }

    /// Take `session` as if it had been opened (feature `fuzzing`: fuzz
    /// targets reach what a client does with a server's frames without a
    /// server to say Hello to).
    #[cfg(feature = "fuzzing")]
    pub fn insert_session(&self, session: Session) {
        self.peers.write().unwrap_or_else(|e| e.into_inner()).push(Peer { session, generation: 1 });
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, VmTable> {
        self.vms.read().unwrap_or_else(|e| e.into_inner())
    }

    fn peer(&self, server: u16) -> Option<Peer> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).iter().find(|p| p.session.server == server).copied()
    }

    /// Serve VM `entry` too from now on (a VM launched or migrated here
    /// while the port runs). A VM that was here before starts afresh (new
    /// vCPU slots, same counters and stream numbers).
    pub fn add_vm(&self, entry: &VmEntry) {
        let port = Arc::new(VmPort::new(entry));
        let mut link = lock(&self.link);
        let mut table = self.vms.write().unwrap_or_else(|e| e.into_inner());
        match table.by_id.get(&entry.id) {
            Some(&i) => table.ports[i] = port,
            None => {
                let i = table.ports.len();
                table.by_id.insert(entry.id, i);
                table.ports.push(port);
                link.vm_stats.push(VmRemoteStats::default());
            }
        }
    }

    /// Seal with `keys` from now on (a rekey: frames under every key of the
    /// ring are taken, new ones go out under its sending key).
    pub fn set_keys(&self, keys: KeyRing) {
        lock(&self.link).sealer.keys = keys;
    }

    /// The link if nobody holds it, without waiting.
    fn try_hold(&self) -> Option<Held<'_>> {
        if self.busy.load(Ordering::Relaxed) {
            return None;
        }
        let link = match self.link.try_lock() {
            Ok(l) => l,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        self.busy.store(true, Ordering::Relaxed);
        Some(Held { link, busy: &self.busy })
    }

    pub fn stats(&self) -> ClientStats {
        lock(&self.link).stats
    }

    /// The VMs this port serves (or served), by id.
    pub fn vm_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.table().by_id.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Counters of VM `vm`.
    pub fn vm_stats(&self, vm: u32) -> Option<VmRemoteStats> {
        let i = self.vm_index(vm)?;
        Some(lock(&self.link).vm_stats[i])
    }

    /// The servers this client has a session with, and their MACs.
    pub fn servers(&self) -> Vec<(u16, MacAddr)> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).iter().map(|p| (p.session.server, p.session.mac)).collect()
    }

    /// Give the transport back.
    pub fn into_transport(self) -> Box<dyn Transport> {
        self.link.into_inner().unwrap_or_else(|e| e.into_inner()).t
    }

    /// Run `f` on the transport (for its counters and the like).
    pub fn with_transport<R>(&self, f: impl FnOnce(&dyn Transport) -> R) -> R {
        f(lock(&self.link).t.as_ref())
    }

    /// Refuse (`true`) or take again (`false`) `vm`'s interrupts: from the
    /// moment a VM is held to be saved for a migration, an interrupt it
    /// took would be in neither the saved state nor the server's queue.
    /// Refused ones stay unacknowledged, and the server sends them to the
    /// VM's new platform once the control panel records the move.
    pub fn freeze(&self, vm: u32, frozen: bool) {
        let _link = lock(&self.link);
        if let Some((_, p)) = self.table().find(vm) {
            p.frozen.store(frozen, Ordering::Release);
        }
    }

    /// Tell `to` the id of each VM whose device model asks for a reset.
    pub fn notify_resets(&self, to: crossbeam_channel::Sender<u32>) {
        *lock(&self.resets) = Some(to);
    }

    /// Receive and deliver one burst now (what [`ClientPort::serve`] does in
    /// its loop); returns how many frames came in.
    pub fn poll_once(&self) -> Result<usize, RemoteError> {
        let mut link = lock(&self.link);
        self.poll(&mut link)
    }

    fn vm_index(&self, vm: u32) -> Option<usize> {
        self.table().find(vm).map(|(i, _)| i)
    }

    /// The remote path of vCPU `vcpu` of VM `vm`; `stop` (if any) aborts a
    /// wait when the VM is being stopped.
    pub fn vcpu(
        self: &Arc<Self>,
        vm: u32,
        vcpu: u16,
        stop: Option<Arc<AtomicBool>>,
    ) -> Result<VcpuRemote, RemoteError> {
        let (index, vm_port) = {
            let table = self.table();
            let (i, p) = table.find(vm).ok_or(RemoteError::UnknownVm(vm))?;
            (i, p.clone())
        };
        let vcpus = vm_port.slots.len();
        if usize::from(vcpu) >= vcpus {
            return Err(RemoteError::UnknownVcpu { vm, vcpu, vcpus });
        }
        let streams = lock(&self.parked).remove(&(vm, vcpu)).unwrap_or_default();
        Ok(VcpuRemote { port: self.clone(), index, vm_port, vm, vcpu, streams, stop })
    }

    /// Deliver what arrives while no vCPU is waiting (interrupts for halted
    /// guests), until `stop`.
    ///
    /// While vCPUs are doing remote I/O they deliver everything that
    /// arrives themselves, so this thread only naps ([`SERVE_NAP`]): waking
    /// on every completion would put it on the vCPU's core once per exit
    /// (measured: 18 → 30 µs per remote exit on a 2-core host). Once the
    /// vCPUs have been quiet for a nap (halted, or computing), it sleeps on
    /// the transport's descriptor and delivers at once.
    pub fn serve(&self, stop: &AtomicBool) -> Result<(), RemoteError> {
        let fd = lock(&self.link).t.wake_fd();
        let mut seen = u64::MAX;
        while !stop.load(Ordering::Acquire) {
            let now = self.activity.load(Ordering::Acquire);
            let dma = self.dma_recent();
            let waiting = self.waiters.load(Ordering::Acquire) > 0;
            if waiting || now != seen {
                seen = now;
                if !dma {
                    std::thread::sleep(SERVE_NAP);
                    continue;
                }
                if waiting {
                    // A vCPU delivers meanwhile; look again soon.
                    std::thread::sleep(DMA_NAP);
                    continue;
                }
            }
            let got = match self.try_hold() {
                Some(mut held) => self.poll(&mut held.link)?,
                None => continue,
            };
            if got == 0 {
                match fd {
                    Some(fd) => {
                        dmfabric_dataplane::poll_readable(fd, Duration::from_millis(5))
                            .map_err(|e| TransportError::io("poll on the client transport failed", e))?;
                    }
                    None => std::thread::sleep(Duration::from_micros(50)),
                }
            }
        }
        Ok(())
    }

    /// Whether a server's device DMA arrived within [`DMA_LINGER`].
    fn dma_recent(&self) -> bool {
        let at = self.dma_at.load(Ordering::Acquire);
        at != u64::MAX && (self.born.elapsed().as_nanos() as u64).saturating_sub(at) < DMA_LINGER.as_nanos() as u64
    }

    /// Send what waits in the outbox and the Hellos of sessions being
    /// opened, receive one burst, deliver it and send what it calls for.
    fn poll(&self, link: &mut Link) -> Result<usize, RemoteError> {
        self.open_sessions(link)?;
        let Link { t, tx, stats, vm_stats, sealer, .. } = link;
        while let Some(out) = self.outbox.pop() {
            let mut repr = FrameRepr::new(EthernetRepr { dst: out.to, src: self.mac }, Message::IoRequest(out.req));
            repr.retransmit = out.retransmit;
            repr.epoch = out.epoch;
            if out.retransmit {
                stats.retransmits += 1;
                vm_stats[out.index].retransmits += 1;
            } else {
                stats.requests += 1;
                vm_stats[out.index].requests += 1;
            }
            if !sealer.push(tx, &repr) {
                stats.tx_full += 1;
            }
            if tx.is_full() {
                t.send(tx)?;
            }
        }
        if !link.tx.is_empty() {
            link.t.send(&mut link.tx)?;
        }
        // The burst is copied out of the transport's ring (delivering sends
        // on the same link) into buffers kept from poll to poll: no
        // allocation once they have grown to a burst of full frames.
        let mut frames = std::mem::take(&mut link.rx);
        let mut used = 0;
        let n = link.t.recv(dmfabric_dataplane::MAX_BURST, &mut |f| {
            match frames.get_mut(used) {
                Some(buf) => {
                    buf.clear();
                    buf.extend_from_slice(f);
                }
                None => frames.push(f.to_vec()),
            }
            used += 1;
        });
        for f in &frames[..used] {
            self.deliver(f, link);
        }
        link.rx = frames;
        let n = n?;
        if !link.tx.is_empty() {
            link.t.send(&mut link.tx)?;
        }
        Ok(n)
    }

    /// Start opening the sessions vCPUs asked for (and, opening on demand,
    /// those with servers the VMs' maps name: a VM waiting for interrupts
    /// asks for nothing), and send Hellos again where no answer came yet.
    fn open_sessions(&self, link: &mut Link) -> Result<(), RemoteError> {
        let now = Instant::now();
        if self.open_on_demand && now >= link.next_scan {
            link.next_scan = now + MAP_SCAN_EVERY;
            for server in self.servers_of_maps() {
                if self.peer(server).is_none() {
                    let _ = self.reopen.push(server);
                }
            }
        }
        while let Some(server) = self.reopen.pop() {
            if !link.opening.iter().any(|o| o.server == server) {
                link.opening.push(Opening { server, challenges: VecDeque::new(), next_send: now });
            }
        }
        let Link { t, tx, sealer, opening, .. } = link;
        for o in opening.iter_mut().filter(|o| now >= o.next_send) {
            let c = hello::challenge();
            if o.challenges.len() == OPENING_CHALLENGES {
                o.challenges.pop_front();
            }
            o.challenges.push_back(c);
            o.next_send = now + HELLO_EVERY;
            let route =
                Route { server: o.server, client: self.client, hypervisor: self.hypervisor, ..Route::default() };
            sealer.push(tx, &hello::hello_frame(self.mac, route, &c));
        }
        if !tx.is_empty() {
            t.send(tx)?;
        }
        Ok(())
    }

    /// Every server the VMs' maps send to or have their devices run on.
    fn servers_of_maps(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for port in &self.table().ports {
            for t in port.map.load().targets() {
                if let Target::Remote(r) = t {
                    out.extend([r.server, r.runs_on]);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn deliver(&self, bytes: &[u8], link: &mut Link) {
        let stats = &mut link.stats;
        if bytes.len() >= 14 && bytes[12..14] != dmfabric_wire::ETHERTYPE_DMFABRIC.to_be_bytes() {
            stats.foreign += 1;
            return;
        }
        let Ok(frame) = Frame::new_checked(bytes) else {
            stats.malformed += 1;
            return;
        };
        let Ok(repr) = FrameRepr::parse(&frame) else {
            stats.malformed += 1;
            return;
        };
        if link.sealer.authenticate {
            if let Err(e) = link.sealer.keys.verify(&frame) {
                debug_assert!(AuthError::ALL.contains(&e));
                stats.unauthenticated += 1;
                return;
            }
        }
        let route = *repr.msg.route();
        if route.client != self.client {
            stats.other_client += 1;
            return;
        }
        // Only from a server with a session, at its MAC (or the answer of
        // one this client opens a first session with).
        let peer = self.peer(route.server);
        if let (None, Message::Control(c)) = (&peer, &repr.msg) {
            if c.op == ControlOp::HelloReply {
                return self.hello_reply(c, repr.eth.src, None, link);
            }
        }
        let Some(peer) = peer.filter(|p| p.session.mac == repr.eth.src) else {
            link.stats.wrong_source += 1;
            return;
        };
        match repr.msg {
            Message::Control(c) if c.op == ControlOp::HelloReply => {
                self.hello_reply(&c, repr.eth.src, Some(peer), link)
            }
            Message::IoCompletion(_) | Message::Nack(_) => self.answer(&repr.msg, link),
            Message::Interrupt(_) => self.stream_item(&repr, peer, link),
            Message::Control(c) if c.op == ControlOp::Lifecycle => self.stream_item(&repr, peer, link),
            Message::Dma(d) if !d.reply => self.dma(&d, repr.epoch, peer, link),
            _ => link.stats.unexpected_kind += 1,
        }
    }

    /// A device's DMA chunk from `peer`: checked, done against the VM's
    /// memory (a write once only), answered or refused.
    fn dma(&self, d: &Dma<'_>, epoch: u32, peer: Peer, link: &mut Link) {
        self.dma_at.store(self.born.elapsed().as_nanos() as u64, Ordering::Release);
        let refuse = |link: &mut Link, reason: NackReason| {
            link.stats.dma_refused += 1;
            let nacked = if d.dir == DmaDir::Read { Kind::DmaRead } else { Kind::DmaWrite };
            let nack = Nack { route: d.route, seq: d.seq, reason, nacked };
            let out = FrameRepr::new(EthernetRepr { dst: peer.session.mac, src: self.mac }, Message::Nack(nack));
            if !link.sealer.push(&mut link.tx, &out) {
                link.stats.tx_full += 1;
            }
        };
        let table = self.table();
        let Some((_, vm)) = table.find(d.route.vm) else {
            return refuse(link, NackReason::UnknownVm);
        };
        if vm.device(d.route.server, d.route.device).is_none() {
            return refuse(link, NackReason::NotAuthorised);
        }
        let seq = Seq(d.seq);
        if epoch != peer.session.epoch32() || seq.session() != peer.session.id {
            return refuse(link, NackReason::NoSession);
        }
        let Some(ram) = vm.ram.as_ref() else {
            return refuse(link, NackReason::OutOfRange);
        };
        let server = peer.session.server;
        let w = match link.dma_windows.iter().position(|w| w.server == server) {
            Some(i) => i,
            None => {
                link.dma_windows.push(DmaWindow::new(server, seq.session()));
                link.dma_windows.len() - 1
            }
        };
        if link.dma_windows[w].session != seq.session() {
            link.dma_windows[w] = DmaWindow::new(server, seq.session());
        }
        let mut buf = [0u8; dmfabric_dataplane::FRAME_CAP];
        let len = d.len as usize;
        let payload: &[u8] = match d.dir {
            DmaDir::Read => {
                let Some(into) = buf.get_mut(..len) else {
                    return refuse(link, NackReason::OutOfRange);
                };
                if !ram.read(d.addr, into) {
                    return refuse(link, NackReason::OutOfRange);
                }
                link.stats.dma_reads += 1;
                link.stats.dma_bytes += len as u64;
                &buf[..len]
            }
            DmaDir::Write => {
                if link.dma_windows[w].seen(seq.counter()) {
                    link.stats.dma_duplicates += 1;
                } else {
                    if !ram.write(d.addr, d.payload) {
                        return refuse(link, NackReason::OutOfRange);
                    }
                    link.dma_windows[w].mark(seq.counter());
                    link.stats.dma_writes += 1;
                    link.stats.dma_bytes += len as u64;
                }
                &[]
            }
        };
        let reply = d.reply_with(payload);
        let out = FrameRepr::new(EthernetRepr { dst: peer.session.mac, src: self.mac }, Message::Dma(reply));
        if !link.sealer.push(&mut link.tx, &out) {
            link.stats.tx_full += 1;
        }
    }

    /// A completion or Nack: to the vCPU waiting for exactly it.
    fn answer(&self, msg: &Message<'_>, link: &mut Link) {
        let route = *msg.route();
        let table = self.table();
        let Some((index, vm)) = table.find(route.vm) else {
            link.stats.unknown_vm += 1;
            return;
        };
        let Some(slot) = vm.slots.get(usize::from(route.vcpu)) else {
            link.stats.unknown_vm += 1;
            return;
        };
        let waiting = slot.expect.load(Ordering::Acquire) == msg.seq() && slot.state.load(Ordering::Acquire) == EMPTY;
        let m = slot.meta.load(Ordering::Relaxed);
        let r = slot.runs_on.load(Ordering::Relaxed);
        let from = u32::from(route.server);
        let may_answer = from == m >> 16 || from == r >> 16 || from == r & 0xffff;
        match *msg {
            Message::IoCompletion(c)
                if waiting
                    && may_answer
                    && c.addr == slot.addr.load(Ordering::Relaxed)
                    && access_bits(c.dir, c.size.bytes()) == m & 0xffff =>
            {
                slot.data.store(c.data, Ordering::Relaxed);
                slot.status.store(c.status as u8, Ordering::Relaxed);
                slot.state.store(DONE, Ordering::Release);
                link.stats.completions += 1;
                link.vm_stats[index].completions += 1;
            }
            Message::Nack(n) if waiting && may_answer => {
                slot.nack.store(n.reason as u8, Ordering::Relaxed);
                slot.state.store(NACKED, Ordering::Release);
                link.stats.nacks += 1;
            }
            _ => {
                tracing::debug!(
                    waiting,
                    seq = msg.seq(),
                    expect = slot.expect.load(Ordering::Relaxed),
                    state = slot.state.load(Ordering::Relaxed),
                    server = route.server,
                    may = r,
                    meta = m,
                    "completion not taken"
                );
                link.stats.stale_completions += 1
            }
        }
    }

    /// A HelloReply from `peer` (none yet: a first session): the answer to
    /// a Hello of a session being opened, or a server announcing a new
    /// epoch (it restarted).
    fn hello_reply(&self, c: &ControlMsg<'_>, from: MacAddr, peer: Option<Peer>, link: &mut Link) {
        let Some(body) = HelloReplyBody::parse(c.payload) else {
            link.stats.malformed += 1;
            return;
        };
        let server = c.route.server;
        let answered = link.opening.iter().position(|o| o.server == server && o.challenges.contains(&body.challenge));
        if let Some(i) = answered {
            link.opening.swap_remove(i);
            let session = Session { server, mac: from, epoch: body.epoch.get(), id: body.session.get() };
            {
                let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
                match peers.iter_mut().find(|p| p.session.server == server) {
                    Some(p) => {
                        p.session = session;
                        p.generation += 1;
                    }
                    None => peers.push(Peer { session, generation: 1 }),
                }
            }
            let route = Route { client: self.client, hypervisor: self.hypervisor, ..Route::default() };
            link.sealer.push(&mut link.tx, &hello::register_frame(self.mac, route, &session));
            link.stats.sessions_reopened += 1;
            tracing::info!(client = self.client, server, session = session.id, "session opened again");
            return;
        }
        let Some(peer) = peer else {
            link.stats.stale_hellos += 1;
            return;
        };
        let now = Instant::now();
        let announced = body.challenge == [0; CHALLENGE_LEN] && body.epoch.get() != peer.session.epoch;
        let recently = link.reopened.iter().any(|&(s, at)| s == server && now.duration_since(at) < REOPEN_MIN);
        if announced && !recently && !link.opening.iter().any(|o| o.server == server) {
            tracing::info!(client = self.client, server, "server restarted (new epoch): opening a new session");
            link.reopened.retain(|&(s, _)| s != server);
            link.reopened.push((server, now));
            link.opening.push(Opening { server, challenges: VecDeque::new(), next_send: now });
        } else {
            link.stats.stale_hellos += 1;
        }
    }

    /// An interrupt or a reset from `peer`'s device: checked against the
    /// VM's map and the stream, then injected (or passed on) and acknowledged.
    fn stream_item(&self, repr: &FrameRepr<'_>, peer: Peer, link: &mut Link) {
        let route = *repr.msg.route();
        let table = self.table();
        let Some((index, vm)) = table.find(route.vm) else {
            link.stats.unknown_vm += 1;
            return;
        };
        let granted = vm.device(route.server, route.device).is_some_and(|d| match repr.msg {
            Message::Interrupt(i) => match i.source {
                IrqSource::Line(l) => d.may_raise(l),
                IrqSource::Msi { .. } => d.msi,
            },
            Message::Control(c) => c.payload == [LIFECYCLE_RESET] && d.reset,
            _ => false,
        });
        if !granted {
            link.stats.not_granted += 1;
            return;
        }
        if vm.frozen.load(Ordering::Acquire) {
            link.stats.interrupts_refused += 1;
            return;
        }
        let seq = Seq(repr.msg.seq());
        let server = peer.session.server;
        let at = link.irq_last.iter().position(|(i, s, _)| *i == index && *s == server);
        let last = at.map(|a| link.irq_last[a].2);
        let take = if repr.epoch != peer.session.epoch32() {
            Take::Stale
        } else if last == Some(seq) {
            Take::Again
        } else if last.is_some_and(|l| seq == l.next() && seq.counter() != 0)
            || (seq.counter() == 0
                && seq.session() == peer.session.id
                && last.is_none_or(|l| l.session() != peer.session.id))
        {
            Take::New
        } else {
            Take::Stale
        };
        match take {
            Take::Stale => {
                link.stats.interrupt_stale += 1;
                return;
            }
            Take::Again => link.stats.interrupt_duplicates += 1,
            Take::New => {
                match at {
                    Some(a) => link.irq_last[a].2 = seq,
                    None => link.irq_last.push((index, server, seq)),
                }
                match repr.msg {
                    Message::Interrupt(irq) => match vm.irq.inject(irq.source, irq.trigger) {
                        Ok(()) => {
                            link.stats.interrupts += 1;
                            link.vm_stats[index].interrupts += 1;
                        }
                        Err(_) => link.stats.inject_errors += 1,
                    },
                    _ => {
                        link.stats.resets += 1;
                        if let Some(to) = lock(&self.resets).as_ref() {
                            let _ = to.send(route.vm);
                        }
                    }
                }
            }
        }
        // Acknowledge every copy: the server sends it again until one ack arrives.
        let ack = InterruptAck { route, seq: seq.0 };
        let out = FrameRepr::new(EthernetRepr { dst: peer.session.mac, src: self.mac }, Message::InterruptAck(ack));
        if link.sealer.push(&mut link.tx, &out) {
            link.stats.interrupt_acks += 1;
        } else {
            link.stats.tx_full += 1;
        }
    }
}

/// How long [`ClientPort::serve`] naps while vCPUs are busy with remote I/O.
pub const SERVE_NAP: Duration = Duration::from_millis(1);
/// How long it naps while a vCPU holds the link and device DMA is flowing.
const DMA_NAP: Duration = Duration::from_micros(20);
/// How long after the last device DMA the serve thread stays ready for the
/// next (a guest's next batch of requests).
const DMA_LINGER: Duration = Duration::from_millis(200);

/// One vCPU's streams to the servers.
pub struct VcpuRemote {
    port: Arc<ClientPort>,
    index: usize,
    vm_port: Arc<VmPort>,
    vm: u32,
    vcpu: u16,
    streams: Vec<Stream>,
    stop: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for VcpuRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRemote").field("vm", &self.vm).field("vcpu", &self.vcpu).finish()
    }
}

impl Drop for VcpuRemote {
    fn drop(&mut self) {
        // A VM started again continues these numbers.
        lock(&self.port.parked).insert((self.vm, self.vcpu), std::mem::take(&mut self.streams));
    }
}

/// Counts a vCPU as waiting for as long as it lives.
struct Waiting<'w>(&'w AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VcpuRemote {
    /// Serve one exit by the device of `target`; returns the data of a read
    /// (zero for a write, once the server has finished it).
    pub fn access(&mut self, target: &Remote, exit: &Exit) -> Result<u64, RemoteError> {
        self.access_status(target, exit).map(|(data, _)| data)
    }

    /// The next number of the stream to `device`, started in `runner`'s
    /// session if it has none (or `restart`).
    /// Returns it and the server whose session it is in.
    fn next_seq(&mut self, device: u32, runner: &Peer, restart: bool) -> (Seq, u16) {
        let fresh = Stream { device, session: runner.session.id, server: runner.session.server, next: 0 };
        let at = match self.streams.iter().position(|s| s.device == device) {
            Some(i) => i,
            None => {
                self.streams.push(fresh);
                self.streams.len() - 1
            }
        };
        let st = &mut self.streams[at];
        if restart {
            *st = fresh;
        }
        let seq = Seq::new(st.session, st.next);
        st.next = st.next.wrapping_add(1);
        (seq, st.server)
    }

    /// [`VcpuRemote::access`], with the completion's status (whether the
    /// device had such a register).
    pub fn access_status(&mut self, target: &Remote, exit: &Exit) -> Result<(u64, Status), RemoteError> {
        let port = self.port.clone();
        let (server, device) = (target.server, target.device);
        let Some(to) = self.peer_or_open(server, device)?.map(|p| p.session.mac) else {
            let known = port.servers().iter().map(|(s, _)| *s).collect();
            return Err(RemoteError::NotConfigured { server, device, known });
        };
        let Some(mut runner) = self.peer_or_open(target.runs_on, device)? else {
            let known = port.servers().iter().map(|(s, _)| *s).collect();
            return Err(RemoteError::NotConfigured { server: target.runs_on, device, known });
        };
        port.waiters.fetch_add(1, Ordering::AcqRel);
        port.activity.fetch_add(1, Ordering::Release);
        let _waiting = Waiting(&port.waiters);
        let vm_port = self.vm_port.clone();
        let slot = &vm_port.slots[usize::from(self.vcpu)];
        // A stream about to run out of numbers starts again in a new session.
        let worn = self.streams.iter().any(|s| s.device == device && s.next == u32::MAX);
        if worn {
            runner = self.new_session(target, runner)?;
        }
        let (mut seq, mut numbered_by) = self.next_seq(device, &runner, worn);
        let mut req = IoRequest {
            route: Route {
                server,
                hypervisor: port.hypervisor,
                client: port.client,
                vm: self.vm,
                vcpu: self.vcpu,
                device,
            },
            seq: seq.0,
            space: exit.space,
            dir: exit.dir,
            size: exit.size,
            addr: exit.addr,
            data: if exit.dir == Direction::Write { exit.data } else { 0 },
        };
        // What the answer must match, before the request can be sent: no
        // delivery can see the old number with the new state.
        slot.state.store(EMPTY, Ordering::Release);
        slot.addr.store(exit.addr, Ordering::Relaxed);
        slot.meta.store(meta(server, exit.dir, exit.size.bytes()), Ordering::Relaxed);
        slot.runs_on.store(u32::from(target.runs_on) << 16 | u32::from(numbered_by), Ordering::Relaxed);
        slot.expect.store(seq.0, Ordering::Release);
        let start = Instant::now();
        let mut sender = StopAndWait::new(port.retry);
        let mut epoch = runner.session.epoch32();
        self.post(Outgoing { to, req, epoch, index: self.index, retransmit: false });
        sender.sent((), seq.0, start);
        // A refusal the server may take back once its routing tables catch
        // up with the control panel (a VM just migrated here, a device just
        // added): asked again at the next timeout, until the retries run out.
        let mut refused: Option<NackReason> = None;
        loop {
            match slot.state.load(Ordering::Acquire) {
                DONE => {
                    let status = Status::from_u8(slot.status.load(Ordering::Relaxed)).unwrap_or(Status::Ok);
                    return Ok((slot.data.load(Ordering::Relaxed), status));
                }
                NACKED if refused.is_none() => {
                    let reason =
                        NackReason::from_u8(slot.nack.load(Ordering::Relaxed)).unwrap_or(NackReason::UnknownDevice);
                    if reason == NackReason::NoSession {
                        // The server has no state for this stream and did
                        // not run the request: start the stream again in a
                        // new session, and send it there.
                        runner = self.new_session(target, runner)?;
                        (seq, numbered_by) = self.next_seq(device, &runner, true);
                        epoch = runner.session.epoch32();
                        req.seq = seq.0;
                        slot.runs_on.store(u32::from(target.runs_on) << 16 | u32::from(numbered_by), Ordering::Relaxed);
                        slot.state.store(EMPTY, Ordering::Release);
                        slot.expect.store(seq.0, Ordering::Release);
                        sender = StopAndWait::new(port.retry);
                        self.post(Outgoing { to, req, epoch, index: self.index, retransmit: false });
                        sender.sent((), seq.0, Instant::now());
                        continue;
                    }
                    let may_pass =
                        matches!(reason, NackReason::UnknownVm | NackReason::UnknownDevice | NackReason::NotAuthorised);
                    if !may_pass {
                        return Err(RemoteError::Nacked { server, device, reason });
                    }
                    refused = Some(reason);
                }
                _ => {}
            }
            if self.stop.as_ref().is_some_and(|s| s.load(Ordering::Acquire)) {
                return Err(RemoteError::Stopped { server });
            }
            match sender.poll(Instant::now()) {
                Due::Resend(()) => {
                    // After a refusal, listen for this request's answer
                    // again (an answer that came meanwhile stays).
                    refused = None;
                    let _ = slot.state.compare_exchange(NACKED, EMPTY, Ordering::AcqRel, Ordering::Acquire);
                    self.post(Outgoing { to, req, epoch, index: self.index, retransmit: true });
                }
                Due::GaveUp(()) => {
                    return Err(match refused {
                        Some(reason) => RemoteError::Nacked { server, device, reason },
                        None => RemoteError::Unreachable {
                            server,
                            device,
                            addr: exit.addr,
                            tries: port.retry.retries + 1,
                            waited: start.elapsed(),
                        },
                    });
                }
                Due::Waiting | Due::Idle => {}
            }
            self.pump();
        }
    }

    /// Deliver what arrived if nobody else holds the link.
    fn pump(&self) {
        match self.port.try_hold() {
            Some(mut held) => {
                // A transport error here surfaces as the request's timeout.
                let _ = self.port.poll(&mut held.link);
            }
            // The serve thread holds it: let it run if it waits for this
            // core (a vCPU spinning here while the serve thread it
            // preempted holds the link would spin out its time slice).
            None => std::thread::yield_now(),
        }
    }

    /// Server `server`'s session; with `open_on_demand`, a first one opened
    /// now if there is none (`None` without). For `device`'s request.
    fn peer_or_open(&self, server: u16, device: u32) -> Result<Option<Peer>, RemoteError> {
        if let Some(p) = self.port.peer(server) {
            return Ok(Some(p));
        }
        if !self.port.open_on_demand {
            return Ok(None);
        }
        self.wait_session(server, device, 0).map(Some)
    }

    /// Ask for a new session with the server running `target`'s device and
    /// wait for it (bounded by the hello timeout).
    fn new_session(&self, target: &Remote, was: Peer) -> Result<Peer, RemoteError> {
        self.wait_session(target.runs_on, target.device, was.generation)
    }

    /// Ask for a session with `server` newer than `generation` and wait for it.
    fn wait_session(&self, server: u16, device: u32, generation: u64) -> Result<Peer, RemoteError> {
        let port = &self.port;
        let _ = port.reopen.push(server);
        let start = Instant::now();
        loop {
            if let Some(p) = port.peer(server).filter(|p| p.generation > generation) {
                return Ok(p);
            }
            if self.stop.as_ref().is_some_and(|s| s.load(Ordering::Acquire)) {
                return Err(RemoteError::Stopped { server });
            }
            if start.elapsed() > port.hello_timeout {
                return Err(RemoteError::NoSession { server, device, waited: start.elapsed() });
            }
            self.pump();
        }
    }

    /// Put a request in the port's outbox (it has room for one per vCPU).
    fn post(&self, out: Outgoing) {
        let mut out = out;
        while let Err(back) = self.port.outbox.push(out) {
            out = back;
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devmap::DeviceMap;
    use crate::kvm::KvmError;
    use dmfabric_dataplane::mem::{self, MemTransport};
    use dmfabric_testkit::keys;
    use dmfabric_wire::session::HelloBody;
    use dmfabric_wire::{AccessSize, IoCompletion, Kind, Nack, Space, Trigger};

    const CLIENT_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);
    const SERVER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);
    const FORGER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x66]);
    const EPOCH: u64 = 0xfeed_0000_0000_0001;

    /// Records what would have been injected.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(IrqSource, Trigger)>>);

    impl IrqSink for Recorder {
        fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), KvmError> {
            self.0.lock().unwrap().push((source, trigger));
            Ok(())
        }
    }

    /// Server 1's side of the link, as a test plays it: it answers Hellos
    /// with sessions 100, 101, ... and seals what it sends with client 3's key.
    struct FakeServer {
        t: MemTransport,
        epoch: u64,
        next_session: u32,
        /// The session last offered.
        session: u32,
    }

    impl FakeServer {
        fn new(t: MemTransport) -> FakeServer {
            FakeServer { t, epoch: EPOCH, next_session: 100, session: 0 }
        }

        /// `msg` from this server, sealed with client 3's key (or `client`'s).
        fn send_as(&mut self, msg: Message<'_>, src: MacAddr, client: u16) {
            let mut repr = FrameRepr::new(EthernetRepr { dst: CLIENT_MAC, src }, msg);
            repr.epoch = self.epoch as u32;
            let mut b = FrameBatch::new();
            b.push(&keys::sealed(&repr, client));
            self.t.send(&mut b).unwrap();
        }

        fn send(&mut self, msg: Message<'_>) {
            self.send_as(msg, SERVER_MAC, 3);
        }

        /// A HelloReply with `body` (asked for or not).
        fn hello_reply(&mut self, route: Route, body: &HelloReplyBody) {
            self.send(Message::Control(ControlMsg { route, seq: 0, op: ControlOp::HelloReply, payload: body.bytes() }));
        }

        /// What the client sent, answering Hellos (and dropping Registers).
        fn received(&mut self) -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            let _ = self.t.recv(64, &mut |f| frames.push(f.to_vec()));
            let mut out = Vec::new();
            for f in frames {
                let repr = FrameRepr::parse_bytes(&f).unwrap();
                let fr = Frame::new_checked(&f[..]).unwrap();
                keys::ring(3).verify(&fr).expect("the client seals what it sends");
                match repr.msg {
                    Message::Control(c) if c.op == ControlOp::Hello => {
                        let challenge = HelloBody::parse(c.payload).unwrap().challenge;
                        self.session = self.next_session;
                        self.next_session += 1;
                        let body = HelloReplyBody::new(challenge, self.epoch, self.session);
                        let route = Route { server: 1, ..c.route };
                        self.send(Message::Control(ControlMsg {
                            route,
                            seq: c.seq,
                            op: ControlOp::HelloReply,
                            payload: body.bytes(),
                        }));
                    }
                    Message::Control(c) if c.op == ControlOp::Register => {}
                    _ => out.push(f),
                }
            }
            out
        }
    }

    fn route(client: u16, vm: u32, vcpu: u16) -> Route {
        Route { server: 1, hypervisor: 1, client, vm, vcpu, device: 1 }
    }

    fn completion(r: Route, seq: u64, data: u64) -> Message<'static> {
        Message::IoCompletion(IoCompletion {
            route: r,
            seq,
            space: Space::Pio,
            dir: Direction::Read,
            size: AccessSize::B4,
            addr: 0x500,
            data,
            status: Status::Ok,
        })
    }

    fn irq(r: Route, seq: Seq, source: IrqSource, trigger: Trigger) -> Message<'static> {
        Message::Interrupt(dmfabric_wire::Interrupt { route: r, seq: seq.0, source, trigger })
    }

    fn config(servers: Vec<u16>) -> ClientConfig {
        ClientConfig {
            client: 3,
            hypervisor: 1,
            servers,
            retry: Retry { timeout: Duration::from_millis(50), retries: 3 },
            hello_timeout: Duration::from_secs(2),
            sealer: Sealer::new(keys::ring(3)),
            open_on_demand: false,
        }
    }

    /// VM `id`'s map: device 1 on server 1 at 0x500, raising line 5;
    /// device 2 there too, resetting the VM.
    fn map() -> Arc<LiveMap> {
        let mut m = DeviceMap::default();
        m.add(Space::Pio, 0x500, 0x100, Target::Remote(Remote::new(1, 1).lines(&[5]))).unwrap();
        m.add(Space::Pio, 0x60, 1, Target::Remote(Remote::new(1, 2).resets())).unwrap();
        Arc::new(LiveMap::from_pointee(m))
    }

    fn entry(id: u32, vcpus: u16, rec: &Arc<Recorder>) -> VmEntry {
        VmEntry { id, vcpus, irq: rec.clone(), map: map(), ram: None }
    }

    /// A port of client 3 with `vms`, connected to server 1 (played by the test).
    fn connected(vms: &[VmEntry]) -> (Arc<ClientPort>, FakeServer) {
        let (client_t, server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        let mut server = FakeServer::new(server_t);
        let port = std::thread::scope(|s| {
            let c = s.spawn(|| ClientPort::connect(Box::new(client_t), &config(vec![1]), vms).unwrap());
            while !c.is_finished() {
                server.received();
            }
            c.join().unwrap()
        });
        server.received(); // the Register
        (Arc::new(port), server)
    }

    /// A VM's memory as a vector.
    struct VecRam(Mutex<Vec<u8>>);

    impl DmaMemory for VecRam {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let m = self.0.lock().unwrap();
            let Some(src) = usize::try_from(addr).ok().and_then(|a| m.get(a..a.checked_add(buf.len())?)) else {
                return false;
            };
            buf.copy_from_slice(src);
            true
        }
        fn write(&self, addr: u64, data: &[u8]) -> bool {
            let mut m = self.0.lock().unwrap();
            let Some(dst) = usize::try_from(addr).ok().and_then(|a| m.get_mut(a..a.checked_add(data.len())?)) else {
                return false;
            };
            dst.copy_from_slice(data);
            true
        }
    }

    fn dma_msg(r: Route, seq: Seq, dir: DmaDir, addr: u64, len: u32, payload: &[u8]) -> Message<'_> {
        Message::Dma(Dma { route: r, seq: seq.0, dir, reply: false, addr, len, payload })
    }

    /// What the client answered: (seq, the DMA reply's payload) or (seq, the Nack's reason).
    fn dma_answers(server: &mut FakeServer) -> Vec<(u64, Result<Vec<u8>, NackReason>)> {
        server
            .received()
            .iter()
            .map(|f| match FrameRepr::parse_bytes(f).unwrap().msg {
                Message::Dma(d) => {
                    assert!(d.reply);
                    (d.seq, Ok(d.payload.to_vec()))
                }
                Message::Nack(n) => (n.seq, Err(n.reason)),
                other => panic!("not a DMA answer: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn device_dma_is_done_once_inside_the_vm_and_refused_elsewhere() {
        let rec = Arc::new(Recorder::default());
        let ram = Arc::new(VecRam(Mutex::new(vec![0u8; 0x10000])));
        let vm = VmEntry { ram: Some(ram.clone()), ..entry(7, 1, &rec) };
        let (port, mut server) = connected(&[vm]);
        let r = route(3, 7, 0);
        let session = server.session;
        let s = |c| Seq::new(session, c);
        let (s0, s1, s2) = (s(0), s(1), s(2));
        server.send(dma_msg(r, s0, DmaDir::Write, 0x100, 4, &[1, 2, 3, 4]));
        server.send(dma_msg(r, s1, DmaDir::Read, 0xfe, 8, &[]));
        port.poll_once().unwrap();
        assert_eq!(dma_answers(&mut server), [(s0.0, Ok(vec![])), (s1.0, Ok(vec![0, 0, 1, 2, 3, 4, 0, 0]))]);
        // The guest changes the bytes; the write again (its answer was lost)
        // is acknowledged, not applied a second time.
        ram.0.lock().unwrap()[0x100] = 9;
        server.send(dma_msg(r, s0, DmaDir::Write, 0x100, 4, &[1, 2, 3, 4]));
        port.poll_once().unwrap();
        assert_eq!(dma_answers(&mut server), [(s0.0, Ok(vec![]))]);
        assert_eq!(ram.0.lock().unwrap()[0x100], 9);
        // Outside the RAM, another VM, a device the VM does not have on this
        // server, another session: refused, nothing written.
        server.send(dma_msg(r, s2, DmaDir::Write, 0xfffe, 4, &[7; 4]));
        server.send(dma_msg(Route { vm: 8, ..r }, s(3), DmaDir::Read, 0, 4, &[]));
        server.send(dma_msg(Route { device: 5, ..r }, s(4), DmaDir::Read, 0, 4, &[]));
        server.send(dma_msg(r, Seq::new(session + 1, 5), DmaDir::Read, 0, 4, &[]));
        port.poll_once().unwrap();
        let answers: Vec<_> = dma_answers(&mut server).into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            answers,
            [
                Err(NackReason::OutOfRange),
                Err(NackReason::UnknownVm),
                Err(NackReason::NotAuthorised),
                Err(NackReason::NoSession)
            ]
        );
        assert_eq!(&ram.0.lock().unwrap()[0xfffe..], &[0, 0]);
        let st = port.stats();
        assert_eq!((st.dma_writes, st.dma_reads, st.dma_duplicates, st.dma_refused), (1, 1, 1, 4), "{st:?}");
    }

    #[test]
    fn the_dma_window_tells_duplicates_across_its_span() {
        let mut w = DmaWindow::new(1, 5);
        for c in [0, 1, 3] {
            assert!(!w.seen(c));
            w.mark(c);
            assert!(w.seen(c));
        }
        assert!(!w.seen(2), "never applied");
        for c in [2000, 1500] {
            w.mark(c);
        }
        assert!(w.seen(2000) && w.seen(1500) && !w.seen(1501));
        assert!(w.seen(2) && w.seen(3), "older than the window: taken as applied");
        assert!(!w.seen(1999) && !w.seen(2001));
        w.mark(2001 + DMA_WINDOW_BITS * 3);
        assert!(!w.seen(2001 + DMA_WINDOW_BITS * 3 - 1) && w.seen(2001 + DMA_WINDOW_BITS * 3));
    }

    #[test]
    fn frames_for_others_and_bad_frames_are_counted_never_delivered() {
        let rec = Arc::new(Recorder::default());
        let (port, mut server) = connected(&[entry(7, 2, &rec)]);
        let s = Seq::new(server.session, 0);
        server.send(completion(route(3, 9, 0), s.0, 1)); // unknown VM
        server.send(completion(route(3, 7, 5), s.0, 1)); // unknown vCPU
        server.send_as(completion(route(4, 7, 0), s.0, 1), SERVER_MAC, 4); // another client's key
        server.send(completion(route(4, 7, 0), s.0, 1)); // naming another client
        server.send(irq(route(3, 8, 0), s, IrqSource::Line(5), Trigger::Edge)); // a VM this client does not run
        server.send(completion(route(3, 7, 0), s.0, 1)); // nobody waits: stale
        let mut b = FrameBatch::new();
        b.push(&[0xff; 20]);
        b.push(&[0u8; 70]);
        server.t.send(&mut b).unwrap();
        assert_eq!(port.poll_once().unwrap(), 8);
        let st = port.stats();
        assert_eq!((st.unknown_vm, st.other_client, st.stale_completions), (3, 1, 1), "{st:?}");
        assert_eq!((st.unauthenticated, st.malformed + st.foreign), (1, 2), "{st:?}");
        assert_eq!((st.interrupts, st.completions), (0, 0), "{st:?}");
        assert!(rec.0.lock().unwrap().is_empty(), "nothing injected");
        assert!(server.received().is_empty(), "nothing acknowledged");
    }

    #[test]
    fn forged_interrupts_resets_and_hello_replies_are_not_taken() {
        let rec = Arc::new(Recorder::default());
        let (port, mut server) = connected(&[entry(7, 1, &rec)]);
        let (resets_tx, resets) = crossbeam_channel::unbounded();
        port.notify_resets(resets_tx);
        let s0 = Seq::new(server.session, 0);
        let r = route(3, 7, 0);
        // Unsealed (a forger without keys): nothing.
        let forged = FrameRepr::new(
            EthernetRepr { dst: CLIENT_MAC, src: SERVER_MAC },
            irq(r, s0, IrqSource::Line(5), Trigger::Edge),
        );
        let mut b = FrameBatch::new();
        b.push(&keys::unsealed(&forged));
        let reset = [LIFECYCLE_RESET];
        let lifecycle =
            ControlMsg { route: Route { device: 2, ..r }, seq: s0.0, op: ControlOp::Lifecycle, payload: &reset };
        b.push(&keys::unsealed(&FrameRepr::new(
            EthernetRepr { dst: CLIENT_MAC, src: SERVER_MAC },
            Message::Control(lifecycle),
        )));
        server.t.send(&mut b).unwrap();
        // Sealed but from another MAC, another server id, a line or MSI the
        // device may not raise, a reset from a device with no reset line.
        server.send_as(irq(r, s0, IrqSource::Line(5), Trigger::Edge), FORGER_MAC, 3);
        server.send(irq(Route { server: 2, ..r }, s0, IrqSource::Line(5), Trigger::Edge));
        server.send(irq(r, s0, IrqSource::Line(2), Trigger::Edge));
        server.send(irq(r, s0, IrqSource::Msi { address: 0xfee0_0000, data: 0x4400 }, Trigger::Edge));
        server.send(Message::Control(ControlMsg { route: r, seq: s0.0, op: ControlOp::Lifecycle, payload: &reset }));
        // A HelloReply nobody asked for, with a new session: not taken.
        server.hello_reply(r, &HelloReplyBody::new([9; CHALLENGE_LEN], EPOCH, 555));
        port.poll_once().unwrap();
        let st = port.stats();
        assert_eq!((st.unauthenticated, st.wrong_source, st.not_granted, st.stale_hellos), (2, 2, 3, 1), "{st:?}");
        assert!(rec.0.lock().unwrap().is_empty(), "nothing injected");
        assert!(resets.try_recv().is_err(), "no reset");
        assert!(server.received().is_empty(), "nothing acknowledged");
        assert_eq!(port.servers(), vec![(1, SERVER_MAC)]);
        // The real ones are taken.
        server.send(irq(r, s0, IrqSource::Line(5), Trigger::Edge));
        let reset =
            ControlMsg { route: Route { device: 2, ..r }, seq: s0.next().0, op: ControlOp::Lifecycle, payload: &reset };
        server.send(Message::Control(reset));
        port.poll_once().unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        assert_eq!(resets.try_recv(), Ok(7));
        assert_eq!(server.received().len(), 2, "both acknowledged");
    }

    #[test]
    fn interrupts_are_taken_only_as_the_next_of_their_stream() {
        let (rec7, rec8) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let (port, mut server) = connected(&[entry(7, 1, &rec7), entry(8, 1, &rec8)]);
        let (up, down) = (Trigger::Level { asserted: true }, Trigger::Level { asserted: false });
        let s = |n| Seq::new(server.session, n);
        let line = IrqSource::Line(5);
        let (s0, s1, s2) = (s(0), s(1), s(2));
        server.send(irq(route(3, 7, 0), s0, line, up));
        server.send(irq(route(3, 7, 0), s0, line, up)); // retransmit: ack again, do not inject
        server.send(irq(route(3, 7, 0), s2, line, down)); // not the next
        server.send(irq(route(3, 7, 0), s1, line, down));
        server.send(irq(route(3, 7, 0), Seq::new(server.session, u32::MAX), line, up)); // a huge one
        server.send(irq(route(3, 7, 0), s2, line, up)); // still taken: nothing was poisoned
        server.send(irq(route(3, 8, 0), s0, line, Trigger::Edge));
        server.send(irq(route(3, 8, 0), Seq::new(server.session + 50, 0), line, Trigger::Edge)); // no such session
        port.poll_once().unwrap();
        assert_eq!(*rec7.0.lock().unwrap(), vec![(line, up), (line, down), (line, up)]);
        assert_eq!(*rec8.0.lock().unwrap(), vec![(line, Trigger::Edge)]);
        let st = port.stats();
        assert_eq!((st.interrupts, st.interrupt_duplicates, st.interrupt_stale, st.interrupt_acks), (4, 1, 3, 5));
        let acks: Vec<(u32, u32)> = server
            .received()
            .iter()
            .map(|f| match FrameRepr::parse_bytes(f).unwrap().msg {
                Message::InterruptAck(a) => (a.route.vm, Seq(a.seq).counter()),
                other => panic!("not an ack: {other:?}"),
            })
            .collect();
        assert_eq!(acks, vec![(7, 0), (7, 0), (7, 1), (7, 2), (8, 0)]);
        assert_eq!(port.vm_stats(7).unwrap().interrupts, 3);
    }

    /// Answer `refusals` to the client's requests in turn, then complete the
    /// next with 0x1234; answers Hellos meanwhile. Returns the requests seen.
    fn refusing(server: &mut FakeServer, refusals: Vec<NackReason>, stop: &AtomicBool) -> Vec<IoRequest> {
        let end = Instant::now() + Duration::from_secs(5);
        let mut refusals = refusals.into_iter();
        let mut seen = Vec::new();
        while Instant::now() < end && !stop.load(Ordering::Acquire) {
            for f in server.received() {
                let Message::IoRequest(req) = FrameRepr::parse_bytes(&f).unwrap().msg else { continue };
                seen.push(req);
                match refusals.next() {
                    Some(reason) => server.send(Message::Nack(Nack {
                        route: req.route,
                        seq: req.seq,
                        reason,
                        nacked: Kind::IoRequest,
                    })),
                    None => {
                        server.send(completion(req.route, req.seq, 0x1234));
                        return seen;
                    }
                }
            }
        }
        seen
    }

    fn exit() -> Exit {
        Exit { space: Space::Pio, addr: 0x500, size: AccessSize::B4, dir: Direction::Read, data: 0 }
    }

    #[test]
    fn refusals_a_lagging_server_may_take_back_are_asked_again_others_are_final() {
        let rec = Arc::new(Recorder::default());
        let target = Remote::new(1, 1);
        // A VM the server's tables do not know yet, twice: the third try is answered.
        let (port, mut server) = connected(&[entry(7, 1, &rec)]);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let srv = s.spawn(|| refusing(&mut server, vec![NackReason::UnknownVm, NackReason::NotAuthorised], &stop));
            assert_eq!(port.vcpu(7, 0, None).unwrap().access(&target, &exit()).unwrap(), 0x1234);
            let seen = srv.join().unwrap();
            assert_eq!(seen.len(), 3);
            assert!(seen.iter().all(|r| r.seq == seen[0].seq), "the same request asked again");
            let st = port.stats();
            assert_eq!((st.nacks, st.retransmits, st.completions), (2, 2, 1), "{st:?}");
        });
        // A refusal no table change undoes (the request named another server): at once.
        let (port, mut server) = connected(&[entry(7, 1, &rec)]);
        std::thread::scope(|s| {
            let srv = s.spawn(|| refusing(&mut server, vec![NackReason::WrongServer], &stop));
            let err = port.vcpu(7, 0, None).unwrap().access(&target, &exit()).unwrap_err();
            assert!(matches!(err, RemoteError::Nacked { reason: NackReason::WrongServer, .. }), "{err}");
            assert_eq!(port.stats().retransmits, 0);
            stop.store(true, Ordering::Release);
            srv.join().unwrap();
        });
    }

    #[test]
    fn a_lost_stream_is_started_again_in_a_new_session() {
        let rec = Arc::new(Recorder::default());
        let (port, mut server) = connected(&[entry(7, 1, &rec)]);
        let first_session = server.session;
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let srv = s.spawn(|| refusing(&mut server, vec![NackReason::NoSession], &stop));
            let mut vcpu = port.vcpu(7, 0, None).unwrap();
            assert_eq!(vcpu.access(&Remote::new(1, 1), &exit()).unwrap(), 0x1234);
            let seen = srv.join().unwrap();
            assert_eq!(seen.len(), 2);
            assert_eq!(Seq(seen[0].seq), Seq::new(first_session, 0));
            assert_eq!(Seq(seen[1].seq), Seq::new(first_session + 1, 0), "counter 0 of the new session");
            assert_eq!(port.stats().sessions_reopened, 1);
        });
        // The numbers go on after the vCPU (a VM launched again continues them).
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let srv = s.spawn(|| refusing(&mut server, vec![], &stop));
            port.vcpu(7, 0, None).unwrap().access(&Remote::new(1, 1), &exit()).unwrap();
            let seen = srv.join().unwrap();
            assert_eq!(Seq(seen[0].seq), Seq::new(first_session + 1, 1));
        });
    }

    #[test]
    fn a_server_announcing_a_new_epoch_gets_a_new_session() {
        let rec = Arc::new(Recorder::default());
        let (port, mut server) = connected(&[entry(7, 1, &rec)]);
        let before = server.session;
        // The server restarted: its epoch is new; it announces it.
        server.epoch += 1;
        let body = HelloReplyBody::new([0; CHALLENGE_LEN], server.epoch, 0);
        let r = route(3, 0, 0);
        server.send(Message::Control(ControlMsg {
            route: r,
            seq: 0,
            op: ControlOp::HelloReply,
            payload: body.bytes(),
        }));
        let end = Instant::now() + Duration::from_secs(2);
        while port.stats().sessions_reopened == 0 && Instant::now() < end {
            port.poll_once().unwrap();
            server.received();
        }
        assert_eq!(server.session, before + 1, "a Hello came and its answer was taken");
        assert_eq!(port.stats().sessions_reopened, 1);
        // An announcement replayed: no new session.
        server.hello_reply(r, &body);
        port.poll_once().unwrap();
        assert!(server.received().is_empty());
    }

    #[test]
    fn a_vcpu_takes_only_its_own_completion() {
        let rec = Arc::new(Recorder::default());
        let (port, mut server) = connected(&[entry(7, 2, &rec)]);
        std::thread::scope(|s| {
            let srv = s.spawn(|| {
                let end = Instant::now() + Duration::from_secs(5);
                while Instant::now() < end {
                    for f in server.received() {
                        let Message::IoRequest(req) = FrameRepr::parse_bytes(&f).unwrap().msg else { continue };
                        // Another number, another vCPU, another address, another server, a write: not it.
                        server.send(completion(req.route, req.seq + 5, 0xbad));
                        server.send(completion(Route { vcpu: 1, ..req.route }, req.seq, 0xbad));
                        let mut other =
                            IoCompletion { addr: 0x504, ..IoCompletion::for_request(&req, 0xbad, Status::Ok) };
                        server.send(Message::IoCompletion(other));
                        other = IoCompletion { route: Route { server: 2, ..req.route }, ..other };
                        other.addr = req.addr;
                        server.send(Message::IoCompletion(other));
                        let write = IoCompletion {
                            dir: Direction::Write,
                            ..IoCompletion::for_request(&req, 0xbad, Status::Ok)
                        };
                        server.send(Message::IoCompletion(write));
                        server.send(completion(req.route, req.seq, 0x1234));
                        return;
                    }
                }
                panic!("no request came");
            });
            let mut vcpu = port.vcpu(7, 0, None).unwrap();
            assert_eq!(vcpu.access(&Remote::new(1, 1), &exit()).unwrap(), 0x1234);
            srv.join().unwrap();
            let st = port.stats();
            assert_eq!((st.requests, st.completions, st.stale_completions + st.wrong_source), (1, 1, 5), "{st:?}");
            assert!(matches!(port.vcpu(7, 2, None), Err(RemoteError::UnknownVcpu { .. })));
            assert!(matches!(port.vcpu(9, 0, None), Err(RemoteError::UnknownVm(9))));
        });
    }

    #[test]
    fn a_device_on_a_server_not_configured_is_said_so() {
        let rec = Arc::new(Recorder::default());
        let (port, _server) = connected(&[entry(7, 1, &rec)]);
        let err = port.vcpu(7, 0, None).unwrap().access(&Remote::new(9, 1), &exit()).unwrap_err();
        assert!(matches!(err, RemoteError::NotConfigured { server: 9, device: 1, .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not one of this client's servers") && !msg.contains("running"), "{msg}");
    }
}
