//! Control-panel records as a store holds them: the first byte picks a
//! record kind (client platform, server, VM, device) and whether the record
//! replaces one of a small valid platform's or joins it; the rest is the
//! record's JSON value. What loads is used as the product uses it: records
//! re-serialise to themselves, routing tables are built and looked up, each
//! server's devices become specs and fresh models (placement's `specs_in`,
//! `AddressMap`), and the records are checked again as a change batch
//! (`Db::apply`).
//!
//! The control panel's record loading (`read_record`) is crate-private, so
//! one input in 128 goes the whole way: its records are written into a redb
//! store file and read back through `RedbStore::load`. That costs two opens
//! and a commit of the file (about 10 ms with the fuzzer's instrumentation),
//! so the other inputs take the short way: each record parsed as
//! `read_record` parses it, serde_json into the record type its key names —
//! the same parser, without the store around it. Which inputs go through
//! the store is decided by a hash of all their bytes, so that mutating an
//! input that went through it does not keep the slow path; both ways must
//! agree on every input that goes through the store.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Instant;

use dmfabric_control::model::{fixtures, Change, Db};
use dmfabric_control::routing::RoutingTable;
use dmfabric_control::store::{RedbStore, Store};
use dmfabric_dm_workers::placement::specs_in;
use dmfabric_dm_workers::rx::AddressMap;
use dmfabric_fuzz::FuzzWiring;
use libfuzzer_sys::fuzz_target;
use redb::{Database, TableDefinition};

/// The store's records table (control-panel/src/store.rs `RECORDS`).
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

/// The store file of this process, in `TMPDIR` (scripts/fuzz.sh points it at
/// a directory it removes; tmpfs where there is one, since every commit syncs).
static PATH: LazyLock<PathBuf> =
    LazyLock::new(|| std::env::temp_dir().join(format!("dmfabric-fuzz-records-{}.redb", std::process::id())));
static STORE: LazyLock<RedbStore> = LazyLock::new(|| RedbStore::open(&PATH).expect("the fuzz store opens"));

/// The valid platform the fuzzed record joins: client 1, server 10, VM 100
/// and a UART, as (key, JSON).
fn platform() -> Vec<(String, Vec<u8>)> {
    let mut changes = fixtures::platform();
    changes.push(Change::AddDevice(fixtures::uart(1, 0x3f8)));
    changes
        .iter()
        .map(|c| match c {
            Change::AddClient(r) => (format!("client/{}", r.id), serde_json::to_vec(r)),
            Change::AddServer(r) => (format!("server/{}", r.id), serde_json::to_vec(r)),
            Change::AddVm(r) => (format!("vm/{}", r.id), serde_json::to_vec(r)),
            Change::AddDevice(r) => (format!("device/{}", r.id), serde_json::to_vec(r)),
            _ => unreachable!("the platform only adds"),
        })
        .map(|(k, v)| (k, v.expect("records serialise")))
        .collect()
}

/// Put `records` (and nothing else) in the store file.
fn write(records: &[(String, Vec<u8>)]) {
    let db = Database::create(&*PATH).expect("the fuzz store file opens");
    let tx = db.begin_write().expect("a write transaction");
    {
        let mut table = tx.open_table(RECORDS).expect("the records table");
        table.retain(|_, _| false).expect("the table empties");
        for (k, v) in records {
            table.insert(k.as_str(), v.as_slice()).expect("a record goes in");
        }
    }
    tx.commit().expect("the records commit");
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, value)) = data.split_first() else { return };
    let kind = ["client", "server", "vm", "device"][usize::from(pick & 3)];
    let mut records = platform();
    let key = if pick & 4 != 0 {
        // In the place of the platform's record of that kind.
        records.iter().find(|(k, _)| k.starts_with(kind)).map(|(k, _)| k.clone()).unwrap_or_default()
    } else {
        format!("{kind}/77")
    };
    records.retain(|(k, _)| *k != key);
    records.push((key, value.to_vec()));
    let direct = read(&records);
    if (fnv1a(data) >> 32).is_multiple_of(STORE_ONE_IN) {
        write(&records);
        let stored = STORE.load();
        assert_eq!(stored.as_ref().ok(), direct.as_ref().ok(), "the store loads what its records say");
        if let Err(e) = stored {
            let said = e.to_string();
            assert!(said.contains("record ") || said.contains("unknown record"), "{said}");
        }
    }
    if let Ok(db) = direct {
        use_records(&db);
    }
});

/// One input in this many goes through the store file (see the top).
const STORE_ONE_IN: u64 = 128;

/// FNV-1a, 64 bits: which inputs go through the store.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The records as `read_record` reads them: the size first, then by the
/// kind its key names, the record that key names, checked on its own.
fn read(records: &[(String, Vec<u8>)]) -> Result<Db, String> {
    use dmfabric_control::model::{ClientPlatform, Device, Server, Vm, MAX_RECORD_BYTES};
    let mut db = Db::default();
    for (k, v) in records {
        if v.len() > MAX_RECORD_BYTES {
            return Err(format!("record {k} is corrupt: {} bytes", v.len()));
        }
        let bad = |e: &dyn std::fmt::Display| format!("record {k} is corrupt: {e}");
        let Some((kind, id)) = k.split_once('/') else { return Err(format!("unknown record {k}")) };
        let id: u64 = id.parse().map_err(|_| format!("unknown record {k}"))?;
        let named = |got: u64| if got == id { Ok(()) } else { Err(format!("record {k} holds {got}")) };
        match kind {
            "client" => {
                let c: ClientPlatform = serde_json::from_slice(v).map_err(|e| bad(&e))?;
                named(c.id.into())?;
                c.validate().map_err(|e| bad(&e))?;
                db.clients.insert(c.id, c);
            }
            "server" => {
                let s: Server = serde_json::from_slice(v).map_err(|e| bad(&e))?;
                named(s.id.into())?;
                s.validate().map_err(|e| bad(&e))?;
                db.servers.insert(s.id, s);
            }
            "vm" => {
                let m: Vm = serde_json::from_slice(v).map_err(|e| bad(&e))?;
                named(m.id.into())?;
                m.validate().map_err(|e| bad(&e))?;
                db.vms.insert(m.id, m);
            }
            "device" => {
                let d: Device = serde_json::from_slice(v).map_err(|e| bad(&e))?;
                named(d.id.into())?;
                d.validate().map_err(|e| bad(&e))?;
                db.devices.insert(d.id, d);
            }
            _ => return Err(format!("unknown record {k}")),
        }
    }
    Ok(db)
}

fn use_records(db: &Db) {
    // What loaded serialises back to itself (what `ctl show` and a commit write).
    for c in db.clients.values() {
        assert_eq!(
            &serde_json::from_slice::<dmfabric_control::model::ClientPlatform>(&serde_json::to_vec(c).unwrap())
                .unwrap(),
            c
        );
    }
    for d in db.devices.values() {
        assert_eq!(
            &serde_json::from_slice::<dmfabric_control::model::Device>(&serde_json::to_vec(d).unwrap()).unwrap(),
            d
        );
    }
    for v in db.vms.values() {
        assert_eq!(&serde_json::from_slice::<dmfabric_control::model::Vm>(&serde_json::to_vec(v).unwrap()).unwrap(), v);
    }
    let _ = serde_json::to_vec(db).expect("the database serialises");
    let _ = db.heap_bytes();

    // A data plane's routing table, and lookups at every range's edges.
    let table = RoutingTable::build(db, 1);
    let _ = table.heap_bytes();
    for d in db.devices.values() {
        let _ = table.placement(d.id);
        for r in &d.ranges {
            for addr in [r.base, r.base.wrapping_add(r.len), r.base.wrapping_add(r.len).wrapping_sub(1)] {
                let _ = table.route(d.vm, r.mmio, addr);
            }
        }
    }
    for v in db.vms.values() {
        let _ = (table.client_of(v.id), table.may_send(v.id, v.client));
        let _ = v.owner.map(|o| table.server_mac(o));
    }
    for c in db.clients.values() {
        let _ = table.client_mac(c.id);
    }

    // Each server's devices as a planner builds them.
    let t0 = Instant::now();
    let wiring = FuzzWiring::new(t0);
    let servers: std::collections::BTreeSet<u16> = db.devices.values().map(|d| d.server).collect();
    for server in servers {
        let specs: Vec<_> = specs_in(db, server).into_iter().filter_map(Result::ok).collect();
        let map = AddressMap::new(&specs);
        for s in &specs {
            let mut d = dmfabric_devices::fresh(s, &wiring, t0);
            let _ = d.read(dmfabric_wire::Space::Pio, u64::from(s.base()), dmfabric_wire::AccessSize::B1);
            if let Some((base, _)) = s.mmio {
                let _ = map.resolve(1, dmfabric_wire::Space::Mmio, base);
            }
            let _ = map.resolve(100, dmfabric_wire::Space::Pio, u64::from(s.base()));
        }
    }

    // The records as a change batch, checked from an empty database.
    let mut changes: Vec<Change> = Vec::new();
    changes.extend(db.clients.values().cloned().map(Change::AddClient));
    changes.extend(db.servers.values().cloned().map(Change::AddServer));
    changes.extend(db.vms.values().cloned().map(Change::AddVm));
    changes.extend(db.devices.values().cloned().map(Change::AddDevice));
    let mut checked = Db::default();
    if checked.apply(&changes).is_ok() {
        assert_eq!(&checked, db, "records that check as a batch are the records");
    }
}
