//! What the binary's integration tests share: processes on test hosts
//! whose output is read line by line.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use dmfabric_dataplane::netns::{ChildGuard, TestNet};

pub const BIN: &str = env!("CARGO_BIN_EXE_dmfabric");

/// A process and its output, a line at a time.
pub type Logged = (ChildGuard, mpsc::Receiver<String>);

/// Run `dmfabric args` on host `host`, its stdout and stderr read line by line.
pub fn spawn_logged(net: &TestNet, host: usize, args: &[&str]) -> Logged {
    let mut cmd = net.command(host, BIN);
    cmd.args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = net.spawn(&mut cmd).expect("spawn dmfabric");
    let (tx, rx) = mpsc::channel();
    for stream in [
        Box::new(child.child().stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.child().stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

/// The lines of an ended process not taken yet: all of them, read to the
/// end of its output (its reader threads may still be behind when the
/// process is reaped), waiting at most 10 s for more.
pub fn rest(rx: &mpsc::Receiver<String>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        out.push(line);
    }
    out
}

/// Lines until one passes `hit` (within `within`); all lines seen.
fn wait_until(
    rx: &mpsc::Receiver<String>,
    within: Duration,
    hit: impl Fn(&str) -> bool,
) -> Result<Vec<String>, Vec<String>> {
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + within;
    while std::time::Instant::now() < end {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let done = hit(&line);
                seen.push(line);
                if done {
                    return Ok(seen);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Err(seen)
}

/// Lines until one contains `what` (within `within`); all lines seen.
pub fn wait_for_within(rx: &mpsc::Receiver<String>, what: &str, within: Duration) -> Result<Vec<String>, Vec<String>> {
    wait_until(rx, within, |l| l.contains(what))
}

/// Lines until one contains each of `parts` (within 20 s); all lines seen:
/// a log event's message and its fields.
pub fn wait_for_all(rx: &mpsc::Receiver<String>, parts: &[&str]) -> Result<Vec<String>, Vec<String>> {
    wait_until(rx, Duration::from_secs(20), |l| parts.iter().all(|p| l.contains(p)))
}

/// [`wait_for_within`] 20 s.
pub fn wait_for(rx: &mpsc::Receiver<String>, what: &str) -> Result<Vec<String>, Vec<String>> {
    wait_for_within(rx, what, Duration::from_secs(20))
}

/// Key files of client platforms and a server's `--clients` list, in a
/// directory of the test's own, removed when dropped.
pub struct Keys {
    pub dir: std::path::PathBuf,
}

impl Keys {
    /// Client platforms `clients` — (id, VMs as (id, vCPUs)) — at `mac`
    /// (host 0's), each with its test key (dmfabric_testkit::keys).
    pub fn new(name: &str, mac: dmfabric_wire::MacAddr, clients: &[(u16, &[(u32, u16)])]) -> Keys {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("dmfabric-{name}-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).unwrap();
        let mut list = String::new();
        for (id, vms) in clients {
            dmfabric_testkit::keys::write_key_file(&dir.join(format!("client-{id}.key")), *id).unwrap();
            let vms: Vec<String> = vms.iter().map(|(v, n)| format!("{{ id = {v}, vcpus = {n} }}")).collect();
            list.push_str(&format!(
                "[[client]]\nid = {id}\nmac = \"{mac}\"\nkey_file = \"client-{id}.key\"\nvms = [{}]\n\n",
                vms.join(", ")
            ));
        }
        std::fs::write(dir.join("clients.toml"), list).unwrap();
        Keys { dir }
    }

    /// The server's client list.
    pub fn clients(&self) -> String {
        self.dir.join("clients.toml").to_string_lossy().into_owned()
    }

    /// Client platform `id`'s key file.
    pub fn key(&self, id: u16) -> String {
        self.dir.join(format!("client-{id}.key")).to_string_lossy().into_owned()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test hosts (network namespaces) a `dmfabric` process `pid` made and left.
pub fn leftover_namespaces(pid: u32) -> Vec<String> {
    let prefix = format!("{}{pid}-", dmfabric_dataplane::netns::NS_PREFIX);
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}
