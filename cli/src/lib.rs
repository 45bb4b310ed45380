//! `dmfabric`: the one binary's commands. `main.rs` calls [`main`]; the
//! fuzz targets reach the parsers of what users write (the server's config,
//! [`server_config::parse`], and the client's, [`client::parse_config`]).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod bench;
pub mod client;
mod console;
mod ctl;
mod demo;
mod io;
mod metrics;
mod server;
pub mod server_config;
mod top;

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
    /// Write a new key file for a client platform (config mode, no store):
    /// the client platform and its servers load it with key_file = ...
    Keygen(ctl::KeygenArgs),
    /// Read or write device registers at a server as a given VM, over the
    /// wire (one access, or a script of them); prints interrupts that arrive.
    Io(io::IoArgs),
    /// Measure the data plane between two network namespaces.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// A live view of servers and clients from their --metrics endpoints
    /// (q quits; --once --json for scripts).
    Top(top::TopArgs),
    /// Boot a KVM guest whose UART, RTC, event timer and i8042 are served by
    /// a dmfabric server in another network namespace; stream its console,
    /// type at it, print the counters, remove everything.
    Demo(demo::DemoArgs),
}

/// Set by SIGUSR1: print the counters now (`kill -USR1 <pid>`); a busy
/// loop (the server's) looks at it.
pub static DUMP: AtomicBool = AtomicBool::new(false);

/// What the signals say, for commands that sleep until something happens.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Set on Ctrl-C / SIGTERM; every long-running loop checks it.
    pub stop: Arc<AtomicBool>,
    /// A message on each Ctrl-C / SIGTERM.
    pub wake: crossbeam_channel::Receiver<()>,
    /// A message on each SIGUSR1 (and [`DUMP`] set).
    pub dump: crossbeam_channel::Receiver<()>,
}

/// Ctrl-C / SIGTERM stop everything (three presses exit at once); SIGUSR1
/// asks for the counters.
fn install_signal_handlers() -> anyhow::Result<Signals> {
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_tx, wake) = crossbeam_channel::unbounded();
    let flag = stop.clone();
    let presses = AtomicU32::new(0);
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::Relaxed) >= 2 {
            eprintln!("dmfabric: interrupted three times, exiting without cleanup (the next run removes leftovers)");
            std::process::exit(130);
        }
        flag.store(true, Ordering::Relaxed);
        let _ = wake_tx.send(());
    })?;
    let (dump_tx, dump) = crossbeam_channel::unbounded();
    match signal_hook::iterator::Signals::new([libc::SIGUSR1]) {
        Ok(mut usr1) => {
            std::thread::Builder::new().name("dmf-signals".into()).spawn(move || {
                for _ in usr1.forever() {
                    DUMP.store(true, Ordering::Relaxed);
                    let _ = dump_tx.send(());
                }
            })?;
        }
        Err(e) => eprintln!("dmfabric: cannot handle SIGUSR1 ({e}); counters print at exit only"),
    }
    Ok(Signals { stop, wake, dump })
}

/// Run the command line's command; what the process exits with.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = install_signal_handlers().and_then(|signals| {
        let stop = signals.stop.clone();
        match cli.cmd {
            Cmd::Server(args) => server::run(args, stop),
            Cmd::Client(args) => client::run(args, &signals),
            Cmd::Console(args) => console::run(args, stop),
            Cmd::Ctl(args) => ctl::run(args),
            Cmd::Keygen(args) => ctl::keygen(args),
            Cmd::Io(args) => io::run(args, stop),
            Cmd::Bench(cmd) => bench::run(cmd, stop),
            Cmd::Demo(args) => demo::run(args, &signals),
            Cmd::Top(args) => top::run(args, stop),
        }
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
