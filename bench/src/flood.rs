//! `dmfabric bench flood`: a real client loads a server while a third host
//! on the same bridge floods the server with what an attacker on the
//! segment can send without keys — frames of the right format with a
//! wrong tag (spoofing the client's MAC and ids), frames with no tag,
//! malformed frames, and replays of the client's own recorded frames —
//! at a rate set against the valid request rate. It reports the client's
//! throughput without and with the flood in the same run, and the
//! server's drop counters by reason, which must account for every flood
//! frame that reached it.
//!
//! Hosts (network namespaces on a bridge): 0 the client (the load
//! generator, [`crate::loadgen`]), 1 the server (a thread of this process,
//! so its counters can be read between the phases), 2 the flooder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{self, TestNet, TestNetConfig};
use dmfabric_dataplane::poll::{self, Handler, PollConfig};
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_dataplane::{FrameBatch, Transport, TransportError, TransportStats};
use dmfabric_devices::platform::pc;
use dmfabric_dm_workers::backend::Inline;
use dmfabric_dm_workers::server::{Server, ServerStats};
use dmfabric_wire::session::Seq;
use dmfabric_wire::{AccessSize, Direction, EthernetRepr, FrameRepr, IoRequest, MacAddr, Message, Route, Space};
use serde::Serialize;

use crate::harness::{HarnessError, ServerLaunch, Setup, SERVER_ID};
use crate::loadgen::{self, LoadError, LoadReport, Retry, Target};

/// What to flood with and for how long.
#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// Seconds of each phase (without, then with the flood).
    pub seconds: f64,
    /// The client's requests in flight.
    pub inflight: u16,
    /// Flood frames per valid request the client completed in the first
    /// phase (1.0: as many flood frames as valid requests).
    pub ratio: f64,
    /// Or a fixed rate, frames per second.
    pub rate: Option<u64>,
}

impl Default for FloodConfig {
    fn default() -> Self {
        FloodConfig { seconds: 3.0, inflight: 64, ratio: 1.5, rate: None }
    }
}

/// The kinds of flood frames, by index.
#[cfg(test)]
const KINDS: [&str; 4] = ["forged", "untagged", "malformed", "replayed"];

/// Flood frames sent, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FloodSent {
    /// Valid format, the client's MAC and ids, a tag made without the key.
    pub forged: u64,
    /// Valid format, no tag.
    pub untagged: u64,
    /// Bad magic, bad version, truncated, in turn.
    pub malformed: u64,
    /// The client's own frames from the first phase, sent again.
    pub replayed: u64,
}

impl FloodSent {
    pub fn total(&self) -> u64 {
        self.forged + self.untagged + self.malformed + self.replayed
    }
}

/// How the server counted the flood (its counters' growth over the flood
/// phase), by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FloodCounted {
    /// Tags that did not verify (the forged frames).
    pub bad_tag: u64,
    /// No tag (the untagged frames).
    pub no_tag: u64,
    /// Malformed frames, all reasons.
    pub malformed: u64,
    /// Requests older than their stream's last (the replays, and any late
    /// retransmission of the client's).
    pub stale: u64,
    /// Retransmissions answered from the cache (a replay of a stream's
    /// last request is one; so is the client's own).
    pub duplicates: u64,
    /// Frames the server's transport dropped before they reached it (the
    /// whole run).
    pub rx_dropped: u64,
}

/// The report of one flood run.
#[derive(Debug, Clone, Serialize)]
pub struct FloodJson {
    pub transport: &'static str,
    pub seconds: f64,
    pub inflight: u16,
    /// Valid throughput without, then with the flood.
    pub mreq_per_s_alone: f64,
    pub mreq_per_s_flooded: f64,
    /// `flooded / alone`.
    pub kept: f64,
    /// The flood rate aimed at and achieved, frames per second.
    pub flood_target_pps: u64,
    pub flood_pps: f64,
    /// Flood frames per valid request completed under the flood.
    pub flood_per_valid: f64,
    /// Cores: the server's, the client's, the flooder's (the same as the
    /// client's on a two-core machine).
    pub cores: [usize; 3],
    pub sent: FloodSent,
    pub counted: FloodCounted,
    /// Every forged, untagged and malformed frame counted by its reason,
    /// every replay as stale or answered from the cache (up to what the
    /// transport dropped).
    pub accounted: bool,
    /// The client's answers with wrong data, and requests lost (both 0).
    pub wrong: u64,
    pub lost: u64,
}

/// Runs a server and hands out its counters on request.
struct Counting {
    server: Server<Inline>,
    ask: Arc<AtomicBool>,
    tell: mpsc::Sender<ServerStats>,
}

impl Handler for Counting {
    fn on_frame(&mut self, frame: &[u8], tx: &mut FrameBatch, now: Instant) {
        self.server.on_frame(frame, tx, now);
    }

    fn on_poll(&mut self, tx: &mut FrameBatch, now: Instant) {
        self.server.on_poll(tx, now);
        if self.ask.swap(false, Ordering::AcqRel) {
            let _ = self.tell.send(self.server.stats());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.server.next_deadline()
    }
}

/// Keeps a copy of the first frames sent through it (what an attacker
/// who recorded the link would have).
struct Recording<'t> {
    inner: &'t mut dyn Transport,
    kept: Arc<Mutex<Vec<Vec<u8>>>>,
    max: usize,
}

impl Transport for Recording<'_> {
    fn kind(&self) -> dmfabric_dataplane::TransportKind {
        self.inner.kind()
    }
    fn mac(&self) -> MacAddr {
        self.inner.mac()
    }
    fn recv(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<usize, TransportError> {
        self.inner.recv(max, on_frame)
    }
    fn send(&mut self, batch: &mut FrameBatch) -> Result<usize, TransportError> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        for f in batch.iter() {
            if kept.len() >= self.max {
                break;
            }
            kept.push(f.to_vec());
        }
        drop(kept);
        self.inner.send(batch)
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.inner.wait(timeout)
    }
    fn stats(&self) -> TransportStats {
        self.inner.stats()
    }
}

/// Frames a keyless attacker makes: (kind index, bytes).
fn flood_frames(client_mac: MacAddr, server_mac: MacAddr, replays: &[Vec<u8>]) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let request = |i: u32| {
        let req = IoRequest {
            route: Route { server: SERVER_ID, hypervisor: 1, client: loadgen::CLIENT_ID, vm: 1, vcpu: 0, device: 1 },
            seq: Seq::new(i.wrapping_mul(2_654_435_761), i).0,
            space: Space::Pio,
            dir: Direction::Write,
            size: AccessSize::B4,
            addr: u64::from(pc::TEST_DEVICE_PIO.base),
            data: u64::from(i),
        };
        FrameRepr::new(EthernetRepr { dst: server_mac, src: client_mac }, Message::IoRequest(req))
    };
    for i in 0..256u32 {
        // A tag made up (the client's MAC, ids and key id, no key).
        let mut forged = request(i);
        forged.auth_tag = Some([(i as u8) ^ 0x5a; 16]);
        forged.key_id = 1;
        let mut buf = vec![0u8; forged.buffer_len()];
        if forged.emit(&mut buf).is_ok() {
            out.push((0, buf));
        }
        let untagged = request(i + 1000);
        let mut buf = vec![0u8; untagged.buffer_len()];
        if untagged.emit(&mut buf).is_ok() {
            out.push((1, buf.clone()));
            // Malformed, three ways in turn.
            let mut bad = buf.clone();
            match i % 3 {
                0 => bad[14] ^= 0xff,  // magic
                1 => bad[16] = 1,      // an old version
                _ => bad.truncate(40), // cut short
            }
            out.push((2, bad));
        }
    }
    for r in replays {
        out.push((3, r.clone()));
    }
    out
}

/// Send `frames` in turn at `pps` until `stop`; counts by kind.
fn flood(
    t: &mut dyn Transport,
    frames: &[(usize, Vec<u8>)],
    pps: u64,
    stop: &AtomicBool,
) -> Result<FloodSent, TransportError> {
    let mut sent = [0u64; 4];
    let mut batch = FrameBatch::new();
    let start = Instant::now();
    let mut i = 0usize;
    let per_batch = 32u64;
    let mut total = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Where the count should be by now; send up to it, a batch at a time.
        let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
        if total >= due {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        let n = (due - total).min(per_batch);
        for _ in 0..n {
            let (kind, f) = &frames[i % frames.len()];
            i += 1;
            if batch.push(f) {
                sent[*kind] += 1;
            }
        }
        total += n;
        t.send(&mut batch)?;
    }
    Ok(FloodSent { forged: sent[0], untagged: sent[1], malformed: sent[2], replayed: sent[3] })
}

fn mreq(r: &LoadReport) -> f64 {
    r.completed as f64 / r.elapsed.as_secs_f64().max(1e-9) / 1e6
}

/// Run the flood bench over AF_XDP.
pub fn run(cfg: &FloodConfig, stop: &Arc<AtomicBool>) -> Result<FloodJson, HarnessError> {
    let net = TestNet::new(TestNetConfig { hosts: 3, ..TestNetConfig::default() })?;
    // The flooder sends with the client's source MAC (forgeries and
    // replays must): its switch port does not learn from what it sends, as
    // with port security, or the bridge would send the client's answers to
    // it — a switch's matter, not what this bench measures.
    net.set_port_learning(2, false)?;
    let setup = Setup::new(dmfabric_dataplane::TransportKind::Xdp, ServerLaunch::Thread);
    let (client_mac, server_mac) = (net.host(0).mac, net.host(1).mac);
    let cores = dmfabric_pinning::available_cores();
    let server_core = cores[cores.len() - 1];
    // The server keeps its core: on a real segment the flooder is another
    // host. With three cores or more the client and the flooder get one
    // each; with two they share the other one, and the flooded figure then
    // counts the client's lost CPU share as well as the server's work.
    let load_core = cores[0];
    let flood_core = if cores.len() >= 3 { cores[1] } else { load_core };

    // The server, in host 1, counting.
    let server_stop = Arc::new(AtomicBool::new(false));
    let ask = Arc::new(AtomicBool::new(false));
    let (tell, counts) = mpsc::channel::<ServerStats>();
    let (ready_tx, ready) = mpsc::channel::<Result<(), String>>();
    let (ns, flag, asked, server_setup) = (net.host(1).ns.clone(), server_stop.clone(), ask.clone(), setup.clone());
    let server = std::thread::spawn(move || -> Option<(ServerStats, TransportStats)> {
        let opened = (|| -> Result<XdpTransport, String> {
            netns::enter(&ns).map_err(|e| e.to_string())?;
            dmfabric_pinning::pin_current(server_core).map_err(|e| e.to_string())?;
            XdpTransport::open(&XdpConfig::new(netns::HOST_IFACE)).map_err(|e| e.to_string())
        })();
        let mut t = match opened {
            Ok(t) => t,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return None;
            }
        };
        let devices = [pc::test_device(pc::TEST_DEVICE_ID)];
        let server = server_setup.server(t.mac(), client_mac, &devices);
        let mut h = Counting { server, ask: asked, tell };
        let _ = ready_tx.send(Ok(()));
        let _ = poll::run(&mut t, &mut h, PollConfig { spin: u32::MAX, ..PollConfig::default() }, &flag);
        Some((h.server.stats(), t.stats()))
    });
    let snapshot = || -> Result<ServerStats, HarnessError> {
        ask.store(true, Ordering::Release);
        counts.recv_timeout(Duration::from_secs(5)).map_err(|_| HarnessError::ServerStart("no counters".into()))
    };
    let result = (|| -> Result<FloodJson, HarnessError> {
        ready
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| HarnessError::ServerStart("timed out".into()))?
            .map_err(HarnessError::ServerStart)?;
        // The client, in host 0.
        dmfabric_pinning::pin_current(load_core)?;
        let sealer = setup.sealer();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let phase = Duration::from_secs_f64(cfg.seconds);
        let retry = Retry { timeout: Duration::from_millis(20), retries: 50 };
        let (alone, mut client_t) = net.with_host(0, || -> Result<(LoadReport, XdpTransport), LoadError> {
            let mut t = XdpTransport::open(&XdpConfig::new(netns::HOST_IFACE))?;
            let session = loadgen::discover(&mut t, loadgen::CLIENT_ID, &sealer, Duration::from_secs(5))?;
            let target = Target::test_device(&session, &sealer);
            let mut rec = Recording { inner: &mut t, kept: recorded.clone(), max: 256 };
            let r = loadgen::throughput(&mut rec, &target, phase, cfg.inflight, retry, stop)?;
            Ok((r, t))
        })??;
        let pps = cfg.rate.unwrap_or_else(|| (mreq(&alone) * 1e6 * cfg.ratio) as u64).max(1);
        let replays = recorded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let frames = flood_frames(client_mac, server_mac, &replays);
        let before = snapshot()?;
        // The flood, from host 2, while the client loads again in a new session.
        let flood_stop = Arc::new(AtomicBool::new(false));
        let (fns, fstop) = (net.host(2).ns.clone(), flood_stop.clone());
        let flooder = std::thread::spawn(move || -> Result<FloodSent, String> {
            netns::enter(&fns).map_err(|e| e.to_string())?;
            dmfabric_pinning::pin_current(flood_core).map_err(|e| e.to_string())?;
            let mut t = XdpTransport::open(&XdpConfig::new(netns::HOST_IFACE)).map_err(|e| e.to_string())?;
            flood(&mut t, &frames, pps, &fstop).map_err(|e| e.to_string())
        });
        let flood_start = Instant::now();
        let flooded = net.with_host(0, || -> Result<LoadReport, LoadError> {
            let session = loadgen::discover(&mut client_t, loadgen::CLIENT_ID, &sealer, Duration::from_secs(5))?;
            let target = Target::test_device(&session, &sealer);
            loadgen::throughput(&mut client_t, &target, phase, cfg.inflight, retry, stop)
        });
        flood_stop.store(true, Ordering::Release);
        let flood_secs = flood_start.elapsed().as_secs_f64();
        let sent = flooder.join().map_err(|_| HarnessError::ServerStart("the flooder panicked".into()))?;
        let sent = sent.map_err(HarnessError::ServerStart)?;
        let flooded = flooded??;
        // Let the last flood frames drain before counting.
        std::thread::sleep(Duration::from_millis(200));
        let after = snapshot()?;
        let reason =
            |s: &ServerStats, name: &str| s.unauthenticated.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c);
        let counted = FloodCounted {
            bad_tag: reason(&after, "bad_tag") - reason(&before, "bad_tag"),
            no_tag: reason(&after, "no_tag") - reason(&before, "no_tag"),
            malformed: after.malformed_total() - before.malformed_total(),
            stale: after.stale - before.stale,
            duplicates: after.duplicates_answered - before.duplicates_answered,
            rx_dropped: 0,
        };
        let (alone_m, flooded_m) = (mreq(&alone), mreq(&flooded));
        Ok(FloodJson {
            transport: "xdp",
            seconds: cfg.seconds,
            inflight: cfg.inflight,
            mreq_per_s_alone: round4(alone_m),
            mreq_per_s_flooded: round4(flooded_m),
            kept: round4(flooded_m / alone_m.max(1e-9)),
            flood_target_pps: pps,
            flood_pps: (sent.total() as f64 / flood_secs.max(1e-9)).round(),
            flood_per_valid: round4(sent.total() as f64 / (flooded.completed.max(1)) as f64),
            cores: [server_core, load_core, flood_core],
            sent,
            counted,
            accounted: false,
            wrong: alone.wrong + flooded.wrong,
            lost: alone.lost + flooded.lost,
        })
    })();
    server_stop.store(true, Ordering::Release);
    let end = server.join().ok().flatten();
    let mut json = result?;
    if let Some((_, t)) = end {
        json.counted.rx_dropped = t.rx_dropped;
    }
    let c = &json.counted;
    let s = &json.sent;
    let slack = c.rx_dropped;
    let exact = |sent: u64, counted: u64| counted <= sent && sent - counted <= slack;
    json.accounted = exact(s.forged, c.bad_tag)
        && exact(s.untagged, c.no_tag)
        && exact(s.malformed, c.malformed)
        && c.stale + c.duplicates + slack >= s.replayed;
    Ok(json)
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flood_mixes_every_kind_and_none_is_authentic() {
        let (c, s) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        let frames = flood_frames(c, s, &[vec![1, 2, 3]]);
        for (kind, name) in KINDS.iter().enumerate() {
            assert!(frames.iter().any(|(k, _)| *k == kind), "{name}");
        }
        let ring = dmfabric_wire::auth::KeyRing::single(1, &dmfabric_wire::auth::Secret::from_bytes([9; 32]));
        for (kind, f) in frames.iter().filter(|(k, _)| *k < 3) {
            match dmfabric_wire::Frame::new_checked(&f[..]) {
                Ok(frame) => assert!(ring.verify(&frame).is_err(), "{}", KINDS[*kind]),
                Err(_) => assert_eq!(*kind, 2, "only the malformed ones fail to parse"),
            }
        }
    }
}
