//! A run's counters while it runs, for a metrics endpoint on a thread of
//! its own. The link's counters are read as SIGUSR1 reads them (under the
//! port's lock, a copy of plain integers); each vCPU's exit counters and
//! access times stay plain values in its own thread and are handed over
//! through a [`Mailbox`] when a reader asks (the vCPU looks at one flag
//! per exit) and when the vCPU ends.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dmfabric_dataplane::observe::{LatencyBuckets, Mailbox};

use crate::devmap::Target;
use crate::exits::{AccessTimes, DeviceCount, ExitStats};
use crate::remote::{ClientPort, ClientStats, VmRemoteStats};

/// What a vCPU hands over.
#[derive(Debug, Clone, Default)]
pub struct VcpuCounters {
    pub exits: ExitStats,
    /// Per target of the VM's map: reads and writes, and the access times
    /// (a remote target's: the exit's round trip to the server).
    pub per_device: Vec<(DeviceCount, LatencyBuckets)>,
}

impl VcpuCounters {
    pub(crate) fn of(exits: ExitStats, per_device: &[DeviceCount], times: &[AccessTimes]) -> VcpuCounters {
        VcpuCounters {
            exits,
            per_device: per_device.iter().zip(times).map(|(c, t)| (*c, LatencyBuckets::of(t))).collect(),
        }
    }
}

/// The link's counters: the client's and each VM's.
#[derive(Debug, Clone, Default)]
pub struct LinkCounters {
    pub client: ClientStats,
    pub vms: Vec<(u32, VmRemoteStats)>,
}

/// One vCPU's counters as a reader sees them.
#[derive(Debug, Clone)]
pub struct VcpuSample {
    pub vm: u32,
    pub vcpu: u16,
    pub counters: VcpuCounters,
}

/// Handed to [`crate::machine::run`] in [`crate::machine::RunOptions::live`].
#[derive(Debug, Default)]
pub struct LiveRun {
    port: Mutex<Option<Arc<ClientPort>>>,
    /// The link's last counters once the run gave its port back.
    ended: Mutex<Option<LinkCounters>>,
    vcpus: Mutex<Vec<VcpuBox>>,
}

/// A vCPU's (VM, vCPU) and its mailbox.
type VcpuBox = (u32, u16, Arc<Mailbox<VcpuCounters>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LiveRun {
    pub fn new() -> Arc<LiveRun> {
        Arc::new(LiveRun::default())
    }

    pub(crate) fn set_port(&self, port: Option<Arc<ClientPort>>) {
        *lock(&self.port) = port;
    }

    /// The run is over: keep the link's last counters, let go of the port.
    pub(crate) fn end(&self) {
        let mut port = lock(&self.port);
        if let Some(p) = port.take() {
            *lock(&self.ended) = Some(Self::read(&p));
        }
    }

    fn read(p: &ClientPort) -> LinkCounters {
        let ids = p.vm_ids();
        LinkCounters { client: p.stats(), vms: ids.into_iter().filter_map(|v| Some((v, p.vm_stats(v)?))).collect() }
    }

    /// The link's counters now (None: the run has no link yet, or none at all).
    pub fn link(&self) -> Option<LinkCounters> {
        // Read under this lock: the run's end waits for a reader to finish
        // before it takes the port back.
        let port = lock(&self.port);
        match &*port {
            Some(p) => Some(Self::read(p)),
            None => lock(&self.ended).clone(),
        }
    }

    /// A new vCPU's mailbox (one of a VM launched again replaces the old).
    pub(crate) fn vcpu(&self, vm: u32, vcpu: u16) -> Arc<Mailbox<VcpuCounters>> {
        let m = Arc::new(Mailbox::new());
        let mut all = lock(&self.vcpus);
        all.retain(|(v, n, _)| (*v, *n) != (vm, vcpu));
        all.push((vm, vcpu, m.clone()));
        m
    }

    /// Every vCPU's counters: each is asked for a copy, and given `within`
    /// to hand it over (one in its guest without exits keeps its last).
    pub fn vcpus(&self, within: Duration) -> Vec<VcpuSample> {
        let all: Vec<_> = lock(&self.vcpus).clone();
        let asked: Vec<u64> = all.iter().map(|(_, _, m)| m.ask()).collect();
        let deadline = Instant::now() + within;
        all.iter()
            .zip(asked)
            .filter_map(|((vm, vcpu, m), a)| Some(VcpuSample { vm: *vm, vcpu: *vcpu, counters: m.wait(a, deadline)? }))
            .collect()
    }
}

/// A target as a metrics label pair: (server, device); local models and
/// the debug port are on server "local".
pub fn target_labels(t: Target) -> (String, String) {
    match t {
        Target::Remote(r) => (r.server.to_string(), r.device.to_string()),
        Target::Local(i) => ("local".into(), i.to_string()),
        Target::Debug => ("local".into(), "debug".into()),
    }
}
