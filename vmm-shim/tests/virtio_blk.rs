//! The `virtio_blk` guest driving a virtio-blk model kept in the client
//! process (the hybrid case): register accesses by MMIO exits, the
//! model's DMA served against the VM's RAM (`vmm-shim/src/dma.rs`), its
//! storage an in-memory backend. Needs /dev/kvm; skipped without it
//! (failed under DMFABRIC_REQUIRE_PRIVILEGED=1).

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use dmfabric_devices::dma::SubmitError;
use dmfabric_devices::{BlockBackend, BlockOp, BlockResult};

use dmfabric_devices::platform::pc;
use dmfabric_devices::testing::MemBackend;
use dmfabric_testkit::Need;
use dmfabric_vmm_shim::guests::{self, VirtioBlkArgs, VirtioBlkError, VirtioBlkMode, VirtioBlkReport, VIRTIO_BLK};
use dmfabric_vmm_shim::local::{self, LocalWiring};
use dmfabric_vmm_shim::machine::{self, RunOptions, RunReport, VmSpec};

const DEVICE: u32 = 7;
/// Sectors of the test disk.
const SECTORS: u64 = 4096;
const F_FLUSH: u64 = 1 << 9;

/// A backend whose completions come `lag` after their submission (as an
/// image's would, later than the access that started them): only a host
/// that keeps polling a busy model ever sees them.
struct Laggy {
    inner: MemBackend,
    lag: Duration,
    held: Vec<(Instant, u64, BlockResult)>,
    scratch: Vec<(u64, BlockResult)>,
}

impl BlockBackend for Laggy {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
    fn submit(&mut self, tag: u64, op: BlockOp) -> Result<(), SubmitError> {
        self.inner.submit(tag, op)?;
        // MemBackend does the work on its next poll; hold the result back.
        let now = Instant::now();
        self.inner.poll(&mut self.scratch);
        self.held.extend(self.scratch.drain(..).map(|(t, r)| (now + self.lag, t, r)));
        Ok(())
    }
    fn poll(&mut self, out: &mut Vec<(u64, BlockResult)>) -> usize {
        let now = Instant::now();
        let before = out.len();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                let (_, tag, r) = self.held.swap_remove(i);
                out.push((tag, r));
            } else {
                i += 1;
            }
        }
        out.len() - before
    }
    fn in_flight(&self) -> usize {
        self.held.len() + self.inner.in_flight()
    }
}

/// A VM running `virtio_blk` with `args` against a local virtio-blk
/// device at the PC's window, whose storage is `disk` (None: an empty drive).
fn vm(args: VirtioBlkArgs, disk: Option<&MemBackend>) -> VmSpec {
    vm_with(args, disk.map(|d| Box::new(d.clone()) as Box<dyn BlockBackend>))
}

fn vm_with(args: VirtioBlkArgs, backend: Option<Box<dyn BlockBackend>>) -> VmSpec {
    let mut wiring = LocalWiring::new(Default::default(), Default::default(), Box::new(Vec::new()));
    if let Some(b) = backend {
        wiring = wiring.with_block(DEVICE, b);
    }
    let (devices, ranges) = local::devices(&[pc::virtio_blk_device(DEVICE, Some(1))], 0, &wiring);
    let mut spec = VmSpec::test_guest(1, 1, VIRTIO_BLK, vec![args.regs()], &ranges, devices).unwrap();
    spec.wire_local(&wiring);
    assert!(args.area() + args.memory() <= spec.mem_bytes as u64, "the driver's memory is RAM");
    spec
}

fn run(spec: VmSpec, opts: &RunOptions) -> RunReport {
    let stop = AtomicBool::new(false);
    machine::run(vec![spec], None, opts, &stop).expect("the VM runs").0
}

/// The guest's report, and the code it exited with.
fn report(r: &RunReport) -> (Result<VirtioBlkReport, VirtioBlkError>, u32) {
    let v = &r.vm(1).expect("the VM ran").vcpus[0];
    let code = v.result.as_ref().map(|s| s.exit_code).expect("the guest exits through its exit port");
    (VirtioBlkReport::parse(&v.reports), code)
}

fn check_args(mmio: u64, qd: u8, bs: u16, count: u32, seed: u32) -> VirtioBlkArgs {
    VirtioBlkArgs { mmio, mode: VirtioBlkMode::Check, user: false, qd, bs, count, seed, area: 0 }
}

#[test]
fn a_guest_writes_flushes_and_reads_back_through_a_local_virtio_blk() {
    if !dmfabric_testkit::privileged_or_skip("local_virtio_blk_check", &[Need::Kvm]) {
        return;
    }
    let disk = MemBackend::new(SECTORS as usize * 512);
    let args = check_args(pc::VIRTIO_BLK_MMIO, 4, 2, 48, 0x5eed);
    let (rep, code) = report(&run(vm(args, Some(&disk)), &RunOptions::default()));
    let rep = rep.expect("the driver sets the device up");
    assert_eq!(code, 0);
    assert_eq!(rep.capacity, SECTORS);
    assert_eq!(rep.features >> 32, 1, "VERSION_1 accepted");
    assert_eq!((rep.mismatches, rep.bad_status), (0, 0), "{rep:?}");
    let flushed = rep.features & F_FLUSH != 0;
    assert_eq!(rep.completed, 2 * args.count + u32::from(flushed));
    assert_eq!(rep.in_flight, 4);
    assert_eq!(rep.sum_or_cycles, guests::virtio_blk_checksum(args.seed, SECTORS, args.bs, args.count));

    // The disk holds the pattern at every sector written, and zeros elsewhere.
    let bytes = disk.bytes();
    let sectors = guests::virtio_blk_sectors(args.seed, SECTORS, args.bs, args.count);
    let mut written = vec![false; SECTORS as usize];
    for first in sectors {
        for s in first..first + u64::from(args.bs) {
            let at = s as usize * 512;
            assert_eq!(bytes[at..at + 512], guests::virtio_blk_sector_bytes(args.seed, s), "sector {s}");
            written[s as usize] = true;
        }
    }
    for (s, _) in written.iter().enumerate().filter(|(_, w)| !**w) {
        assert!(bytes[s * 512..s * 512 + 512].iter().all(|&b| b == 0), "sector {s} was never written");
    }
}

#[test]
fn a_benchmark_run_finds_the_device_by_scanning_and_times_every_request() {
    if !dmfabric_testkit::privileged_or_skip("local_virtio_blk_bench", &[Need::Kvm]) {
        return;
    }
    let disk = MemBackend::new(SECTORS as usize * 512);
    for (mode, count) in [(VirtioBlkMode::RandWrite, 40), (VirtioBlkMode::SeqRead, 40), (VirtioBlkMode::RandRead, 8)] {
        let args = VirtioBlkArgs { mmio: 0, mode, user: false, qd: 8, bs: 8, count, seed: 3, area: 0 };
        let opts = RunOptions { keep_memory: Some((args.area() + 0x1_0000, 4 * count as usize)), ..Default::default() };
        let r = run(vm(args, Some(&disk)), &opts);
        let (rep, code) = report(&r);
        let rep = rep.expect("the driver finds the device at the first microvm slot");
        assert_eq!(code, 0);
        assert_eq!((rep.completed, rep.bad_status, rep.in_flight), (count, 0, 8), "{mode:?}");
        assert!(rep.sum_or_cycles > 0);
        assert_eq!(u64::from(rep.samples), args.area() + 0x1_0000);
        let samples = r.vm(1).unwrap().memory.as_ref().expect("the samples");
        assert!(samples.chunks_exact(4).all(|s| u32::from_le_bytes(s.try_into().unwrap()) > 0), "{mode:?}");
    }
    // Random writes wrote whole requests of the (zeroed) buffers: the disk is still zeros.
    assert!(disk.bytes().iter().all(|&b| b == 0));
}

#[test]
fn a_guest_sees_no_device_where_there_is_none_and_an_empty_drive_as_too_small() {
    if !dmfabric_testkit::privileged_or_skip("local_virtio_blk_absent", &[Need::Kvm]) {
        return;
    }
    // Nothing at the base the guest is given: all ones, no magic.
    let (rep, code) = report(&run(vm(check_args(0xfec0_0000, 1, 1, 1, 1), None), &RunOptions::default()));
    assert_eq!((rep, code), (Err(VirtioBlkError::NoDevice), 1));
    // A drive without an image has no sectors.
    let (rep, code) = report(&run(vm(check_args(pc::VIRTIO_BLK_MMIO, 1, 1, 1, 1), None), &RunOptions::default()));
    assert_eq!((rep, code), (Err(VirtioBlkError::TooSmall), 5));
}

#[test]
fn completions_that_come_later_reach_the_guest_through_the_local_timers_thread() {
    if !dmfabric_testkit::privileged_or_skip("local_virtio_blk_lagging_backend", &[Need::Kvm]) {
        return;
    }
    let disk = MemBackend::new(SECTORS as usize * 512);
    let lag = Duration::from_micros(300);
    let laggy = Laggy { inner: disk.clone(), lag, held: Vec::new(), scratch: Vec::new() };
    let args = check_args(pc::VIRTIO_BLK_MMIO, 4, 1, 16, 99);
    let started = Instant::now();
    let (rep, code) = report(&run(vm_with(args, Some(Box::new(laggy))), &RunOptions::default()));
    let rep = rep.expect("the driver sets the device up");
    assert_eq!((code, rep.mismatches, rep.bad_status), (0, 0, 0), "{rep:?}");
    assert_eq!(rep.sum_or_cycles, guests::virtio_blk_checksum(args.seed, SECTORS, args.bs, args.count));
    // The guest waits on its used ring without an exit: every completion
    // here was seen by the local-timers thread polling the busy model.
    assert!(started.elapsed() >= lag * 2);
    let first = guests::virtio_blk_sectors(args.seed, SECTORS, 1, 1)[0];
    let at = first as usize * 512;
    assert_eq!(disk.bytes()[at..at + 512], guests::virtio_blk_sector_bytes(args.seed, first));
}

#[test]
fn the_check_passes_in_user_mode_too() {
    if !dmfabric_testkit::privileged_or_skip("local_virtio_blk_user_mode", &[Need::Kvm]) {
        return;
    }
    let disk = MemBackend::new(SECTORS as usize * 512);
    let args = VirtioBlkArgs { user: true, ..check_args(pc::VIRTIO_BLK_MMIO, 8, 4, 64, 0xabcd) };
    let (rep, code) = report(&run(vm(args, Some(&disk)), &RunOptions::default()));
    let rep = rep.expect("the driver sets the device up");
    assert_eq!((code, rep.mismatches, rep.bad_status), (0, 0, 0), "{rep:?}");
    assert_eq!(rep.sum_or_cycles, guests::virtio_blk_checksum(args.seed, SECTORS, args.bs, args.count));
}
