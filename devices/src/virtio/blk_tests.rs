//! virtio-blk driven the way a guest's driver and a remote host drive it:
//! a test host owns the guest's RAM, writes rings and requests into it,
//! and answers the model's DMA out of order, late, or not at all.

use super::*;
use crate::irq::CountingLine;
use crate::testing::MemBackend;
use crate::virtio::mmio::*;
use crate::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

const RAM: usize = 4 << 20;
const BASE: u64 = 0xfeb0_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const DISK: usize = 1 << 20;

/// How the host answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Sequential,
    Reversed,
    /// Shuffled, and each answer held back up to this many rounds.
    Shuffled(u64),
}

/// One buffer of a chain: `(addr, len, device-writable)`.
type Buf = (u64, u32, bool);

struct Host {
    ram: Vec<u8>,
    dev: VirtioBlk<CountingLine>,
    disk: MemBackend,
    order: Order,
    rng: u64,
    /// Answers not yet given: (round due, request).
    held: Vec<(u64, DmaRequest)>,
    round: u64,
    seen: Vec<DmaRequest>,
    qsize: u16,
    next_desc: u16,
    avail_idx: u16,
    bump: u64,
    /// What the driver gave: ranges the device may read, and write.
    may_read: Vec<(u64, u64)>,
    may_write: Vec<(u64, u64)>,
}

impl Host {
    fn new(disk: MemBackend) -> Host {
        let dev = VirtioBlk::new(Some((BASE, WINDOW)), CountingLine::default(), Box::new(disk.clone()), 7);
        Host {
            ram: vec![0; RAM],
            dev,
            disk,
            order: Order::Sequential,
            rng: 0x9e37_79b9_7f4a_7c15,
            held: Vec::new(),
            round: 0,
            seen: Vec::new(),
            qsize: 16,
            next_desc: 0,
            avail_idx: 0,
            bump: 0x10_0000,
            may_read: Vec::new(),
            may_write: Vec::new(),
        }
    }

    /// A host whose driver has set the device up with a queue of `qsize`.
    fn ready(qsize: u16) -> Host {
        let mut h = Host::new(MemBackend::new(DISK));
        h.qsize = qsize;
        h.setup(u64::MAX);
        h
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn reg(&mut self, off: u64) -> u32 {
        self.dev.read(Space::Mmio, BASE + off, AccessSize::B4).expect("a register") as u32
    }

    fn set(&mut self, off: u64, v: u32) {
        assert!(self.dev.write(Space::Mmio, BASE + off, AccessSize::B4, u64::from(v)), "register {off:#x}");
    }

    fn set64(&mut self, low: u64, v: u64) {
        self.set(low, v as u32);
        self.set(low + 4, (v >> 32) as u32);
    }

    /// The Linux driver's sequence, accepting `want` of what is offered.
    fn setup(&mut self, want: u64) {
        self.set(STATUS, 0);
        self.set(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.set(DEVICE_FEATURES_SEL, 0);
        let mut offered = u64::from(self.reg(DEVICE_FEATURES));
        self.set(DEVICE_FEATURES_SEL, 1);
        offered |= u64::from(self.reg(DEVICE_FEATURES)) << 32;
        let take = offered & want;
        self.set(DRIVER_FEATURES_SEL, 0);
        self.set(DRIVER_FEATURES, take as u32);
        self.set(DRIVER_FEATURES_SEL, 1);
        self.set(DRIVER_FEATURES, (take >> 32) as u32);
        self.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(self.reg(STATUS) & status::FEATURES_OK, 0, "features accepted");
        self.set(QUEUE_SEL, 0);
        assert_eq!(self.reg(QUEUE_READY), 0);
        assert_eq!(self.reg(QUEUE_NUM_MAX_REG), 256);
        self.set(QUEUE_NUM, u32::from(self.qsize));
        self.set64(QUEUE_DESC_LOW, DESC);
        self.set64(QUEUE_DRIVER_LOW, AVAIL);
        self.set64(QUEUE_DEVICE_LOW, USED);
        self.set(QUEUE_READY, 1);
        assert_eq!(self.reg(QUEUE_READY), 1);
        self.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        let n = u64::from(self.qsize);
        self.may_read.push((DESC, DESC + 16 * n));
        self.may_read.push((AVAIL, AVAIL + 4 + 2 * n));
        self.may_write.push((USED + 2, USED + 4 + 8 * n));
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        self.ram[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
    }

    fn get(&self, addr: u64, len: usize) -> &[u8] {
        &self.ram[addr as usize..addr as usize + len]
    }

    /// Room for `len` bytes of buffers.
    fn alloc(&mut self, len: u32) -> u64 {
        let at = self.bump;
        self.bump += u64::from(len).div_ceil(16) * 16 + 16;
        at
    }

    /// Write descriptor `i`.
    fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(DESC + 16 * u64::from(i), &d);
    }

    /// A chain of `bufs` in fresh descriptors; its head. (The tests give
    /// the device no more than the table holds.)
    fn chain(&mut self, bufs: &[Buf]) -> u16 {
        let n = self.qsize;
        assert!(bufs.len() <= usize::from(n), "a chain longer than the table");
        let head = self.next_desc % n;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = (self.next_desc + k as u16) % n;
            let last = k + 1 == bufs.len();
            let flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            self.desc(i, addr, len, flags, (i + 1) % n);
            let end = addr.saturating_add(u64::from(len));
            if writable {
                self.may_write.push((addr, end));
            } else {
                self.may_read.push((addr, end));
            }
        }
        self.next_desc = self.next_desc.wrapping_add(bufs.len() as u16);
        head
    }

    /// Make `head` available (the entry, then the idx).
    fn offer(&mut self, head: u16) {
        let pos = self.avail_idx % self.qsize;
        self.put(AVAIL + 4 + 2 * u64::from(pos), &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = self.avail_idx;
        self.put(AVAIL + 2, &idx.to_le_bytes());
    }

    fn notify(&mut self) {
        self.set(QUEUE_NOTIFY, 0);
    }

    /// A request of the usual layout: header, data buffers of `data`
    /// lengths (written with `out` for a write), status. Returns the head,
    /// the data addresses and the status address.
    fn request(&mut self, kind: u32, sector: u64, data: &[u32], out: Option<&[u8]>) -> (u16, Vec<u64>, u64) {
        let hdr = self.alloc(16);
        let mut h = Vec::new();
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.put(hdr, &h);
        let mut bufs = vec![(hdr, 16, false)];
        let mut addrs = Vec::new();
        let mut at = 0;
        for &len in data {
            let a = self.alloc(len);
            if let Some(bytes) = out {
                self.put(a, &bytes[at..at + len as usize]);
            }
            at += len as usize;
            addrs.push(a);
            bufs.push((a, len, out.is_none()));
        }
        let st = self.alloc(1);
        self.put(st, &[0xff]);
        bufs.push((st, 1, true));
        let head = self.chain(&bufs);
        (head, addrs, st)
    }

    fn allowed(&self, op: &DmaOp) -> bool {
        let (start, end) = (op.addr(), op.addr() + op.len());
        let ranges = match op {
            DmaOp::Read { .. } => &self.may_read,
            DmaOp::Write { .. } => &self.may_write,
        };
        !op.is_empty() && ranges.iter().any(|&(a, b)| a <= start && end <= b)
    }

    fn answer(&mut self, r: DmaRequest) {
        let (addr, len) = (r.op.addr(), r.op.len());
        let inside = addr.checked_add(len).is_some_and(|end| end <= RAM as u64);
        let result = match r.op {
            _ if !inside => DmaResult::Refused,
            DmaOp::Read { .. } => DmaResult::Read(self.get(addr, len as usize).to_vec()),
            DmaOp::Write { addr, data } => {
                self.put(addr, &data);
                DmaResult::Written
            }
        };
        self.dev.dma_done(r.tag, result);
    }

    /// One pass of the host's loop: poll, answer what is due.
    fn pass(&mut self) {
        let mut out = Vec::new();
        self.dev.poll(&mut out);
        for r in out {
            assert!(self.allowed(&r.op), "DMA outside what the driver gave: {:?}", (r.op.addr(), r.op.len()));
            self.seen.push(r.clone());
            let delay = match self.order {
                Order::Shuffled(max) => self.rand() % (max + 1),
                _ => 0,
            };
            self.held.push((self.round + delay, r));
        }
        let round = self.round;
        let (mut due, later): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(at, _)| *at <= round);
        self.held = later;
        match self.order {
            Order::Sequential => {}
            Order::Reversed => due.reverse(),
            Order::Shuffled(_) => {
                for i in (1..due.len()).rev() {
                    let j = (self.rand() % (i as u64 + 1)) as usize;
                    due.swap(i, j);
                }
            }
        }
        for (_, r) in due {
            self.answer(r);
        }
        self.round += 1;
    }

    /// Run the host's loop until the model waits for nothing.
    fn run(&mut self) {
        for _ in 0..10_000 {
            self.pass();
            if !self.dev.busy() && self.held.is_empty() {
                return;
            }
        }
        panic!("the model is still busy after 10000 passes");
    }

    fn used_idx(&self) -> u16 {
        le16(self.get(USED + 2, 2), 0)
    }

    /// Used element `i`: (id, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % self.qsize);
        let b = self.get(at, 8);
        (u32::from_le_bytes(b[0..4].try_into().unwrap()), u32::from_le_bytes(b[4..8].try_into().unwrap()))
    }

    fn status_byte(&self, at: u64) -> u8 {
        self.ram[at as usize]
    }

    fn needs_reset(&mut self) -> bool {
        self.reg(STATUS) & status::DEVICE_NEEDS_RESET != 0
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn writes_and_reads_round_trip_with_answers_in_any_order() {
    for order in [Order::Sequential, Order::Reversed, Order::Shuffled(0), Order::Shuffled(5)] {
        let mut h = Host::ready(64);
        h.order = order;
        // Four writes in one batch, each of two segments.
        let mut writes = Vec::new();
        for k in 0..4u8 {
            let data = pattern(k, 1536);
            let (head, _, st) = h.request(VIRTIO_BLK_T_OUT, u64::from(k) * 3, &[512, 1024], Some(&data));
            h.offer(head);
            writes.push((head, st, data));
        }
        h.notify();
        h.run();
        assert_eq!(h.used_idx(), 4, "{order:?}");
        let mut ids: Vec<u32> = (0..4).map(|i| h.used(i).0).collect();
        ids.sort_unstable();
        let mut heads: Vec<u32> = writes.iter().map(|w| u32::from(w.0)).collect();
        heads.sort_unstable();
        assert_eq!(ids, heads);
        for i in 0..4 {
            assert_eq!(h.used(i).1, 1, "a write puts only its status in the writable part");
        }
        for (k, (_, st, data)) in writes.iter().enumerate() {
            assert_eq!(h.status_byte(*st), VIRTIO_BLK_S_OK);
            let at = k * 3 * 512;
            assert_eq!(&h.disk.bytes()[at..at + 1536], &data[..], "{order:?}");
        }
        assert!(h.dev.line().level, "a used buffer raises the line");
        assert_eq!(h.reg(INTERRUPT_STATUS), INT_USED_BUFFER);
        h.set(INTERRUPT_ACK, INT_USED_BUFFER);
        assert!(!h.dev.line().level, "the ACK lowers it");

        // Read them back: one 1536-byte request across three segments.
        let mut reads = Vec::new();
        for k in 0..4u8 {
            let (head, bufs, st) = h.request(VIRTIO_BLK_T_IN, u64::from(k) * 3, &[1024, 256, 256], None);
            h.offer(head);
            reads.push((head, bufs, st, pattern(k, 1536)));
        }
        h.notify();
        h.run();
        assert_eq!(h.used_idx(), 8);
        for i in 4..8 {
            assert_eq!(h.used(i).1, 1537, "data and status");
        }
        for (_, bufs, st, want) in reads {
            assert_eq!(h.status_byte(st), VIRTIO_BLK_S_OK);
            let got = [h.get(bufs[0], 1024), h.get(bufs[1], 256), h.get(bufs[2], 256)].concat();
            assert_eq!(got, want, "{order:?}");
        }
        let s = h.dev.stats();
        assert_eq!((s.requests, s.reads, s.writes, s.ok, s.ioerr), (8, 4, 4, 8, 0));
        assert_eq!((s.bytes_read, s.bytes_written), (4 * 1536, 4 * 1536));
        assert_eq!(s.unknown_dma, 0);
    }
}

#[test]
fn rings_and_descriptors_are_read_in_few_requests() {
    let mut h = Host::ready(16);
    for k in 0..8 {
        let (head, _, _) = h.request(VIRTIO_BLK_T_IN, k, &[512], None);
        h.offer(head);
    }
    h.notify();
    h.run();
    let ring_reads =
        h.seen.iter().filter(|r| matches!(r.op, DmaOp::Read { addr, .. } if addr == AVAIL || addr == DESC));
    assert_eq!(ring_reads.count(), 2, "the avail ring and the table, once each for a batch of 8");
    let used_writes =
        h.seen.iter().filter(|r| matches!(r.op, DmaOp::Write { addr, .. } if (USED..USED + 0x100).contains(&addr)));
    assert!(used_writes.count() <= 4, "the used elements and idx, batched");
    assert_eq!(h.used_idx(), 8);
}

#[test]
fn header_and_data_may_share_a_descriptor() {
    let mut h = Host::ready(16);
    let buf = h.alloc(16 + 512);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&5u64.to_le_bytes());
    bytes.extend_from_slice(&pattern(9, 512));
    h.put(buf, &bytes);
    // The status shares the read's data buffer too: its last byte.
    let st = h.alloc(1);
    let head = h.chain(&[(buf, 16 + 512, false), (st, 1, true)]);
    h.offer(head);
    let rd_hdr = h.alloc(16);
    h.put(rd_hdr, &[0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
    let inbuf = h.alloc(513);
    let head2 = h.chain(&[(rd_hdr, 16, false), (inbuf, 513, true)]);
    h.offer(head2);
    h.notify();
    h.run();
    assert_eq!(&h.disk.bytes()[5 * 512..6 * 512], &pattern(9, 512)[..]);
    assert_eq!(h.get(inbuf, 512), &pattern(9, 512)[..]);
    assert_eq!(h.status_byte(inbuf + 512), VIRTIO_BLK_S_OK);
    assert_eq!(h.status_byte(st), VIRTIO_BLK_S_OK);
}

#[test]
fn flush_reaches_the_backend_and_get_id_names_the_device() {
    let mut h = Host::ready(16);
    let (flush, _, fst) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(flush);
    let (id, bufs, ist) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[20], None);
    h.offer(id);
    h.notify();
    h.run();
    assert_eq!(h.disk.flushes(), 1);
    assert_eq!(h.status_byte(fst), VIRTIO_BLK_S_OK);
    assert_eq!(h.status_byte(ist), VIRTIO_BLK_S_OK);
    assert_eq!(&h.get(bufs[0], 20)[..11], b"dmfabric-7\0");
    let lens: Vec<u32> = (0..2).map(|i| h.used(i).1).collect();
    assert!(lens.contains(&21) && lens.contains(&1), "{lens:?}");
    assert_eq!((h.dev.stats().flushes, h.dev.stats().get_ids), (1, 1));
}

#[test]
fn many_requests_wait_for_a_shallow_backend() {
    let mut h = Host::ready(64);
    h.disk.set_depth(1);
    h.order = Order::Shuffled(3);
    let mut sts = Vec::new();
    for k in 0..20 {
        let (head, _, st) = h.request(VIRTIO_BLK_T_OUT, k, &[512], Some(&pattern(k as u8, 512)));
        h.offer(head);
        sts.push(st);
    }
    h.notify();
    h.run();
    assert_eq!(h.used_idx(), 20);
    assert!(sts.iter().all(|&st| h.status_byte(st) == VIRTIO_BLK_S_OK));
    for k in 0..20usize {
        assert_eq!(&h.disk.bytes()[k * 512..(k + 1) * 512], &pattern(k as u8, 512)[..]);
    }
}

#[test]
fn a_notify_during_a_fetch_is_remembered_and_no_head_is_taken_twice() {
    let mut h = Host::ready(16);
    let (a, _, sa) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(a);
    h.notify();
    let mut out = Vec::new();
    h.dev.poll(&mut out);
    assert_eq!(out.len(), 1, "the avail read");
    // The guest adds another and notifies while the first read is out.
    let (b, _, sb) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(b);
    h.notify();
    h.notify();
    for r in out {
        h.seen.push(r.clone());
        h.answer(r);
    }
    h.run();
    assert_eq!(h.used_idx(), 2);
    assert_eq!((h.status_byte(sa), h.status_byte(sb)), (0, 0));
    assert_eq!(h.dev.stats().requests, 2, "each head once");
    assert_eq!(h.disk.flushes(), 2);
    assert_eq!(h.dev.stats().notifies, 3);
}

#[test]
fn late_and_duplicate_answers_change_nothing() {
    let mut h = Host::ready(16);
    let (head, _, _) = h.request(VIRTIO_BLK_T_IN, 1, &[512], None);
    h.offer(head);
    h.notify();
    h.run();
    let saved = Persist::save(&h.dev);
    let ram = h.ram.clone();
    let before = h.dev.stats().clone();
    let seen = h.seen.clone();
    for r in &seen {
        h.dev.dma_done(r.tag, DmaResult::Written);
        h.dev.dma_done(r.tag, DmaResult::Read(vec![0xee; 16]));
        h.dev.dma_done(r.tag, DmaResult::Refused);
    }
    h.dev.dma_done(u64::MAX, DmaResult::Refused);
    h.run();
    assert_eq!(Persist::save(&h.dev), saved);
    assert_eq!(h.ram, ram);
    assert_eq!(h.dev.stats().unknown_dma, before.unknown_dma + 3 * seen.len() as u64 + 1);
    assert_eq!(VirtioBlkCounters { unknown_dma: before.unknown_dma, ..h.dev.stats().clone() }, before);
}

#[test]
fn features_ok_is_refused_without_version_1_and_reset_clears_the_queue() {
    let mut h = Host::new(MemBackend::new(DISK));
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER);
    h.set(DRIVER_FEATURES_SEL, 0);
    h.set(DRIVER_FEATURES, VIRTIO_BLK_F_FLUSH as u32);
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(h.reg(STATUS) & status::FEATURES_OK, 0);
    assert_eq!(h.dev.stats().features_refused, 1);
    // Not offered: bit 28 (indirect descriptors).
    h.set(DRIVER_FEATURES_SEL, 1);
    h.set(DRIVER_FEATURES, 1);
    h.set(DRIVER_FEATURES_SEL, 0);
    h.set(DRIVER_FEATURES, 1 << 28);
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(h.reg(STATUS) & status::FEATURES_OK, 0);

    let mut h = Host::ready(16);
    let (head, _, _) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!(h.reg(QUEUE_READY), 1);
    h.set(STATUS, 0);
    assert_eq!(h.reg(STATUS), 0);
    assert_eq!(h.reg(QUEUE_READY), 0);
    assert_eq!(h.reg(INTERRUPT_STATUS), 0);
    assert!(!h.dev.line().level);
    assert_eq!(Persist::save(&h.dev), VirtioBlkState::default());
    // Set up again, the queue starts at index 0.
    h.ram[AVAIL as usize..AVAIL as usize + 0x100].fill(0);
    h.ram[USED as usize..USED as usize + 0x100].fill(0);
    h.avail_idx = 0;
    h.setup(u64::MAX);
    let (head, _, st) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!((h.used_idx(), h.status_byte(st)), (1, 0));
}

#[test]
fn nothing_runs_before_driver_ok() {
    let mut h = Host::new(MemBackend::new(DISK));
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER);
    h.set(DRIVER_FEATURES_SEL, 1);
    h.set(DRIVER_FEATURES, 1);
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    h.set(QUEUE_NUM, 16);
    h.set64(QUEUE_DESC_LOW, DESC);
    h.set64(QUEUE_DRIVER_LOW, AVAIL);
    h.set64(QUEUE_DEVICE_LOW, USED);
    h.set(QUEUE_READY, 1);
    h.may_read.extend([(DESC, DESC + 256), (AVAIL, AVAIL + 36)]);
    h.may_write.push((USED + 2, USED + 4 + 128));
    let (head, _, st) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(head);
    h.notify();
    h.run();
    assert!(h.seen.is_empty(), "no DMA before DRIVER_OK");
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    h.run();
    assert_eq!((h.used_idx(), h.status_byte(st)), (1, 0), "the notify is acted on at DRIVER_OK");
}

#[test]
fn registers_and_configuration_space() {
    let disk = MemBackend::new(DISK);
    disk.set_read_only(true);
    let mut h = Host::new(disk);
    assert_eq!(h.reg(MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.reg(VERSION_REG), 2);
    assert_eq!(h.reg(DEVICE_ID), 2);
    assert_eq!(h.reg(VENDOR_ID_REG), VENDOR_ID);
    assert_ne!(u64::from(h.reg(DEVICE_FEATURES)) & VIRTIO_BLK_F_RO, 0, "a read-only backend is offered as RO");
    let cfg = |h: &mut Host, off: u64, size| h.dev.read(Space::Mmio, BASE + CONFIG + off, size);
    assert_eq!(cfg(&mut h, 0, AccessSize::B8), Some(DISK as u64 / 512), "capacity in sectors");
    assert_eq!(cfg(&mut h, 0, AccessSize::B4), Some(DISK as u64 / 512));
    assert_eq!(cfg(&mut h, 4, AccessSize::B4), Some(0));
    assert_eq!(cfg(&mut h, 1, AccessSize::B1), Some((DISK as u64 / 512) >> 8 & 0xff));
    assert_eq!(cfg(&mut h, 12, AccessSize::B4), Some(u64::from(SEG_MAX)));
    assert_eq!(cfg(&mut h, 8, AccessSize::B4), Some(u64::from(SIZE_MAX)));
    assert_eq!(cfg(&mut h, 20, AccessSize::B2), Some(512));
    assert_eq!(cfg(&mut h, 0xfc, AccessSize::B4), Some(0));
    assert_eq!(cfg(&mut h, 0xfe, AccessSize::B4), None, "past the window");
    assert_eq!(cfg(&mut h, 1, AccessSize::B2), None, "unaligned");
    assert_eq!(h.dev.read(Space::Mmio, BASE, AccessSize::B2), None, "registers are 32 bits");
    assert_eq!(h.dev.read(Space::Mmio, BASE + 0x200, AccessSize::B4), None);
    assert_eq!(h.dev.read(Space::Pio, BASE, AccessSize::B4), None);
    assert_eq!(h.dev.read(Space::Mmio, BASE + 0x0c0, AccessSize::B4), None, "no register there");
    assert!(!h.dev.write(Space::Mmio, BASE + CONFIG, AccessSize::B4, 1), "configuration space is read-only");
    assert!(!h.dev.write(Space::Mmio, BASE + STATUS, AccessSize::B1, 1));
    assert_eq!(h.reg(SHM_LEN_LOW), u32::MAX, "no shared memory");
    let mut none = VirtioBlk::new(None, CountingLine::default(), Box::new(NoMedia::default()), 1);
    assert_eq!(none.read(Space::Mmio, 0, AccessSize::B4), None, "no window, no registers");
}

/// Set up a host, give it one chain of `bufs`, run; the host for checks.
fn one_chain(bufs: &[Buf]) -> Host {
    let mut h = Host::ready(16);
    let head = h.chain(bufs);
    h.offer(head);
    h.notify();
    h.run();
    h
}

/// A header for `kind` at `sector`, in fresh RAM.
fn header(h: &mut Host, kind: u32, sector: u64) -> u64 {
    let at = h.alloc(16);
    let mut b = kind.to_le_bytes().to_vec();
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&sector.to_le_bytes());
    h.put(at, &b);
    at
}

/// Run one request of the usual layout; (host, status byte).
fn one_request(kind: u32, sector: u64, data: &[u32], out: Option<&[u8]>, h: Option<Host>) -> (Host, u8) {
    let mut h = h.unwrap_or_else(|| Host::ready(16));
    let (head, _, st) = h.request(kind, sector, data, out);
    h.offer(head);
    h.notify();
    h.run();
    let s = h.status_byte(st);
    (h, s)
}

#[test]
fn a_chain_that_loops_needs_a_reset() {
    let mut h = Host::ready(16);
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    h.desc(0, hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    h.desc(1, 0x20_0000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0);
    h.offer(0);
    h.notify();
    h.run();
    assert_eq!(h.dev.stats().bad_chain_loop, 1);
    assert!(h.needs_reset());
    assert_eq!(h.reg(INTERRUPT_STATUS) & INT_CONFIG_CHANGE, INT_CONFIG_CHANGE);
    assert!(h.dev.line().level);
    assert_eq!(h.used_idx(), 0, "nothing published");
    assert!(h.seen.iter().all(|r| matches!(r.op, DmaOp::Read { .. })), "nothing written");
    // Stopped: a notify does nothing until a reset.
    let n = h.seen.len();
    h.notify();
    h.run();
    assert_eq!(h.seen.len(), n);
}

#[test]
fn a_next_outside_the_table_or_an_indirect_descriptor_needs_a_reset() {
    let mut h = Host::ready(16);
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    h.desc(0, hdr, 16, VIRTQ_DESC_F_NEXT, 16);
    h.offer(0);
    h.notify();
    h.run();
    assert_eq!((h.dev.stats().bad_chain_next, h.needs_reset()), (1, true));

    let mut h = Host::ready(16);
    h.desc(0, 0x20_0000, 32, VIRTQ_DESC_F_INDIRECT, 0);
    h.offer(0);
    h.notify();
    h.run();
    assert_eq!((h.dev.stats().bad_chain_indirect, h.needs_reset()), (1, true));
}

#[test]
fn a_head_outside_the_table_or_taken_twice_needs_a_reset() {
    let mut h = Host::ready(16);
    h.offer(16);
    h.notify();
    h.run();
    assert_eq!((h.dev.stats().bad_head, h.needs_reset()), (1, true));

    let mut h = Host::ready(16);
    let (head, _, _) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(head);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!((h.dev.stats().bad_head, h.needs_reset()), (1, true));
    assert_eq!(h.disk.flushes(), 0);
}

#[test]
fn a_buffer_outside_guest_ram_fails_only_its_request() {
    // A write whose data is not RAM: the host refuses the read.
    let mut h = Host::ready(16);
    let hdr = header(&mut h, VIRTIO_BLK_T_OUT, 0);
    let st = h.alloc(1);
    let head = h.chain(&[(hdr, 16, false), (RAM as u64 + 0x1000, 512, false), (st, 1, true)]);
    h.offer(head);
    let (ok, _, ok_st) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(ok);
    h.notify();
    h.run();
    assert_eq!(h.status_byte(st), VIRTIO_BLK_S_IOERR);
    assert_eq!(h.status_byte(ok_st), VIRTIO_BLK_S_OK, "the other request is fine");
    assert_eq!((h.dev.stats().bad_desc_addr, h.dev.stats().ioerr), (1, 1));
    assert!(h.disk.submitted().iter().all(|op| matches!(op, BlockOp::Flush)), "nothing written to the disk");
    assert!(!h.needs_reset());
    assert_eq!(h.used_idx(), 2);

    // A read whose data is not RAM: the write is refused, the status says IOERR.
    let mut h = Host::ready(16);
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    let st = h.alloc(1);
    let head = h.chain(&[(hdr, 16, false), (u64::MAX - 0xfff, 512, true), (st, 1, true)]);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!(h.status_byte(st), VIRTIO_BLK_S_IOERR);
    assert_eq!((h.dev.stats().bad_desc_addr, h.dev.stats().ioerr), (1, 1));
    assert_eq!(h.used(0), (u32::from(head), 1));

    // A range that wraps the address space is never asked for.
    let mut h = Host::ready(16);
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    let st = h.alloc(1);
    let head = h.chain(&[(hdr, 16, false), (u64::MAX - 10, 512, true), (st, 1, true)]);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!(h.status_byte(st), VIRTIO_BLK_S_IOERR);
    assert_eq!(h.dev.stats().bad_desc_addr, 1);
    assert!(h.seen.iter().all(|r| r.op.addr() < RAM as u64));
}

#[test]
fn a_status_byte_outside_guest_ram_needs_a_reset() {
    let mut h = Host::ready(16);
    let hdr = header(&mut h, VIRTIO_BLK_T_FLUSH, 0);
    let head = h.chain(&[(hdr, 16, false), (RAM as u64 + 16, 1, true)]);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!((h.dev.stats().bad_desc_addr, h.needs_reset()), (1, true));
    assert_eq!(h.used_idx(), 0);
}

#[test]
fn more_segments_than_seg_max_or_one_too_large_is_an_ioerr() {
    let mut h = Host::ready(256);
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    let mut bufs = vec![(hdr, 16, false)];
    for _ in 0..=SEG_MAX {
        let a = h.alloc(512);
        bufs.push((a, 512, true));
    }
    let st = h.alloc(1);
    bufs.push((st, 1, true));
    let head = h.chain(&bufs);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!(h.status_byte(st), VIRTIO_BLK_S_IOERR);
    assert_eq!(h.dev.stats().seg_max_exceeded, 1);
    assert!(h.disk.submitted().is_empty());
    assert!(h.seen.iter().all(|r| r.op.addr() != hdr), "not even the header was read");

    let (h, st) = one_request(VIRTIO_BLK_T_IN, 0, &[SIZE_MAX + 512], None, None);
    assert_eq!((st, h.dev.stats().seg_too_large), (VIRTIO_BLK_S_IOERR, 1));
}

#[test]
fn rings_that_overlap_are_not_made_ready() {
    let mut h = Host::new(MemBackend::new(DISK));
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER);
    h.set(DRIVER_FEATURES_SEL, 1);
    h.set(DRIVER_FEATURES, 1);
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    h.set(QUEUE_NUM, 16);
    h.set64(QUEUE_DESC_LOW, DESC);
    h.set64(QUEUE_DRIVER_LOW, DESC + 0x80); // inside the 256-byte table
    h.set64(QUEUE_DEVICE_LOW, USED);
    h.set(QUEUE_READY, 1);
    assert_eq!(h.reg(QUEUE_READY), 0);
    assert_eq!(h.dev.stats().ring_overlap, 1);
    assert!(h.needs_reset());

    let mut h = Host::new(MemBackend::new(DISK));
    h.set(QUEUE_NUM, 12);
    h.set(QUEUE_READY, 1);
    assert_eq!((h.reg(QUEUE_READY), h.dev.stats().bad_queue_config), (0, 1), "not a power of two");
}

#[test]
fn an_avail_idx_that_jumps_past_the_queue_size_needs_a_reset() {
    let mut h = Host::ready(16);
    h.put(AVAIL + 2, &17u16.to_le_bytes());
    h.notify();
    h.run();
    assert_eq!((h.dev.stats().bad_avail_idx, h.needs_reset()), (1, true));
    assert_eq!(h.dev.stats().requests, 0);
}

#[test]
fn rings_the_host_refuses_need_a_reset() {
    let mut h = Host::new(MemBackend::new(DISK));
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER);
    h.set(DRIVER_FEATURES_SEL, 1);
    h.set(DRIVER_FEATURES, 1);
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    let far = RAM as u64 + 0x10000;
    h.set(QUEUE_NUM, 16);
    h.set64(QUEUE_DESC_LOW, DESC);
    h.set64(QUEUE_DRIVER_LOW, far);
    h.set64(QUEUE_DEVICE_LOW, USED);
    h.set(QUEUE_READY, 1);
    h.set(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    h.may_read.push((far, far + 36));
    h.notify();
    h.run();
    assert_eq!((h.dev.stats().ring_refused, h.needs_reset()), (1, true));
}

#[test]
fn a_short_header_is_an_ioerr_and_a_missing_status_needs_a_reset() {
    let mut h = Host::ready(16);
    let hdr = h.alloc(8);
    let st = h.alloc(1);
    let head = h.chain(&[(hdr, 8, false), (st, 1, true)]);
    h.offer(head);
    h.notify();
    h.run();
    assert_eq!((h.status_byte(st), h.dev.stats().bad_header), (VIRTIO_BLK_S_IOERR, 1));
    assert!(!h.needs_reset());

    let mut h = Host::new(MemBackend::new(DISK));
    h.setup(u64::MAX);
    let hdr = header(&mut h, VIRTIO_BLK_T_FLUSH, 0);
    let st = h.alloc(1);
    h.chain(&[(hdr, 16, false), (st, 1, false)]);
    let h = {
        h.offer(0);
        h.notify();
        h.run();
        h
    };
    assert_eq!(h.dev.stats().no_status, 1);
    assert_eq!(h.status_byte(st), 0, "a readable byte is never written");
    assert!(h.seen.iter().all(|r| matches!(r.op, DmaOp::Read { .. })));
    let mut h = h;
    assert!(h.needs_reset());

    let h = one_chain(&[(0x20_0000, 16, true), (0x20_0100, 16, false)]);
    assert_eq!(h.dev.stats().bad_chain_order, 1);
}

#[test]
fn bad_sectors_lengths_types_and_read_only_disks_get_a_status() {
    let sectors = DISK as u64 / 512;
    let (h, st) = one_request(VIRTIO_BLK_T_IN, sectors, &[512], None, None);
    assert_eq!((st, h.dev.stats().out_of_range), (VIRTIO_BLK_S_IOERR, 1));
    let (h, st) = one_request(VIRTIO_BLK_T_IN, sectors - 1, &[1024], None, None);
    assert_eq!((st, h.dev.stats().out_of_range), (VIRTIO_BLK_S_IOERR, 1), "the last sector and one past");
    let (h, st) = one_request(VIRTIO_BLK_T_OUT, u64::MAX / 256, &[512], Some(&[1; 512]), None);
    assert_eq!((st, h.dev.stats().out_of_range), (VIRTIO_BLK_S_IOERR, 1), "the offset overflows");
    let (h, st) = one_request(VIRTIO_BLK_T_IN, 0, &[100], None, None);
    assert_eq!((st, h.dev.stats().bad_length), (VIRTIO_BLK_S_IOERR, 1));
    let (h, st) = one_request(11, 0, &[512], Some(&[0; 512]), None);
    assert_eq!((st, h.dev.stats().unsupp), (VIRTIO_BLK_S_UNSUPP, 1), "DISCARD: not offered");
    assert!(h.disk.submitted().is_empty());

    let disk = MemBackend::new(DISK);
    disk.set_read_only(true);
    let mut h = Host::new(disk);
    h.setup(u64::MAX);
    let (h, st) = one_request(VIRTIO_BLK_T_OUT, 0, &[512], Some(&[1; 512]), Some(h));
    assert_eq!((st, h.dev.stats().read_only_write), (VIRTIO_BLK_S_IOERR, 1));
    let (h, st) = one_request(VIRTIO_BLK_T_IN, 0, &[512], None, Some(h));
    assert_eq!(st, VIRTIO_BLK_S_OK, "reads still work");
    assert!(h.disk.bytes().iter().all(|&b| b == 0));
}

#[test]
fn a_backend_failure_fails_only_that_request() {
    let mut h = Host::ready(16);
    h.disk.fail_at(4 * 512 + 7, 5);
    h.disk.fail_flushes(Some(28));
    let (bad, _, bad_st) = h.request(VIRTIO_BLK_T_IN, 4, &[512], None);
    h.offer(bad);
    let (good, _, good_st) = h.request(VIRTIO_BLK_T_IN, 5, &[512], None);
    h.offer(good);
    let (flush, _, flush_st) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(flush);
    h.notify();
    h.run();
    assert_eq!(h.status_byte(bad_st), VIRTIO_BLK_S_IOERR);
    assert_eq!(h.status_byte(good_st), VIRTIO_BLK_S_OK);
    assert_eq!(h.status_byte(flush_st), VIRTIO_BLK_S_IOERR);
    assert_eq!(h.dev.stats().backend_errors, 2);
    assert!(!h.needs_reset());
}

#[test]
fn an_empty_drive_has_no_sectors_but_flushes() {
    let mut h = Host::new(MemBackend::new(0));
    h.dev = VirtioBlk::new(Some((BASE, WINDOW)), CountingLine::default(), Box::new(NoMedia::default()), 7);
    h.setup(u64::MAX);
    assert_eq!(h.dev.read(Space::Mmio, BASE + CONFIG, AccessSize::B8), Some(0));
    let (h, st) = one_request(VIRTIO_BLK_T_IN, 0, &[512], None, Some(h));
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let (_, st) = one_request(VIRTIO_BLK_T_FLUSH, 0, &[], None, Some(h));
    assert_eq!(st, VIRTIO_BLK_S_OK);
}

#[test]
fn a_reset_drops_work_in_flight_and_its_late_answers() {
    let mut h = Host::ready(16);
    let (head, _, st) = h.request(VIRTIO_BLK_T_IN, 0, &[512], None);
    h.offer(head);
    h.notify();
    let mut out = Vec::new();
    h.dev.poll(&mut out);
    let avail = out.pop().unwrap();
    h.answer(avail);
    h.dev.poll(&mut out);
    let table = out.pop().unwrap();
    h.set(STATUS, 0);
    h.answer(table);
    h.run();
    assert_eq!(h.dev.stats().unknown_dma, 1);
    assert_eq!(h.dev.stats().requests, 0);
    assert_eq!(h.status_byte(st), 0xff, "never touched");
    assert!(!h.dev.busy());
}

#[test]
fn a_state_saved_mid_request_is_done_again_after_a_restore() {
    let mut h = Host::ready(16);
    h.put(0x30_0000, &[0; 1]);
    let (w, _, wst) = h.request(VIRTIO_BLK_T_OUT, 2, &[512], Some(&pattern(3, 512)));
    h.offer(w);
    h.notify();
    // The rings and the header are read; the data reads are not answered.
    let mut out = Vec::new();
    h.dev.poll(&mut out);
    h.answer(out.pop().unwrap());
    h.dev.poll(&mut out);
    h.answer(out.pop().unwrap());
    h.dev.poll(&mut out);
    assert_eq!(out.len(), 2, "header and data");
    let saved = Persist::save(&h.dev);
    assert_eq!(saved.in_flight, vec![w]);
    assert_eq!((saved.last_avail_idx, saved.used_idx), (1, 0));
    h.dev = VirtioBlk::restore((Some((BASE, WINDOW)), CountingLine::default(), Box::new(h.disk.clone()), 7), saved)
        .unwrap();
    h.run();
    assert_eq!(h.status_byte(wst), VIRTIO_BLK_S_OK);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0), (u32::from(w), 1));
    assert_eq!(&h.disk.bytes()[1024..1536], &pattern(3, 512)[..]);
    let done = Persist::save(&h.dev);
    assert!(done.in_flight.is_empty());
    assert_eq!((done.last_avail_idx, done.used_idx), (1, 1));
}

#[test]
fn bad_states_are_refused() {
    let restore = |s: VirtioBlkState| {
        VirtioBlk::restore((Some((BASE, WINDOW)), CountingLine::default(), Box::new(MemBackend::new(DISK)), 7), s)
    };
    let mut h = Host::ready(16);
    let (head, _, _) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], None);
    h.offer(head);
    h.notify();
    h.run();
    let good = Persist::save(&h.dev);
    assert_eq!(Persist::save(&restore(good.clone()).unwrap()), good);
    assert!(restore(VirtioBlkState::default()).is_ok());
    let bad = |f: &dyn Fn(&mut VirtioBlkState)| {
        let mut s = good.clone();
        f(&mut s);
        restore(s).err().unwrap_or_else(|| panic!("accepted"))
    };
    bad(&|s| s.transport.queues.push(QueueConfig::default()));
    bad(&|s| s.transport.queues.clear());
    bad(&|s| s.transport.status |= 0x10);
    bad(&|s| s.transport.driver_features |= 1 << 28);
    bad(&|s| s.transport.driver_features &= !VIRTIO_F_VERSION_1);
    bad(&|s| s.transport.interrupt_status = 4);
    bad(&|s| s.transport.queues[0].size = 12);
    bad(&|s| s.transport.queues[0].driver = DESC);
    bad(&|s| s.last_avail_idx = 40);
    bad(&|s| s.in_flight = vec![3]);
    bad(&|s| {
        s.last_avail_idx = 3;
        s.in_flight = vec![1, 1, 2];
    });
    bad(&|s| {
        s.last_avail_idx = 2;
        s.in_flight = vec![1, 16];
    });
    bad(&|s| {
        s.transport.queues[0].ready = false;
        s.in_flight = vec![1];
        s.last_avail_idx = 2;
    });
    let err = bad(&|s| s.transport.status |= 0x10);
    assert!(err.to_string().contains("virtio-blk"), "{err}");
}

#[test]
fn the_counters_are_exported_by_name() {
    let (h, _) = one_request(VIRTIO_BLK_T_IN, 0, &[512], None, None);
    let list = Device::counters(&h.dev);
    assert!(list.contains(&("requests", 1)));
    assert!(list.contains(&("reads", 1)));
    assert!(list.contains(&("needs_reset", 0)));
    assert_eq!(list.len(), VirtioBlkCounters::default().list().len());
}

#[test]
fn the_rings_and_their_indexes_wrap() {
    // 3 requests of 3 descriptors a round: the used ring of 16 wraps in round 5.
    let mut h = Host::ready(16);
    // Start just below the 16-bit wrap of the indexes.
    let mut state = Persist::save(&h.dev);
    state.last_avail_idx = 65534;
    state.used_idx = 65534;
    h.dev = VirtioBlk::restore((Some((BASE, WINDOW)), CountingLine::default(), Box::new(h.disk.clone()), 7), state)
        .unwrap();
    h.avail_idx = 65534;
    h.put(AVAIL + 2, &65534u16.to_le_bytes());
    h.put(USED + 2, &65534u16.to_le_bytes());
    h.order = Order::Shuffled(2);
    let mut published = 65534u16;
    for round in 0..6u8 {
        let mut heads = Vec::new();
        for k in 0..3u8 {
            let (head, _, st) = h.request(VIRTIO_BLK_T_OUT, u64::from(k), &[512], Some(&pattern(round + k, 512)));
            h.offer(head);
            heads.push((head, st));
        }
        h.notify();
        h.run();
        let mut ids: Vec<u32> = (0..3).map(|i| h.used(published.wrapping_add(i)).0).collect();
        ids.sort_unstable();
        let mut want: Vec<u32> = heads.iter().map(|&(head, _)| u32::from(head)).collect();
        want.sort_unstable();
        assert_eq!(ids, want, "round {round}");
        published = published.wrapping_add(3);
        assert_eq!(h.used_idx(), published);
        let sts: Vec<u8> = heads.iter().map(|&(_, st)| h.status_byte(st)).collect();
        assert!(sts.iter().all(|&s| s == VIRTIO_BLK_S_OK), "round {round}: {sts:?} {:?}", h.dev.stats());
    }
    assert_eq!(h.used_idx(), 65534u16.wrapping_add(18));
    assert_eq!(h.dev.stats().needs_reset, 0);
}
