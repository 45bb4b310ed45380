//! `dmfabric demo`: two test hosts, a `dmfabric server` with a PC's devices
//! for VM 1 in one, a KVM guest in the other whose UART, RTC, i8042, I/O
//! APIC and HPET are all on that server, over AF_XDP: the guest's ticks come
//! from the remote HPET through the remote I/O APIC (KVM's split irqchip;
//! `--irqchip kernel`: KVM's PIC and the event timer instead). The guest's
//! console is streamed from the server; a line is typed at it; the guest
//! resets itself through the i8042; then the counters, and everything is
//! removed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dmfabric_dataplane::netns::TestNet;
use dmfabric_dataplane::reliable::Retry;
use dmfabric_dataplane::xdp::{XdpConfig, XdpTransport};
use dmfabric_devices::platform::pc::{self, PcLayout, Role};
use dmfabric_devices::ByteSink;
use dmfabric_vmm_shim::devmap::{Remote, Target};
use dmfabric_vmm_shim::guests::{DEMO, DEMO_APIC};
use dmfabric_vmm_shim::kvm::IrqChipMode;
use dmfabric_vmm_shim::linux::{self, LinuxImage};
use dmfabric_vmm_shim::machine::{self, RunOptions, VmSpec};
use dmfabric_vmm_shim::remote::ClientConfig;
use dmfabric_wire::Space;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Timer ticks the guest shows.
    #[arg(long, default_value_t = 5)]
    ticks: u32,
    /// The timer's period, in milliseconds.
    #[arg(long, default_value_t = 100)]
    tick_ms: u32,
    /// The line the demo types at the server's console for the guest to echo.
    #[arg(long, default_value = "hello from the server's console")]
    type_text: String,
    /// Type nothing: wait up to 60 s for you to type a line at the
    /// `dmfabric console` command the demo prints.
    #[arg(long)]
    interactive: bool,
    /// Stop everything after this long [default: 60, with --linux 900].
    #[arg(long)]
    timeout_s: Option<u64>,
    /// Boot Debian's cloud kernel (scripts/guest-images.sh) instead of the
    /// built-in guest, its console, RTC and i8042 on the server.
    #[arg(long)]
    linux: bool,
    /// Where the device models run: remote (a server in another network
    /// namespace) or local (in this process, for comparison; nothing is typed).
    #[arg(long, value_enum, default_value = "remote")]
    devices: Devices,
    /// Where the interrupt controller is: remote (the I/O APIC and an HPET
    /// on the server, KVM's split irqchip: the ticks come from the HPET
    /// through the I/O APIC; the default with remote devices) or kernel
    /// (KVM's 8259s and the server's event timer; the only choice with
    /// --linux or --devices local).
    #[arg(long, value_enum)]
    irqchip: Option<IrqChip>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IrqChip {
    Remote,
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Devices {
    Remote,
    Local,
}

const VM: u32 = 1;
/// The server's device ids of VM 1's I/O APIC and HPET (after its PC
/// devices, 1001-1004).
const IOAPIC: u32 = VM * 1000 + 5;
const HPET: u32 = VM * 1000 + 6;

/// The PC devices the demo's guest uses (the Linux guest, and the guest
/// whose ticks come from the HPET: all but the event timer).
fn roles(linux: bool, irqchip: IrqChip) -> &'static [Role] {
    if linux || irqchip == IrqChip::Remote {
        &Role::ALL[..3]
    } else {
        &Role::ALL
    }
}

/// The server's devices for the remote irqchip: VM 1's COM1, RTC and
/// i8042 (numbered as `--pc-vm 1` numbers them), its I/O APIC, whose pins
/// their lines then drive, and an HPET.
fn server_devices(layout: &PcLayout) -> String {
    let mut text = String::new();
    for (id, kind) in [
        (layout.id(Role::Com1), "uart"),
        (layout.id(Role::Rtc), "rtc"),
        (layout.id(Role::I8042), "i8042"),
        (IOAPIC, "ioapic"),
        (HPET, "hpet"),
    ] {
        text.push_str(&format!("[[device]]\nid = {id}\nkind = \"{kind}\"\nvm = {VM}\n\n"));
    }
    text
}

fn name_of(t: Target) -> String {
    let layout = PcLayout::new(VM).expect("VM 1 has PC devices");
    match t {
        Target::Remote(r) if r.device == IOAPIC => "I/O APIC".into(),
        Target::Remote(r) if r.device == HPET => "HPET".into(),
        Target::Remote(r) => layout.device(r.device).map_or(format!("device {}", r.device), |d| d.role.label().into()),
        // The order of `roles`.
        Target::Local(i) => Role::ALL.get(i).map_or(format!("local device {i}"), |r| format!("{}, local", r.label())),
        Target::Debug => "debug port".into(),
    }
}

/// Stream the VM's console from the server's socket to stdout, indented;
/// when the guest prompts, type `line` (if any). Returns what was seen.
fn console(sock: std::path::PathBuf, line: Option<String>, done: Arc<AtomicBool>, seen: Arc<Mutex<String>>) {
    let end = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < end && !done.load(Ordering::Relaxed) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                eprintln!("dmfabric demo: cannot attach to the console at {}: {e}", sock.display());
                return;
            }
        }
    };
    if stream.write_all(format!("attach {VM}\n").as_bytes()).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut reader = BufReader::new(stream.try_clone().expect("a unix stream clones"));
    let mut hello = String::new();
    if reader.read_line(&mut hello).is_err() || !hello.starts_with("ok") {
        eprintln!("dmfabric demo: the console refused: {}", hello.trim());
        return;
    }
    let mut typed = line.is_none();
    let mut at_line_start = true;
    let mut buf = [0u8; 1024];
    let mut quiet_since: Option<Instant> = None;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                quiet_since = None;
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut out = String::new();
                for ch in text.chars() {
                    if at_line_start {
                        out.push_str("  │ ");
                    }
                    out.push(ch);
                    at_line_start = ch == '\n';
                }
                print!("{out}");
                let _ = std::io::stdout().flush();
                let mut all = seen.lock().unwrap_or_else(|e| e.into_inner());
                all.push_str(&text);
                if !typed && all.ends_with("echo> ") {
                    typed = true;
                    if let Some(l) = &line {
                        let _ = stream.write_all(format!("{l}\n").as_bytes());
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                // Once the VM is done, stop after the output has been quiet a while.
                if done.load(Ordering::Relaxed) {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_millis(200) {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    if !at_line_start {
        println!();
    }
}

pub fn run(args: DemoArgs, signals: &crate::Signals) -> anyhow::Result<()> {
    let stop = signals.stop.clone();
    if args.ticks == 0 || args.ticks > 9 {
        bail!("--ticks must be between 1 and 9 (the guest prints one digit)");
    }
    if args.tick_ms == 0 || args.tick_ms > 10_000 {
        bail!("--tick-ms must be between 1 and 10000");
    }
    dmfabric_vmm_shim::kvm::probe()?;
    let irqchip = match args.irqchip {
        Some(IrqChip::Remote) if args.linux => bail!("--irqchip remote: the Linux guest uses KVM's 8259s"),
        Some(IrqChip::Remote) if args.devices == Devices::Local => {
            bail!("--irqchip remote: the I/O APIC and the HPET run only on a server (--devices remote)")
        }
        Some(chip) => chip,
        None if args.linux || args.devices == Devices::Local => IrqChip::Kernel,
        None => IrqChip::Remote,
    };
    if args.devices == Devices::Local {
        return run_local(&args, &stop);
    }
    let exe = std::env::current_exe().context("Cannot find the dmfabric executable")?;
    let net = TestNet::pair()?;
    // The demo's directory (the server's consoles, the client's key): a
    // fresh one of our own (a random name made 0700 by mkdtemp, so no one
    // can plant or read anything in it), removed when the demo ends, also
    // on errors.
    let console_dir = tempfile::Builder::new()
        .prefix("dmfabric-demo-")
        .tempdir()
        .context("Cannot create a directory for the demo's console in the temporary directory (is TMPDIR writable?)")?;
    let dir = console_dir.path().to_path_buf();
    let cores = dmfabric_pinning::available_cores();
    let (client_core, server_core) = (cores[0], cores[cores.len() - 1]);

    // Client platform 3's key, fresh for this run, and the server's list of
    // the client platforms it acts for: every frame is sealed with it. They
    // live in the demo's own directory too.
    let key = dmfabric_control::keys::KeyFile::generate(3)?;
    key.save_new(&dir.join("client-3.key"))?;
    let clients = dir.join("clients.toml");
    std::fs::write(
        &clients,
        format!(
            "[[client]]\nid = 3\nmac = \"{}\"\nkey_file = \"client-3.key\"\nvms = [{{ id = {VM}, vcpus = 1 }}]\n",
            net.host(0).mac
        ),
    )
    .context("Cannot write the demo's client list")?;
    let keys = key.ring()?;

    // The server, in host 1: VM 1's PC devices (`--pc-vm 1`), or with the
    // remote irqchip those but the event timer, and its I/O APIC and HPET
    // (a device config of the demo's own).
    let layout = PcLayout::new(VM)?;
    let mut cmd = net.command(1, &exe);
    cmd.args(["server", "--transport", "xdp", "--iface", &net.host(1).iface]);
    match irqchip {
        IrqChip::Kernel => {
            cmd.args(["--pc-vm", &VM.to_string()]);
        }
        IrqChip::Remote => {
            let devices = dir.join("devices.toml");
            std::fs::write(&devices, server_devices(&layout)).context("Cannot write the demo's device config")?;
            cmd.arg("--config").arg(devices);
        }
    }
    cmd.args(["--irq-test-devices", "0", "--busy-poll", "--cores", &server_core.to_string(), "--console-dir"]);
    cmd.arg(&dir).arg("--clients").arg(&clients);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut server = net.spawn(&mut cmd).context("Cannot start the server")?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(server.child().stdout.take().expect("piped")) as Box<dyn Read + Send>,
        Box::new(server.child().stderr.take().expect("piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut server_lines = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("Interrupted");
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.starts_with("dmfabric server ready") => break,
            Ok(l) => server_lines.push(l),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < end => {}
            Err(_) => bail!("The server did not start: {}", server_lines.join(" | ")),
        }
    }
    println!("dmfabric demo: VM {VM} runs on KVM in network namespace {} (core {client_core});", net.host(0).ns);
    match irqchip {
        IrqChip::Remote => {
            println!(
                "its UART, RTC, i8042, I/O APIC and HPET are served by `dmfabric server` in {} (core {server_core}), over AF_XDP;",
                net.host(1).ns
            );
            println!(
                "KVM keeps only the local APIC (split irqchip): the ticks come from the remote HPET, timer 0 on I/O APIC pin 16, and"
            );
            println!("the UART's IRQ 4 from the remote I/O APIC's pin 4, both as MSIs from the server.");
        }
        IrqChip::Kernel => println!(
            "its UART, RTC, event timer and i8042 are served by `dmfabric server` in {} (core {server_core}), over AF_XDP;\n\
             their lines go to KVM's 8259s: the ticks come from the remote event timer on IRQ 5.",
            net.host(1).ns
        ),
    }
    if args.interactive {
        println!(
            "Type a line at the VM's console from another terminal: {} console {VM} --console-dir {}",
            exe.display(),
            dir.display()
        );
    }
    println!("── VM {VM}'s console, streamed from the server ──");

    // The console, attached like `dmfabric console`.
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(String::new()));
    let line = (!args.interactive && !args.type_text.is_empty()).then(|| args.type_text.clone());
    let printer = {
        let (sock, done, seen) = (dir.join(dmfabric_dm_workers::console::SOCKET), done.clone(), seen.clone());
        std::thread::spawn(move || console(sock, line, done, seen))
    };

    // The client, in host 0.
    let tick_us = u64::from(args.tick_ms) * 1000;
    let wait_ticks = if args.interactive { 60_000 / u64::from(args.tick_ms) } else { 3000 / u64::from(args.tick_ms) };
    let mut ranges = dmfabric_vmm_shim::devmap::pc_remote_ranges(1, &layout, roles(args.linux, irqchip));
    if irqchip == IrqChip::Remote {
        ranges.push((
            Space::Mmio,
            pc::IOAPIC_MMIO,
            u64::from(pc::IOAPIC_LEN),
            Target::Remote(Remote::new(1, IOAPIC).msis()),
        ));
        ranges.push((Space::Mmio, pc::HPET_MMIO, u64::from(pc::HPET_LEN), Target::Remote(Remote::new(1, HPET))));
    }
    let guest_args = vec![[u64::from(args.ticks), tick_us, wait_ticks.max(1)]];
    let mut spec = if args.linux {
        VmSpec::linux(VM, 1, 512 << 20, linux_image()?, &ranges, vec![]).map_err(anyhow::Error::msg)?
    } else if irqchip == IrqChip::Remote {
        VmSpec::test_guest(VM, 1, DEMO_APIC, guest_args, &ranges, vec![]).map_err(anyhow::Error::msg)?
    } else {
        VmSpec::test_guest(VM, 1, DEMO, guest_args, &ranges, vec![]).map_err(anyhow::Error::msg)?
    };
    if irqchip == IrqChip::Remote {
        spec.irqchip = IrqChipMode::Split;
    }
    let timeout = args.timeout_s.unwrap_or(if args.linux { 900 } else { 60 });
    let opts =
        RunOptions { timeout: Duration::from_secs(timeout), wake: Some(signals.wake.clone()), ..RunOptions::default() };
    let started = Instant::now();
    let iface = net.host(0).iface.clone();
    let outcome = net.with_host(0, || -> anyhow::Result<_> {
        dmfabric_pinning::pin_current(client_core)?;
        let t = XdpTransport::open(&XdpConfig::new(&iface))?;
        let cfg = ClientConfig {
            client: 3,
            hypervisor: 1,
            servers: vec![1],
            retry: Retry::default(),
            hello_timeout: Duration::from_secs(5),
            sealer: dmfabric_dataplane::hello::Sealer::new(keys),
            open_on_demand: false,
        };
        Ok(machine::run(vec![spec], Some((Box::new(t), cfg)), &opts, &stop)?.0)
    })?;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = printer.join();
    let report = outcome?;

    let vm = report.vm(VM).context("VM 1 did not run")?;
    let reset = vm.vcpus.iter().any(|v| v.result.as_ref().is_ok_and(|r| r.reset));
    match vm.error() {
        Some(e) => println!("── VM {VM} stopped: {e} ──"),
        None if reset => {
            println!("── VM {VM} reset itself through the remote i8042 after {:.2} s ──", elapsed.as_secs_f64())
        }
        None => println!("── VM {VM} exited after {:.2} s ──", elapsed.as_secs_f64()),
    }
    print_devices(vm);
    if let (Some(c), Some(r)) = (report.client, vm.remote) {
        let how = if irqchip == IrqChip::Remote { " (MSIs from the remote I/O APIC)" } else { "" };
        println!(
            "  interrupts injected {}{how}, requests {}, retransmits {}, frames for others dropped {}",
            r.interrupts,
            r.requests,
            c.retransmits,
            c.other_client + c.unknown_vm
        );
    }
    let _ = server.interrupt(Duration::from_secs(5));
    drop(server);
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    drop(net);
    let _ = console_dir.close();
    println!("namespaces, links, the XDP programs and the console directory removed.");
    finish(&args, irqchip, vm, &seen, &stop)
}

/// A local UART's output to stdout, indented like the remote console, and kept.
struct Indented {
    at_line_start: bool,
    seen: Arc<Mutex<String>>,
}

impl ByteSink for Indented {
    fn put(&mut self, b: u8) {
        let mut out = std::io::stdout();
        if self.at_line_start {
            let _ = out.write_all("  │ ".as_bytes());
        }
        let _ = out.write_all(&[b]);
        self.at_line_start = b == b'\n';
        if self.at_line_start {
            let _ = out.flush();
        }
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(char::from(b));
    }
}

/// The demo with every model in this process: no namespaces, no server.
fn run_local(args: &DemoArgs, stop: &AtomicBool) -> anyhow::Result<()> {
    let seen = Arc::new(Mutex::new(String::new()));
    let sink = Box::new(Indented { at_line_start: true, seen: seen.clone() });
    let wiring = dmfabric_vmm_shim::local::LocalWiring::new(Default::default(), Default::default(), sink);
    let (devices, ranges) = dmfabric_vmm_shim::local::pc_devices(roles(args.linux, IrqChip::Kernel), 0, &wiring);
    let (target, reset) = (wiring.target.clone(), wiring.reset.clone());
    let mut spec = if args.linux {
        VmSpec::linux(VM, 1, 512 << 20, linux_image()?, &ranges, devices).map_err(anyhow::Error::msg)?
    } else {
        let tick_us = u64::from(args.tick_ms) * 1000;
        VmSpec::test_guest(VM, 1, DEMO, vec![[u64::from(args.ticks), tick_us, 1]], &ranges, devices)
            .map_err(anyhow::Error::msg)?
    };
    spec.irq_target = target;
    spec.reset = reset;
    println!("dmfabric demo: VM {VM} runs on KVM with its UART, RTC, event timer and i8042 in this process.");
    println!("── VM {VM}'s console ──");
    let timeout = args.timeout_s.unwrap_or(if args.linux { 900 } else { 60 });
    let opts = RunOptions { timeout: Duration::from_secs(timeout), ..RunOptions::default() };
    let started = Instant::now();
    let (report, _) = machine::run(vec![spec], None, &opts, stop)?;
    let vm = report.vm(VM).context("VM 1 did not run")?;
    let reset = vm.vcpus.iter().any(|v| v.result.as_ref().is_ok_and(|r| r.reset));
    match vm.error() {
        Some(e) => println!("── VM {VM} stopped: {e} ──"),
        None if reset => {
            println!("── VM {VM} reset itself through its i8042 after {:.2} s ──", started.elapsed().as_secs_f64())
        }
        None => println!("── VM {VM} exited ──"),
    }
    print_devices(vm);
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    finish(args, IrqChip::Kernel, vm, &seen, stop)
}

fn linux_image() -> anyhow::Result<LinuxImage> {
    let dir = linux::image_dir(linux::PINNED_VERSION);
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .with_context(|| format!("No {name} in {}: run scripts/guest-images.sh", dir.display()))
    };
    println!("(Linux {} from {}; on this host its boot takes minutes)", linux::PINNED_VERSION.trim(), dir.display());
    Ok(LinuxImage {
        kernel: read("vmlinuz")?,
        initrd: Some(read("initramfs.cpio.gz")?),
        cmdline: linux::DEFAULT_CMDLINE.to_string(),
    })
}

fn print_devices(vm: &machine::VmReport) {
    println!("\nexits per device (time from the exit to the answer, at the client):");
    for (c, (_, h)) in vm.per_device().iter().zip(vm.device_times()) {
        if c.target == Target::Debug {
            continue;
        }
        println!(
            "  {:<26} {:>5} exits ({:>4} reads, {:>4} writes)   p50 {:>6.1} µs   p99 {:>6.1} µs",
            name_of(c.target),
            c.reads + c.writes,
            c.reads,
            c.writes,
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        );
    }
}

/// The demo's verdict from what the console showed.
fn finish(
    args: &DemoArgs,
    irqchip: IrqChip,
    vm: &machine::VmReport,
    seen: &str,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    if stop.load(Ordering::Relaxed) {
        bail!("Interrupted");
    }
    if args.linux {
        if seen.contains("printk: console [ttyS0] enabled") {
            if vm.error().is_some() {
                println!("(This host's KVM cannot run the rest of a Linux boot: see MACHINE-FACTS.md.)");
            }
            return Ok(());
        }
        bail!("Linux did not get its console going: {}", vm.error().unwrap_or("no error"));
    }
    if let Some(e) = vm.error() {
        bail!("The VM stopped with an error: {e}");
    }
    if !seen.contains("dmfabric demo guest") || !seen.contains("from the remote RTC") && !seen.contains("from the RTC")
    {
        bail!("The guest's console never showed its banner and clock (seen: {seen:?})");
    }
    let last_tick = match irqchip {
        IrqChip::Remote => format!("HPET tick {} (through the remote I/O APIC)", args.ticks),
        IrqChip::Kernel => format!("event timer tick {}", args.ticks),
    };
    if !seen.contains(&last_tick) {
        bail!("The guest's console never showed \"{last_tick}\" (seen: {seen:?})");
    }
    Ok(())
}
