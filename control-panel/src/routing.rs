//! Routing tables: what a data plane needs from the database, in the shape
//! its per-frame path wants, and the swap that replaces one table with the
//! next without stopping the loop that reads it.
//!
//! A client asks "which device and server hold this VM's address?"; a
//! server asks "which server and shard hold this device?". Both are answered
//! from a [`RoutingTable`] built once per database revision; [`LiveRoutes`]
//! holds the current one behind an `ArcSwap`, so readers load it with a few
//! atomic operations and never wait for a writer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use dmfabric_wire::MacAddr;

use crate::model::Db;

/// One range of a VM's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Route {
    base: u64,
    end: u64,
    device: u32,
}

/// A VM's routes, sorted by base, per space.
#[derive(Debug, Clone, Default)]
struct VmRoutes {
    client: u16,
    /// The server its requests go to first (None: each device's own).
    owner: Option<u16>,
    /// The client platform it is migrating to (which may already send).
    moving_to: Option<u16>,
    pio: Vec<Route>,
    mmio: Vec<Route>,
}

/// Where a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub server: u16,
    pub shard: u32,
}

/// The answer to a client's lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub device: u32,
    /// Where to send the request: the VM's owner server if it has one,
    /// else the server holding the device.
    pub server: u16,
}

/// Parse "aa:bb:cc:dd:ee:ff" (the model checked it on the way in).
pub fn parse_mac(s: &str) -> Option<MacAddr> {
    s.parse().ok()
}

/// Everything the data planes route by, for one database revision.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    pub revision: u64,
    vms: HashMap<u32, VmRoutes>,
    devices: HashMap<u32, Placement>,
    servers: HashMap<u16, MacAddr>,
    clients: HashMap<u16, MacAddr>,
    /// The database the table was built from: what a data plane derives
    /// its own state from when the table changes (not per frame).
    pub db: Arc<Db>,
}

impl RoutingTable {
    /// The table of `db` at `revision` (keeps a copy of `db`).
    pub fn build(db: &Db, revision: u64) -> RoutingTable {
        RoutingTable::from_db(Arc::new(db.clone()), revision)
    }

    /// The table of `db` at `revision`, keeping `db` itself.
    pub fn from_db(db: Arc<Db>, revision: u64) -> RoutingTable {
        let mut vms: HashMap<u32, VmRoutes> = HashMap::with_capacity(db.vms.len());
        for v in db.vms.values() {
            vms.insert(
                v.id,
                VmRoutes { client: v.client, owner: v.owner, moving_to: v.migrate_to, ..VmRoutes::default() },
            );
        }
        let mut devices = HashMap::with_capacity(db.devices.len());
        for d in db.devices.values() {
            devices.insert(d.id, Placement { server: d.server, shard: d.shard });
            if let Some(routes) = vms.get_mut(&d.vm) {
                for r in &d.ranges {
                    let route = Route { base: r.base, end: r.base.saturating_add(r.len), device: d.id };
                    if r.mmio {
                        routes.mmio.push(route);
                    } else {
                        routes.pio.push(route);
                    }
                }
            }
        }
        for r in vms.values_mut() {
            r.pio.sort_unstable_by_key(|x| x.base);
            r.mmio.sort_unstable_by_key(|x| x.base);
            r.pio.shrink_to_fit();
            r.mmio.shrink_to_fit();
        }
        let servers = db.servers.values().filter_map(|s| Some((s.id, parse_mac(&s.mac)?))).collect();
        let clients = db.clients.values().filter_map(|c| Some((c.id, parse_mac(&c.mac)?))).collect();
        RoutingTable { revision, vms, devices, servers, clients, db }
    }

    /// The device (and its server) holding `addr` in `vm`'s port or MMIO space.
    pub fn route(&self, vm: u32, mmio: bool, addr: u64) -> Option<Hit> {
        let routes = self.vms.get(&vm)?;
        let list = if mmio { &routes.mmio } else { &routes.pio };
        let at = list.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let r = list[at];
        if addr >= r.end {
            return None;
        }
        let p = self.devices.get(&r.device)?;
        Some(Hit { device: r.device, server: routes.owner.unwrap_or(p.server) })
    }

    /// Where `device` is.
    pub fn placement(&self, device: u32) -> Option<Placement> {
        self.devices.get(&device).copied()
    }

    /// The client platform `vm` runs on.
    pub fn client_of(&self, vm: u32) -> Option<u16> {
        self.vms.get(&vm).map(|r| r.client)
    }

    /// Whether client platform `client` may send for `vm`: it runs there,
    /// or is migrating there.
    pub fn may_send(&self, vm: u32, client: u16) -> bool {
        self.vms.get(&vm).is_some_and(|r| r.client == client || r.moving_to == Some(client))
    }

    /// The MAC of server `id`.
    pub fn server_mac(&self, id: u16) -> Option<MacAddr> {
        self.servers.get(&id).copied()
    }

    /// The MAC of client platform `id`.
    pub fn client_mac(&self, id: u16) -> Option<MacAddr> {
        self.clients.get(&id).copied()
    }

    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Heap bytes the table holds (its maps' capacities and the route lists).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        // hashbrown: one control byte per bucket beside each (key, value).
        let map = |cap: usize, entry: usize| cap * (entry + 1);
        let routes: usize =
            self.vms.values().map(|r| (r.pio.capacity() + r.mmio.capacity()) * size_of::<Route>()).sum();
        map(self.vms.capacity(), size_of::<(u32, VmRoutes)>())
            + map(self.devices.capacity(), size_of::<(u32, Placement)>())
            + map(self.servers.capacity() + self.clients.capacity(), size_of::<(u16, MacAddr)>())
            + routes
    }
}

/// The table a data plane routes by now; replaced whole when the database
/// moves on, while readers keep going.
#[derive(Debug)]
pub struct LiveRoutes {
    current: ArcSwap<RoutingTable>,
    /// The current table's revision: a loop checks it (one atomic load)
    /// and loads the table only when it moved.
    revision: AtomicU64,
}

impl LiveRoutes {
    pub fn new(table: RoutingTable) -> LiveRoutes {
        LiveRoutes { revision: AtomicU64::new(table.revision), current: ArcSwap::from_pointee(table) }
    }

    /// The revision of the current table.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// The current table (cheap: a reader's per-burst call).
    pub fn load(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// Put `table` in place; readers see it from their next load.
    pub fn swap(&self, table: RoutingTable) -> Arc<RoutingTable> {
        let revision = table.revision;
        let old = self.current.swap(Arc::new(table));
        self.revision.store(revision, Ordering::Release);
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{platform, uart};
    use crate::model::{Change, Device, Range, Server, ServerRole};

    /// The fixtures' VM 100 with a UART on server 10 and a register file
    /// on server 11, shard 3.
    fn db() -> Db {
        let mut changes = platform();
        changes.extend([
            Change::AddServer(Server { id: 11, mac: "02:00:00:00:00:0b".into(), role: ServerRole::Io }),
            Change::AddDevice(uart(1, 0x3f8)),
            Change::AddDevice(Device {
                id: 2,
                kind: "regfile".into(),
                server: 11,
                shard: 3,
                vm: 100,
                ranges: vec![
                    Range { mmio: true, base: 0xd000_0000, len: 0x1000 },
                    Range { mmio: false, base: 0x500, len: 0x100 },
                ],
                irqs: vec![],
                image: None,
            }),
        ]);
        let mut db = Db::default();
        db.apply(&changes).unwrap();
        db
    }

    #[test]
    fn lookups_follow_the_database() {
        let t = RoutingTable::build(&db(), 5);
        assert_eq!(t.route(100, false, 0x3fd), Some(Hit { device: 1, server: 10 }));
        assert_eq!(t.route(100, false, 0x400), None);
        assert_eq!(t.route(100, false, 0x5ff), Some(Hit { device: 2, server: 11 }));
        assert_eq!(t.route(100, true, 0xd000_0ff8), Some(Hit { device: 2, server: 11 }));
        assert_eq!(t.route(100, true, 0x3f8), None, "spaces apart");
        assert_eq!(t.route(101, false, 0x3f8), None, "unknown VM");
        assert_eq!(t.placement(2), Some(Placement { server: 11, shard: 3 }));
        assert_eq!(t.client_of(100), Some(1));
        assert!(t.heap_bytes() > 0);
    }

    #[test]
    fn a_swap_reaches_readers_that_still_hold_the_old_table_unharmed() {
        let mut d = db();
        let live = LiveRoutes::new(RoutingTable::build(&d, 1));
        let held = live.load();
        let moved = d.devices[&1].clone();
        d.apply(&[Change::UpdateDevice(Device { server: 11, ..moved })]).unwrap();
        live.swap(RoutingTable::build(&d, 2));
        assert_eq!(held.route(100, false, 0x3f8).unwrap().server, 10, "the old table is intact");
        let now = live.load();
        assert_eq!((now.revision, now.route(100, false, 0x3f8).unwrap().server), (2, 11));
    }
}
