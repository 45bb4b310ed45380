//! Machine-readable results.

use serde::Serialize;

use crate::loadgen::LoadReport;

/// `dmfabric bench rtt --json`.
#[derive(Debug, Clone, Serialize)]
pub struct RttJson {
    pub transport: String,
    /// Frames sealed and checked (false only in a measurement of the cost).
    pub authenticated: bool,
    /// The server's metrics endpoint was scraped every second meanwhile
    /// (`--scrape`; only written when it was).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub scraped: bool,
    pub requests: u64,
    pub completed: u64,
    pub lost: u64,
    pub retransmits: u64,
    pub wrong: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl RttJson {
    pub fn new(transport: &str, authenticated: bool, r: &LoadReport) -> Self {
        RttJson {
            transport: transport.to_string(),
            authenticated,
            scraped: false,
            requests: r.sent,
            completed: r.completed,
            lost: r.lost,
            retransmits: r.retransmits,
            wrong: r.wrong,
            p50_us: round(r.quantile_us(0.5)),
            p90_us: round(r.quantile_us(0.9)),
            p99_us: round(r.quantile_us(0.99)),
            p999_us: round(r.quantile_us(0.999)),
            max_us: round(r.hist.max() as f64 / 1000.0),
            mean_us: round(r.hist.mean() / 1000.0),
        }
    }
}

/// `dmfabric bench throughput --json`.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputJson {
    pub transport: String,
    /// Frames sealed and checked (false only in a measurement of the cost).
    pub authenticated: bool,
    pub seconds: f64,
    pub inflight: u16,
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub retransmits: u64,
    pub wrong: u64,
    pub mreq_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl ThroughputJson {
    pub fn new(transport: &str, authenticated: bool, inflight: u16, r: &LoadReport) -> Self {
        let secs = r.elapsed.as_secs_f64();
        ThroughputJson {
            transport: transport.to_string(),
            authenticated,
            seconds: round(secs),
            inflight,
            sent: r.sent,
            completed: r.completed,
            lost: r.lost,
            retransmits: r.retransmits,
            wrong: r.wrong,
            mreq_per_s: (r.completed as f64 / secs / 1e6 * 10_000.0).round() / 10_000.0,
            p50_us: round(r.quantile_us(0.5)),
            p99_us: round(r.quantile_us(0.99)),
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
