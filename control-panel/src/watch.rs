//! The watch that keeps a data plane's routing tables current: a thread
//! that polls the store's revision and, when it moves, builds the new
//! table and swaps it into a [`LiveRoutes`] — the data plane's loop never
//! stops or waits for it. A store that becomes unreachable leaves the last
//! table in place; the watch says so once, counts, and says when the store
//! is back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::routing::{LiveRoutes, RoutingTable};
use crate::store::{Store, StoreError};

/// How often a watch asks the store for its revision by default.
pub const WATCH_PERIOD: Duration = Duration::from_millis(50);

/// What a watch has seen, for counters.
#[derive(Debug, Default)]
pub struct WatchHealth {
    /// False from a failed call until the next good one.
    pub unreachable: AtomicBool,
    /// Failed store calls.
    pub errors: AtomicU64,
    /// Tables swapped in after the first.
    pub swaps: AtomicU64,
}

/// Work a data plane has for the store each period (a server writing and
/// reading device states in transit); runs on the watch thread.
pub type Chores = Box<dyn FnMut(&dyn Store) -> Result<(), StoreError> + Send>;

/// Told each revision the watch swaps in (from its thread).
pub type OnSwap = Box<dyn Fn(u64) + Send + Sync>;

/// A running watch; stopped on drop.
pub struct Watch {
    routes: Arc<LiveRoutes>,
    health: Arc<WatchHealth>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    listeners: Arc<std::sync::Mutex<Vec<OnSwap>>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("revision", &self.routes.revision()).finish_non_exhaustive()
    }
}

impl Watch {
    /// Load the first table now (an error here is the caller's to report:
    /// there is nothing to route by yet), then watch every `period`.
    /// `who` prefixes the watch's lines ("server 2").
    pub fn start(
        store: Box<dyn Store>,
        who: String,
        period: Duration,
        chores: Option<Chores>,
    ) -> Result<Watch, StoreError> {
        Watch::start_with(store, who, period, |_| chores)
    }

    /// [`Watch::start`], with chores made from the tables the watch keeps
    /// (a planner that follows them).
    pub fn start_with(
        store: Box<dyn Store>,
        who: String,
        period: Duration,
        chores: impl FnOnce(Arc<LiveRoutes>) -> Option<Chores>,
    ) -> Result<Watch, StoreError> {
        let revision = store.revision()?;
        let table = RoutingTable::from_db(Arc::new(store.load()?), revision);
        let routes = Arc::new(LiveRoutes::new(table));
        let chores = chores(routes.clone());
        let listeners: Arc<std::sync::Mutex<Vec<OnSwap>>> = Arc::default();
        let health = Arc::new(WatchHealth::default());
        let stop = Arc::new(AtomicBool::new(false));
        let desc = store.describe();
        let thread = {
            let (routes, health, stop, listeners) = (routes.clone(), health.clone(), stop.clone(), listeners.clone());
            std::thread::Builder::new()
                .name("store-watch".into())
                .spawn(move || watch(store, &who, period, chores, &routes, &health, &stop, &listeners))
                .map_err(|e| StoreError::Backend { store: desc, what: format!("cannot start its watch: {e}") })?
        };
        Ok(Watch { routes, health, stop, thread: Some(thread), listeners })
    }

    /// Call `f` with each revision swapped in from now on.
    pub fn on_swap(&self, f: OnSwap) {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner()).push(f);
    }

    /// The tables, for the data plane.
    pub fn routes(&self) -> Arc<LiveRoutes> {
        self.routes.clone()
    }

    pub fn health(&self) -> &WatchHealth {
        &self.health
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn watch(
    store: Box<dyn Store>,
    who: &str,
    period: Duration,
    mut chores: Option<Chores>,
    routes: &LiveRoutes,
    health: &WatchHealth,
    stop: &AtomicBool,
    listeners: &std::sync::Mutex<Vec<OnSwap>>,
) {
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(period);
        let result = (|| -> Result<(), StoreError> {
            let revision = store.revision()?;
            if revision != routes.revision() {
                let table = RoutingTable::from_db(Arc::new(store.load()?), revision);
                let (vms, devices) = (table.vm_count(), table.device_count());
                routes.swap(table);
                health.swaps.fetch_add(1, Ordering::Relaxed);
                tracing::info!(who, revision, vms, devices, "routing tables swapped in");
                for f in listeners.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    f(revision);
                }
            }
            if let Some(chores) = chores.as_mut() {
                chores(&*store)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                if health.unreachable.swap(false, Ordering::AcqRel) {
                    tracing::info!(who, store = %store.describe(), "the store answers again");
                }
            }
            Err(e) => {
                health.errors.fetch_add(1, Ordering::Relaxed);
                if !health.unreachable.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        who,
                        revision = routes.revision(),
                        "{e}: routing on the last tables until it answers"
                    );
                }
            }
        }
    }
}
