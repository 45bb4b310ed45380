//! An etcd of a test's own ([`EtcdProcess`]): its own data directory and
//! free ports, stopped and removed on drop, also when the test fails —
//! over plain http ([`EtcdProcess::start`]) or over TLS with client
//! certificates a CA of the test's own signed ([`EtcdProcess::start_tls`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// An etcd server of a test's own: its own data directory and free ports,
/// stopped and removed on drop (also when the test fails).
#[derive(Debug)]
pub struct EtcdProcess {
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// How it was started (program, arguments): [`EtcdProcess::restart`]
    /// runs the same again, on the same data directory.
    argv: Vec<std::ffi::OsString>,
    /// "IP:PORT" clients connect to.
    pub endpoint: String,
    /// The certificates, when it runs over TLS.
    pub tls: Option<EtcdTls>,
}

/// The certificates of a TLS test etcd, in its directory: a CA, etcd's
/// certificate (SAN 127.0.0.1) and a client certificate per user asked for
/// (CN = the user's name), with their keys.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA certificate (PEM) that signed every other.
    pub ca: PathBuf,
    /// user → (certificate, key), PEM.
    pub users: BTreeMap<String, (PathBuf, PathBuf)>,
}

/// Why a test etcd did not start.
#[derive(Debug, thiserror::Error)]
pub enum EtcdStartError {
    #[error("etcd is not installed (Debian: apt-get install etcd-server; scripts/setup.sh does it)")]
    NotInstalled,
    #[error("openssl is not installed (Debian: apt-get install openssl; scripts/setup.sh does it)")]
    OpensslNotInstalled,
    #[error("etcd did not start: {0}")]
    Failed(String),
}

/// For tests: the etcd `start` gave, or — where etcd (or, for TLS,
/// openssl) is not installed — None after one "skipped" line (a failure
/// under DMFABRIC_REQUIRE_PRIVILEGED=1, as CI runs them). Other failures
/// panic.
pub fn start_or_skip(test: &str, start: impl FnOnce() -> Result<EtcdProcess, EtcdStartError>) -> Option<EtcdProcess> {
    match start() {
        Ok(p) => Some(p),
        Err(e @ (EtcdStartError::NotInstalled | EtcdStartError::OpensslNotInstalled)) => {
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

fn free_port() -> Result<u16, EtcdStartError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| EtcdStartError::Failed(e.to_string()))?;
    Ok(l.local_addr().map_err(|e| EtcdStartError::Failed(e.to_string()))?.port())
}

/// A directory of this process's own for test etcd `n`, emptied.
fn fresh_dir(n: u16) -> Result<PathBuf, EtcdStartError> {
    let dir = std::env::temp_dir().join(format!("dmfabric-etcd-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| EtcdStartError::Failed(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

fn next_n() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Run `openssl args` in `dir`; its stderr in the error.
fn openssl(dir: &Path, args: &[&str]) -> Result<(), EtcdStartError> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EtcdStartError::Failed(format!("openssl: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(EtcdStartError::Failed(format!("openssl {}: {}", args.join(" "), err.trim())))
}

/// A key (EC P-256, PKCS#8) and a certificate for `cn` with `extensions`,
/// signed by the CA in `dir`: (cert, key).
fn issue(dir: &Path, name: &str, cn: &str, extensions: &str) -> Result<(PathBuf, PathBuf), EtcdStartError> {
    let fail = |e: std::io::Error| EtcdStartError::Failed(format!("{}: {e}", dir.display()));
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).map_err(fail)?;
    let (key, csr, cert) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    openssl(dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &format!("{name}.ec")])?;
    openssl(dir, &["pkcs8", "-topk8", "-nocrypt", "-in", &format!("{name}.ec"), "-out", &key])?;
    openssl(dir, &["req", "-new", "-key", &key, "-subj", &format!("/CN={cn}"), "-out", &csr])?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    )?;
    Ok((dir.join(cert), dir.join(key)))
}

impl EtcdProcess {
    /// Start etcd on the loopback and wait until it answers.
    pub fn start() -> Result<EtcdProcess, EtcdStartError> {
        let ports = (free_port()?, free_port()?);
        EtcdProcess::spawn(None, "127.0.0.1", ports, None, &|endpoint| {
            std::net::TcpStream::connect(endpoint).is_ok()
                && dmfabric_control::etcd::EtcdStore::connect(endpoint).is_ok()
        })
    }

    /// Start etcd on the loopback over TLS only, requiring a client
    /// certificate its CA signed (`--client-cert-auth`: with
    /// authentication on, a request's user is its certificate's CN). Makes
    /// the CA, etcd's certificate (SAN IP 127.0.0.1) and one client
    /// certificate per name in `users` (CN = the name) with the `openssl`
    /// command, in the etcd's own directory; [`EtcdProcess::tls`] has the
    /// paths and [`EtcdProcess::spec`] the store spec of each user.
    /// Waits until it answers one of those users (the first) over TLS.
    pub fn start_tls(users: &[&str]) -> Result<EtcdProcess, EtcdStartError> {
        if Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Err(EtcdStartError::NotInstalled);
        }
        if Command::new("openssl").arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Err(EtcdStartError::OpensslNotInstalled);
        }
        let n = next_n();
        let dir = fresh_dir(n)?;
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(|e| EtcdStartError::Failed(format!("{}: {e}", pki.display())))?;
        openssl(&pki, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.ec"])?;
        openssl(&pki, &["pkcs8", "-topk8", "-nocrypt", "-in", "ca.ec", "-out", "ca.key"])?;
        openssl(
            &pki,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=dmfabric test CA",
                "-days",
                "2",
                "-sha256",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                "ca.pem",
            ],
        )?;
        // etcd's own: a server, and a client of itself (its gateway).
        let server = issue(
            &pki,
            "etcd",
            "127.0.0.1",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n",
        )?;
        let mut certs = BTreeMap::new();
        for (i, user) in users.iter().enumerate() {
            let pair = issue(
                &pki,
                &format!("user{i}"),
                user,
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
            )?;
            certs.insert(user.to_string(), pair);
        }
        let tls = EtcdTls { ca: pki.join("ca.pem"), users: certs };
        let probe = users.first().map(|u| tls.spec_query(u));
        let ports = (free_port()?, free_port()?);
        let ready = |endpoint: &str| {
            std::net::TcpStream::connect(endpoint).is_ok()
                && probe
                    .as_ref()
                    .is_none_or(|q| dmfabric_control::store::open(&format!("etcds://{endpoint}?{q}")).is_ok())
        };
        let mut p = EtcdProcess::spawn_in(dir, n, None, "127.0.0.1", ports, Some((&tls, &server)), &ready)?;
        p.tls = Some(tls);
        Ok(p)
    }

    /// The store spec of `user` (a name given to [`EtcdProcess::start_tls`]):
    /// `etcds://IP:PORT?ca=...&cert=...&key=...`; `etcd://IP:PORT` for a
    /// plain etcd. Panics for a user without a certificate (a test's mistake).
    pub fn spec(&self, user: &str) -> String {
        match &self.tls {
            Some(tls) => format!("etcds://{}?{}", self.endpoint, tls.spec_query(user)),
            None => format!("etcd://{}", self.endpoint),
        }
    }

    /// Start etcd inside network namespace `netns` on its address `ip`
    /// (ports 2379/2380: the namespace is the test's own); `ready` tells
    /// when it answers (it must look from inside a namespace that reaches it).
    pub fn start_in(netns: &str, ip: &str, ready: &dyn Fn(&str) -> bool) -> Result<EtcdProcess, EtcdStartError> {
        EtcdProcess::spawn(Some(netns), ip, (2379, 2380), None, ready)
    }

    fn spawn(
        netns: Option<&str>,
        ip: &str,
        ports: (u16, u16),
        tls: Option<(&EtcdTls, &(PathBuf, PathBuf))>,
        ready: &dyn Fn(&str) -> bool,
    ) -> Result<EtcdProcess, EtcdStartError> {
        if Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Err(EtcdStartError::NotInstalled);
        }
        let n = next_n();
        EtcdProcess::spawn_in(fresh_dir(n)?, n, netns, ip, ports, tls, ready)
    }

    fn spawn_in(
        dir: PathBuf,
        n: u16,
        netns: Option<&str>,
        ip: &str,
        (client_port, peer_port): (u16, u16),
        tls: Option<(&EtcdTls, &(PathBuf, PathBuf))>,
        ready: &dyn Fn(&str) -> bool,
    ) -> Result<EtcdProcess, EtcdStartError> {
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
        let scheme = if tls.is_some() { "https" } else { "http" };
        cmd.arg("--name")
            .arg(format!("dmfabric-test-{n}"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://{endpoint}"))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://{endpoint}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://{ip}:{peer_port}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{ip}:{peer_port}"))
            .arg("--initial-cluster")
            .arg(format!("dmfabric-test-{n}=http://{ip}:{peer_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((tls, (cert, key))) = tls {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let argv = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_os_string()).collect();
        let child = cmd.spawn().map_err(|e| EtcdStartError::Failed(e.to_string()))?;
        let mut p = EtcdProcess { child, dir, argv, endpoint, tls: None };
        p.wait_ready(ready)?;
        Ok(p)
    }

    fn wait_ready(&mut self, ready: &dyn Fn(&str) -> bool) -> Result<(), EtcdStartError> {
        let log_path = self.dir.join("etcd.log");
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(EtcdStartError::Failed(format!("exited with {status}: {}", tail.join(" | "))));
            }
            if ready(&self.endpoint) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(EtcdStartError::Failed(format!("no answer on {} within 20 s", self.endpoint)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start it again after [`EtcdProcess::stop`] (stopped first if it
    /// runs): the same command on the same data directory, so it comes
    /// back with what it had. `ready` tells when it answers, as for the
    /// first start.
    pub fn restart(&mut self, ready: &dyn Fn(&str) -> bool) -> Result<(), EtcdStartError> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join("etcd.log"))
            .map_err(|e| EtcdStartError::Failed(e.to_string()))?;
        self.child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| EtcdStartError::Failed(e.to_string()))?;
        self.wait_ready(ready)
    }

    /// Stop it now (a store that became unreachable).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EtcdTls {
    /// `ca=...&cert=...&key=...` of `user`. Panics for a user without a
    /// certificate (a test's mistake).
    pub fn spec_query(&self, user: &str) -> String {
        let (cert, key) = self.users.get(user).unwrap_or_else(|| panic!("no certificate for user {user:?}"));
        format!("ca={}&cert={}&key={}", self.ca.display(), cert.display(), key.display())
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
