//! `dmfabric top`: a live view of servers and clients, from their metrics
//! endpoints (`--metrics`), refreshed every second: per server Mreq/s,
//! interrupts/s and drops by reason; per VM and device exits/s and the
//! exit round trip's p50/p99; per server device accesses/s and service
//! time. `q` (or Ctrl-C) quits; `--once --json` prints one sample for
//! scripts.
//!
//! What an endpoint sends is parsed without trusting it: bounded in size,
//! bad lines skipped, never a panic.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// A metrics endpoint (`dmfabric server|client --metrics ADDR:PORT`) to
    /// watch; repeat for each server and client.
    #[arg(long = "endpoint", value_name = "ADDR:PORT", required = true)]
    endpoints: Vec<String>,
    /// Time between refreshes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Take two samples one interval apart, print the rates once and exit.
    #[arg(long)]
    once: bool,
    /// With --once: print JSON instead of the table.
    #[arg(long, requires = "once")]
    json: bool,
}

/// The most an endpoint may send.
const MAX_BODY: usize = 16 << 20;

/// One sample of a scrape: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> &str {
        self.labels.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v.as_str())
    }
}

/// Parse a Prometheus text exposition; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (&line[..open], parse_labels(&line[open + 1..close])?, &line[close + 1..])
        }
        None => {
            let sp = line.find(char::is_whitespace)?;
            (&line[..sp], Vec::new(), &line[sp..])
        }
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return None;
    }
    Some(Sample { name: name.to_string(), labels, value })
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key, value));
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(out)
}

/// GET /metrics at `endpoint`, within `timeout` for each step.
pub fn scrape(endpoint: &str, timeout: Duration) -> anyhow::Result<Vec<Sample>> {
    let addr: SocketAddr = endpoint
        .to_socket_addrs()
        .with_context(|| format!("{endpoint}: not an ADDR:PORT"))?
        .next()
        .with_context(|| format!("{endpoint}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("{endpoint}: cannot connect"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n").as_bytes())?;
    let mut body = Vec::new();
    s.take(MAX_BODY as u64 + 1).read_to_end(&mut body).with_context(|| format!("{endpoint}: read"))?;
    if body.len() > MAX_BODY {
        bail!("{endpoint}: more than {} MiB: is this a dmfabric metrics endpoint?", MAX_BODY >> 20);
    }
    let text = String::from_utf8_lossy(&body);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("{endpoint}: not an HTTP answer") };
    let status = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or_default();
    if status != "200" {
        bail!("{endpoint}: HTTP status {status:?}: is this a dmfabric metrics endpoint?");
    }
    Ok(parse(body))
}

/// Everything scraped at one moment.
#[derive(Debug, Clone, Default)]
struct Scrape {
    at: Option<Instant>,
    samples: Vec<Sample>,
    errors: Vec<(String, String)>,
}

fn scrape_all(endpoints: &[String]) -> Scrape {
    let mut s = Scrape { at: Some(Instant::now()), ..Scrape::default() };
    for e in endpoints {
        match scrape(e, Duration::from_secs(2)) {
            Ok(samples) => s.samples.extend(samples),
            Err(err) => s.errors.push((e.clone(), format!("{err:#}"))),
        }
    }
    s
}

/// A histogram's cumulative buckets: (le, count), sorted.
type Buckets = Vec<(f64, f64)>;

/// `q`'s quantile of `b`, interpolated within its bucket (as Prometheus's
/// histogram_quantile does); None if empty.
pub fn quantile(q: f64, b: &[(f64, f64)]) -> Option<f64> {
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in b {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if c > prev.1 { (rank - prev.1) / (c - prev.1) } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, c);
    }
    Some(prev.0)
}

/// Sum of `name`'s samples whose labels pass `keep`.
fn sum(s: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    s.iter().filter(|x| x.name == name && keep(x)).map(|x| x.value).sum()
}

/// `name`'s buckets summed over the series `keep` passes.
fn buckets(s: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> Buckets {
    let bucket = format!("{name}_bucket");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for x in s.iter().filter(|x| x.name == bucket && keep(x)) {
        let le = match x.label("le") {
            "+Inf" => f64::INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += x.value;
    }
    let mut out: Buckets = by_le.into_values().collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// What changed between two bucket sets (all of `cur` if nothing did, or
/// a counter went back: a restart).
fn delta_buckets(prev: &Buckets, cur: &Buckets) -> Buckets {
    let d: Buckets =
        cur.iter().map(|&(le, c)| (le, c - prev.iter().find(|p| p.0 == le).map_or(0.0, |p| p.1))).collect();
    if d.iter().any(|x| x.1 < 0.0) || d.last().is_none_or(|x| x.1 <= 0.0) {
        cur.clone()
    } else {
        d
    }
}

fn us(v: Option<f64>) -> Option<f64> {
    v.map(|s| (s * 1e7).round() / 10.0)
}

/// The view `dmfabric top` shows; `--once --json` prints it.
#[derive(Debug, Default, Serialize)]
pub struct View {
    pub interval_s: f64,
    pub endpoints: Vec<EndpointView>,
    pub servers: Vec<ServerView>,
    pub vms: Vec<VmView>,
    pub devices: Vec<DeviceView>,
    pub server_devices: Vec<ServerDeviceView>,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub endpoint: String,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ServerView {
    pub server: String,
    pub requests_per_s: f64,
    pub mreq_per_s: f64,
    pub interrupts_per_s: f64,
    pub requests_total: f64,
    /// Per reason with any drop so far: (per second, total).
    pub drops: BTreeMap<String, DropView>,
}

#[derive(Debug, Serialize)]
pub struct DropView {
    pub per_s: f64,
    pub total: f64,
}

#[derive(Debug, Serialize)]
pub struct VmView {
    pub client: String,
    pub vm: String,
    pub exits_per_s: f64,
    pub interrupts_per_s: f64,
    pub exits_total: f64,
    /// The exit round trip over the interval (over the whole run if the
    /// interval saw none), microseconds.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub client: String,
    pub vm: String,
    pub server: String,
    pub device: String,
    pub exits_per_s: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ServerDeviceView {
    pub server: String,
    pub device: String,
    pub kind: String,
    pub accesses_per_s: f64,
    pub service_p50_us: Option<f64>,
    pub service_p99_us: Option<f64>,
}

/// Distinct values of `keys` among `name`'s samples.
fn ids(s: &[Sample], name: &str, keys: &[&str]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> =
        s.iter().filter(|x| x.name == name).map(|x| keys.iter().map(|k| x.label(k).to_string()).collect()).collect();
    out.sort_by(|a, b| {
        let num = |v: &Vec<String>| v.iter().map(|x| x.parse::<u64>().unwrap_or(u64::MAX)).collect::<Vec<_>>();
        num(a).cmp(&num(b)).then(a.cmp(b))
    });
    out.dedup();
    out
}

fn view(prev: &Scrape, cur: &Scrape, endpoints: &[String]) -> View {
    let dt = match (prev.at, cur.at) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => 1.0,
    };
    let (p, c) = (&prev.samples, &cur.samples);
    let rate = |name: &str, keep: &dyn Fn(&Sample) -> bool| {
        let d = sum(c, name, keep) - sum(p, name, keep);
        // A counter that went back (a restart) gives no rate this time.
        if d >= 0.0 {
            d / dt
        } else {
            0.0
        }
    };
    let mut v = View { interval_s: dt, ..View::default() };
    v.endpoints = endpoints
        .iter()
        .map(|e| EndpointView {
            endpoint: e.clone(),
            error: cur.errors.iter().find(|(x, _)| x == e).map(|(_, err)| err.clone()),
        })
        .collect();
    for id in ids(c, "dmfabric_server_requests_total", &["server"]) {
        let server = id[0].clone();
        let this = |x: &Sample| x.label("server") == server;
        let requests = rate("dmfabric_server_requests_total", &this);
        let mut drops = BTreeMap::new();
        for r in ids(c, "dmfabric_server_drops_total", &["server", "reason"]).into_iter().filter(|r| r[0] == server) {
            let reason = r[1].clone();
            let of = |x: &Sample| this(x) && x.label("reason") == reason;
            let total = sum(c, "dmfabric_server_drops_total", of);
            if total > 0.0 {
                drops.insert(reason.clone(), DropView { per_s: rate("dmfabric_server_drops_total", &of), total });
            }
        }
        v.servers.push(ServerView {
            requests_per_s: requests,
            mreq_per_s: requests / 1e6,
            interrupts_per_s: rate("dmfabric_server_interrupts_total", &this),
            requests_total: sum(c, "dmfabric_server_requests_total", this),
            drops,
            server,
        });
    }
    for id in ids(c, "dmfabric_client_vm_exits_total", &["client", "vm"]) {
        let this = |x: &Sample| x.label("client") == id[0] && x.label("vm") == id[1];
        let b = delta_buckets(
            &buckets(p, "dmfabric_client_exit_round_trip_seconds", this),
            &buckets(c, "dmfabric_client_exit_round_trip_seconds", this),
        );
        v.vms.push(VmView {
            client: id[0].clone(),
            vm: id[1].clone(),
            exits_per_s: rate("dmfabric_client_vm_exits_total", &this),
            interrupts_per_s: rate("dmfabric_client_vm_interrupts_total", &this),
            exits_total: sum(c, "dmfabric_client_vm_exits_total", this),
            p50_us: us(quantile(0.5, &b)),
            p99_us: us(quantile(0.99, &b)),
        });
    }
    for id in ids(c, "dmfabric_client_device_reads_total", &["client", "vm", "server", "device"]) {
        let this = |x: &Sample| {
            x.label("client") == id[0]
                && x.label("vm") == id[1]
                && x.label("server") == id[2]
                && x.label("device") == id[3]
        };
        let b = delta_buckets(
            &buckets(p, "dmfabric_client_exit_round_trip_seconds", this),
            &buckets(c, "dmfabric_client_exit_round_trip_seconds", this),
        );
        v.devices.push(DeviceView {
            client: id[0].clone(),
            vm: id[1].clone(),
            server: id[2].clone(),
            device: id[3].clone(),
            exits_per_s: rate("dmfabric_client_device_reads_total", &this)
                + rate("dmfabric_client_device_writes_total", &this),
            p50_us: us(quantile(0.5, &b)),
            p99_us: us(quantile(0.99, &b)),
        });
    }
    for id in ids(c, "dmfabric_server_device_reads_total", &["server", "device", "kind"]) {
        let this = |x: &Sample| x.label("server") == id[0] && x.label("device") == id[1];
        let b = delta_buckets(
            &buckets(p, "dmfabric_server_device_service_seconds", this),
            &buckets(c, "dmfabric_server_device_service_seconds", this),
        );
        v.server_devices.push(ServerDeviceView {
            server: id[0].clone(),
            device: id[1].clone(),
            kind: id[2].clone(),
            accesses_per_s: rate("dmfabric_server_device_reads_total", &this)
                + rate("dmfabric_server_device_writes_total", &this),
            service_p50_us: us(quantile(0.5, &b)),
            service_p99_us: us(quantile(0.99, &b)),
        });
    }
    v
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// The view as a table, lines ending in "\r\n" (raw terminals too).
fn table(v: &View) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ =
        write!(o, "dmfabric top: {} endpoint(s), rates over {:.1} s (q quits)\r\n", v.endpoints.len(), v.interval_s);
    for e in v.endpoints.iter().filter(|e| e.error.is_some()) {
        let _ = write!(o, "  {}: {}\r\n", e.endpoint, e.error.as_deref().unwrap_or_default());
    }
    let _ = write!(
        o,
        "\r\n{:<8} {:>9} {:>11} {:>9} {:>13}  drops (total, /s)\r\n",
        "SERVER", "Mreq/s", "req/s", "irq/s", "requests"
    );
    for s in &v.servers {
        let drops: Vec<String> = s.drops.iter().map(|(r, d)| format!("{r} {} ({:.0}/s)", d.total, d.per_s)).collect();
        let _ = write!(
            o,
            "{:<8} {:>9.4} {:>11.0} {:>9.0} {:>13}  {}\r\n",
            s.server,
            s.mreq_per_s,
            s.requests_per_s,
            s.interrupts_per_s,
            s.requests_total,
            if drops.is_empty() { "none".to_string() } else { drops.join(", ") }
        );
    }
    let _ = write!(
        o,
        "\r\n{:<7} {:<6} {:>11} {:>9} {:>10} {:>10}\r\n",
        "CLIENT", "VM", "exits/s", "irq/s", "p50 us", "p99 us"
    );
    for m in &v.vms {
        let _ = write!(
            o,
            "{:<7} {:<6} {:>11.0} {:>9.0} {:>10} {:>10}\r\n",
            m.client,
            m.vm,
            m.exits_per_s,
            m.interrupts_per_s,
            opt(m.p50_us),
            opt(m.p99_us)
        );
    }
    let _ = write!(
        o,
        "\r\n{:<7} {:<6} {:<7} {:<7} {:>11} {:>10} {:>10}\r\n",
        "CLIENT", "VM", "SERVER", "DEVICE", "exits/s", "p50 us", "p99 us"
    );
    for d in &v.devices {
        let _ = write!(
            o,
            "{:<7} {:<6} {:<7} {:<7} {:>11.0} {:>10} {:>10}\r\n",
            d.client,
            d.vm,
            d.server,
            d.device,
            d.exits_per_s,
            opt(d.p50_us),
            opt(d.p99_us)
        );
    }
    let _ = write!(
        o,
        "\r\n{:<7} {:<7} {:<10} {:>11} {:>14} {:>14}\r\n",
        "SERVER", "DEVICE", "KIND", "access/s", "service p50us", "service p99us"
    );
    for d in &v.server_devices {
        let _ = write!(
            o,
            "{:<7} {:<7} {:<10} {:>11.0} {:>14} {:>14}\r\n",
            d.server,
            d.device,
            d.kind,
            d.accesses_per_s,
            opt(d.service_p50_us),
            opt(d.service_p99_us)
        );
    }
    o
}

/// The terminal in raw mode (no echo, no line buffering, keys as bytes)
/// and on the alternate screen, until dropped — on `q`, Ctrl-C, an error
/// or a panic alike.
struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    fn enter() -> RawTerminal {
        // SAFETY: isatty on fd 0 has no preconditions.
        if unsafe { libc::isatty(0) } != 1 {
            return RawTerminal { saved: None };
        }
        // SAFETY: an all-zero termios is a valid value to be filled in.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal; `t` is a valid termios to write to.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawTerminal { saved: None };
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        t.c_iflag &= !(libc::IXON | libc::ICRNL);
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: `t` is the terminal's own termios with flags cleared.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        print!("\x1b[?1049h\x1b[?25l");
        let _ = std::io::stdout().flush();
        RawTerminal { saved: Some(saved) }
    }

    /// A key pressed within `wait`, if any.
    fn key(&self, wait: Duration) -> Option<u8> {
        let mut fd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        if n <= 0 || fd.revents & libc::POLLIN == 0 {
            if n > 0 {
                // Hung up (stdin closed): do not spin on it.
                std::thread::sleep(wait);
            }
            return None;
        }
        let mut b = [0u8; 1];
        match std::io::stdin().read(&mut b) {
            Ok(1) => Some(b[0]),
            _ => {
                std::thread::sleep(wait);
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            print!("\x1b[?25h\x1b[?1049l");
            let _ = std::io::stdout().flush();
            // SAFETY: restores the termios read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

pub fn run(args: TopArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    if !(10..=3_600_000).contains(&args.interval_ms) {
        bail!("--interval-ms must be between 10 and 3600000, not {}", args.interval_ms);
    }
    for e in &args.endpoints {
        if e.to_socket_addrs().map(|mut a| a.next().is_none()).unwrap_or(true) {
            bail!("--endpoint {e}: give ADDR:PORT, as in `dmfabric server --metrics ADDR:PORT`");
        }
    }
    let interval = Duration::from_millis(args.interval_ms);
    if args.once {
        let first = scrape_all(&args.endpoints);
        if first.errors.len() == args.endpoints.len() {
            bail!(
                "no endpoint answered: {}",
                first.errors.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("; ")
            );
        }
        std::thread::sleep(interval);
        let v = view(&first, &scrape_all(&args.endpoints), &args.endpoints);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", table(&v).replace("\r\n", "\n"));
        }
        return Ok(());
    }
    let term = RawTerminal::enter();
    let mut prev = scrape_all(&args.endpoints);
    let mut next = Instant::now() + interval;
    while !stop.load(Ordering::Relaxed) {
        let wait = next.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
        if let Some(k) = term.key(wait) {
            // q, Q, Ctrl-C (raw mode delivers it as a byte), Ctrl-D.
            if matches!(k, b'q' | b'Q' | 3 | 4) {
                break;
            }
        }
        if Instant::now() < next {
            continue;
        }
        next += interval;
        let cur = scrape_all(&args.endpoints);
        let v = view(&prev, &cur, &args.endpoints);
        print!("\x1b[H\x1b[2J{}", table(&v));
        let _ = std::io::stdout().flush();
        prev = cur;
    }
    drop(term);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_endpoint_writes_and_skips_garbage() {
        let text = "# HELP x_total X\n# TYPE x_total counter\nx_total{server=\"1\",reason=\"a\\\"b\"} 7\nplain 2.5\n\
                    bad{unterminated=\"x 1\nbad2 notanumber\n{=} 1\nh_bucket{le=\"+Inf\"} 3\n\u{0}\u{ff} 9\n";
        let s = parse(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].label("reason"), "a\"b");
        assert_eq!(s[0].value, 7.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("plain", 2.5));
        assert_eq!(s[2].label("le"), "+Inf");
        // Arbitrary bytes never panic.
        for n in 0..512u32 {
            let junk: String = (0..64).map(|i| char::from_u32((n * 31 + i * 7) % 128).unwrap_or('x')).collect();
            let _ = parse(&junk);
        }
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = vec![(1e-6, 0.0), (2e-6, 50.0), (5e-6, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b).unwrap() - 2e-6).abs() < 1e-12);
        assert!((quantile(0.75, &b).unwrap() - 3.5e-6).abs() < 1e-12);
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 4.0)]), Some(1.0), "+Inf: the largest bound");
    }

    #[test]
    fn rates_come_from_two_scrapes() {
        let at = Instant::now();
        let scrape = |t: f64, reqs: f64, bad: f64, exits: f64, b2: f64| {
            Scrape {
            at: Some(at + Duration::from_secs_f64(t)),
            samples: parse(&format!(
                "dmfabric_server_requests_total{{server=\"1\"}} {reqs}\n\
                 dmfabric_server_drops_total{{server=\"1\",reason=\"foreign\"}} {bad}\n\
                 dmfabric_server_drops_total{{server=\"1\",reason=\"stale\"}} 0\n\
                 dmfabric_client_vm_exits_total{{client=\"3\",vm=\"1\",kind=\"remote\"}} {exits}\n\
                 dmfabric_client_exit_round_trip_seconds_bucket{{client=\"3\",vm=\"1\",server=\"1\",device=\"1\",le=\"0.00001\"}} 0\n\
                 dmfabric_client_exit_round_trip_seconds_bucket{{client=\"3\",vm=\"1\",server=\"1\",device=\"1\",le=\"0.00002\"}} {b2}\n\
                 dmfabric_client_exit_round_trip_seconds_bucket{{client=\"3\",vm=\"1\",server=\"1\",device=\"1\",le=\"+Inf\"}} {b2}\n"
            )),
            errors: Vec::new(),
        }
        };
        let v = view(&scrape(0.0, 1000.0, 1.0, 10.0, 10.0), &scrape(2.0, 3_001_000.0, 5.0, 4010.0, 4010.0), &[]);
        assert_eq!(v.servers.len(), 1);
        assert_eq!(v.servers[0].requests_per_s, 1_500_000.0);
        assert_eq!(v.servers[0].mreq_per_s, 1.5);
        assert_eq!(v.servers[0].drops.len(), 1, "only reasons with drops: {:?}", v.servers[0].drops);
        assert_eq!(v.servers[0].drops["foreign"].per_s, 2.0);
        assert_eq!(v.vms[0].exits_per_s, 2000.0);
        assert_eq!(v.vms[0].p50_us, Some(15.0));
        let text = table(&v);
        assert!(text.contains("foreign 5 (2/s)"), "{text}");
    }
}
