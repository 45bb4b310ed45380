//! [`UringImage`]: a raw image file (or block device) behind an io_uring
//! ring, as a [`BlockBackend`].

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, FileType};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use dmfabric_devices::dma::SubmitError;
use dmfabric_devices::{BlockBackend, BlockOp, BlockResult};
use zerocopy::IntoBytes;

use crate::sys::{self, Block, Buf, Finished, Op, Ring, ALIGN};
use crate::ImageError;

/// The sector: offsets and lengths are multiples of it.
pub const SECTOR: u64 = 512;
/// The largest queue depth [`UringImage::open`] takes.
pub const MAX_DEPTH: u32 = 4096;
/// The largest single read or write; a larger one fails with `EINVAL`.
pub const MAX_REQUEST: u32 = 64 << 20;
/// Aligned buffers larger than this (in blocks, 1 MiB) are freed after
/// use instead of being kept for the next request.
const POOL_KEEP_BLOCKS: usize = (1 << 20) / ALIGN;

/// Whether to bypass the page cache (O_DIRECT).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Direct {
    /// O_DIRECT if the file system takes it with 512-byte alignment,
    /// buffered I/O otherwise.
    #[default]
    Auto,
    /// O_DIRECT, or [`ImageError::NoDirect`].
    On,
    /// Buffered I/O through the page cache.
    Off,
}

/// How [`UringImage::open`] opens an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Refuse writes (they complete with `EROFS`); the file is opened
    /// read-only.
    pub read_only: bool,
    /// Requests in flight at once, 1 to [`MAX_DEPTH`]: the size of the ring.
    pub depth: u32,
    pub direct: Direct,
    /// The smallest image the device takes, in bytes (at least one sector
    /// is always needed).
    pub min_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { read_only: false, depth: 64, direct: Direct::Auto, min_bytes: 0 }
    }
}

/// A raw image file or block device accessed through io_uring.
///
/// [`BlockBackend::submit`] checks a request and queues it;
/// [`BlockBackend::poll`] hands what was queued to the kernel (one
/// `io_uring_enter`, never waiting) and reaps the completions that are in.
/// A request the backend refuses — misaligned, past the end, longer than
/// [`MAX_REQUEST`], or a write to a read-only image — completes at the
/// next `poll` with `Failed(EINVAL)` or `Failed(EROFS)`; it still counts
/// in [`BlockBackend::in_flight`] until then.
///
/// - Read: `IORING_OP_READ`. A short read is submitted again for the rest;
///   one that gets no more bytes (the file shrank under us) fails with
///   `EIO`.
/// - Write: `IORING_OP_WRITE`. A short write fails with `EIO` (on a
///   regular file it means the file system ran out of space or quota);
///   it is not retried, so that a flush never completes before a write
///   submitted ahead of it.
/// - Flush: `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` (fdatasync: the
///   data and the metadata needed to read it back) and `IOSQE_IO_DRAIN`:
///   it starts once every request submitted before it has completed, and
///   requests submitted after it start once it has, so it covers every
///   write submitted before it. On a read-only image it completes at once.
///
/// With O_DIRECT ([`UringImage::direct`]) data is copied through a pool of
/// 4096-aligned buffers; with buffered I/O the request's own vector is
/// used. Dropping the image waits for the requests still in the kernel.
pub struct UringImage {
    ring: Ring,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    depth: usize,
    direct: bool,
    /// Free aligned buffers (O_DIRECT only), at most `depth`.
    pool: Vec<Vec<Block>>,
    /// Completions decided without the kernel (refusals, empty requests).
    ready: VecDeque<(u64, BlockResult)>,
    finished: Vec<Finished>,
}

impl fmt::Debug for UringImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringImage")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .field("read_only", &self.read_only)
            .field("depth", &self.depth)
            .field("direct", &self.direct)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl UringImage {
    /// Open the image at `path` (a regular file or a block device).
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<UringImage, ImageError> {
        let path = path.as_ref();
        if options.depth == 0 || options.depth > MAX_DEPTH {
            return Err(ImageError::BadDepth { depth: options.depth });
        }
        let meta = fs::metadata(path).map_err(|err| open_error(path, options.read_only, err))?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(ImageError::NotAnImage { path: path.to_owned(), kind: kind_name(kind) });
        }
        let ro = options.read_only;
        let (mut file, direct) = match options.direct {
            Direct::Off => (open_file(path, ro, false)?, false),
            Direct::On => match open_file(path, ro, true) {
                Ok(file) => match direct_usable(&file) {
                    Ok(()) => (file, true),
                    Err(why) => return Err(ImageError::NoDirect { path: path.to_owned(), why }),
                },
                Err(ImageError::Io { err, .. }) if err.raw_os_error() == Some(libc::EINVAL) => {
                    let why = "the file system refuses it".to_owned();
                    return Err(ImageError::NoDirect { path: path.to_owned(), why });
                }
                Err(e) => return Err(e),
            },
            Direct::Auto => match open_file(path, ro, true) {
                Ok(file) if direct_usable(&file).is_ok() => (file, true),
                Ok(_) => (open_file(path, ro, false)?, false),
                Err(ImageError::Io { err, .. }) if err.raw_os_error() == Some(libc::EINVAL) => {
                    (open_file(path, ro, false)?, false)
                }
                Err(e) => return Err(e),
            },
        };
        // Seeking to the end gives a block device's size too (its metadata says 0).
        let size = file.seek(SeekFrom::End(0)).map_err(|err| ImageError::Io {
            path: path.to_owned(),
            what: "find the size of",
            err,
        })?;
        let min = options.min_bytes.max(SECTOR);
        if size < min {
            return Err(ImageError::TooSmall { path: path.to_owned(), size, min });
        }
        if size % SECTOR != 0 {
            return Err(ImageError::Unaligned { path: path.to_owned(), size });
        }
        let ring = Ring::new(file, options.depth).map_err(|err| match err.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM) => ImageError::NoUring { err },
            _ => ImageError::Io { path: path.to_owned(), what: "set up io_uring for", err },
        })?;
        let depth = options.depth as usize;
        Ok(UringImage {
            ring,
            path: path.to_owned(),
            capacity: size,
            read_only: ro,
            depth,
            direct,
            pool: Vec::with_capacity(if direct { depth } else { 0 }),
            ready: VecDeque::with_capacity(depth),
            finished: Vec::with_capacity(depth),
        })
    }

    /// Whether I/O bypasses the page cache (the file was opened O_DIRECT).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The image's path, as given to [`UringImage::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok` if a request of `len` bytes at `offset` is one the backend takes.
    fn check(&self, offset: u64, len: u64) -> Result<(), i32> {
        let in_range = offset.checked_add(len).is_some_and(|end| end <= self.capacity);
        if offset % SECTOR == 0 && len % SECTOR == 0 && len <= u64::from(MAX_REQUEST) && in_range {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    }

    /// An aligned buffer of at least `len` bytes: the smallest free one
    /// that fits, or a new one.
    fn aligned(&mut self, len: usize) -> Vec<Block> {
        let blocks = len.div_ceil(ALIGN).max(1);
        let best = (0..self.pool.len()).filter(|&i| self.pool[i].len() >= blocks).min_by_key(|&i| self.pool[i].len());
        match best {
            Some(i) => self.pool.swap_remove(i),
            None => vec![Block::ZERO; blocks],
        }
    }

    fn recycle(&mut self, buf: Option<Buf>) {
        if let Some(Buf::Aligned(blocks)) = buf {
            if self.pool.len() < self.depth && blocks.len() <= POOL_KEEP_BLOCKS {
                self.pool.push(blocks);
            }
        }
    }

    fn start(&mut self, tag: u64, op: Op, offset: u64, len: u32, buf: Option<Buf>) {
        if let Err(buf) = self.ring.start(tag, op, offset, len, buf) {
            // Not reached: `submit` keeps a slot free for every request.
            self.recycle(buf);
            self.ready.push_back((tag, BlockResult::Failed(libc::EIO)));
        }
    }

    fn complete(&mut self, done: Finished) -> BlockResult {
        let len = done.len as usize;
        match (done.res, done.op, done.buf) {
            (Err(errno), _, buf) => {
                self.recycle(buf);
                BlockResult::Failed(errno)
            }
            (Ok(()), Op::Read, Some(Buf::Plain(mut data))) => {
                data.truncate(len);
                BlockResult::Read(data)
            }
            (Ok(()), Op::Read, Some(Buf::Aligned(blocks))) => {
                let data = blocks.as_bytes()[..len].to_vec();
                self.recycle(Some(Buf::Aligned(blocks)));
                BlockResult::Read(data)
            }
            (Ok(()), Op::Read, None) => BlockResult::Failed(libc::EIO),
            (Ok(()), Op::Write | Op::Fsync, buf) => {
                self.recycle(buf);
                BlockResult::Done
            }
        }
    }
}

impl BlockBackend for UringImage {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError> {
        if self.in_flight() >= self.depth {
            return Err(SubmitError::Full);
        }
        match op {
            BlockOp::Read { offset, len } => {
                if let Err(errno) = self.check(offset, u64::from(len)) {
                    self.ready.push_back((tag, BlockResult::Failed(errno)));
                } else if len == 0 {
                    self.ready.push_back((tag, BlockResult::Read(Vec::new())));
                } else {
                    let buf = if self.direct {
                        Buf::Aligned(self.aligned(len as usize))
                    } else {
                        Buf::Plain(vec![0; len as usize])
                    };
                    self.start(tag, Op::Read, offset, len, Some(buf));
                }
            }
            BlockOp::Write { offset, data } => {
                if self.read_only {
                    self.ready.push_back((tag, BlockResult::Failed(libc::EROFS)));
                } else if let Err(errno) = self.check(offset, data.len() as u64) {
                    self.ready.push_back((tag, BlockResult::Failed(errno)));
                } else if data.is_empty() {
                    self.ready.push_back((tag, BlockResult::Done));
                } else {
                    // `check` bounds the length by MAX_REQUEST.
                    let len = data.len() as u32;
                    let buf = if self.direct {
                        let mut blocks = self.aligned(data.len());
                        blocks.as_mut_bytes()[..data.len()].copy_from_slice(&data);
                        Buf::Aligned(blocks)
                    } else {
                        Buf::Plain(data)
                    };
                    self.start(tag, Op::Write, offset, len, Some(buf));
                }
            }
            BlockOp::Flush => {
                if self.read_only {
                    self.ready.push_back((tag, BlockResult::Done));
                } else {
                    self.start(tag, Op::Fsync, 0, 0, None);
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<(u64, BlockResult)>) -> usize {
        let before = out.len();
        // A failed enter leaves the requests queued; the next poll tries again.
        let _ = self.ring.enter();
        let mut finished = std::mem::take(&mut self.finished);
        self.ring.reap(&mut finished);
        for done in finished.drain(..) {
            let tag = done.tag;
            let result = self.complete(done);
            out.push((tag, result));
        }
        self.finished = finished;
        out.extend(self.ready.drain(..));
        out.len() - before
    }

    fn in_flight(&self) -> usize {
        self.ring.in_use() + self.ready.len()
    }
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File, ImageError> {
    let mut options = fs::OpenOptions::new();
    options.read(true).write(!read_only);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path).map_err(|err| open_error(path, read_only, err))
}

fn open_error(path: &Path, read_only: bool, err: io::Error) -> ImageError {
    let path = path.to_owned();
    match err.raw_os_error() {
        Some(libc::ENOENT) => ImageError::Missing { path },
        Some(libc::EROFS) => ImageError::ReadOnly { path, why: "read-only file system" },
        Some(libc::EACCES) if !read_only => ImageError::ReadOnly { path, why: "permission denied" },
        Some(libc::EPERM) if !read_only => ImageError::ReadOnly { path, why: "an immutable or append-only file" },
        Some(libc::EACCES | libc::EPERM) => ImageError::NoAccess { path },
        _ => ImageError::Io { path, what: "open", err },
    }
}

/// `Ok` if O_DIRECT on `file` takes this backend's requests: offsets and
/// lengths in 512-byte sectors, buffers aligned to 4096.
fn direct_usable(file: &File) -> Result<(), String> {
    match sys::dio_align(file) {
        Some(a) if a.offset == 0 || a.mem == 0 => Err("the file system does not support it".to_owned()),
        Some(a) if SECTOR % u64::from(a.offset) != 0 => {
            Err(format!("it needs I/O aligned to {} bytes, and requests are in 512-byte sectors", a.offset))
        }
        Some(a) if ALIGN % a.mem as usize != 0 => Err(format!("it needs buffers aligned to {} bytes", a.mem)),
        Some(_) => Ok(()),
        // The kernel does not say: try a one-sector read.
        None => {
            let mut probe = [Block::ZERO];
            match file.read_at(&mut probe.as_mut_bytes()[..SECTOR as usize], 0) {
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    Err("a 512-byte read failed with EINVAL".to_owned())
                }
                _ => Ok(()),
            }
        }
    }
}

fn kind_name(kind: FileType) -> &'static str {
    if kind.is_dir() {
        "directory"
    } else if kind.is_symlink() {
        "symbolic link"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_fifo() {
        "named pipe"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}
