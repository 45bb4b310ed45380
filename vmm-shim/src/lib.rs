//! The client platform's KVM shim (DESIGN.md, `vmm-shim/`).
//!
//! Owns: VM and vCPU set-up on KVM ([`kvm`], the only module with
//! `unsafe`), the test guests assembled from `guests/` at build time
//! ([`guests`]), the per-VM device map that says where each port and MMIO
//! range goes ([`devmap`]), and the debug port guests report through.
//!
//! So far: a real guest in 64-bit long mode whose port and MMIO accesses go
//! to local device models or, over the data plane, to a server ([`remote`]).
//! Still to come (issue 3): interrupts, several vCPUs and VMs, the client CLI.

#![deny(unsafe_code)]

pub mod acpi;
pub mod debugport;
pub mod devmap;
pub mod dma;
pub mod exits;
pub mod guests;
pub mod kvm;
pub mod linux;
pub mod live;
pub mod local;
pub mod machine;
pub mod migrate;
pub mod mptable;
pub mod remote;
mod supervisor;
pub mod vcpu;
