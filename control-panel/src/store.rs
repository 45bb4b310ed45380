//! Where the database lives. [`Store`] is what the control panel, the
//! servers and the clients use; [`RedbStore`] is the default: one crash-safe
//! file (redb: copy-on-write B-trees, ACID transactions), nothing to install.
//!
//! Every commit checks its changes against the stored database inside the
//! same write transaction, so two writers can never both get a conflicting
//! change in; each commit bumps the revision that followers read.
//!
//! Followers are told of changes, not left to poll ([`Store::subscribe`]):
//! a redb writer pokes a file beside the store (`<file>.changed`) after each
//! commit, key change or state put, and followers wait on it with inotify
//! (the store file itself will not do: every open, a read's too, writes
//! its header); etcd has its watch API ([`crate::etcd`]).
//!
//! Besides the records, a store keeps secrets that are never part of
//! [`Db`] (what [`Store::load`] returns, what `dmfabric ctl ls` prints):
//! each client platform's keys ([`Store::client_keys`]) and the cluster
//! key ([`Store::cluster_key`]), which seals states in transit
//! ([`crate::seal`]: callers of [`Store::put_state`] and
//! [`Store::take_state`] see plain bytes). The redb file is created 0600 and
//! a directory made for it 0700, since it holds those secrets; every record
//! read back is checked ([`read_record`]).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmfabric_wire::auth::Secret;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::keys::ClientKeys;
use crate::model::{Change, Conflict, Db, MAX_RECORD_BYTES};
use crate::seal::{SealError, StateKey, StateKeyCache, STATE_TTL};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("The store {store}: {what}")]
    Backend { store: String, what: String },
    /// A state in transit that was taken (it is gone) but refused.
    #[error("The store {store}: state {key}: {error}")]
    State { store: String, key: String, error: SealError },
}

/// What a store tells a follower that subscribed ([`Store::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poke {
    /// The store may have changed (a commit, a key change, a state put in
    /// the part subscribed to): read it.
    Changed,
    /// The store changed and its revision is now at least this: a
    /// follower already at it has only a state in transit to look at (no
    /// need to read the records).
    At(u64),
    /// Notifications stopped (etcd went away): poll until the next
    /// [`Poke::Changed`], which comes when they are back.
    Lost(String),
}

/// Where a subscription's pokes go (called on its own thread).
pub type PokeFn = Arc<dyn Fn(Poke) + Send + Sync>;

/// A running subscription ([`Store::subscribe`]): its thread, stopped and
/// joined on drop.
pub struct Subscription {
    stop: Option<Box<dyn FnOnce() + Send>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// `thread`, stopped by `stop` (which must make it return soon).
    pub fn new(stop: impl FnOnce() + Send + 'static, thread: JoinHandle<()>) -> Subscription {
        Subscription { stop: Some(Box::new(stop)), thread: Some(thread) }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
    /// The database and its revision, read together (one read where the
    /// store can: they match).
    fn load_with_revision(&self) -> Result<(u64, Db), StoreError> {
        let revision = self.revision()?;
        Ok((revision, self.load()?))
    }
    /// Where it is, for messages ("redb file /var/lib/...", "etcd at ...").
    fn describe(&self) -> String;
    /// Keep a saved state in transit — a device model moving to another
    /// server ("device/<id>"), a VM moving to another client platform
    /// ("vm/<id>") — until the receiver takes it (not a record: the
    /// revision stays).
    fn put_state(&self, key: &str, state: &[u8]) -> Result<(), StoreError>;
    /// Read and delete the saved state under `key`, if there is one. A
    /// state that was altered, sealed under another cluster key or left
    /// longer than [`STATE_TTL`] is taken and refused
    /// ([`StoreError::State`] says which).
    fn take_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The keys of client platform `client`, if it has any (checked as
    /// they are read: a corrupt set is an error).
    fn client_keys(&self, client: u16) -> Result<Option<ClientKeys>, StoreError>;
    /// Store the keys of `keys.client`, replacing what it had; bumps the
    /// revision, so watchers reload. Refused for a client platform without
    /// a record, and for a key set that makes no sense.
    fn put_client_keys(&self, keys: &ClientKeys) -> Result<u64, StoreError>;
    /// The cluster's secret (states in transit are sealed under a key
    /// derived from it): created at random on first use, then stored.
    fn cluster_key(&self) -> Result<Secret, StoreError>;
    /// Bring the store's access rules in line with the records, after a
    /// commit: which etcd user may read which client platform's keys
    /// (`etcd`'s grants). Returns what changed, a line each. The embedded
    /// store has no users (its file's mode is its access control).
    fn sync_access(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    /// Call `tell` (on a thread of the subscription's own) whenever the
    /// store may have changed: every commit and key change, and states put
    /// under `states` ("device/", "vm/": those a follower waits for). Each
    /// change is told at least once after the last read this store made
    /// before subscribing. `None`: this store cannot tell; poll it.
    fn subscribe(&self, states: Option<&str>, tell: PokeFn) -> Result<Option<Subscription>, StoreError> {
        let _ = (states, tell);
        Ok(None)
    }
}

/// Records by key (the same keys in every store): "client/<id>", "server/<id>", "vm/<id>", "device/<id>"; JSON values.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Sealed states in transit, by name ("device/<id>", "vm/<id>").
const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");
/// Secrets: "client/<id>" (a [`ClientKeys`] as JSON) and "cluster" (64 hex digits).
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");

/// The client platforms whose records `changes` remove (their keys go too).
pub(crate) fn removed_clients(changes: &[Change]) -> Vec<u16> {
    changes.iter().filter_map(|c| if let Change::RemoveClient(id) = c { Some(*id) } else { None }).collect()
}

/// Parse a stored cluster key, named `what` in errors.
pub(crate) fn parse_cluster_key(what: &str, v: &[u8]) -> Result<Secret, String> {
    std::str::from_utf8(v)
        .map_err(|_| "not text".to_string())
        .and_then(|t| Secret::from_hex(t).map_err(|e| e.to_string()))
        .map_err(|e| format!("{what} is corrupt: {e}"))
}

/// Seconds since the Unix epoch, now (states in transit carry an expiry).
fn now_unix() -> u64 {
    crate::keys::now_unix()
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

/// Add the record stored at `k` to `db`; `Err` names what is wrong with it.
///
/// Every record is checked as it is read: its size before it is parsed
/// ([`MAX_RECORD_BYTES`]), then its fields (`validate` of its type: string
/// lengths, ranges, overflow), and that it is the record its key names.
pub(crate) fn read_record(db: &mut Db, k: &str, v: &[u8]) -> Result<(), String> {
    use crate::model::{ClientPlatform, Device, Server, Vm};
    let shown: String = k.chars().take(64).collect();
    if v.len() > MAX_RECORD_BYTES {
        return Err(format!(
            "record {shown} is corrupt: {} bytes, more than a record may be ({MAX_RECORD_BYTES})",
            v.len()
        ));
    }
    let bad = |e: &dyn std::fmt::Display| format!("record {shown} is corrupt: {e}");
    let Some((kind, id)) = k.split_once('/') else { return Err(format!("unknown record {shown}")) };
    let id: u64 = id.parse().map_err(|_| format!("unknown record {shown}"))?;
    let named = |what: &str, got: u64| {
        if got == id {
            Ok(())
        } else {
            Err(format!("record {shown} is corrupt: it holds {what} {got}"))
        }
    };
    match kind {
        "client" => {
            let c: ClientPlatform = serde_json::from_slice(v).map_err(|e| bad(&e))?;
            named("client platform", c.id.into())?;
            c.validate().map_err(|e| bad(&e))?;
            db.clients.insert(c.id, c);
        }
        "server" => {
            let s: Server = serde_json::from_slice(v).map_err(|e| bad(&e))?;
            named("server", s.id.into())?;
            s.validate().map_err(|e| bad(&e))?;
            db.servers.insert(s.id, s);
        }
        "vm" => {
            let m: Vm = serde_json::from_slice(v).map_err(|e| bad(&e))?;
            named("VM", m.id.into())?;
            m.validate().map_err(|e| bad(&e))?;
            db.vms.insert(m.id, m);
        }
        "device" => {
            let d: Device = serde_json::from_slice(v).map_err(|e| bad(&e))?;
            named("device", d.id.into())?;
            d.validate().map_err(|e| bad(&e))?;
            db.devices.insert(d.id, d);
        }
        _ => return Err(format!("unknown record {shown}")),
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
///
/// The file holds client platforms' keys and the cluster key: it is
/// created 0600, and one found readable by others is narrowed to 0600
/// (with a warning) when the store is opened.
pub struct RedbStore {
    path: PathBuf,
    /// The key states are sealed with, once read.
    state_key: StateKeyCache,
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
        let s = RedbStore { path: path.to_path_buf(), state_key: StateKeyCache::default() };
        drop(s.db()?);
        s.narrow_mode()?;
        Ok(s)
    }

    fn err(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Backend { store: self.path.display().to_string(), what: what.to_string() }
    }

    /// A file group or others may reach becomes 0600: it holds secrets.
    fn narrow_mode(&self) -> Result<(), StoreError> {
        let meta = std::fs::metadata(&self.path).map_err(|e| self.err(format!("cannot stat it: {e}")))?;
        let mode = meta.mode() & 0o7777;
        if meta.is_file() && mode & 0o077 != 0 {
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| self.err(format!("it is mode {mode:04o} and holds keys; cannot make it 0600: {e}")))?;
            tracing::warn!(store = %self.path.display(), "the store was mode {mode:04o}: made it 0600 (it holds keys)");
        }
        Ok(())
    }

    fn db(&self) -> Result<Database, StoreError> {
        let start = Instant::now();
        loop {
            // Created 0600 (redb's own create would use the umask's 0644).
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&self.path)
                .map_err(|e| self.err(format!("cannot open it: {e}")))?;
            match Database::builder().create_file(file) {
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

    /// The next revision, written in `tx`.
    fn bump(&self, tx: &redb::WriteTransaction) -> Result<u64, StoreError> {
        let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
        let revision = meta.get("revision").map_err(|e| self.err(e))?.map_or(0, |v| v.value()) + 1;
        meta.insert("revision", revision).map_err(|e| self.err(e))?;
        Ok(revision)
    }

    fn state_key(&self) -> Result<StateKey, StoreError> {
        self.state_key.get(|| self.cluster_key())
    }

    /// The file writers poke after a change: `<store file>.changed`.
    pub fn changed_file(&self) -> PathBuf {
        let (dir, name) = watched(&self.path);
        dir.join(name)
    }

    /// Tell followers the store changed and is at `revision`: written
    /// after the commit while `_db` (the file's lock) is still held, so
    /// that pokes are written in commit order and the last one names the
    /// latest revision. Best effort: a follower that misses it sees the
    /// change at its next check.
    fn poke(&self, revision: u64, _db: &Database) {
        let file = self.changed_file();
        let wrote = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("revision {revision}\n").as_bytes()));
        if let Err(e) = wrote {
            tracing::warn!(
                store = %self.path.display(),
                "cannot poke {} ({e}): followers see this change only at their next check (make the directory writable)",
                file.display()
            );
        }
    }
}

/// The revision a poke file names ("revision N"), if it names one.
fn poked_revision(path: &Path) -> Option<u64> {
    let text = std::fs::read(path).ok()?;
    std::str::from_utf8(text.get(..64.min(text.len()))?).ok()?.trim().strip_prefix("revision ")?.parse().ok()
}

/// The directory a redb store's followers watch, and the name of the file
/// its writers poke there.
fn watched(path: &Path) -> (PathBuf, std::ffi::OsString) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".changed");
    (dir, name)
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
            let gone = removed_clients(changes);
            if !gone.is_empty() {
                let mut keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
                for id in gone {
                    keys.remove(format!("client/{id}").as_str()).map_err(|e| self.err(e))?;
                }
            }
        }
        let revision = self.bump(&tx)?;
        tx.commit().map_err(|e| self.err(e))?;
        self.poke(revision, &db);
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

    fn load_with_revision(&self) -> Result<(u64, Db), StoreError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let revision = match tx.open_table(META) {
            Ok(t) => t.get("revision").map_err(|e| self.err(e))?.map_or(0, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(self.err(e)),
        };
        let records = match tx.open_table(RECORDS) {
            Ok(t) => self.read_db(&t)?,
            Err(redb::TableError::TableDoesNotExist(_)) => Db::default(),
            Err(e) => return Err(self.err(e)),
        };
        Ok((revision, records))
    }

    fn describe(&self) -> String {
        format!("redb file {}", self.path.display())
    }

    fn put_state(&self, key: &str, state: &[u8]) -> Result<(), StoreError> {
        let sealed = self
            .state_key()?
            .seal(key, state, now_unix() + STATE_TTL.as_secs())
            .map_err(|error| StoreError::State { store: self.describe(), key: key.to_string(), error })?;
        let db = self.db()?;
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        tx.open_table(STATES).map_err(|e| self.err(e))?.insert(key, sealed.as_slice()).map_err(|e| self.err(e))?;
        let revision = match tx.open_table(META) {
            Ok(t) => t.get("revision").map_err(|e| self.err(e))?.map_or(0, |v| v.value()),
            Err(e) => return Err(self.err(e)),
        };
        tx.commit().map_err(|e| self.err(e))?;
        self.poke(revision, &db);
        Ok(())
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
        let sealed = {
            let mut t = tx.open_table(STATES).map_err(|e| self.err(e))?;
            let v = t.remove(key).map_err(|e| self.err(e))?;
            v.map(|v| v.value().to_vec())
        };
        tx.commit().map_err(|e| self.err(e))?;
        drop(db);
        let Some(sealed) = sealed else { return Ok(None) };
        let state = self.state_key()?.open(key, sealed, now_unix()).map_err(|error| StoreError::State {
            store: self.describe(),
            key: key.to_string(),
            error,
        })?;
        Ok(Some(state))
    }

    fn client_keys(&self, client: u16) -> Result<Option<ClientKeys>, StoreError> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = match tx.open_table(KEYS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let k = format!("client/{client}");
        let Some(v) = t.get(k.as_str()).map_err(|e| self.err(e))? else { return Ok(None) };
        ClientKeys::from_stored(client, v.value()).map(Some).map_err(|e| self.err(e))
    }

    fn put_client_keys(&self, keys: &ClientKeys) -> Result<u64, StoreError> {
        keys.check().map_err(|e| self.err(e))?;
        let db = self.db()?;
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        {
            let records = tx.open_table(RECORDS).map_err(|e| self.err(e))?;
            if records.get(format!("client/{}", keys.client).as_str()).map_err(|e| self.err(e))?.is_none() {
                return Err(Conflict::Missing { what: "client platform", id: keys.client.into() }.into());
            }
            let mut t = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            t.insert(format!("client/{}", keys.client).as_str(), keys.to_json().as_slice()).map_err(|e| self.err(e))?;
        }
        let revision = self.bump(&tx)?;
        tx.commit().map_err(|e| self.err(e))?;
        self.poke(revision, &db);
        Ok(revision)
    }

    fn cluster_key(&self) -> Result<Secret, StoreError> {
        let db = self.db()?;
        {
            let rx = db.begin_read().map_err(|e| self.err(e))?;
            match rx.open_table(KEYS) {
                Ok(t) => {
                    if let Some(v) = t.get("cluster").map_err(|e| self.err(e))? {
                        return parse_cluster_key("the cluster key", v.value()).map_err(|e| self.err(e));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        // First use: make it, unless another process just did.
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        let key = {
            let mut t = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            let stored = t.get("cluster").map_err(|e| self.err(e))?.map(|v| v.value().to_vec());
            match stored {
                Some(v) => parse_cluster_key("the cluster key", &v).map_err(|e| self.err(e))?,
                None => {
                    let key = crate::keys::random_secret().map_err(|e| self.err(e))?;
                    t.insert("cluster", key.to_hex().as_bytes()).map_err(|e| self.err(e))?;
                    key
                }
            }
        };
        tx.commit().map_err(|e| self.err(e))?;
        Ok(key)
    }

    /// inotify on the store's directory, for the file writers poke
    /// ([`RedbStore::changed_file`]); every state put pokes it, so
    /// `states` needs no filter here.
    fn subscribe(&self, _states: Option<&str>, tell: PokeFn) -> Result<Option<Subscription>, StoreError> {
        use inotify::{EventMask, Inotify, WatchMask};
        let (dir, name) = watched(&self.path);
        let file = dir.join(&name);
        let cannot = |e: std::io::Error| {
            self.err(format!("cannot watch {} for changes (inotify: {e}); see /proc/sys/fs/inotify/max_user_instances and max_user_watches", dir.display()))
        };
        let mut inotify = Inotify::init().map_err(cannot)?;
        let mut watches = inotify.watches();
        let wd = watches.add(&dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO).map_err(cannot)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let store = self.describe();
        let thread = std::thread::Builder::new()
            .name("store-notify".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let events = match inotify.read_events_blocking(&mut buf) {
                        Ok(events) => events,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tell(Poke::Lost(format!("The store {store}: its change notification failed: {e}")));
                            return;
                        }
                    };
                    if stopped.load(Ordering::Acquire) {
                        return;
                    }
                    let mut changed = false;
                    let mut gone = false;
                    for ev in events {
                        // An overflowed queue may have lost a poke.
                        changed |= ev.name == Some(name.as_os_str()) || ev.mask.contains(EventMask::Q_OVERFLOW);
                        gone |= ev.mask.contains(EventMask::IGNORED);
                    }
                    if changed {
                        tell(poked_revision(&file).map_or(Poke::Changed, Poke::At));
                    }
                    if gone {
                        tell(Poke::Lost(format!("The store {store}: its directory went away")));
                        return;
                    }
                }
            })
            .map_err(|e| self.err(format!("cannot start its change notification: {e}")))?;
        // Removing the watch wakes the blocked read (IN_IGNORED).
        Ok(Some(Subscription::new(
            move || {
                stop.store(true, Ordering::Release);
                let _ = watches.remove(wd);
            },
            thread,
        )))
    }
}

/// Where `dmfabric ctl`, servers and clients look by default.
pub const DEFAULT_STORE: &str = "/var/lib/dmfabric/control.redb";

/// Open the store named by `spec`:
///
/// - `etcds://HOST:PORT[,HOST:PORT...]?ca=PATH&cert=PATH&key=PATH`: etcd
///   over TLS, this host's client certificate (its CN is its etcd user)
///   and the CA that signed etcd's; without the query, the paths come from
///   `DMFABRIC_ETCD_CA`, `DMFABRIC_ETCD_CERT` and `DMFABRIC_ETCD_KEY`;
/// - `etcd://HOST:PORT[,HOST:PORT...]`: etcd over plain http, no
///   authentication (local tests);
/// - anything else: the path of a redb file, created 0600 if missing (and
///   its directory 0700).
pub fn open(spec: &str) -> Result<Box<dyn Store>, StoreError> {
    if spec.starts_with("etcd://") || spec.starts_with("etcds://") {
        let target = crate::etcd::EtcdSpec::parse(spec)?;
        return Ok(Box::new(crate::etcd::EtcdStore::connect_spec(&target)?));
    }
    let path = Path::new(spec);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| StoreError::Backend {
            store: path.display().to_string(),
            what: format!("cannot create {}: {e}", dir.display()),
        })?;
    }
    Ok(Box::new(RedbStore::open(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::platform;

    /// A redb file of a test's own in a directory of its own, removed on drop.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str) -> Tmp {
            let d = std::env::temp_dir().join(format!("dmfabric-store-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            Tmp(d)
        }
        fn file(&self) -> PathBuf {
            self.0.join("sub/control.redb")
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_file_that_is_not_a_store_is_a_clear_error() {
        let p = std::env::temp_dir().join(format!("dmfabric-store-garbage-{}.redb", std::process::id()));
        std::fs::write(&p, b"not a database").unwrap();
        let err = RedbStore::open(&p).unwrap_err().to_string();
        assert!(err.starts_with(&format!("The store {}: cannot open it", p.display())), "{err}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn the_file_is_0600_and_its_new_directories_0700() {
        let t = Tmp::new("modes");
        let s = open(t.file().to_str().unwrap()).unwrap();
        s.commit(&platform()).unwrap();
        assert_eq!(mode(&t.file()), 0o600);
        assert_eq!(mode(t.file().parent().unwrap()), 0o700);
        assert_eq!(mode(&t.0), 0o700, "every directory it made");
        // One left readable by others is narrowed when opened.
        std::fs::set_permissions(t.file(), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open(t.file().to_str().unwrap()).unwrap());
        assert_eq!(mode(&t.file()), 0o600);
    }

    #[test]
    fn client_keys_stay_out_of_the_records_and_go_with_their_client() {
        let t = Tmp::new("keys");
        let s = open(t.file().to_str().unwrap()).unwrap();
        let k = ClientKeys::generate(1).unwrap();
        let e = s.put_client_keys(&k).unwrap_err().to_string();
        assert_eq!(e, "client platform 1 does not exist");
        let (rev, _) = s.commit(&platform()).unwrap();
        assert_eq!(s.client_keys(1).unwrap(), None);
        assert_eq!(s.put_client_keys(&k).unwrap(), rev + 1, "a key change bumps the revision");
        assert_eq!(s.client_keys(1).unwrap(), Some(k.clone()));
        let db = s.load().unwrap();
        let text = serde_json::to_string(&db).unwrap();
        assert!(!text.contains(&k.keys[0].secret.to_hex()), "never part of the records");
        let bad = ClientKeys { send: 9, ..k.clone() };
        assert!(s.put_client_keys(&bad).unwrap_err().to_string().contains("sends with key 9"));
        // Removing the client removes its keys.
        s.commit(&[Change::RemoveVm(100), Change::RemoveClient(1)]).unwrap();
        assert_eq!(s.client_keys(1).unwrap(), None);
    }

    #[test]
    fn the_cluster_key_is_made_once() {
        let t = Tmp::new("cluster");
        let s = open(t.file().to_str().unwrap()).unwrap();
        let k = s.cluster_key().unwrap();
        assert_eq!(s.cluster_key().unwrap(), k);
        assert_eq!(open(t.file().to_str().unwrap()).unwrap().cluster_key().unwrap(), k, "stored");
        assert_eq!(s.revision().unwrap(), 0, "not a record");
    }

    #[test]
    fn states_are_sealed_at_rest_and_refused_when_altered() {
        let t = Tmp::new("sealed");
        let s = RedbStore::open(&{
            std::fs::create_dir_all(t.file().parent().unwrap()).unwrap();
            t.file()
        })
        .unwrap();
        let state = b"the device's registers, in the clear".to_vec();
        s.put_state("device/1", &state).unwrap();
        let raw = |f: &dyn Fn(&mut Vec<u8>)| {
            let db = s.db().unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut table = tx.open_table(STATES).unwrap();
                let mut v = table.get("device/1").unwrap().unwrap().value().to_vec();
                f(&mut v);
                table.insert("device/1", v.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        };
        raw(&|v| assert!(v.windows(state.len()).all(|w| w != &state[..]), "not in the clear"));
        assert_eq!(s.take_state("device/1").unwrap(), Some(state.clone()));
        assert_eq!(s.take_state("device/1").unwrap(), None, "taken once");

        s.put_state("device/1", &state).unwrap();
        raw(&|v| {
            let last = v.len() - 1;
            v[last] ^= 1;
        });
        let e = s.take_state("device/1").unwrap_err();
        assert!(matches!(e, StoreError::State { error: SealError::Tampered, .. }), "{e}");
        assert!(e.to_string().contains("state device/1: it was altered or corrupted in transit"), "{e}");
        assert_eq!(s.take_state("device/1").unwrap(), None, "a refused state is gone too");

        // Sealed under another cluster's key.
        let other = StateKey::new(&crate::keys::random_secret().unwrap());
        let foreign = other.seal("vm/5", &state, now_unix() + 60).unwrap();
        s.put_state("vm/5", b"x").unwrap();
        raw_put(&s, "vm/5", &foreign);
        let e = s.take_state("vm/5").unwrap_err();
        assert!(matches!(e, StoreError::State { error: SealError::WrongKey, .. }), "{e}");
        // Expired.
        let k = s.state_key().unwrap();
        raw_put(&s, "vm/5", &k.seal("vm/5", &state, now_unix() - 1).unwrap());
        let e = s.take_state("vm/5").unwrap_err();
        assert!(matches!(e, StoreError::State { error: SealError::Expired { .. }, .. }), "{e}");
    }

    fn raw_put(s: &RedbStore, key: &str, v: &[u8]) {
        let db = s.db().unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(STATES).unwrap().insert(key, v).unwrap();
        tx.commit().unwrap();
    }

    #[test]
    fn hostile_records_are_clear_errors() {
        let mut db = Db::default();
        let read = |db: &mut Db, k: &str, v: &str| read_record(db, k, v.as_bytes()).unwrap_err();
        let vm = |extra: &str| {
            format!(r#"{{"id":5,"client":1,"vcpus":1,"memory_mib":4,"image":"io_loop","state":"defined"{extra}}}"#)
        };
        assert!(read_record(&mut db, "vm/5", vm("").as_bytes()).is_ok());
        assert_eq!(read(&mut db, "vm/6", &vm("")), "record vm/6 is corrupt: it holds VM 5");
        let e = read(&mut db, "vm/5", &vm("").replace("\"vcpus\":1", "\"vcpus\":1000"));
        assert_eq!(e, "record vm/5 is corrupt: VM 5: vcpus must be 1 to 255, not 1000");
        let e = read(&mut db, "vm/5", &vm("").replace("\"memory_mib\":4", "\"memory_mib\":4000000"));
        assert!(e.contains("memory_mib must be 1 to 65536"), "{e}");
        let long = "x".repeat(5000);
        let e = read(&mut db, "vm/5", &vm("").replace("io_loop", &long));
        assert!(e.contains("image must be 1 to 4096 bytes"), "{e}");
        let e = read(&mut db, "vm/5", &vm(r#","args":[1,2,3,4]"#));
        assert!(e.contains("at most 3 arguments"), "{e}");
        let e = read(&mut db, "vm/5", &vm("").replace("\"vcpus\":1", "\"vcpus\":-1"));
        assert!(e.starts_with("record vm/5 is corrupt:"), "{e}");
        let dev = |ranges: &str, irqs: &str| {
            format!(r#"{{"id":2,"kind":"regfile","server":10,"shard":0,"vm":5,"ranges":[{ranges}],"irqs":[{irqs}]}}"#)
        };
        assert!(read_record(&mut db, "device/2", dev(r#"{"mmio":false,"base":1280,"len":16}"#, "4").as_bytes()).is_ok());
        let e = read(&mut db, "device/2", &dev(r#"{"mmio":true,"base":18446744073709551615,"len":2}"#, ""));
        assert!(e.contains("bad range mmio 0xffffffffffffffff+0x2"), "overflow: {e}");
        let e = read(&mut db, "device/2", &dev(r#"{"mmio":true,"base":0,"len":4294967296}"#, ""));
        assert!(e.contains("an MMIO range is 1 byte to 16 MiB"), "{e}");
        let e = read(&mut db, "device/2", &dev(r#"{"mmio":false,"base":65535,"len":2}"#, ""));
        assert!(e.contains("ends at or before 0x10000"), "{e}");
        let e = read(&mut db, "device/2", &dev(r#"{"mmio":false,"base":0,"len":0}"#, ""));
        assert!(e.contains("bad range"), "{e}");
        let e = read(&mut db, "device/2", &dev("", "24"));
        assert!(e.contains("interrupt line 24 does not exist"), "{e}");
        let many = vec![r#"{"mmio":false,"base":0,"len":1}"#; 17].join(",");
        assert!(read(&mut db, "device/2", &dev(&many, "")).contains("at most 16 address ranges"));
        let e = read(&mut db, "device/2", &dev("", "").replace("regfile", "gpu"));
        assert!(e.contains("unknown kind \"gpu\""), "{e}");
        // A virtio-blk's image: absolute, and only a virtio-blk's.
        let blk = |image: &str| {
            format!(
                r#"{{"id":3,"kind":"virtio-blk","server":10,"shard":0,"vm":5,"ranges":[{{"mmio":true,"base":4272947200,"len":512}}],"irqs":[10]{image}}}"#
            )
        };
        let good = blk(r#","image":{"path":"/srv/vm5.img","read_only":true}"#);
        assert!(read_record(&mut db, "device/3", good.as_bytes()).is_ok());
        assert!(db.devices[&3].image.as_ref().is_some_and(|i| i.read_only));
        let e = read(&mut db, "device/3", &blk(r#","image":{"path":"vm5.img"}"#));
        assert!(e.contains("the path must be absolute"), "{e}");
        assert!(read(&mut db, "device/3", &blk("")).contains("a virtio-blk needs an image"));
        let e = read(&mut db, "device/2", &dev("", "").replace(r#""irqs":[]"#, r#""irqs":[],"image":{"path":"/a"}"#));
        assert!(e.contains("an image is for a virtio-blk, not a regfile"), "{e}");
        let e = read(&mut db, "client/1", r#"{"id":1,"mac":"nope","hypervisor":1,"hypervisor_kind":"kvm"}"#);
        assert!(e.contains("is not a MAC address"), "{e}");
        let e = read(
            &mut db,
            "client/1",
            &format!(r#"{{"id":1,"mac":"02:00:00:00:00:01","hypervisor":1,"hypervisor_kind":"{}"}}"#, "k".repeat(100)),
        );
        assert!(e.contains("hypervisor_kind must be 1 to 32"), "{e}");
        let huge = format!(r#"{{"id":1,"pad":"{}"}}"#, " ".repeat(MAX_RECORD_BYTES));
        let e = read(&mut db, "server/1", &huge);
        assert!(e.contains("more than a record may be"), "{e}");
        assert_eq!(read(&mut db, "thing/1", "{}"), "unknown record thing/1");
        assert_eq!(read(&mut db, "vm/x", "{}"), "unknown record vm/x");
        assert!(read(&mut db, "server/1", "[[[[").starts_with("record server/1 is corrupt"));
        assert!(db.clients.is_empty() && db.servers.is_empty(), "nothing refused was added");
    }
}
