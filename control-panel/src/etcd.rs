//! The cluster store: the same records as the embedded store, kept in etcd
//! (v3 API, through the etcd-client crate) under `/dmfabric/`.
//!
//! A commit reads the records and the revision key, checks the batch
//! against them, and writes it in one etcd transaction guarded by the
//! revision key's `mod_revision`: if another writer got in between, the
//! transaction fails and the commit starts over from a fresh read, so two
//! writers can never both get a conflicting change in.
//!
//! # Keys
//!
//! ```text
//! /dmfabric/records/<kind>/<id>    the records (JSON)
//! /dmfabric/revision               bumped by every commit
//! /dmfabric/keys/client/<id>       a client platform's keys (JSON, crate::keys::ClientKeys)
//! /dmfabric/keys/cluster           the cluster key (64 hex digits)
//! /dmfabric/state/<name>/...       sealed states in transit (crate::seal)
//! ```
//!
//! # Who may read what
//!
//! `etcds://` connects over TLS with a client certificate; etcd run with
//! `--client-cert-auth` takes each request's user from the certificate's
//! CN, so no password travels or is stored. [`EtcdStore::setup_auth`]
//! (`dmfabric ctl etcd-auth`, idempotent) creates the users and roles and
//! then enables authentication:
//!
//! | user (= CN, = role) | may |
//! |---|---|
//! | `root` | everything (etcd needs it to enable auth; no password) |
//! | `dmfabric-admin` | read and write `/dmfabric/`; also holds the `root` role, since only it may change grants and every commit re-derives them (below) — keep its certificate as you would root's |
//! | `dmfabric-server-<id>` | read records and the revision, read and write `/dmfabric/state/device/`, read the cluster key, read the keys of each client platform it serves: one with a VM that has a device on this server or whose owner is this server (or a VM migrating to it) |
//! | `dmfabric-client-<id>` | read records and the revision, read and write `/dmfabric/state/vm/`, read the cluster key and its own keys; while a VM migrates to it, write that VM's record and the revision (it records the VM as running there) |
//!
//! Servers read what they serve; clients read their own keys. Placement
//! changes which client platforms a server serves, so **every `dmfabric
//! ctl` commit against an `etcds://` store re-derives the grants**
//! ([`Store::sync_access`]: roles and users for new records, key grants
//! added and revoked, roles and users of removed records deleted; when a
//! grant was added, the revision is bumped once more, so a server that
//! was refused a client's keys in the moment between the commit and its
//! grant reloads and asks again). A
//! client platform's own commit at the end of a migration does not (it may
//! not change grants): the server keeps the old client's grant until the
//! next `ctl` commit — more access for a while, never less.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmfabric_wire::auth::Secret;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity, Permission,
    PermissionType, RoleRevokePermissionOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, UserAddOptions,
    WatchFilterType, WatchOptions,
};

use crate::keys::ClientKeys;
use crate::model::{Change, Conflict, Db};
use crate::seal::{StateKey, StateKeyCache, STATE_TTL};
use crate::store::{
    parse_cluster_key, read_record, removed_clients, writes, Poke, PokeFn, Store, StoreError, Subscription,
};

const ROOT: &str = "/dmfabric/";
const PREFIX: &str = "/dmfabric/records/";
const REVISION: &str = "/dmfabric/revision";
/// Sealed states in transit: `/dmfabric/state/<name>` (`device/<id>`, `vm/<id>`).
const STATES: &str = "/dmfabric/state/";
const DEVICE_STATES: &str = "/dmfabric/state/device/";
const VM_STATES: &str = "/dmfabric/state/vm/";
/// A client platform's keys: `/dmfabric/keys/client/<id>`.
const CLIENT_KEYS: &str = "/dmfabric/keys/client/";
const CLUSTER_KEY: &str = "/dmfabric/keys/cluster";
/// The largest part of a state in transit (etcd's request limit is 1.5 MiB).
const STATE_PART: usize = 1 << 20;
/// Each etcd call's limit: past it the store is reported unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Commits that lose the race to another writer before giving up.
const COMMIT_TRIES: u32 = 16;
/// A subscription's longest wait between tries to watch again while etcd
/// is away.
const REWATCH_MAX: Duration = Duration::from_secs(1);
/// How often a subscription's connection pings etcd (etcd closes one that
/// pings more often than every 5 s, `--grpc-keepalive-min-time`), and how
/// long it waits for the answer before taking etcd for gone.
const WATCH_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// The user and role that edits the control panel.
pub const ADMIN: &str = "dmfabric-admin";
/// The user and role of server `id`.
pub fn server_user(id: u16) -> String {
    format!("dmfabric-server-{id}")
}
/// The user and role of client platform `id`.
pub fn client_user(id: u16) -> String {
    format!("dmfabric-client-{id}")
}

/// Where the etcd store is and how to reach it: parsed from a store spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSpec {
    /// "HOST:PORT" each.
    pub endpoints: Vec<String>,
    /// TLS (`etcds://`), or plain http (`etcd://`).
    pub tls: Option<TlsFiles>,
}

/// The files of a TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed etcd's certificate.
    pub ca: PathBuf,
    /// This host's certificate and its key (PEM): its CN is its etcd user.
    /// None: no client certificate (etcd with `--client-cert-auth` refuses).
    pub identity: Option<(PathBuf, PathBuf)>,
}

fn spec_err(spec: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Backend { store: spec.to_string(), what: what.to_string() }
}

impl EtcdSpec {
    /// Parse `etcd://HOST:PORT[,HOST:PORT...]` or
    /// `etcds://HOST:PORT[,...][?ca=PATH&cert=PATH&key=PATH]`; an
    /// `etcds://` spec without a query takes the paths from
    /// `DMFABRIC_ETCD_CA`, `DMFABRIC_ETCD_CERT` and `DMFABRIC_ETCD_KEY`.
    pub fn parse(spec: &str) -> Result<EtcdSpec, StoreError> {
        EtcdSpec::parse_with_env(spec, |name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`EtcdSpec::parse`] with the environment given.
    pub fn parse_with_env(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<EtcdSpec, StoreError> {
        let endpoints = |list: &str| -> Result<Vec<String>, StoreError> {
            let eps: Vec<String> = list.split(',').map(|e| e.trim().to_string()).collect();
            if eps.iter().any(|e| e.is_empty() || e.contains('/') || !e.contains(':')) {
                return Err(spec_err(spec, "endpoints are HOST:PORT, comma-separated"));
            }
            Ok(eps)
        };
        if let Some(list) = spec.strip_prefix("etcd://") {
            if list.contains('?') {
                return Err(spec_err(spec, "etcd:// is plain http and takes no ca/cert/key: use etcds://"));
            }
            return Ok(EtcdSpec { endpoints: endpoints(list)?, tls: None });
        }
        let Some(rest) = spec.strip_prefix("etcds://") else {
            return Err(spec_err(
                spec,
                "not an etcd store (etcd://HOST:PORT or etcds://HOST:PORT?ca=..&cert=..&key=..)",
            ));
        };
        let (list, query) = match rest.split_once('?') {
            Some((l, q)) => (l, Some(q)),
            None => (rest, None),
        };
        let (mut ca, mut cert, mut key) = (None, None, None);
        match query {
            Some(q) => {
                for pair in q.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) =
                        pair.split_once('=').ok_or_else(|| spec_err(spec, format!("{pair:?} is not NAME=PATH")))?;
                    let slot = match k {
                        "ca" => &mut ca,
                        "cert" => &mut cert,
                        "key" => &mut key,
                        other => return Err(spec_err(spec, format!("unknown option {other:?} (ca, cert, key)"))),
                    };
                    *slot = Some(PathBuf::from(v));
                }
            }
            None => {
                ca = env("DMFABRIC_ETCD_CA").map(PathBuf::from);
                cert = env("DMFABRIC_ETCD_CERT").map(PathBuf::from);
                key = env("DMFABRIC_ETCD_KEY").map(PathBuf::from);
            }
        }
        let ca = ca.ok_or_else(|| {
            spec_err(spec, "etcds:// needs the CA: ?ca=PATH&cert=PATH&key=PATH, or DMFABRIC_ETCD_CA, _CERT and _KEY")
        })?;
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(spec_err(spec, "a client certificate needs both cert= and key=")),
        };
        Ok(EtcdSpec { endpoints: endpoints(list)?, tls: Some(TlsFiles { ca, identity }) })
    }
}

/// A permission of an etcd role, as dmfabric grants them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// Read and write (else read only).
    pub write: bool,
    pub key: String,
    /// Every key under `key` (else `key` alone).
    pub prefix: bool,
}

impl Grant {
    fn read(key: &str) -> Grant {
        Grant { write: false, key: key.into(), prefix: false }
    }
    fn read_all(prefix: &str) -> Grant {
        Grant { write: false, key: prefix.into(), prefix: true }
    }
    fn write(key: &str) -> Grant {
        Grant { write: true, key: key.into(), prefix: false }
    }
    fn write_all(prefix: &str) -> Grant {
        Grant { write: true, key: prefix.into(), prefix: true }
    }

    fn permission(&self) -> Permission {
        let p = if self.write { Permission::read_write(self.key.clone()) } else { Permission::read(self.key.clone()) };
        if self.prefix {
            p.with_prefix()
        } else {
            p
        }
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.write { "readwrite" } else { "read" };
        write!(f, "{how} {}{}", self.key, if self.prefix { "*" } else { "" })
    }
}

/// The client platforms server `server` serves in `db`
/// ([`Db::clients_served_by`]): whose keys its user may read.
pub fn served_clients(db: &Db, server: u16) -> BTreeSet<u16> {
    db.clients_served_by(server)
}

/// The role of every server and client platform record, with its grants.
pub fn roles(db: &Db) -> BTreeMap<String, BTreeSet<Grant>> {
    let mut out = BTreeMap::new();
    for &s in db.servers.keys() {
        let mut g: BTreeSet<Grant> =
            [Grant::read_all(PREFIX), Grant::read(REVISION), Grant::write_all(DEVICE_STATES), Grant::read(CLUSTER_KEY)]
                .into();
        for c in served_clients(db, s) {
            g.insert(Grant::read(&format!("{CLIENT_KEYS}{c}")));
        }
        out.insert(server_user(s), g);
    }
    for &c in db.clients.keys() {
        let mut g: BTreeSet<Grant> = [
            Grant::read_all(PREFIX),
            Grant::write_all(VM_STATES),
            Grant::read(CLUSTER_KEY),
            Grant::read(&format!("{CLIENT_KEYS}{c}")),
        ]
        .into();
        // A VM migrating here is recorded as running here by this client.
        let incoming: Vec<u32> = db.vms.values().filter(|v| v.migrate_to == Some(c)).map(|v| v.id).collect();
        for vm in &incoming {
            g.insert(Grant::write(&format!("{PREFIX}vm/{vm}")));
        }
        g.insert(if incoming.is_empty() { Grant::read(REVISION) } else { Grant::write(REVISION) });
        out.insert(client_user(c), g);
    }
    out
}

fn is_ours(role: &str) -> bool {
    role.starts_with("dmfabric-server-") || role.starts_with("dmfabric-client-")
}

/// The etcd store; one connection (a gRPC channel that reconnects by
/// itself) shared by the threads of a process.
pub struct EtcdStore {
    endpoints: String,
    tls: bool,
    /// Where and how it connected (a subscription connects again).
    spec: EtcdSpec,
    rt: tokio::runtime::Runtime,
    client: Client,
    /// The key states are sealed with, once read.
    state_key: StateKeyCache,
    /// etcd's revision (its own counter, not dmfabric's) as of the last
    /// read of the records or the revision key: a subscription watches
    /// from the next one, so that it misses nothing since.
    seen: AtomicI64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).field("tls", &self.tls).finish()
    }
}

fn read_pem(spec: &str, what: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| spec_err(spec, format!("cannot read the {what} {}: {e}", path.display())))
}

/// Say so when a private key's file is open to group or others.
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key = %path.display(),
                "the etcd client key is mode {mode:04o}: anyone who reads it acts as this host (chmod 600 {})",
                path.display()
            );
        }
    }
}

impl EtcdStore {
    /// Connect to etcd at `endpoints` ("127.0.0.1:2379[,host:port...]")
    /// over plain http, without authentication.
    pub fn connect(endpoints: &str) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect_spec(&EtcdSpec { endpoints: endpoints.split(',').map(String::from).collect(), tls: None })
    }

    /// Connect as `spec` says (TLS and a client certificate for `etcds://`).
    pub fn connect_spec(spec: &EtcdSpec) -> Result<EtcdStore, StoreError> {
        let endpoints = spec.endpoints.join(",");
        let store = describe_spec(spec);
        let err = |what: String| StoreError::Backend { store: store.clone(), what };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(format!("cannot start its runtime: {e}")))?;
        let opts = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT).with_timeout(CALL_TIMEOUT);
        let client = rt.block_on(connect_client(spec, opts))?;
        let s = EtcdStore {
            endpoints,
            tls: spec.tls.is_some(),
            spec: spec.clone(),
            rt,
            client,
            state_key: StateKeyCache::default(),
            seen: AtomicI64::new(0),
        };
        s.revision()?;
        Ok(s)
    }

    /// Note etcd's revision of a read (see `seen`).
    fn saw(&self, header: Option<&etcd_client::ResponseHeader>) {
        if let Some(h) = header {
            self.seen.fetch_max(h.revision(), Ordering::AcqRel);
        }
    }

    fn err(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Backend { store: self.describe(), what: what.to_string() }
    }

    fn call<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client.clone();
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, f(client)).await {
                Ok(r) => r.map_err(|e| self.err(format!("{}: {}", cause(&e), self.hint(&e)))),
                Err(_) => Err(self.err(format!("no answer within {CALL_TIMEOUT:?}"))),
            }
        })
    }

    /// What to do about `e`.
    fn hint(&self, e: &etcd_client::Error) -> &'static str {
        use etcd_client::Error::GRpcStatus;
        match e {
            GRpcStatus(s) if s.code() == tonic::Code::PermissionDenied => {
                "this host's etcd user (its certificate's CN) may not do that: see `dmfabric ctl etcd-auth`"
            }
            GRpcStatus(s) if s.code() == tonic::Code::Unauthenticated || s.code() == tonic::Code::InvalidArgument => {
                "etcd does not know this host's user: is its certificate's CN a dmfabric user?"
            }
            _ if self.tls => {
                "is etcd running there, does it take this host's certificate (cert=, key=), and did ca= sign etcd's?"
            }
            _ => "is etcd running there? (one serving TLS needs etcds://)",
        }
    }

    /// The records and the revision key's (value, mod_revision), from one
    /// read (a transaction: both from the same etcd revision).
    fn read(&self) -> Result<(Db, u64, i64), StoreError> {
        let txn = Txn::new()
            .and_then([TxnOp::get(PREFIX, Some(GetOptions::new().with_prefix())), TxnOp::get(REVISION, None)]);
        let resp = self.call(|mut c| async move { c.txn(txn).await })?;
        self.saw(resp.header());
        let mut db = Db::default();
        let (mut revision, mut mod_revision) = (0, 0);
        for op in resp.op_responses() {
            let TxnOpResponse::Get(got) = op else { continue };
            for kv in got.kvs() {
                let k = kv.key_str().map_err(|e| self.err(e))?;
                if k == REVISION {
                    revision = self.parse_revision(kv.value())?;
                    mod_revision = kv.mod_revision();
                } else if let Some(k) = k.strip_prefix(PREFIX) {
                    read_record(&mut db, k, kv.value()).map_err(|e| self.err(e))?;
                }
            }
        }
        Ok((db, revision, mod_revision))
    }

    fn parse_revision(&self, v: &[u8]) -> Result<u64, StoreError> {
        let shown = String::from_utf8_lossy(&v[..v.len().min(32)]).into_owned();
        std::str::from_utf8(v)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.err(format!("{REVISION} is not a number: {shown:?}")))
    }

    fn state_key(&self) -> Result<StateKey, StoreError> {
        self.state_key.get(|| self.cluster_key())
    }

    fn roles_and_users(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), StoreError> {
        let roles = self.call(|mut c| async move { c.role_list().await })?.roles().iter().cloned().collect();
        let users = self.call(|mut c| async move { c.user_list().await })?.users().iter().cloned().collect();
        Ok((roles, users))
    }

    /// A user without a password (its certificate's CN is its proof)
    /// holding `roles`, made if missing.
    fn ensure_user(&self, users: &BTreeSet<String>, name: &str, roles: &[&str]) -> Result<bool, StoreError> {
        let added = !users.contains(name);
        if added {
            let n = name.to_string();
            self.call(|mut c| async move { c.user_add(n, "", Some(UserAddOptions::new().with_no_pwd())).await })?;
        }
        let n = name.to_string();
        let has: Vec<String> = self.call(|mut c| async move { c.user_get(n).await })?.roles().to_vec();
        for role in roles.iter().filter(|r| !has.iter().any(|h| h == *r)) {
            let (n, r) = (name.to_string(), role.to_string());
            self.call(|mut c| async move { c.user_grant_role(n, r).await })?;
        }
        Ok(added)
    }

    /// Role `name` with exactly `want`, made if missing; what changed.
    fn ensure_role(
        &self,
        roles: &BTreeSet<String>,
        name: &str,
        want: &BTreeSet<Grant>,
    ) -> Result<Vec<String>, StoreError> {
        let mut changed = Vec::new();
        if !roles.contains(name) {
            let n = name.to_string();
            self.call(|mut c| async move { c.role_add(n).await })?;
        }
        let n = name.to_string();
        let have: BTreeSet<Grant> = self
            .call(|mut c| async move { c.role_get(n).await })?
            .permissions()
            .iter()
            .filter_map(|p| {
                let key = p.key_str().ok()?.to_string();
                let write = p.get_type() != PermissionType::Read as i32;
                Some(Grant { write, key, prefix: p.is_prefix() })
            })
            .collect();
        for g in have.difference(want) {
            let (n, key) = (name.to_string(), g.key.clone());
            let opts = g.prefix.then(|| RoleRevokePermissionOptions::new().with_prefix());
            self.call(|mut c| async move { c.role_revoke_permission(n, key, opts).await })?;
            changed.push(format!("-{g}"));
        }
        for g in want.difference(&have) {
            let (n, p) = (name.to_string(), g.permission());
            self.call(|mut c| async move { c.role_grant_permission(n, p).await })?;
            changed.push(format!("+{g}"));
        }
        Ok(changed)
    }

    /// Make the server and client roles and users match `db` ([`roles`]).
    /// Also returns whether a grant was added.
    fn apply_grants(&self, db: &Db) -> Result<(Vec<String>, bool), StoreError> {
        let (roles_now, users) = self.roles_and_users()?;
        let want = roles(db);
        let mut said = Vec::new();
        let mut granted = false;
        for (name, grants) in &want {
            let changed = self.ensure_role(&roles_now, name, grants)?;
            granted |= changed.iter().any(|c| c.starts_with('+'));
            if self.ensure_user(&users, name, &[name])? {
                said.push(format!("etcd: added user {name} (a certificate with CN={name} acts as it)"));
            }
            if !changed.is_empty() {
                said.push(format!("etcd: role {name}: {}", changed.join(", ")));
            }
        }
        for stale in roles_now.iter().filter(|r| is_ours(r) && !want.contains_key(*r)) {
            let n = stale.clone();
            self.call(|mut c| async move { c.role_delete(n).await })?;
            if users.contains(stale) {
                let n = stale.clone();
                self.call(|mut c| async move { c.user_delete(n).await })?;
            }
            said.push(format!("etcd: removed role and user {stale} (its record is gone)"));
        }
        Ok((said, granted))
    }

    /// Bump the revision alone: watchers reload (and ask again for what
    /// they were refused before a grant).
    fn bump_revision(&self) -> Result<u64, StoreError> {
        for _ in 0..COMMIT_TRIES {
            let resp = self.call(|mut c| async move { c.get(REVISION, None).await })?;
            let (revision, mod_revision) = match resp.kvs().first() {
                Some(kv) => (self.parse_revision(kv.value())?, kv.mod_revision()),
                None => (0, 0),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(REVISION, CompareOp::Equal, mod_revision)])
                .and_then([TxnOp::put(REVISION, (revision + 1).to_string(), None)]);
            if self.call(|mut c| async move { c.txn(txn).await })?.succeeded() {
                return Ok(revision + 1);
            }
        }
        Err(self.err(format!("{COMMIT_TRIES} revision bumps in a row lost to other writers: try again")))
    }

    /// `dmfabric ctl etcd-auth`: make the cluster key, user `root`, the
    /// admin role and user, a role and user per server and client platform
    /// record ([`roles`]), then enable authentication. Idempotent. Needs
    /// an `etcds://` store: without TLS client certificates, users would
    /// need passwords sent in the clear.
    pub fn setup_auth(&self) -> Result<Vec<String>, StoreError> {
        if !self.tls {
            return Err(self.err(
                "etcd-auth needs an etcds:// store (TLS with client certificates): over plain http every user would need a password sent in the clear",
            ));
        }
        let mut said = Vec::new();
        self.cluster_key()?;
        let (roles_now, users) = self.roles_and_users()?;
        if self.ensure_user(&users, "root", &["root"])? {
            said.push("etcd: added user root (no password: a certificate with CN=root acts as it)".to_string());
        }
        let admin: BTreeSet<Grant> = [Grant::write_all(ROOT)].into();
        let changed = self.ensure_role(&roles_now, ADMIN, &admin)?;
        if !changed.is_empty() {
            said.push(format!("etcd: role {ADMIN}: {}", changed.join(", ")));
        }
        if self.ensure_user(&users, ADMIN, &[ADMIN, "root"])? {
            said.push(format!(
                "etcd: added user {ADMIN} with roles {ADMIN} and root (a certificate with CN={ADMIN} acts as it)"
            ));
        }
        said.extend(self.apply_grants(&self.load()?)?.0);
        self.call(|mut c| async move { c.auth_enable().await })?;
        said.push("etcd: authentication is on: each host acts as the user its certificate's CN names".into());
        Ok(said)
    }

    /// Whether `dmfabric ctl etcd-auth` set this etcd up (its admin role exists).
    fn auth_is_set_up(&self) -> Result<bool, StoreError> {
        let roles = self.call(|mut c| async move { c.role_list().await })?;
        Ok(roles.roles().iter().any(|r| r == ADMIN))
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Db, StoreError> {
        Ok(self.read()?.0)
    }

    /// One transaction: the records and the revision key together.
    fn load_with_revision(&self) -> Result<(u64, Db), StoreError> {
        let (db, revision, _) = self.read()?;
        Ok((revision, db))
    }

    fn commit(&self, changes: &[Change]) -> Result<(u64, Vec<String>), StoreError> {
        for _ in 0..COMMIT_TRIES {
            let (mut db, revision, mod_revision) = self.read()?;
            let said = db.apply(changes)?;
            let mut ops: Vec<TxnOp> = writes(changes)
                .into_iter()
                .map(|(k, v)| match v {
                    Some(v) => TxnOp::put(format!("{PREFIX}{k}"), v, None),
                    None => TxnOp::delete(format!("{PREFIX}{k}"), None),
                })
                .collect();
            for id in removed_clients(changes) {
                ops.push(TxnOp::delete(format!("{CLIENT_KEYS}{id}"), None));
            }
            ops.push(TxnOp::put(REVISION, (revision + 1).to_string(), None));
            // mod_revision 0 = the key does not exist yet (a fresh store).
            let txn = Txn::new().when([Compare::mod_revision(REVISION, CompareOp::Equal, mod_revision)]).and_then(ops);
            if self.call(|mut c| async move { c.txn(txn).await })?.succeeded() {
                return Ok((revision + 1, said));
            }
        }
        Err(self.err(format!("{COMMIT_TRIES} commits in a row lost to other writers: try again")))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let resp = self.call(|mut c| async move { c.get(REVISION, None).await })?;
        self.saw(resp.header());
        match resp.kvs().first() {
            None => Ok(0),
            Some(kv) => self.parse_revision(kv.value()),
        }
    }

    fn describe(&self) -> String {
        describe_spec(&self.spec)
    }

    /// etcd's watch API on a connection of the subscription's own (its own
    /// thread and runtime): the revision key, and `/dmfabric/state/<states>`
    /// (puts only), from the etcd revision after the last read. When etcd
    /// goes away the subscription says so ([`Poke::Lost`]) and watches
    /// again, from the revision it had, until etcd is back; then it says
    /// [`Poke::Changed`] (what changed meanwhile comes as events too). A
    /// revision etcd has compacted away is read afresh: watched from now on,
    /// with a [`Poke::Changed`] so that the follower reads the store.
    fn subscribe(&self, states: Option<&str>, tell: PokeFn) -> Result<Option<Subscription>, StoreError> {
        let spec = self.spec.clone();
        let desc = self.describe();
        let from = self.seen.load(Ordering::Acquire);
        let states = states.map(|s| format!("{STATES}{s}"));
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.err(format!("cannot start its watch's runtime: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("store-notify".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        () = follow(&spec, &desc, from, states.as_deref(), &*tell) => {}
                        () = stopped.notified() => {}
                    }
                })
            })
            .map_err(|e| self.err(format!("cannot start its watch: {e}")))?;
        Ok(Some(Subscription::new(move || stop.notify_one(), thread)))
    }

    /// etcd takes at most 1.5 MiB per request: a sealed state goes in parts
    /// of [`STATE_PART`] (`<key>/part/<n>`), then the count
    /// (`<key>/parts`), which is what a reader waits for.
    fn put_state(&self, key: &str, state: &[u8]) -> Result<(), StoreError> {
        let sealed = self
            .state_key()?
            .seal(key, state, crate::keys::now_unix() + STATE_TTL.as_secs())
            .map_err(|error| StoreError::State { store: self.describe(), key: key.to_string(), error })?;
        let base = format!("{STATES}{key}");
        for (n, part) in sealed.chunks(STATE_PART).enumerate() {
            let (k, v) = (format!("{base}/part/{n}"), part.to_vec());
            self.call(|mut c| async move { c.put(k, v, None).await })?;
        }
        let (k, v) = (format!("{base}/parts"), sealed.len().div_ceil(STATE_PART).to_string());
        self.call(|mut c| async move { c.put(k, v, None).await })?;
        Ok(())
    }

    fn take_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let base = format!("{STATES}{key}");
        // Taking the count is the claim: a delete that returns what it deleted.
        let k = format!("{base}/parts");
        let resp = self.call(|mut c| async move { c.delete(k, Some(DeleteOptions::new().with_prev_key())).await })?;
        let Some(count) = resp.prev_kvs().first() else { return Ok(None) };
        let count: usize = count
            .value_str()
            .ok()
            .and_then(|v| v.parse().ok())
            // A state is at most what memory holds: a larger count is corrupt.
            .filter(|n| *n <= (1 << 16))
            .ok_or_else(|| self.err(format!("{base}/parts is not a part count")))?;
        let mut sealed = Vec::new();
        for n in 0..count {
            let k = format!("{base}/part/{n}");
            let resp =
                self.call(|mut c| async move { c.delete(k, Some(DeleteOptions::new().with_prev_key())).await })?;
            let part =
                resp.prev_kvs().first().ok_or_else(|| self.err(format!("{base}: part {n} of {count} is missing")))?;
            sealed.extend_from_slice(part.value());
        }
        let state = self
            .state_key()?
            .open(key, sealed, crate::keys::now_unix())
            .map_err(|error| StoreError::State { store: self.describe(), key: key.to_string(), error })?;
        Ok(Some(state))
    }

    fn client_keys(&self, client: u16) -> Result<Option<ClientKeys>, StoreError> {
        let k = format!("{CLIENT_KEYS}{client}");
        let resp = self.call(|mut c| async move { c.get(k, None).await })?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        ClientKeys::from_stored(client, kv.value()).map(Some).map_err(|e| self.err(e))
    }

    fn put_client_keys(&self, keys: &ClientKeys) -> Result<u64, StoreError> {
        keys.check().map_err(|e| self.err(e))?;
        let record = format!("{PREFIX}client/{}", keys.client);
        for _ in 0..COMMIT_TRIES {
            let txn = Txn::new().and_then([TxnOp::get(record.clone(), None), TxnOp::get(REVISION, None)]);
            let resp = self.call(|mut c| async move { c.txn(txn).await })?;
            let (mut exists, mut revision, mut mod_revision) = (false, 0, 0);
            for op in resp.op_responses() {
                let TxnOpResponse::Get(got) = op else { continue };
                for kv in got.kvs() {
                    if kv.key() == REVISION.as_bytes() {
                        revision = self.parse_revision(kv.value())?;
                        mod_revision = kv.mod_revision();
                    } else {
                        exists = true;
                    }
                }
            }
            if !exists {
                return Err(Conflict::Missing { what: "client platform", id: keys.client.into() }.into());
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(REVISION, CompareOp::Equal, mod_revision),
                    Compare::version(record.clone(), CompareOp::Greater, 0),
                ])
                .and_then([
                    TxnOp::put(format!("{CLIENT_KEYS}{}", keys.client), keys.to_json(), None),
                    TxnOp::put(REVISION, (revision + 1).to_string(), None),
                ]);
            if self.call(|mut c| async move { c.txn(txn).await })?.succeeded() {
                return Ok(revision + 1);
            }
        }
        Err(self.err(format!("{COMMIT_TRIES} commits in a row lost to other writers: try again")))
    }

    fn cluster_key(&self) -> Result<Secret, StoreError> {
        let resp = self.call(|mut c| async move { c.get(CLUSTER_KEY, None).await })?;
        if let Some(kv) = resp.kvs().first() {
            return parse_cluster_key(CLUSTER_KEY, kv.value()).map_err(|e| self.err(e));
        }
        // First use: make it, unless another process just did.
        let fresh = crate::keys::random_secret().map_err(|e| self.err(e))?;
        let txn = Txn::new()
            .when([Compare::version(CLUSTER_KEY, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(CLUSTER_KEY, fresh.to_hex(), None)])
            .or_else([TxnOp::get(CLUSTER_KEY, None)]);
        let resp = self.call(|mut c| async move { c.txn(txn).await })?;
        if resp.succeeded() {
            return Ok(fresh);
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(got) = op {
                if let Some(kv) = got.kvs().first() {
                    return parse_cluster_key(CLUSTER_KEY, kv.value()).map_err(|e| self.err(e));
                }
            }
        }
        Err(self.err(format!("{CLUSTER_KEY} vanished while it was made: try again")))
    }

    /// Re-derive the grants from the records, when `dmfabric ctl etcd-auth`
    /// set this etcd up (else there are no dmfabric users to keep current).
    /// A commit is seen before its grants are in; when a grant was added,
    /// the revision is bumped once more, so every watcher reloads with it
    /// (a server refused a new client's keys a moment ago asks again).
    fn sync_access(&self) -> Result<Vec<String>, StoreError> {
        if !self.tls || !self.auth_is_set_up()? {
            return Ok(Vec::new());
        }
        let (mut said, granted) = self.apply_grants(&self.load()?)?;
        if granted {
            let revision = self.bump_revision()?;
            said.push(format!("(revision {revision}: hosts reload with their new grants)"));
        }
        Ok(said)
    }
}

/// What went wrong, in one line: the gRPC status ("Unavailable: tcp
/// connect error") or the innermost cause.
/// "etcd at HOST:PORT[ over TLS]".
fn describe_spec(spec: &EtcdSpec) -> String {
    match spec.tls {
        Some(_) => format!("etcd at {} over TLS", spec.endpoints.join(",")),
        None => format!("etcd at {}", spec.endpoints.join(",")),
    }
}

/// A client of etcd as `spec` says, with `opts` (timeouts) and its TLS.
async fn connect_client(spec: &EtcdSpec, mut opts: ConnectOptions) -> Result<Client, StoreError> {
    let store = describe_spec(spec);
    let err = |what: String| StoreError::Backend { store: store.clone(), what };
    let scheme = match &spec.tls {
        Some(files) => {
            let mut tls =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(&store, "CA certificate", &files.ca)?));
            if let Some((cert, key)) = &files.identity {
                warn_if_exposed(key);
                let cert = read_pem(&store, "client certificate", cert)?;
                let key = read_pem(&store, "client certificate's key", key)?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
            "https"
        }
        None => "http",
    };
    let list: Vec<String> = spec.endpoints.iter().map(|e| format!("{scheme}://{e}")).collect();
    Client::connect(list, Some(opts))
        .await
        .map_err(|e| err(format!("cannot reach it ({}): is etcd running there?", cause(&e))))
}

/// How one watch of a subscription ended.
enum WatchEnd {
    /// etcd went away or refused: try again from the same revision.
    Lost(String),
    /// etcd compacted the revision asked for: watch from now on.
    Compacted,
}

/// A subscription's life: watch, and watch again after each end, until
/// the caller drops the future.
async fn follow(spec: &EtcdSpec, desc: &str, from: i64, states: Option<&str>, tell: &(dyn Fn(Poke) + Send + Sync)) {
    // The etcd revision to watch from (0: from now on).
    let mut next = if from > 0 { from + 1 } else { 0 };
    let mut lost = false;
    let mut wait = Duration::from_millis(50);
    loop {
        match watch_once(spec, &mut next, states, tell, &mut lost, &mut wait).await {
            WatchEnd::Compacted => {
                tracing::info!(store = desc, "etcd compacted the revisions this watch had not seen: reading afresh");
                next = 0;
                tell(Poke::Changed);
            }
            WatchEnd::Lost(why) => {
                if !lost {
                    lost = true;
                    tell(Poke::Lost(format!("The store {desc}: its watch ended ({why})")));
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(REWATCH_MAX);
            }
        }
    }
}

/// Connect, watch the revision key (and the states) from `next`, and tell
/// of each change until the watch ends; `next` follows the events.
async fn watch_once(
    spec: &EtcdSpec,
    next: &mut i64,
    states: Option<&str>,
    tell: &(dyn Fn(Poke) + Send + Sync),
    lost: &mut bool,
    wait: &mut Duration,
) -> WatchEnd {
    // No overall request timeout (it would end the stream): a keep-alive
    // notices an etcd that went silent.
    let opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        .with_keep_alive(WATCH_KEEPALIVE.0, WATCH_KEEPALIVE.1)
        .with_keep_alive_while_idle(true);
    let mut client = match tokio::time::timeout(CALL_TIMEOUT, connect_client(spec, opts)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return WatchEnd::Lost(e.to_string()),
        Err(_) => return WatchEnd::Lost(format!("no connection within {CALL_TIMEOUT:?}")),
    };
    let from = |o: WatchOptions| if *next > 0 { o.with_start_revision(*next) } else { o };
    let revision = from(WatchOptions::new());
    let mut stream = match tokio::time::timeout(CALL_TIMEOUT, client.watch(REVISION, Some(revision))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return WatchEnd::Lost(cause(&e)),
        Err(_) => return WatchEnd::Lost(format!("no answer within {CALL_TIMEOUT:?}")),
    };
    let mut watches = 1;
    if let Some(prefix) = states {
        let o = from(WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoDelete]));
        if let Err(e) = stream.watch(prefix, Some(o)).await {
            return WatchEnd::Lost(cause(&e));
        }
        watches += 1;
    }
    let mut created = 0;
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Lost("etcd closed it".into()),
            Err(e) => return WatchEnd::Lost(cause(&e)),
        };
        if resp.compact_revision() > 0 {
            return WatchEnd::Compacted;
        }
        if resp.canceled() {
            return WatchEnd::Lost(format!("etcd cancelled it: {}", resp.cancel_reason()));
        }
        if resp.created() {
            created += 1;
            if created == watches {
                *wait = Duration::from_millis(50);
                if std::mem::take(lost) {
                    // Back: the follower reads what it missed.
                    tell(Poke::Changed);
                }
            }
        }
        let mut changed = false;
        for ev in resp.events() {
            if let Some(kv) = ev.kv() {
                *next = (*next).max(kv.mod_revision() + 1);
                changed = true;
            }
        }
        if changed {
            tell(Poke::Changed);
        }
    }
}

fn cause(e: &etcd_client::Error) -> String {
    let innermost = |e: &dyn std::error::Error| {
        let mut last = e;
        while let Some(next) = last.source() {
            last = next;
        }
        last.to_string()
    };
    if let etcd_client::Error::GRpcStatus(s) = e {
        // A transport error's status says only that: its cause says what.
        return match std::error::Error::source(s) {
            Some(source) => format!("{:?}: {}: {}", s.code(), s.message(), innermost(source)),
            None => format!("{:?}: {}", s.code(), s.message()),
        };
    }
    innermost(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{platform, uart};
    use crate::model::{ClientPlatform, Device, Server, ServerRole, Vm};

    #[test]
    fn specs_parse_and_bad_ones_say_what_is_wrong() {
        let none = |_: &str| None;
        assert_eq!(
            EtcdSpec::parse_with_env("etcd://127.0.0.1:2379,10.0.0.2:2379", none).unwrap(),
            EtcdSpec { endpoints: vec!["127.0.0.1:2379".into(), "10.0.0.2:2379".into()], tls: None }
        );
        let s = EtcdSpec::parse_with_env("etcds://h:1?ca=/a/ca.pem&cert=/a/c.pem&key=/a/k.pem", none).unwrap();
        assert_eq!(
            s.tls,
            Some(TlsFiles { ca: "/a/ca.pem".into(), identity: Some(("/a/c.pem".into(), "/a/k.pem".into())) })
        );
        let env = |n: &str| match n {
            "DMFABRIC_ETCD_CA" => Some("/e/ca".to_string()),
            "DMFABRIC_ETCD_CERT" => Some("/e/c".to_string()),
            "DMFABRIC_ETCD_KEY" => Some("/e/k".to_string()),
            _ => None,
        };
        let s = EtcdSpec::parse_with_env("etcds://h:1", env).unwrap();
        assert_eq!(s.tls.unwrap().identity, Some(("/e/c".into(), "/e/k".into())));
        // A query wins over the environment, whole.
        let s = EtcdSpec::parse_with_env("etcds://h:1?ca=/q/ca", env).unwrap();
        assert_eq!(s.tls, Some(TlsFiles { ca: "/q/ca".into(), identity: None }));
        let bad = |spec: &str| EtcdSpec::parse_with_env(spec, none).unwrap_err().to_string();
        assert!(bad("etcds://h:1").contains("needs the CA"));
        assert!(bad("etcds://h:1?ca=/x&cert=/y").contains("needs both cert= and key="));
        assert!(bad("etcds://h:1?ca=/x&pw=1").contains("unknown option \"pw\""));
        assert!(bad("etcd://h:1?ca=/x").contains("use etcds://"));
        assert!(bad("etcd://").contains("HOST:PORT"));
        assert!(bad("etcd://h:1,").contains("HOST:PORT"));
    }

    fn db() -> Db {
        let mut db = Db::default();
        db.apply(&platform()).unwrap();
        let c = |id: u16| {
            Change::AddClient(ClientPlatform {
                id,
                mac: format!("02:00:00:00:00:{id:02x}"),
                hypervisor: 1,
                hypervisor_kind: "kvm".into(),
            })
        };
        db.apply(&[
            c(2),
            c(3),
            Change::AddServer(Server { id: 11, mac: "02:00:00:00:00:0b".into(), role: ServerRole::Io }),
            Change::AddServer(Server { id: 12, mac: "02:00:00:00:00:0c".into(), role: ServerRole::Owner }),
            Change::AddDevice(uart(1, 0x3f8)),
            Change::AddVm(Vm { id: 200, client: 2, owner: Some(12), ..db.vms[&100].clone() }),
        ])
        .unwrap();
        db
    }

    #[test]
    fn servers_may_read_the_keys_of_the_clients_they_serve_and_only_those() {
        let mut db = db();
        // VM 100 (client 1) has a device on server 10; VM 200 (client 2) is owned by server 12.
        assert_eq!(served_clients(&db, 10), [1].into());
        assert_eq!(served_clients(&db, 11), [].into());
        assert_eq!(served_clients(&db, 12), [2].into());
        let r = roles(&db);
        let keys_of = |role: &str| -> Vec<String> {
            r[role].iter().filter(|g| g.key.starts_with(CLIENT_KEYS)).map(|g| g.to_string()).collect()
        };
        assert_eq!(keys_of("dmfabric-server-10"), vec!["read /dmfabric/keys/client/1"]);
        assert!(keys_of("dmfabric-server-11").is_empty());
        assert_eq!(keys_of("dmfabric-client-3"), vec!["read /dmfabric/keys/client/3"]);
        assert!(r["dmfabric-server-10"].contains(&Grant::write_all(DEVICE_STATES)));
        assert!(!r["dmfabric-server-10"].iter().any(|g| g.write && g.key.starts_with(PREFIX)), "no record writes");
        assert!(r["dmfabric-client-1"].contains(&Grant::read(REVISION)));
        // A device moving to server 11 moves the grant; a migration adds
        // the target client and lets it record the VM.
        let moved = Device { server: 11, ..db.devices[&1].clone() };
        let running = db.vms[&100].after(crate::model::Lifecycle::Launch).unwrap();
        let migrating = running.after(crate::model::Lifecycle::Migrate(3)).unwrap();
        db.apply(&[Change::UpdateDevice(moved), Change::UpdateVm(migrating)]).unwrap();
        assert_eq!(served_clients(&db, 10), [].into());
        assert_eq!(served_clients(&db, 11), [1, 3].into());
        let r = roles(&db);
        assert!(r["dmfabric-client-3"].contains(&Grant::write("/dmfabric/records/vm/100")));
        assert!(r["dmfabric-client-3"].contains(&Grant::write(REVISION)));
        assert!(!r["dmfabric-client-1"].iter().any(|g| g.write && g.key.starts_with(PREFIX)));
        assert_eq!(r.len(), 3 + 3, "a role per server and per client platform");
    }
}
