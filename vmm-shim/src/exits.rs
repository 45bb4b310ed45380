//! Deciding what an exit means is a function of the exit and the device
//! map (Firecracker's `handle_kvm_exit` is the model): [`decide`] is pure
//! and tested without KVM; [`Router`] applies the decision.

use dmfabric_dataplane::Transport;
use dmfabric_dm_workers::device::Device;
use dmfabric_wire::Direction;

use crate::devmap::{DeviceMap, Target};
use crate::kvm::Exit;
use crate::remote::RemoteIo;

/// What to do with one exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Local(usize),
    Remote {
        server: u16,
        device: u32,
    },
    /// No device claims the address: as real hardware, reads return all
    /// ones and writes are dropped.
    Unmapped,
}

pub fn decide(map: &DeviceMap<Target>, exit: &Exit) -> Decision {
    match map.lookup(exit.space, exit.addr, exit.size.bytes()) {
        Some(Target::Local(i)) => Decision::Local(i),
        Some(Target::Remote { server, device }) => Decision::Remote { server, device },
        None => Decision::Unmapped,
    }
}

/// Counters of a VM's exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    pub local: u64,
    pub remote: u64,
    pub unmapped_reads: u64,
    pub unmapped_writes: u64,
}

/// A VM's exits to its devices: local models borrowed for the run, the
/// remote path if any range is remote.
pub struct Router<'d, T> {
    map: DeviceMap<Target>,
    local: Vec<&'d mut dyn Device>,
    remote: Option<RemoteIo<T>>,
    stats: ExitStats,
}

impl<T> std::fmt::Debug for Router<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("local", &self.local.len()).field("stats", &self.stats).finish()
    }
}

impl<'d, T: Transport> Router<'d, T> {
    pub fn new(map: DeviceMap<Target>, local: Vec<&'d mut dyn Device>, remote: Option<RemoteIo<T>>) -> Self {
        Router { map, local, remote, stats: ExitStats::default() }
    }

    pub fn stats(&self) -> ExitStats {
        self.stats
    }

    /// End the run: give back the remote connection (and the borrowed devices).
    pub fn into_remote(self) -> Option<RemoteIo<T>> {
        self.remote
    }

    /// Serve one exit of `vcpu`: the data of a read, or an error that stops the VM.
    pub fn handle(&mut self, vcpu: u16, exit: &Exit) -> Result<u64, String> {
        match decide(&self.map, exit) {
            Decision::Local(i) => {
                self.stats.local += 1;
                let dev = self
                    .local
                    .get_mut(i)
                    .ok_or_else(|| format!("device map names local device {i}, which does not exist"))?;
                Ok(match exit.dir {
                    Direction::Read => dev.read(exit.space, exit.addr, exit.size).unwrap_or(exit.size.mask()),
                    Direction::Write => {
                        dev.write(exit.space, exit.addr, exit.size, exit.data);
                        0
                    }
                })
            }
            Decision::Remote { server, device } => {
                self.stats.remote += 1;
                let remote = self.remote.as_mut().ok_or("a remote range but no connection to a server")?;
                remote.access(vcpu, server, device, exit).map_err(|e| e.to_string())
            }
            Decision::Unmapped if exit.dir == Direction::Read => {
                self.stats.unmapped_reads += 1;
                Ok(exit.size.mask())
            }
            Decision::Unmapped => {
                self.stats.unmapped_writes += 1;
                Ok(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_dataplane::mem::MemTransport;
    use dmfabric_dm_workers::regfile::RegisterFile;
    use dmfabric_wire::{AccessSize, Space};

    fn exit(space: Space, addr: u64, size: AccessSize, dir: Direction, data: u64) -> Exit {
        Exit { space, addr, size, dir, data }
    }

    fn map() -> DeviceMap<Target> {
        let mut m = DeviceMap::default();
        m.add(Space::Pio, 0x500, 0x100, Target::Local(0)).unwrap();
        m.add(Space::Pio, 0x3f8, 8, Target::Remote { server: 2, device: 7 }).unwrap();
        m
    }

    #[test]
    fn decisions_follow_the_map() {
        let m = map();
        assert_eq!(decide(&m, &exit(Space::Pio, 0x504, AccessSize::B4, Direction::Read, 0)), Decision::Local(0));
        assert_eq!(
            decide(&m, &exit(Space::Pio, 0x3fd, AccessSize::B1, Direction::Read, 0)),
            Decision::Remote { server: 2, device: 7 }
        );
        assert_eq!(decide(&m, &exit(Space::Pio, 0x3fe, AccessSize::B4, Direction::Read, 0)), Decision::Unmapped);
        assert_eq!(decide(&m, &exit(Space::Mmio, 0x500, AccessSize::B4, Direction::Write, 1)), Decision::Unmapped);
    }

    #[test]
    fn local_and_unmapped_accesses_are_served_and_counted() {
        let mut regs = RegisterFile::new(Some((0x500, 0x100)), None);
        let mut r: Router<'_, MemTransport> = Router::new(map(), vec![&mut regs], None);
        assert_eq!(r.handle(0, &exit(Space::Pio, 0x500, AccessSize::B2, Direction::Write, 0xbeef)), Ok(0));
        assert_eq!(r.handle(0, &exit(Space::Pio, 0x500, AccessSize::B2, Direction::Read, 0)), Ok(0xbeef));
        assert_eq!(r.handle(0, &exit(Space::Pio, 0x900, AccessSize::B2, Direction::Read, 0)), Ok(0xffff));
        assert_eq!(r.handle(0, &exit(Space::Pio, 0x900, AccessSize::B1, Direction::Write, 5)), Ok(0));
        assert!(r.handle(0, &exit(Space::Pio, 0x3f8, AccessSize::B1, Direction::Read, 0)).is_err(), "no server");
        assert_eq!(r.stats(), ExitStats { local: 2, remote: 1, unmapped_reads: 1, unmapped_writes: 1 });
    }
}
