//! The SPSC ring: push+pop on one core, and a ping-pong between two
//! pinned threads (the cost of handing work to another core and back).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dmfabric_dataplane::ring;

fn ring_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    let (mut p, mut cons) = ring::channel::<u64>(1024);
    g.bench_function("push_pop_same_thread", |b| {
        b.iter(|| {
            p.push(black_box(7)).unwrap();
            cons.pop().unwrap()
        })
    });

    // Two threads: requests one way, answers the other.
    let (mut req_p, mut req_c) = ring::channel::<u64>(64);
    let (mut rsp_p, mut rsp_c) = ring::channel::<u64>(64);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let cores = dmfabric_pinning::available_cores();
    let (mine, theirs) = (cores[0], *cores.last().unwrap());
    let echo = std::thread::spawn(move || {
        let _ = dmfabric_pinning::pin_current(theirs);
        while !flag.load(Ordering::Relaxed) {
            if let Ok(v) = req_c.pop() {
                while rsp_p.push(v + 1).is_err() {}
            }
        }
    });
    let _ = dmfabric_pinning::pin_current(mine);
    g.bench_function("ping_pong_two_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                req_p.push(i).unwrap();
                loop {
                    if let Ok(v) = rsp_c.pop() {
                        assert_eq!(v, i + 1);
                        break;
                    }
                }
            }
            start.elapsed()
        })
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
    let _ = Duration::ZERO;
}

criterion_group!(benches, ring_bench);
criterion_main!(benches);
