//! Writes the fuzz targets' seeds from real data into `corpus/<target>/`:
//! states saved by models a guest-like script drove (as a server hands them
//! over), a VM snapshot a real KVM guest was migrated out as (with
//! /dev/kvm; shrunk to the 1 MiB the target allows), the control panel's
//! records, console requests and answers. Run by scripts/fuzz.sh --seeds,
//! which then minimises each corpus (`cargo fuzz cmin`).
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example seeds -- fuzz/corpus

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmfabric_control::model::{fixtures, Device, Range, Server, ServerRole, Vm, VmState};
use dmfabric_devices::{build, DeviceKind, DeviceState};
use dmfabric_dm_workers::console::{answer_error, answer_ok, request_line};
use dmfabric_fuzz::{drive, specs, FuzzWiring};
use dmfabric_vmm_shim::devmap::Target;
use dmfabric_vmm_shim::machine::{self, ControlError, Desired, RunOptions, VmControl, VmSpec};
use dmfabric_vmm_shim::migrate::VmSnapshot;
use dmfabric_wire::Space;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    device_restore(&out.join("device_restore"));
    records(&out.join("records"));
    console_protocol(&out.join("console_protocol"));
    vm_snapshot(&out.join("vm_snapshot"));
    virtio_blk(&out.join("virtio_blk"));
}

/// Rings a virtio-blk driver writes (the virtio_blk target's layout:
/// descriptor table at 0, available ring at 0x1000, used at 0x2000):
/// a write, a read, a flush and a GET_ID, each a chain of header, data and
/// status, and one chain that loops.
fn virtio_blk(dir: &Path) {
    // Input: queue size log2, flags, 8 bytes of choices, then guest RAM.
    let mut ram = vec![0u8; 0x6000];
    let desc = |ram: &mut Vec<u8>, i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let at = i * 16;
        ram[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        ram[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        ram[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        ram[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    // (type, sector, data flags): OUT 1, IN 0, FLUSH 4, GET_ID 8.
    let requests: [(u32, u64, Option<u16>); 4] = [(1, 0, Some(0)), (0, 0, Some(WRITE)), (4, 0, None), (8, 0, Some(WRITE))];
    for (r, (kind, sector, data)) in requests.iter().enumerate() {
        let head = r * 3;
        let hdr = 0x3000 + r as u64 * 16;
        ram[hdr as usize..hdr as usize + 4].copy_from_slice(&kind.to_le_bytes());
        ram[hdr as usize + 8..hdr as usize + 16].copy_from_slice(&sector.to_le_bytes());
        let status = 0x3800 + r as u64;
        match data {
            Some(f) => {
                desc(&mut ram, head, hdr, 16, NEXT, (head + 1) as u16);
                desc(&mut ram, head + 1, 0x4000 + r as u64 * 512, 512, f | NEXT, (head + 2) as u16);
                desc(&mut ram, head + 2, status, 1, WRITE, 0);
            }
            None => {
                desc(&mut ram, head, hdr, 16, NEXT, (head + 1) as u16);
                desc(&mut ram, head + 1, status, 1, WRITE, 0);
            }
        }
        ram[0x1004 + r * 2..0x1006 + r * 2].copy_from_slice(&(head as u16).to_le_bytes());
    }
    ram[0x1002..0x1004].copy_from_slice(&4u16.to_le_bytes());
    let seed = |qlog: u8, flags: u8, ram: &[u8]| {
        let mut s = vec![qlog, flags];
        s.extend_from_slice(&7u64.to_le_bytes());
        s.extend_from_slice(ram);
        s
    };
    put(dir, "write_read_flush_id", &seed(4, 0, &ram));
    put(dir, "read_only_failing_flush", &seed(4, 3, &ram));
    // A chain that points back at its head.
    let mut looped = ram.clone();
    desc(&mut looped, 14, 0x3000, 16, NEXT, 15);
    desc(&mut looped, 15, 0x4000, 512, NEXT | WRITE, 14);
    looped[0x100c..0x100e].copy_from_slice(&14u16.to_le_bytes());
    looped[0x1002..0x1004].copy_from_slice(&5u16.to_le_bytes());
    put(dir, "looping_chain", &seed(4, 0, &looped));
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("the corpus directory");
    std::fs::write(dir.join(name), bytes).expect("a seed written");
}

/// An access of `drive`'s script: write `data` (or read) `size` bytes at `off`.
fn acc(write: bool, mmio: bool, size: u8, off: u8, data: u16) -> [u8; 4] {
    let size = match size {
        1 => 0,
        2 => 1,
        4 => 2,
        _ => 3,
    };
    let [lo, hi] = data.to_le_bytes();
    [u8::from(write) | u8::from(mmio) << 1 | size << 2 | 1 << 4, off, lo, hi]
}

/// What a guest's driver does with each model (offsets from the base, + 8).
fn script(kind: &DeviceKind) -> Vec<[u8; 4]> {
    let w = |off: u8, v: u16| acc(true, false, 1, off + 8, v);
    let r = |off: u8| acc(false, false, 1, off + 8, 0);
    let w4 = |off: u8, v: u16| acc(true, false, 4, off + 8, v);
    let r4 = |off: u8| acc(false, false, 4, off + 8, 0);
    match kind {
        // 8N1 at 115200, FIFO on with a 4-byte trigger, OUT2, then send and receive.
        DeviceKind::Uart { .. } => vec![
            w(3, 0x80),
            w(0, 1),
            w(1, 0),
            w(3, 0x03),
            w(2, 0x47),
            w(4, 0x0b),
            w(1, 0x05),
            w(0, u16::from(b'o')),
            w(0, u16::from(b'k')),
            r(5),
            r(2),
            r(0),
            r(6),
            w(7, 0x5a),
        ],
        // Read the time in BCD, set the clock to 2030 (SET, year, century,
        // SET off), set an alarm, turn on periodic interrupts.
        DeviceKind::Rtc { .. } => vec![
            w(0, 0x0a),
            r(1),
            w(0, 0x00),
            r(1),
            w(0, 0x04),
            r(1),
            w(0, 0x0b),
            w(1, 0x82),
            w(0, 0x09),
            w(1, 0x30),
            w(0, 0x32),
            w(1, 0x20),
            w(0, 0x0b),
            w(1, 0x02),
            w(0, 0x0b),
            w(1, 0x42),
            w(0, 0x01),
            w(1, 0x31),
            w(0, 0x40),
            w(1, 0xab),
            w(0, 0x0c),
            r(1),
            w(0, 0x8e),
        ],
        // Self-test, read the command byte, keyboard identify.
        DeviceKind::I8042 { .. } => {
            vec![w(4, 0xaa), r(0), w(4, 0x20), r(0), w(0, 0xf2), r(0), r(4), w(4, 0x60), w(0, 0x47), w(0, 0xed)]
        }
        // A periodic level timer of 1 ms, run for a while, acknowledged.
        DeviceKind::Timer { .. } => {
            let mut s = vec![w4(4, 1000), w4(0, 0x7), r4(0x10)];
            s.extend(std::iter::repeat_n(r4(0x0c), 6));
            s.extend([r4(8), w4(8, 1)]);
            s
        }
        DeviceKind::IrqTest { .. } => vec![w4(0, 1), w4(0, 2), r4(0), r4(4), w4(0, 3)],
        // virtio-mmio: magic, version, device id; ACKNOWLEDGE, DRIVER; the features.
        DeviceKind::VirtioBlk { .. } => {
            let m = |write: bool, off: u8, v: u16| acc(write, true, 4, off + 8, v);
            vec![m(false, 0, 0), m(false, 4, 0), m(false, 8, 0), m(true, 0x70, 1), m(true, 0x70, 3), m(false, 0x10, 0)]
        }
        // I/O APIC: read the version, program pin 0 (level, vector 0x30,
        // unmasked) and its destination, read it back, EOI its vector.
        DeviceKind::IoApic => {
            let m = |write: bool, off: u8, v: u16| acc(write, true, 4, off + 8, v);
            vec![
                m(true, 0, 1),
                m(false, 0x10, 0),
                m(true, 0, 0x11),
                m(true, 0x10, 0x0100),
                m(true, 0, 0x10),
                m(true, 0x10, 0x8030),
                m(false, 0x10, 0),
                m(true, 0x40, 0x30),
            ]
        }
        // HPET: capabilities and period; the counter set while halted;
        // enabled in legacy mode; the counter read in halves as it runs; a
        // status clear; halted again.
        DeviceKind::Hpet => {
            let m4 = |write: bool, off: u8, v: u16| acc(write, true, 4, off + 8, v);
            let m8 = |write: bool, off: u8, v: u16| acc(write, true, 8, off + 8, v);
            vec![
                m8(false, 0, 0),
                m4(false, 4, 0),
                m8(true, 0xf0, 0x1000),
                m4(true, 0x10, 3),
                m4(false, 0xf0, 0),
                m4(false, 0xf4, 0),
                m8(false, 0xf0, 0),
                m4(true, 0x20, 7),
                m4(true, 0x10, 0),
                m8(false, 0xf0, 0),
            ]
        }
        DeviceKind::RegFile => vec![
            w4(0, 0x1234),
            acc(true, true, 8, 8, 0xbeef),
            acc(false, true, 4, 12, 0),
            r4(0),
            acc(true, false, 2, 20, 7),
        ],
    }
}

/// Each model's state after its script, as a server hands it over (a
/// Handoff's JSON), with the script after a NUL; and device specs.
fn device_restore(dir: &Path) {
    let t0 = Instant::now();
    let wiring = FuzzWiring::new(t0);
    for spec in specs() {
        let mut d = build(&spec, &wiring, None, t0).expect("a fresh model");
        let steps: Vec<u8> = script(&spec.kind).concat();
        drive(d.as_mut(), &spec, &steps, t0);
        let state: DeviceState = d.save();
        let handoff = serde_json::json!({ "device": spec.id, "from": 1, "state": state, "streams": [] });
        let mut seed = serde_json::to_vec(&handoff).expect("JSON");
        seed.push(0);
        seed.extend_from_slice(&steps);
        put(dir, &format!("handoff_{}", spec.kind.name()), &seed);
        put(dir, &format!("state_{}", spec.kind.name()), &serde_json::to_vec(&state).expect("JSON"));
    }
    // A handoff with a stream's completion, as a frame.
    let frame = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/parse/io_completion"))
        .expect("the parse corpus has a completion");
    let uart = serde_json::to_value(DeviceState::Uart(Default::default())).expect("JSON");
    let handoff = serde_json::json!({ "device": 3, "from": 2, "state": uart, "streams": [[7, 42, frame]] });
    put(dir, "handoff_with_stream", &serde_json::to_vec(&handoff).expect("JSON"));
    // Specs: a register file, one past the port space, one over the size cap.
    for (name, kind, ranges, pio, mmio) in [
        ("spec_regfile", 4u8, 3u8, (0x500u16, 0x10u16), (0xd000_0000u64, 0x40u32)),
        ("spec_regfile_past_ports", 4, 1, (0xfff0, 0x20), (0, 0)),
        ("spec_regfile_4g", 4, 2, (0, 0), (0xd000_0000, u32::MAX)),
        ("spec_regfile_at_top", 4, 2, (0, 0), (u64::MAX - 0x3f, 0x40)),
        ("spec_uart", 0, 1, (0x3f8, 8), (0, 0)),
    ] {
        let mut seed = vec![b'S', kind, ranges];
        seed.extend_from_slice(&pio.0.to_le_bytes());
        seed.extend_from_slice(&pio.1.to_le_bytes());
        seed.extend_from_slice(&mmio.0.to_le_bytes());
        seed.extend_from_slice(&mmio.1.to_le_bytes());
        seed.extend_from_slice(&script(&DeviceKind::RegFile).concat());
        put(dir, name, &seed);
    }
}

/// FNV-1a as the records target computes it (which inputs go through the store).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The control panel's records: `[pick, JSON]` (see the records target: a
/// record that joins the platform is at key `<kind>/77`, so it is number 77;
/// one that replaces the platform's has its number).
fn records(dir: &Path) {
    let platform = fixtures::platform();
    let mut seeds: Vec<(&str, u8, Vec<u8>)> = Vec::new();
    for c in &platform {
        match c {
            dmfabric_control::model::Change::AddClient(r) => seeds.push(("client", 4, json(r))),
            dmfabric_control::model::Change::AddServer(r) => seeds.push(("server", 1 | 4, json(r))),
            dmfabric_control::model::Change::AddVm(r) => seeds.push(("vm", 2 | 4, json(r))),
            _ => {}
        }
    }
    seeds.push(("device_uart", 3, json(&fixtures::uart(77, 0x2f8))));
    let regfile = Device {
        id: 77,
        kind: "regfile".into(),
        server: 10,
        shard: 1,
        vm: 100,
        ranges: vec![
            Range { mmio: false, base: 0x500, len: 0x100 },
            Range { mmio: true, base: 0xd000_0000, len: 0x1000 },
        ],
        irqs: vec![],
        image: None,
    };
    seeds.push(("device_regfile", 3, json(&regfile)));
    let io = Server { id: 77, mac: "02:00:00:00:00:0b".into(), role: ServerRole::Io };
    seeds.push(("server_io", 1, json(&io)));
    let migrating = Vm {
        id: 77,
        client: 1,
        vcpus: 2,
        memory_mib: 64,
        image: "irq_wait".into(),
        state: VmState::Migrating,
        owner: Some(10),
        args: vec![1, 2, 3],
        migrate_to: Some(1),
        irqchip: dmfabric_control::model::IrqChip::Remote,
    };
    seeds.push(("vm_migrating", 2, json(&migrating)));
    for (name, pick, value) in seeds {
        let mut seed = vec![pick];
        seed.extend_from_slice(&value);
        put(dir, name, &seed);
        // The same record through the store file: trailing blanks until the hash says so.
        while !(fnv1a(&seed) >> 32).is_multiple_of(128) {
            seed.push(b' ');
        }
        put(dir, &format!("{name}_stored"), &seed);
    }
}

/// A record as JSON.
fn json<T: serde::Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialise")
}

/// What a terminal sends and what the server answers: `[cut, bytes]`.
fn console_protocol(dir: &Path) {
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("attach", [request_line(4).as_bytes(), b"ls\n"].concat()),
        ("attach_spaces", b"  attach   42  \r\nx".to_vec()),
        ("not_attach", b"detach 4\n".to_vec()),
        ("no_line", vec![b'a'; 80]),
        ("ok", answer_ok(4).into_bytes()),
        ("error", answer_error("no console for \"attach 9\" on this server (VMs with a console: 4)").into_bytes()),
        ("error_escape", b"error \x1b[2J\x07\n".to_vec()),
    ];
    for (i, (name, bytes)) in seeds.into_iter().enumerate() {
        let mut seed = vec![(i as u8) * 9 + 4];
        seed.extend_from_slice(&bytes);
        put(dir, name, &seed);
    }
}

/// Lets a VM run for a while, then migrates it out and keeps the snapshot.
struct MigrateAfter {
    start: Instant,
    after: Duration,
    snapshot: Mutex<Option<Vec<u8>>>,
}

impl VmControl for MigrateAfter {
    fn desired(&self, _vm: u32) -> Desired {
        if self.start.elapsed() < self.after {
            Desired::Run
        } else {
            Desired::MigrateOut
        }
    }

    fn migrated_out(&self, _vm: u32, snapshot: &[u8]) -> Result<String, ControlError> {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot.to_vec());
        Ok("the seed".into())
    }

    fn next_look(&self) -> Option<Instant> {
        (self.start.elapsed() < self.after).then_some(self.start + self.after)
    }
}

/// A real snapshot: the io_loop test guest on 2 vCPUs with a local register
/// file, migrated out mid-run; its memory cut to the first 1 MiB (where the
/// guest's code is) so that the target's VM size takes it: its header, KVM's
/// state of the VM and of each vCPU, is whole.
fn vm_snapshot(dir: &Path) {
    const MEM: usize = 1 << 20;
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("seeds: no /dev/kvm: no real VM snapshot (the committed ones stay)");
        return;
    }
    let control =
        Arc::new(MigrateAfter { start: Instant::now(), after: Duration::from_millis(200), snapshot: Mutex::new(None) });
    let regfile = dmfabric_devices::regfile::RegisterFile::new(Some((0x500, 0x100)), Some((0xd000_0000, 0x1000)));
    let ranges = [(Space::Pio, 0x500, 0x100, Target::Local(0)), (Space::Mmio, 0xd000_0000, 0x1000, Target::Local(0))];
    let args = vec![[10_000_000, 0x500, 0xd000_0000], [10_000_000, 0x510, 0xd000_0010]];
    let spec = VmSpec::test_guest(1, 2, dmfabric_vmm_shim::guests::IO_LOOP, args, &ranges, vec![Box::new(regfile)])
        .expect("the test guest's spec");
    let opts = RunOptions { control: Some(machine::Control(control.clone())), ..RunOptions::default() };
    machine::run(vec![spec], None, &opts, &AtomicBool::new(false)).expect("the guest runs");
    let bytes = control.snapshot.lock().unwrap_or_else(|e| e.into_inner()).take().expect("a snapshot");
    let mut snap = VmSnapshot::decode(&bytes, usize::MAX).expect("a snapshot decodes");
    let pages = |m: &[u8]| m.chunks(4096).filter(|p| p.iter().any(|&b| b != 0)).count();
    eprintln!(
        "seeds: a {} KiB snapshot of VM 1 ({} vCPUs, {} non-zero pages, {} in the first 1 MiB kept)",
        bytes.len() / 1024,
        snap.vcpus.len(),
        pages(&snap.memory),
        pages(&snap.memory[..MEM])
    );
    snap.memory.truncate(MEM);
    put(dir, "io_loop_2vcpus", &snap.encode());
    snap.vcpus.truncate(1);
    snap.memory.truncate(64 << 10);
    put(dir, "io_loop_1vcpu_64k", &snap.encode());
}
