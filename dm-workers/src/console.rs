//! Consoles at the server (the design centralises them): each VM's UART
//! sends its bytes into a lock-free queue that the console service drains
//! into the VM's console log and to whoever is attached; what attached
//! terminals type goes the other way, into the UART's receive FIFO.
//!
//! The models run on worker cores; the service is an ordinary thread. They
//! meet only in the bounded queues of a [`Console`], so a slow terminal or
//! disk never holds up a worker: output that finds the queue full is
//! dropped and counted.
//!
//! What a VM prints is private: the console directory is made 0700, its
//! logs and socket 0600 (set explicitly, whatever the umask), and a
//! connection is served only if its peer (`SO_PEERCRED`) is root or the
//! server's own user. The attach protocol, both sides of it, is a pair of
//! pure functions ([`parse_request`], [`parse_answer`]).

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use dmfabric_devices::{ByteSink, ByteSource};

/// Bytes of output a console holds for the service.
pub const OUTPUT_QUEUE: usize = 1 << 16;
/// Bytes typed and not yet taken by the UART.
pub const INPUT_QUEUE: usize = 1 << 12;

/// One console: a UART's output and input.
#[derive(Debug)]
pub struct Console {
    /// The VM the UART belongs to (its console is named after it).
    pub vm: u32,
    pub device: u32,
    output: ArrayQueue<u8>,
    input: ArrayQueue<u8>,
    output_dropped: AtomicU64,
    input_dropped: AtomicU64,
}

impl Console {
    fn new(vm: u32, device: u32) -> Console {
        Console {
            vm,
            device,
            output: ArrayQueue::new(OUTPUT_QUEUE),
            input: ArrayQueue::new(INPUT_QUEUE),
            output_dropped: AtomicU64::new(0),
            input_dropped: AtomicU64::new(0),
        }
    }

    /// Take what the UART sent.
    pub fn drain_output(&self, into: &mut Vec<u8>) {
        while let Some(b) = self.output.pop() {
            into.push(b);
        }
    }

    /// Queue typed bytes for the UART; returns how many fitted.
    pub fn type_in(&self, bytes: &[u8]) -> usize {
        let mut n = 0;
        for &b in bytes {
            if self.input.push(b).is_err() {
                self.input_dropped.fetch_add((bytes.len() - n) as u64, Ordering::Relaxed);
                break;
            }
            n += 1;
        }
        n
    }

    pub fn output_dropped(&self) -> u64 {
        self.output_dropped.load(Ordering::Relaxed)
    }

    pub fn input_dropped(&self) -> u64 {
        self.input_dropped.load(Ordering::Relaxed)
    }
}

/// The consoles of a server, one per UART. UARTs placed on a running
/// server (or moved to it) add theirs while the service runs: it picks
/// them up.
#[derive(Debug, Default)]
pub struct Consoles {
    list: RwLock<Vec<Arc<Console>>>,
    /// Consoles added so far: the service looks again when it moves.
    added: AtomicU64,
}

impl Consoles {
    /// The console of UART `device` of `vm`: the one it had (a UART built
    /// again keeps its console and log), or a new one.
    pub fn get_or_add(&self, vm: u32, device: u32) -> Arc<Console> {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = list.iter().find(|c| c.device == device && c.vm == vm) {
            return c.clone();
        }
        let c = Arc::new(Console::new(vm, device));
        list.push(c.clone());
        self.added.fetch_add(1, Ordering::Release);
        c
    }

    /// The console of `vm` (its first UART).
    pub fn of_vm(&self, vm: u32) -> Option<Arc<Console>> {
        self.all().into_iter().find(|c| c.vm == vm)
    }

    /// Every console so far.
    pub fn all(&self) -> Vec<Arc<Console>> {
        self.list.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many consoles were ever added (a change means new ones).
    pub fn added(&self) -> u64 {
        self.added.load(Ordering::Acquire)
    }
}

/// The UART's side of its console: output.
#[derive(Debug, Clone)]
pub struct ConsoleOut(pub Arc<Console>);

impl ByteSink for ConsoleOut {
    fn put(&mut self, byte: u8) {
        if self.0.output.push(byte).is_err() {
            self.0.output_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The UART's side of its console: input.
#[derive(Debug, Clone)]
pub struct ConsoleIn(pub Arc<Console>);

impl ByteSource for ConsoleIn {
    fn take(&mut self, max: usize, into: &mut dyn FnMut(u8)) {
        for _ in 0..max {
            match self.0.input.pop() {
                Some(b) => into(b),
                None => break,
            }
        }
    }
}

/// The most bytes a terminal may send before its request line ends.
pub const MAX_REQUEST: usize = 64;
/// The most bytes of the service's answer line a terminal reads.
pub const MAX_ANSWER: usize = 1024;

/// What a terminal's first bytes ask of the console service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// No line yet, and room for one.
    Incomplete,
    /// `attach <vm>\n` (the line as sent, trimmed), then what was typed
    /// after it.
    Attach { vm: u32, line: String, typed: &'a [u8] },
    /// Anything else: why, for the answer.
    Invalid(String),
}

/// The request line that attaches a terminal to `vm`'s console.
pub fn request_line(vm: u32) -> String {
    format!("attach {vm}\n")
}

/// What the bytes a terminal sent so far (`buf`) ask for. Once this is not
/// [`Request::Incomplete`], more bytes after `buf` would not change it.
pub fn parse_request(buf: &[u8]) -> Request<'_> {
    let end = match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end <= MAX_REQUEST => end,
        None if buf.len() <= MAX_REQUEST => return Request::Incomplete,
        _ => return Request::Invalid(format!("no request line within {MAX_REQUEST} bytes")),
    };
    let line = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    match line.strip_prefix("attach ").and_then(|v| v.trim().parse::<u32>().ok()) {
        Some(vm) => Request::Attach { vm, line, typed: &buf[end + 1..] },
        None => Request::Invalid(format!("no console for {line:?}")),
    }
}

/// The answer to a terminal attached to `vm`.
pub fn answer_ok(vm: u32) -> String {
    format!("ok {vm}\n")
}

/// The answer to a terminal that is refused, and closed.
pub fn answer_error(why: &str) -> String {
    format!("error {}\n", why.replace('\n', " "))
}

/// Why a terminal was not attached, from the service's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("The console socket closed before it answered: is the server stopping?")]
    Closed,
    #[error("The server says: {0}")]
    Refused(String),
    #[error("Unexpected answer from the console socket: {0:?} (is it a dmfabric server's?)")]
    Unexpected(String),
}

/// What the service's answer line (at most [`MAX_ANSWER`] bytes read, the
/// newline included if there was one) says to a terminal that asked for
/// `vm`. Control characters in a refusal are escaped: it goes to a terminal.
pub fn parse_answer(line: &[u8], vm: u32) -> Result<(), AnswerError> {
    if line.is_empty() {
        return Err(AnswerError::Closed);
    }
    let Some(text) = line.strip_suffix(b"\n") else {
        return Err(AnswerError::Unexpected(printable(line)));
    };
    if text == answer_ok(vm).trim_end().as_bytes() {
        return Ok(());
    }
    match text.strip_prefix(b"error ") {
        Some(why) => Err(AnswerError::Refused(printable(why))),
        None => Err(AnswerError::Unexpected(printable(text))),
    }
}

/// `bytes` as text with its control characters escaped.
fn printable(bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(bytes).chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a peer of uid `peer` may use the console socket of a server
/// running as `own`: root, or the server's own user.
pub fn admits(peer: u32, own: u32) -> bool {
    peer == 0 || peer == own
}

/// Name of the socket `dmfabric console` attaches through, in the console directory.
pub const SOCKET: &str = "console.sock";

/// The console log of `vm` in `dir`.
pub fn log_path(dir: &Path, vm: u32) -> PathBuf {
    dir.join(format!("vm-{vm}.log"))
}

/// Why the console service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("Cannot create the console directory {0}: {1}")]
    Dir(PathBuf, #[source] io::Error),
    #[error(
        "The console directory {path} is {what}, not a directory of this server's user (uid {own}): \
         remove it or choose another --console-dir"
    )]
    NotOurs { path: PathBuf, what: String, own: u32 },
    #[error("Cannot open the console log {0}: {1}")]
    Log(PathBuf, #[source] io::Error),
    #[error("Cannot listen on {0}: {1} (is another server using this console directory?)")]
    Listen(PathBuf, #[source] io::Error),
}

struct Attached {
    stream: UnixStream,
    /// The console it is attached to (None: still reading its request).
    console: Option<Arc<Console>>,
    request: Vec<u8>,
}

/// What the console service did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub bytes_logged: u64,
    pub bytes_typed: u64,
    pub attaches: u64,
    pub refused: u64,
}

/// The console service of a server: each console's log, and the socket
/// terminals attach through. Opened as soon as there is a console: at once
/// for UARTs a server starts with, later for one placed on it while it runs.
#[derive(Debug)]
pub struct Service {
    dir: PathBuf,
    listener: Option<UnixListener>,
    /// Each console with its log.
    logs: Vec<(Arc<Console>, File)>,
    /// [`Consoles::added`] when the logs were last brought up to date.
    seen: u64,
}

/// Serve `consoles` until `stop` ([`Service::open`] then [`Service::run`]).
pub fn serve(consoles: &Consoles, dir: &Path, stop: &AtomicBool) -> Result<ServiceStats, ServiceError> {
    Ok(Service::open(consoles, dir)?.run(consoles, stop))
}

impl Service {
    /// The service of the consoles in `dir`: if there are consoles already,
    /// create `dir`, each VM's log `dir/vm-<vm>.log` (afresh) and the socket
    /// `dir/console.sock` now, so that a clash shows at start.
    pub fn open(consoles: &Consoles, dir: &Path) -> Result<Service, ServiceError> {
        let mut s = Service { dir: dir.to_path_buf(), listener: None, logs: Vec::new(), seen: 0 };
        if !consoles.all().is_empty() {
            s.catch_up(consoles)?;
        }
        Ok(s)
    }

    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    /// Open the directory and socket if not yet, and a log for each new console.
    fn catch_up(&mut self, consoles: &Consoles) -> Result<(), ServiceError> {
        let added = consoles.added();
        if self.listener.is_none() {
            let dir = &self.dir;
            private_dir(dir)?;
            let sock = self.socket();
            // A socket file left by a server that was killed: nobody listens on it.
            if sock.exists() && UnixStream::connect(&sock).is_ok() {
                return Err(ServiceError::Listen(sock, io::ErrorKind::AddrInUse.into()));
            }
            let _ = std::fs::remove_file(&sock);
            let listener = UnixListener::bind(&sock).map_err(|e| ServiceError::Listen(sock.clone(), e))?;
            // The directory is 0700 already: nobody else could reach it in between.
            std::fs::set_permissions(&sock, Permissions::from_mode(0o600))
                .map_err(|e| ServiceError::Listen(sock.clone(), e))?;
            listener.set_nonblocking(true).map_err(|e| ServiceError::Listen(sock.clone(), e))?;
            self.listener = Some(listener);
        }
        for c in consoles.all() {
            if self.logs.iter().any(|(known, _)| Arc::ptr_eq(known, &c)) {
                continue;
            }
            let path = log_path(&self.dir, c.vm);
            let file = private_log(&path).map_err(|e| ServiceError::Log(path, e))?;
            tracing::info!(vm = c.vm, device = c.device, log = %log_path(&self.dir, c.vm).display(), "console open");
            self.logs.push((c, file));
        }
        self.seen = added;
        Ok(())
    }

    /// Append each VM's output to its log and to every attached terminal,
    /// put what they type into the VM's UART, until `stop`.
    ///
    /// A terminal attaches by sending `attach <vm>\n`; it gets `ok <vm>\n`
    /// (or `error ...\n` and the connection closes), then the raw bytes. A
    /// connection from a user other than root and the server's own is
    /// answered `error ...` and closed, counted in `refused` and logged.
    pub fn run(mut self, consoles: &Consoles, stop: &AtomicBool) -> ServiceStats {
        let mut stats = ServiceStats::default();
        let mut attached: Vec<Attached> = Vec::new();
        let mut buf = Vec::new();
        let mut input = [0u8; 512];
        let mut failed = false;
        let own = rustix::process::geteuid().as_raw();
        while !stop.load(Ordering::Relaxed) {
            let mut busy = false;
            if consoles.added() != self.seen && !failed {
                if let Err(e) = self.catch_up(consoles) {
                    // Said once; the consoles keep taking output (dropped when full).
                    tracing::error!("{e}: consoles are not served");
                    failed = true;
                }
            }
            if let Some(listener) = &self.listener {
                while let Ok((mut stream, _)) = listener.accept() {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    match check_peer(&stream, own) {
                        Ok(()) => attached.push(Attached { stream, console: None, request: Vec::new() }),
                        Err(why) => {
                            stats.refused += 1;
                            tracing::warn!("console connection refused: {why}");
                            let _ = write_all_nonblocking(&mut stream, answer_error(&why.to_string()).as_bytes());
                        }
                    }
                }
            }
            for (c, log) in &mut self.logs {
                buf.clear();
                c.drain_output(&mut buf);
                if buf.is_empty() {
                    continue;
                }
                busy = true;
                stats.bytes_logged += buf.len() as u64;
                let _ = log.write_all(&buf);
                for a in attached.iter_mut().filter(|a| a.console.as_ref().is_some_and(|ac| Arc::ptr_eq(ac, c))) {
                    let _ = write_all_nonblocking(&mut a.stream, &buf);
                }
            }
            let served: Vec<Arc<Console>> = self.logs.iter().map(|(c, _)| c.clone()).collect();
            attached.retain_mut(|a| match a.stream.read(&mut input) {
                Ok(0) => false,
                Ok(n) => {
                    busy = true;
                    match &a.console {
                        Some(c) => {
                            stats.bytes_typed += c.type_in(&input[..n]) as u64;
                            true
                        }
                        None => attach(a, &input[..n], &served, &mut stats),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                Err(_) => false,
            });
            if !busy {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if self.listener.is_some() {
            let _ = std::fs::remove_file(self.socket());
        }
        // What the UARTs sent last.
        for (c, log) in &mut self.logs {
            buf.clear();
            c.drain_output(&mut buf);
            stats.bytes_logged += buf.len() as u64;
            let _ = log.write_all(&buf);
        }
        stats
    }
}

/// Handle the bytes of a terminal that has not attached yet.
fn attach(a: &mut Attached, bytes: &[u8], consoles: &[Arc<Console>], stats: &mut ServiceStats) -> bool {
    a.request.extend_from_slice(bytes);
    let why = match parse_request(&a.request) {
        Request::Incomplete => return true,
        Request::Attach { vm, line, typed } => match consoles.iter().find(|c| c.vm == vm) {
            Some(c) => {
                stats.attaches += 1;
                let typed = typed.to_vec();
                let _ = write_all_nonblocking(&mut a.stream, answer_ok(vm).as_bytes());
                if !typed.is_empty() {
                    stats.bytes_typed += c.type_in(&typed) as u64;
                }
                a.console = Some(c.clone());
                return true;
            }
            None => format!("no console for {line:?}"),
        },
        Request::Invalid(why) => why,
    };
    stats.refused += 1;
    let known: Vec<String> = consoles.iter().map(|c| c.vm.to_string()).collect();
    let msg = answer_error(&format!("{why} on this server (VMs with a console: {})", known.join(", ")));
    let _ = write_all_nonblocking(&mut a.stream, msg.as_bytes());
    false
}

/// Why a connection to the console socket is not served.
#[derive(Debug, thiserror::Error)]
enum PeerRefusal {
    #[error("pid {pid} runs as uid {uid}; this console takes root and uid {own} only")]
    Uid { pid: i32, uid: u32, own: u32 },
    #[error("its peer's credentials are unreadable ({0}); this console takes root and uid {1} only")]
    Unknown(io::Error, u32),
}

/// Admit the peer of `stream` if it runs as root or as `own` (SO_PEERCRED).
fn check_peer(stream: &UnixStream, own: u32) -> Result<(), PeerRefusal> {
    let cred = rustix::net::sockopt::socket_peercred(stream).map_err(|e| PeerRefusal::Unknown(e.into(), own))?;
    let uid = cred.uid.as_raw();
    if admits(uid, own) {
        Ok(())
    } else {
        Err(PeerRefusal::Uid { pid: cred.pid.as_raw_pid(), uid, own })
    }
}

/// Create `dir` (and its parents) if needed and make it 0700; refuse one
/// that is a symlink or another user's.
fn private_dir(dir: &Path) -> Result<(), ServiceError> {
    let err = |e| ServiceError::Dir(dir.to_path_buf(), e);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    let meta = std::fs::symlink_metadata(dir).map_err(err)?;
    let own = rustix::process::geteuid().as_raw();
    let what = if meta.file_type().is_symlink() {
        Some("a symbolic link".to_string())
    } else if !meta.is_dir() {
        Some("not a directory".to_string())
    } else if meta.uid() != own {
        Some(format!("owned by uid {}", meta.uid()))
    } else {
        None
    };
    if let Some(what) = what {
        return Err(ServiceError::NotOurs { path: dir.to_path_buf(), what, own });
    }
    // Explicitly: a directory made by an older server, or under a loose umask.
    std::fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(err)
}

/// Open the console log at `path` afresh, 0600 (a log that was there keeps
/// its inode: its mode is set too).
fn private_log(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.set_permissions(Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Write all of `bytes` to a non-blocking stream, waiting briefly when it is
/// full; a terminal that stays full for a second loses the rest.
fn write_all_nonblocking(s: &mut UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    let end = std::time::Instant::now() + Duration::from_secs(1);
    while !bytes.is_empty() {
        match s.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < end => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_both_ways_and_overflow_is_counted() {
        let consoles = Consoles::default();
        let c = consoles.get_or_add(7, 3);
        let (mut out, mut inp) = (ConsoleOut(c.clone()), ConsoleIn(c.clone()));
        for b in b"boot\n" {
            out.put(*b);
        }
        let mut got = Vec::new();
        consoles.of_vm(7).unwrap().drain_output(&mut got);
        assert_eq!(got, b"boot\n");
        assert_eq!(c.type_in(b"ls\n"), 3);
        let mut typed = Vec::new();
        inp.take(2, &mut |b| typed.push(b));
        assert_eq!(typed, b"ls", "no more than the FIFO has room for");
        for _ in 0..OUTPUT_QUEUE + 5 {
            out.put(b'x');
        }
        assert_eq!(c.output_dropped(), 5);
        assert!(consoles.of_vm(8).is_none());
    }

    #[test]
    fn the_service_logs_output_and_attached_terminals_type_into_the_uart() {
        use std::io::{BufRead, BufReader};
        let dir = std::env::temp_dir().join(format!("dmfabric-console-test-{}", std::process::id()));
        let consoles = Consoles::default();
        let c = consoles.get_or_add(4, 10);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let service = s.spawn(|| serve(&consoles, &dir, &stop));
            let sock = dir.join(SOCKET);
            let end = std::time::Instant::now() + Duration::from_secs(5);
            let mut stream = loop {
                match UnixStream::connect(&sock) {
                    Ok(st) => break st,
                    Err(e) if std::time::Instant::now() < end => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("no console socket: {e}"),
                }
            };
            // A VM without a console is refused with the ones there are.
            let mut other = UnixStream::connect(&sock).unwrap();
            other.write_all(b"attach 9\n").unwrap();
            let mut line = String::new();
            BufReader::new(&mut other).read_line(&mut line).unwrap();
            assert!(line.starts_with("error no console") && line.contains("VMs with a console: 4"), "{line}");
            stream.write_all(b"attach 4\nls\n").unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "ok 4\n");
            let mut out = ConsoleOut(c.clone());
            for b in b"$ " {
                out.put(*b);
            }
            let mut got = [0u8; 2];
            reader.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"$ ");
            let mut typed = Vec::new();
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while typed.len() < 3 && std::time::Instant::now() < end {
                ConsoleIn(c.clone()).take(16, &mut |b| typed.push(b));
            }
            assert_eq!(typed, b"ls\n");
            stop.store(true, Ordering::Relaxed);
            let stats = service.join().unwrap().unwrap();
            assert_eq!((stats.attaches, stats.refused, stats.bytes_logged, stats.bytes_typed), (1, 1, 2, 3));
        });
        assert_eq!(std::fs::read(log_path(&dir, 4)).unwrap(), b"$ ");
        assert!(!dir.join(SOCKET).exists(), "socket removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_console_added_while_the_service_runs_is_served() {
        use std::io::{BufRead, BufReader};
        let dir = std::env::temp_dir().join(format!("dmfabric-console-late-{}", std::process::id()));
        let consoles = Consoles::default();
        let stop = AtomicBool::new(false);
        // No UART yet: nothing is opened.
        let service = Service::open(&consoles, &dir).unwrap();
        assert!(!dir.join(SOCKET).exists());
        std::thread::scope(|s| {
            let running = s.spawn(|| service.run(&consoles, &stop));
            // A UART placed later: its console appears and is served.
            let c = consoles.get_or_add(9, 90);
            let end = std::time::Instant::now() + Duration::from_secs(5);
            let mut stream = loop {
                match UnixStream::connect(dir.join(SOCKET)) {
                    Ok(st) => break st,
                    Err(_) if std::time::Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
                    Err(e) => panic!("no console socket: {e}"),
                }
            };
            stream.write_all(b"attach 9\n").unwrap();
            let mut line = String::new();
            BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line, "ok 9\n");
            let mut out = ConsoleOut(c.clone());
            out.put(b'!');
            let mut got = [0u8; 1];
            stream.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"!");
            stop.store(true, Ordering::Relaxed);
            running.join().unwrap();
        });
        assert_eq!(std::fs::read(log_path(&dir, 9)).unwrap(), b"!");
        let _ = std::fs::remove_dir_all(&dir);
    }
    #[test]
    fn a_request_is_a_line_of_at_most_64_bytes_naming_a_vm() {
        assert_eq!(parse_request(b""), Request::Incomplete);
        assert_eq!(parse_request(b"attach 4"), Request::Incomplete);
        assert_eq!(parse_request(&[b'x'; MAX_REQUEST]), Request::Incomplete);
        assert_eq!(
            parse_request(b"attach 4\nls\n"),
            Request::Attach { vm: 4, line: "attach 4".into(), typed: b"ls\n" }
        );
        assert_eq!(
            parse_request(b" attach  12 \r\n"),
            Request::Attach { vm: 12, line: "attach  12".into(), typed: b"" }
        );
        assert_eq!(
            parse_request(request_line(u32::MAX).as_bytes()),
            Request::Attach { vm: u32::MAX, line: format!("attach {}", u32::MAX), typed: b"" }
        );
        for bad in [&b"attach\n"[..], b"attach -1\n", b"attach 4294967296\n", b"detach 4\n", b"\xff\xfe\n", b"\n"] {
            assert!(
                matches!(parse_request(bad), Request::Invalid(ref why) if why.starts_with("no console for")),
                "{bad:?}"
            );
        }
        let long = [b'a'; MAX_REQUEST + 1];
        assert_eq!(parse_request(&long), Request::Invalid("no request line within 64 bytes".into()));
        let late_newline = [&[b'a'; MAX_REQUEST + 1][..], b"\n"].concat();
        assert_eq!(parse_request(&late_newline), parse_request(&long), "more bytes do not change a decision");
    }

    #[test]
    fn an_answer_is_ok_with_the_vm_or_an_error_line_made_printable() {
        assert_eq!(parse_answer(answer_ok(7).as_bytes(), 7), Ok(()));
        assert_eq!(parse_answer(answer_ok(7).as_bytes(), 8), Err(AnswerError::Unexpected("ok 7".into())));
        assert_eq!(parse_answer(b"", 7), Err(AnswerError::Closed));
        assert_eq!(parse_answer(b"ok 7", 7), Err(AnswerError::Unexpected("ok 7".into())), "no newline: cut short");
        assert_eq!(
            parse_answer(answer_error("no console\nfor \"attach 7\"").as_bytes(), 7),
            Err(AnswerError::Refused("no console for \"attach 7\"".into()))
        );
        assert_eq!(
            parse_answer(b"error \x1b[2Jgone\r\n", 7),
            Err(AnswerError::Refused("\\u{1b}[2Jgone\\r".into())),
            "no terminal control from the socket"
        );
    }

    #[test]
    fn root_and_the_servers_own_user_are_admitted() {
        assert!(admits(0, 1000) && admits(1000, 1000) && admits(0, 0));
        assert!(!admits(1001, 1000) && !admits(65534, 0));
    }

    /// Attach to `vm` at `sock` as this process's user once the service
    /// serves it (so the service is past setting its modes).
    fn attach_when_up(sock: &Path, vm: u32) -> UnixStream {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let mut s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < end => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("no console socket at {}: {e}", sock.display()),
            }
        };
        s.write_all(request_line(vm).as_bytes()).unwrap();
        let mut line = Vec::new();
        io::BufRead::read_until(&mut io::BufReader::new(s.try_clone().unwrap()), b'\n', &mut line).unwrap();
        assert_eq!(parse_answer(&line, vm), Ok(()));
        s
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_directory_logs_and_socket_are_private_whatever_was_there() {
        let dir = std::env::temp_dir().join(format!("dmfabric-console-modes-{}", std::process::id()));
        // A directory and a log left loose by an older server.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        std::fs::write(log_path(&dir, 4), b"old").unwrap();
        std::fs::set_permissions(log_path(&dir, 4), Permissions::from_mode(0o644)).unwrap();
        let consoles = Consoles::default();
        consoles.get_or_add(4, 10);
        consoles.get_or_add(5, 11);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let service = s.spawn(|| serve(&consoles, &dir, &stop));
            attach_when_up(&dir.join(SOCKET), 4);
            assert_eq!(mode(&dir), 0o700, "directory");
            assert_eq!((mode(&log_path(&dir, 4)), mode(&log_path(&dir, 5))), (0o600, 0o600), "logs");
            assert_eq!(mode(&dir.join(SOCKET)), 0o600, "socket");
            assert_eq!(std::fs::read(log_path(&dir, 4)).unwrap(), b"", "a log starts afresh");
            stop.store(true, Ordering::Relaxed);
            service.join().unwrap().unwrap();
        });
        std::fs::remove_dir_all(&dir).unwrap();
        // A symbolic link is not followed to somewhere else.
        let target = std::env::temp_dir().join(format!("dmfabric-console-target-{}", std::process::id()));
        std::fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::symlink(&target, &dir).unwrap();
        let consoles = Consoles::default();
        consoles.get_or_add(4, 10);
        let err = Service::open(&consoles, &dir).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        let _ = std::fs::remove_file(&dir);
        let _ = std::fs::remove_dir_all(&target);
    }

    /// Where [`peer_helper`] connects (set by the test that runs it as another user).
    const PEER_SOCKET: &str = "DMFABRIC_CONSOLE_TEST_PEER_SOCKET";

    /// Not a test on its own: run as another user by the test below, it
    /// asks the socket in [`PEER_SOCKET`] for VM 4 and prints the answer.
    #[test]
    fn peer_helper() {
        let Ok(sock) = std::env::var(PEER_SOCKET) else { return };
        let said = match UnixStream::connect(&sock) {
            Ok(mut s) => {
                let _ = s.write_all(request_line(4).as_bytes());
                let mut line = Vec::new();
                let _ = io::BufRead::read_until(&mut io::BufReader::new(s).take(MAX_ANSWER as u64), b'\n', &mut line);
                format!("answer: {}", String::from_utf8_lossy(&line).trim())
            }
            Err(e) => format!("connect: {:?}", e.kind()),
        };
        println!("{said}");
    }

    #[test]
    fn a_connection_from_another_user_is_refused_and_counted() {
        use std::os::unix::process::CommandExt;
        if !dmfabric_testkit::privileged_or_skip("console: another user is refused", &[dmfabric_testkit::Need::Root]) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("dmfabric-console-peer-{}", std::process::id()));
        let sock = dir.join(SOCKET);
        let as_nobody = || {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "console::tests::peer_helper", "--nocapture", "--test-threads=1", "-q"])
                .env(PEER_SOCKET, &sock)
                .uid(65534)
                .gid(65534)
                .output()
                .expect("the test binary runs as uid 65534 (is its path readable by everyone?)");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let said = stdout.lines().find(|l| l.starts_with("answer: ") || l.starts_with("connect: "));
            said.unwrap_or_else(|| panic!("the helper said nothing: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
                .to_string()
        };
        let consoles = Consoles::default();
        consoles.get_or_add(4, 10);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let service = s.spawn(|| serve(&consoles, &dir, &stop));
            // Root is served.
            attach_when_up(&sock, 4);
            // The modes alone keep another user out.
            assert_eq!(as_nobody(), "connect: PermissionDenied");
            // With them loosened, SO_PEERCRED still does.
            std::fs::set_permissions(&dir, Permissions::from_mode(0o711)).unwrap();
            std::fs::set_permissions(&sock, Permissions::from_mode(0o666)).unwrap();
            let said = as_nobody();
            assert!(said.starts_with("answer: error pid ") && said.contains("runs as uid 65534"), "{said}");
            stop.store(true, Ordering::Relaxed);
            let stats = service.join().unwrap().unwrap();
            assert_eq!((stats.refused, stats.attaches), (1, 1));
        });
        // Another user's directory is not taken over.
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = Service::open(&consoles, &dir).unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
