//! A server placed by the control panel: which devices it runs, where it
//! forwards the rest and whom it answers follow the routing tables its
//! store watch swaps in, and device models move between servers with
//! their state.
//!
//! A move of device D from server A to server B, as each side sees it
//! when its loop picks up the new table (in any order):
//! - A takes D's model out, saves its state with A's latest answers for
//!   the requests D served (so B answers a retransmission of a request A
//!   ran from cache instead of running it twice), and hands that to its
//!   watch thread, which writes it to the store. From then on A forwards
//!   requests for D to B.
//! - B marks D as arriving: requests for it wait in a queue (bounded) while
//!   B's watch looks for D's state in the store. When it is there, B builds
//!   the model from it, adopts A's answers and runs the queued requests.
//!   After [`STATE_WAIT`] without a state (A gone), B starts D fresh and
//!   says so.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmfabric_control::model::{Db, Device as DeviceRecord};
use dmfabric_control::store::Store;
use dmfabric_control::watch::Chores;
use dmfabric_devices::{DeviceKind, DeviceSpec, DeviceState};

/// How long an arriving device waits for its state before it starts fresh.
pub const STATE_WAIT: Duration = Duration::from_secs(5);
/// Requests one arriving device may hold before more are dropped (the
/// clients retransmit them).
pub const HELD_MAX: usize = 1024;

/// What travels with a device model from one server to the next.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Handoff {
    pub device: u32,
    /// The server it left.
    pub from: u16,
    /// The model's saved state.
    pub state: DeviceState,
    /// (stream key, latest seq, that request's completion frame) for the
    /// streams whose latest request this device served.
    pub streams: Vec<(u64, u64, Vec<u8>)>,
}

/// The device of a control-panel record: its kind, first port and MMIO
/// ranges, and its lines (each kind's usual ones where it names none).
pub fn spec_of(d: &DeviceRecord) -> Result<DeviceSpec, String> {
    let kind = DeviceKind::parse(&d.kind, &d.irqs).map_err(|e| format!("device {}: {e}", d.id))?;
    let pio = match d.ranges.iter().find(|r| !r.mmio) {
        Some(r) => Some((
            u16::try_from(r.base).map_err(|_| format!("device {}: port {:#x} is past 0xffff", d.id, r.base))?,
            u16::try_from(r.len).map_err(|_| format!("device {}: {} ports is too many", d.id, r.len))?,
        )),
        None => None,
    };
    let mmio = match d.ranges.iter().find(|r| r.mmio) {
        Some(r) => Some((r.base, u32::try_from(r.len).map_err(|_| format!("device {}: MMIO range too long", d.id))?)),
        None => None,
    };
    let shard = usize::try_from(d.shard).ok();
    Ok(DeviceSpec { id: d.id, pio, mmio, kind, vm: Some(d.vm), shard })
}

/// The devices of the control panel's records for server `server`, as specs.
pub fn specs_in(db: &Db, server: u16) -> Vec<Result<DeviceSpec, String>> {
    db.devices.values().filter(|d| d.server == server).map(spec_of).collect()
}

/// Device states between a server's loop and its store watch.
#[derive(Debug, Default)]
pub struct Transit {
    /// Loop → watch: states of devices that left, to write.
    outgoing: Mutex<Vec<(u32, Vec<u8>)>>,
    /// Loop → watch: devices waiting for their state.
    wanted: Mutex<Vec<u32>>,
    /// Watch → loop: states found.
    arrived: Mutex<Vec<(u32, Vec<u8>)>>,
    /// Entries in `arrived`: the loop looks at the lock only when non-zero.
    pending: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Transit {
    pub fn new() -> Arc<Transit> {
        Arc::new(Transit::default())
    }

    /// A device left: its handoff goes to the store.
    pub fn send(&self, device: u32, handoff: Vec<u8>) {
        lock(&self.outgoing).push((device, handoff));
    }

    /// A device arrives: look for its state.
    pub fn want(&self, device: u32) {
        let mut w = lock(&self.wanted);
        if !w.contains(&device) {
            w.push(device);
        }
    }

    /// Stop looking for `device`'s state.
    pub fn unwant(&self, device: u32) {
        lock(&self.wanted).retain(|d| *d != device);
    }

    /// States found since the last call (cheap when there are none).
    pub fn take_arrived(&self) -> Vec<(u32, Vec<u8>)> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let got = std::mem::take(&mut *lock(&self.arrived));
        self.pending.fetch_sub(got.len(), Ordering::AcqRel);
        got
    }

    /// The watch thread's share: write what left, fetch what is wanted.
    pub fn chores(self: Arc<Self>) -> Chores {
        Box::new(move |store: &dyn Store| {
            loop {
                let Some((device, blob)) = lock(&self.outgoing).first().cloned() else { break };
                store.put_state(&format!("device/{device}"), &blob)?;
                lock(&self.outgoing).remove(0);
            }
            let wanted = lock(&self.wanted).clone();
            for device in wanted {
                if let Some(blob) = store.take_state(&format!("device/{device}"))? {
                    self.unwant(device);
                    lock(&self.arrived).push((device, blob));
                    self.pending.fetch_add(1, Ordering::AcqRel);
                }
            }
            Ok(())
        })
    }
}
