//! `dmfabric`: the one binary.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod bench;
mod client;
mod console;
mod ctl;
mod demo;
mod io;
mod server;
mod server_config;

#[derive(Debug, Parser)]
#[command(
    name = "dmfabric",
    version,
    about = "Run VMs whose emulated devices live on other hosts, over raw Ethernet and AF_XDP"
)]
struct Cli {
    /// How log events are written to stderr: text (one line each, fields as
    /// key=value) or json (one object each). RUST_LOG picks what is logged
    /// (default: info; e.g. RUST_LOG=debug, RUST_LOG=dmfabric_dm_workers=debug).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Log events of every crate to stderr, as `format` says, filtered by RUST_LOG.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve device models to client platforms over the wire.
    Server(server::ServerArgs),
    /// Run VMs on this client platform, their devices on dmfabric servers.
    Client(client::ClientArgs),
    /// Attach this terminal to a VM's UART at a server (Ctrl-] detaches).
    Console(console::ConsoleArgs),
    /// List, show and edit the control panel's database (checked before written).
    Ctl(ctl::CtlArgs),
    /// Read or write device registers at a server as a given VM, over the
    /// wire (one access, or a script of them); prints interrupts that arrive.
    Io(io::IoArgs),
    /// Measure the data plane between two network namespaces.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Boot a KVM guest whose UART, RTC, event timer and i8042 are served by
    /// a dmfabric server in another network namespace; stream its console,
    /// type at it, print the counters, remove everything.
    Demo(demo::DemoArgs),
}

/// Set by SIGUSR1: print the counters now (`kill -USR1 <pid>`).
pub static DUMP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    DUMP.store(true, Ordering::Relaxed);
}

/// Set on Ctrl-C / SIGTERM; every long-running loop checks it.
fn install_stop_handler() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let presses = AtomicU32::new(0);
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::Relaxed) >= 2 {
            eprintln!("dmfabric: interrupted three times, exiting without cleanup (the next run removes leftovers)");
            std::process::exit(130);
        }
        flag.store(true, Ordering::Relaxed);
    })?;
    Ok(stop)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_usr1) {
        eprintln!("dmfabric: cannot handle SIGUSR1 ({e}); counters print at exit only");
    }
    let result = install_stop_handler().and_then(|stop| match cli.cmd {
        Cmd::Server(args) => server::run(args, stop),
        Cmd::Client(args) => client::run(args, stop),
        Cmd::Console(args) => console::run(args, stop),
        Cmd::Ctl(args) => ctl::run(args),
        Cmd::Io(args) => io::run(args, stop),
        Cmd::Bench(cmd) => bench::run(cmd, stop),
        Cmd::Demo(args) => demo::run(args, stop),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("dmfabric: {e:#}");
            ExitCode::FAILURE
        }
    }
}
