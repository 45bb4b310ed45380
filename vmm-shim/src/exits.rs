//! Deciding what an exit means is a function of the exit and the device
//! map (Firecracker's `handle_kvm_exit` is the model): [`decide`] is pure
//! and tested without KVM; [`Router`] applies the decision for one vCPU.

use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Instant;

use hdrhistogram::Histogram;

use dmfabric_wire::Direction;

use crate::debugport::{self, DebugOp, DEBUG_PORT};
use crate::devmap::{DeviceMap, Remote, Target};
use crate::kvm::{Exit, Flow};
pub use crate::local::LocalDevices;
use crate::remote::{RemoteError, VcpuRemote};

/// What to do with one exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Local(usize),
    Remote(Remote),
    /// A test guest reports a value on the debug port.
    Report(u32),
    /// A test guest asks to stop with this code.
    Exit(u32),
    /// No device claims the address: as real hardware, reads return all
    /// ones and writes are dropped.
    Unmapped,
}

pub fn decide(map: &DeviceMap<Target>, exit: &Exit) -> Decision {
    match map.lookup(exit.space, exit.addr, exit.size.bytes()) {
        Some(Target::Local(i)) => Decision::Local(i),
        Some(Target::Remote(r)) => Decision::Remote(r),
        Some(Target::Debug) => match debugport::decode(u64::from(DEBUG_PORT), exit) {
            DebugOp::Report(v) => Decision::Report(v),
            DebugOp::Exit(code) => Decision::Exit(code),
            DebugOp::Nothing => Decision::Unmapped,
        },
        None => Decision::Unmapped,
    }
}

/// Counters of a vCPU's (or, summed, a VM's) exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExitStats {
    pub local: u64,
    pub remote: u64,
    pub unmapped_reads: u64,
    pub unmapped_writes: u64,
    pub reports: u64,
}

impl std::ops::AddAssign for ExitStats {
    fn add_assign(&mut self, o: ExitStats) {
        self.local += o.local;
        self.remote += o.remote;
        self.unmapped_reads += o.unmapped_reads;
        self.unmapped_writes += o.unmapped_writes;
        self.reports += o.reports;
    }
}

/// Why an exit could not be served (the VM stops).
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("Device {device} on server {server} is remote, but this VM has no connection to a server")]
    NoLink { server: u16, device: u32 },
    #[error("The device map names local device {0}, which does not exist")]
    NoLocalDevice(usize),
}

/// The remote path as the router sees it.
pub trait RemoteAccess {
    fn access(&mut self, target: &Remote, exit: &Exit) -> Result<u64, ExitError>;
}

impl RemoteAccess for VcpuRemote {
    fn access(&mut self, target: &Remote, exit: &Exit) -> Result<u64, ExitError> {
        Ok(VcpuRemote::access(self, target, exit)?)
    }
}

/// No remote devices.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemote;

impl RemoteAccess for NoRemote {
    fn access(&mut self, target: &Remote, _exit: &Exit) -> Result<u64, ExitError> {
        Err(ExitError::NoLink { server: target.server, device: target.device })
    }
}

impl<R: RemoteAccess> RemoteAccess for Option<R> {
    fn access(&mut self, target: &Remote, exit: &Exit) -> Result<u64, ExitError> {
        match self {
            Some(r) => r.access(target, exit),
            None => NoRemote.access(target, exit),
        }
    }
}

/// Exits per target of the device map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCount {
    pub target: Target,
    pub reads: u64,
    pub writes: u64,
}

/// Nanoseconds the router took per access of a target (the model's work
/// for a local device, the round trip for a remote one).
pub type AccessTimes = Histogram<u64>;

fn new_times() -> AccessTimes {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Keeps the last bytes a guest sent to a 16550 at `base`, from the exits
/// it makes anyway (THR writes while LCR.DLAB is clear), so that a VM that
/// stops can be reported with the end of its console wherever the UART is.
#[derive(Debug, Clone)]
pub struct ConsoleTap {
    base: u64,
    dlab: bool,
    tail: std::collections::VecDeque<u8>,
}

/// Bytes of console a tap keeps.
pub const CONSOLE_TAIL: usize = 2048;

impl ConsoleTap {
    pub fn new(base: u64) -> ConsoleTap {
        ConsoleTap { base, dlab: false, tail: std::collections::VecDeque::with_capacity(CONSOLE_TAIL) }
    }

    fn see(&mut self, exit: &Exit) {
        if exit.dir != Direction::Write || exit.space != dmfabric_wire::Space::Pio {
            return;
        }
        match exit.addr.wrapping_sub(self.base) {
            3 => self.dlab = exit.data & 0x80 != 0,
            0 if !self.dlab => {
                if self.tail.len() == CONSOLE_TAIL {
                    self.tail.pop_front();
                }
                self.tail.push_back(exit.data as u8);
            }
            _ => {}
        }
    }

    /// The last `lines` lines seen.
    pub fn last_lines(&self, lines: usize) -> String {
        let text: String = String::from_utf8_lossy(&self.tail.iter().copied().collect::<Vec<u8>>()).replace('\r', "");
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A VM's device map that the control panel may replace while the VM
/// runs: each exit reads the current one (an atomic load, no lock).
pub type LiveMap = arc_swap::ArcSwap<DeviceMap<Target>>;

/// One vCPU's exits to its VM's devices.
pub struct Router<'r, R> {
    /// The VM's device map (the control panel may replace it while the VM runs).
    map: &'r LiveMap,
    local: &'r LocalDevices,
    remote: R,
    reports: Vec<u32>,
    stats: ExitStats,
    per_device: Vec<DeviceCount>,
    /// Parallel to `per_device`.
    times: Vec<AccessTimes>,
    console: Option<ConsoleTap>,
    /// Set by a local model that resets the VM (an i8042's reset line).
    reset: Option<&'r AtomicBool>,
    /// Told when a local model next wants a tick.
    ticker: Option<&'r crate::local::Ticker>,
}

impl<R> std::fmt::Debug for Router<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("local", &self.local.len()).field("stats", &self.stats).finish()
    }
}

impl<'r, R: RemoteAccess> Router<'r, R> {
    pub fn new(map: &'r LiveMap, local: &'r LocalDevices, remote: R) -> Self {
        Router {
            map,
            local,
            remote,
            reports: Vec::new(),
            stats: ExitStats::default(),
            per_device: Vec::new(),
            times: Vec::new(),
            console: None,
            reset: None,
            ticker: None,
        }
    }

    /// Tell `ticker` when a local model wants its next tick after an access.
    pub fn tick_with(&mut self, ticker: &'r crate::local::Ticker) {
        self.ticker = Some(ticker);
    }

    /// Stop the VM cleanly when `flag` is set (by a local model's reset line).
    pub fn reset_on(&mut self, flag: &'r AtomicBool) {
        self.reset = Some(flag);
    }

    pub fn stats(&self) -> ExitStats {
        self.stats
    }

    /// What the guest reported on the debug port, in order.
    pub fn reports(&self) -> &[u32] {
        &self.reports
    }

    /// Exits per device-map target, in first-seen order.
    pub fn per_device(&self) -> &[DeviceCount] {
        &self.per_device
    }

    /// Keep the tail of what the guest sends to the 16550 at `base`.
    pub fn tap_console(&mut self, base: u64) {
        self.console = Some(ConsoleTap::new(base));
    }

    /// The console tap, if any.
    pub fn console(&self) -> Option<&ConsoleTap> {
        self.console.as_ref()
    }

    /// Access times per target, in the order of [`Router::per_device`].
    pub fn times(&self) -> &[AccessTimes] {
        &self.times
    }

    fn count(&mut self, target: Target, dir: Direction) -> usize {
        let i = match self.per_device.iter().position(|c| c.target == target) {
            Some(i) => i,
            None => {
                self.per_device.push(DeviceCount { target, reads: 0, writes: 0 });
                self.times.push(new_times());
                self.per_device.len() - 1
            }
        };
        match dir {
            Direction::Read => self.per_device[i].reads += 1,
            Direction::Write => self.per_device[i].writes += 1,
        }
        i
    }

    /// Serve one exit: the data of a read, the guest's exit, or an error
    /// that stops the VM.
    pub fn handle(&mut self, exit: &Exit) -> Result<Flow, ExitError> {
        if let Some(tap) = self.console.as_mut() {
            tap.see(exit);
        }
        let decision = decide(&self.map.load(), exit);
        match decision {
            Decision::Local(i) => {
                self.stats.local += 1;
                let start = Instant::now();
                let slot = self.count(Target::Local(i), exit.dir);
                let dev = self.local.get(i).ok_or(ExitError::NoLocalDevice(i))?;
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.tick(start);
                let value = match exit.dir {
                    Direction::Read => dev.read(exit.space, exit.addr, exit.size).unwrap_or(exit.size.mask()),
                    Direction::Write => {
                        dev.write(exit.space, exit.addr, exit.size, exit.data);
                        0
                    }
                };
                if let Some(t) = self.ticker {
                    // The access may have reprogrammed the model's timers.
                    t.due(dev.tick(start));
                }
                drop(dev);
                self.times[slot].saturating_record(start.elapsed().as_nanos() as u64);
                if self.reset.is_some_and(|r| r.swap(false, Ordering::AcqRel)) {
                    return Ok(Flow::Reset);
                }
                Ok(Flow::Continue(value))
            }
            Decision::Remote(target) => {
                self.stats.remote += 1;
                let start = Instant::now();
                let slot = self.count(Target::Remote(target), exit.dir);
                let value = self.remote.access(&target, exit)?;
                self.times[slot].saturating_record(start.elapsed().as_nanos() as u64);
                Ok(Flow::Continue(value))
            }
            Decision::Report(v) => {
                self.stats.reports += 1;
                self.reports.push(v);
                Ok(Flow::Continue(0))
            }
            Decision::Exit(code) => Ok(Flow::Exit(code)),
            Decision::Unmapped if exit.dir == Direction::Read => {
                self.stats.unmapped_reads += 1;
                Ok(Flow::Continue(exit.size.mask()))
            }
            Decision::Unmapped => {
                self.stats.unmapped_writes += 1;
                Ok(Flow::Continue(0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_devices::regfile::RegisterFile;
    use dmfabric_devices::Device;
    use dmfabric_wire::{AccessSize, Space};
    use std::sync::Mutex;

    fn exit(space: Space, addr: u64, size: AccessSize, dir: Direction, data: u64) -> Exit {
        Exit { space, addr, size, dir, data }
    }

    fn map() -> DeviceMap<Target> {
        let mut m = DeviceMap::default();
        m.add(Space::Pio, 0x500, 0x100, Target::Local(0)).unwrap();
        m.add(Space::Pio, 0x3f8, 8, Target::remote(2, 7)).unwrap();
        m.add(Space::Pio, u64::from(DEBUG_PORT), 8, Target::Debug).unwrap();
        m
    }

    #[test]
    fn decisions_follow_the_map() {
        let m = map();
        assert_eq!(decide(&m, &exit(Space::Pio, 0x504, AccessSize::B4, Direction::Read, 0)), Decision::Local(0));
        assert_eq!(
            decide(&m, &exit(Space::Pio, 0x3fd, AccessSize::B1, Direction::Read, 0)),
            Decision::Remote(Remote::new(2, 7))
        );
        assert_eq!(decide(&m, &exit(Space::Pio, 0x3fe, AccessSize::B4, Direction::Read, 0)), Decision::Unmapped);
        assert_eq!(decide(&m, &exit(Space::Mmio, 0x500, AccessSize::B4, Direction::Write, 1)), Decision::Unmapped);
        assert_eq!(decide(&m, &exit(Space::Pio, 0x4f0, AccessSize::B4, Direction::Write, 9)), Decision::Report(9));
        assert_eq!(decide(&m, &exit(Space::Pio, 0x4f4, AccessSize::B4, Direction::Write, 3)), Decision::Exit(3));
        assert_eq!(decide(&m, &exit(Space::Pio, 0x4f4, AccessSize::B1, Direction::Write, 3)), Decision::Unmapped);
        assert_eq!(decide(&m, &exit(Space::Pio, 0x4f0, AccessSize::B4, Direction::Read, 0)), Decision::Unmapped);
    }

    #[test]
    fn local_debug_and_unmapped_accesses_are_served_and_counted() {
        let m = LiveMap::from_pointee(map());
        let local: Vec<Mutex<Box<dyn Device>>> =
            vec![Mutex::new(Box::new(RegisterFile::new(Some((0x500, 0x100)), None)))];
        // The map's remote device has no link here: the exit fails, typed.
        let mut r = Router::new(&m, &local, NoRemote);
        let w = exit(Space::Pio, 0x500, AccessSize::B2, Direction::Write, 0xbeef);
        assert_eq!(r.handle(&w).unwrap(), Flow::Continue(0));
        assert_eq!(
            r.handle(&exit(Space::Pio, 0x500, AccessSize::B2, Direction::Read, 0)).unwrap(),
            Flow::Continue(0xbeef)
        );
        assert_eq!(
            r.handle(&exit(Space::Pio, 0x900, AccessSize::B2, Direction::Read, 0)).unwrap(),
            Flow::Continue(0xffff)
        );
        assert_eq!(r.handle(&exit(Space::Pio, 0x900, AccessSize::B1, Direction::Write, 5)).unwrap(), Flow::Continue(0));
        let err = r.handle(&exit(Space::Pio, 0x3f8, AccessSize::B1, Direction::Read, 0)).unwrap_err();
        assert!(matches!(err, ExitError::NoLink { server: 2, device: 7 }), "{err}");
        assert_eq!(r.handle(&exit(Space::Pio, 0x4f0, AccessSize::B4, Direction::Write, 7)).unwrap(), Flow::Continue(0));
        assert_eq!(r.handle(&exit(Space::Pio, 0x4f4, AccessSize::B4, Direction::Write, 1)).unwrap(), Flow::Exit(1));
        assert_eq!(r.reports(), &[7]);
        assert_eq!(r.stats(), ExitStats { local: 2, remote: 1, unmapped_reads: 1, unmapped_writes: 1, reports: 1 });
        assert_eq!(r.per_device()[0], DeviceCount { target: Target::Local(0), reads: 1, writes: 1 });
    }
}
