//! Where the database lives. [`Store`] is what the control panel, the
//! servers and the clients use; [`RedbStore`] is the default: one crash-safe
//! file (redb: copy-on-write B-trees, ACID transactions), nothing to install.
//!
//! Every commit checks its changes against the stored database inside the
//! same write transaction, so two writers can never both get a conflicting
//! change in; each commit bumps the revision that watchers poll.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::{Change, Conflict, Db};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("The store {store}: {what}")]
    Backend { store: String, what: String },
}

/// A database of client platforms, servers, VMs and devices.
pub trait Store: Send + Sync {
    /// The database as stored now.
    fn load(&self) -> Result<Db, StoreError>;
    /// Check and apply `changes`, all or nothing; returns the new revision
    /// and what changed, a line each.
    fn commit(&self, changes: &[Change]) -> Result<(u64, Vec<String>), StoreError>;
    /// Bumped by every commit: watchers reload when it moves.
    fn revision(&self) -> Result<u64, StoreError>;
    /// Where it is, for messages ("redb file /var/lib/...", "etcd at ...").
    fn describe(&self) -> String;
    /// Keep a saved state in transit — a device model moving to another
    /// server ("device/<id>"), a VM moving to another client platform
    /// ("vm/<id>") — until the receiver takes it (not a record: the
    /// revision stays).
    fn put_state(&self, key: &str, state: &[u8]) -> Result<(), StoreError>;
    /// Read and delete the saved state under `key`, if there is one.
    fn take_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

/// Records by key (the same keys in every store): "client/<id>", "server/<id>", "vm/<id>", "device/<id>"; JSON values.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Saved device-model states in transit, by device id.
const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");

fn key(change: &Change) -> String {
    match change {
        Change::AddClient(c) => format!("client/{}", c.id),
        Change::RemoveClient(id) => format!("client/{id}"),
        Change::AddServer(s) => format!("server/{}", s.id),
        Change::RemoveServer(id) => format!("server/{id}"),
        Change::AddVm(v) | Change::UpdateVm(v) => format!("vm/{}", v.id),
        Change::RemoveVm(id) => format!("vm/{id}"),
        Change::AddDevice(d) | Change::UpdateDevice(d) => format!("device/{}", d.id),
        Change::RemoveDevice(id) => format!("device/{id}"),
    }
}
/// The record a change writes (None: it removes one).
fn value(change: &Change) -> Option<Vec<u8>> {
    let json = match change {
        Change::AddClient(c) => serde_json::to_vec(c),
        Change::AddServer(s) => serde_json::to_vec(s),
        Change::AddVm(v) | Change::UpdateVm(v) => serde_json::to_vec(v),
        Change::AddDevice(d) | Change::UpdateDevice(d) => serde_json::to_vec(d),
        _ => return None,
    };
    Some(json.expect("records serialise"))
}

/// Add the record stored at `k` to `db`; `Err` names what is wrong with it.
pub(crate) fn read_record(db: &mut Db, k: &str, v: &[u8]) -> Result<(), String> {
    let bad = |e: serde_json::Error| format!("record {k} is corrupt: {e}");
    match k.split_once('/') {
        Some(("client", _)) => {
            let c: crate::model::ClientPlatform = serde_json::from_slice(v).map_err(bad)?;
            db.clients.insert(c.id, c);
        }
        Some(("server", _)) => {
            let s: crate::model::Server = serde_json::from_slice(v).map_err(bad)?;
            db.servers.insert(s.id, s);
        }
        Some(("vm", _)) => {
            let m: crate::model::Vm = serde_json::from_slice(v).map_err(bad)?;
            db.vms.insert(m.id, m);
        }
        Some(("device", _)) => {
            let d: crate::model::Device = serde_json::from_slice(v).map_err(bad)?;
            db.devices.insert(d.id, d);
        }
        _ => return Err(format!("unknown record {k}")),
    }
    Ok(())
}

/// The writes of a checked batch: (key, Some(record)) to put, (key, None) to delete.
pub(crate) fn writes(changes: &[Change]) -> Vec<(String, Option<Vec<u8>>)> {
    changes.iter().map(|c| (key(c), value(c))).collect()
}

/// How long an operation waits for another process holding the redb file.
const REDB_BUSY_WAIT: Duration = Duration::from_secs(5);

/// The embedded store: one redb file.
///
/// redb lets one process open a file at a time, and the servers, clients
/// and `dmfabric ctl` of a host share it, so every operation opens the file,
/// does its work and closes it (an open is a header read: tens of µs),
/// waiting up to [`REDB_BUSY_WAIT`] while another process has it.
pub struct RedbStore {
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish()
    }
}

impl RedbStore {
    /// The store at `path`, created if needed (checked now: a file that is
    /// not a store is an error here, not at the first watch).
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let s = RedbStore { path: path.to_path_buf() };
        drop(s.db()?);
        Ok(s)
    }

    fn err(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Backend { store: self.path.display().to_string(), what: what.to_string() }
    }

    fn db(&self) -> Result<Database, StoreError> {
        let start = Instant::now();
        loop {
            match Database::create(&self.path) {
                Ok(db) => return Ok(db),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < REDB_BUSY_WAIT => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(self.err(format!("cannot open it: {e}"))),
            }
        }
    }

    fn read_db(&self, table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Db, StoreError> {
        let mut db = Db::default();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            read_record(&mut db, k.value(), v.value()).map_err(|e| self.err(e))?;
        }
        Ok(db)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Db, StoreError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        match tx.open_table(RECORDS) {
            Ok(t) => self.read_db(&t),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Db::default()),
            Err(e) => Err(self.err(e)),
        }
    }

    fn commit(&self, changes: &[Change]) -> Result<(u64, Vec<String>), StoreError> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        let revision;
        let said;
        {
            let mut records = tx.open_table(RECORDS).map_err(|e| self.err(e))?;
            let mut db = self.read_db(&records)?;
            said = db.apply(changes)?;
            for (k, v) in writes(changes) {
                match v {
                    Some(v) => {
                        records.insert(k.as_str(), v.as_slice()).map_err(|e| self.err(e))?;
                    }
                    None => {
                        records.remove(k.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            revision = meta.get("revision").map_err(|e| self.err(e))?.map_or(0, |v| v.value()) + 1;
            meta.insert("revision", revision).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok((revision, said))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        match tx.open_table(META) {
            Ok(t) => Ok(t.get("revision").map_err(|e| self.err(e))?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }

    fn describe(&self) -> String {
        format!("redb file {}", self.path.display())
    }

    fn put_state(&self, key: &str, state: &[u8]) -> Result<(), StoreError> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        tx.open_table(STATES).map_err(|e| self.err(e))?.insert(key, state).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    fn take_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        // Receivers ask often: look first, write (and fsync) only to take.
        {
            let rx = db.begin_read().map_err(|e| self.err(e))?;
            match rx.open_table(STATES) {
                Ok(t) if t.get(key).map_err(|e| self.err(e))?.is_some() => {}
                Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(self.err(e)),
            }
        }
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        let state = {
            let mut t = tx.open_table(STATES).map_err(|e| self.err(e))?;
            let v = t.remove(key).map_err(|e| self.err(e))?;
            v.map(|v| v.value().to_vec())
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(state)
    }
}

/// Where `dmfabric ctl`, servers and clients look by default.
pub const DEFAULT_STORE: &str = "/var/lib/dmfabric/control.redb";

/// Open the store named by `spec`: `etcd://HOST:PORT[,HOST:PORT...]` for
/// etcd, anything else is the path of a redb file.
pub fn open(spec: &str) -> Result<Box<dyn Store>, StoreError> {
    match spec.strip_prefix("etcd://") {
        Some(endpoints) => Ok(Box::new(crate::etcd::EtcdStore::connect(endpoints)?)),
        None => {
            let path = Path::new(spec);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend {
                    store: path.display().to_string(),
                    what: format!("cannot create {}: {e}", dir.display()),
                })?;
            }
            Ok(Box::new(RedbStore::open(path)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_store_is_a_clear_error() {
        let p = std::env::temp_dir().join(format!("dmfabric-store-garbage-{}.redb", std::process::id()));
        std::fs::write(&p, b"not a database").unwrap();
        let err = RedbStore::open(&p).unwrap_err().to_string();
        assert!(err.starts_with(&format!("The store {}: cannot open it", p.display())), "{err}");
        let _ = std::fs::remove_file(&p);
    }
}
