//! The watch that keeps a data plane's routing tables current: a thread
//! that follows the store and, when its revision moves, builds the new
//! table and swaps it into a [`LiveRoutes`] — the data plane's loop never
//! stops or waits for it.
//!
//! The store pushes its changes ([`Store::subscribe`]: etcd's watch API,
//! or a poke file beside a redb store): the thread sleeps until told, then
//! reads the revision, and the table when it moved. It also reads the
//! revision every [`IDLE_CHECK`] (or period, if longer), in case a poke was lost (a writer that
//! cannot write the poke file). A store that cannot push, or whose
//! notifications are lost (etcd gone), is polled every period until they
//! are back. A store that becomes unreachable leaves the last table in
//! place; the watch says so once, counts, and says when the store is back.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::routing::{LiveRoutes, RoutingTable};
use crate::store::{Poke, Store, StoreError, Subscription};

/// How often a watch asks a store that cannot push (or whose pushes are
/// lost) for its revision by default, and how soon chores with work in
/// hand run again.
pub const WATCH_PERIOD: Duration = Duration::from_millis(50);

/// How often a watch whose store pushes reads the revision anyway (or
/// every period, if that is longer).
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

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

/// Work a data plane has for the store (a server writing and reading
/// device states in transit); runs on the watch thread after each change
/// the store tells of. Returns when it wants to run again without one
/// (work in hand: states to write that the data plane is about to hand
/// over, a deadline), or None.
pub type Chores = Box<dyn FnMut(&dyn Store) -> Result<Option<Duration>, StoreError> + Send>;

/// Told each revision the watch swaps in (from its thread).
pub type OnSwap = Box<dyn Fn(u64) + Send + Sync>;

/// Told each change the store pushes, as it comes and before the watch
/// reads the store (a commit, whose table [`OnSwap`] announces once read;
/// or a state put in transit, which does not move the revision).
pub type OnPoke = Box<dyn Fn() + Send + Sync>;

/// How a watch follows its store.
#[derive(Debug, Clone)]
pub struct Follow {
    /// Prefixes its lines ("dmfabric server 2").
    pub who: String,
    /// How often to poll when the store cannot push, and how soon chores
    /// that ask to run again do ([`WATCH_PERIOD`]).
    pub period: Duration,
    /// The states in transit to be told of ("device/", "vm/"), besides
    /// commits ([`Store::subscribe`]).
    pub states: Option<&'static str>,
}

impl Follow {
    /// Follow commits only, polling every `period` if the store cannot push.
    pub fn new(who: impl Into<String>, period: Duration) -> Follow {
        Follow { who: who.into(), period, states: None }
    }

    /// Also be told of states put under `prefix` ("device/", "vm/").
    pub fn with_states(mut self, prefix: &'static str) -> Follow {
        self.states = Some(prefix);
        self
    }
}

/// What a wake asks of the watch thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Read {
    /// Nothing to read (a state put in transit: chores and listeners only).
    No,
    /// Read the revision, and the records if it moved.
    Check,
    /// The revision moved: read the records (with their revision).
    Load,
}

/// What wakes the watch thread.
enum Wake {
    Poke(Poke),
    Stop,
}

/// The listeners of a watch.
#[derive(Default)]
struct Listeners {
    swap: Mutex<Vec<OnSwap>>,
    poke: Mutex<Vec<OnPoke>>,
}

/// A running watch; stopped on drop.
pub struct Watch {
    routes: Arc<LiveRoutes>,
    health: Arc<WatchHealth>,
    wake: Mutex<Sender<Wake>>,
    thread: Option<JoinHandle<()>>,
    listeners: Arc<Listeners>,
    pushed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("revision", &self.routes.revision()).finish_non_exhaustive()
    }
}

impl Watch {
    /// Load the first table now (an error here is the caller's to report:
    /// there is nothing to route by yet), then follow the store: told of
    /// changes where it can push, polled every `period` where it cannot.
    /// `who` prefixes the watch's lines ("server 2").
    pub fn start(
        store: Box<dyn Store>,
        who: String,
        period: Duration,
        chores: Option<Chores>,
    ) -> Result<Watch, StoreError> {
        Watch::start_with(store, Follow::new(who, period), |_| chores)
    }

    /// [`Watch::start`] as `follow` says, with chores made from the tables
    /// the watch keeps (a planner that follows them).
    pub fn start_with(
        store: Box<dyn Store>,
        follow: Follow,
        chores: impl FnOnce(Arc<LiveRoutes>) -> Option<Chores>,
    ) -> Result<Watch, StoreError> {
        let (revision, db) = store.load_with_revision()?;
        let table = RoutingTable::from_db(Arc::new(db), revision);
        let routes = Arc::new(LiveRoutes::new(table));
        let chores = chores(routes.clone());
        let listeners: Arc<Listeners> = Arc::default();
        let health = Arc::new(WatchHealth::default());
        let (tx, rx) = std::sync::mpsc::channel();
        // Subscribed now, before the thread starts: nothing committed
        // after the read above is missed.
        let pokes = tx.clone();
        let subscription =
            store.subscribe(follow.states, Arc::new(move |p| drop(pokes.send(Wake::Poke(p))))).unwrap_or_else(|e| {
                tracing::warn!(who = follow.who, "{e}: polling it every {:?} instead", follow.period);
                None
            });
        let pushed = Arc::new(AtomicBool::new(subscription.is_some()));
        let desc = store.describe();
        let thread = {
            let (routes, health, listeners, pushed) =
                (routes.clone(), health.clone(), listeners.clone(), pushed.clone());
            std::thread::Builder::new()
                .name("store-watch".into())
                .spawn(move || {
                    let follower = Follower { store, follow, chores, routes, health, listeners, pushed };
                    follower.run(rx, subscription)
                })
                .map_err(|e| StoreError::Backend { store: desc, what: format!("cannot start its watch: {e}") })?
        };
        Ok(Watch { routes, health, wake: Mutex::new(tx), thread: Some(thread), listeners, pushed })
    }

    /// Call `f` with each revision swapped in from now on.
    pub fn on_swap(&self, f: OnSwap) {
        self.listeners.swap.lock().unwrap_or_else(|e| e.into_inner()).push(f);
    }

    /// Call `f` on each change the store pushes from now on, before the
    /// watch reads it (a state in transit put, too: the revision need not
    /// move).
    pub fn on_poke(&self, f: OnPoke) {
        self.listeners.poke.lock().unwrap_or_else(|e| e.into_inner()).push(f);
    }

    /// Whether the store pushes its changes now (false: the watch polls).
    pub fn pushed(&self) -> bool {
        self.pushed.load(Ordering::Acquire)
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
        let _ = self.wake.lock().unwrap_or_else(|e| e.into_inner()).send(Wake::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watch thread's state.
struct Follower {
    store: Box<dyn Store>,
    follow: Follow,
    chores: Option<Chores>,
    routes: Arc<LiveRoutes>,
    health: Arc<WatchHealth>,
    listeners: Arc<Listeners>,
    /// The subscription's pushes arrive (false: poll every period).
    pushed: Arc<AtomicBool>,
}

impl Follower {
    fn run(mut self, wake: Receiver<Wake>, subscription: Option<Subscription>) {
        let period = self.follow.period;
        let idle = IDLE_CHECK.max(period);
        // When the revision is next read without a push, and when chores
        // asked to run again.
        let mut check = Instant::now() + if self.pushed.load(Ordering::Acquire) { idle } else { period };
        let mut chores_due: Option<Instant> = None;
        loop {
            let until = chores_due.map_or(check, |c| c.min(check));
            let mut read = Read::No;
            let mut poked = false;
            match wake.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Wake::Poke(p)) => {
                    self.poked(p, &mut read, &mut poked);
                    // Pokes that came meanwhile are one read.
                    while let Ok(w) = wake.try_recv() {
                        match w {
                            Wake::Stop => return drop(subscription),
                            Wake::Poke(p) => self.poked(p, &mut read, &mut poked),
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if poked {
                // Before the read: a state put in transit does not move
                // the revision, and its taker need not wait for the read.
                for f in self.listeners.poke.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    f();
                }
            }
            let now = Instant::now();
            if now >= check {
                read = read.max(Read::Check);
            }
            if read != Read::No {
                check = now + if self.pushed.load(Ordering::Acquire) { idle } else { period };
            }
            let run_chores = read != Read::No || poked || chores_due.is_some_and(|c| now >= c);
            if !run_chores {
                continue;
            }
            match self.step(read) {
                Ok(again) => {
                    chores_due = again.map(|d| Instant::now() + d.min(period));
                    if self.health.unreachable.swap(false, Ordering::AcqRel) {
                        tracing::info!(who = self.follow.who, store = %self.store.describe(), "the store answers again");
                    }
                }
                Err(e) => {
                    self.health.errors.fetch_add(1, Ordering::Relaxed);
                    if !self.health.unreachable.swap(true, Ordering::AcqRel) {
                        tracing::warn!(
                            who = self.follow.who,
                            revision = self.routes.revision(),
                            "{e}: routing on the last tables until it answers"
                        );
                    }
                    // Chores with work in hand try again at the next check.
                    chores_due = None;
                }
            }
        }
        drop(subscription);
    }

    /// Note a push: what to read now; or poll until pushes are back.
    fn poked(&self, p: Poke, read: &mut Read, poked: &mut bool) {
        let pushing = || {
            if !self.pushed.swap(true, Ordering::AcqRel) {
                tracing::info!(who = self.follow.who, "the store pushes its changes again");
            }
        };
        match p {
            Poke::Changed => {
                pushing();
                *read = (*read).max(Read::Check);
                *poked = true;
            }
            Poke::At(revision) => {
                pushing();
                if revision != self.routes.revision() {
                    *read = (*read).max(Read::Load);
                }
                *poked = true;
            }
            Poke::Lost(why) => {
                if self.pushed.swap(false, Ordering::AcqRel) {
                    tracing::warn!(
                        who = self.follow.who,
                        "{why}: polling every {:?} until it is back",
                        self.follow.period
                    );
                }
                *read = (*read).max(Read::Check);
            }
        }
    }

    /// Read the store as `read` says and swap in a new table if the
    /// revision moved; then the chores. Returns when the chores want to
    /// run again.
    fn step(&mut self, read: Read) -> Result<Option<Duration>, StoreError> {
        let load = match read {
            Read::No => false,
            Read::Check => self.store.revision()? != self.routes.revision(),
            Read::Load => true,
        };
        if load {
            let (revision, db) = self.store.load_with_revision()?;
            if revision != self.routes.revision() {
                let table = RoutingTable::from_db(Arc::new(db), revision);
                let (vms, devices) = (table.vm_count(), table.device_count());
                self.routes.swap(table);
                self.health.swaps.fetch_add(1, Ordering::Relaxed);
                tracing::info!(who = self.follow.who, revision, vms, devices, "routing tables swapped in");
                for f in self.listeners.swap.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    f(revision);
                }
            }
        }
        match self.chores.as_mut() {
            Some(chores) => chores(&*self.store),
            None => Ok(None),
        }
    }
}
