//! The client platform's data plane: one transport shared by every VM and
//! vCPU of this client process.
//!
//! - **Requests.** An exit aimed at a device on a server becomes one
//!   IoRequest frame carrying every id of the wire header. Each vCPU is a
//!   stop-and-wait stream (sequence numbers from 0 after [`ClientPort::connect`],
//!   whose Hello makes the servers forget this client's earlier streams): it
//!   sends, then polls the transport itself (run to completion, DESIGN.md's
//!   small-host layout) until its completion shows up in its slot,
//!   retransmitting on a timeout and giving up with a clear error after the
//!   retry limit. Frames for other vCPUs that it receives on the way are put
//!   in their slots.
//! - **Interrupts.** An Interrupt frame for one of this client's VMs is
//!   acknowledged and injected into that VM only; its sequence number
//!   (per server and VM) drops retransmitted and out-of-date copies, so an
//!   edge fires once and a level ends where the device left it. Whoever
//!   holds the transport delivers them: a waiting vCPU, or the
//!   [`ClientPort::serve`] thread while every vCPU is in its guest.
//! - **Bad input.** Completions for unknown VMs or vCPUs, stale or duplicate
//!   completions, other clients' frames and malformed frames are dropped and
//!   counted, never delivered.
//!
//! All mutable state sits behind one lock, taken per burst; a vCPU that finds
//! it taken spins on its own slot instead.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::{FrameBatch, Transport, TransportError};
use dmfabric_wire::{
    ControlOp, Direction, EthernetRepr, FrameRepr, Interrupt, InterruptAck, IoRequest, IrqSource, MacAddr, Message,
    NackReason, Route, Status, Trigger, LIFECYCLE_RESET,
};

use crate::kvm::{Exit, Kick, Vm};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("No answer from server {server} to Hello within {waited:?}: is `dmfabric server --server-id {server}` running on this link?")]
    NoServer { server: u16, waited: Duration },
    #[error("Server {server} did not answer device {device} at {addr:#x} after {tries} tries over {waited:?}: stopping the VM")]
    Unreachable { server: u16, device: u32, addr: u64, tries: u32, waited: Duration },
    #[error("Server {server} refused device {device}: {reason:?}")]
    Nacked { server: u16, device: u32, reason: NackReason },
    #[error("VM {0} is not one of this client's VMs")]
    UnknownVm(u32),
    #[error("vCPU {vcpu} is out of range: VM {vm} has {vcpus}")]
    UnknownVcpu { vm: u32, vcpu: u16, vcpus: usize },
    #[error("stopped while waiting for server {server}: {reason}")]
    Stopped { server: u16, reason: String },
}

/// Where a VM's interrupts go: the VM itself, or a test's recorder.
pub trait IrqSink: Sync {
    fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), String>;
}

impl IrqSink for Vm {
    fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), String> {
        self.irq_handle().inject(source, trigger)
    }
}

impl IrqSink for crate::kvm::IrqHandle {
    fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), String> {
        let r = match (source, trigger) {
            (IrqSource::Line(gsi), Trigger::Level { asserted }) => self.set_line(gsi, asserted),
            (IrqSource::Line(gsi), Trigger::Edge) => self.set_line(gsi, true).and_then(|()| self.set_line(gsi, false)),
            (IrqSource::Msi { address, data }, _) => self.signal_msi(address, data),
        };
        r.map_err(|e| e.to_string())
    }
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
    /// Interrupts older than one already delivered for that VM: acknowledged, dropped.
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

/// Where a vCPU's answer lands. Written only under the link lock.
#[derive(Debug)]
struct Slot {
    /// The sequence number the vCPU waits for (u64::MAX: none).
    expect: AtomicU64,
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
            state: AtomicU8::new(EMPTY),
            data: AtomicU64::new(0),
            nack: AtomicU8::new(0),
            status: AtomicU8::new(0),
        }
    }
}

/// Where a VM's interrupts go: borrowed for the VMs a port starts with,
/// shared for those that join it later.
enum IrqRef<'a> {
    Borrowed(&'a dyn IrqSink),
    Shared(Arc<dyn IrqSink + Send>),
}

impl IrqRef<'_> {
    fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), String> {
        match self {
            IrqRef::Borrowed(s) => s.inject(source, trigger),
            IrqRef::Shared(s) => s.inject(source, trigger),
        }
    }
}

struct VmPort<'a> {
    irq: IrqRef<'a>,
    slots: Box<[Slot]>,
    /// A device model asked for a reset of this VM.
    reset: AtomicBool,
    /// Being saved to migrate: its interrupts are refused.
    frozen: AtomicBool,
}

impl<'a> VmPort<'a> {
    fn new(vcpus: u16, irq: IrqRef<'a>) -> VmPort<'a> {
        VmPort {
            irq,
            slots: (0..vcpus.max(1)).map(|_| Slot::new()).collect(),
            reset: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
        }
    }
}

/// The VMs of a port: indices never change (a VM that joins again gets
/// its old index), so counters and vCPUs can keep them.
struct VmTable<'a> {
    ports: Vec<Arc<VmPort<'a>>>,
    by_id: std::collections::HashMap<u32, usize>,
}

impl<'a> VmTable<'a> {
    fn find(&self, vm: u32) -> Option<(usize, &Arc<VmPort<'a>>)> {
        let &i = self.by_id.get(&vm)?;
        Some((i, &self.ports[i]))
    }
}

/// Everything that changes per frame, behind the link lock.
struct Link<T> {
    t: T,
    tx: FrameBatch,
    stats: ClientStats,
    vm_stats: Vec<VmRemoteStats>,
    /// Last interrupt sequence delivered per (VM index, server).
    irq_last: Vec<(usize, u16, u64)>,
}

/// A VM this client runs: its id, vCPU count and where its interrupts go.
#[derive(Clone, Copy)]
pub struct VmEntry<'a> {
    pub id: u32,
    pub vcpus: u16,
    pub irq: &'a dyn IrqSink,
}

impl std::fmt::Debug for VmEntry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmEntry").field("id", &self.id).field("vcpus", &self.vcpus).finish()
    }
}

/// Who this client is and how patient it is.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub client: u16,
    pub hypervisor: u16,
    /// The servers to find on the link.
    pub servers: Vec<u16>,
    pub retry: Retry,
    /// How long to wait for each server's Hello reply.
    pub hello_timeout: Duration,
}

/// A client platform's connection to its servers, shared by all its vCPUs.
pub struct ClientPort<'a, T> {
    client: u16,
    hypervisor: u16,
    mac: MacAddr,
    servers: Vec<(u16, MacAddr)>,
    vms: RwLock<VmTable<'a>>,
    retry: Retry,
    link: Mutex<Link<T>>,
    /// vCPUs inside [`VcpuRemote::access`]: they deliver what arrives, so
    /// the [`ClientPort::serve`] thread stays out of their way.
    waiters: AtomicUsize,
    /// Remote accesses started so far: while it moves, the vCPUs deliver
    /// what arrives within one exit and the serve thread only naps.
    activity: AtomicU64,
}

impl<T> std::fmt::Debug for ClientPort<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPort")
            .field("client", &self.client)
            .field("servers", &self.servers)
            .field("vms", &self.vms.read().map_or(0, |t| t.ports.len()))
            .finish()
    }
}

impl<'a, T: Transport> ClientPort<'a, T> {
    /// Find every server of `cfg` on the link (broadcast Hello, which also
    /// makes it forget this client's earlier streams) and serve `vms`.
    pub fn connect(mut t: T, cfg: &ClientConfig, vms: &[VmEntry<'a>]) -> Result<Self, RemoteError> {
        let mut servers = Vec::new();
        for &server in &cfg.servers {
            let route = Route { server, client: cfg.client, hypervisor: cfg.hypervisor, ..Route::default() };
            let Some((mac, _)) = dmfabric_dataplane::hello::discover(&mut t, route, Some(server), cfg.hello_timeout)?
            else {
                return Err(RemoteError::NoServer { server, waited: cfg.hello_timeout });
            };
            servers.push((server, mac));
        }
        let mut table = VmTable { ports: Vec::new(), by_id: std::collections::HashMap::new() };
        for v in vms {
            table.by_id.insert(v.id, table.ports.len());
            table.ports.push(Arc::new(VmPort::new(v.vcpus, IrqRef::Borrowed(v.irq))));
        }
        let ports = &table.ports;
        let link = Link {
            tx: FrameBatch::new(),
            stats: ClientStats::default(),
            vm_stats: vec![VmRemoteStats::default(); ports.len()],
            irq_last: Vec::new(),
            t,
        };
        Ok(ClientPort {
            client: cfg.client,
            hypervisor: cfg.hypervisor,
            mac: link.t.mac(),
            servers,
            vms: RwLock::new(table),
            retry: cfg.retry,
            link: Mutex::new(link),
            waiters: AtomicUsize::new(0),
            activity: AtomicU64::new(0),
        })
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, VmTable<'a>> {
        self.vms.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve VM `vm` too from now on (a VM launched or migrated here while
    /// the port runs); its interrupts go to `irq`. A VM that was here
    /// before starts afresh (new vCPU slots, same counters).
    pub fn add_vm(&self, vm: u32, vcpus: u16, irq: Arc<dyn IrqSink + Send>) {
        let port = Arc::new(VmPort::new(vcpus, IrqRef::Shared(irq)));
        let mut link = self.lock();
        let mut table = self.vms.write().unwrap_or_else(|e| e.into_inner());
        match table.by_id.get(&vm) {
            Some(&i) => table.ports[i] = port,
            None => {
                let i = table.ports.len();
                table.by_id.insert(vm, i);
                table.ports.push(port);
                link.vm_stats.push(VmRemoteStats::default());
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Link<T>> {
        // A vCPU thread that panicked while holding the lock left plain
        // counters behind, nothing half-written that matters: carry on.
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> ClientStats {
        self.lock().stats
    }

    /// Counters of VM `vm`.
    pub fn vm_stats(&self, vm: u32) -> Option<VmRemoteStats> {
        let i = self.vm_index(vm)?;
        Some(self.lock().vm_stats[i])
    }

    /// The servers found, with their MACs.
    pub fn servers(&self) -> &[(u16, MacAddr)] {
        &self.servers
    }

    /// Give the transport back.
    pub fn into_transport(self) -> T {
        self.link.into_inner().unwrap_or_else(|e| e.into_inner()).t
    }

    /// Run `f` on the transport (for its counters and the like).
    pub fn with_transport<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.lock().t)
    }

    /// Refuse (`true`) or take again (`false`) `vm`'s interrupts: from the
    /// moment a VM is held to be saved for a migration, an interrupt it
    /// took would be in neither the saved state nor the server's queue.
    /// Refused ones stay unacknowledged, and the server sends them to the
    /// VM's new platform once the control panel records the move.
    pub fn freeze(&self, vm: u32, frozen: bool) {
        let _link = self.lock();
        if let Some((_, p)) = self.table().find(vm) {
            p.frozen.store(frozen, Ordering::Release);
        }
    }

    /// Whether a device model asked for a reset of `vm` since the last call.
    pub fn take_reset(&self, vm: u32) -> bool {
        self.table().find(vm).is_some_and(|(_, p)| p.reset.swap(false, Ordering::AcqRel))
    }

    /// Receive and deliver one burst now (what [`ClientPort::serve`] does in
    /// its loop); returns how many frames came in.
    pub fn poll_once(&self) -> Result<usize, RemoteError> {
        let mut link = self.lock();
        self.poll(&mut link)
    }

    fn vm_index(&self, vm: u32) -> Option<usize> {
        self.table().find(vm).map(|(i, _)| i)
    }

    /// The remote path of vCPU `vcpu` of VM `vm`; `kick` (if any) aborts a
    /// wait when the VM is being stopped.
    pub fn vcpu<'p>(
        &'p self,
        vm: u32,
        vcpu: u16,
        kick: Option<&'p Kick>,
    ) -> Result<VcpuRemote<'p, 'a, T>, RemoteError> {
        let (index, vm_port) = {
            let table = self.table();
            let (i, p) = table.find(vm).ok_or(RemoteError::UnknownVm(vm))?;
            (i, p.clone())
        };
        let vcpus = vm_port.slots.len();
        if usize::from(vcpu) >= vcpus {
            return Err(RemoteError::UnknownVcpu { vm, vcpu, vcpus });
        }
        Ok(VcpuRemote { port: self, index, vm_port, vm, vcpu, next_seq: 0, kick })
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
        let fd = self.lock().t.wake_fd();
        let mut seen = u64::MAX;
        while !stop.load(Ordering::Acquire) {
            let now = self.activity.load(Ordering::Acquire);
            if self.waiters.load(Ordering::Acquire) > 0 || now != seen {
                seen = now;
                std::thread::sleep(SERVE_NAP);
                continue;
            }
            let got = {
                let mut link = self.lock();
                self.poll(&mut link)?
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

    /// Receive one burst, deliver it and send what it calls for.
    fn poll(&self, link: &mut Link<T>) -> Result<usize, RemoteError> {
        let Link { t, tx, stats, vm_stats, irq_last } = link;
        let n = t.recv(dmfabric_dataplane::MAX_BURST, &mut |f| {
            self.deliver(f, tx, stats, vm_stats, irq_last);
        })?;
        if !tx.is_empty() {
            t.send(tx)?;
        }
        Ok(n)
    }

    fn deliver(
        &self,
        bytes: &[u8],
        tx: &mut FrameBatch,
        stats: &mut ClientStats,
        vm_stats: &mut [VmRemoteStats],
        irq_last: &mut Vec<(usize, u16, u64)>,
    ) {
        if bytes.len() >= 14 && bytes[12..14] != dmfabric_wire::ETHERTYPE_DMFABRIC.to_be_bytes() {
            stats.foreign += 1;
            return;
        }
        let Ok(frame) = FrameRepr::parse_bytes(bytes) else {
            stats.malformed += 1;
            return;
        };
        let route = *frame.msg.route();
        let lifecycle = matches!(frame.msg, Message::Control(c) if c.op == ControlOp::Lifecycle);
        if !lifecycle && !matches!(frame.msg, Message::IoCompletion(_) | Message::Nack(_) | Message::Interrupt(_)) {
            stats.unexpected_kind += 1;
            return;
        }
        if route.client != self.client {
            stats.other_client += 1;
            return;
        }
        let table = self.table();
        let Some((index, vm)) = table.find(route.vm) else {
            stats.unknown_vm += 1;
            return;
        };
        match frame.msg {
            Message::IoCompletion(c) => {
                let Some(slot) = vm.slots.get(usize::from(route.vcpu)) else {
                    stats.unknown_vm += 1;
                    return;
                };
                if slot.expect.load(Ordering::Acquire) == c.seq && slot.state.load(Ordering::Acquire) == EMPTY {
                    slot.data.store(c.data, Ordering::Relaxed);
                    slot.status.store(c.status as u8, Ordering::Relaxed);
                    slot.state.store(DONE, Ordering::Release);
                    stats.completions += 1;
                    vm_stats[index].completions += 1;
                } else {
                    stats.stale_completions += 1;
                }
            }
            Message::Nack(n) => {
                let Some(slot) = vm.slots.get(usize::from(route.vcpu)) else {
                    stats.unknown_vm += 1;
                    return;
                };
                if slot.expect.load(Ordering::Acquire) == n.seq && slot.state.load(Ordering::Acquire) == EMPTY {
                    slot.nack.store(n.reason as u8, Ordering::Relaxed);
                    slot.state.store(NACKED, Ordering::Release);
                    stats.nacks += 1;
                } else {
                    stats.stale_completions += 1;
                }
            }
            Message::Interrupt(_) if vm.frozen.load(Ordering::Acquire) => stats.interrupts_refused += 1,
            Message::Interrupt(irq) => {
                self.interrupt(index, vm, &irq, frame.eth.src, tx, stats, vm_stats, irq_last);
            }
            Message::Control(c) if c.payload.first() == Some(&LIFECYCLE_RESET) => {
                vm.reset.store(true, Ordering::Release);
                stats.resets += 1;
            }
            Message::Control(_) => stats.unexpected_kind += 1,
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn interrupt(
        &self,
        index: usize,
        port: &VmPort<'_>,
        irq: &Interrupt,
        from: MacAddr,
        tx: &mut FrameBatch,
        stats: &mut ClientStats,
        vm_stats: &mut [VmRemoteStats],
        irq_last: &mut Vec<(usize, u16, u64)>,
    ) {
        let server = irq.route.server;
        let last = irq_last.iter_mut().find(|(i, s, _)| *i == index && *s == server);
        let fresh = match last {
            Some((_, _, last)) if irq.seq == *last => {
                stats.interrupt_duplicates += 1;
                false
            }
            Some((_, _, last)) if irq.seq < *last => {
                stats.interrupt_stale += 1;
                false
            }
            Some((_, _, last)) => {
                *last = irq.seq;
                true
            }
            None => {
                irq_last.push((index, server, irq.seq));
                true
            }
        };
        if fresh {
            match port.irq.inject(irq.source, irq.trigger) {
                Ok(()) => {
                    stats.interrupts += 1;
                    vm_stats[index].interrupts += 1;
                }
                Err(_) => stats.inject_errors += 1,
            }
        }
        // Acknowledge every copy: the server retransmits until one ack arrives.
        let ack = InterruptAck { route: irq.route, seq: irq.seq };
        let repr = FrameRepr::new(EthernetRepr { dst: from, src: self.mac }, Message::InterruptAck(ack));
        if tx.push_with(|buf| repr.emit(buf).ok()) {
            stats.interrupt_acks += 1;
        } else {
            stats.tx_full += 1;
        }
    }
}

/// How long [`ClientPort::serve`] naps while vCPUs are busy with remote I/O.
pub const SERVE_NAP: Duration = Duration::from_millis(1);

/// One vCPU's stream to the servers.
pub struct VcpuRemote<'p, 'a, T> {
    port: &'p ClientPort<'a, T>,
    index: usize,
    vm_port: Arc<VmPort<'a>>,
    vm: u32,
    vcpu: u16,
    next_seq: u64,
    kick: Option<&'p Kick>,
}

impl<T> std::fmt::Debug for VcpuRemote<'_, '_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRemote").field("vm", &self.vm).field("vcpu", &self.vcpu).finish()
    }
}

/// Counts a vCPU as waiting for as long as it lives.
struct Waiting<'w>(&'w AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T: Transport> VcpuRemote<'_, '_, T> {
    /// Serve one exit by `device` on `server`; returns the data of a read
    /// (zero for a write, once the server has finished it).
    pub fn access(&mut self, server: u16, device: u32, exit: &Exit) -> Result<u64, RemoteError> {
        self.access_status(server, device, exit).map(|(data, _)| data)
    }

    /// [`VcpuRemote::access`], with the completion's status (whether the
    /// device had such a register).
    pub fn access_status(&mut self, server: u16, device: u32, exit: &Exit) -> Result<(u64, Status), RemoteError> {
        let port = self.port;
        let Some(&(_, mac)) = port.servers.iter().find(|(s, _)| *s == server) else {
            return Err(RemoteError::NoServer { server, waited: Duration::ZERO });
        };
        port.waiters.fetch_add(1, Ordering::AcqRel);
        port.activity.fetch_add(1, Ordering::Release);
        let _waiting = Waiting(&port.waiters);
        let slot = &self.vm_port.slots[usize::from(self.vcpu)];
        let seq = self.next_seq;
        self.next_seq += 1;
        let req = IoRequest {
            route: Route {
                server,
                hypervisor: port.hypervisor,
                client: port.client,
                vm: self.vm,
                vcpu: self.vcpu,
                device,
            },
            seq,
            space: exit.space,
            dir: exit.dir,
            size: exit.size,
            addr: exit.addr,
            data: if exit.dir == Direction::Write { exit.data } else { 0 },
        };
        let mut repr = FrameRepr::new(EthernetRepr { dst: mac, src: port.mac }, Message::IoRequest(req));
        let start = Instant::now();
        let mut tries = 0u32;
        // A refusal the server may take back once its routing tables catch
        // up with the control panel (a VM just migrated here, a device just
        // added): asked again, like a timeout, until the retries run out.
        let mut refused: Option<NackReason> = None;
        loop {
            {
                let mut link = port.lock();
                if tries == 0 {
                    // Under the lock: no delivery can see the old seq with the new state.
                    slot.state.store(EMPTY, Ordering::Release);
                    slot.expect.store(seq, Ordering::Release);
                    link.stats.requests += 1;
                    link.vm_stats[self.index].requests += 1;
                } else {
                    // After a refusal, listen for this request's answer again.
                    slot.state.store(EMPTY, Ordering::Release);
                    link.stats.retransmits += 1;
                    link.vm_stats[self.index].retransmits += 1;
                }
                repr.retransmit = tries > 0;
                let Link { t, tx, .. } = &mut *link;
                tx.push_with(|buf| repr.emit(buf).ok());
                t.send(tx)?;
            }
            let deadline = Instant::now() + port.retry.timeout;
            loop {
                match slot.state.load(Ordering::Acquire) {
                    DONE => {
                        let status = Status::from_u8(slot.status.load(Ordering::Relaxed)).unwrap_or(Status::Ok);
                        return Ok((slot.data.load(Ordering::Relaxed), status));
                    }
                    NACKED if refused.is_none() => {
                        let reason =
                            NackReason::from_u8(slot.nack.load(Ordering::Relaxed)).unwrap_or(NackReason::UnknownDevice);
                        let may_pass = matches!(
                            reason,
                            NackReason::UnknownVm | NackReason::UnknownDevice | NackReason::NotAuthorised
                        );
                        if !may_pass || tries >= port.retry.retries {
                            return Err(RemoteError::Nacked { server, device, reason });
                        }
                        // Wait out the timeout, then ask again.
                        refused = Some(reason);
                    }
                    _ => {}
                }
                if Instant::now() >= deadline {
                    break;
                }
                if let Some(kick) = self.kick.filter(|k| k.stopped()) {
                    let reason = kick.reason().unwrap_or_else(|| "asked to stop".into());
                    return Err(RemoteError::Stopped { server, reason });
                }
                match port.link.try_lock() {
                    Ok(mut link) => {
                        port.poll(&mut link)?;
                    }
                    Err(std::sync::TryLockError::Poisoned(p)) => {
                        port.poll(&mut p.into_inner())?;
                    }
                    Err(std::sync::TryLockError::WouldBlock) => std::hint::spin_loop(),
                }
            }
            if let Some(reason) = refused.take().filter(|_| tries >= port.retry.retries) {
                return Err(RemoteError::Nacked { server, device, reason });
            }
            if tries >= port.retry.retries {
                return Err(RemoteError::Unreachable {
                    server,
                    device,
                    addr: exit.addr,
                    tries: tries + 1,
                    waited: start.elapsed(),
                });
            }
            tries += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_dataplane::mem::{self, MemTransport};
    use dmfabric_wire::{AccessSize, ControlMsg, ControlOp, IoCompletion, Kind, Nack, Space, Status};

    const CLIENT_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);
    const SERVER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);

    /// Records what would have been injected.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(IrqSource, Trigger)>>);

    impl IrqSink for Recorder {
        fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), String> {
            self.0.lock().unwrap().push((source, trigger));
            Ok(())
        }
    }

    fn send(t: &mut MemTransport, msg: Message<'_>) {
        let repr = FrameRepr::new(EthernetRepr { dst: CLIENT_MAC, src: SERVER_MAC }, msg);
        let mut b = FrameBatch::new();
        b.push_with(|buf| repr.emit(buf).ok());
        t.send(&mut b).unwrap();
    }

    fn received(t: &mut MemTransport) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        t.recv(64, &mut |f| out.push(f.to_vec())).unwrap();
        out
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

    fn irq(r: Route, seq: u64, trigger: Trigger) -> Message<'static> {
        Message::Interrupt(Interrupt { route: r, seq, source: IrqSource::Line(5), trigger })
    }

    fn config(servers: Vec<u16>) -> ClientConfig {
        ClientConfig {
            client: 3,
            hypervisor: 1,
            servers,
            retry: Retry { timeout: Duration::from_millis(50), retries: 3 },
            hello_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn frames_for_others_and_bad_frames_are_counted_never_delivered() {
        let (client_t, mut server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        let rec = Recorder::default();
        let port = ClientPort::connect(client_t, &config(vec![]), &[VmEntry { id: 7, vcpus: 2, irq: &rec }]).unwrap();
        send(&mut server_t, completion(route(3, 9, 0), 0, 1)); // unknown VM
        send(&mut server_t, completion(route(3, 7, 5), 0, 1)); // unknown vCPU
        send(&mut server_t, completion(route(4, 7, 0), 0, 1)); // another client
        send(&mut server_t, irq(route(4, 7, 0), 1, Trigger::Edge)); // another client's interrupt
        send(&mut server_t, irq(route(3, 8, 0), 1, Trigger::Edge)); // a VM this client does not run
        send(&mut server_t, completion(route(3, 7, 0), 0, 1)); // nobody waits: stale
        let mut b = FrameBatch::new();
        b.push(&[0xff; 20]);
        b.push(&[0u8; 70]);
        server_t.send(&mut b).unwrap();
        assert_eq!(port.poll_once().unwrap(), 8);
        let st = port.stats();
        assert_eq!((st.unknown_vm, st.other_client, st.stale_completions), (3, 2, 1), "{st:?}");
        assert_eq!((st.malformed + st.foreign, st.interrupts, st.completions), (2, 0, 0), "{st:?}");
        assert!(rec.0.lock().unwrap().is_empty(), "nothing injected");
        assert!(received(&mut server_t).is_empty(), "another client's interrupt is not acknowledged");
    }

    #[test]
    fn interrupts_are_acked_and_injected_once_in_order() {
        let (client_t, mut server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        let (rec7, rec8) = (Recorder::default(), Recorder::default());
        let vms = [VmEntry { id: 7, vcpus: 1, irq: &rec7 }, VmEntry { id: 8, vcpus: 1, irq: &rec8 }];
        let port = ClientPort::connect(client_t, &config(vec![]), &vms).unwrap();
        let up = Trigger::Level { asserted: true };
        let down = Trigger::Level { asserted: false };
        send(&mut server_t, irq(route(3, 7, 0), 10, up));
        send(&mut server_t, irq(route(3, 7, 0), 10, up)); // retransmit: ack again, do not inject
        send(&mut server_t, irq(route(3, 7, 0), 9, down)); // older than one delivered
        send(&mut server_t, irq(route(3, 7, 0), 11, down));
        send(&mut server_t, irq(route(3, 8, 0), 4, Trigger::Edge));
        port.poll_once().unwrap();
        assert_eq!(*rec7.0.lock().unwrap(), vec![(IrqSource::Line(5), up), (IrqSource::Line(5), down)]);
        assert_eq!(*rec8.0.lock().unwrap(), vec![(IrqSource::Line(5), Trigger::Edge)]);
        let st = port.stats();
        assert_eq!((st.interrupts, st.interrupt_duplicates, st.interrupt_stale, st.interrupt_acks), (3, 1, 1, 5));
        let acks: Vec<(u32, u64)> = received(&mut server_t)
            .iter()
            .map(|f| match FrameRepr::parse_bytes(f).unwrap().msg {
                Message::InterruptAck(a) => (a.route.vm, a.seq),
                other => panic!("not an ack: {other:?}"),
            })
            .collect();
        assert_eq!(acks, vec![(7, 10), (7, 10), (7, 9), (7, 11), (8, 4)]);
        assert_eq!(port.vm_stats(7).unwrap().interrupts, 2);
    }

    /// A server that answers the Hello, then refuses each request with
    /// `refusals` in turn and completes the next one with 0x1234.
    fn refusing_server(mut t: MemTransport, refusals: Vec<NackReason>) -> usize {
        let end = Instant::now() + Duration::from_secs(5);
        let mut refusals = refusals.into_iter();
        let mut requests = 0;
        while Instant::now() < end {
            let mut frames = Vec::new();
            if t.recv(64, &mut |f| frames.push(f.to_vec())).is_err() {
                return requests; // the client is gone
            }
            for f in frames {
                match FrameRepr::parse_bytes(&f).unwrap().msg {
                    Message::Control(c) if c.op == ControlOp::Hello => {
                        let reply = ControlMsg { route: c.route, seq: c.seq, op: ControlOp::HelloReply, payload: &[] };
                        send(&mut t, Message::Control(reply));
                    }
                    Message::IoRequest(req) => {
                        requests += 1;
                        match refusals.next() {
                            Some(reason) => {
                                let n = Nack { route: req.route, seq: req.seq, reason, nacked: Kind::IoRequest };
                                send(&mut t, Message::Nack(n));
                            }
                            None => {
                                send(&mut t, completion(req.route, req.seq, 0x1234));
                                return requests;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        requests
    }

    #[test]
    fn refusals_a_lagging_server_may_take_back_are_asked_again_others_are_final() {
        let exit = Exit { space: Space::Pio, addr: 0x500, size: AccessSize::B4, dir: Direction::Read, data: 0 };
        let rec = Recorder::default();
        // A VM the server's tables do not know yet, twice: the third try is answered.
        let (client_t, server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        std::thread::scope(|s| {
            let server =
                s.spawn(move || refusing_server(server_t, vec![NackReason::UnknownVm, NackReason::NotAuthorised]));
            let port =
                ClientPort::connect(client_t, &config(vec![1]), &[VmEntry { id: 7, vcpus: 1, irq: &rec }]).unwrap();
            assert_eq!(port.vcpu(7, 0, None).unwrap().access(1, 1, &exit).unwrap(), 0x1234);
            assert_eq!(server.join().unwrap(), 3);
            let st = port.stats();
            assert_eq!((st.nacks, st.retransmits, st.completions), (2, 2, 1), "{st:?}");
        });
        // A refusal no table change undoes (the request named another server): at once.
        let (client_t, server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        std::thread::scope(|s| {
            let server = s.spawn(move || refusing_server(server_t, vec![NackReason::WrongServer]));
            let port =
                ClientPort::connect(client_t, &config(vec![1]), &[VmEntry { id: 7, vcpus: 1, irq: &rec }]).unwrap();
            let err = port.vcpu(7, 0, None).unwrap().access(1, 1, &exit).unwrap_err();
            assert!(matches!(err, RemoteError::Nacked { reason: NackReason::WrongServer, .. }), "{err}");
            assert_eq!(port.stats().retransmits, 0);
            drop(port);
            server.join().unwrap();
        });
        // Refused past the retries: the refusal, not "unreachable".
        let (client_t, server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        std::thread::scope(|s| {
            let server = s.spawn(move || refusing_server(server_t, vec![NackReason::UnknownDevice; 10]));
            let port =
                ClientPort::connect(client_t, &config(vec![1]), &[VmEntry { id: 7, vcpus: 1, irq: &rec }]).unwrap();
            let err = port.vcpu(7, 0, None).unwrap().access(1, 1, &exit).unwrap_err();
            assert!(matches!(err, RemoteError::Nacked { reason: NackReason::UnknownDevice, .. }), "{err}");
            assert_eq!(port.stats().requests + port.stats().retransmits, 4, "the first try and 3 retries");
            drop(port);
            server.join().unwrap();
        });
    }

    #[test]
    fn a_vcpu_takes_only_its_own_completion() {
        let (client_t, mut server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        let rec = Recorder::default();
        std::thread::scope(|s| {
            let server = s.spawn(move || {
                // Answer the Hello, then the request: first with a stale
                // sequence number and another vCPU's, then for real.
                let end = Instant::now() + Duration::from_secs(5);
                let mut answered_hello = false;
                while Instant::now() < end {
                    for f in received(&mut server_t) {
                        match FrameRepr::parse_bytes(&f).unwrap().msg {
                            Message::Control(c) if c.op == ControlOp::Hello && !answered_hello => {
                                answered_hello = true;
                                let reply =
                                    ControlMsg { route: c.route, seq: c.seq, op: ControlOp::HelloReply, payload: &[] };
                                send(&mut server_t, Message::Control(reply));
                            }
                            Message::IoRequest(req) => {
                                send(&mut server_t, completion(req.route, req.seq + 5, 0xbad));
                                send(&mut server_t, completion(Route { vcpu: 1, ..req.route }, req.seq, 0xbad));
                                send(&mut server_t, completion(req.route, req.seq, 0x1234));
                                return;
                            }
                            _ => {}
                        }
                    }
                }
                panic!("no request came");
            });
            let port =
                ClientPort::connect(client_t, &config(vec![1]), &[VmEntry { id: 7, vcpus: 2, irq: &rec }]).unwrap();
            let mut vcpu = port.vcpu(7, 0, None).unwrap();
            let exit = Exit { space: Space::Pio, addr: 0x500, size: AccessSize::B4, dir: Direction::Read, data: 0 };
            assert_eq!(vcpu.access(1, 1, &exit).unwrap(), 0x1234);
            server.join().unwrap();
            let st = port.stats();
            assert_eq!((st.requests, st.completions, st.stale_completions), (1, 1, 2), "{st:?}");
            assert!(matches!(port.vcpu(7, 2, None), Err(RemoteError::UnknownVcpu { .. })));
            assert!(matches!(port.vcpu(9, 0, None), Err(RemoteError::UnknownVm(9))));
        });
    }
}
