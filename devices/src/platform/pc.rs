//! The PC layout: the one place that says where a PC's devices sit — their
//! ports, their IRQ lines — how dmfabric numbers the devices of a VM, and
//! where its test devices live. Servers (`--pc-vm`), clients (`pc =
//! "remote"` / `"local"`), the demo and the control panel's defaults all
//! take it from here.

use dmfabric_wire::Space;

use crate::kind::{DeviceKind, DeviceSpec};

/// A range of ports: `base .. base + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub base: u16,
    pub len: u16,
}

impl Ports {
    pub const fn contains(&self, port: u64) -> bool {
        port >= self.base as u64 && port < self.base as u64 + self.len as u64
    }
}

/// COM1, a 16550A.
pub const COM1: Ports = Ports { base: 0x3f8, len: 8 };
pub const COM1_IRQ: u32 = 4;
/// The CMOS RTC: index port, data port.
pub const RTC: Ports = Ports { base: 0x70, len: 2 };
pub const RTC_IRQ: u32 = 8;
/// The i8042's data port.
pub const I8042_DATA: u16 = 0x60;
/// The i8042's status / command port.
pub const I8042_COMMAND: u16 = 0x64;
/// The ports the i8042 model decodes (data through command).
pub const I8042: Ports = Ports { base: I8042_DATA, len: 5 };
pub const KBD_IRQ: u32 = 1;
pub const AUX_IRQ: u32 = 12;
/// dmfabric's event timer ([`crate::timer`]) in a PC.
pub const EVENT_TIMER: Ports = Ports { base: 0x700, len: crate::timer::TIMER_PORTS };
pub const EVENT_TIMER_IRQ: u32 = 5;
/// The first virtio-mmio block device ([`crate::virtio::blk`]): its
/// register window, below the I/O APIC, and its line (free in a PC). A
/// Linux guest finds it with `virtio_mmio.device=512@0xfeb00000:10`.
pub const VIRTIO_BLK_MMIO: u64 = 0xfeb0_0000;
pub const VIRTIO_MMIO_LEN: u32 = crate::virtio::mmio::WINDOW;
pub const VIRTIO_BLK_IRQ: u32 = 10;
/// The HPET ([`crate::hpet`]): its register window, where the ACPI HPET
/// table says it is. Its lines are [`crate::hpet::LINES`].
pub const HPET_MMIO: u64 = 0xfed0_0000;
pub const HPET_LEN: u32 = crate::hpet::WINDOW;
/// The I/O APIC ([`crate::ioapic`]): its register window, where the MADT
/// says it is (GSI base 0, 24 pins).
pub const IOAPIC_MMIO: u64 = 0xfec0_0000;
pub const IOAPIC_LEN: u32 = crate::ioapic::WINDOW as u32;

/// The register-file test device every server has by default.
pub const TEST_DEVICE_ID: u32 = 1;
pub const TEST_DEVICE_PIO: Ports = Ports { base: 0x500, len: 0x100 };
pub const TEST_DEVICE_MMIO: u64 = 0xd000_0000;
pub const TEST_DEVICE_MMIO_LEN: u32 = 0x1000;

/// The interrupt test devices ([`crate::irqtest`]): each VM maps its own at
/// the same ports.
pub const IRQ_TEST: Ports = Ports { base: 0x600, len: crate::irqtest::IRQ_TEST_PORTS };
pub const IRQ_TEST_IRQ: u32 = 5;
/// Device id of the first interrupt test device; the next ones count up.
pub const IRQ_TEST_FIRST_ID: u32 = 101;

/// The register-file test device `id` at the usual ports and MMIO window,
/// for any VM.
pub fn test_device(id: u32) -> DeviceSpec {
    DeviceSpec {
        id,
        kind: DeviceKind::RegFile,
        pio: Some((TEST_DEVICE_PIO.base, TEST_DEVICE_PIO.len)),
        mmio: Some((TEST_DEVICE_MMIO, TEST_DEVICE_MMIO_LEN)),
        vm: None,
        shard: None,
    }
}

/// Interrupt test device `n` (0-based): id [`IRQ_TEST_FIRST_ID`]` + n`, for any VM.
pub fn irq_test_device(n: u32) -> DeviceSpec {
    DeviceSpec::at(IRQ_TEST_FIRST_ID + n, DeviceKind::IrqTest { line: IRQ_TEST_IRQ }, IRQ_TEST.base, None)
}

/// virtio-blk device `id` at the PC's usual window and line, for `vm`.
pub fn virtio_blk_device(id: u32, vm: Option<u32>) -> DeviceSpec {
    DeviceSpec {
        id,
        kind: DeviceKind::VirtioBlk { line: VIRTIO_BLK_IRQ },
        pio: None,
        mmio: Some((VIRTIO_BLK_MMIO, VIRTIO_MMIO_LEN)),
        vm,
        shard: None,
    }
}

/// The HPET `id` at the PC's usual window, for `vm`.
pub fn hpet_device(id: u32, vm: Option<u32>) -> DeviceSpec {
    DeviceSpec { id, kind: DeviceKind::Hpet, pio: None, mmio: Some((HPET_MMIO, HPET_LEN)), vm, shard: None }
}

/// The I/O APIC `id` at the PC's usual window, for `vm`.
pub fn ioapic_device(id: u32, vm: Option<u32>) -> DeviceSpec {
    DeviceSpec { id, kind: DeviceKind::IoApic, pio: None, mmio: Some((IOAPIC_MMIO, IOAPIC_LEN)), vm, shard: None }
}

/// Which of a PC's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Com1,
    Rtc,
    I8042,
    EventTimer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Com1, Role::Rtc, Role::I8042, Role::EventTimer];

    /// What a person calls it.
    pub fn label(self) -> &'static str {
        match self {
            Role::Com1 => "COM1 (16550 UART)",
            Role::Rtc => "CMOS RTC",
            Role::I8042 => "i8042",
            Role::EventTimer => "event timer",
        }
    }

    /// The model, with the PC's IRQ lines.
    pub fn kind(self) -> DeviceKind {
        match self {
            Role::Com1 => DeviceKind::Uart { line: COM1_IRQ },
            Role::Rtc => DeviceKind::Rtc { line: RTC_IRQ },
            Role::I8042 => DeviceKind::I8042 { kbd_line: KBD_IRQ, aux_line: AUX_IRQ },
            Role::EventTimer => DeviceKind::Timer { line: EVENT_TIMER_IRQ },
        }
    }

    /// The ports the model decodes.
    pub fn window(self) -> Ports {
        match self {
            Role::Com1 => COM1,
            Role::Rtc => RTC,
            Role::I8042 => I8042,
            Role::EventTimer => EVENT_TIMER,
        }
    }

    /// The port ranges a VM's device map sends to the model (the i8042
    /// takes its two ports, not the three between them).
    pub fn vm_ranges(self) -> Vec<Ports> {
        match self {
            Role::I8042 => vec![Ports { base: I8042_DATA, len: 1 }, Ports { base: I8042_COMMAND, len: 1 }],
            other => vec![other.window()],
        }
    }

    fn offset(self) -> u32 {
        match self {
            Role::Com1 => 1,
            Role::Rtc => 2,
            Role::I8042 => 3,
            Role::EventTimer => 4,
        }
    }
}

/// Largest VM id whose PC devices get ids of their own (1000·vm + 4 fits a u32).
pub const MAX_PC_VM: u32 = 4_000_000;

/// Why a VM cannot have PC devices numbered for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("VM {0} cannot have PC devices: VM ids from 1 to {MAX_PC_VM}")]
pub struct VmOutOfRange(pub u32);

/// The PC devices of one VM, numbered the dmfabric way: device
/// `1000·vm + 1` is COM1, `+ 2` the RTC, `+ 3` the i8042, `+ 4` the event
/// timer. A server (`dmfabric server --pc-vm N`) and a client (`pc =
/// "remote"`) that both use this layout agree on every id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcLayout {
    vm: u32,
}

/// One device of a [`PcLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcDevice {
    pub role: Role,
    pub id: u32,
}

impl PcLayout {
    pub fn new(vm: u32) -> Result<PcLayout, VmOutOfRange> {
        if (1..=MAX_PC_VM).contains(&vm) {
            Ok(PcLayout { vm })
        } else {
            Err(VmOutOfRange(vm))
        }
    }

    pub fn vm(&self) -> u32 {
        self.vm
    }

    /// The id of `role`'s device.
    pub fn id(&self, role: Role) -> u32 {
        self.vm * 1000 + role.offset()
    }

    /// Every device of the layout.
    pub fn devices(&self) -> impl Iterator<Item = PcDevice> + '_ {
        Role::ALL.into_iter().map(|role| PcDevice { role, id: self.id(role) })
    }

    /// The device with `id`, if it is one of this layout's.
    pub fn device(&self, id: u32) -> Option<PcDevice> {
        self.devices().find(|d| d.id == id)
    }

    /// What a server hosts for this VM.
    pub fn specs(&self) -> Vec<DeviceSpec> {
        self.devices().map(|d| DeviceSpec::at(d.id, d.role.kind(), d.role.window().base, Some(self.vm))).collect()
    }

    /// What the VM's device map sends to `roles`: (space, base, length, device id).
    pub fn vm_ranges(&self, roles: &[Role]) -> Vec<(Space, u64, u64, u32)> {
        roles
            .iter()
            .flat_map(|&role| {
                let id = self.id(role);
                role.vm_ranges().into_iter().map(move |p| (Space::Pio, u64::from(p.base), u64::from(p.len), id))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_vm_and_stay_in_range() {
        let pc = PcLayout::new(7).unwrap();
        let ids: Vec<u32> = pc.devices().map(|d| d.id).collect();
        assert_eq!(ids, vec![7001, 7002, 7003, 7004]);
        assert_eq!(pc.device(7003).map(|d| d.role), Some(Role::I8042));
        assert_eq!(PcLayout::new(0), Err(VmOutOfRange(0)));
        assert!(PcLayout::new(MAX_PC_VM).is_ok());
        assert!(PcLayout::new(MAX_PC_VM + 1).is_err());
        assert!(u64::from(MAX_PC_VM) * 1000 + 4 <= u64::from(u32::MAX));
    }

    #[test]
    fn the_vm_maps_what_the_server_hosts() {
        let pc = PcLayout::new(1).unwrap();
        let specs = pc.specs();
        for (space, base, len, id) in pc.vm_ranges(&Role::ALL) {
            assert_eq!(space, Space::Pio);
            let spec = specs.iter().find(|s| s.id == id).unwrap();
            let (wbase, wlen) = spec.pio.unwrap();
            assert!(base >= u64::from(wbase) && base + len <= u64::from(wbase) + u64::from(wlen), "{base:#x}");
        }
        assert_eq!(pc.vm_ranges(&[Role::I8042]).len(), 2, "the i8042's two ports");
    }
}
