//! Why an image cannot be opened or created: one line each, saying what to do.

use std::io;
use std::path::PathBuf;

use crate::image::MAX_DEPTH;

/// Why an image cannot be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "Image {} does not exist: create it with `dmfabric ctl add device ... --size` or give an existing image",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("Image {} is a {kind}, not a regular file or a block device: give an image file", path.display())]
    NotAnImage { path: PathBuf, kind: &'static str },
    #[error(
        "Image {} holds {size} bytes, fewer than the {min} the device needs: grow it (truncate -s {min}) or give a larger image",
        path.display()
    )]
    TooSmall { path: PathBuf, size: u64, min: u64 },
    #[error(
        "Image {} holds {size} bytes, not a whole number of 512-byte sectors: resize it to a multiple of 512 (truncate -s)",
        path.display()
    )]
    Unaligned { path: PathBuf, size: u64 },
    #[error("Image {} is read-only ({why}): make it writable, or attach the device read-only", path.display())]
    ReadOnly { path: PathBuf, why: &'static str },
    #[error(
        "Image {} cannot be read (permission denied): run as a user that may read it, or change its permissions",
        path.display()
    )]
    NoAccess { path: PathBuf },
    #[error("Image {} cannot use O_DIRECT ({why}): open it with direct I/O `auto` or `off`", path.display())]
    NoDirect { path: PathBuf, why: String },
    #[error(
        "io_uring is unavailable ({err}): the kernel lacks io_uring or it is disabled by sysctl \
         kernel.io_uring_disabled; use a kernel with io_uring and set kernel.io_uring_disabled=0"
    )]
    NoUring { err: io::Error },
    #[error("Queue depth {depth} is out of range: give 1 to {MAX_DEPTH}")]
    BadDepth { depth: u32 },
    #[error("Image size {size} is not a positive multiple of 512 bytes: give whole sectors, e.g. 64M")]
    BadSize { size: u64 },
    #[error(
        "Image {} exists with {size} bytes, not the {wanted} asked for: remove it first, or ask for {size} bytes",
        path.display()
    )]
    Exists { path: PathBuf, size: u64, wanted: u64 },
    #[error("The directory of image {} does not exist: create it first (mkdir -p)", path.display())]
    NoDirectory { path: PathBuf },
    #[error("Cannot {what} image {}: {err}", path.display())]
    Io { path: PathBuf, what: &'static str, err: io::Error },
}

/// Why a size given on the command line is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size: give bytes (4096) or a whole number with K, M, G or T (powers of 1024), e.g. 64M")]
    Invalid(String),
    #[error("`{0}` is too large: give at most 2^64 - 1 bytes (16777215T)")]
    TooLarge(String),
}
