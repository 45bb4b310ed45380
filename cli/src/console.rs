//! `dmfabric console <vm>`: attach this terminal to a VM's UART, from the
//! server side (through the server's console socket). The protocol is
//! `dmfabric_dm_workers::console`'s (`request_line`, `parse_answer`); the
//! socket takes root and the server's user only.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dmfabric_dm_workers::console;

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The VM whose console to attach to.
    vm: u32,
    /// The server whose console directory to use (its default directory).
    #[arg(long, default_value_t = 1)]
    server_id: u16,
    /// The server's --console-dir.
    #[arg(long)]
    console_dir: Option<PathBuf>,
    /// When stdin is not a terminal: keep printing the VM's output this long
    /// after stdin ends.
    #[arg(long, default_value_t = 500)]
    linger_ms: u64,
}

/// Ctrl-]: detach (as telnet).
const DETACH: u8 = 0x1d;

/// The terminal in raw mode until dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        // SAFETY: termios is plain old data; tcgetattr fills it for fd 0,
        // and we check its result before using it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is stdin (a terminal, checked by the caller) and
        // `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            bail!("Cannot read the terminal's settings: {}", std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd 0 is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            bail!("Cannot put the terminal in raw mode: {}", std::io::Error::last_os_error());
        }
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

pub fn run(args: ConsoleArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let dir = args.console_dir.clone().unwrap_or_else(|| crate::server::default_console_dir(args.server_id));
    let sock = dir.join(console::SOCKET);
    let mut stream = match UnixStream::connect(&sock) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "The console at {} is for root and the server's user only: run `dmfabric console` as one of them",
            sock.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "No console at {}: is a dmfabric server with a UART for VM {} running there (its --console-dir)?",
                    sock.display(),
                    args.vm
                )
            })
        }
    };
    stream.write_all(console::request_line(args.vm).as_bytes()).context("The console socket closed")?;
    let mut reader = BufReader::new(stream.try_clone().context("Cannot use the console socket")?);
    // One line, and no more of it than an answer can be: what is on the
    // socket is not trusted to end its line.
    let mut answer = Vec::new();
    reader
        .by_ref()
        .take(console::MAX_ANSWER as u64)
        .read_until(b'\n', &mut answer)
        .context("The console socket closed")?;
    console::parse_answer(&answer, args.vm)?;
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty {
        eprintln!("dmfabric console: attached to VM {} (Ctrl-] detaches)\r", args.vm);
        Some(RawMode::enter()?)
    } else {
        None
    };
    let done = Arc::new(AtomicBool::new(false));
    // The VM's output to stdout.
    let out_done = done.clone();
    let printer = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
            }
            if out_done.load(Ordering::Relaxed) {
                break;
            }
        }
    });
    // What is typed, to the VM.
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("Cannot read stdin"),
        };
        let input = &buf[..n];
        let (input, detach) = match input.iter().position(|&b| b == DETACH && tty) {
            Some(i) => (&input[..i], true),
            None => (input, false),
        };
        if stream.write_all(input).is_err() {
            eprintln!("dmfabric console: the server closed the console\r");
            break;
        }
        if detach {
            break;
        }
    }
    if !tty {
        std::thread::sleep(Duration::from_millis(args.linger_ms));
    }
    done.store(true, Ordering::Relaxed);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = printer.join();
    if tty {
        drop(_raw);
        eprintln!("\ndmfabric console: detached from VM {}", args.vm);
    }
    Ok(())
}
