//! The client platform's data plane: one transport shared by every VM and
//! vCPU of this client process.
//!
//! - **Requests.** An exit aimed at a device on a server becomes one
//!   IoRequest frame carrying every id of the wire header. Each vCPU is a
//!   stop-and-wait stream ([`StopAndWait`], as the server's interrupt
//!   streams; sequence numbers from 0 after [`ClientPort::connect`], whose
//!   Hello makes the servers forget this client's earlier streams). A vCPU
//!   puts its request in the port's outbox (lock-free), then waits on its
//!   own slot; whichever thread holds the link — the waiting vCPU itself
//!   when nobody else does (run to completion, DESIGN.md's small-host
//!   layout) — sends what is in the outbox and delivers what arrives. No
//!   vCPU ever blocks on the link: it spins on its slot and takes the link
//!   only when it looks free. A request unanswered after the timeout is sent
//!   again; past the retry limit the VM stops with a clear error.
//! - **Interrupts.** An Interrupt frame for one of this client's VMs is
//!   acknowledged and injected into that VM only; its sequence number
//!   (per server and VM) drops retransmitted and out-of-date copies, so an
//!   edge fires once and a level ends where the device left it. Whoever
//!   holds the link delivers them: a waiting vCPU, or the
//!   [`ClientPort::serve`] thread while every vCPU is in its guest.
//! - **Bad input.** Completions for unknown VMs or vCPUs, stale or duplicate
//!   completions, other clients' frames and malformed frames are dropped and
//!   counted, never delivered.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use dmfabric_dataplane::reliable::{Due, Retry, StopAndWait};
use dmfabric_dataplane::{FrameBatch, Transport, TransportError};
use dmfabric_wire::{
    ControlOp, Direction, EthernetRepr, FrameRepr, Interrupt, InterruptAck, IoRequest, MacAddr, Message, NackReason,
    Route, Status, LIFECYCLE_RESET,
};

use crate::kvm::{Exit, IrqSink};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("No answer from server {server} to Hello within {waited:?}: is `dmfabric server --server-id {server}` running on this link?")]
    NoServer { server: u16, waited: Duration },
    #[error("Device {device} is on server {server}, which is not one of this client's servers ({known:?}): add it to the config")]
    NotConfigured { server: u16, device: u32, known: Vec<u16> },
    #[error("Server {server} did not answer device {device} at {addr:#x} after {tries} tries over {waited:?}: stopping the VM")]
    Unreachable { server: u16, device: u32, addr: u64, tries: u32, waited: Duration },
    #[error("Server {server} refused device {device}: {reason:?}")]
    Nacked { server: u16, device: u32, reason: NackReason },
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

/// Where a vCPU's answer lands. Written only by whoever holds the link.
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

struct VmPort {
    irq: Arc<dyn IrqSink>,
    slots: Box<[Slot]>,
    /// Being saved to migrate: its interrupts are refused.
    frozen: AtomicBool,
}

impl VmPort {
    fn new(vcpus: u16, irq: Arc<dyn IrqSink>) -> VmPort {
        VmPort { irq, slots: (0..vcpus.max(1)).map(|_| Slot::new()).collect(), frozen: AtomicBool::new(false) }
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
    /// The VM's index, for its counters.
    index: usize,
    retransmit: bool,
}

/// Everything that changes per frame: only the thread holding the link touches it.
struct Link {
    t: Box<dyn Transport>,
    tx: FrameBatch,
    stats: ClientStats,
    vm_stats: Vec<VmRemoteStats>,
    /// Last interrupt sequence delivered per (VM index, server).
    irq_last: Vec<(usize, u16, u64)>,
}

/// A VM this client runs: its id, vCPU count and where its interrupts go.
#[derive(Clone)]
pub struct VmEntry {
    pub id: u32,
    pub vcpus: u16,
    pub irq: Arc<dyn IrqSink>,
}

impl std::fmt::Debug for VmEntry {
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

/// Requests that may wait in the outbox (one per vCPU at most).
const OUTBOX: usize = 4096;

/// A client platform's connection to its servers, shared by all its vCPUs.
pub struct ClientPort {
    client: u16,
    hypervisor: u16,
    mac: MacAddr,
    servers: Vec<(u16, MacAddr)>,
    vms: RwLock<VmTable>,
    retry: Retry,
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
    /// Told the id of a VM whose device model asked for a reset.
    resets: Mutex<Option<crossbeam_channel::Sender<u32>>>,
}

impl std::fmt::Debug for ClientPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPort")
            .field("client", &self.client)
            .field("servers", &self.servers)
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

impl ClientPort {
    /// Find every server of `cfg` on the link (broadcast Hello, which also
    /// makes it forget this client's earlier streams) and serve `vms`.
    pub fn connect(mut t: Box<dyn Transport>, cfg: &ClientConfig, vms: &[VmEntry]) -> Result<Self, RemoteError> {
        let mut servers = Vec::new();
        for &server in &cfg.servers {
            let route = Route { server, client: cfg.client, hypervisor: cfg.hypervisor, ..Route::default() };
            let Some((mac, _)) =
                dmfabric_dataplane::hello::discover(t.as_mut(), route, Some(server), cfg.hello_timeout)?
            else {
                return Err(RemoteError::NoServer { server, waited: cfg.hello_timeout });
            };
            tracing::debug!(client = cfg.client, server, %mac, "server found");
            servers.push((server, mac));
        }
        let mut table = VmTable::default();
        for v in vms {
            table.by_id.insert(v.id, table.ports.len());
            table.ports.push(Arc::new(VmPort::new(v.vcpus, v.irq.clone())));
        }
        let link = Link {
            tx: FrameBatch::new(),
            stats: ClientStats::default(),
            vm_stats: vec![VmRemoteStats::default(); table.ports.len()],
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
            busy: AtomicBool::new(false),
            outbox: ArrayQueue::new(OUTBOX),
            waiters: AtomicUsize::new(0),
            activity: AtomicU64::new(0),
            resets: Mutex::new(None),
        })
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, VmTable> {
        self.vms.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve VM `vm` too from now on (a VM launched or migrated here while
    /// the port runs); its interrupts go to `irq`. A VM that was here
    /// before starts afresh (new vCPU slots, same counters).
    pub fn add_vm(&self, vm: u32, vcpus: u16, irq: Arc<dyn IrqSink>) {
        let port = Arc::new(VmPort::new(vcpus, irq));
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

    /// Wait for the link (for what is not on a vCPU's path: counters,
    /// adding a VM).
    fn lock(&self) -> MutexGuard<'_, Link> {
        // A thread that panicked while holding the lock left plain
        // counters behind, nothing half-written that matters: carry on.
        self.link.lock().unwrap_or_else(|e| e.into_inner())
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
    pub fn into_transport(self) -> Box<dyn Transport> {
        self.link.into_inner().unwrap_or_else(|e| e.into_inner()).t
    }

    /// Run `f` on the transport (for its counters and the like).
    pub fn with_transport<R>(&self, f: impl FnOnce(&dyn Transport) -> R) -> R {
        f(self.lock().t.as_ref())
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

    /// Tell `to` the id of each VM whose device model asks for a reset.
    pub fn notify_resets(&self, to: crossbeam_channel::Sender<u32>) {
        *self.resets.lock().unwrap_or_else(|e| e.into_inner()) = Some(to);
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
        Ok(VcpuRemote { port: self.clone(), index, vm_port, vm, vcpu, next_seq: 0, stop })
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

    /// Send what waits in the outbox, receive one burst, deliver it and
    /// send what it calls for.
    fn poll(&self, link: &mut Link) -> Result<usize, RemoteError> {
        let Link { t, tx, stats, vm_stats, irq_last } = link;
        while let Some(out) = self.outbox.pop() {
            let mut repr = FrameRepr::new(EthernetRepr { dst: out.to, src: self.mac }, Message::IoRequest(out.req));
            repr.retransmit = out.retransmit;
            if out.retransmit {
                stats.retransmits += 1;
                vm_stats[out.index].retransmits += 1;
            } else {
                stats.requests += 1;
                vm_stats[out.index].requests += 1;
            }
            if !tx.push_with(|buf| repr.emit(buf).ok()) {
                stats.tx_full += 1;
            }
            if tx.is_full() {
                t.send(tx)?;
            }
        }
        if !tx.is_empty() {
            t.send(tx)?;
        }
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
                stats.resets += 1;
                if let Some(to) = self.resets.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    let _ = to.send(route.vm);
                }
            }
            Message::Control(_) => stats.unexpected_kind += 1,
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn interrupt(
        &self,
        index: usize,
        port: &VmPort,
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
pub struct VcpuRemote {
    port: Arc<ClientPort>,
    index: usize,
    vm_port: Arc<VmPort>,
    vm: u32,
    vcpu: u16,
    next_seq: u64,
    stop: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for VcpuRemote {
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

impl VcpuRemote {
    /// Serve one exit by `device` on `server`; returns the data of a read
    /// (zero for a write, once the server has finished it).
    pub fn access(&mut self, server: u16, device: u32, exit: &Exit) -> Result<u64, RemoteError> {
        self.access_status(server, device, exit).map(|(data, _)| data)
    }

    /// [`VcpuRemote::access`], with the completion's status (whether the
    /// device had such a register).
    pub fn access_status(&mut self, server: u16, device: u32, exit: &Exit) -> Result<(u64, Status), RemoteError> {
        let port = self.port.clone();
        let Some(&(_, mac)) = port.servers.iter().find(|(s, _)| *s == server) else {
            let known = port.servers.iter().map(|(s, _)| *s).collect();
            return Err(RemoteError::NotConfigured { server, device, known });
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
        // Before the request can be sent: no delivery can see the old seq with the new state.
        slot.state.store(EMPTY, Ordering::Release);
        slot.expect.store(seq, Ordering::Release);
        let start = Instant::now();
        let mut sender = StopAndWait::new(port.retry);
        self.post(Outgoing { to: mac, req, index: self.index, retransmit: false });
        sender.sent((), seq, start);
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
                    // After a refusal, listen for this request's answer again.
                    refused = None;
                    slot.state.store(EMPTY, Ordering::Release);
                    self.post(Outgoing { to: mac, req, index: self.index, retransmit: true });
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
            match port.try_hold() {
                Some(mut held) => {
                    port.poll(&mut held.link)?;
                }
                None => std::hint::spin_loop(),
            }
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
    use crate::kvm::KvmError;
    use dmfabric_dataplane::mem::{self, MemTransport};
    use dmfabric_wire::{
        AccessSize, ControlMsg, ControlOp, IoCompletion, IrqSource, Kind, Nack, Space, Status, Trigger,
    };

    const CLIENT_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc1]);
    const SERVER_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x51]);

    /// Records what would have been injected.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(IrqSource, Trigger)>>);

    impl IrqSink for Recorder {
        fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), KvmError> {
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

    /// A port of client 3 with VM 7 (`vcpus` vCPUs, interrupts to `rec`) and `servers`.
    fn port_for_vm7(t: MemTransport, servers: Vec<u16>, vcpus: u16, rec: &Arc<Recorder>) -> Arc<ClientPort> {
        let vms = [VmEntry { id: 7, vcpus, irq: rec.clone() }];
        Arc::new(ClientPort::connect(Box::new(t), &config(servers), &vms).unwrap())
    }

    #[test]
    fn frames_for_others_and_bad_frames_are_counted_never_delivered() {
        let (client_t, mut server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        let rec = Arc::new(Recorder::default());
        let port =
            ClientPort::connect(Box::new(client_t), &config(vec![]), &[VmEntry { id: 7, vcpus: 2, irq: rec.clone() }])
                .unwrap();
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
        let (rec7, rec8) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let vms = [VmEntry { id: 7, vcpus: 1, irq: rec7.clone() }, VmEntry { id: 8, vcpus: 1, irq: rec8.clone() }];
        let port = ClientPort::connect(Box::new(client_t), &config(vec![]), &vms).unwrap();
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
    fn refusing_server(mut t: MemTransport, refusals: Vec<NackReason>) -> (usize, MemTransport) {
        let end = Instant::now() + Duration::from_secs(5);
        let mut refusals = refusals.into_iter();
        let mut requests = 0;
        while Instant::now() < end {
            let mut frames = Vec::new();
            if t.recv(64, &mut |f| frames.push(f.to_vec())).is_err() {
                return (requests, t); // the client is gone
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
                                // Kept (not dropped) until the test is done with the client.
                                return (requests, t);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        (requests, t)
    }

    #[test]
    fn refusals_a_lagging_server_may_take_back_are_asked_again_others_are_final() {
        let exit = Exit { space: Space::Pio, addr: 0x500, size: AccessSize::B4, dir: Direction::Read, data: 0 };
        let rec = Arc::new(Recorder::default());
        // A VM the server's tables do not know yet, twice: the third try is answered.
        let (client_t, server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        std::thread::scope(|s| {
            let server =
                s.spawn(move || refusing_server(server_t, vec![NackReason::UnknownVm, NackReason::NotAuthorised]));
            let port = port_for_vm7(client_t, vec![1], 1, &rec);
            assert_eq!(port.vcpu(7, 0, None).unwrap().access(1, 1, &exit).unwrap(), 0x1234);
            assert_eq!(server.join().unwrap().0, 3);
            let st = port.stats();
            assert_eq!((st.nacks, st.retransmits, st.completions), (2, 2, 1), "{st:?}");
        });
        // A refusal no table change undoes (the request named another server): at once.
        let (client_t, server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        std::thread::scope(|s| {
            let server = s.spawn(move || refusing_server(server_t, vec![NackReason::WrongServer]));
            let port = port_for_vm7(client_t, vec![1], 1, &rec);
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
            let port = port_for_vm7(client_t, vec![1], 1, &rec);
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
        let rec = Arc::new(Recorder::default());
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
            let port = port_for_vm7(client_t, vec![1], 2, &rec);
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

    #[test]
    fn a_device_on_a_server_not_configured_is_said_so() {
        let (client_t, _server_t) = mem::pair(CLIENT_MAC, SERVER_MAC, 64);
        let rec = Arc::new(Recorder::default());
        let port = Arc::new(
            ClientPort::connect(Box::new(client_t), &config(vec![]), &[VmEntry { id: 7, vcpus: 1, irq: rec }]).unwrap(),
        );
        let exit = Exit { space: Space::Pio, addr: 0x500, size: AccessSize::B4, dir: Direction::Read, data: 0 };
        let err = port.vcpu(7, 0, None).unwrap().access(9, 1, &exit).unwrap_err();
        assert!(matches!(err, RemoteError::NotConfigured { server: 9, device: 1, .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not one of this client's servers") && !msg.contains("running"), "{msg}");
    }
}
