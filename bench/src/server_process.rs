//! A `dmfabric server --config` process in a test host, as the device
//! benchmarks (`blk`, `irq`) run it: its config (the bench's client
//! platform and the devices under test), its start, its output.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dmfabric_dataplane::netns::{ChildGuard, TestNet};
use dmfabric_dataplane::xdp::{XdpMode, XDP_PROG_ENV};
use dmfabric_dataplane::TransportKind;

use crate::harness::{self, Setup, SERVER_ID};
use crate::loadgen;

/// Write, in `dir`, the bench client's key file and a server config
/// letting it use VM `vm` (one vCPU) with the `[[device]]` tables of
/// `devices`; returns the config's path.
pub(crate) fn write_config(
    setup: &Setup,
    dir: &Path,
    net: &TestNet,
    vm: u32,
    devices: &str,
) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = dir.join("bench-client.key");
    let _ = std::fs::remove_file(&key);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key)?;
    let c = loadgen::CLIENT_ID;
    writeln!(f, "client = {c}\nsend = 1\n\n[[key]]\nid = 1\nsecret = \"{}\"", setup.secret.to_hex())?;
    let config = dir.join("server.toml");
    let text = format!(
        "[[client]]\nid = {c}\nmac = \"{mac}\"\nkey_file = \"{key}\"\nvms = [{{ id = {vm}, vcpus = 1 }}]\n\n{devices}",
        mac = net.host(0).mac,
        key = key.display(),
    );
    std::fs::write(&config, text)?;
    Ok(config)
}

/// A server process and what it says.
pub(crate) struct ServerProcess {
    pub(crate) child: ChildGuard,
    readers: Vec<std::thread::JoinHandle<()>>,
    lines: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Its output, once it has ended.
    pub(crate) fn finish(mut self) -> Vec<String> {
        drop(self.child);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.lines.try_iter().collect()
    }
}

/// Start `exe server --config CONFIG` busy-polling in host 1 and wait for
/// its ready line; an error carries what it said.
pub(crate) fn start(
    setup: &Setup,
    exe: &Path,
    net: &TestNet,
    config: &Path,
    stop: &AtomicBool,
) -> Result<ServerProcess, String> {
    let mut cmd = net.command(1, exe);
    cmd.args(["server", "--transport", setup.transport.name(), "--iface", &net.host(1).iface]);
    cmd.args(["--server-id", &SERVER_ID.to_string(), "--busy-poll", "--config"]).arg(config);
    cmd.arg("--console-dir").arg(config.with_file_name("consoles"));
    if let Some(c) = setup.server_core {
        cmd.args(["--cores", &c.to_string()]);
    }
    match setup.transport {
        TransportKind::Xdp => {
            let mode = match setup.xdp_mode {
                XdpMode::Auto => "auto",
                XdpMode::Generic => "generic",
                XdpMode::Native => "native",
            };
            cmd.args(["--xdp-mode", mode]);
            if let Some(p) = setup.xdp_program {
                cmd.env(XDP_PROG_ENV, p.to_string());
            }
        }
        TransportKind::Udp => {
            cmd.args(["--udp-bind", &format!("{}:{}", net.host(1).ipv4, harness::UDP_PORT)]);
        }
        _ => {}
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = net.spawn(&mut cmd).map_err(|e| harness::HarnessError::Spawn(e).to_string())?;
    let (tx, lines) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let out: Vec<Box<dyn std::io::Read + Send>> = [
        child.child().stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.child().stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for stream in out {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let server = ServerProcess { child, readers, lines };
    let end = Instant::now() + Duration::from_secs(30);
    let mut said = Vec::new();
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        match server.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.starts_with("dmfabric server ready") => return Ok(server),
            Ok(l) => said.push(l),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let mut rest = server.finish();
    said.append(&mut rest);
    Err(format!("the server did not start:\n{}", said.join("\n")))
}
