//! The client platform's KVM shim (DESIGN.md, `vmm-shim/`).
//!
//! Owns: VM and vCPU set-up on KVM ([`kvm`], the only module with
//! `unsafe`), the test guests assembled from `guests/` at build time
//! ([`guests`]), the per-VM device map that says where each port and MMIO
//! range goes ([`devmap`]), and the debug port guests report through.
//!
//! So far: a real guest in 64-bit long mode runs port and MMIO accesses
//! against local device models. Still to come (issue 3): the remote path
//! over the data plane, interrupts, several vCPUs and VMs, the client CLI.

#![deny(unsafe_code)]

pub mod debugport;
pub mod devmap;
pub mod guests;
pub mod kvm;
