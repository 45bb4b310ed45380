//! The cluster store: the same records as the embedded store, kept in etcd
//! (v3 API, through the etcd-client crate) under `/dmfabric/`.
//!
//! A commit reads the records and the revision key, checks the batch
//! against them, and writes it in one etcd transaction guarded by the
//! revision key's `mod_revision`: if another writer got in between, the
//! transaction fails and the commit starts over from a fresh read, so two
//! writers can never both get a conflicting change in.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp};

use crate::model::{Change, Db};
use crate::store::{read_record, writes, Store, StoreError};

const PREFIX: &str = "/dmfabric/records/";
const REVISION: &str = "/dmfabric/revision";
/// Saved device-model states in transit: `/dmfabric/state/<device>`.
const STATES: &str = "/dmfabric/state/";
/// The largest part of a state in transit (etcd's request limit is 1.5 MiB).
const STATE_PART: usize = 1 << 20;
/// Each etcd call's limit: past it the store is reported unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Commits that lose the race to another writer before giving up.
const COMMIT_TRIES: u32 = 16;

/// The etcd store; one connection (a gRPC channel that reconnects by
/// itself) shared by the threads of a process.
pub struct EtcdStore {
    endpoints: String,
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).finish()
    }
}

impl EtcdStore {
    /// Connect to etcd at `endpoints` ("127.0.0.1:2379[,host:port...]").
    pub fn connect(endpoints: &str) -> Result<EtcdStore, StoreError> {
        let err = |what: String| StoreError::Backend { store: format!("etcd at {endpoints}"), what };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(format!("cannot start its runtime: {e}")))?;
        let list: Vec<String> = endpoints.split(',').map(|e| format!("http://{e}")).collect();
        let opts = ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT).with_timeout(CALL_TIMEOUT);
        let client = rt
            .block_on(Client::connect(list, Some(opts)))
            .map_err(|e| err(format!("cannot reach it ({e}): is etcd running there?")))?;
        let s = EtcdStore { endpoints: endpoints.to_string(), rt, client };
        s.revision()?;
        Ok(s)
    }

    fn err(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Backend { store: format!("etcd at {}", self.endpoints), what: what.to_string() }
    }

    fn call<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client.clone();
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, f(client)).await {
                Ok(r) => r.map_err(|e| self.err(format!("{}: is etcd running there?", cause(&e)))),
                Err(_) => Err(self.err(format!("no answer within {CALL_TIMEOUT:?}"))),
            }
        })
    }

    /// The records and the revision key's (value, mod_revision), from one read.
    fn read(&self) -> Result<(Db, u64, i64), StoreError> {
        let resp =
            self.call(|mut c| async move { c.get("/dmfabric/", Some(GetOptions::new().with_prefix())).await })?;
        let mut db = Db::default();
        let (mut revision, mut mod_revision) = (0, 0);
        for kv in resp.kvs() {
            let k = kv.key_str().map_err(|e| self.err(e))?;
            if k == REVISION {
                let v = kv.value_str().map_err(|e| self.err(e))?;
                revision = v.parse().map_err(|_| self.err(format!("{REVISION} is not a number: {v:?}")))?;
                mod_revision = kv.mod_revision();
            } else if let Some(k) = k.strip_prefix(PREFIX) {
                read_record(&mut db, k, kv.value()).map_err(|e| self.err(e))?;
            }
        }
        Ok((db, revision, mod_revision))
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Db, StoreError> {
        Ok(self.read()?.0)
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
        match resp.kvs().first() {
            None => Ok(0),
            Some(kv) => {
                let v = kv.value_str().map_err(|e| self.err(e))?;
                v.parse().map_err(|_| self.err(format!("{REVISION} is not a number: {v:?}")))
            }
        }
    }

    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints)
    }

    /// etcd takes at most 1.5 MiB per request: a state goes in parts of
    /// [`STATE_PART`] (`<key>/part/<n>`), then the count (`<key>/parts`),
    /// which is what a reader waits for.
    fn put_state(&self, key: &str, state: &[u8]) -> Result<(), StoreError> {
        let base = format!("{STATES}{key}");
        let parts: Vec<&[u8]> = if state.is_empty() { vec![state] } else { state.chunks(STATE_PART).collect() };
        for (n, part) in parts.iter().enumerate() {
            let (k, v) = (format!("{base}/part/{n}"), part.to_vec());
            self.call(|mut c| async move { c.put(k, v, None).await })?;
        }
        let (k, v) = (format!("{base}/parts"), parts.len().to_string());
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
            .ok_or_else(|| self.err(format!("{base}/parts is not a number")))?;
        let mut state = Vec::new();
        for n in 0..count {
            let k = format!("{base}/part/{n}");
            let resp =
                self.call(|mut c| async move { c.delete(k, Some(DeleteOptions::new().with_prev_key())).await })?;
            let part =
                resp.prev_kvs().first().ok_or_else(|| self.err(format!("{base}: part {n} of {count} is missing")))?;
            state.extend_from_slice(part.value());
        }
        Ok(Some(state))
    }
}

/// What went wrong, in one line: the gRPC status ("Unavailable: tcp
/// connect error") or the innermost cause.
fn cause(e: &etcd_client::Error) -> String {
    if let etcd_client::Error::GRpcStatus(s) = e {
        return format!("{:?}: {}", s.code(), s.message());
    }
    let mut last: &dyn std::error::Error = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}
