//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register
//! window, feature negotiation, the device status and the interrupt
//! status. It knows nothing of what the device does: a register write
//! that needs the device ([`Event`]) is handed back to it.

use serde::{Deserialize, Serialize};

use super::queue::{LayoutError, QueueConfig, QUEUE_NUM_MAX};
use super::{status, VIRTIO_F_VERSION_1};

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) MMIO interface.
pub const VERSION: u32 = 2;
/// "QEMU": what guests expect of an emulated virtio-mmio device.
pub const VENDOR_ID: u32 = 0x554d_4551;
/// The window a virtio-mmio device decodes: registers, then its
/// configuration space from [`CONFIG`].
pub const WINDOW: u32 = 0x200;

pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION_REG: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID_REG: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX_REG: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const SHM_SEL: u64 = 0x0ac;
pub const SHM_LEN_LOW: u64 = 0x0b0;
pub const SHM_BASE_HIGH: u64 = 0x0bc;
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Where the device's configuration space starts.
pub const CONFIG: u64 = 0x100;

/// The transport's registers: a plain struct, saved with the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// What the driver wrote; only a subset of what was offered, with
    /// VERSION_1, gets FEATURES_OK.
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueConfig>,
    /// Bits [`super::INT_USED_BUFFER`] and [`super::INT_CONFIG_CHANGE`].
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// What a register write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Nothing for the device.
    None,
    /// The driver notified queue `n`.
    Notify(u32),
    /// Status 0: the transport is reset; the device drops its queues' work.
    Reset,
    /// The driver asked for FEATURES_OK with features the device does not
    /// take (no VERSION_1, or bits not offered): it stays unset.
    FeaturesRefused,
    /// The driver made queue `n` ready with a layout the device refuses.
    QueueRefused(u32, LayoutError),
    /// The driver disabled queue `n` (QueueReady 0).
    QueueDisabled(u32),
    /// InterruptStatus changed (an ACK): the line follows it.
    InterruptAck,
}

/// The virtio-mmio registers of a device with `queues` queues offering
/// `features`.
#[derive(Debug, Clone)]
pub struct Transport {
    pub device_id: u32,
    pub offered: u64,
    pub state: TransportState,
}

impl Transport {
    pub fn new(device_id: u32, offered: u64, queues: usize) -> Transport {
        Transport {
            device_id,
            offered,
            state: TransportState { queues: vec![QueueConfig::default(); queues], ..TransportState::default() },
        }
    }

    /// Whether `features` are ones a driver may run the device with.
    pub fn acceptable(&self, features: u64) -> bool {
        features & VIRTIO_F_VERSION_1 != 0 && features & !self.offered == 0
    }

    /// Back to the state after power-on (the driver wrote status 0).
    pub fn reset(&mut self) {
        let queues = self.state.queues.len();
        self.state = TransportState { queues: vec![QueueConfig::default(); queues], ..TransportState::default() };
    }

    /// Whether the device may use its queues: the driver is done setting
    /// it up and the device did not ask for a reset.
    pub fn running(&self) -> bool {
        let s = self.state.status;
        s & status::DRIVER_OK != 0 && s & status::FEATURES_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.state.queues.get_mut(self.state.queue_sel as usize)
    }

    /// A 32-bit register read at offset `off` (below [`CONFIG`]); None: no
    /// such register.
    pub fn read(&self, off: u64) -> Option<u32> {
        let s = &self.state;
        let queue = s.queues.get(s.queue_sel as usize);
        Some(match off {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device_id,
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => match s.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX_REG => queue.map_or(0, |_| u32::from(QUEUE_NUM_MAX)),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => s.interrupt_status,
            STATUS => s.status,
            // No shared memory regions: a length of -1 says so.
            SHM_LEN_LOW..=SHM_BASE_HIGH if off % 4 == 0 => u32::MAX,
            CONFIG_GENERATION => s.config_generation,
            // Write-only registers read as 0.
            DEVICE_FEATURES_SEL | DRIVER_FEATURES | DRIVER_FEATURES_SEL | QUEUE_SEL | QUEUE_NUM | QUEUE_NOTIFY
            | INTERRUPT_ACK | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH | SHM_SEL => 0,
            _ => return None,
        })
    }

    /// A 32-bit register write at offset `off`; None: no such register.
    pub fn write(&mut self, off: u64, v: u32) -> Option<Event> {
        let s = &mut self.state;
        let setting_up = s.status & status::FEATURES_OK == 0;
        let set_half = |whole: &mut u64, high: bool| {
            *whole = if high {
                (*whole & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*whole & !0xffff_ffff) | u64::from(v)
            };
        };
        match off {
            DEVICE_FEATURES_SEL => s.device_features_sel = v,
            DRIVER_FEATURES_SEL => s.driver_features_sel = v,
            // Features are fixed once FEATURES_OK is set.
            DRIVER_FEATURES if setting_up => match s.driver_features_sel {
                0 => set_half(&mut s.driver_features, false),
                1 => set_half(&mut s.driver_features, true),
                _ => {}
            },
            DRIVER_FEATURES => {}
            QUEUE_SEL => s.queue_sel = v,
            QUEUE_NUM | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW
            | QUEUE_DEVICE_HIGH => {
                // A ready queue's layout is fixed (§4.2.2.3: the driver
                // must not change it); a queue that does not exist has none.
                if let Some(q) = self.selected().filter(|q| !q.ready) {
                    match off {
                        QUEUE_NUM => q.size = v,
                        QUEUE_DESC_LOW | QUEUE_DESC_HIGH => set_half(&mut q.desc, off == QUEUE_DESC_HIGH),
                        QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => set_half(&mut q.driver, off == QUEUE_DRIVER_HIGH),
                        _ => set_half(&mut q.device, off == QUEUE_DEVICE_HIGH),
                    }
                }
            }
            QUEUE_READY => {
                let n = self.state.queue_sel;
                let Some(q) = self.selected() else { return Some(Event::None) };
                match (v & 1 != 0, q.ready) {
                    (true, false) => match q.check() {
                        Ok(_) => q.ready = true,
                        Err(e) => return Some(Event::QueueRefused(n, e)),
                    },
                    (false, true) => {
                        q.ready = false;
                        return Some(Event::QueueDisabled(n));
                    }
                    _ => {}
                }
            }
            QUEUE_NOTIFY => return Some(Event::Notify(v)),
            INTERRUPT_ACK => {
                s.interrupt_status &= !v;
                return Some(Event::InterruptAck);
            }
            STATUS => return Some(self.write_status(v)),
            SHM_SEL => {}
            _ => return None,
        }
        Some(Event::None)
    }

    fn write_status(&mut self, v: u32) -> Event {
        if v == 0 {
            self.reset();
            return Event::Reset;
        }
        let s = &mut self.state;
        // DEVICE_NEEDS_RESET is the device's: the driver neither sets nor clears it.
        let mut new = (v & status::ALL & !status::DEVICE_NEEDS_RESET) | (s.status & status::DEVICE_NEEDS_RESET);
        let asking = new & status::FEATURES_OK != 0 && s.status & status::FEATURES_OK == 0;
        let mut event = Event::None;
        if asking && !(s.driver_features & VIRTIO_F_VERSION_1 != 0 && s.driver_features & !self.offered == 0) {
            new &= !status::FEATURES_OK;
            event = Event::FeaturesRefused;
        }
        s.status = new;
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport() -> Transport {
        Transport::new(2, VIRTIO_F_VERSION_1 | 1 << 9, 1)
    }

    #[test]
    fn identification_and_features_read_as_virtio_says() {
        let mut t = transport();
        assert_eq!(t.read(MAGIC_VALUE), Some(0x7472_6976));
        assert_eq!(t.read(VERSION_REG), Some(2));
        assert_eq!(t.read(DEVICE_ID), Some(2));
        assert_eq!(t.read(DEVICE_FEATURES), Some(1 << 9));
        t.write(DEVICE_FEATURES_SEL, 1);
        assert_eq!(t.read(DEVICE_FEATURES), Some(1));
        t.write(DEVICE_FEATURES_SEL, 2);
        assert_eq!(t.read(DEVICE_FEATURES), Some(0));
        assert_eq!(t.read(0x200), None);
        assert_eq!(t.read(0x0c0), None, "QueueReset: not offered");
        t.write(QUEUE_SEL, 1);
        assert_eq!(t.read(QUEUE_NUM_MAX_REG), Some(0), "no queue 1");
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let mut t = transport();
        t.write(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        t.write(DRIVER_FEATURES, 1 << 9); // no VERSION_1
        assert_eq!(t.write(STATUS, 0xb), Some(Event::FeaturesRefused));
        assert_eq!(t.read(STATUS), Some(0x3));
        t.write(DRIVER_FEATURES_SEL, 1);
        t.write(DRIVER_FEATURES, 1 | 2); // VERSION_1 and bit 33, not offered
        assert_eq!(t.write(STATUS, 0xb), Some(Event::FeaturesRefused));
        t.write(DRIVER_FEATURES, 1);
        assert_eq!(t.write(STATUS, 0xb), Some(Event::None));
        assert_eq!(t.read(STATUS), Some(0xb));
        t.write(DRIVER_FEATURES, 0);
        assert_eq!(t.state.driver_features, VIRTIO_F_VERSION_1 | 1 << 9, "fixed after FEATURES_OK");
        assert_eq!(t.write(STATUS, 0), Some(Event::Reset));
        assert_eq!(t.state, transport().state);
    }
}
