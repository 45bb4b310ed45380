//! A real KVM guest in 64-bit long mode doing port I/O and MMIO against
//! local device models (needs /dev/kvm; skipped without it).

use dmfabric_dataplane::netns::{self, Need};
use dmfabric_dm_workers::device::Device;
use dmfabric_dm_workers::regfile::RegisterFile;
use dmfabric_vmm_shim::debugport::{DebugPort, DEBUG_PORT};
use dmfabric_vmm_shim::devmap::DeviceMap;
use dmfabric_vmm_shim::guests::{self, IO_LOOP, LOAD_ADDR};
use dmfabric_vmm_shim::kvm::{Exit, Vm};
use dmfabric_wire::{Direction, Space};

const PORT: u64 = 0x500;
const MMIO: u64 = 0xd000_0000;

/// Run io_loop with `iterations`, aiming its port accesses at `port`.
/// Returns (reported checksum, unmapped accesses, exits).
fn run_io_loop(iterations: u64, port: u64) -> (u64, u64, u64) {
    let mut regfile = RegisterFile::new(Some((PORT as u16, 0x100)), Some((MMIO, 0x1000)));
    let mut debug = DebugPort::default();
    let mut map = DeviceMap::default();
    map.add(Space::Pio, PORT, 0x100, 0usize).unwrap();
    map.add(Space::Mmio, MMIO, 0x1000, 0).unwrap();
    map.add(Space::Pio, u64::from(DEBUG_PORT), 4, 1).unwrap();

    let mut vm = Vm::new(4 << 20).expect("VM");
    vm.load(LOAD_ADDR, IO_LOOP).unwrap();
    let mut vcpu = vm.long_mode_vcpu(0, LOAD_ADDR, [iterations, port, MMIO]).expect("vCPU");
    let mut unmapped = 0u64;
    let stats = vcpu
        .run_until_halt(&mut |e: &Exit| {
            let dev: Option<&mut dyn Device> = match map.lookup(e.space, e.addr, e.size.bytes()) {
                Some(0) => Some(&mut regfile),
                Some(_) => Some(&mut debug),
                None => None,
            };
            match (dev, e.dir) {
                (Some(d), Direction::Read) => d.read(e.space, e.addr, e.size).unwrap_or(u64::MAX),
                (Some(d), Direction::Write) => {
                    d.write(e.space, e.addr, e.size, e.data);
                    0
                }
                // Unmapped, as on real hardware: reads all ones, writes dropped.
                (None, dir) => {
                    unmapped += 1;
                    if dir == Direction::Read {
                        e.size.mask()
                    } else {
                        0
                    }
                }
            }
        })
        .expect("guest runs to HLT");
    (debug.u64_at(0).expect("checksum reported"), unmapped, stats.io_exits + stats.mmio_exits)
}

#[test]
fn guest_port_and_mmio_io_reach_local_devices() {
    if !netns::privileged_or_skip("guest_port_and_mmio_io_reach_local_devices", &[Need::Kvm]) {
        return;
    }
    let (checksum, unmapped, exits) = run_io_loop(500, PORT);
    assert_eq!(checksum, guests::io_loop_checksum(500));
    assert_eq!(unmapped, 0);
    assert_eq!(exits, 4 * 500 + 2, "OUT, IN, MMIO write, MMIO read per iteration, 2 reports");
}

#[test]
fn a_guest_touching_unmapped_ports_keeps_running_and_reads_all_ones() {
    if !netns::privileged_or_skip("a_guest_touching_unmapped_ports", &[Need::Kvm]) {
        return;
    }
    let (checksum, unmapped, _) = run_io_loop(100, 0x900);
    let expected = (0..100u64).fold(0u64, |s, i| s.wrapping_add(0xffff_ffff).wrapping_add(3 * i));
    assert_eq!(checksum, expected);
    assert_eq!(unmapped, 200, "every OUT and IN on the unmapped port");
}
