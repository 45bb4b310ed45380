//! Boot a bzImage with every PC device local (UART output to stdout):
//! `cargo run --release --example boot_linux -- VMLINUZ [INITRD] [SECONDS] [VCPUS]`.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use dmfabric_devices::testing::CountingLine;
use dmfabric_devices::uart::Uart16550;
use dmfabric_devices::ByteSink;
use dmfabric_vmm_shim::devmap::Target;
use dmfabric_vmm_shim::linux::LinuxImage;
use dmfabric_vmm_shim::machine::{self, RunOptions, VmSpec};
use dmfabric_wire::Space;

struct Stdout;

impl ByteSink for Stdout {
    fn put(&mut self, b: u8) {
        let _ = std::io::stdout().write_all(&[b]);
        if b == b'\n' {
            let _ = std::io::stdout().flush();
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kernel = std::fs::read(&args[1]).expect("kernel");
    let initrd = args.get(2).map(|p| std::fs::read(p).expect("initrd"));
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(120);
    let vcpus: u16 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 clearcpuid=154,141 reboot=k panic=-1".to_string();
    let uart = Uart16550::new(0x3f8, CountingLine::default(), Stdout, VecDeque::new());
    let spec = VmSpec::linux(
        1,
        vcpus,
        512 << 20,
        LinuxImage { kernel, initrd, cmdline },
        &[(Space::Pio, 0x3f8, 8, Target::Local(0))],
        vec![Box::new(uart)],
    )
    .unwrap();
    let opts = RunOptions { timeout: Duration::from_secs(secs), ..RunOptions::default() };
    let t0 = std::time::Instant::now();
    let (report, _) = machine::run(vec![spec], None, &opts, &AtomicBool::new(false)).unwrap();
    let vm = &report.vms[0];
    println!("\n--- after {:?}: {:?}", t0.elapsed(), vm.vcpus[0].result);
    println!("--- exits {:?}", vm.exits());
    for d in vm.per_device() {
        println!("--- {d:?}");
    }
}
