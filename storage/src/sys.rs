//! The crate's `unsafe`, all of it: handing buffers to the kernel through an
//! io_uring ring ([`Ring`]) and asking the kernel how O_DIRECT must be
//! aligned ([`dio_align`]).
//!
//! Soundness rests on one rule that [`Ring`] keeps by construction: a
//! buffer the kernel may read or write is owned by the ring's slot table
//! from the moment its request is pushed until its completion is reaped,
//! and nothing else can reach it meanwhile. Dropping the ring waits for
//! every request still in the kernel; if it cannot wait, it leaks their
//! buffers rather than free memory the kernel may still write into.
//!
//! Aligned buffers need no `unsafe`: a `Vec<Block>` of 4096-aligned
//! blocks is allocated with that alignment, and zerocopy views it as bytes.

use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The alignment of an O_DIRECT buffer, and the size of a [`Block`].
pub(crate) const ALIGN: usize = 4096;

/// 4096 bytes aligned to 4096: a `Vec<Block>` is an aligned buffer.
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
pub(crate) struct Block([u8; ALIGN]);

impl Block {
    pub(crate) const ZERO: Block = Block([0; ALIGN]);
}

/// A buffer a request reads into or writes from.
pub(crate) enum Buf {
    /// 4096-aligned, for O_DIRECT.
    Aligned(Vec<Block>),
    /// Whatever alignment the allocator gave (buffered I/O): the request's
    /// own vector, no copy.
    Plain(Vec<u8>),
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::Aligned(blocks) => blocks.len() * ALIGN,
            Buf::Plain(bytes) => bytes.len(),
        }
    }

    fn raw(&mut self) -> (*mut u8, usize) {
        match self {
            Buf::Aligned(blocks) => {
                let bytes = blocks.as_mut_bytes();
                (bytes.as_mut_ptr(), bytes.len())
            }
            Buf::Plain(bytes) => (bytes.as_mut_ptr(), bytes.len()),
        }
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
    /// `fdatasync`, ordered after every request pushed before it.
    Fsync,
}

/// A request the kernel has (or is about to get).
struct Slot {
    tag: u64,
    op: Op,
    offset: u64,
    len: u32,
    /// Bytes a short read already moved; the rest is pushed again.
    done: u32,
    buf: Option<Buf>,
}

/// A request the kernel is done with.
pub(crate) struct Finished {
    pub(crate) tag: u64,
    pub(crate) op: Op,
    pub(crate) len: u32,
    pub(crate) buf: Option<Buf>,
    /// `Err(errno)` if it failed.
    pub(crate) res: Result<(), i32>,
}

/// An io_uring ring over one file, with a slot per request it can hold.
pub(crate) struct Ring {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Completions taken from the ring, before they are looked at.
    cqes: Vec<(u64, i32)>,
    /// Declared last: closed only after `drop` has waited for the kernel.
    file: File,
}

impl Ring {
    /// A ring that holds `depth` requests on `file`.
    pub(crate) fn new(file: File, depth: u32) -> io::Result<Ring> {
        let ring = IoUring::new(depth)?;
        // The submission queue holds at least `depth` entries and each slot
        // has at most one entry in it, so pushing to a free slot never
        // finds the queue full; the completion queue is twice as large, so
        // it never overflows.
        Ok(Ring {
            ring,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            cqes: Vec::with_capacity(depth as usize),
            file,
        })
    }

    /// Requests pushed and not yet reaped.
    pub(crate) fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queue a request; the kernel sees it at the next [`Ring::enter`].
    /// A read or write needs a buffer of at least `len` bytes. Gives the
    /// buffer back if the request cannot be queued (no free slot, or a
    /// buffer that is missing or too short).
    pub(crate) fn start(
        &mut self,
        tag: u64,
        op: Op,
        offset: u64,
        len: u32,
        buf: Option<Buf>,
    ) -> Result<(), Option<Buf>> {
        if op != Op::Fsync && buf.as_ref().is_none_or(|b| b.len() < len as usize) {
            return Err(buf);
        }
        let Some(index) = self.free.pop() else {
            return Err(buf);
        };
        self.slots[index as usize] = Some(Slot { tag, op, offset, len, done: 0, buf });
        if self.push(index) {
            Ok(())
        } else {
            self.free.push(index);
            Err(self.slots[index as usize].take().and_then(|slot| slot.buf))
        }
    }

    /// Push the (rest of the) request in slot `index` to the submission queue.
    fn push(&mut self, index: u32) -> bool {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return false;
        };
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match slot.op {
            Op::Read | Op::Write => {
                let Some((base, cap)) = slot.buf.as_mut().map(Buf::raw) else {
                    return false;
                };
                if slot.done > slot.len || cap < slot.len as usize {
                    return false;
                }
                let ptr = base.wrapping_add(slot.done as usize);
                let rest = slot.len - slot.done;
                let offset = slot.offset + u64::from(slot.done);
                if slot.op == Op::Read {
                    opcode::Read::new(fd, ptr, rest).offset(offset).build()
                } else {
                    opcode::Write::new(fd, ptr, rest).offset(offset).build()
                }
            }
            Op::Fsync => {
                opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().flags(squeue::Flags::IO_DRAIN)
            }
        };
        let entry = entry.user_data(u64::from(index));
        // SAFETY: the entry names `self.file`, which the ring owns and
        // closes only after every request is reaped (see `Drop`), and
        // `rest` bytes from `ptr`, which lie inside the slot's buffer (the
        // checks above). That buffer is owned by the slot until the request
        // is reaped in `reap` (or leaked in `Drop`); it lives on the heap, so
        // moving the `Vec` does not move it, and nothing reads or writes it
        // while the kernel has it.
        unsafe { self.ring.submission().push(&entry) }.is_ok()
    }

    /// Give the kernel what was queued, without waiting for anything.
    /// A busy kernel (`EAGAIN`, `EBUSY`) or a signal leaves the requests
    /// queued for the next call.
    pub(crate) fn enter(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Completions that are in, appended to `out`. A short read is pushed
    /// again for the rest; a read that gets nothing more (the file shrank)
    /// and a short write fail with `EIO`.
    pub(crate) fn reap(&mut self, out: &mut Vec<Finished>) {
        self.cqes.clear();
        self.cqes.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        let mut pushed = false;
        for i in 0..self.cqes.len() {
            let (user_data, res) = self.cqes[i];
            let index = user_data as usize;
            let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            // `None`: a short read, pushed again for the rest.
            let result = if res < 0 {
                Some(Err(-res))
            } else {
                let total = u64::from(slot.done) + res as u64;
                match slot.op {
                    Op::Fsync => Some(Ok(())),
                    _ if total == u64::from(slot.len) => Some(Ok(())),
                    Op::Read if res > 0 && total < u64::from(slot.len) => {
                        slot.done = total as u32;
                        None
                    }
                    _ => Some(Err(libc::EIO)),
                }
            };
            let result = match result {
                Some(result) => result,
                None if self.push(index as u32) => {
                    pushed = true;
                    continue;
                }
                None => Err(libc::EIO),
            };
            let Some(slot) = self.slots[index].take() else {
                continue;
            };
            self.free.push(index as u32);
            out.push(Finished { tag: slot.tag, op: slot.op, len: slot.len, buf: slot.buf, res: result });
        }
        if pushed {
            // A failure leaves the rest queued; the next `enter` tries again.
            let _ = self.enter();
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let mut done = Vec::new();
        while self.in_use() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) => {}
                Err(_) => {
                    // The kernel may still write into these buffers: never free them.
                    for slot in self.slots.iter_mut().filter_map(Option::take) {
                        std::mem::forget(slot.buf);
                    }
                    return;
                }
            }
            done.clear();
            self.reap(&mut done);
        }
    }
}

/// How O_DIRECT I/O on a file must be aligned, if the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DioAlign {
    /// Of buffers in memory; 0 if the file does not support O_DIRECT.
    pub(crate) mem: u32,
    /// Of offsets and lengths in the file; 0 if unsupported.
    pub(crate) offset: u32,
}

/// `statx(STATX_DIOALIGN)` of an open file; `None` when the kernel or the
/// file system does not report it.
pub(crate) fn dio_align(file: &File) -> Option<DioAlign> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `file` is an open descriptor for the whole call; the empty
    // path with AT_EMPTY_PATH names that descriptor; `stx` points to
    // writable memory of the size and alignment of a `statx`.
    let rc = unsafe {
        libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, stx.as_mut_ptr())
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: `statx` is plain integers, for which all zeroes is a valid
    // value, and the kernel filled in what it reports.
    let stx = unsafe { stx.assume_init() };
    (stx.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some(DioAlign { mem: stx.stx_dio_mem_align, offset: stx.stx_dio_offset_align })
}
