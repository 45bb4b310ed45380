//! dmfabric's block storage: the backend a virtio-blk model writes to.
//!
//! Owns: a raw image file or block device accessed through io_uring
//! ([`UringImage`], a [`dmfabric_devices::BlockBackend`]: requests queued
//! by `submit`, handed to the kernel and reaped by `poll`, never waiting),
//! O_DIRECT where the file system takes it and the aligned buffers it
//! needs, what is refused and why ([`ImageError`], one line that says what
//! to do), and making an image ([`create_image`], [`parse_size`]).
//!
//! Does not own: what a block device is to the guest (the virtio-blk
//! model, in `dmfabric-devices`), where it runs (the server or the client's
//! shim) or which image a device uses (the control panel). It depends on
//! the device models' `BlockBackend` trait and nothing else of ours.
//!
//! `unsafe` lives in `sys` only: pushing requests whose buffers the kernel
//! uses, and `statx`.

#![deny(unsafe_code)]

mod create;
mod error;
mod image;
#[allow(unsafe_code)]
mod sys;

pub use create::{create_image, parse_size};
pub use error::{ImageError, SizeError};
pub use image::{Direct, OpenOptions, UringImage, MAX_DEPTH, MAX_REQUEST, SECTOR};
