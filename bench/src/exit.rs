//! The exit benchmark: a KVM test guest (`pio_loop`) doing N port round
//! trips (OUT then IN, one exit each) against the register-file test
//! device, served in the shim's process (`local`) or by a server in another
//! network namespace (`remote`). The time between successive exits of the
//! vCPU is the exit round trip as the guest sees it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use dmfabric_devices::platform::pc::{TEST_DEVICE_ID, TEST_DEVICE_PIO};
use dmfabric_devices::regfile::RegisterFile;
use dmfabric_vmm_shim::devmap::Target;
use dmfabric_vmm_shim::guests::{self, PIO_LOOP};
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec};
use dmfabric_vmm_shim::remote::ClientConfig;
use dmfabric_wire::Space;
use serde::Serialize;

use crate::harness::{self, HarnessError, Setup};
use crate::loadgen;

/// Where the test device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMode {
    /// In the shim's process, on the vCPU thread.
    Local,
    /// By a dmfabric server in another namespace, over `Setup::transport`.
    Remote,
}

impl ExitMode {
    pub fn name(self) -> &'static str {
        match self {
            ExitMode::Local => "local",
            ExitMode::Remote => "remote",
        }
    }
}

/// `dmfabric bench exit --json`: one line per mode and transport.
#[derive(Debug, Clone, Serialize)]
pub struct ExitJson {
    pub mode: String,
    pub transport: String,
    pub exits: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub exits_per_s: f64,
    /// Requests retransmitted on the remote path.
    pub retransmits: u64,
    /// Every exit's time, nanoseconds (for `--plot` and `--hgrm`).
    #[serde(skip)]
    pub hist: hdrhistogram::Histogram<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExitBenchError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    #[error("The guest did not finish: {0}")]
    Guest(String),
    #[error("The guest's checksum is wrong: {got:#x}, expected {expected:#x}")]
    Checksum { got: u64, expected: u64 },
    #[error("--exits must be at least 2")]
    TooFew,
}

/// The benchmark's VM: `pio_loop` doing `exits / 2` round trips on the test
/// device's first port, which `target` serves.
pub fn guest(exits: u64, target: Target) -> VmSpec {
    let port = u64::from(TEST_DEVICE_PIO.base);
    let ranges = [(Space::Pio, port, u64::from(TEST_DEVICE_PIO.len), target)];
    let local: Vec<Box<dyn dmfabric_devices::Device>> = match target {
        Target::Local(_) => vec![Box::new(RegisterFile::new(Some((TEST_DEVICE_PIO.base, TEST_DEVICE_PIO.len)), None))],
        _ => Vec::new(),
    };
    VmSpec::test_guest(1, 1, PIO_LOOP, vec![[exits / 2, port, 0]], &ranges, local).expect("a valid test map")
}

fn summarise(mode: ExitMode, transport: &str, exits: u64, report: &RunReport) -> Result<ExitJson, ExitBenchError> {
    let vm = report.vm(1).ok_or_else(|| ExitBenchError::Guest("the VM did not run".into()))?;
    let vcpu = &vm.vcpus[0];
    if let Err(e) = &vcpu.result {
        return Err(ExitBenchError::Guest(e.clone()));
    }
    let got = dmfabric_vmm_shim::debugport::u64_at(&vcpu.reports, 0).unwrap_or(0);
    let expected = guests::pio_loop_checksum(exits / 2);
    if got != expected {
        return Err(ExitBenchError::Checksum { got, expected });
    }
    let h = vcpu.exit_times.as_ref().ok_or_else(|| ExitBenchError::Guest("no exit times".into()))?;
    let us = |ns: u64| (ns as f64 / 10.0).round() / 100.0;
    let secs = vcpu.elapsed.as_secs_f64().max(1e-9);
    Ok(ExitJson {
        mode: mode.name().into(),
        transport: transport.into(),
        exits: exits / 2 * 2,
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        max_us: us(h.max()),
        mean_us: (h.mean() / 10.0).round() / 100.0,
        exits_per_s: ((exits / 2 * 2) as f64 / secs).round(),
        retransmits: report.client.map_or(0, |c| c.retransmits),
        hist: h.clone(),
    })
}

/// How a bench's client speaks to the harness's server: as the load
/// generator's client platform, with its keys and the set-up's retransmits.
pub fn client_config(target: &loadgen::Target, setup: &Setup) -> ClientConfig {
    ClientConfig {
        client: target.client_id,
        hypervisor: 1,
        servers: vec![target.server_id],
        retry: setup.client_retry,
        hello_timeout: Duration::from_secs(5),
        sealer: setup.sealer(),
        open_on_demand: false,
    }
}

/// Run `specs` with no remote devices on `core` (where a remote run's
/// client goes), in a thread of its own so the caller's affinity is left alone.
pub fn run_pinned(
    core: Option<usize>,
    specs: Vec<VmSpec>,
    opts: &RunOptions,
    stop: &AtomicBool,
) -> Result<machine::RunReport, ExitBenchError> {
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(c) = core {
                let _ = dmfabric_pinning::pin_current(c);
            }
            machine::run(specs, None, opts, stop)
        })
        .join()
        .expect("the bench thread")
    })?;
    Ok(report.0)
}

/// Run the exit benchmark once. `setup` says where the client runs (its
/// core) and, for `Remote`, how the server is started and over what.
pub fn run(mode: ExitMode, setup: &Setup, exits: u64, stop: &Arc<AtomicBool>) -> Result<ExitJson, ExitBenchError> {
    if exits < 2 {
        return Err(ExitBenchError::TooFew);
    }
    let opts = RunOptions { timeout: Duration::from_secs(600), time_exits: true, ..RunOptions::default() };
    match mode {
        ExitMode::Local => {
            let report = run_pinned(setup.client_core, vec![guest(exits, Target::Local(0))], &opts, stop)?;
            summarise(mode, "none", exits, &report)
        }
        ExitMode::Remote => {
            let outcome = harness::run(setup, stop, |t, target| {
                let spec = guest(exits, Target::remote(target.server_id, TEST_DEVICE_ID));
                Ok(machine::run(vec![spec], Some((t, client_config(&target, setup))), &opts, stop).map(|(r, _)| r))
            })?;
            summarise(mode, setup.transport.name(), exits, &outcome.result?)
        }
    }
}
