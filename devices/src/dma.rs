//! Models that move bulk data: reading and writing the guest memory of
//! their VM (DMA) and doing I/O on a backend of their own, both
//! asynchronously.
//!
//! A model never touches guest memory itself. It asks its host for DMA
//! ([`DmaRequest`], collected by [`DmaDevice::poll`]) and carries on when
//! the host hands the answer back ([`DmaDevice::dma_done`]). The host is
//! the client's shim for a model kept next to the VM (the request is done
//! at once against the VM's memory) or a server, where a request becomes
//! DmaRead / DmaWrite frames to the client platform that runs the VM and
//! may take tens of microseconds: no model, and no data-plane core, ever
//! waits for one.
//!
//! Storage works the same way: a [`BlockBackend`] takes requests
//! ([`BlockBackend::submit`]) and gives completions when asked
//! ([`BlockBackend::poll`]), never blocking (the server's backend is an
//! io_uring ring over an image file, `dmfabric-storage`).

use std::fmt;

/// What a model asks of its VM's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaOp {
    /// `len` bytes of guest-physical memory from `addr`.
    Read { addr: u64, len: u32 },
    /// `data` into guest-physical memory at `addr`.
    Write { addr: u64, data: Vec<u8> },
}

impl DmaOp {
    /// Bytes the operation moves.
    pub fn len(&self) -> u64 {
        match self {
            DmaOp::Read { len, .. } => u64::from(*len),
            DmaOp::Write { data, .. } => data.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn addr(&self) -> u64 {
        match self {
            DmaOp::Read { addr, .. } | DmaOp::Write { addr, .. } => *addr,
        }
    }
}

/// One DMA request; `tag` is the model's, given back with the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaRequest {
    pub tag: u64,
    pub op: DmaOp,
}

/// How a DMA request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaResult {
    /// A read's bytes (exactly the length asked for).
    Read(Vec<u8>),
    /// A write is in guest memory.
    Written,
    /// The range is not the VM's memory (or the VM is gone): nothing was
    /// read or written. The model fails the request that needed it.
    Refused,
}

/// The largest single DMA request a model may issue; the host splits it
/// into what its link carries.
pub const MAX_DMA_LEN: u32 = 1 << 20;

/// A model that does DMA and backend I/O ([`crate::Device::dma`]).
///
/// The host's loop: after every register access of the model, after
/// every [`DmaDevice::dma_done`], and on each pass of its poll loop while
/// [`DmaDevice::busy`], it calls [`DmaDevice::poll`] and carries out the
/// requests it returns. Answers may come in any order; each request gets
/// exactly one.
pub trait DmaDevice {
    /// Move on: take the backend's completions, and append the DMA the
    /// model wants done now to `out`.
    fn poll(&mut self, out: &mut Vec<DmaRequest>);
    /// Whether the model waits for anything (DMA answers, backend
    /// completions) or has work queued: the host polls it while it does.
    fn busy(&self) -> bool;
    /// The answer to the request tagged `tag`.
    fn dma_done(&mut self, tag: u64, result: DmaResult);
}

/// What a block device asks of its backend. Offsets and lengths are in
/// bytes, multiples of 512.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOp {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Everything written before is on stable storage when this completes.
    Flush,
}

/// How a [`BlockOp`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockResult {
    /// A read's bytes.
    Read(Vec<u8>),
    /// A write or flush is done.
    Done,
    /// The backend failed it (an errno, e.g. `EIO`); only this request fails.
    Failed(i32),
}

/// Why a backend refused to take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// As many requests are in flight as the backend takes: submit again
    /// after a [`BlockBackend::poll`] gave completions.
    #[error("the backend's queue is full")]
    Full,
}

/// Storage behind a block device: asynchronous, never blocking.
pub trait BlockBackend: Send {
    /// Size in bytes (a multiple of 512).
    fn capacity(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Requests the backend takes at once.
    fn depth(&self) -> usize;
    /// Start `op`; its completion comes from [`BlockBackend::poll`] with `tag`.
    fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError>;
    /// Completions that are in, appended to `out`; returns how many.
    fn poll(&mut self, out: &mut Vec<(u64, BlockResult)>) -> usize;
    /// Requests submitted and not yet given back by `poll`.
    fn in_flight(&self) -> usize;
}

impl fmt::Debug for dyn BlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockBackend")
            .field("capacity", &self.capacity())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
