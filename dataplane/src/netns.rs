//! Test hosts: network namespaces joined by veth pairs (a bridge for three
//! or more), for tests, benches and the CLI.
//!
//! A [`TestNet`] creates its namespaces and links with iproute2, runs a
//! closure inside a namespace on its own thread ([`TestNet::run_in`]) or a
//! process through `ip netns exec` ([`TestNet::spawn`]), and removes every
//! namespace, link and XDP program when dropped — also while a test
//! unwinds from a panic. Names carry the creating process id, so a later
//! run removes what a killed run left behind ([`sweep_stale`]).
//!
//! Hosts get link-local IPv4 addresses (169.254.77.x/24) for the UDP
//! baseline and control traffic (etcd's TCP shares the data-plane link:
//! dmfabric's XDP program passes every frame that is not 0x88B5); IPv6 is
//! disabled so that neighbour discovery does not add frames to the
//! measurements, unless a test turns it on ([`TestNet::enable_ipv6`]).

use std::fs::File;
use std::io;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dmfabric_wire::MacAddr;

/// Every namespace this module creates starts with this.
pub const NS_PREFIX: &str = "dmf-";
/// The interface name of a host's link inside its namespace.
pub const HOST_IFACE: &str = "dmf0";

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("Test hosts need root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network namespaces: run as root")]
    NotRoot,
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("Cannot run `ip` (iproute2): {0}; install iproute2")]
    NoIp(#[source] io::Error),
    #[error("Cannot enter network namespace {ns}: {source}")]
    Enter {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("A test net needs at least two hosts, not {0}")]
    TooFewHosts(usize),
}

/// One host of a test net.
#[derive(Debug, Clone)]
pub struct Host {
    /// Network namespace name.
    pub ns: String,
    /// Its interface (always [`HOST_IFACE`]).
    pub iface: String,
    pub mac: MacAddr,
    /// Link-local IPv4 address on `iface`.
    pub ipv4: Ipv4Addr,
}

/// Options for [`TestNet::new`].
#[derive(Debug, Clone, Copy)]
pub struct TestNetConfig {
    pub hosts: usize,
    pub mtu: u32,
}

impl Default for TestNetConfig {
    fn default() -> Self {
        TestNetConfig { hosts: 2, mtu: 1500 }
    }
}

/// Network namespaces joined by veth; removed on drop.
#[derive(Debug)]
pub struct TestNet {
    hosts: Vec<Host>,
    /// The namespace holding the bridge, for three or more hosts.
    switch: Option<String>,
    /// Every namespace created so far (also on a half-finished build).
    created: Vec<String>,
}

fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(NetnsError::NoIp)?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl TestNet {
    /// Two hosts joined by one veth pair.
    pub fn pair() -> Result<TestNet, NetnsError> {
        TestNet::new(TestNetConfig::default())
    }

    /// `cfg.hosts` hosts: two are joined directly, three or more through a
    /// bridge in a namespace of its own.
    pub fn new(cfg: TestNetConfig) -> Result<TestNet, NetnsError> {
        if cfg.hosts < 2 {
            return Err(NetnsError::TooFewHosts(cfg.hosts));
        }
        if !is_root() {
            return Err(NetnsError::NotRoot);
        }
        sweep_stale();
        let id = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut net = TestNet { hosts: Vec::new(), switch: None, created: Vec::new() };
        // On any error `net` is dropped and removes what was made so far.
        for i in 0..cfg.hosts {
            let ns = format!("{NS_PREFIX}{pid}-{id}-h{i}");
            net.add_ns(&ns)?;
            net.hosts.push(Host {
                ns,
                iface: HOST_IFACE.to_string(),
                mac: MacAddr::default(),
                ipv4: Ipv4Addr::new(169, 254, 77, (i + 1) as u8),
            });
        }
        let mtu = cfg.mtu.to_string();
        if cfg.hosts == 2 {
            let (a, b) = (net.hosts[0].ns.clone(), net.hosts[1].ns.clone());
            ip(&[
                "link", "add", HOST_IFACE, "netns", &a, "mtu", &mtu, "type", "veth", "peer", "name", HOST_IFACE,
                "netns", &b, "mtu", &mtu,
            ])?;
        } else {
            let sw = format!("{NS_PREFIX}{pid}-{id}-sw");
            net.add_ns(&sw)?;
            ip(&[
                "-n",
                &sw,
                "link",
                "add",
                "br0",
                "mtu",
                &mtu,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ])?;
            ip(&["-n", &sw, "link", "set", "br0", "up"])?;
            for (i, host) in net.hosts.iter().enumerate() {
                let port = format!("p{i}");
                ip(&[
                    "link", "add", HOST_IFACE, "netns", &host.ns, "mtu", &mtu, "type", "veth", "peer", "name", &port,
                    "netns", &sw, "mtu", &mtu,
                ])?;
                ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
                ip(&["-n", &sw, "link", "set", &port, "up"])?;
            }
            net.switch = Some(sw);
        }
        for i in 0..net.hosts.len() {
            let (ns, addr) = (net.hosts[i].ns.clone(), format!("{}/24", net.hosts[i].ipv4));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", HOST_IFACE])?;
            ip(&["-n", &ns, "link", "set", HOST_IFACE, "up"])?;
            net.hosts[i].mac = read_mac(&ns)?;
        }
        Ok(net)
    }

    /// Turn IPv6 on for host `i`'s interface (off by default, see the
    /// module) and return its link-local address. Duplicate address
    /// detection is skipped, so the address is usable at once.
    pub fn enable_ipv6(&self, i: usize) -> Result<Ipv6Addr, NetnsError> {
        let host = &self.hosts[i];
        let (dad, on) = (
            format!("net.ipv6.conf.{}.accept_dad=0", host.iface),
            format!("net.ipv6.conf.{}.disable_ipv6=0", host.iface),
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &host.ns, "sysctl", "-qw", &dad, &on])
            .stdin(Stdio::null())
            .output()
            .map_err(NetnsError::NoIp)?;
        if !out.status.success() {
            return Err(NetnsError::Command {
                cmd: format!("sysctl -w {dad} {on} in {}", host.ns),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        // The kernel adds the link-local address as the interface comes up
        // again for IPv6: wait for it (bounded).
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            let shown = ip(&["-n", &host.ns, "-6", "-o", "addr", "show", "dev", &host.iface, "scope", "link"])?;
            let addr = shown
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<Ipv6Addr>().ok());
            match addr {
                Some(a) if !shown.contains("tentative") => return Ok(a),
                _ if Instant::now() >= end => {
                    return Err(NetnsError::Command {
                        cmd: format!("ip -n {} -6 addr show dev {}", host.ns, host.iface),
                        stderr: format!("no usable link-local address within 3 s: {shown}"),
                    })
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), NetnsError> {
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // Keep IPv6 neighbour discovery and MLD off the measured links.
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        Ok(())
    }

    /// Ping host `to`'s link-local IPv6 address `addr` from host `from`
    /// (`ping -6`, three pings, at most 4 s): whether replies came.
    pub fn ping6(&self, from: usize, addr: Ipv6Addr) -> io::Result<bool> {
        let target = format!("{addr}%{}", self.hosts[from].iface);
        let out = self
            .command(from, "ping")
            .args(["-6", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-w", "4", &target])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run ping (iputils-ping): {e}")))?;
        Ok(out.status.success())
    }

    /// One TCP connection from host `from` to a listener on host `to` at
    /// (`ip`, `port`) (a link-local IPv6 address gets each side's scope):
    /// whether a line went there and back within a few seconds.
    pub fn tcp_round_trip(&self, from: usize, to: usize, ip: IpAddr, port: u16) -> io::Result<bool> {
        let scoped = |host: usize| -> SocketAddr {
            match ip {
                IpAddr::V6(v6) => {
                    let scope = self.with_host(host, || crate::sys::if_index(&self.hosts[host].iface)).ok().flatten();
                    SocketAddrV6::new(v6, port, 0, scope.unwrap_or(0)).into()
                }
                IpAddr::V4(_) => (ip, port).into(),
            }
        };
        let listener = self.with_host(to, || TcpListener::bind(scoped(to))).map_err(io::Error::other)??;
        listener.set_nonblocking(true)?;
        let server = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok((mut s, _)) = listener.accept() {
                    let mut line = [0u8; 6];
                    let ok = s.set_nonblocking(false).is_ok()
                        && s.set_read_timeout(Some(Duration::from_secs(3))).is_ok()
                        && s.read_exact(&mut line).is_ok();
                    if ok {
                        let _ = s.write_all(&line);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let dst = scoped(from);
        let ok = self
            .with_host(from, || {
                let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(3)) else {
                    return false;
                };
                let mut back = [0u8; 6];
                s.set_read_timeout(Some(Duration::from_secs(3))).is_ok()
                    && s.write_all(b"hello\n").is_ok()
                    && s.read_exact(&mut back).is_ok()
                    && &back == b"hello\n"
            })
            .map_err(io::Error::other)?;
        let _ = server.join();
        Ok(ok)
    }

    /// Stop (or start again) the bridge learning where host `i`'s frames
    /// come from, as a switch port with port security does: frames it sends
    /// with another host's source MAC then cannot pull that host's traffic
    /// to it. Only for nets of three or more hosts (joined by a bridge).
    pub fn set_port_learning(&self, i: usize, on: bool) -> Result<(), NetnsError> {
        let Some(sw) = &self.switch else {
            return Err(NetnsError::TooFewHosts(self.hosts.len()));
        };
        let port = format!("p{i}");
        ip(&["-n", sw, "link", "set", &port, "type", "bridge_slave", "learning", if on { "on" } else { "off" }])?;
        Ok(())
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Run `f` on a new thread inside host `i`'s namespace and wait for it.
    pub fn run_in<F, R>(&self, i: usize, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let ns = self.hosts[i].ns.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&ns)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Run `f` on the calling thread inside host `i`'s namespace; see [`with_ns`].
    pub fn with_host<R>(&self, i: usize, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
        with_ns(&self.hosts[i].ns, f)
    }

    /// Start `f` on a new thread inside host `i`'s namespace.
    pub fn spawn_in<F, R>(&self, i: usize, name: &str, f: F) -> std::thread::JoinHandle<Result<R, NetnsError>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let ns = self.hosts[i].ns.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                enter(&ns)?;
                Ok(f())
            })
            .expect("spawning a thread")
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i].ns]).arg(program);
        cmd
    }

    /// Spawn `cmd` (from [`TestNet::command`]); the child is killed when
    /// the guard drops.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<ChildGuard> {
        Ok(ChildGuard(Some(cmd.spawn()?)))
    }

    fn cleanup(&mut self) {
        for host in &self.hosts {
            let _ = ip(&["-n", &host.ns, "link", "set", "dev", &host.iface, "xdp", "off"]);
            let _ = ip(&["-n", &host.ns, "link", "set", "dev", &host.iface, "xdpgeneric", "off"]);
        }
        for ns in self.created.drain(..).rev() {
            delete_ns(&ns);
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn delete_ns(ns: &str) {
    // A namespace whose last process is still exiting can refuse briefly.
    for _ in 0..20 {
        if ip(&["netns", "del", ns]).is_ok() || !ns_exists(ns) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ns_exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

fn read_mac(ns: &str) -> Result<MacAddr, NetnsError> {
    let out = ip(&["-n", ns, "-o", "link", "show", HOST_IFACE])?;
    out.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).and_then(|m| m.parse().ok()).ok_or_else(|| {
        NetnsError::Command { cmd: format!("ip -n {ns} link show {HOST_IFACE}"), stderr: format!("no MAC in: {out}") }
    })
}

/// Move the calling thread into network namespace `ns`.
pub fn enter(ns: &str) -> Result<(), NetnsError> {
    let path = std::path::Path::new("/run/netns").join(ns);
    let file = File::open(&path).map_err(|source| NetnsError::Enter { ns: ns.into(), source })?;
    // SAFETY: `file` is an open namespace file; setns only changes the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Enter { ns: ns.into(), source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Run `f` on the calling thread inside namespace `ns`, then move the
/// thread back to the namespace it was in (also when `f` panics).
pub fn with_ns<R>(ns: &str, f: impl FnOnce() -> R) -> Result<R, NetnsError> {
    let home = File::open("/proc/thread-self/ns/net")
        .map_err(|source| NetnsError::Enter { ns: "(current)".into(), source })?;
    struct Restore(File);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: `self.0` is the open namespace file of the thread's
            // original namespace.
            let rc = unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
            // Staying in a test namespace that is about to be deleted would
            // leave this thread without a network: that is not recoverable.
            assert_eq!(rc, 0, "cannot return to the original network namespace");
        }
    }
    let restore = Restore(home);
    enter(ns)?;
    let r = f();
    drop(restore);
    Ok(r)
}

/// Remove namespaces left by dmfabric processes that no longer run.
pub fn sweep_stale() -> usize {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["-n", &name, "link", "set", "dev", HOST_IFACE, "xdp", "off"]);
            delete_ns(&name);
            removed += 1;
        }
    }
    removed
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until drop")
    }

    /// Wait for the child to end on its own and collect its output.
    pub fn wait_with_output(mut self) -> io::Result<std::process::Output> {
        self.0.take().expect("child present until drop").wait_with_output()
    }

    /// Send SIGINT and wait up to `timeout` for a clean exit; kill otherwise.
    pub fn interrupt(&mut self, timeout: Duration) -> io::Result<std::process::ExitStatus> {
        let child = self.child();
        // `ip netns exec` execs the program, so the pid is the program's.
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= end {
                child.kill()?;
                return child.wait();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
