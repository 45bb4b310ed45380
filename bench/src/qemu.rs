//! What the benchmarks that compare with QEMU share: a scratch directory
//! removed when dropped, QEMU killed when dropped, and commands to its QMP
//! socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Removes a directory when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

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
