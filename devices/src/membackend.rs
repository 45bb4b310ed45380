//! An in-memory [`BlockBackend`] for tests (feature `testing`): a disk of
//! bytes that completes every request on the next poll, can be made
//! read-only or shallow, and fails the requests that touch chosen offsets.
//!
//! Clones share the disk: a test keeps one to look at what its device
//! model wrote and hands the other to the model.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::dma::{BlockBackend, BlockOp, BlockResult, SubmitError};

#[derive(Debug, Default)]
struct Disk {
    bytes: Vec<u8>,
    read_only: bool,
    depth: usize,
    /// `(offset, errno)`: a read or write covering the offset fails.
    faults: Vec<(u64, i32)>,
    flush_fault: Option<i32>,
    queued: VecDeque<(u64, BlockOp)>,
    submitted: Vec<BlockOp>,
    flushes: u64,
}

/// A disk in memory. Completions come on [`BlockBackend::poll`], all that
/// were submitted before it.
#[derive(Debug, Clone)]
pub struct MemBackend {
    disk: Arc<Mutex<Disk>>,
}

impl MemBackend {
    /// A zeroed disk of `capacity` bytes (cut down to whole sectors) taking
    /// 64 requests at once.
    pub fn new(capacity: usize) -> MemBackend {
        MemBackend::with_bytes(vec![0; capacity])
    }

    /// A disk holding `bytes` (cut down to whole sectors).
    pub fn with_bytes(mut bytes: Vec<u8>) -> MemBackend {
        bytes.truncate(bytes.len() / 512 * 512);
        MemBackend { disk: Arc::new(Mutex::new(Disk { bytes, depth: 64, ..Disk::default() })) }
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A test that panicked while holding the lock poisons it; the bytes are still good.
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuse writes (they fail with `EROFS`), and say so.
    pub fn set_read_only(&self, read_only: bool) {
        self.disk().read_only = read_only;
    }

    /// Take at most `depth` requests at once (at least 1).
    pub fn set_depth(&self, depth: usize) {
        self.disk().depth = depth.max(1);
    }

    /// Fail every read or write that covers byte `offset` with `errno`.
    pub fn fail_at(&self, offset: u64, errno: i32) {
        self.disk().faults.push((offset, errno));
    }

    /// Fail every flush with `errno` (None: flushes succeed).
    pub fn fail_flushes(&self, errno: Option<i32>) {
        self.disk().flush_fault = errno;
    }

    /// The disk's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.disk().bytes.clone()
    }

    /// Every request submitted so far, in order.
    pub fn submitted(&self) -> Vec<BlockOp> {
        self.disk().submitted.clone()
    }

    /// Flushes completed.
    pub fn flushes(&self) -> u64 {
        self.disk().flushes
    }
}

impl Disk {
    fn fault(&self, offset: u64, len: u64) -> Option<i32> {
        self.faults.iter().find(|&&(at, _)| at >= offset && at - offset < len).map(|&(_, errno)| errno)
    }

    fn range(&self, offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let end = offset.checked_add(len)?;
        (end <= self.bytes.len() as u64).then_some(offset as usize..end as usize)
    }

    fn run(&mut self, op: BlockOp) -> BlockResult {
        const EIO: i32 = 5;
        const EROFS: i32 = 30;
        match op {
            BlockOp::Read { offset, len } => {
                if let Some(errno) = self.fault(offset, u64::from(len)) {
                    return BlockResult::Failed(errno);
                }
                match self.range(offset, u64::from(len)) {
                    Some(r) => BlockResult::Read(self.bytes[r].to_vec()),
                    None => BlockResult::Failed(EIO),
                }
            }
            BlockOp::Write { offset, data } => {
                if self.read_only {
                    return BlockResult::Failed(EROFS);
                }
                if let Some(errno) = self.fault(offset, data.len() as u64) {
                    return BlockResult::Failed(errno);
                }
                match self.range(offset, data.len() as u64) {
                    Some(r) => {
                        self.bytes[r].copy_from_slice(&data);
                        BlockResult::Done
                    }
                    None => BlockResult::Failed(EIO),
                }
            }
            BlockOp::Flush => match self.flush_fault {
                Some(errno) => BlockResult::Failed(errno),
                None => {
                    self.flushes += 1;
                    BlockResult::Done
                }
            },
        }
    }
}

impl BlockBackend for MemBackend {
    fn capacity(&self) -> u64 {
        self.disk().bytes.len() as u64
    }

    fn read_only(&self) -> bool {
        self.disk().read_only
    }

    fn depth(&self) -> usize {
        self.disk().depth
    }

    fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError> {
        let mut d = self.disk();
        if d.queued.len() >= d.depth {
            return Err(SubmitError::Full);
        }
        d.submitted.push(op.clone());
        d.queued.push_back((tag, op));
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<(u64, BlockResult)>) -> usize {
        let mut d = self.disk();
        let queued = std::mem::take(&mut d.queued);
        let n = queued.len();
        for (tag, op) in queued {
            let result = d.run(op);
            out.push((tag, result));
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.disk().queued.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_complete_on_poll_and_faults_fail_only_theirs() {
        let disk = MemBackend::new(4096 + 100);
        let mut b: Box<dyn BlockBackend> = Box::new(disk.clone());
        assert_eq!(b.capacity(), 4096);
        disk.set_depth(2);
        b.submit(1, BlockOp::Write { offset: 512, data: vec![7; 512] }).unwrap();
        b.submit(2, BlockOp::Read { offset: 0, len: 1024 }).unwrap();
        assert_eq!(b.submit(3, BlockOp::Flush), Err(SubmitError::Full));
        assert_eq!(b.in_flight(), 2);
        let mut out = Vec::new();
        assert_eq!(b.poll(&mut out), 2);
        assert_eq!(out[0], (1, BlockResult::Done));
        let BlockResult::Read(bytes) = &out[1].1 else { panic!("{out:?}") };
        assert_eq!((bytes[0], bytes[512]), (0, 7));
        disk.fail_at(1000, 5);
        disk.set_read_only(true);
        b.submit(4, BlockOp::Read { offset: 512, len: 512 }).unwrap();
        b.submit(5, BlockOp::Write { offset: 0, data: vec![1; 512] }).unwrap();
        out.clear();
        b.poll(&mut out);
        assert_eq!(out, vec![(4, BlockResult::Failed(5)), (5, BlockResult::Failed(30))]);
        b.submit(6, BlockOp::Read { offset: 4096, len: 512 }).unwrap();
        out.clear();
        b.poll(&mut out);
        assert_eq!(out, vec![(6, BlockResult::Failed(5))], "past the end");
    }
}
