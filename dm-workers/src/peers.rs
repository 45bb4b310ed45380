//! Who a server acts for, and what it remembers of each of them.
//!
//! - [`Registry`]: the client platforms this server may act for — each
//!   one's keys, registered MAC, hypervisor id and VMs with their vCPU
//!   counts — and the MACs of the other servers (owner servers forward
//!   requests). It comes from the control panel's records (placed) or the
//!   server's config (unplaced), and is swapped whole when they change.
//! - [`Peers`]: per registered client platform, its sessions and its
//!   request streams ([`dmfabric_wire::session`]). Entries exist only for
//!   clients of the registry and only after a frame of theirs verified, so
//!   nothing a forger sends makes them grow; a client's streams are bounded
//!   by its VMs × vCPUs × devices, and a client silent for
//!   [`Peers::idle`] is forgotten whole (it says Hello again). Forgetting a
//!   client is O(its streams).
//!
//! The rules a stream keeps (stop-and-wait: one request of a vCPU to a
//! device in flight): its last sequence number again is a retransmission
//! (answered from the cache), the next one runs, anything else is stale.
//! A stream (re)starts only at counter 0 of a session this server offered
//! in this life ([`Peers::hello`]), from a frame naming its epoch: so a
//! recorded frame of an earlier session or life never runs again, and a
//! replayed Hello only makes the server offer one more session nobody can
//! use.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use dmfabric_wire::auth::KeyRing;
use dmfabric_wire::session::Seq;
use dmfabric_wire::{IoCompletion, MacAddr};

/// A client platform this server may act for.
#[derive(Debug, Clone)]
pub struct Client {
    pub id: u16,
    /// Its registered data-plane MAC: where every answer to it goes.
    pub mac: MacAddr,
    pub hypervisor: u16,
    pub keys: KeyRing,
    /// Its VMs (and VMs migrating to it): (id, vCPUs), sorted by id.
    pub vms: Vec<(u32, u16)>,
}

impl Client {
    /// The vCPU count of `vm`, if it is one of this client's.
    pub fn vcpus(&self, vm: u32) -> Option<u16> {
        self.vms.binary_search_by_key(&vm, |v| v.0).ok().map(|i| self.vms[i].1)
    }
}

/// The client platforms a server acts for and the servers that may
/// forward to it. Built off the data-plane core, swapped whole.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Sorted by id.
    clients: Vec<Client>,
    /// Other servers (owner servers forward requests from them).
    servers: Vec<(u16, MacAddr)>,
    /// Which client platform runs each VM (interrupts go there).
    runs_on: HashMap<u32, u16>,
    /// VMs whose interrupt controller (an I/O APIC model) is on another
    /// server: that server's id and MAC (their devices' lines go there).
    chips: HashMap<u32, (u16, MacAddr)>,
}

impl Registry {
    /// A registry of `clients` and `servers`; `runs_on` says which client
    /// platform a VM runs on when two may send for it (a migration).
    pub fn new(mut clients: Vec<Client>, servers: Vec<(u16, MacAddr)>, runs_on: HashMap<u32, u16>) -> Registry {
        clients.sort_by_key(|c| c.id);
        clients.dedup_by_key(|c| c.id);
        for c in &mut clients {
            c.vms.sort_unstable();
            c.vms.dedup_by_key(|v| v.0);
        }
        let mut runs_on = runs_on;
        for c in &clients {
            for &(vm, _) in &c.vms {
                runs_on.entry(vm).or_insert(c.id);
            }
        }
        Registry { clients, servers, runs_on, chips: HashMap::new() }
    }

    /// The same, with the interrupt controllers of VMs that are on other
    /// servers: VM → (server, its MAC).
    pub fn with_chips(mut self, chips: HashMap<u32, (u16, MacAddr)>) -> Registry {
        self.chips = chips;
        self
    }

    /// Where VM `vm`'s interrupt controller is, if on another server.
    pub fn chip_of(&self, vm: u32) -> Option<(u16, MacAddr)> {
        self.chips.get(&vm).copied()
    }

    /// Server `id`'s MAC, if it is another server this one knows.
    pub fn server_mac(&self, id: u16) -> Option<MacAddr> {
        self.servers.iter().find(|(s, _)| *s == id).map(|(_, m)| *m)
    }

    pub fn client(&self, id: u16) -> Option<&Client> {
        self.clients.binary_search_by_key(&id, |c| c.id).ok().map(|i| &self.clients[i])
    }

    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// Whether `mac` is another server's (owner servers forward requests).
    pub fn is_server(&self, mac: MacAddr) -> bool {
        self.servers.iter().any(|(_, m)| *m == mac)
    }

    /// The client platform `vm` runs on.
    pub fn runs_on(&self, vm: u32) -> Option<&Client> {
        self.client(*self.runs_on.get(&vm)?)
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// One request stream of a client platform: a vCPU of a VM to a device
/// (as the request names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct StreamKey {
    pub vm: u32,
    pub vcpu: u16,
    pub device: u32,
}

/// What a server does with a request, by its stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// The next of its stream (or a stream's start): run it.
    New,
    /// The stream's last again. `Some`: its answer, to send again; `None`:
    /// still running, the answer will follow.
    Duplicate(Option<&'a IoCompletion>),
    /// Neither: an old or replayed frame. Dropped without an answer.
    Stale,
    /// No state for the stream and not a start this server can take: the
    /// client must open a session (it gets a `NoSession` Nack).
    NoSession,
}

#[derive(Debug)]
struct Entry {
    last: Seq,
    answer: Option<IoCompletion>,
    /// The device that ran the last request (the stream names 0 when the
    /// client let the server find the device by address).
    ran_on: u32,
}

/// Token bucket: `burst` tokens, refilled at `per_s` a second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket { tokens: burst, at: now }
    }

    fn take(&mut self, burst: f64, per_s: f64, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * per_s;
        self.tokens = (self.tokens + refill).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Hello answers a client may get: a burst, then a few a second.
const HELLO_BURST: f64 = 8.0;
const HELLO_PER_S: f64 = 4.0;
/// Nacks a client may get: enough for every vCPU refused at its retry pace.
const NACK_BURST: f64 = 512.0;
const NACK_PER_S: f64 = 2000.0;
/// Sessions offered and not yet used, kept per client (older ones drop).
const OFFERS: usize = 4;

#[derive(Debug)]
struct Peer {
    /// The session of the client's newest stream start.
    current: Option<u32>,
    offers: VecDeque<u32>,
    streams: HashMap<StreamKey, Entry, RandomState>,
    heard: Instant,
    hellos: Bucket,
    nacks: Bucket,
}

impl Peer {
    fn new(now: Instant) -> Peer {
        Peer {
            current: None,
            offers: VecDeque::with_capacity(OFFERS),
            streams: HashMap::default(),
            heard: now,
            hellos: Bucket::full(HELLO_BURST, now),
            nacks: Bucket::full(NACK_BURST, now),
        }
    }
}

/// What changed for a client when a frame of it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionChange {
    None,
    /// The client started using a session it was offered: its interrupt
    /// streams start again in it.
    Started(u32),
}

/// Counters of [`Peers`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub sessions_offered: u64,
    pub sessions_started: u64,
    pub hellos_limited: u64,
    pub nacks_limited: u64,
    pub clients_evicted: u64,
}

/// Every registered client's sessions and streams.
#[derive(Debug)]
pub struct Peers {
    epoch: u64,
    next_session: u32,
    peers: HashMap<u16, Peer, RandomState>,
    idle: Duration,
    stats: PeerStats,
}

/// How long a client may stay silent before it is forgotten.
pub const IDLE_FORGET: Duration = Duration::from_secs(600);

impl Peers {
    /// A server's memory at its start: a random epoch, sessions counting up
    /// from a random start.
    pub fn new(epoch: u64, first_session: u32) -> Peers {
        Peers {
            epoch,
            next_session: first_session,
            peers: HashMap::default(),
            idle: IDLE_FORGET,
            stats: PeerStats::default(),
        }
    }

    /// [`Peers::new`] with an epoch and a first session from the OS's
    /// random source.
    pub fn random() -> Peers {
        let mut b = [0u8; 12];
        // Without a random source there is no safe epoch: fall back to the
        // clock's nanoseconds, which still differ from any earlier life.
        if getrandom::fill(&mut b).is_err() {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            b[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
            b[8..].copy_from_slice(&t.subsec_nanos().rotate_left(16).to_le_bytes());
        }
        let epoch = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let first = u32::from_le_bytes(b[8..].try_into().unwrap_or_default());
        Peers::new(epoch, first)
    }

    /// Forget a client after this much silence instead of [`IDLE_FORGET`].
    pub fn with_idle(mut self, idle: Duration) -> Peers {
        self.idle = idle;
        self
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch as frames carry it (low 32 bits).
    pub fn epoch32(&self) -> u32 {
        self.epoch as u32
    }

    pub fn stats(&self) -> PeerStats {
        self.stats
    }

    fn peer(&mut self, client: u16, now: Instant) -> &mut Peer {
        let p = self.peers.entry(client).or_insert_with(|| Peer::new(now));
        p.heard = now;
        p
    }

    /// A verified Hello of `client`: the session to offer, or `None` when
    /// the client asks too often (a replay flood): no answer then.
    pub fn hello(&mut self, client: u16, now: Instant) -> Option<u32> {
        let session = self.next_session;
        let p = self.peer(client, now);
        if !p.hellos.take(HELLO_BURST, HELLO_PER_S, now) {
            self.stats.hellos_limited += 1;
            return None;
        }
        if p.offers.len() == OFFERS {
            p.offers.pop_front();
        }
        p.offers.push_back(session);
        self.next_session = session.wrapping_add(1);
        self.stats.sessions_offered += 1;
        Some(session)
    }

    /// Whether a start at `seq` (naming `epoch`) opens a session of
    /// `client`: counter 0, this life's epoch, and the session in force or
    /// offered. Takes the offer.
    fn start(&mut self, client: u16, seq: Seq, epoch: u32, now: Instant) -> Option<SessionChange> {
        if seq.counter() != 0 || epoch != self.epoch32() {
            return None;
        }
        let p = self.peer(client, now);
        if p.current == Some(seq.session()) {
            return Some(SessionChange::None);
        }
        if !p.offers.contains(&seq.session()) {
            return None;
        }
        p.offers.clear();
        p.current = Some(seq.session());
        self.stats.sessions_started += 1;
        Some(SessionChange::Started(seq.session()))
    }

    /// A verified `Register` of `client` naming `seq` (a session's counter
    /// 0) and `epoch`: the client starts using the session.
    pub fn register(&mut self, client: u16, seq: u64, epoch: u32, now: Instant) -> SessionChange {
        self.start(client, Seq(seq), epoch, now).unwrap_or(SessionChange::None)
    }

    /// What to do with a verified request of `client` on stream `key`.
    pub fn check(
        &mut self,
        client: u16,
        key: StreamKey,
        seq: u64,
        epoch: u32,
        now: Instant,
    ) -> (Verdict<'_>, SessionChange) {
        let seq = Seq(seq);
        let last = self.peer(client, now).streams.get(&key).map(|e| e.last);
        match last {
            Some(last) if seq == last => {
                let entry = self.peers.get(&client).and_then(|p| p.streams.get(&key));
                return (Verdict::Duplicate(entry.and_then(|e| e.answer.as_ref())), SessionChange::None);
            }
            Some(last) if seq == last.next() && seq.counter() != 0 => {
                if let Some(e) = self.peers.get_mut(&client).and_then(|p| p.streams.get_mut(&key)) {
                    e.last = seq;
                    e.answer = None;
                }
                return (Verdict::New, SessionChange::None);
            }
            // Another number of the session the stream runs in (a start
            // again included): an old or replayed frame.
            Some(last) if last.session() == seq.session() => return (Verdict::Stale, SessionChange::None),
            _ => {}
        }
        match self.start(client, seq, epoch, now) {
            Some(change) => {
                let p = self.peer(client, now);
                p.streams.insert(key, Entry { last: seq, answer: None, ran_on: key.device });
                (Verdict::New, change)
            }
            None if last.is_some() => (Verdict::Stale, SessionChange::None),
            None => (Verdict::NoSession, SessionChange::None),
        }
    }

    /// Remember `answer` for `seq` on `key`, if it is still the stream's last.
    pub fn answered(&mut self, client: u16, key: StreamKey, seq: u64, answer: IoCompletion) {
        if let Some(e) = self.peers.get_mut(&client).and_then(|p| p.streams.get_mut(&key)) {
            if e.last == Seq(seq) {
                e.ran_on = answer.route.device;
                e.answer = Some(answer);
            }
        }
    }

    /// Whether `client` may be sent one more Nack now.
    pub fn may_nack(&mut self, client: u16, now: Instant) -> bool {
        let p = self.peer(client, now);
        if p.nacks.take(NACK_BURST, NACK_PER_S, now) {
            true
        } else {
            self.stats.nacks_limited += 1;
            false
        }
    }

    /// The session `client` uses now (its interrupt streams run in it).
    pub fn session(&self, client: u16) -> Option<u32> {
        self.peers.get(&client).and_then(|p| p.current)
    }

    /// Forget clients silent for longer than the idle limit, and those no
    /// longer in `registry`; returns how many.
    pub fn forget(&mut self, now: Instant, registry: &Registry) -> usize {
        let before = self.peers.len();
        let idle = self.idle;
        self.peers.retain(|id, p| now.saturating_duration_since(p.heard) < idle && registry.client(*id).is_some());
        let gone = before - self.peers.len();
        self.stats.clients_evicted += gone as u64;
        gone
    }

    /// Streams a client has here.
    pub fn streams(&self, client: u16) -> usize {
        self.peers.get(&client).map_or(0, |p| p.streams.len())
    }

    /// Clients remembered.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The answers of the streams whose last request ran on `device`: what
    /// the server taking `device` over needs to answer retransmissions.
    pub fn answers_of(&self, device: u32) -> Vec<StreamAnswer> {
        let mut out = Vec::new();
        for (&client, p) in &self.peers {
            for (&key, e) in &p.streams {
                if let Some(a) = e.answer.filter(|_| e.ran_on == device) {
                    out.push(StreamAnswer { client, key, last: e.last.0, answer: a });
                }
            }
        }
        out
    }

    /// Take over a stream's last request and answer from the server a
    /// device came from: the stream's state moves with its device (what
    /// this server knew of it is older: requests for the device were held,
    /// unchecked, until now).
    pub fn adopt(&mut self, a: &StreamAnswer, now: Instant) {
        let p = self.peer(a.client, now);
        p.streams.insert(a.key, Entry { last: Seq(a.last), answer: Some(a.answer), ran_on: a.answer.route.device });
    }
}

/// A stream's last request and its answer, handed over with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAnswer {
    pub client: u16,
    pub key: StreamKey,
    pub last: u64,
    pub answer: IoCompletion,
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_wire::{AccessSize, Direction, Route, Space, Status};

    const EPOCH: u64 = 0x1234_5678_9abc_def0;
    const E: u32 = EPOCH as u32;

    fn key(vcpu: u16) -> StreamKey {
        StreamKey { vm: 7, vcpu, device: 1 }
    }

    fn answer(data: u64) -> IoCompletion {
        IoCompletion {
            route: Route { device: 1, ..Route::default() },
            seq: 0,
            space: Space::Pio,
            dir: Direction::Read,
            size: AccessSize::B1,
            addr: 0,
            data,
            status: Status::Ok,
        }
    }

    fn opened(p: &mut Peers, client: u16, now: Instant) -> u32 {
        let s = p.hello(client, now).unwrap();
        assert_eq!(p.register(client, Seq::new(s, 0).0, E, now), SessionChange::Started(s));
        s
    }

    #[test]
    fn a_stream_takes_only_its_next_number_and_answers_its_last_again() {
        let now = Instant::now();
        let mut p = Peers::new(EPOCH, 100);
        let s = opened(&mut p, 3, now);
        let seq = |n| Seq::new(s, n).0;
        assert_eq!(p.check(3, key(0), seq(0), E, now).0, Verdict::New);
        assert_eq!(p.check(3, key(0), seq(0), E, now).0, Verdict::Duplicate(None));
        p.answered(3, key(0), seq(0), answer(5));
        assert_eq!(p.check(3, key(0), seq(0), 0, now).0, Verdict::Duplicate(Some(&answer(5))));
        assert_eq!(p.check(3, key(0), seq(1), 0, now).0, Verdict::New);
        // Old, far ahead, a restart in the same session: all stale.
        for n in [0, 5, u32::MAX] {
            assert_eq!(p.check(3, key(0), seq(n), E, now).0, Verdict::Stale, "{n}");
        }
        assert_eq!(p.check(3, key(0), seq(2), 0, now).0, Verdict::New, "the next still runs");
        // Streams are independent.
        assert_eq!(p.check(3, key(1), seq(0), E, now).0, Verdict::New);
        assert_eq!(p.check(3, StreamKey { device: 2, ..key(0) }, seq(0), E, now).0, Verdict::New);
    }

    #[test]
    fn a_stream_starts_only_in_a_session_offered_in_this_life() {
        let now = Instant::now();
        let mut p = Peers::new(EPOCH, 100);
        // Nothing offered: no start, whatever the number.
        assert_eq!(p.check(3, key(0), Seq::new(100, 0).0, E, now).0, Verdict::NoSession);
        let s = p.hello(3, now).unwrap();
        // Another epoch (a frame of an earlier life), a counter past 0: refused.
        assert_eq!(p.check(3, key(0), Seq::new(s, 0).0, E ^ 1, now).0, Verdict::NoSession);
        assert_eq!(p.check(3, key(0), Seq::new(s, 1).0, E, now).0, Verdict::NoSession);
        // Offered to client 3 only.
        assert_eq!(p.check(4, key(0), Seq::new(s, 0).0, E, now).0, Verdict::NoSession);
        let (v, change) = p.check(3, key(0), Seq::new(s, 0).0, E, now);
        assert_eq!((v, change), (Verdict::New, SessionChange::Started(s)));
        // A later session restarts a stream; the old session's numbers are stale then.
        let t = opened(&mut p, 3, now);
        assert_ne!(s, t, "never the same session twice");
        assert_eq!(p.check(3, key(0), Seq::new(t, 0).0, E, now).0, Verdict::New);
        assert_eq!(p.check(3, key(0), Seq::new(s, 1).0, E, now).0, Verdict::Stale);
        // Offers are consumed: the old offer cannot start a stream now.
        assert_eq!(p.check(3, key(5), Seq::new(s, 0).0, E, now).0, Verdict::NoSession);
    }

    #[test]
    fn hellos_are_rate_limited_and_idle_clients_forgotten() {
        let t0 = Instant::now();
        let mut p = Peers::new(EPOCH, u32::MAX - 1).with_idle(Duration::from_secs(10));
        let offered: Vec<Option<u32>> = (0..20).map(|_| p.hello(3, t0)).collect();
        assert_eq!(offered.iter().flatten().count(), HELLO_BURST as usize);
        assert_eq!(offered[0..3], [Some(u32::MAX - 1), Some(u32::MAX), Some(0)], "ids wrap");
        assert_eq!(p.stats().hellos_limited, 20 - HELLO_BURST as u64);
        assert!(p.hello(3, t0 + Duration::from_secs(1)).is_some(), "refilled");
        let client = |id: u16| Client {
            id,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            hypervisor: 1,
            keys: dmfabric_wire::auth::KeyRing::single(1, &dmfabric_wire::auth::Secret::from_bytes([1; 32])),
            vms: vec![(7, 1)],
        };
        let reg = Registry::new(vec![client(3), client(4)], vec![], HashMap::new());
        p.hello(4, t0 + Duration::from_secs(9));
        assert_eq!(p.forget(t0 + Duration::from_secs(12), &reg), 1, "client 3 was silent for 11 s");
        assert_eq!(p.len(), 1);
        assert_eq!(p.forget(t0 + Duration::from_secs(12), &Registry::default()), 1, "unregistered");
        assert!(p.is_empty());
    }

    #[test]
    fn a_moving_device_takes_its_answers_along() {
        let now = Instant::now();
        let mut a = Peers::new(EPOCH, 1);
        let s = opened(&mut a, 3, now);
        a.check(3, key(0), Seq::new(s, 0).0, E, now);
        a.answered(3, key(0), Seq::new(s, 0).0, answer(9));
        let answers = a.answers_of(1);
        assert_eq!(answers.len(), 1);
        assert!(a.answers_of(2).is_empty());
        let mut b = Peers::new(EPOCH ^ 0xff, 500);
        for x in &answers {
            b.adopt(x, now);
        }
        // The retransmission is answered from the cache; the stream goes on
        // in its session although b never offered it.
        assert_eq!(b.check(3, key(0), Seq::new(s, 0).0, 0, now).0, Verdict::Duplicate(Some(&answer(9))));
        assert_eq!(b.check(3, key(0), Seq::new(s, 1).0, 0, now).0, Verdict::New);
    }
}
