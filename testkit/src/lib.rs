//! What the tests and benches share and production never ships: skipping
//! (or, under `DMFABRIC_REQUIRE_PRIVILEGED=1`, failing) a test that lacks a
//! privilege, an etcd of a test's own ([`etcd`]), a control-panel database
//! for server tests ([`fixtures`]), test keys ([`keys`]), a scratch directory and an echoing
//! handler ([`rigs`]), and a counting interrupt line. A
//! dev-dependency only.
//!
//! The test hosts themselves (network namespaces joined by veth) are in
//! `dmfabric_dataplane::netns`: the demo and `dmfabric bench` make hosts
//! too.

pub mod etcd;
pub mod fixtures;
pub mod keys;
pub mod rigs;

pub use dmfabric_dataplane::netns::{ChildGuard, TestNet, TestNetConfig};
pub use dmfabric_devices::testing::CountingLine;
pub use rigs::{Echo, TestDir};

/// What a privileged test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Root, for namespaces, AF_PACKET and AF_XDP.
    Root,
    /// Read-write access to /dev/kvm.
    Kvm,
}

/// Whether a privileged test can run here. Without the privilege it prints
/// one line and returns false, unless `DMFABRIC_REQUIRE_PRIVILEGED=1` (set by
/// CI), in which case a missing privilege is a test failure.
pub fn privileged_or_skip(test: &str, needs: &[Need]) -> bool {
    let mut missing = Vec::new();
    for need in needs {
        match need {
            Need::Root if !dmfabric_dataplane::netns::is_root() => missing.push("root"),
            Need::Kvm if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() => {
                missing.push("/dev/kvm")
            }
            Need::Root | Need::Kvm => {}
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: skipped, needs {}", missing.join(" and "));
    if std::env::var("DMFABRIC_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{msg} (DMFABRIC_REQUIRE_PRIVILEGED=1 makes this a failure)");
    }
    eprintln!("{msg}");
    false
}

/// Taken first by tests that measure time (a rate, a period against the
/// TSC): while one holds it, the other such tests of its test binary wait.
/// Each runs its own servers and clients on busy-polling cores, and on a
/// 2-core host two at once measure each other's scheduling, not the code.
pub fn timing_test() -> std::sync::MutexGuard<'static, ()> {
    static TIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding it poisoned it: the next may go.
    TIMING.lock().unwrap_or_else(|e| e.into_inner())
}
