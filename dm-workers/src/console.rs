//! Consoles at the server (the design centralises them): each VM's UART
//! sends its bytes into a lock-free queue that the console service drains
//! into the VM's console log and to whoever is attached; what attached
//! terminals type goes the other way, into the UART's receive FIFO.
//!
//! The models run on worker cores; the service is an ordinary thread. They
//! meet only in the bounded queues of a [`Console`], so a slow terminal or
//! disk never holds up a worker: output that finds the queue full is
//! dropped and counted.

use std::fs::File;
use std::io::{self, Read, Write};
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
            std::fs::create_dir_all(dir).map_err(|e| ServiceError::Dir(dir.clone(), e))?;
            let sock = self.socket();
            // A socket file left by a server that was killed: nobody listens on it.
            if sock.exists() && UnixStream::connect(&sock).is_ok() {
                return Err(ServiceError::Listen(sock, io::ErrorKind::AddrInUse.into()));
            }
            let _ = std::fs::remove_file(&sock);
            let listener = UnixListener::bind(&sock).map_err(|e| ServiceError::Listen(sock.clone(), e))?;
            listener.set_nonblocking(true).map_err(|e| ServiceError::Listen(sock.clone(), e))?;
            self.listener = Some(listener);
        }
        for c in consoles.all() {
            if self.logs.iter().any(|(known, _)| Arc::ptr_eq(known, &c)) {
                continue;
            }
            let path = log_path(&self.dir, c.vm);
            let file = File::create(&path).map_err(|e| ServiceError::Log(path, e))?;
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
    /// (or `error ...\n` and the connection closes), then the raw bytes.
    pub fn run(mut self, consoles: &Consoles, stop: &AtomicBool) -> ServiceStats {
        let mut stats = ServiceStats::default();
        let mut attached: Vec<Attached> = Vec::new();
        let mut buf = Vec::new();
        let mut input = [0u8; 512];
        let mut failed = false;
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
                while let Ok((stream, _)) = listener.accept() {
                    if stream.set_nonblocking(true).is_ok() {
                        attached.push(Attached { stream, console: None, request: Vec::new() });
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
    let Some(end) = a.request.iter().position(|&b| b == b'\n') else {
        return a.request.len() < 64;
    };
    let line = String::from_utf8_lossy(&a.request[..end]).trim().to_string();
    let rest = a.request[end + 1..].to_vec();
    let vm = line.strip_prefix("attach ").and_then(|v| v.trim().parse::<u32>().ok());
    let found = vm.and_then(|vm| consoles.iter().find(|c| c.vm == vm));
    match (vm, found) {
        (Some(vm), Some(c)) => {
            stats.attaches += 1;
            let _ = write_all_nonblocking(&mut a.stream, format!("ok {vm}\n").as_bytes());
            if !rest.is_empty() {
                stats.bytes_typed += c.type_in(&rest) as u64;
            }
            a.console = Some(c.clone());
            true
        }
        _ => {
            stats.refused += 1;
            let known: Vec<String> = consoles.iter().map(|c| c.vm.to_string()).collect();
            let msg =
                format!("error no console for {line:?} on this server (VMs with a console: {})\n", known.join(", "));
            let _ = write_all_nonblocking(&mut a.stream, msg.as_bytes());
            false
        }
    }
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
}
