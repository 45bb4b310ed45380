//! Routing tables at scale: 10,000 VMs and 100,000 devices registered (ten
//! per VM: COM1, RTC, i8042, a timer and six MMIO windows). Lookups by (VM,
//! address), placements by device, building a table from the database, and
//! swapping it in under readers; the table's heap footprint is printed.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmfabric_control::model::{Change, ClientPlatform, Db, Device, Range, Server, ServerRole, Vm, VmState};
use dmfabric_control::routing::{LiveRoutes, RoutingTable};
use dmfabric_devices::platform::pc::{self, Role};

const VMS: u32 = 10_000;
const PER_VM: u32 = 10;

fn database() -> Db {
    let mut changes = vec![Change::AddClient(ClientPlatform {
        id: 1,
        mac: "02:00:00:00:00:01".into(),
        hypervisor: 1,
        hypervisor_kind: "kvm".into(),
    })];
    for s in 0..16u16 {
        changes.push(Change::AddServer(Server {
            id: 100 + s,
            mac: format!("02:00:00:00:01:{s:02x}"),
            role: ServerRole::Io,
        }));
    }
    for vm in 0..VMS {
        changes.push(Change::AddVm(Vm {
            id: vm + 1,
            client: 1,
            vcpus: 1,
            memory_mib: 64,
            image: "io_loop".into(),
            state: VmState::Running,
            owner: None,
            args: Vec::new(),
            migrate_to: None,
            irqchip: Default::default(),
        }));
    }
    let mut db = Db::default();
    db.apply(&changes).expect("a valid database");
    // Devices straight into the map: checking 100,000 additions one by one
    // against every device of their VM is the control panel's job, not this bench's.
    for vm in 0..VMS {
        for i in 0..PER_VM {
            let id = vm * PER_VM + i + 1;
            // A PC's four devices, then MMIO windows.
            let range = match Role::ALL.get(i as usize) {
                Some(role) => {
                    let w = role.window();
                    Range { mmio: false, base: u64::from(w.base), len: u64::from(w.len) }
                }
                None => Range { mmio: true, base: pc::TEST_DEVICE_MMIO + u64::from(i) * 0x1000, len: 0x1000 },
            };
            let d = Device {
                id,
                kind: "regfile".into(),
                server: 100 + (id % 16) as u16,
                shard: id % 4,
                vm: vm + 1,
                ranges: vec![range],
                irqs: vec![],
                image: None,
            };
            db.devices.insert(id, d);
        }
    }
    db
}

fn routing(c: &mut Criterion) {
    let db = database();
    let table = RoutingTable::build(&db, 1);
    assert_eq!((table.vm_count(), table.device_count()), (VMS as usize, (VMS * PER_VM) as usize));
    eprintln!(
        "routing table: {} VMs, {} devices, {:.1} MiB on the heap ({:.0} bytes a device); the database it keeps: {:.1} MiB",
        table.vm_count(),
        table.device_count(),
        table.heap_bytes() as f64 / (1 << 20) as f64,
        table.heap_bytes() as f64 / table.device_count() as f64,
        db.heap_bytes() as f64 / (1 << 20) as f64
    );
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    let mut i = 0u32;
    group.bench_function("route_vm_address", |b| {
        b.iter(|| {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let vm = i % VMS + 1;
            let hit = table.route(black_box(vm), true, black_box(0xd000_5010));
            black_box(hit)
        })
    });
    group.bench_function("placement_of_device", |b| {
        b.iter(|| {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12345);
            black_box(table.placement(black_box(i % (VMS * PER_VM) + 1)))
        })
    });
    let live = LiveRoutes::new(table.clone());
    group.bench_function("load_current_table", |b| b.iter(|| black_box(live.load().revision)));
    group.bench_function("swap_prebuilt_table", |b| {
        b.iter_batched(|| table.clone(), |t| drop(live.swap(t)), criterion::BatchSize::LargeInput)
    });
    group.sample_size(10);
    // What a watch does per revision once it has loaded the records.
    group.bench_function("build_table_from_database", |b| {
        b.iter_batched(
            || Arc::new(db.clone()),
            |d| black_box(RoutingTable::from_db(d, 2)),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
