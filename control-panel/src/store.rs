//! Where the database lives. [`Store`] is what the control panel, the
//! servers and the clients use; [`RedbStore`] is the default: one crash-safe
//! file (redb: copy-on-write B-trees, ACID transactions), nothing to install.
//!
//! Every commit checks its changes against the stored database inside the
//! same write transaction, so two writers can never both get a conflicting
//! change in; each commit bumps the revision that watchers poll.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::{Change, Conflict, Db};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("The store {path}: {what}")]
    Backend { path: PathBuf, what: String },
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
}

/// Records by key: "client/<id>", "server/<id>", "vm/<id>", "device/<id>"; JSON values.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The embedded store: one redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish()
    }
}

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

impl RedbStore {
    /// Open the store at `path`, creating it if needed.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend { path: path.to_path_buf(), what: format!("cannot open it: {e}") })?;
        Ok(RedbStore { db, path: path.to_path_buf() })
    }

    fn err(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Backend { path: self.path.clone(), what: what.to_string() }
    }

    fn read_db(&self, table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Db, StoreError> {
        let mut db = Db::default();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (k, v) = (k.value(), v.value());
            let bad = |e: serde_json::Error| self.err(format!("record {k} is corrupt: {e}"));
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
                _ => return Err(self.err(format!("unknown record {k}"))),
            }
        }
        Ok(db)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Db, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        match tx.open_table(RECORDS) {
            Ok(t) => self.read_db(&t),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Db::default()),
            Err(e) => Err(self.err(e)),
        }
    }

    fn commit(&self, changes: &[Change]) -> Result<(u64, Vec<String>), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let revision;
        let said;
        {
            let mut records = tx.open_table(RECORDS).map_err(|e| self.err(e))?;
            let mut db = self.read_db(&records)?;
            said = db.apply(changes)?;
            for c in changes {
                let k = key(c);
                match value(c) {
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
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        match tx.open_table(META) {
            Ok(t) => Ok(t.get("revision").map_err(|e| self.err(e))?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{platform, uart};

    fn path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dmfabric-store-{name}-{}.redb", std::process::id()))
    }

    fn setup() -> Vec<Change> {
        let mut changes = platform();
        changes.push(Change::AddDevice(uart(1, 0x3f8)));
        changes
    }

    #[test]
    fn commits_survive_reopening_and_conflicts_change_nothing() {
        let p = path("reopen");
        let _ = std::fs::remove_file(&p);
        {
            let s = RedbStore::open(&p).unwrap();
            assert_eq!((s.revision().unwrap(), s.load().unwrap()), (0, Db::default()));
            let (rev, said) = s.commit(&setup()).unwrap();
            assert_eq!((rev, said.len()), (1, 4));
            let err = s.commit(&[Change::RemoveServer(10)]).unwrap_err();
            assert!(err.to_string().contains("still used by device 1"), "{err}");
            assert_eq!(s.revision().unwrap(), 1, "a refused commit bumps nothing");
        }
        let s = RedbStore::open(&p).unwrap();
        let db = s.load().unwrap();
        assert_eq!((db.clients.len(), db.servers.len(), db.vms.len(), db.devices.len()), (1, 1, 1, 1));
        assert_eq!(db.devices[&1].ranges[0].base, 0x3f8);
        let (rev, _) = s.commit(&[Change::RemoveDevice(1), Change::RemoveServer(10)]).unwrap();
        assert_eq!(rev, 2);
        assert!(s.load().unwrap().devices.is_empty());
        drop(s);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_file_that_is_not_a_store_is_a_clear_error() {
        let p = path("garbage");
        std::fs::write(&p, b"not a database").unwrap();
        let err = RedbStore::open(&p).unwrap_err().to_string();
        assert!(err.starts_with(&format!("The store {}: cannot open it", p.display())), "{err}");
        let _ = std::fs::remove_file(&p);
    }
}
