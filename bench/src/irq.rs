//! `bench irq`: how late an HPET interrupt reaches the guest's handler,
//! and how many a second get through, with the `apic_hpet` test guest
//! (`vmm-shim/guests/apic_hpet.S`): its periodic timer's handler reads the
//! HPET's main counter and keeps how far past the comparator that matched
//! it is (a u32 sample of 10 ns ticks per interrupt, in its memory at
//! [`APIC_HPET_SAMPLES_AT`]); its report says how many periods went by
//! from the first interrupt to the last, so a short period's run shows the
//! rate sustained and the periods missed (coalesced).
//!
//! Where the HPET and the I/O APIC are:
//!
//! - `local`: dmfabric's HPET in the client process (the hybrid case), its
//!   lines into KVM's in-kernel I/O APIC (GSIs 16-23), its timers run by
//!   the shim's local-timers thread.
//! - `remote`: dmfabric's I/O APIC and HPET on a `dmfabric server --config`
//!   (busy-polling, pinned to core 1) in one network namespace, the VM in
//!   this process pinned to core 0 in another with KVM's split irqchip,
//!   over AF_XDP (as `cli/tests/irqchip.rs` runs them): the HPET's tick on
//!   the server's core, its line into the server's I/O APIC, an Interrupt
//!   frame with the MSI to the client, KVM_SIGNAL_MSI there.
//! - `qemu`: QEMU's own HPET and I/O APIC (`-M pc,kernel-irqchip=split`,
//!   the fair comparison: QEMU's I/O APIC in user space, as dmfabric's
//!   remote one is); `qemu-kernel`: the same with KVM's in-kernel I/O APIC
//!   (`-M pc`). Both with `-global hpet.hpet-intcap=0xff0104` (pins 16-23,
//!   as q35's and dmfabric's HPET), the report and samples read from
//!   guest memory over QMP.
//!
//! Lateness is from the match to the handler's read of the main counter:
//! the delivery, the handful of guest instructions before the read (kernel
//! mode, emulated on this host at ~0.5 µs each) and the read's own way to
//! the model (a round trip's first half for a remote HPET).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmfabric_dataplane::netns::TestNet;
use dmfabric_dataplane::TransportSpec;
use dmfabric_devices::platform::pc::{self, HPET_LEN, HPET_MMIO, IOAPIC_LEN, IOAPIC_MMIO};
use dmfabric_vmm_shim::devmap::{Remote, Target};
use dmfabric_vmm_shim::guests::{
    self, ApicHpetArgs, ApicHpetReport, APIC_HPET, APIC_HPET_REPORT_AT, APIC_HPET_REPORT_WORDS, APIC_HPET_SAMPLES_AT,
    APIC_HPET_SAMPLES_MAX,
};
use dmfabric_vmm_shim::kvm::IrqChipMode;
use dmfabric_vmm_shim::local::{self, LocalWiring};
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec};
use dmfabric_wire::Space;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::harness::{self, Setup};
use crate::loadgen;
use crate::qemu::{self, qmp_dumps, TempDir};
use crate::server_process;

/// The VM of the bench, and its I/O APIC's and HPET's device ids on the server.
const VM: u32 = 1;
pub const IOAPIC: u32 = 20;
pub const HPET: u32 = 21;
/// q35's Tn_INT_ROUTE_CAP (and dmfabric's HPET's): pins 2, 8 and 16-23.
const QEMU_ROUTE_CAP: u32 = 0x00ff_0104;
/// The shortest period dmfabric's HPET fires at (`MIN_PERIODIC_REARM`).
pub const RATE_PERIOD_US: u32 = 100;

/// Where the HPET and the I/O APIC are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    Local,
    Remote,
    /// QEMU pc, kernel-irqchip=split.
    Qemu,
    /// QEMU pc, KVM's in-kernel irqchip.
    QemuKernel,
}

impl IrqMode {
    pub fn name(self) -> &'static str {
        match self {
            IrqMode::Local => "local",
            IrqMode::Remote => "remote",
            IrqMode::Qemu => "qemu",
            IrqMode::QemuKernel => "qemu-kernel",
        }
    }

    /// The interrupt controller's side of the row: where the I/O APIC is.
    fn irqchip(self) -> &'static str {
        match self {
            IrqMode::Local | IrqMode::QemuKernel => "kernel",
            IrqMode::Remote => "remote",
            IrqMode::Qemu => "split",
        }
    }
}

/// One mode's runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqConfig {
    /// Periodic interrupts per run (at least 2).
    pub interrupts: u32,
    /// The period of the lateness run, µs.
    pub period_us: u32,
    /// The period of the rate run, µs.
    pub rate_period_us: u32,
}

/// `dmfabric bench irq --json`: one row per mode.
#[derive(Debug, Clone, Serialize)]
pub struct IrqJson {
    pub mode: String,
    /// Where the I/O APIC is: kernel (KVM's), split (QEMU's, in user
    /// space), remote (dmfabric's, on the server).
    pub irqchip: String,
    pub transport: String,
    pub interrupts: u32,
    /// The lateness run: its period, and lateness from the comparator's
    /// match to the handler's read of the main counter.
    pub period_us: u32,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Periodic interrupts the lateness run's guest counted: the
    /// interrupts asked for, and any already on their way when the last
    /// one's handler disabled the timer.
    pub delivered: u32,
    /// Periods the lateness run missed (coalesced, or a period late).
    pub missed: u32,
    /// The rate run: its period, interrupts delivered a second from the
    /// first to the last (by the HPET's counter), what the period asks
    /// for, and the periods missed over the span.
    pub rate_period_us: u32,
    pub interrupts_per_s: f64,
    pub nominal_per_s: f64,
    pub rate_missed: u32,
    pub rate_periods: u32,
    /// Remote: requests the client sent again (both runs).
    pub retransmits: u64,
    /// Every interrupt's lateness, nanoseconds (for `--plot` and `--hgrm`).
    #[serde(skip)]
    pub hist: Histogram<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum IrqBenchError {
    #[error(transparent)]
    Harness(#[from] harness::HarnessError),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    #[error(transparent)]
    Guest(#[from] guests::ApicHpetError),
    #[error("{0}")]
    Run(String),
    #[error("{what}: {err}")]
    Io {
        what: String,
        #[source]
        err: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IrqBenchError {
    let what = what.into();
    move |err| IrqBenchError::Io { what, err }
}

/// The bench's scratch directory (the server's config, QEMU's files),
/// removed when dropped.
pub fn bench_dir() -> Result<TempDir, IrqBenchError> {
    TempDir::fresh("dmfabric-bench-irq").map_err(io("Cannot create the bench's temporary directory"))
}

/// One guest run's outcome: its report and its lateness samples' bytes.
struct Outcome {
    report: ApicHpetReport,
    samples: Vec<u8>,
    retransmits: u64,
}

fn args_for(interrupts: u32, period_us: u32) -> ApicHpetArgs {
    // A phase may take a few times its nominal length (missed periods),
    // and never less than 10 s.
    let nominal_ms = u64::from(interrupts) * u64::from(period_us) / 1000;
    let watchdog_ms = (nominal_ms * 4).clamp(10_000, 500_000) as u32;
    ApicHpetArgs {
        periodic: interrupts,
        period_us,
        watchdog_ms,
        pin0: None,
        pin1: None,
        samples: interrupts.min(APIC_HPET_SAMPLES_MAX),
        // The level phase (not measured) with its one-shot far enough
        // ahead for a remote HPET (the period's when that is longer).
        level_delay_ms: if period_us < 20_000 { 20 } else { 0 },
    }
}

/// Guest memory for `args`: the samples' end, in 2 MiB steps, at least 8 MiB.
fn mem_bytes(args: &ApicHpetArgs) -> usize {
    (args.memory_end() as usize).max(8 << 20).next_multiple_of(2 << 20)
}

/// Run the bench's two guest runs in `mode` and make its row. `setup`
/// says where a remote run's client and server go and over what; `exe` is
/// the `dmfabric` binary a remote run starts as its server.
pub fn run(
    mode: IrqMode,
    setup: &Setup,
    exe: &Path,
    dir: &TempDir,
    cfg: &IrqConfig,
    stop: &Arc<AtomicBool>,
) -> Result<IrqJson, IrqBenchError> {
    if cfg.interrupts < 2 || cfg.interrupts > APIC_HPET_SAMPLES_MAX {
        return Err(IrqBenchError::Run(format!(
            "--interrupts must be between 2 and {APIC_HPET_SAMPLES_MAX}, not {}",
            cfg.interrupts
        )));
    }
    if cfg.period_us == 0 || cfg.rate_period_us == 0 {
        return Err(IrqBenchError::Run("the periods must be at least 1 µs".into()));
    }
    let once = |period_us: u32| -> Result<Outcome, IrqBenchError> {
        let args = args_for(cfg.interrupts, period_us);
        let out = match mode {
            IrqMode::Local => run_local(&args, stop)?,
            IrqMode::Remote => run_remote(setup, exe, dir, &args, stop)?,
            IrqMode::Qemu => qemu(dir, "pc,kernel-irqchip=split", &args, stop)?,
            IrqMode::QemuKernel => qemu(dir, "pc", &args, stop)?,
        };
        check(&out.report, &args)?;
        Ok(out)
    };
    let late = once(cfg.period_us)?;
    if stop.load(Ordering::Relaxed) {
        return Err(IrqBenchError::Run("Interrupted".into()));
    }
    let rate = once(cfg.rate_period_us)?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    for ns in late.report.lateness_ns(&late.samples) {
        h.saturating_record(ns.round().max(1.0) as u64);
    }
    let us = |ns: u64| (ns as f64 / 10.0).round() / 100.0;
    let r = &rate.report;
    let secs = r.hpet_ns() / 1e9;
    let per_s = if secs > 0.0 { f64::from(r.periodic - 1) / secs } else { 0.0 };
    Ok(IrqJson {
        mode: mode.name().into(),
        irqchip: mode.irqchip().into(),
        transport: if mode == IrqMode::Remote { setup.transport.name().into() } else { "none".into() },
        interrupts: cfg.interrupts,
        period_us: cfg.period_us,
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        max_us: us(h.max()),
        mean_us: (h.mean() / 10.0).round() / 100.0,
        delivered: late.report.periodic,
        missed: late.report.missed_periods(),
        rate_period_us: cfg.rate_period_us,
        interrupts_per_s: per_s.round(),
        nominal_per_s: (1e6 / f64::from(cfg.rate_period_us)).round(),
        rate_missed: r.missed_periods(),
        rate_periods: r.periods_elapsed(),
        retransmits: late.retransmits + rate.retransmits,
        hist: h,
    })
}

/// The report says the guest did what it was asked, with its samples.
fn check(r: &ApicHpetReport, args: &ApicHpetArgs) -> Result<(), IrqBenchError> {
    if let Some(e) = r.error() {
        return Err(IrqBenchError::Run(format!("the guest failed: {e} ({r:?})")));
    }
    // More than asked for: interrupts already on their way when the N-th's
    // handler disabled the timer (a remote HPET's, in flight to the client).
    if r.periodic < args.periodic || r.samples != args.samples || u64::from(r.samples_at) != APIC_HPET_SAMPLES_AT {
        return Err(IrqBenchError::Run(format!(
            "the guest counted {} of {} periodic interrupts, {} samples: {r:?}",
            r.periodic, args.periodic, r.samples
        )));
    }
    if r.hpet_period_fs == 0 || r.periods_elapsed() == 0 {
        return Err(IrqBenchError::Run(format!("the guest's HPET counter makes no sense: {r:?}")));
    }
    Ok(())
}

fn run_options(args: &ApicHpetArgs) -> RunOptions {
    RunOptions {
        timeout: Duration::from_secs(600),
        keep_memory: Some((APIC_HPET_SAMPLES_AT, args.samples as usize * 4)),
        ..RunOptions::default()
    }
}

/// The VM: `apic_hpet` with `args`, `ranges` mapped, `local` its local models.
fn spec(
    args: &ApicHpetArgs,
    ranges: &[(Space, u64, u64, Target)],
    local: Vec<Box<dyn dmfabric_devices::Device>>,
    irqchip: IrqChipMode,
) -> Result<VmSpec, IrqBenchError> {
    let mut s = VmSpec::test_guest(VM, 1, APIC_HPET, vec![args.regs()], ranges, local)
        .map_err(|e| IrqBenchError::Run(format!("the VM's map: {e}")))?;
    s.mem_bytes = mem_bytes(args);
    s.irqchip = irqchip;
    Ok(s)
}

/// The guest's report and samples from a shim run.
fn outcome(report: &RunReport) -> Result<Outcome, IrqBenchError> {
    let vm = report.vm(VM).ok_or_else(|| IrqBenchError::Run("the VM did not run".into()))?;
    if let Some(e) = vm.error() {
        return Err(IrqBenchError::Run(format!("the guest failed: {e}")));
    }
    let r = ApicHpetReport::parse(&vm.vcpus[0].reports)?;
    let samples = vm.memory.clone().ok_or_else(|| IrqBenchError::Run("no samples".into()))?;
    Ok(Outcome { report: r, samples, retransmits: report.client.map_or(0, |c| c.retransmits) })
}

/// dmfabric's HPET in this process, its lines into KVM's in-kernel I/O APIC.
fn run_local(args: &ApicHpetArgs, stop: &AtomicBool) -> Result<Outcome, IrqBenchError> {
    let wiring = LocalWiring::new(Default::default(), Default::default(), Box::new(Vec::<u8>::new()));
    let (devices, ranges) = local::devices(&[pc::hpet_device(HPET, Some(VM))], 0, &wiring);
    let mut vm = spec(args, &ranges, devices, IrqChipMode::Kernel)?;
    vm.wire_local(&wiring);
    let (report, _) = machine::run(vec![vm], None, &run_options(args), stop)?;
    outcome(&report)
}

/// `dmfabric server --config` in host 1 with VM 1's I/O APIC and HPET; the
/// VM in host 0 with KVM's split irqchip.
fn run_remote(
    setup: &Setup,
    exe: &Path,
    dir: &TempDir,
    args: &ApicHpetArgs,
    stop: &Arc<AtomicBool>,
) -> Result<Outcome, IrqBenchError> {
    let net = TestNet::pair().map_err(harness::HarnessError::from)?;
    let config = write_server_config(setup, dir, &net)?;
    let mut server = server_process::start(setup, exe, &net, &config, stop).map_err(IrqBenchError::Run)?;
    let result = client_side(setup, &net, args, stop);
    let _ = server.child.interrupt(Duration::from_secs(5));
    let lines = server.finish();
    match result.and_then(|r| outcome(&r)) {
        Ok(o) => Ok(o),
        Err(e) => {
            let last: Vec<&str> = lines.iter().rev().take(8).rev().map(String::as_str).collect();
            Err(IrqBenchError::Run(format!("{e}\nthe server's last words:\n{}", last.join("\n"))))
        }
    }
}

/// The server's config: the bench's client platform (its key file too)
/// and VM 1's I/O APIC and HPET.
fn write_server_config(setup: &Setup, dir: &TempDir, net: &TestNet) -> Result<PathBuf, IrqBenchError> {
    let devices = format!(
        "[[device]]\nid = {IOAPIC}\nkind = \"ioapic\"\nvm = {VM}\n\n[[device]]\nid = {HPET}\nkind = \"hpet\"\nvm = {VM}\n"
    );
    server_process::write_config(setup, &dir.0, net, VM, &devices).map_err(io("Cannot write the server's config"))
}

/// The VM in host 0, its I/O APIC (sending MSIs) and HPET on the server:
/// pinned to the client core, a session opened, then the VM run.
fn client_side(
    setup: &Setup,
    net: &TestNet,
    args: &ApicHpetArgs,
    stop: &AtomicBool,
) -> Result<RunReport, IrqBenchError> {
    let mut tspec = harness::spec_for(setup.transport, net, 0, 1, setup.xdp_mode);
    if let TransportSpec::Xdp(c) = &mut tspec {
        c.program = setup.xdp_program.or(c.program);
    }
    let core = setup.client_core;
    net.with_host(0, move || -> Result<RunReport, IrqBenchError> {
        if let Some(c) = core {
            dmfabric_pinning::pin_current(c).map_err(harness::HarnessError::from)?;
        }
        let fail = |e: &dyn std::fmt::Display| IrqBenchError::Run(e.to_string());
        let mut t = dmfabric_dataplane::open(&tspec).map_err(|e| fail(&e))?;
        let sealer = setup.sealer();
        let check = sealer.clone();
        t.check_senders(Box::new(move |f: &[u8]| check.verifies(f)));
        let session =
            loadgen::discover(t.as_mut(), loadgen::CLIENT_ID, &sealer, Duration::from_secs(5)).map_err(|e| fail(&e))?;
        let target = loadgen::Target::test_device(&session, &sealer);
        let ranges = [
            (
                Space::Mmio,
                IOAPIC_MMIO,
                u64::from(IOAPIC_LEN),
                Target::Remote(Remote::new(target.server_id, IOAPIC).msis()),
            ),
            (Space::Mmio, HPET_MMIO, u64::from(HPET_LEN), Target::Remote(Remote::new(target.server_id, HPET))),
        ];
        let vm = spec(args, &ranges, Vec::new(), IrqChipMode::Split)?;
        let cfg = crate::exit::client_config(&target, setup);
        Ok(machine::run(vec![vm], Some((t, cfg)), &run_options(args), stop)?.0)
    })
    .map_err(harness::HarnessError::from)?
}

/// The Multiboot build of the guest under QEMU `machine` (its own I/O APIC
/// and HPET, the HPET offered pins 16-23), its report and samples read
/// out of its memory once it has written the report (QMP pmemsave;
/// debugcon keeps a byte of each report word, which is only checked).
fn qemu(dir: &TempDir, machine: &str, args: &ApicHpetArgs, stop: &AtomicBool) -> Result<Outcome, IrqBenchError> {
    let image = guests::multiboot_with_args("apic_hpet", args.regs())
        .ok_or_else(|| IrqBenchError::Run("no Multiboot apic_hpet".into()))?;
    let tag = machine.replace([',', '='], "-");
    let sub = dir.0.join(format!("qemu-{tag}-{}", args.period_us));
    let _ = std::fs::remove_dir_all(&sub);
    std::fs::create_dir_all(&sub).map_err(io("temp dir"))?;
    let cleanup = TempDir(sub.clone());
    let (kernel, debug, sock) = (sub.join("apic_hpet.mb.bin"), sub.join("debug"), sub.join("qmp.sock"));
    let (report_dump, samples_dump) = (sub.join("report"), sub.join("samples"));
    std::fs::write(&kernel, image).map_err(io("temp file"))?;
    let mem_mib = (mem_bytes(args) >> 20).max(16);
    let qemu_args: Vec<String> = ["-M", machine, "-m", &mem_mib.to_string(), "-global"]
        .into_iter()
        .map(String::from)
        .chain([format!("hpet.hpet-intcap={QEMU_ROUTE_CAP:#x}")])
        .collect();
    let mut q = qemu::spawn(&qemu_args, &kernel, &debug, &sock).map_err(IrqBenchError::Run)?;
    let nominal = Duration::from_micros(u64::from(args.periodic) * u64::from(args.period_us));
    let within = Duration::from_secs(60) + nominal * 4;
    qemu::wait_report(&mut q, &debug, APIC_HPET_REPORT_WORDS, |_| false, within, stop).map_err(IrqBenchError::Run)?;
    let save = |addr: u64, size: usize, file: &Path| {
        format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":{addr},"size":{size},"filename":"{}"}}}}"#,
            file.display()
        )
    };
    let report_len = APIC_HPET_REPORT_WORDS * 4;
    let samples_len = args.samples as usize * 4;
    let commands = [
        r#"{"execute":"qmp_capabilities"}"#.to_string(),
        save(APIC_HPET_REPORT_AT, report_len, &report_dump),
        save(APIC_HPET_SAMPLES_AT, samples_len, &samples_dump),
        r#"{"execute":"quit"}"#.to_string(),
    ];
    let dumps = [(report_dump.as_path(), report_len as u64), (samples_dump.as_path(), samples_len as u64)];
    qmp_dumps(&mut q, &sock, &commands, &dumps).map_err(IrqBenchError::Run)?;
    let _ = q.0.wait();
    let bytes = std::fs::read(&report_dump).map_err(io("QEMU's memory dump"))?;
    let report = ApicHpetReport::from_memory(&bytes)?;
    let lows: Vec<u8> = bytes.chunks_exact(4).map(|c| c[0]).collect();
    let debugcon = std::fs::read(&debug).unwrap_or_default();
    if debugcon != lows {
        return Err(IrqBenchError::Run(format!(
            "the guest's report {debugcon:?} does not match its memory ({report:?})"
        )));
    }
    let samples = std::fs::read(&samples_dump).map_err(io("QEMU's memory dump"))?;
    drop(cleanup);
    Ok(Outcome { report, samples, retransmits: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_keep_a_sample_an_interrupt_in_enough_memory() {
        let a = args_for(1000, 1000);
        assert_eq!((a.periodic, a.period_us, a.samples, a.watchdog_ms), (1000, 1000, 1000, 10_000));
        assert_eq!(mem_bytes(&a), 8 << 20);
        let big = args_for(APIC_HPET_SAMPLES_MAX, 100);
        assert_eq!(mem_bytes(&big), 8 << 20);
        assert_eq!(args_for(100_000, 10_000).watchdog_ms, 500_000);
    }
}
