//! VM exit round trips: the `pio_loop` KVM test guest doing port OUT/IN
//! against the test device, served in the shim's process (`local`) or by a
//! server thread in another network namespace over AF_XDP (`remote_xdp`).
//! One element = one exit. Needs /dev/kvm (and root for `remote_xdp`);
//! without them the cases are skipped with one line.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dmfabric_bench::exit;
use dmfabric_bench::harness::{self, ServerLaunch, Setup};
use dmfabric_dataplane::{Transport, TransportKind};
use dmfabric_devices::platform::pc::TEST_DEVICE_ID;
use dmfabric_testkit::Need;
use dmfabric_vmm_shim::devmap::Target;
use dmfabric_vmm_shim::machine::{self, RunOptions};
use dmfabric_vmm_shim::remote::ClientConfig;

/// Time `iters` exits of one guest run (the vCPU's run, not VM set-up);
/// the transport comes back for the next run.
fn timed_run(
    iters: u64,
    target: Target,
    remote: Option<(Box<dyn Transport>, ClientConfig)>,
) -> (Duration, Option<Box<dyn Transport>>) {
    let never = AtomicBool::new(false);
    let exits = iters.max(1) * 2;
    let spec = exit::guest(exits, target);
    let (report, t) = machine::run(vec![spec], remote, &RunOptions::default(), &never).expect("the VM runs");
    let vcpu = &report.vm(1).expect("VM 1").vcpus[0];
    assert!(vcpu.result.is_ok(), "{:?}", vcpu.result);
    // Per exit: the run covers `exits` exits; criterion asked for `iters`.
    (vcpu.elapsed.mul_f64(iters as f64 / exits as f64), t)
}

fn exits(c: &mut Criterion) {
    if !dmfabric_testkit::privileged_or_skip("exit", &[Need::Kvm]) {
        return;
    }
    let mut group = c.benchmark_group("exit");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("local", |b| b.iter_custom(|iters| timed_run(iters, Target::Local(0), None).0));
    if dmfabric_testkit::privileged_or_skip("exit/remote_xdp", &[Need::Root]) {
        let setup = Setup::new(TransportKind::Xdp, ServerLaunch::Thread);
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = harness::run(&setup, &stop, |t, target| {
            let remote = Target::remote(target.server_id, TEST_DEVICE_ID);
            let mut t = Some(t);
            group.bench_function("remote_xdp", |b| {
                b.iter_custom(|iters| {
                    let link = t.take().map(|t| (t, exit::client_config(&target, &setup)));
                    let (took, back) = timed_run(iters, remote, link);
                    t = back;
                    took
                })
            });
            Ok(())
        });
        if let Err(e) = outcome {
            eprintln!("exit/remote_xdp: {e}");
        }
    }
    group.finish();
}

criterion_group!(benches, exits);
criterion_main!(benches);
