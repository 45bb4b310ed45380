//! Benchmarks and the end-to-end harness.
//!
//! Owns: the load generator ([`loadgen`]: IoRequests against the test
//! device, every answer checked, latencies in an HDR histogram), the
//! harness that runs a server and the load in two test hosts
//! ([`harness`]), a flood from a third host while the load runs
//! ([`flood`]), and the JSON reports ([`report`]). The criterion suites
//! are under `benches/`. [`blk`] measures block I/O through a virtio-blk
//! in the client process, on a server and in QEMU.

pub mod blk;
pub mod exit;
pub mod flood;
pub mod harness;
pub mod irq;
pub mod loadgen;
pub mod plot;
mod qemu;
pub mod report;
pub mod scratch;
mod server_process;
