//! One suite, run against every store: the embedded redb file and a real
//! etcd server this test starts on the loopback (Debian's etcd-server; the
//! etcd tests skip with one line where it is not installed, and fail under
//! DMFABRIC_REQUIRE_PRIVILEGED=1, as CI runs them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmfabric_control::etcd::EtcdStore;
use dmfabric_control::model::fixtures::{platform, uart};
use dmfabric_control::model::{Change, Db, Device, Range};
use dmfabric_control::store::Poke;
use dmfabric_control::store::{self, RedbStore, Store};
use dmfabric_control::watch::{Follow, Watch};
use dmfabric_testkit::etcd::{start_or_skip, EtcdProcess};

/// A store kind under test: opens (and reopens) its store.
trait Kind {
    fn open(&self) -> Box<dyn Store>;
}

struct Redb(std::path::PathBuf);

impl Redb {
    fn new(name: &str) -> Redb {
        let p = std::env::temp_dir().join(format!("dmfabric-suite-{name}-{}.redb", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Redb(p)
    }
}

impl Kind for Redb {
    fn open(&self) -> Box<dyn Store> {
        Box::new(RedbStore::open(&self.0).unwrap())
    }
}

impl Drop for Redb {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let mut poked = self.0.clone().into_os_string();
        poked.push(".changed");
        let _ = std::fs::remove_file(poked);
    }
}

struct Etcd(EtcdProcess);

impl Etcd {
    fn new(test: &str) -> Option<Etcd> {
        start_or_skip(test, EtcdProcess::start).map(Etcd)
    }
}

impl Kind for Etcd {
    fn open(&self) -> Box<dyn Store> {
        store::open(&format!("etcd://{}", self.0.endpoint)).unwrap()
    }
}

fn setup() -> Vec<Change> {
    let mut changes = platform();
    changes.push(Change::AddDevice(uart(1, 0x3f8)));
    changes
}

fn commits_survive_reopening_and_conflicts_change_nothing(kind: &dyn Kind) {
    {
        let s = kind.open();
        assert_eq!((s.revision().unwrap(), s.load().unwrap()), (0, Db::default()));
        let (rev, said) = s.commit(&setup()).unwrap();
        assert_eq!((rev, said.len()), (1, 4));
        let err = s.commit(&[Change::RemoveServer(10)]).unwrap_err();
        assert!(err.to_string().contains("still used by device 1"), "{err}");
        assert_eq!(s.revision().unwrap(), 1, "a refused commit bumps nothing");
        let err = s.commit(&[Change::AddDevice(uart(2, 0x3f8))]).unwrap_err();
        assert_eq!(err.to_string(), "device 2's pio 0x3f8+0x8 overlaps device 1's pio 0x3f8+0x8 in VM 100");
    }
    let s = kind.open();
    let db = s.load().unwrap();
    assert_eq!((db.clients.len(), db.servers.len(), db.vms.len(), db.devices.len()), (1, 1, 1, 1));
    assert_eq!(db.devices[&1].ranges[0].base, 0x3f8);
    let (rev, said) = s.commit(&[Change::RemoveDevice(1), Change::RemoveServer(10)]).unwrap();
    assert_eq!((rev, said), (2, vec!["removed device 1".to_string(), "removed server 10".to_string()]));
    let db = s.load().unwrap();
    assert!(db.devices.is_empty() && db.servers.is_empty());
    assert_eq!(db.vms[&100].client, 1);
}

/// Two writers race for the same ports of VM 100: each port goes to
/// exactly one of them, and every success bumped the revision once.
fn racing_writers_never_both_get_a_conflicting_change_in(kind: &dyn Kind) {
    let s: Arc<dyn Store> = kind.open().into();
    s.commit(&platform()).unwrap();
    let ports = 24u32;
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut won = Vec::new();
                for p in 0..ports {
                    let d = Device {
                        id: 1 + w * 1000 + p,
                        ranges: vec![Range { mmio: false, base: 0x100 + u64::from(p) * 8, len: 8 }],
                        ..uart(0, 0)
                    };
                    match s.commit(&[Change::AddDevice(d)]) {
                        Ok(_) => won.push(p),
                        Err(e) => assert!(e.to_string().contains("overlaps"), "{e}"),
                    }
                }
                won
            })
        })
        .collect();
    let mut won: Vec<u32> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    won.sort_unstable();
    assert_eq!(won, (0..ports).collect::<Vec<_>>(), "each port exactly once");
    assert_eq!(s.revision().unwrap(), 1 + u64::from(ports));
    assert_eq!(s.load().unwrap().devices.len(), ports as usize);
}

/// Saved states in transit: taken once, then gone; the revision stays.
fn device_states_are_taken_once(kind: &dyn Kind) {
    let s = kind.open();
    s.commit(&setup()).unwrap();
    assert_eq!(s.take_state("device/1").unwrap(), None);
    let blob: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    s.put_state("device/1", &blob).unwrap();
    // Larger than one etcd request may be.
    let big: Vec<u8> = (0..=250u8).cycle().take(3 << 20).collect();
    s.put_state("vm/100", &big).unwrap();
    assert_eq!(s.revision().unwrap(), 1);
    let again = kind.open();
    assert_eq!(again.take_state("device/1").unwrap().as_deref(), Some(&blob[..]));
    assert_eq!(s.take_state("device/1").unwrap(), None, "taken once");
    assert!(again.take_state("vm/100").unwrap().as_deref() == Some(&big[..]), "a 3 MiB state in one piece");
    assert_eq!(s.take_state("vm/100").unwrap(), None);
}

/// A watch swaps in the table of every commit, while a reader holds on to
/// the table it loaded before.
fn a_watch_swaps_in_each_commit(kind: &dyn Kind) {
    let s = kind.open();
    s.commit(&platform()).unwrap();
    let w = Watch::start(kind.open(), "test".into(), Duration::from_millis(10), None).unwrap();
    let routes = w.routes();
    let before = routes.load();
    assert_eq!(before.route(100, false, 0x3f8), None);
    s.commit(&[Change::AddDevice(uart(1, 0x3f8))]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while routes.revision() != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(routes.load().route(100, false, 0x3f8).map(|h| (h.device, h.server)), Some((1, 10)));
    assert_eq!(before.route(100, false, 0x3f8), None, "the held table is untouched");
    assert_eq!(w.health().swaps.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// A watch that would poll only once an hour: whatever it sees, the store pushed.
const NEVER: Duration = Duration::from_secs(3600);

/// Wait up to `limit` for `done` (a bound on a hang, not a timing).
fn within(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// A watch that never polls is told of a commit, and of a state put in
/// transit (which does not move the revision), and reads the new table.
fn a_watch_is_told_of_commits_and_states_without_polling(kind: &dyn Kind) {
    let s = kind.open();
    s.commit(&platform()).unwrap();
    let w = Watch::start_with(kind.open(), Follow::new("test", NEVER).with_states("device/"), |_| None).unwrap();
    assert!(w.pushed(), "the store pushes");
    let pokes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let p = pokes.clone();
    w.on_poke(Box::new(move || {
        p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let routes = w.routes();
    s.commit(&[Change::AddDevice(uart(1, 0x3f8))]).unwrap();
    assert!(within(Duration::from_secs(10), || routes.revision() == 2), "told of the commit");
    assert_eq!(routes.load().route(100, false, 0x3f8).map(|h| h.device), Some(1));
    let before = pokes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(before >= 1, "the commit was a push");
    s.put_state("device/1", b"state").unwrap();
    assert!(
        within(Duration::from_secs(10), || pokes.load(std::sync::atomic::Ordering::SeqCst) > before),
        "told of the state"
    );
    assert_eq!(routes.revision(), 2, "a state is not a revision");
    assert_eq!(w.health().errors.load(std::sync::atomic::Ordering::Relaxed), 0);
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(
                #[test]
                fn $name() {
                    let kind = super::Redb::new(stringify!($name));
                    super::$name(&kind);
                }
            )*
        }
        mod etcd {
            $(
                #[test]
                fn $name() {
                    if let Some(kind) = super::Etcd::new(concat!("etcd::", stringify!($name))) {
                        super::$name(&kind);
                    }
                }
            )*
        }
    };
}

suite!(
    commits_survive_reopening_and_conflicts_change_nothing,
    racing_writers_never_both_get_a_conflicting_change_in,
    device_states_are_taken_once,
    a_watch_swaps_in_each_commit,
    a_watch_is_told_of_commits_and_states_without_polling,
);

/// etcd goes away and comes back on the same data: a watch that never
/// polls keeps its table meanwhile, then is told of a change made once
/// etcd is back (its etcd watch resumed from the revision it had).
#[test]
fn an_etcd_that_comes_back_is_followed_again() {
    let Some(mut etcd) = Etcd::new("an_etcd_that_comes_back_is_followed_again") else {
        return;
    };
    let s = etcd.open();
    s.commit(&setup()).unwrap();
    let w = Watch::start_with(etcd.open(), Follow::new("test", NEVER), |_| None).unwrap();
    assert!(w.pushed());
    etcd.0.stop();
    assert!(within(Duration::from_secs(20), || !w.pushed()), "the watch noticed etcd went away");
    let t = w.routes().load();
    assert_eq!((t.revision, t.route(100, false, 0x3f8).map(|h| h.device)), (1, Some(1)), "the last table stays");
    etcd.0.restart(&|e| EtcdStore::connect(e).is_ok()).unwrap();
    let again = etcd.open();
    again.commit(&[Change::AddDevice(uart(2, 0x2f8))]).unwrap();
    let routes = w.routes();
    assert!(within(Duration::from_secs(20), || routes.revision() == 2), "the change made after etcd came back");
    assert_eq!(routes.load().route(100, false, 0x2f8).map(|h| h.device), Some(2));
    assert!(within(Duration::from_secs(5), || w.pushed()), "pushing again");
}

/// A subscription asked to resume from a revision etcd compacted away is
/// told to read afresh, and follows from then on.
#[test]
fn a_compacted_revision_is_read_afresh() {
    let Some(etcd) = Etcd::new("a_compacted_revision_is_read_afresh") else {
        return;
    };
    let s = etcd.open();
    s.commit(&platform()).unwrap();
    let behind = etcd.open();
    behind.revision().unwrap(); // its subscription resumes after this read
    for id in 1..=3 {
        s.commit(&[Change::AddDevice(uart(id, 0x3f8 + 8 * id as u64))]).unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([format!("http://{}", etcd.0.endpoint)], None).await.unwrap();
        let now = c.get("/dmfabric/revision", None).await.unwrap().header().unwrap().revision();
        c.compact(now, None).await.unwrap();
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let _sub = behind.subscribe(None, Arc::new(move |p| drop(tx.send(p)))).unwrap().expect("etcd pushes");
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(Poke::Changed), "told to read afresh");
    s.commit(&[Change::RemoveDevice(3)]).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(Poke::Changed), "and follows on");
}

#[test]
fn a_watch_keeps_its_tables_while_etcd_is_down() {
    let Some(mut etcd) = Etcd::new("a_watch_keeps_its_tables_while_etcd_is_down") else {
        return;
    };
    let s = etcd.open();
    s.commit(&setup()).unwrap();
    let w = Watch::start(etcd.open(), "test".into(), Duration::from_millis(10), None).unwrap();
    etcd.0.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.health().errors.load(std::sync::atomic::Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(w.health().unreachable.load(std::sync::atomic::Ordering::Relaxed), "the watch noticed");
    let t = w.routes().load();
    assert_eq!((t.revision, t.route(100, false, 0x3f8).map(|h| h.device)), (1, Some(1)), "the last table stays");
}

#[test]
fn an_unreachable_etcd_is_a_clear_error_within_the_call_limit() {
    let Some(mut etcd) = Etcd::new("an_unreachable_etcd_is_a_clear_error_within_the_call_limit") else {
        return;
    };
    let s = EtcdStore::connect(&etcd.0.endpoint).unwrap();
    s.commit(&setup()).unwrap();
    etcd.0.stop();
    let start = std::time::Instant::now();
    let err = s.revision().unwrap_err().to_string();
    assert!(err.starts_with(&format!("The store etcd at {}:", etcd.0.endpoint)), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(5), "{:?}", start.elapsed());
    let err = EtcdStore::connect(&etcd.0.endpoint).unwrap_err().to_string();
    assert!(err.contains("is etcd running there?") || err.contains("unreachable"), "{err}");
}
