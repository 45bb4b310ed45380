//! What the benchmarks that compare with QEMU share: a scratch directory
//! removed when dropped, QEMU started on a Multiboot guest (debugcon and
//! QMP) and killed when dropped, the wait for the guest's report, and
//! commands to its QMP socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Removes a directory when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `name` with this process's id in the system's temporary directory,
    /// made afresh (what an earlier run left there is removed first).
    pub fn fresh(name: &str) -> std::io::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills QEMU when dropped.
pub(crate) struct Qemu(pub(crate) std::process::Child);

impl Qemu {
    /// ` (QEMU exited: STATUS: its stderr)` if it has exited, else nothing:
    /// the rest of an error line about it.
    pub(crate) fn exit_note(&mut self) -> String {
        let Ok(Some(status)) = self.0.try_wait() else { return String::new() };
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        format!(" (QEMU exited: {status}: {})", err.trim())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-system-x86_64 -enable-kvm -cpu qemu64` with `args` (machine,
/// memory, devices) booting the Multiboot image `kernel`: the guest's
/// debugcon (port 0x4f0) written to `debug`, QMP at `sock`, no display,
/// serial or default devices. `-no-reboot -no-shutdown`: a guest that ends
/// in a reset or a shutdown (a triple fault after its report, in user mode
/// on this host) leaves QEMU running with its memory, which QMP reads.
pub(crate) fn spawn(args: &[String], kernel: &Path, debug: &Path, sock: &Path) -> Result<Qemu, String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-enable-kvm", "-cpu", "qemu64"])
        .args(args)
        .args(["-nodefaults", "-display", "none", "-no-reboot", "-no-shutdown", "-serial", "null", "-kernel"])
        .arg(kernel)
        .arg("-chardev")
        .arg(format!("file,id=dbg,path={}", debug.display()))
        .args(["-device", "isa-debugcon,iobase=0x4f0,chardev=dbg", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child =
        cmd.spawn().map_err(|e| format!("cannot run qemu-system-x86_64: {e} (scripts/setup.sh installs it)"))?;
    Ok(Qemu(child))
}

/// Wait until the guest's debugcon (`debug`) holds `len` bytes or `failed`
/// says what it holds is a failure report; those bytes. An error if QEMU
/// exits first (with its stderr), `stop` is set, or `within` passes.
pub(crate) fn wait_report(
    q: &mut Qemu,
    debug: &Path,
    len: usize,
    failed: impl Fn(&[u8]) -> bool,
    within: Duration,
    stop: &AtomicBool,
) -> Result<Vec<u8>, String> {
    let end = Instant::now() + within;
    loop {
        let got = std::fs::read(debug).unwrap_or_default();
        if got.len() >= len || failed(&got) {
            return Ok(got);
        }
        let note = q.exit_note();
        if !note.is_empty() {
            return Err(format!("the guest under QEMU did not finish{note}"));
        }
        if stop.load(Ordering::Relaxed) {
            return Err("Interrupted".into());
        }
        if Instant::now() > end {
            return Err(format!("the guest under QEMU did not finish within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Send `commands` to QEMU's QMP socket, each answered before the next;
/// an error says what went wrong in one line.
pub(crate) fn qmp(sock: &Path, commands: &[String]) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("QEMU's QMP socket: {what}: {e}");
    let mut s = UnixStream::connect(sock).map_err(|e| err("connect", e))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| err("timeout", e))?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| err("clone", e))?);
    let mut line = String::new();
    if r.read_line(&mut line).map_err(|e| err("greeting", e))? == 0 || !line.contains("QMP") {
        return Err(format!("QEMU's QMP socket: no greeting ({:?})", line.trim()));
    }
    for c in commands {
        s.write_all(c.as_bytes()).and_then(|()| s.write_all(b"\n")).map_err(|e| err("send", e))?;
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(|e| err("answer", e))? == 0 {
                if c.contains("\"quit\"") {
                    return Ok(()); // quit closes the socket
                }
                return Err(format!("QEMU closed its QMP socket before it answered {c}"));
            }
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                return Err(format!("QEMU refused {c}: {}", line.trim()));
            }
        }
    }
    Ok(())
}

/// Send `commands` (pmemsave ... quit) until each of `dumps` (file, size)
/// is written: once more on a fresh connection if the first broke before
/// they were and QEMU still runs (CI has seen its QMP socket close under
/// a client once). An error says why in one line, with QEMU's exit status
/// and stderr if it has exited.
pub(crate) fn qmp_dumps(q: &mut Qemu, sock: &Path, commands: &[String], dumps: &[(&Path, u64)]) -> Result<(), String> {
    let done = || dumps.iter().all(|(f, len)| std::fs::metadata(f).is_ok_and(|m| m.len() == *len));
    let first = qmp(sock, commands);
    if first.is_err() && !done() && q.0.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(200));
        let _ = qmp(sock, commands);
    }
    if done() {
        return Ok(());
    }
    let why = first.err().unwrap_or_else(|| "QEMU did not dump the guest's memory".into());
    Err(format!("{why}{}", q.exit_note()))
}
