//! An etcd of a test's own ([`EtcdProcess`]): its own data directory and
//! free ports, stopped and removed on drop, also when the test fails.

use std::time::Duration;

/// An etcd server of a test's own: its own data directory and free ports,
/// stopped and removed on drop (also when the test fails).
#[derive(Debug)]
pub struct EtcdProcess {
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// "IP:PORT" clients connect to.
    pub endpoint: String,
}

/// Why a test etcd did not start.
#[derive(Debug, thiserror::Error)]
pub enum EtcdStartError {
    #[error("etcd is not installed (Debian: apt-get install etcd-server; scripts/setup.sh does it)")]
    NotInstalled,
    #[error("etcd did not start: {0}")]
    Failed(String),
}

/// For tests: the etcd `start` gave, or — where etcd is not installed —
/// None after one "skipped" line (a failure under
/// DMFABRIC_REQUIRE_PRIVILEGED=1, as CI runs them). Other failures panic.
pub fn start_or_skip(test: &str, start: impl FnOnce() -> Result<EtcdProcess, EtcdStartError>) -> Option<EtcdProcess> {
    match start() {
        Ok(p) => Some(p),
        Err(e @ EtcdStartError::NotInstalled) => {
            let msg = format!("{test}: skipped, {e}");
            if std::env::var("DMFABRIC_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!("{msg} (DMFABRIC_REQUIRE_PRIVILEGED=1 makes this a failure)");
            }
            eprintln!("{msg}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

impl EtcdProcess {
    /// Start etcd on the loopback and wait until it answers.
    pub fn start() -> Result<EtcdProcess, EtcdStartError> {
        let free_port = || -> Result<u16, EtcdStartError> {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| EtcdStartError::Failed(e.to_string()))?;
            Ok(l.local_addr().map_err(|e| EtcdStartError::Failed(e.to_string()))?.port())
        };
        let ports = (free_port()?, free_port()?);
        EtcdProcess::spawn(None, "127.0.0.1", ports, &|endpoint| {
            std::net::TcpStream::connect(endpoint).is_ok()
                && dmfabric_control::etcd::EtcdStore::connect(endpoint).is_ok()
        })
    }

    /// Start etcd inside network namespace `netns` on its address `ip`
    /// (ports 2379/2380: the namespace is the test's own); `ready` tells
    /// when it answers (it must look from inside a namespace that reaches it).
    pub fn start_in(netns: &str, ip: &str, ready: &dyn Fn(&str) -> bool) -> Result<EtcdProcess, EtcdStartError> {
        EtcdProcess::spawn(Some(netns), ip, (2379, 2380), ready)
    }

    fn spawn(
        netns: Option<&str>,
        ip: &str,
        (client_port, peer_port): (u16, u16),
        ready: &dyn Fn(&str) -> bool,
    ) -> Result<EtcdProcess, EtcdStartError> {
        use std::process::{Command, Stdio};
        if Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Err(EtcdStartError::NotInstalled);
        }
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dmfabric-etcd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| EtcdStartError::Failed(format!("{}: {e}", dir.display())))?;
        // Its log goes to a file (a pipe nobody reads would fill and stop it).
        let log_path = dir.join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| EtcdStartError::Failed(e.to_string()))?;
        let endpoint = format!("{ip}:{client_port}");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        cmd.arg("--name")
            .arg(format!("dmfabric-test-{n}"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(format!("http://{endpoint}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://{endpoint}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://{ip}:{peer_port}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{ip}:{peer_port}"))
            .arg("--initial-cluster")
            .arg(format!("dmfabric-test-{n}=http://{ip}:{peer_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| EtcdStartError::Failed(e.to_string()))?;
        let mut p = EtcdProcess { child, dir, endpoint };
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(EtcdStartError::Failed(format!("exited with {status}: {}", tail.join(" | "))));
            }
            if ready(&p.endpoint) {
                return Ok(p);
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(EtcdStartError::Failed(format!("no answer on {} within 20 s", p.endpoint)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop it now (a store that became unreachable).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
