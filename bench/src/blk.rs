//! `bench blk`: the block test guest (`virtio_blk`, benchmark modes)
//! keeping `qd` requests of `bs` bytes in flight against a virtio-blk over
//! a raw image file, the same way in three places: dmfabric's virtio-blk in
//! the shim's process (`local`, the hybrid case), dmfabric's virtio-blk on
//! a `dmfabric server` in another network namespace (`remote`: every
//! descriptor, buffer and used-ring entry crosses the fabric as device
//! DMA), and QEMU's own virtio-blk on microvm's virtio-mmio (`qemu`, the
//! guest's Multiboot build under `qemu-system-x86_64 -enable-kvm`).
//!
//! The guest times every request with its TSC (one u32 sample each, kept in
//! its memory) and the whole run (first submission to last completion);
//! both are turned into time with the host TSC's rate, as `bench exit
//! --device uart-scratch` does ([`crate::scratch::tsc_per_ns`]). It does
//! its I/O in user mode (CPL3): this host emulates guest kernel mode an
//! instruction at a time (~0.5 µs each), which would measure the
//! emulator, not the device.
//!
//! The image is a file of `image_bytes` filled with data (no holes: a read
//! of a hole costs the file system nothing), opened with O_DIRECT by all
//! three (dmfabric's `UringImage` where the file system takes it, QEMU's
//! `cache=none`), both through io_uring.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use dmfabric_dataplane::netns::TestNet;
use dmfabric_dataplane::TransportSpec;
use dmfabric_devices::platform::pc::{self, VIRTIO_BLK_IRQ, VIRTIO_BLK_MMIO, VIRTIO_MMIO_LEN};
use dmfabric_storage::{OpenOptions, UringImage};
use dmfabric_vmm_shim::devmap::{Remote, Target};
use dmfabric_vmm_shim::guests::{self, VirtioBlkArgs, VirtioBlkMode, VirtioBlkReport, VIRTIO_BLK};
use dmfabric_vmm_shim::local::{self, LocalWiring};
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec, TEST_VM_MEM};
use dmfabric_wire::Space;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::harness::{self, Setup};
use crate::loadgen;
use crate::qemu::{self, qmp_dumps, TempDir};
use crate::server_process;

/// The VM of the bench, and its disk's device id on the server.
const VM: u32 = 1;
pub const DISK: u32 = 15;
/// Where the guest keeps its latency samples, from the start of its area.
const SAMPLES_OFFSET: u64 = 0x1_0000;
/// The guest's variables, in the order of `virtio_blk.S` (from `v_mmio`):
/// how a QEMU run's report is read back from its memory.
const V_MODE: usize = 1;
const V_SAMPLES: usize = 16;
const V_FEAT_LO: usize = 18;
const V_FEAT_HI: usize = 19;
const V_QSIZE: usize = 20;
const V_NSLOTS: usize = 22;
const V_CAPACITY: usize = 23;
const V_SUM: usize = 33;
const V_MISMATCH: usize = 34;
const V_BAD: usize = 35;
const V_COMPLETED: usize = 36;

/// Where the block device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkMode {
    Local,
    Remote,
    Qemu,
}

impl BlkMode {
    pub fn name(self) -> &'static str {
        match self {
            BlkMode::Local => "local",
            BlkMode::Remote => "remote",
            BlkMode::Qemu => "qemu",
        }
    }
}

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "seqread",
        }
    }

    fn mode(self) -> VirtioBlkMode {
        match self {
            Pattern::RandRead => VirtioBlkMode::RandRead,
            Pattern::RandWrite => VirtioBlkMode::RandWrite,
            Pattern::SeqRead => VirtioBlkMode::SeqRead,
        }
    }
}

/// One point of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    pub pattern: Pattern,
    /// Bytes per request: a multiple of 512, at most 128 KiB.
    pub bs: u32,
    /// Requests in flight (1-42: a third of the guest's 128-entry queue).
    pub qd: u8,
    pub requests: u32,
}

/// The largest request the guest makes (256 sectors).
pub const MAX_BS: u32 = 256 * 512;
/// The most requests the guest keeps in flight (three descriptors each in
/// a queue of 128).
pub const MAX_QD: u8 = 42;

impl BlkConfig {
    /// The guest's arguments for a device at `mmio` (0: scan microvm's slots).
    pub fn args(&self, mmio: u64) -> VirtioBlkArgs {
        VirtioBlkArgs {
            mmio,
            mode: self.pattern.mode(),
            user: true,
            qd: self.qd,
            bs: (self.bs / 512) as u16,
            count: self.requests,
            seed: 0x5eed_b10c,
            area: 0,
        }
    }
}

/// `dmfabric bench blk --json`: one row per mode (and transport) and depth.
#[derive(Debug, Clone, Serialize)]
pub struct BlkJson {
    pub mode: String,
    pub transport: String,
    pub pattern: String,
    /// Bytes per request.
    pub bs: u32,
    pub qd: u8,
    pub requests: u32,
    /// The guest's privilege level during the I/O (`user`: CPL3, native
    /// on this host; kernel mode would be emulated).
    pub guest: String,
    /// The image opened with O_DIRECT (QEMU: cache=none).
    pub direct: bool,
    /// First submission to last completion, by the guest's TSC.
    pub seconds: f64,
    pub iops: f64,
    /// 10^6 bytes per second.
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Remote: requests the client sent again; DMA chunks the server sent
    /// per request and sent again (0 elsewhere).
    pub retransmits: u64,
    pub dma_chunks_per_request: f64,
    pub dma_retransmits: u64,
    /// Every request's latency, nanoseconds (for `--plot` and `--hgrm`).
    #[serde(skip)]
    pub hist: Histogram<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlkBenchError {
    #[error(transparent)]
    Harness(#[from] harness::HarnessError),
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    #[error(transparent)]
    Image(#[from] dmfabric_storage::ImageError),
    #[error(transparent)]
    Guest(#[from] guests::VirtioBlkError),
    #[error("{0}")]
    Run(String),
    #[error("{what}: {err}")]
    Io {
        what: String,
        #[source]
        err: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BlkBenchError {
    let what = what.into();
    move |err| BlkBenchError::Io { what, err }
}

/// The bench's image in a temporary directory of its own (removed when
/// dropped), with the files of a remote run's server beside it.
#[derive(Debug)]
pub struct BenchImage {
    dir: PathBuf,
    pub path: PathBuf,
    pub bytes: u64,
}

impl BenchImage {
    /// An image of `bytes` (a multiple of 1 MiB), every sector written.
    pub fn new(bytes: u64) -> Result<BenchImage, BlkBenchError> {
        if bytes == 0 || !bytes.is_multiple_of(1 << 20) {
            return Err(BlkBenchError::Run(format!("the image must be a whole number of MiB, not {bytes} bytes")));
        }
        let dir = std::env::temp_dir().join(format!("dmfabric-bench-blk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("Cannot create {}", dir.display())))?;
        let image = BenchImage { path: dir.join("disk.img"), dir, bytes };
        let mut f = std::fs::File::create(&image.path).map_err(io("Cannot create the image"))?;
        let mut chunk = vec![0u8; 1 << 20];
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) | 1;
        }
        for _ in 0..bytes >> 20 {
            f.write_all(&chunk).map_err(io("Cannot fill the image"))?;
        }
        f.sync_all().map_err(io("Cannot sync the image"))?;
        Ok(image)
    }
}

impl Drop for BenchImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Guest memory for `args` (its area, samples and buffers, and room above).
fn mem_bytes(args: &VirtioBlkArgs) -> usize {
    ((args.area() + args.memory()) as usize + (1 << 20)).max(TEST_VM_MEM).next_multiple_of(2 << 20)
}

fn samples_at(args: &VirtioBlkArgs) -> (u64, usize) {
    (args.area() + SAMPLES_OFFSET, args.count as usize * 4)
}

/// The VM: the block guest with `args`, its device at `target` (and
/// `local` the models of `Target::Local`).
fn spec(args: &VirtioBlkArgs, target: Target, local: Vec<Box<dyn dmfabric_devices::Device>>) -> VmSpec {
    let range = (Space::Mmio, VIRTIO_BLK_MMIO, u64::from(VIRTIO_MMIO_LEN), target);
    let mut s = VmSpec::test_guest(VM, 1, VIRTIO_BLK, vec![args.regs()], &[range], local).expect("a valid test map");
    s.mem_bytes = mem_bytes(args);
    s
}

/// The guest's report and samples from a shim run.
fn outcome(report: &RunReport) -> Result<(VirtioBlkReport, Vec<u8>), BlkBenchError> {
    let vm = report.vm(VM).ok_or_else(|| BlkBenchError::Run("the VM did not run".into()))?;
    if let Some(e) = vm.error() {
        return Err(BlkBenchError::Run(format!("the guest failed: {e}")));
    }
    let r = VirtioBlkReport::parse(&vm.vcpus[0].reports)?;
    let samples = vm.memory.clone().ok_or_else(|| BlkBenchError::Run("no samples".into()))?;
    Ok((r, samples))
}

/// What a remote run adds to a row: the client's retransmits, the
/// server's DMA chunks sent and sent again.
#[derive(Debug, Default, Clone, Copy)]
struct RemoteCounts {
    retransmits: u64,
    dma_chunks: u64,
    dma_retransmits: u64,
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    mode: BlkMode,
    transport: &str,
    cfg: &BlkConfig,
    direct: bool,
    report: &VirtioBlkReport,
    samples: &[u8],
    tsc_per_ns: f64,
    counts: RemoteCounts,
) -> Result<BlkJson, BlkBenchError> {
    if report.completed != cfg.requests || report.bad_status != 0 {
        return Err(BlkBenchError::Run(format!(
            "the guest completed {} of {} requests, {} with a bad status",
            report.completed, cfg.requests, report.bad_status
        )));
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    for chunk in samples.chunks_exact(4) {
        let ticks = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        h.saturating_record((f64::from(ticks) / tsc_per_ns) as u64);
    }
    let secs = report.sum_or_cycles as f64 / tsc_per_ns / 1e9;
    let iops = f64::from(report.completed) / secs.max(1e-9);
    let us = |ns: u64| (ns as f64 / 10.0).round() / 100.0;
    Ok(BlkJson {
        mode: mode.name().into(),
        transport: transport.into(),
        pattern: cfg.pattern.name().into(),
        bs: cfg.bs,
        qd: cfg.qd,
        requests: cfg.requests,
        guest: "user".into(),
        direct,
        seconds: (secs * 1e6).round() / 1e6,
        iops: iops.round(),
        mb_per_s: (iops * f64::from(cfg.bs) / 1e4).round() / 100.0,
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        max_us: us(h.max()),
        mean_us: (h.mean() / 10.0).round() / 100.0,
        retransmits: counts.retransmits,
        dma_chunks_per_request: ((counts.dma_chunks as f64 / f64::from(cfg.requests.max(1))) * 100.0).round() / 100.0,
        dma_retransmits: counts.dma_retransmits,
        hist: h,
    })
}

/// Run one point of the bench in `mode` against `image`. `setup` says
/// where a remote run's client and server go and over what; `exe` is the
/// `dmfabric` binary a remote run starts as its server.
pub fn run(
    mode: BlkMode,
    setup: &Setup,
    exe: &Path,
    image: &BenchImage,
    cfg: &BlkConfig,
    stop: &Arc<AtomicBool>,
) -> Result<BlkJson, BlkBenchError> {
    if cfg.bs == 0 || !cfg.bs.is_multiple_of(512) || cfg.bs > MAX_BS {
        return Err(BlkBenchError::Run(format!("--bs must be a multiple of 512 up to {MAX_BS}, not {}", cfg.bs)));
    }
    if cfg.qd == 0 || cfg.qd > MAX_QD {
        return Err(BlkBenchError::Run(format!("--qd must be between 1 and {MAX_QD}, not {}", cfg.qd)));
    }
    if cfg.requests == 0 || u64::from(cfg.bs) > image.bytes {
        return Err(BlkBenchError::Run("at least one request, each no larger than the image".into()));
    }
    let rate = crate::scratch::tsc_per_ns();
    match mode {
        BlkMode::Local => run_local(image, cfg, rate, stop),
        BlkMode::Remote => run_remote(setup, exe, image, cfg, rate, stop),
        BlkMode::Qemu => {
            let (report, samples) = qemu(image, cfg, stop)?;
            summarise(mode, "qemu", cfg, true, &report, &samples, rate, RemoteCounts::default())
        }
    }
}

fn run_options(args: &VirtioBlkArgs) -> RunOptions {
    RunOptions { timeout: Duration::from_secs(300), keep_memory: Some(samples_at(args)), ..RunOptions::default() }
}

/// The virtio-blk in this process over a `UringImage`. Not pinned: the
/// vCPU spins on the used ring in the guest and the local-timers thread
/// that reaps io_uring's completions needs a core too (a remote run's
/// server has the other one).
fn run_local(image: &BenchImage, cfg: &BlkConfig, rate: f64, stop: &AtomicBool) -> Result<BlkJson, BlkBenchError> {
    let args = cfg.args(VIRTIO_BLK_MMIO);
    let disk = UringImage::open(&image.path, OpenOptions::default())?;
    let direct = disk.direct();
    let wiring = LocalWiring::new(Default::default(), Default::default(), Box::new(Vec::<u8>::new()));
    wiring.add_block(DISK, Box::new(disk));
    let (devices, _) = local::devices(&[pc::virtio_blk_device(DISK, Some(VM))], 0, &wiring);
    let mut vm = spec(&args, Target::Local(0), devices);
    vm.wire_local(&wiring);
    let (report, _) = machine::run(vec![vm], None, &run_options(&args), stop)?;
    let (r, samples) = outcome(&report)?;
    summarise(BlkMode::Local, "none", cfg, direct, &r, &samples, rate, RemoteCounts::default())
}

/// `dmfabric server --config` in host 1 with the disk; the VM in host 0.
fn run_remote(
    setup: &Setup,
    exe: &Path,
    image: &BenchImage,
    cfg: &BlkConfig,
    rate: f64,
    stop: &Arc<AtomicBool>,
) -> Result<BlkJson, BlkBenchError> {
    let args = cfg.args(VIRTIO_BLK_MMIO);
    let net = TestNet::pair().map_err(harness::HarnessError::from)?;
    let config = write_server_config(setup, image, &net)?;
    let mut server = server_process::start(setup, exe, &net, &config, stop).map_err(BlkBenchError::Run)?;
    let result = client_side(setup, &net, &args, stop);
    let _ = server.child.interrupt(Duration::from_secs(5));
    let lines = server.finish();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let last: Vec<&str> = lines.iter().rev().take(8).rev().map(String::as_str).collect();
            return Err(BlkBenchError::Run(format!("{e}\nthe server's last words:\n{}", last.join("\n"))));
        }
    };
    let (r, samples) = outcome(&report)?;
    let dma = lines.iter().find(|l| l.contains("device DMA:"));
    if let Some(l) = dma {
        eprintln!("  {}", l.trim_start_matches("dmfabric server: "));
    }
    let count = |key: &str| -> u64 {
        dma.and_then(|l| l.split(key).nth(1))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let counts = RemoteCounts {
        retransmits: report.client.map_or(0, |c| c.retransmits),
        dma_chunks: count("chunks sent "),
        dma_retransmits: count("retransmitted "),
    };
    summarise(BlkMode::Remote, setup.transport.name(), cfg, true, &r, &samples, rate, counts)
}

/// The server's config beside the image: the bench's client platform (its
/// key file too) and the disk over the image, for VM 1.
fn write_server_config(setup: &Setup, image: &BenchImage, net: &TestNet) -> Result<PathBuf, BlkBenchError> {
    let disk =
        format!("[[device]]\nid = {DISK}\nkind = \"virtio-blk\"\nvm = {VM}\nimage = \"{}\"\n", image.path.display());
    server_process::write_config(setup, &image.dir, net, VM, &disk).map_err(io("Cannot write the server's config"))
}

/// The VM in host 0, its disk on the server: the harness's client side
/// (pinned to the client core, a session opened, then the VM run).
fn client_side(
    setup: &Setup,
    net: &TestNet,
    args: &VirtioBlkArgs,
    stop: &AtomicBool,
) -> Result<RunReport, BlkBenchError> {
    let mut spec = harness::spec_for(setup.transport, net, 0, 1, setup.xdp_mode);
    if let TransportSpec::Xdp(c) = &mut spec {
        c.program = setup.xdp_program.or(c.program);
    }
    let core = setup.client_core;
    net.with_host(0, move || -> Result<RunReport, BlkBenchError> {
        if let Some(c) = core {
            dmfabric_pinning::pin_current(c).map_err(harness::HarnessError::from)?;
        }
        let fail = |e: &dyn std::fmt::Display| BlkBenchError::Run(e.to_string());
        let mut t = dmfabric_dataplane::open(&spec).map_err(|e| fail(&e))?;
        let sealer = setup.sealer();
        let check = sealer.clone();
        t.check_senders(Box::new(move |f: &[u8]| check.verifies(f)));
        let session =
            loadgen::discover(t.as_mut(), loadgen::CLIENT_ID, &sealer, Duration::from_secs(5)).map_err(|e| fail(&e))?;
        let target = loadgen::Target::test_device(&session, &sealer);
        let disk = Remote::new(target.server_id, DISK).lines(&[VIRTIO_BLK_IRQ]);
        let vm = spec_remote(args, disk);
        let cfg = crate::exit::client_config(&target, setup);
        Ok(machine::run(vec![vm], Some((t, cfg)), &run_options(args), stop)?.0)
    })
    .map_err(harness::HarnessError::from)?
}

fn spec_remote(args: &VirtioBlkArgs, disk: Remote) -> VmSpec {
    spec(args, Target::Remote(disk), Vec::new())
}

/// Boot the Multiboot build of the guest under QEMU (microvm, its
/// virtio-blk on a modern virtio-mmio transport over the image, O_DIRECT
/// and io_uring), wait for its report, and read its samples and report
/// out of its memory (QMP pmemsave; QEMU's debugcon keeps one byte of each
/// report word, which is only checked against what memory says).
fn qemu(image: &BenchImage, cfg: &BlkConfig, stop: &AtomicBool) -> Result<(VirtioBlkReport, Vec<u8>), BlkBenchError> {
    let args = cfg.args(0);
    let kernel_image = guests::multiboot_with_args("virtio_blk", args.regs())
        .ok_or_else(|| BlkBenchError::Run("no Multiboot virtio_blk".into()))?;
    let dir = TempDir(image.dir.join(format!("qemu-{}", cfg.qd)));
    std::fs::create_dir_all(&dir.0).map_err(io("temp dir"))?;
    let (kernel, debug, sock) = (dir.0.join("virtio_blk.mb.bin"), dir.0.join("debug"), dir.0.join("qmp.sock"));
    let (samples_dump, low_dump) = (dir.0.join("samples"), dir.0.join("low"));
    std::fs::write(&kernel, kernel_image).map_err(io("temp file"))?;
    let mem_mib = (mem_bytes(&args) >> 20).max(16);
    let qemu_args: Vec<String> = ["-M", "microvm", "-global", "virtio-mmio.force-legacy=false", "-m"]
        .into_iter()
        .map(String::from)
        .chain([mem_mib.to_string(), "-drive".into()])
        .chain([format!("file={},format=raw,if=none,id=d0,cache=none,aio=io_uring", image.path.display())])
        .chain(["-device".into(), "virtio-blk-device,drive=d0".into()])
        .collect();
    let mut q = qemu::spawn(&qemu_args, &kernel, &debug, &sock).map_err(BlkBenchError::Run)?;
    // Thirteen report writes (one byte each in debugcon) when it is done;
    // one, non-zero, if it failed.
    let failed = |got: &[u8]| got.first().is_some_and(|&b| b != 0);
    let got =
        qemu::wait_report(&mut q, &debug, 13, failed, Duration::from_secs(300), stop).map_err(BlkBenchError::Run)?;
    if failed(&got) {
        return Err(VirtioBlkReport::parse(&[u32::from(got[0])]).err().map_or_else(
            || BlkBenchError::Run(format!("the guest under QEMU reported {got:?}")),
            BlkBenchError::from,
        ));
    }
    let (at, len) = samples_at(&args);
    // The guest's code and variables sit below its area.
    let low = args.area();
    let save = |addr: u64, size: u64, file: &Path| {
        format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":{addr},"size":{size},"filename":"{}"}}}}"#,
            file.display()
        )
    };
    let commands = [
        r#"{"execute":"qmp_capabilities"}"#.to_string(),
        save(at, len as u64, &samples_dump),
        save(0, low, &low_dump),
        r#"{"execute":"quit"}"#.to_string(),
    ];
    qmp_dumps(&mut q, &sock, &commands, &[(&samples_dump, len as u64), (&low_dump, low)])
        .map_err(BlkBenchError::Run)?;
    let _ = q.0.wait();
    let samples = std::fs::read(&samples_dump).map_err(io("QEMU's memory dump"))?;
    let memory = std::fs::read(&low_dump).map_err(io("QEMU's memory dump"))?;
    let report = report_in_memory(&memory, &args)
        .ok_or_else(|| BlkBenchError::Run("the guest's variables are not in its memory".into()))?;
    // debugcon's bytes: the low byte of each report word.
    let lo = std::fs::read(&debug).unwrap_or_default();
    if lo.get(1) != Some(&(report.completed as u8)) || lo.get(12) != Some(&(report.samples as u8)) {
        return Err(BlkBenchError::Run(format!("the guest's report {lo:?} does not match its memory ({report:?})")));
    }
    Ok((report, samples))
}

/// The guest's report, read from its variables in `memory` (guest-physical
/// 0..): found by the arguments it unpacked into them (`v_mode` .. `v_seed`).
fn report_in_memory(memory: &[u8], args: &VirtioBlkArgs) -> Option<VirtioBlkReport> {
    let bs = u64::from(args.bs.clamp(1, 256));
    let want = [args.mode as u64, 0x80, u64::from(args.qd.max(1)), bs, bs * 512, u64::from(args.count)];
    let quad = |at: usize| memory.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    // (The variables follow the code: not necessarily 8-byte aligned.)
    let start = (0..memory.len().saturating_sub(8 * 40))
        .find(|&at| want.iter().enumerate().all(|(i, &w)| quad(at + 8 * i) == Some(w)))?;
    let var = |i: usize| quad(start + 8 * (i - V_MODE));
    Some(VirtioBlkReport {
        completed: var(V_COMPLETED)? as u32,
        sum_or_cycles: var(V_SUM)?,
        mismatches: var(V_MISMATCH)? as u32,
        bad_status: var(V_BAD)? as u32,
        capacity: var(V_CAPACITY)?,
        features: var(V_FEAT_LO)? | var(V_FEAT_HI)? << 32,
        queue_size: var(V_QSIZE)? as u32,
        in_flight: var(V_NSLOTS)? as u32,
        samples: var(V_SAMPLES)? as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_found_among_the_guests_variables() {
        let args = BlkConfig { pattern: Pattern::RandWrite, bs: 4096, qd: 16, requests: 2000 }.args(0);
        let mut vars = [0u64; 40];
        vars[0] = 0xfeb0_3e00;
        vars[V_MODE..V_MODE + 7].copy_from_slice(&[2, 0x80, 16, 8, 4096, 2000, 0x5eed_b10c]);
        vars[V_SAMPLES] = 0x21_0000;
        vars[V_FEAT_LO] = 0x244;
        vars[V_FEAT_HI] = 1;
        vars[V_QSIZE] = 128;
        vars[V_NSLOTS] = 16;
        vars[V_CAPACITY] = 131_072;
        vars[V_SUM] = 123_456_789;
        vars[V_COMPLETED] = 2000;
        let mut memory = vec![0u8; 0x1000];
        for (i, v) in vars.iter().enumerate() {
            memory[0x800 + 8 * i..0x808 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let r = report_in_memory(&memory, &args).unwrap();
        assert_eq!((r.completed, r.sum_or_cycles, r.capacity, r.in_flight), (2000, 123_456_789, 131_072, 16));
        assert_eq!((r.features, r.queue_size, r.samples), (0x1_0000_0244, 128, 0x21_0000));
        assert!(report_in_memory(&memory[..0x800], &args).is_none());
    }
}
