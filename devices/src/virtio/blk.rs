//! virtio-blk (virtio 1.2 §5.2) on the MMIO transport: one request queue,
//! requests served asynchronously through DMA and a [`BlockBackend`].
//!
//! # How a batch goes
//!
//! The driver's notify (its one exit for a batch) makes the model read the
//! available ring — flags, idx and every entry, one DMA read — and, once
//! that is in, the whole descriptor table (a second read; after the idx,
//! so that every descriptor the idx covers is there). Each new head's
//! chain is walked in that copy. A request's device-readable bytes (the
//! 16-byte header, and a write's data) are read, one DMA read a segment,
//! all at once; then the backend does the request; then its data (for a
//! read) and its status byte are written, all at once. Only when the host
//! has said every one of those writes is done does the request go to the
//! used ring: the used elements of every request finished by then in one
//! write (two where the ring wraps), and when that is done, the used idx.
//! Then InterruptStatus bit 0 is set and the line raised; it stays up
//! until the driver acknowledges every bit (a level, as virtio-mmio's
//! interrupt is).
//!
//! Requests run side by side: up to the queue size, as many at the backend
//! as it takes ([`BlockBackend::depth`]; the others wait their turn), and
//! as many buffered as [`MAX_BUFFERED`] bytes allow. A notify while a
//! fetch is under way is remembered, and the ring read again when it is
//! done; `last_avail_idx` says which entries were taken, so none is taken
//! twice.
//!
//! # Bad input
//!
//! Everything read from the guest is checked, counted in
//! [`VirtioBlkCounters`] and ends one of two ways — never a panic, an
//! unbounded walk or a DMA outside the ranges the driver gave:
//!
//! - **IOERR (or UNSUPP) for that request**, where the chain is sound and
//!   its status byte is known: more segments than `seg_max`, a segment
//!   larger than `size_max`, a descriptor range that wraps the address
//!   space, a DMA the host refused (memory that is not the VM's), a header
//!   shorter than 16 bytes, a length that is not whole sectors, sectors
//!   past the end of the disk, a write to a read-only disk, a backend
//!   failure; an unknown request type is UNSUPP.
//! - **DEVICE_NEEDS_RESET**, where the ring itself is broken and no status
//!   can be reported: a chain that loops (the only way a chain of direct
//!   descriptors is longer than the queue), a `next` or head outside the
//!   table, an indirect descriptor (not offered), a readable descriptor
//!   after a writable one, no writable byte for the status, a status byte
//!   the host refused, an avail idx that moved by more than the queue
//!   size, a head taken again while it is in flight, rings the host
//!   refused, and rings that overlap (refused at QueueReady: the queue
//!   stays not ready). The device stops: everything in flight is dropped,
//!   InterruptStatus bit 1 (configuration change) is raised, and only a
//!   reset (status 0) brings it back.
//!
//! DMA answers for tags the model does not know (late, duplicated, or for
//! work dropped by a reset) and backend completions of dropped work are
//! ignored and counted.
//!
//! `VIRTQ_AVAIL_F_NO_INTERRUPT` is not honoured: the flag is read only at
//! a notify, so it may be stale when a request completes, and the spec
//! lets the device interrupt anyway. Indirect descriptors and event idx
//! are not offered.
//!
//! # Saving
//!
//! A state saved while requests are in flight lists their heads
//! ([`VirtioBlkState::in_flight`]): the restored model does them again
//! from the start (reads and writes of a block device can be repeated;
//! the driver does not touch a buffer it has not got back). Hosts save
//! after every DMA request they were given has been answered (the VM
//! paused, the model polled until it asks for nothing more, best of all
//! until it is not [`DmaDevice::busy`]): a used idx written but not
//! answered before the save would be written again after it.

use std::collections::{HashMap, VecDeque};
use std::mem;

use dmfabric_wire::{AccessSize, Space};
use serde::{Deserialize, Serialize};

use super::mmio::{self, Event, Transport, TransportState};
use super::queue::{self, ChainError, LayoutError, QueueConfig};
use super::{status, INT_CONFIG_CHANGE, INT_USED_BUFFER, VIRTIO_F_VERSION_1};
use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::dma::{BlockBackend, BlockOp, BlockResult, DmaDevice, DmaOp, DmaRequest, DmaResult, SubmitError};
use crate::irq::IrqLine;

/// The virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Feature: `size_max` says the largest segment.
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// Feature: `seg_max` says the most data segments of a request.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: `blk_size` says the block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// Feature: the device takes FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// virtio-blk's sector, whatever the block size.
pub const SECTOR: u64 = 512;
/// The most data segments a request may have (`seg_max`; QEMU's 128 − 2).
pub const SEG_MAX: u32 = 126;
/// The largest segment (`size_max`): each is one DMA request, and a
/// request holds at most `SEG_MAX · SIZE_MAX` bytes (about 16 MiB).
pub const SIZE_MAX: u32 = 128 << 10;
/// The block size the device reports.
pub const BLK_SIZE: u32 = 512;
/// Bytes of a request header: type, reserved, sector.
pub const HEADER_LEN: usize = 16;
/// Bytes of the GET_ID string.
pub const ID_LEN: usize = 20;
/// Bytes of request data the model holds at once (past the first request,
/// the next waits until enough are done).
pub const MAX_BUFFERED: u64 = 16 << 20;
/// Bytes of configuration space (the rest of the window reads as zeros).
const CONFIG_LEN: usize = (mmio::WINDOW as u64 - mmio::CONFIG) as usize;

macro_rules! counters {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* $field:ident,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fm])* pub $field: u64,)*
        }

        impl $name {
            /// Every counter with its name, for hosts that print or export them.
            pub fn list(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field)),*]
            }
        }
    };
}

counters! {
    /// What a virtio-blk model did and what it refused
    /// ([`VirtioBlk::stats`], and [`Device::counters`] by name).
    pub struct VirtioBlkCounters {
        /// QueueNotify writes for queue 0.
        notifies,
        /// Notifies for a queue that does not exist.
        bad_notify,
        /// Chains taken from the available ring.
        requests,
        reads,
        writes,
        flushes,
        get_ids,
        /// Bytes the backend read for the guest.
        bytes_read,
        /// Bytes the backend wrote for the guest.
        bytes_written,
        /// Requests ended with status OK, IOERR, UNSUPP.
        ok,
        ioerr,
        unsupp,
        /// A chain came back to a descriptor it passed.
        bad_chain_loop,
        /// A chain that ran past the descriptor table (a backstop: a chain
        /// of direct descriptors longer than the queue loops, and is
        /// counted in `bad_chain_loop`).
        bad_chain_too_long,
        /// A `next` outside the table.
        bad_chain_next,
        /// An indirect descriptor (not offered).
        bad_chain_indirect,
        /// A device-readable descriptor after a device-writable one.
        bad_chain_order,
        /// A head outside the table, or one already in flight.
        bad_head,
        /// A descriptor range that wraps the address space, or a DMA of a
        /// request the host refused.
        bad_desc_addr,
        /// More data segments than `seg_max`.
        seg_max_exceeded,
        /// A segment larger than `size_max`.
        seg_too_large,
        /// Fewer than 16 device-readable bytes for the header.
        bad_header,
        /// No device-writable byte for the status.
        no_status,
        /// A read or write that is not whole sectors.
        bad_length,
        /// Sectors past the end of the disk.
        out_of_range,
        /// A write to a read-only disk.
        read_only_write,
        /// Requests the backend failed (or answered with the wrong kind or size).
        backend_errors,
        /// Requests the backend would not take although it had room.
        backend_refused,
        /// The avail idx moved by more than the queue size.
        bad_avail_idx,
        /// A ring read or write the host refused.
        ring_refused,
        /// QueueReady with rings that overlap.
        ring_overlap,
        /// QueueReady with a bad size, misaligned or wrapping rings.
        bad_queue_config,
        /// FEATURES_OK refused (no VERSION_1, or features not offered).
        features_refused,
        /// Times the device set DEVICE_NEEDS_RESET.
        needs_reset,
        /// DMA answers for tags the model does not know (late, duplicated, dropped).
        unknown_dma,
        /// Backend completions for requests the model no longer has (dropped by a reset).
        unknown_backend,
    }
}

/// What a DMA request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Avail,
    Table,
    Read { head: u16, at: usize, len: u32 },
    Data { head: u16 },
    Status { head: u16 },
    UsedElems,
    UsedIdx,
}

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for room in the buffer budget.
    Waiting,
    /// Its readable bytes are being read.
    Reading,
    /// At the backend, or waiting for room there.
    Backend,
    /// Its data and status are being written.
    Writing,
    /// Written: waiting for the used ring.
    Done,
}

/// One request, from its chain to the used ring.
#[derive(Debug)]
struct Request {
    /// Device-readable segments: the header, a write's data.
    readable: Vec<(u64, u32)>,
    readable_len: usize,
    /// Device-writable segments before the status byte: a read's data.
    in_data: Vec<(u64, u32)>,
    in_len: u64,
    status_at: u64,
    kind: u32,
    bytes: Vec<u8>,
    stage: Stage,
    /// DMA answers still to come.
    awaiting: usize,
    data_refused: bool,
    status_refused: bool,
    status_redone: bool,
    status: u8,
    /// Bytes written to the device-writable part (the used element's len).
    written: u32,
    /// Bytes of the buffer budget it holds.
    charged: u64,
}

/// The ring fetch under way.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fetch {
    Idle,
    Avail,
    /// The descriptor table is being read for these new heads.
    Table(Vec<u16>),
}

/// The used-ring update under way.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Publish {
    Idle,
    Elems { awaiting: usize, batch: Vec<u16> },
    Idx { batch: Vec<u16> },
}

/// The saved state of a virtio-blk model: the transport's registers and
/// where the queue is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    pub transport: TransportState,
    /// The next available-ring entry to take.
    pub last_avail_idx: u16,
    /// The used idx last published.
    pub used_idx: u16,
    /// Heads taken but not yet published: done again after a restore.
    pub in_flight: Vec<u16>,
    /// A notify not yet acted on.
    pub notify: bool,
}

impl Default for VirtioBlkState {
    fn default() -> Self {
        VirtioBlkState {
            transport: TransportState { queues: vec![QueueConfig::default()], ..TransportState::default() },
            last_avail_idx: 0,
            used_idx: 0,
            in_flight: Vec::new(),
            notify: false,
        }
    }
}

/// The backend of a drive without media ([`crate::Wiring::block`] gave
/// none): no sectors; a flush succeeds.
#[derive(Debug, Default)]
pub struct NoMedia {
    done: VecDeque<(u64, BlockResult)>,
}

impl BlockBackend for NoMedia {
    fn capacity(&self) -> u64 {
        0
    }

    fn read_only(&self) -> bool {
        false
    }

    fn depth(&self) -> usize {
        16
    }

    fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError> {
        if self.done.len() >= self.depth() {
            return Err(SubmitError::Full);
        }
        const EIO: i32 = 5;
        let result = if op == BlockOp::Flush { BlockResult::Done } else { BlockResult::Failed(EIO) };
        self.done.push_back((tag, result));
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<(u64, BlockResult)>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

/// A virtio-blk device on the MMIO transport, at `base .. base + 0x200`.
#[derive(Debug)]
pub struct VirtioBlk<L> {
    /// The window it decodes: `(base, len)`, len at most [`mmio::WINDOW`].
    window: Option<(u64, u64)>,
    line: L,
    backend: Box<dyn BlockBackend>,
    transport: Transport,
    config: [u8; CONFIG_LEN],
    id: [u8; ID_LEN],
    last_avail: u16,
    used_idx: u16,
    notify: bool,
    /// Restored heads to do again.
    redo: Vec<u16>,
    fetch: Fetch,
    /// The descriptor table as last read.
    table: Vec<u8>,
    requests: HashMap<u16, Request>,
    waiting: VecDeque<u16>,
    buffered: u64,
    to_backend: VecDeque<(u16, BlockOp)>,
    backend_tags: HashMap<u64, u16>,
    next_backend_tag: u64,
    done: Vec<u16>,
    publish: Publish,
    tags: HashMap<u64, Purpose>,
    next_tag: u64,
    outbox: Vec<DmaRequest>,
    completions: Vec<(u64, BlockResult)>,
    counters: VirtioBlkCounters,
}

/// Little-endian u16 at `at` of `b` (callers checked the length).
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl<L: IrqLine> VirtioBlk<L> {
    /// Device `device` at `mmio = (base, len)` (None: it decodes nothing),
    /// raising `line`, on `backend`. Its GET_ID string is
    /// `dmfabric-<device>`.
    pub fn new(mmio: Option<(u64, u32)>, line: L, backend: Box<dyn BlockBackend>, device: u32) -> Self {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if backend.read_only() {
            features |= VIRTIO_BLK_F_RO;
        }
        let mut config = [0; CONFIG_LEN];
        config[0..8].copy_from_slice(&(backend.capacity() / SECTOR).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&BLK_SIZE.to_le_bytes());
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        let mut id = [0; ID_LEN];
        let name = format!("dmfabric-{device}");
        id[..name.len()].copy_from_slice(name.as_bytes());
        VirtioBlk {
            window: mmio.map(|(base, len)| (base, u64::from(len.min(mmio::WINDOW)))),
            line,
            backend,
            transport: Transport::new(VIRTIO_ID_BLOCK, features, 1),
            config,
            id,
            last_avail: 0,
            used_idx: 0,
            notify: false,
            redo: Vec::new(),
            fetch: Fetch::Idle,
            table: Vec::new(),
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            buffered: 0,
            to_backend: VecDeque::new(),
            backend_tags: HashMap::new(),
            next_backend_tag: 0,
            done: Vec::new(),
            publish: Publish::Idle,
            tags: HashMap::new(),
            next_tag: 0,
            outbox: Vec::new(),
            completions: Vec::new(),
            counters: VirtioBlkCounters::default(),
        }
    }

    /// What the model did and refused.
    pub fn stats(&self) -> &VirtioBlkCounters {
        &self.counters
    }

    pub fn line(&self) -> &L {
        &self.line
    }

    /// The features the device offers.
    pub fn offered(&self) -> u64 {
        self.transport.offered
    }

    fn queue(&self) -> QueueConfig {
        self.transport.state.queues.first().copied().unwrap_or_default()
    }

    fn broken(&self) -> bool {
        self.transport.state.status & status::DEVICE_NEEDS_RESET != 0
    }

    fn update_line(&mut self) {
        self.line.set_level(self.transport.state.interrupt_status != 0);
    }

    /// The offset of an access in the window, if the device has a register
    /// or configuration bytes of that size there.
    fn offset(&self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let (base, len) = self.window?;
        let off = addr.checked_sub(base)?;
        let bytes = u64::from(size.bytes());
        if space != Space::Mmio || off.checked_add(bytes)? > len || off % bytes != 0 {
            return None;
        }
        // Registers are 32 bits wide; configuration space takes any size.
        (off >= mmio::CONFIG || size == AccessSize::B4).then_some(off)
    }

    fn dma(&mut self, purpose: Purpose, op: DmaOp) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.tags.insert(tag, purpose);
        self.outbox.push(DmaRequest { tag, op });
    }

    /// Drop every request and DMA in flight (their answers will be
    /// unknown tags); `rewind`: the queue starts over at index 0.
    fn drop_work(&mut self, rewind: bool) {
        self.fetch = Fetch::Idle;
        self.notify = false;
        self.redo.clear();
        self.table = Vec::new();
        self.requests.clear();
        self.waiting.clear();
        self.buffered = 0;
        self.to_backend.clear();
        self.backend_tags.clear();
        self.done.clear();
        self.publish = Publish::Idle;
        self.tags.clear();
        self.outbox.clear();
        if rewind {
            self.last_avail = 0;
            self.used_idx = 0;
        }
    }

    /// The driver broke the ring: stop, and ask for a reset.
    fn needs_reset(&mut self) {
        self.counters.needs_reset += 1;
        self.transport.state.status |= status::DEVICE_NEEDS_RESET;
        self.transport.state.interrupt_status |= INT_CONFIG_CHANGE;
        self.drop_work(false);
        self.update_line();
    }

    /// Read the available ring if a notify (or restored work) asks for it.
    fn start_fetch(&mut self) {
        let due = self.notify || !self.redo.is_empty();
        if self.fetch != Fetch::Idle || !due || !self.transport.running() {
            return;
        }
        let q = self.queue();
        let Ok(n) = q.checked_size() else { return };
        if !q.ready {
            return;
        }
        self.notify = false;
        let (addr, len) = q.avail_read(n);
        self.fetch = Fetch::Avail;
        self.dma(Purpose::Avail, DmaOp::Read { addr, len });
    }

    fn on_avail(&mut self, result: DmaResult) {
        self.fetch = Fetch::Idle;
        let q = self.queue();
        let Ok(n) = q.checked_size() else { return };
        let b = match result {
            DmaResult::Read(b) if b.len() == q.avail_read(n).1 as usize => b,
            _ => {
                self.counters.ring_refused += 1;
                return self.needs_reset();
            }
        };
        let idx = le16(&b, 2);
        let new = idx.wrapping_sub(self.last_avail);
        if new > n {
            self.counters.bad_avail_idx += 1;
            return self.needs_reset();
        }
        let mut heads = mem::take(&mut self.redo);
        for i in 0..new {
            let pos = usize::from(self.last_avail.wrapping_add(i) % n);
            heads.push(le16(&b, 4 + 2 * pos));
        }
        self.last_avail = idx;
        for (k, &head) in heads.iter().enumerate() {
            if head >= n || self.requests.contains_key(&head) || heads[..k].contains(&head) {
                self.counters.bad_head += 1;
                return self.needs_reset();
            }
        }
        if !heads.is_empty() {
            self.fetch = Fetch::Table(heads);
            self.dma(Purpose::Table, DmaOp::Read { addr: q.desc, len: queue::DESC_SIZE as u32 * u32::from(n) });
        }
    }

    fn on_table(&mut self, heads: Vec<u16>, result: DmaResult) {
        self.fetch = Fetch::Idle;
        let Ok(n) = self.queue().checked_size() else { return };
        match result {
            DmaResult::Read(b) if b.len() == queue::DESC_SIZE as usize * usize::from(n) => self.table = b,
            _ => {
                self.counters.ring_refused += 1;
                return self.needs_reset();
            }
        }
        for head in heads {
            if self.broken() {
                return;
            }
            self.take(head, n);
        }
    }

    /// Turn the chain at `head` into a request.
    fn take(&mut self, head: u16, n: u16) {
        let c = &mut self.counters;
        let chain = match queue::walk(&self.table, n, head) {
            Ok(chain) => chain,
            Err(e) => {
                *match e {
                    ChainError::Head(_) => &mut c.bad_head,
                    ChainError::Next(_) => &mut c.bad_chain_next,
                    ChainError::Loop(_) => &mut c.bad_chain_loop,
                    ChainError::TooLong => &mut c.bad_chain_too_long,
                    ChainError::Indirect => &mut c.bad_chain_indirect,
                    ChainError::Order => &mut c.bad_chain_order,
                } += 1;
                return self.needs_reset();
            }
        };
        c.requests += 1;
        // The status is the last device-writable byte.
        let Some(last) = chain.iter().rposition(|d| d.writable() && d.len > 0) else {
            c.no_status += 1;
            return self.needs_reset();
        };
        let s = chain[last];
        if !s.in_address_space() {
            c.bad_desc_addr += 1;
            return self.needs_reset();
        }
        let mut req = Request {
            readable: Vec::new(),
            readable_len: 0,
            in_data: Vec::new(),
            in_len: 0,
            status_at: s.addr + u64::from(s.len - 1),
            kind: 0,
            bytes: Vec::new(),
            stage: Stage::Waiting,
            awaiting: 0,
            data_refused: false,
            status_refused: false,
            status_redone: false,
            status: VIRTIO_BLK_S_OK,
            written: 0,
            charged: 0,
        };
        // The header and the status byte take a descriptor each, at least.
        let mut bad = false;
        if chain.len() > SEG_MAX as usize + 2 {
            c.seg_max_exceeded += 1;
            bad = true;
        }
        if chain.iter().any(|d| d.len > SIZE_MAX) {
            c.seg_too_large += 1;
            bad = true;
        }
        if chain.iter().any(|d| !d.in_address_space()) {
            c.bad_desc_addr += 1;
            bad = true;
        }
        if !bad {
            for (i, d) in chain.iter().enumerate() {
                let len = if i == last { d.len - 1 } else { d.len };
                if len == 0 {
                    continue;
                }
                if d.writable() {
                    req.in_data.push((d.addr, len));
                    req.in_len += u64::from(len);
                } else {
                    req.readable.push((d.addr, len));
                    req.readable_len += len as usize;
                }
            }
            if req.readable_len < HEADER_LEN {
                c.bad_header += 1;
                bad = true;
            }
        }
        self.requests.insert(head, req);
        if bad {
            self.finish(head, VIRTIO_BLK_S_IOERR);
        } else {
            self.waiting.push_back(head);
        }
    }

    /// Read the readable bytes of waiting requests, as far as the buffer
    /// budget goes (the first always goes).
    fn start_reads(&mut self) {
        while let Some(&head) = self.waiting.front() {
            let Some(req) = self.requests.get_mut(&head) else {
                self.waiting.pop_front();
                continue;
            };
            let cost = req.readable_len as u64 + req.in_len;
            if self.buffered > 0 && self.buffered + cost > MAX_BUFFERED {
                return;
            }
            self.waiting.pop_front();
            self.buffered += cost;
            req.charged = cost;
            req.stage = Stage::Reading;
            req.bytes = vec![0; req.readable_len];
            req.awaiting = req.readable.len();
            let segments = req.readable.clone();
            let mut at = 0;
            for (addr, len) in segments {
                self.dma(Purpose::Read { head, at, len }, DmaOp::Read { addr, len });
                at += len as usize;
            }
        }
    }

    fn on_read(&mut self, head: u16, at: usize, len: u32, result: DmaResult) {
        let Some(req) = self.requests.get_mut(&head).filter(|r| r.stage == Stage::Reading) else { return };
        match result {
            DmaResult::Read(b) if b.len() == len as usize && at + b.len() <= req.bytes.len() => {
                req.bytes[at..at + b.len()].copy_from_slice(&b);
            }
            _ => req.data_refused = true,
        }
        req.awaiting -= 1;
        if req.awaiting > 0 {
            return;
        }
        if req.data_refused {
            self.counters.bad_desc_addr += 1;
            return self.finish(head, VIRTIO_BLK_S_IOERR);
        }
        self.execute(head);
    }

    /// The disk offset of `len` bytes from `sector`, if they are whole
    /// sectors of the disk.
    fn disk_range(&mut self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR != 0 {
            self.counters.bad_length += 1;
            return None;
        }
        let offset = sector.checked_mul(SECTOR);
        match offset.and_then(|o| o.checked_add(len)) {
            Some(end) if end <= self.backend.capacity() => offset,
            _ => {
                self.counters.out_of_range += 1;
                None
            }
        }
    }

    /// The header is in: do the request.
    fn execute(&mut self, head: u16) {
        let Some(req) = self.requests.get_mut(&head) else { return };
        let h = &req.bytes[..HEADER_LEN];
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        req.kind = kind;
        let in_len = req.in_len;
        let out_len = (req.readable_len - HEADER_LEN) as u64;
        match kind {
            VIRTIO_BLK_T_IN => {
                self.counters.reads += 1;
                let Some(offset) = self.disk_range(sector, in_len) else {
                    return self.finish(head, VIRTIO_BLK_S_IOERR);
                };
                if in_len == 0 {
                    return self.finish(head, VIRTIO_BLK_S_OK);
                }
                // At most SEG_MAX · SIZE_MAX bytes: a u32.
                self.submit(head, BlockOp::Read { offset, len: in_len as u32 });
            }
            VIRTIO_BLK_T_OUT => {
                self.counters.writes += 1;
                let Some(offset) = self.disk_range(sector, out_len) else {
                    return self.finish(head, VIRTIO_BLK_S_IOERR);
                };
                if self.backend.read_only() {
                    self.counters.read_only_write += 1;
                    return self.finish(head, VIRTIO_BLK_S_IOERR);
                }
                if out_len == 0 {
                    return self.finish(head, VIRTIO_BLK_S_OK);
                }
                let mut data = self.requests.get_mut(&head).map(|r| mem::take(&mut r.bytes)).unwrap_or_default();
                data.drain(..HEADER_LEN);
                self.submit(head, BlockOp::Write { offset, data });
            }
            VIRTIO_BLK_T_FLUSH => {
                self.counters.flushes += 1;
                self.submit(head, BlockOp::Flush);
            }
            VIRTIO_BLK_T_GET_ID => {
                self.counters.get_ids += 1;
                let len = in_len.min(ID_LEN as u64) as usize;
                let id = self.id[..len].to_vec();
                self.write_back(head, id, VIRTIO_BLK_S_OK);
            }
            _ => self.finish(head, VIRTIO_BLK_S_UNSUPP),
        }
    }

    fn submit(&mut self, head: u16, op: BlockOp) {
        if let Some(req) = self.requests.get_mut(&head) {
            req.stage = Stage::Backend;
            self.to_backend.push_back((head, op));
            self.submit_waiting();
        }
    }

    /// Hand waiting requests to the backend while it has room.
    fn submit_waiting(&mut self) {
        while !self.to_backend.is_empty() && self.backend.in_flight() < self.backend.depth().max(1) {
            let Some((head, op)) = self.to_backend.pop_front() else { return };
            let tag = self.next_backend_tag;
            self.next_backend_tag += 1;
            match self.backend.submit(tag, op) {
                Ok(()) => {
                    self.backend_tags.insert(tag, head);
                }
                // It said it had room; the op is gone with the refusal.
                Err(SubmitError::Full) => {
                    self.counters.backend_refused += 1;
                    self.finish(head, VIRTIO_BLK_S_IOERR);
                }
            }
        }
    }

    fn on_backend(&mut self, tag: u64, result: BlockResult) {
        let Some(head) = self.backend_tags.remove(&tag) else {
            self.counters.unknown_backend += 1;
            return;
        };
        let Some(req) = self.requests.get(&head).filter(|r| r.stage == Stage::Backend) else { return };
        let (kind, in_len, out_len) = (req.kind, req.in_len, (req.readable_len - HEADER_LEN) as u64);
        match (kind, result) {
            (VIRTIO_BLK_T_IN, BlockResult::Read(data)) if data.len() as u64 == in_len => {
                self.counters.bytes_read += in_len;
                self.write_back(head, data, VIRTIO_BLK_S_OK);
            }
            (VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH, BlockResult::Done) => {
                if kind == VIRTIO_BLK_T_OUT {
                    self.counters.bytes_written += out_len;
                }
                self.finish(head, VIRTIO_BLK_S_OK);
            }
            _ => {
                self.counters.backend_errors += 1;
                self.finish(head, VIRTIO_BLK_S_IOERR);
            }
        }
    }

    /// End the request with `status` and nothing written but the status.
    fn finish(&mut self, head: u16, status: u8) {
        self.write_back(head, Vec::new(), status);
    }

    /// Write `data` into the request's device-writable segments (it fits:
    /// callers cut it to the request's length) and `status` after it.
    fn write_back(&mut self, head: u16, data: Vec<u8>, status: u8) {
        let Some(req) = self.requests.get_mut(&head) else { return };
        req.stage = Stage::Writing;
        // A refused read is answered here; only this stage's refusals count now.
        req.data_refused = false;
        req.status = status;
        req.written = data.len() as u32 + 1;
        req.bytes = Vec::new();
        let mut writes = Vec::new();
        let mut rest = &data[..];
        for &(addr, len) in &req.in_data {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at(rest.len().min(len as usize));
            writes.push((Purpose::Data { head }, DmaOp::Write { addr, data: now.to_vec() }));
            rest = later;
        }
        writes.push((Purpose::Status { head }, DmaOp::Write { addr: req.status_at, data: vec![status] }));
        req.awaiting = writes.len();
        for (purpose, op) in writes {
            self.dma(purpose, op);
        }
    }

    fn on_written(&mut self, head: u16, of_status: bool, result: DmaResult) {
        let Some(req) = self.requests.get_mut(&head).filter(|r| r.stage == Stage::Writing) else { return };
        if result != DmaResult::Written {
            if of_status {
                req.status_refused = true;
            } else {
                req.data_refused = true;
            }
        }
        req.awaiting -= 1;
        if req.awaiting > 0 {
            return;
        }
        if req.status_refused {
            // Nowhere to say how it ended.
            self.counters.bad_desc_addr += 1;
            return self.needs_reset();
        }
        if req.data_refused && !req.status_redone {
            // The status went out as OK but the data did not: say IOERR
            // before the request is published.
            req.status_redone = true;
            req.status = VIRTIO_BLK_S_IOERR;
            req.written = 1;
            req.awaiting = 1;
            let addr = req.status_at;
            self.counters.bad_desc_addr += 1;
            return self.dma(Purpose::Status { head }, DmaOp::Write { addr, data: vec![VIRTIO_BLK_S_IOERR] });
        }
        req.stage = Stage::Done;
        let (status, charged) = (req.status, req.charged);
        self.buffered = self.buffered.saturating_sub(charged);
        *match status {
            VIRTIO_BLK_S_OK => &mut self.counters.ok,
            VIRTIO_BLK_S_IOERR => &mut self.counters.ioerr,
            _ => &mut self.counters.unsupp,
        } += 1;
        self.done.push(head);
    }

    /// Write the used elements of finished requests, if no update is under way.
    fn start_publish(&mut self) {
        if self.publish != Publish::Idle || self.done.is_empty() {
            return;
        }
        let q = self.queue();
        let Ok(n) = q.checked_size() else { return };
        let batch = mem::take(&mut self.done);
        let mut writes = Vec::new();
        let mut start = self.used_idx % n;
        let mut chunk = Vec::new();
        for (i, head) in batch.iter().enumerate() {
            let len = self.requests.get(head).map_or(0, |r| r.written);
            chunk.extend_from_slice(&u32::from(*head).to_le_bytes());
            chunk.extend_from_slice(&len.to_le_bytes());
            let pos = (self.used_idx.wrapping_add(i as u16 + 1)) % n;
            if pos == 0 {
                // The ring wraps here: what follows starts at element 0.
                writes.push(DmaOp::Write { addr: q.used_elem(start), data: mem::take(&mut chunk) });
                start = 0;
            }
        }
        if !chunk.is_empty() {
            writes.push(DmaOp::Write { addr: q.used_elem(start), data: chunk });
        }
        self.publish = Publish::Elems { awaiting: writes.len(), batch };
        for op in writes {
            self.dma(Purpose::UsedElems, op);
        }
    }

    fn on_used_elems(&mut self, result: DmaResult) {
        if result != DmaResult::Written {
            self.counters.ring_refused += 1;
            return self.needs_reset();
        }
        let Publish::Elems { awaiting, batch } = &mut self.publish else { return };
        *awaiting -= 1;
        if *awaiting > 0 {
            return;
        }
        let batch = mem::take(batch);
        let idx = self.used_idx.wrapping_add(batch.len() as u16);
        self.publish = Publish::Idx { batch };
        let addr = self.queue().used_idx();
        self.dma(Purpose::UsedIdx, DmaOp::Write { addr, data: idx.to_le_bytes().to_vec() });
    }

    fn on_used_idx(&mut self, result: DmaResult) {
        if result != DmaResult::Written {
            self.counters.ring_refused += 1;
            return self.needs_reset();
        }
        let Publish::Idx { batch } = mem::replace(&mut self.publish, Publish::Idle) else { return };
        self.used_idx = self.used_idx.wrapping_add(batch.len() as u16);
        for head in batch {
            self.requests.remove(&head);
        }
        self.transport.state.interrupt_status |= INT_USED_BUFFER;
        self.update_line();
    }

    /// The heads taken from the ring and not yet published.
    fn in_flight(&self) -> Vec<u16> {
        let mut heads = self.redo.clone();
        if let Fetch::Table(h) = &self.fetch {
            heads.extend_from_slice(h);
        }
        let mut taken: Vec<u16> = self.requests.keys().copied().collect();
        taken.sort_unstable();
        heads.extend(taken);
        heads
    }
}

impl<L: IrqLine> DmaDevice for VirtioBlk<L> {
    fn poll(&mut self, out: &mut Vec<DmaRequest>) {
        let mut completions = mem::take(&mut self.completions);
        self.backend.poll(&mut completions);
        for (tag, result) in completions.drain(..) {
            self.on_backend(tag, result);
        }
        self.completions = completions;
        self.submit_waiting();
        self.start_fetch();
        self.start_reads();
        self.start_publish();
        out.append(&mut self.outbox);
    }

    fn busy(&self) -> bool {
        let fetch_due = self.fetch == Fetch::Idle
            && (self.notify || !self.redo.is_empty())
            && self.transport.running()
            && self.queue().ready;
        !self.outbox.is_empty()
            || !self.tags.is_empty()
            || self.backend.in_flight() > 0
            || !self.to_backend.is_empty()
            || !self.waiting.is_empty()
            || !self.done.is_empty()
            || fetch_due
    }

    fn dma_done(&mut self, tag: u64, result: DmaResult) {
        let Some(purpose) = self.tags.remove(&tag) else {
            self.counters.unknown_dma += 1;
            return;
        };
        match purpose {
            Purpose::Avail => self.on_avail(result),
            Purpose::Table => match mem::replace(&mut self.fetch, Fetch::Idle) {
                Fetch::Table(heads) => self.on_table(heads, result),
                other => self.fetch = other,
            },
            Purpose::Read { head, at, len } => self.on_read(head, at, len, result),
            Purpose::Data { head } => self.on_written(head, false, result),
            Purpose::Status { head } => self.on_written(head, true, result),
            Purpose::UsedElems => self.on_used_elems(result),
            Purpose::UsedIdx => self.on_used_idx(result),
        }
    }
}

impl<L: IrqLine> Persist for VirtioBlk<L> {
    type State = VirtioBlkState;
    /// The MMIO window, the line, the backend, the device id.
    type ConstructorArgs = (Option<(u64, u32)>, L, Box<dyn BlockBackend>, u32);

    fn save(&self) -> VirtioBlkState {
        VirtioBlkState {
            transport: self.transport.state.clone(),
            last_avail_idx: self.last_avail,
            used_idx: self.used_idx,
            in_flight: self.in_flight(),
            notify: self.notify || self.fetch != Fetch::Idle,
        }
    }

    fn restore((mmio, line, backend, device): Self::ConstructorArgs, s: VirtioBlkState) -> Result<Self, RestoreError> {
        let invalid = |what: String| Err(RestoreError::invalid("virtio-blk", what));
        let mut d = VirtioBlk::new(mmio, line, backend, device);
        let t = &s.transport;
        if t.queues.len() != 1 {
            return invalid(format!("{} queues, not 1", t.queues.len()));
        }
        if t.status & !status::ALL != 0 {
            return invalid(format!("status {:#x} has bits no status has", t.status));
        }
        if t.status & status::FEATURES_OK != 0 && !d.transport.acceptable(t.driver_features) {
            return invalid(format!(
                "features {:#x} accepted, but the device offers {:#x} (with VERSION_1)",
                t.driver_features, d.transport.offered
            ));
        }
        if t.interrupt_status & !(INT_USED_BUFFER | INT_CONFIG_CHANGE) != 0 {
            return invalid(format!("interrupt status {:#x}", t.interrupt_status));
        }
        let q = t.queues[0];
        let taken = s.last_avail_idx.wrapping_sub(s.used_idx);
        if !q.ready {
            if !s.in_flight.is_empty() || taken != 0 {
                return invalid("requests in flight on a queue that is not ready".into());
            }
        } else {
            let n = match q.check() {
                Ok(n) => n,
                Err(e) => return invalid(format!("a ready queue: {e}")),
            };
            if taken > n {
                return invalid(format!("{taken} requests in flight on a queue of {n}"));
            }
            for (k, &head) in s.in_flight.iter().enumerate() {
                if head >= n || s.in_flight[..k].contains(&head) {
                    return invalid(format!("in-flight head {head}: outside a queue of {n}, or twice"));
                }
            }
            let broken = t.status & status::DEVICE_NEEDS_RESET != 0;
            let expected = if broken { 0 } else { usize::from(taken) };
            if s.in_flight.len() != expected {
                return invalid(format!("{} heads in flight where the ring indexes say {expected}", s.in_flight.len()));
            }
        }
        d.transport.state = s.transport;
        d.last_avail = s.last_avail_idx;
        d.used_idx = s.used_idx;
        d.redo = s.in_flight;
        d.notify = s.notify;
        d.update_line();
        Ok(d)
    }
}

impl<L: IrqLine> Device for VirtioBlk<L> {
    fn kind(&self) -> &'static str {
        "virtio-blk"
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let off = self.offset(space, addr, size)?;
        if off < mmio::CONFIG {
            return self.transport.read(off).map(u64::from);
        }
        let at = (off - mmio::CONFIG) as usize;
        let mut v = [0u8; 8];
        let n = usize::from(size.bytes());
        v[..n].copy_from_slice(self.config.get(at..at + n)?);
        Some(u64::from_le_bytes(v))
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        // Configuration space is read-only (no writeback cache to set).
        let Some(off) = self.offset(space, addr, size).filter(|&off| off < mmio::CONFIG) else { return false };
        let Some(event) = self.transport.write(off, data as u32) else { return false };
        match event {
            Event::None => {}
            Event::Notify(0) => {
                self.counters.notifies += 1;
                self.notify = true;
            }
            Event::Notify(_) => self.counters.bad_notify += 1,
            Event::Reset | Event::QueueDisabled(_) => self.drop_work(true),
            Event::FeaturesRefused => self.counters.features_refused += 1,
            Event::QueueRefused(_, e) => {
                if e == LayoutError::Overlap {
                    self.counters.ring_overlap += 1;
                } else {
                    self.counters.bad_queue_config += 1;
                }
                self.needs_reset();
            }
            Event::InterruptAck => {}
        }
        self.update_line();
        true
    }

    fn save(&self) -> DeviceState {
        DeviceState::VirtioBlk(Persist::save(self))
    }

    fn dma(&mut self) -> Option<&mut dyn DmaDevice> {
        Some(self)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.counters.list()
    }
}

#[cfg(test)]
#[path = "blk_tests.rs"]
mod tests;
