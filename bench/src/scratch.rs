//! `bench exit --device uart-scratch`: OUT/IN round trips to a 16550's
//! scratch register (COM1, port 0x3ff), timed inside the guest with its
//! TSC, the same way in three places: dmfabric's UART in the shim's
//! process (`local`), dmfabric's UART on a server in another namespace
//! (`remote`), and QEMU's own 16550 (`qemu`, the same guest booted as a
//! Multiboot image under `qemu-system-x86_64 -enable-kvm`).
//!
//! Each exit is one sample (the OUT and the IN of a round trip apart), so
//! the percentiles are per exit as in the other exit bench. TSC ticks are
//! turned into time with the host TSC's rate, measured against the
//! monotonic clock; KVM guests here read the host's TSC (an offset, no
//! scaling), and the same rate serves all three modes, so their ratio
//! does not depend on it.

use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_devices::platform::pc::{PcLayout, Role, COM1};
use dmfabric_vmm_shim::devmap::Target;
use dmfabric_vmm_shim::guests::{self, SCRATCH_LOOP};
use dmfabric_vmm_shim::local::{self, LocalWiring};
use dmfabric_vmm_shim::machine::{self, RunOptions, VmSpec};
use dmfabric_wire::Space;
use hdrhistogram::Histogram;

use crate::exit::{ExitBenchError, ExitJson};
use crate::harness::{self, Setup};
use crate::qemu::{self, qmp_dumps, TempDir};

/// Where the scratch register is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScratchMode {
    Local,
    Remote,
    Qemu,
}

impl ScratchMode {
    pub fn name(self) -> &'static str {
        match self {
            ScratchMode::Local => "local",
            ScratchMode::Remote => "remote",
            ScratchMode::Qemu => "qemu",
        }
    }
}

/// COM1's scratch register.
pub const SCRATCH_PORT: u64 = COM1.base as u64 + 7;
/// Where the guest keeps its samples.
const SAMPLES_AT: u64 = 0x20_0000;
/// The VM (and the server's PC devices) of the bench.
const VM: u32 = 1;

/// The host TSC's rate in ticks per nanosecond, against the monotonic clock.
pub fn tsc_per_ns() -> f64 {
    let read = || {
        // SAFETY: RDTSC has no preconditions and every x86-64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    };
    let (t0, c0) = (Instant::now(), read());
    std::thread::sleep(Duration::from_millis(100));
    let (t1, c1) = (Instant::now(), read());
    (c1.wrapping_sub(c0)) as f64 / (t1 - t0).as_nanos().max(1) as f64
}

fn samples_len(round_trips: u64) -> usize {
    (round_trips * 8) as usize
}

/// Per-exit figures from the guest's samples (two u32 TSC deltas a round trip).
fn summarise(mode: ScratchMode, transport: &str, samples: &[u8], tsc_per_ns: f64, retransmits: u64) -> ExitJson {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let mut total_ns = 0f64;
    for chunk in samples.chunks_exact(4) {
        let ticks = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        let ns = f64::from(ticks) / tsc_per_ns;
        total_ns += ns;
        h.saturating_record(ns as u64);
    }
    let us = |ns: u64| (ns as f64 / 10.0).round() / 100.0;
    let exits = (samples.len() / 4) as u64;
    ExitJson {
        mode: mode.name().into(),
        transport: transport.into(),
        exits,
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        max_us: us(h.max()),
        mean_us: (h.mean() / 10.0).round() / 100.0,
        exits_per_s: (exits as f64 / (total_ns / 1e9).max(1e-9)).round(),
        retransmits,
        hist: h,
    }
}

fn spec(round_trips: u64, target: Target) -> VmSpec {
    // dmfabric's 16550 in this process, wired to the VM like any local model.
    let wiring = LocalWiring::new(Default::default(), Default::default(), Box::new(Vec::new()));
    let local = match target {
        Target::Local(_) => local::pc_devices(&[Role::Com1], 0, &wiring).0,
        _ => Vec::new(),
    };
    let args = vec![[round_trips, SCRATCH_PORT, SAMPLES_AT]];
    let com1 = (Space::Pio, u64::from(COM1.base), u64::from(COM1.len), target);
    let mut s = VmSpec::test_guest(VM, 1, SCRATCH_LOOP, args, &[com1], local).expect("a valid test map");
    s.irq_target = wiring.target.clone();
    s.reset = wiring.reset.clone();
    s.mem_bytes =
        (SAMPLES_AT as usize + samples_len(round_trips) + (1 << 20)).max(s.mem_bytes).next_multiple_of(1 << 21);
    s
}

/// The guest's samples, checked.
fn samples_of(report: &machine::RunReport, round_trips: u64) -> Result<Vec<u8>, ExitBenchError> {
    let vm = report.vm(VM).ok_or_else(|| ExitBenchError::Guest("the VM did not run".into()))?;
    if let Some(e) = vm.error() {
        return Err(ExitBenchError::Guest(e.to_string()));
    }
    let done = vm.vcpus[0].reports.first().copied().unwrap_or(0);
    if u64::from(done) != round_trips {
        return Err(ExitBenchError::Guest(format!("{done} of {round_trips} round trips reported")));
    }
    vm.memory.clone().ok_or_else(|| ExitBenchError::Guest("no samples".into()))
}

/// Run the scratch-register bench in `mode` for `exits` exits.
pub fn run(mode: ScratchMode, setup: &Setup, exits: u64, stop: &Arc<AtomicBool>) -> Result<ExitJson, ExitBenchError> {
    if exits < 2 {
        return Err(ExitBenchError::TooFew);
    }
    let round_trips = exits / 2;
    let rate = tsc_per_ns();
    let opts = RunOptions {
        timeout: Duration::from_secs(600),
        keep_memory: Some((SAMPLES_AT, samples_len(round_trips))),
        ..RunOptions::default()
    };
    match mode {
        ScratchMode::Local => {
            let report =
                crate::exit::run_pinned(setup.client_core, vec![spec(round_trips, Target::Local(0))], &opts, stop)?;
            Ok(summarise(mode, "none", &samples_of(&report, round_trips)?, rate, 0))
        }
        ScratchMode::Remote => {
            let mut setup = setup.clone();
            setup.pc_vm = Some(VM);
            // COM1 of VM 1 on a `--pc-vm 1` server.
            let com1 = PcLayout::new(VM).map_err(|e| ExitBenchError::Guest(e.to_string()))?.id(Role::Com1);
            let outcome = harness::run(&setup, stop, |t, target| {
                let vm = spec(round_trips, Target::remote(target.server_id, com1));
                let cfg = crate::exit::client_config(&target, &setup);
                Ok(machine::run(vec![vm], Some((t, cfg)), &opts, stop).map(|(r, _)| r))
            })?;
            let report = outcome.result?;
            let retransmits = report.client.map_or(0, |c| c.retransmits);
            Ok(summarise(mode, setup.transport.name(), &samples_of(&report, round_trips)?, rate, retransmits))
        }
        ScratchMode::Qemu => {
            let samples = qemu(round_trips, setup.client_core)?;
            Ok(summarise(mode, "qemu", &samples, rate, 0))
        }
    }
}

/// Boot the Multiboot build of `scratch_loop` under QEMU with KVM, wait for
/// its report, and read its samples out of guest memory (QMP pmemsave).
fn qemu(round_trips: u64, core: Option<usize>) -> Result<Vec<u8>, ExitBenchError> {
    let image = guests::multiboot_with_args("scratch_loop", [round_trips, SCRATCH_PORT, SAMPLES_AT])
        .ok_or_else(|| ExitBenchError::Guest("no Multiboot scratch_loop".into()))?;
    let dir = TempDir(std::env::temp_dir().join(format!("dmfabric-qemu-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| ExitBenchError::Guest(format!("temp dir: {e}")))?;
    let (kernel, debug, sock, dump) =
        (dir.0.join("scratch.mb.bin"), dir.0.join("debug"), dir.0.join("qmp.sock"), dir.0.join("samples"));
    std::fs::write(&kernel, image).map_err(|e| ExitBenchError::Guest(format!("temp file: {e}")))?;
    let mem_mib = ((SAMPLES_AT as usize + samples_len(round_trips)) >> 20) + 8;
    let qemu_args = ["-M".to_string(), "pc".into(), "-m".into(), mem_mib.to_string()];
    let mut q = qemu::spawn(&qemu_args, &kernel, &debug, &sock).map_err(ExitBenchError::Guest)?;
    if let Some(c) = core {
        // Pin QEMU (its vCPU thread included) like the shim's client.
        let _ = Command::new("taskset").args(["-a", "-p", "-c", &c.to_string(), &q.0.id().to_string()]).output();
    }
    // The guest's two report writes land in debugcon when it is done.
    let never = AtomicBool::new(false);
    qemu::wait_report(&mut q, &debug, 2, |_| false, Duration::from_secs(300), &never).map_err(ExitBenchError::Guest)?;
    let len = samples_len(round_trips);
    let commands = [
        r#"{"execute":"qmp_capabilities"}"#.to_string(),
        format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":{SAMPLES_AT},"size":{len},"filename":"{}"}}}}"#,
            dump.display()
        ),
        r#"{"execute":"quit"}"#.to_string(),
    ];
    qmp_dumps(&mut q, &sock, &commands, &[(&dump, len as u64)]).map_err(ExitBenchError::Guest)?;
    let _ = q.0.wait();
    let samples = std::fs::read(&dump).map_err(|e| ExitBenchError::Guest(format!("QEMU's memory dump: {e}")))?;
    if samples.len() != len {
        return Err(ExitBenchError::Guest(format!("QEMU dumped {} bytes, not {len}", samples.len())));
    }
    Ok(samples)
}
