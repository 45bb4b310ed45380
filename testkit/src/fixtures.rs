//! A control panel's database for server tests: client platform 3 (MAC
//! 02:00:00:00:00:03) runs VM 7, whose owner is server 10 (…:0a); register
//! file 1 (ports 0x500+0x10) is on server 10, register file 2 (0x600+0x10) on
//! I/O server 11 (…:0b).

use dmfabric_control::model::{
    Change, ClientPlatform, Db, Device, Range, Server as ServerRec, ServerRole, Vm, VmState,
};

/// A register file of VM 7 at ports `base..base + 0x10` on `server`.
pub fn regfile(id: u32, server: u16, base: u64) -> Device {
    Device {
        id,
        kind: "regfile".into(),
        server,
        shard: 0,
        vm: 7,
        ranges: vec![Range { mmio: false, base, len: 0x10 }],
        irqs: vec![],
        image: None,
    }
}

/// The database described above.
pub fn owner_and_io_server() -> Db {
    let mut db = Db::default();
    db.apply(&[
        Change::AddClient(ClientPlatform {
            id: 3,
            mac: "02:00:00:00:00:03".into(),
            hypervisor: 1,
            hypervisor_kind: "kvm".into(),
        }),
        Change::AddServer(ServerRec { id: 10, mac: "02:00:00:00:00:0a".into(), role: ServerRole::Owner }),
        Change::AddServer(ServerRec { id: 11, mac: "02:00:00:00:00:0b".into(), role: ServerRole::Io }),
        Change::AddVm(Vm {
            id: 7,
            client: 3,
            vcpus: 1,
            memory_mib: 4,
            image: "io_loop".into(),
            state: VmState::Running,
            owner: Some(10),
            args: Vec::new(),
            migrate_to: None,
            irqchip: Default::default(),
        }),
        Change::AddDevice(regfile(1, 10, 0x500)),
        Change::AddDevice(regfile(2, 11, 0x600)),
    ])
    .unwrap();
    db
}
