//! Request round trips per transport: a load generator in one network
//! namespace, the server in another, over veth (the in-memory transport in
//! one process). Needs root for everything but `mem`; without it those
//! transports are skipped with one line.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmfabric_bench::harness::{self, ServerLaunch, Setup};
use dmfabric_bench::loadgen;
use dmfabric_dataplane::TransportKind;
use dmfabric_testkit::Need;

fn round_trip(c: &mut Criterion) {
    let root = dmfabric_testkit::privileged_or_skip("round_trip over veth", &[Need::Root]);
    let stop = Arc::new(AtomicBool::new(false));
    for kind in [TransportKind::Xdp, TransportKind::Packet, TransportKind::Udp, TransportKind::Mem] {
        if kind != TransportKind::Mem && !root {
            continue;
        }
        let setup = Setup::new(kind, ServerLaunch::Thread);
        let mut group = c.benchmark_group("round_trip");
        group.throughput(Throughput::Elements(1));
        group.measurement_time(Duration::from_secs(4));
        let never = AtomicBool::new(false);
        let outcome = harness::run(&setup, &stop, |mut t, target| {
            group.bench_function(kind.name(), |b| {
                b.iter_custom(|iters| {
                    // Each batch numbers from 0: in a new session (untimed).
                    let sealer = setup.sealer();
                    let session = loadgen::discover(t.as_mut(), loadgen::CLIENT_ID, &sealer, Duration::from_secs(5))
                        .expect("server answers");
                    let target = loadgen::Target { session: session.id, ..target };
                    let start = Instant::now();
                    let r = loadgen::rtt(t.as_mut(), &target, iters, 0, loadgen::Retry::default(), &never)
                        .expect("transport works");
                    assert_eq!(r.lost, 0, "{kind}: lost requests");
                    start.elapsed()
                })
            });
            Ok(())
        });
        group.finish();
        if let Err(e) = outcome {
            eprintln!("round_trip/{kind}: {e}");
        }
    }
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
