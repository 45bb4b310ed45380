//! `--metrics ADDR:PORT`: the server's and the client's counters in the
//! Prometheus text format, served over HTTP by a thread of its own, never
//! on a data-plane core.
//!
//! Nothing here runs on the hot path. The data plane keeps its plain
//! per-core counters; at each scrape this thread asks the owner for a copy
//! ([`dmfabric_dataplane::observe::Mailbox`]: the server's core looks at
//! one flag per poll, where it looks at SIGUSR1's; each vCPU at one flag
//! per exit) or reads them as SIGUSR1 does (the client's link counters),
//! then encodes them with `prometheus-client`.
//!
//! Labels come only from this process's configuration or the control
//! panel's records (server, client, VM and device ids; the reason of a
//! drop, a name from the code): never from a frame off the wire.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;
use dmfabric_dataplane::observe::{LatencyBuckets, LATENCY_BOUNDS_NS};
use dmfabric_dm_workers::backend::ShardStats;
use dmfabric_dm_workers::server::ServerStats;
use dmfabric_vmm_shim::live::{target_labels, LiveRun};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// A value of a series.
#[derive(Debug, Clone)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(LatencyBuckets),
}

/// A metric family: one name, one type, many label sets.
#[derive(Debug, Clone)]
pub struct Family {
    /// The name as written, without `_total` (added to counters).
    pub name: String,
    pub help: String,
    pub series: Vec<(Labels, Value)>,
}

impl Family {
    fn new(name: impl Into<String>, help: impl Into<String>) -> Family {
        Family { name: name.into(), help: help.into(), series: Vec::new() }
    }

    fn with(mut self, labels: Labels, value: Value) -> Family {
        self.series.push((labels, value));
        self
    }

    fn metric_type(&self) -> MetricType {
        match self.series.first().map(|s| &s.1) {
            Some(Value::Gauge(_)) => MetricType::Gauge,
            Some(Value::Histogram(_)) => MetricType::Histogram,
            _ => MetricType::Counter,
        }
    }
}

#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in self.0.iter().filter(|f| !f.series.is_empty()) {
            let mut m = encoder.encode_descriptor(&f.name, &f.help, None, f.metric_type())?;
            for (labels, value) in &f.series {
                let mut s = m.encode_family(labels)?;
                match value {
                    Value::Counter(v) => s.encode_counter::<NoLabelSet, u64, u64>(v, None)?,
                    Value::Gauge(v) => s.encode_gauge(v)?,
                    Value::Histogram(h) => {
                        // The encoder sums the buckets itself: hand it each one's own count.
                        let mut below = 0;
                        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
                            .iter()
                            .zip(h.cumulative)
                            .map(|(&le, c)| {
                                let own = c - below;
                                below = c;
                                (le as f64 / 1e9, own)
                            })
                            .collect();
                        s.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count, &buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// `families` in the Prometheus text format (version 0.0.4).
pub fn render(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::warn!("cannot encode the metrics: {e}");
    }
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How long a scrape waits for the data plane to hand over its copy.
pub const FETCH_WAIT: Duration = Duration::from_millis(100);

/// A bound metrics listener, not serving yet: bind first, before anything
/// else starts, so that a port in use stops the command before it did
/// anything.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Endpoint {
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Endpoint> {
        let listener = TcpListener::bind(addr).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
                "Cannot serve metrics on {addr}: port {} is already in use (another dmfabric or exporter?): pick another --metrics port",
                addr.port()
            ),
            std::io::ErrorKind::AddrNotAvailable => anyhow::anyhow!(
                "Cannot serve metrics on {addr}: no interface here has that address: give one of this host's addresses (or 127.0.0.1) in --metrics"
            ),
            _ => anyhow::anyhow!("Cannot serve metrics on {addr}: {e}"),
        })?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Endpoint { listener, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve `GET /metrics` with what `render` says at each scrape, on a
    /// thread pinned to `core` if given (one off the data plane). The
    /// thread ends with the process.
    pub fn serve(self, core: Option<usize>, render: impl Fn() -> String + Send + 'static) -> anyhow::Result<()> {
        std::thread::Builder::new()
            .name("dmf-metrics".into())
            .spawn(move || {
                if let Some(c) = core {
                    let _ = dmfabric_pinning::pin_current(c);
                }
                for conn in self.listener.incoming() {
                    match conn {
                        Ok(s) => {
                            if let Err(e) = answer(s, &render) {
                                tracing::debug!("metrics: a scrape failed: {e}");
                            }
                        }
                        Err(e) => {
                            tracing::warn!("metrics: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .context("Cannot start the metrics thread")?;
        Ok(())
    }
}

/// A core for the metrics thread: one no data-plane thread is pinned to,
/// if there is one.
pub fn off_core(avoid: &[usize]) -> Option<usize> {
    dmfabric_pinning::available_cores().into_iter().find(|c| !avoid.contains(c))
}

/// Answer one HTTP request: the metrics for `GET /metrics`, 404 for other
/// paths, 405 for other methods; the connection closes after it.
fn answer(mut s: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 8192];
    let mut n = 0;
    // The request head, at most 8 KiB.
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        let got = s.read(&mut buf[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or_default(), first.next().unwrap_or_default());
    let path = path.split('?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, render()),
        ("GET", "/") => ("200 OK", "text/plain; charset=utf-8", "dmfabric metrics: GET /metrics\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found: GET /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "GET /metrics\n".to_string()),
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(out.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

fn counter(name: &str, help: &str, labels: Labels, v: u64) -> Family {
    Family::new(name, help).with(labels, Value::Counter(v))
}

/// The server's families: `dmfabric_server_*`, labelled `server`.
pub fn server_families(id: u16, stats: &ServerStats, shards: Option<&ShardStats>) -> Vec<Family> {
    let server = || vec![("server", id.to_string())];
    let mut out = Vec::new();
    for (name, help, v) in stats.counters() {
        out.push(counter(&format!("dmfabric_server_{name}"), help, server(), v));
    }
    let mut nacks = Family::new("dmfabric_server_nacks", "Requests refused with a Nack, by reason");
    for (reason, v) in stats.nacks() {
        nacks.series.push((vec![("server", id.to_string()), ("reason", reason.to_string())], Value::Counter(v)));
    }
    out.push(nacks);
    let mut drops = Family::new("dmfabric_server_drops", "Frames, requests and interrupts dropped, by reason");
    for (reason, v) in stats.drops() {
        drops.series.push((vec![("server", id.to_string()), ("reason", reason)], Value::Counter(v)));
    }
    out.push(drops);
    let dev = |d: &dmfabric_dm_workers::table::DeviceCounters| {
        vec![("server", id.to_string()), ("device", d.id.to_string()), ("kind", d.kind.to_string())]
    };
    let mut reads = Family::new("dmfabric_server_device_reads", "Reads a device served");
    let mut writes = Family::new("dmfabric_server_device_writes", "Writes a device served");
    let mut unclaimed = Family::new("dmfabric_server_device_unclaimed", "Accesses to no register of a device");
    let mut service =
        Family::new("dmfabric_server_device_service_seconds", "Time a device model took per access (tick included)");
    // A device that left and came back is one series: its counts summed.
    let mut devices: Vec<dmfabric_dm_workers::table::DeviceCounters> = Vec::new();
    for d in &stats.devices {
        match devices.iter_mut().find(|e| e.id == d.id) {
            Some(e) => {
                e.reads += d.reads;
                e.writes += d.writes;
                e.unclaimed += d.unclaimed;
                e.service.merge(&d.service);
            }
            None => devices.push(d.clone()),
        }
    }
    for d in &devices {
        reads.series.push((dev(d), Value::Counter(d.reads)));
        writes.series.push((dev(d), Value::Counter(d.writes)));
        unclaimed.series.push((dev(d), Value::Counter(d.unclaimed)));
        service.series.push((dev(d), Value::Histogram(d.service)));
    }
    out.extend([reads, writes, unclaimed, service]);
    if let Some(s) = shards {
        let mut executed = Family::new("dmfabric_server_worker_executed", "Requests each worker core executed");
        for (w, n) in s.executed.iter().enumerate() {
            executed.series.push((vec![("server", id.to_string()), ("worker", w.to_string())], Value::Counter(*n)));
        }
        out.push(executed);
        out.push(counter(
            "dmfabric_server_worker_ring_full",
            "Requests that found their worker's ring full and waited",
            server(),
            s.ring_full,
        ));
        out.push(counter(
            "dmfabric_server_worker_overflow_dropped",
            "Requests dropped because the overflow queue was full too",
            server(),
            s.overflow_dropped,
        ));
    }
    out
}

/// The client's families: `dmfabric_client_*`, labelled `client` (and
/// `vm`, `server`, `device` from the config or the control panel).
pub fn client_families(id: u16, live: &LiveRun) -> Vec<Family> {
    let client = || vec![("client", id.to_string())];
    let mut out = Vec::new();
    if let Some(link) = live.link() {
        let c = link.client;
        for (name, help, v) in [
            ("requests", "I/O requests sent (first copies)", c.requests),
            ("retransmits", "I/O requests sent again", c.retransmits),
            ("completions", "I/O completions taken", c.completions),
            ("nacks", "Requests a server refused", c.nacks),
            ("interrupts", "Interrupts injected", c.interrupts),
            ("interrupt_acks", "Interrupt acknowledgements sent", c.interrupt_acks),
            ("interrupt_duplicates", "Retransmitted interrupts acknowledged again", c.interrupt_duplicates),
            ("interrupts_refused", "Interrupts for a VM being saved to migrate", c.interrupts_refused),
            ("inject_errors", "Interrupts KVM refused", c.inject_errors),
            ("resets", "VM resets its devices asked for", c.resets),
            ("sessions_reopened", "Sessions opened after the first", c.sessions_reopened),
        ] {
            out.push(counter(&format!("dmfabric_client_{name}"), help, client(), v));
        }
        let mut drops = Family::new("dmfabric_client_drops", "Frames dropped (or not sent), by reason");
        for (reason, v) in [
            ("stale_completions", c.stale_completions),
            ("interrupt_stale", c.interrupt_stale),
            ("unknown_vm", c.unknown_vm),
            ("other_client", c.other_client),
            ("malformed", c.malformed),
            ("foreign", c.foreign),
            ("unexpected_kind", c.unexpected_kind),
            ("tx_full", c.tx_full),
            ("unauthenticated", c.unauthenticated),
            ("wrong_source", c.wrong_source),
            ("not_granted", c.not_granted),
            ("stale_hellos", c.stale_hellos),
        ] {
            drops.series.push((vec![("client", id.to_string()), ("reason", reason.to_string())], Value::Counter(v)));
        }
        out.push(drops);
        let vm = |v: u32| vec![("client", id.to_string()), ("vm", v.to_string())];
        let mut families = [
            Family::new("dmfabric_client_vm_requests", "A VM's remote requests (first copies)"),
            Family::new("dmfabric_client_vm_retransmits", "A VM's remote requests sent again"),
            Family::new("dmfabric_client_vm_completions", "A VM's remote completions"),
            Family::new("dmfabric_client_vm_interrupts", "Interrupts injected into a VM"),
        ];
        for (v, s) in &link.vms {
            for (f, n) in families.iter_mut().zip([s.requests, s.retransmits, s.completions, s.interrupts]) {
                f.series.push((vm(*v), Value::Counter(n)));
            }
        }
        out.extend(families);
    }
    // Each vCPU's copy, summed per VM and per (VM, target).
    let samples = live.vcpus(FETCH_WAIT);
    let mut exits = Family::new("dmfabric_client_vm_exits", "A VM's exits, by where they went");
    let mut vms: Vec<(u32, dmfabric_vmm_shim::exits::ExitStats)> = Vec::new();
    type PerTarget = ((u32, String, String), (u64, u64, LatencyBuckets));
    let mut per_target: Vec<PerTarget> = Vec::new();
    for s in &samples {
        match vms.iter_mut().find(|(v, _)| *v == s.vm) {
            Some((_, e)) => *e += s.counters.exits,
            None => vms.push((s.vm, s.counters.exits)),
        }
        for (count, times) in &s.counters.per_device {
            let (server, device) = target_labels(count.target);
            let key = (s.vm, server, device);
            match per_target.iter_mut().find(|(k, _)| *k == key) {
                Some((_, (r, w, t))) => {
                    *r += count.reads;
                    *w += count.writes;
                    t.merge(times);
                }
                None => per_target.push((key, (count.reads, count.writes, *times))),
            }
        }
    }
    vms.sort_by_key(|v| v.0);
    for (v, e) in &vms {
        for (kind, n) in [
            ("local", e.local),
            ("remote", e.remote),
            ("unmapped_read", e.unmapped_reads),
            ("unmapped_write", e.unmapped_writes),
            ("report", e.reports),
        ] {
            let labels = vec![("client", id.to_string()), ("vm", v.to_string()), ("kind", kind.to_string())];
            exits.series.push((labels, Value::Counter(n)));
        }
    }
    out.push(exits);
    let mut reads = Family::new("dmfabric_client_device_reads", "A VM's reads of a device");
    let mut writes = Family::new("dmfabric_client_device_writes", "A VM's writes of a device");
    let mut rtt = Family::new(
        "dmfabric_client_exit_round_trip_seconds",
        "Time from a VM's exit to its answer (a remote device's: the round trip to its server)",
    );
    per_target.sort_by(|a, b| a.0.cmp(&b.0));
    for ((vm, server, device), (r, w, t)) in per_target {
        let labels = vec![("client", id.to_string()), ("vm", vm.to_string()), ("server", server), ("device", device)];
        reads.series.push((labels.clone(), Value::Counter(r)));
        writes.series.push((labels.clone(), Value::Counter(w)));
        rtt.series.push((labels, Value::Histogram(t)));
    }
    out.extend([reads, writes, rtt]);
    out.push(
        Family::new("dmfabric_client_vcpus", "vCPUs started so far").with(client(), Value::Gauge(samples.len() as f64)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_as_prometheus_text() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        h.record(1_500).unwrap();
        h.record(3_000_000).unwrap();
        let text = render(vec![
            counter("dmfabric_x", "An x", vec![("server", "1".into())], 7),
            Family::new("dmfabric_t_seconds", "A time")
                .with(vec![("vm", "2".into())], Value::Histogram(LatencyBuckets::of(&h))),
            Family::new("dmfabric_empty", "Never shown"),
        ]);
        assert!(text.contains("# TYPE dmfabric_x_total counter\n"), "{text}");
        assert!(text.contains("dmfabric_x_total{server=\"1\"} 7\n"), "{text}");
        assert!(text.contains("dmfabric_t_seconds_bucket{vm=\"2\",le=\"1e-06\"} 0\n"), "{text}");
        assert!(text.contains("dmfabric_t_seconds_bucket{vm=\"2\",le=\"2e-06\"} 1\n"), "{text}");
        assert!(text.contains("dmfabric_t_seconds_bucket{vm=\"2\",le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("dmfabric_t_seconds_bucket{vm=\"2\",le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("dmfabric_t_seconds_count{vm=\"2\"} 2\n"), "{text}");
        assert!(!text.contains("dmfabric_empty"), "{text}");
    }

    #[test]
    fn server_families_name_every_reason() {
        let stats = ServerStats { requests: 5, foreign: 2, ..ServerStats::default() };
        let text = render(server_families(4, &stats, None));
        assert!(text.contains("dmfabric_server_requests_total{server=\"4\"} 5\n"), "{text}");
        assert!(text.contains("dmfabric_server_drops_total{server=\"4\",reason=\"foreign\"} 2\n"), "{text}");
        assert!(text.contains("reason=\"unauthenticated_bad_tag\"} 0\n"), "{text}");
        assert!(text.contains("reason=\"malformed_truncated\"} 0\n"), "{text}");
        assert!(text.contains("dmfabric_server_nacks_total{server=\"4\",reason=\"no_session\"} 0\n"), "{text}");
    }

    #[test]
    fn the_endpoint_answers_get_metrics_and_nothing_else() {
        let e = Endpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = e.addr();
        let taken = Endpoint::bind(addr).unwrap_err().to_string();
        assert!(taken.contains(&format!("port {} is already in use", addr.port())), "{taken}");
        e.serve(None, || "x_total 1\n".to_string()).unwrap();
        let get = |req: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx_total 1\n"), "{ok}");
        assert!(ok.contains("version=0.0.4"), "{ok}");
        assert!(get("GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get("\u{0}\u{ff}garbage\r\n\r\n").starts_with("HTTP/1.1 405"));
    }
}
