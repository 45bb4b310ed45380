//! Which model a device runs, and where one device instance sits — and
//! whether that place is one a model can take ([`DeviceSpec::check`]).

use crate::platform::pc;
use crate::regfile::MAX_WINDOW;

/// Ports in the port space: port addresses are 16 bits.
const PORT_SPACE: u32 = 0x1_0000;

/// Which model a device runs, with its interrupt lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The register-file test device ([`crate::regfile`]).
    RegFile,
    /// The interrupt test device ([`crate::irqtest`]).
    IrqTest { line: u32 },
    /// A 16550A UART ([`crate::uart`]).
    Uart { line: u32 },
    /// The CMOS RTC ([`crate::rtc`]) at an index/data port pair.
    Rtc { line: u32 },
    /// The i8042 keyboard controller ([`crate::i8042`]) at the PC's ports.
    I8042 { kbd_line: u32, aux_line: u32 },
    /// The event timer ([`crate::timer`]).
    Timer { line: u32 },
    /// A virtio-blk device on the virtio-mmio transport
    /// ([`crate::virtio::blk`]), in MMIO space only.
    VirtioBlk { line: u32 },
    /// The HPET ([`crate::hpet`]), in MMIO space only; its lines are fixed
    /// ([`crate::hpet::LINES`]).
    Hpet,
    /// The I/O APIC ([`crate::ioapic`]), in MMIO space only: its pins are
    /// its inputs; it raises no lines (it sends MSIs).
    IoApic,
}

/// A model name no model answers to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("No device model is called {0:?}: the models are {names}", names = DeviceKind::NAMES.join(", "))]
pub struct KindError(pub String);

impl DeviceKind {
    /// The model names configs and the control panel's records use.
    pub const NAMES: [&'static str; 9] =
        ["uart", "rtc", "i8042", "timer", "regfile", "irqtest", "virtio-blk", "hpet", "ioapic"];

    /// The model called `name` raising `lines`; where a line is not given,
    /// the one it has in a PC ([`pc`]).
    pub fn parse(name: &str, lines: &[u32]) -> Result<DeviceKind, KindError> {
        let line = |i: usize, usual: u32| lines.get(i).copied().unwrap_or(usual);
        Ok(match name {
            "regfile" => DeviceKind::RegFile,
            "irqtest" => DeviceKind::IrqTest { line: line(0, pc::IRQ_TEST_IRQ) },
            "uart" => DeviceKind::Uart { line: line(0, pc::COM1_IRQ) },
            "rtc" => DeviceKind::Rtc { line: line(0, pc::RTC_IRQ) },
            "i8042" => DeviceKind::I8042 { kbd_line: line(0, pc::KBD_IRQ), aux_line: line(1, pc::AUX_IRQ) },
            "timer" => DeviceKind::Timer { line: line(0, pc::EVENT_TIMER_IRQ) },
            "virtio-blk" => DeviceKind::VirtioBlk { line: line(0, pc::VIRTIO_BLK_IRQ) },
            // Its lines are the HPET's own: lines given are ignored.
            "hpet" => DeviceKind::Hpet,
            "ioapic" => DeviceKind::IoApic,
            other => return Err(KindError(other.to_string())),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::RegFile => "regfile",
            DeviceKind::IrqTest { .. } => "irqtest",
            DeviceKind::Uart { .. } => "uart",
            DeviceKind::Rtc { .. } => "rtc",
            DeviceKind::I8042 { .. } => "i8042",
            DeviceKind::Timer { .. } => "timer",
            DeviceKind::VirtioBlk { .. } => "virtio-blk",
            DeviceKind::Hpet => "hpet",
            DeviceKind::IoApic => "ioapic",
        }
    }

    /// The IRQ lines a model of this kind raises.
    pub fn lines(&self) -> Vec<u32> {
        match *self {
            DeviceKind::RegFile | DeviceKind::IoApic => Vec::new(),
            DeviceKind::IrqTest { line }
            | DeviceKind::Uart { line }
            | DeviceKind::Rtc { line }
            | DeviceKind::Timer { line }
            | DeviceKind::VirtioBlk { line } => vec![line],
            DeviceKind::I8042 { kbd_line, aux_line } => vec![kbd_line, aux_line],
            // Legacy replacement's 0 and 8, and every pin a timer may be routed to.
            DeviceKind::Hpet => crate::hpet::LINES.to_vec(),
        }
    }

    /// Whether a model of this kind may reset its VM (the i8042's reset line).
    pub fn may_reset(&self) -> bool {
        matches!(self, DeviceKind::I8042 { .. })
    }

    /// Ports the model decodes from its base; None: as many as it is given
    /// (the register file), or none (virtio-blk sits in MMIO space and
    /// ignores ports).
    pub fn ports(&self) -> Option<u16> {
        match self {
            DeviceKind::RegFile | DeviceKind::VirtioBlk { .. } | DeviceKind::Hpet | DeviceKind::IoApic => None,
            DeviceKind::IrqTest { .. } => Some(pc::IRQ_TEST.len),
            DeviceKind::Uart { .. } => Some(pc::COM1.len),
            DeviceKind::Rtc { .. } => Some(pc::RTC.len),
            DeviceKind::I8042 { .. } => Some(pc::I8042.len),
            DeviceKind::Timer { .. } => Some(pc::EVENT_TIMER.len),
        }
    }

    /// The first port of this kind's device in a PC (the register file has
    /// no usual place).
    pub fn usual_base(&self) -> Option<u16> {
        match self {
            DeviceKind::RegFile | DeviceKind::VirtioBlk { .. } | DeviceKind::Hpet | DeviceKind::IoApic => None,
            DeviceKind::IrqTest { .. } => Some(pc::IRQ_TEST.base),
            DeviceKind::Uart { .. } => Some(pc::COM1.base),
            DeviceKind::Rtc { .. } => Some(pc::RTC.base),
            DeviceKind::I8042 { .. } => Some(pc::I8042.base),
            DeviceKind::Timer { .. } => Some(pc::EVENT_TIMER.base),
        }
    }

    /// The MMIO window `(base, len)` of this kind's device in a PC, for the
    /// models that sit in MMIO space.
    pub fn usual_mmio(&self) -> Option<(u64, u32)> {
        match self {
            DeviceKind::VirtioBlk { .. } => Some((pc::VIRTIO_BLK_MMIO, pc::VIRTIO_MMIO_LEN)),
            DeviceKind::Hpet => Some((pc::HPET_MMIO, pc::HPET_LEN)),
            DeviceKind::IoApic => Some((pc::IOAPIC_MMIO, pc::IOAPIC_LEN)),
            _ => None,
        }
    }

    /// Where a model of this kind must sit, if only one place works (the
    /// i8042 decodes the PC's fixed ports).
    pub fn fixed_base(&self) -> Option<u16> {
        match self {
            DeviceKind::I8042 { .. } => Some(pc::I8042.base),
            _ => None,
        }
    }
}

/// One device instance: its id, model, where it sits, whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub id: u32,
    pub kind: DeviceKind,
    /// Ports `(base, len)`.
    pub pio: Option<(u16, u16)>,
    /// MMIO `(base, len)`.
    pub mmio: Option<(u64, u32)>,
    /// The VM the device belongs to: accesses from other VMs are refused.
    /// None: any VM may use it (its interrupts go to the last one that did).
    pub vm: Option<u32>,
    /// For a server that shards its devices over worker cores: the shard
    /// that runs it. None: spread by order.
    pub shard: Option<usize>,
}

impl DeviceSpec {
    /// A model of `kind` at the ports it decodes from `base`, for `vm`.
    pub fn at(id: u32, kind: DeviceKind, base: u16, vm: Option<u32>) -> DeviceSpec {
        let len = kind.ports().unwrap_or(1);
        DeviceSpec { id, kind, pio: Some((base, len)), mmio: None, vm, shard: None }
    }

    /// The first port of the device (0 without ports).
    pub fn base(&self) -> u16 {
        self.pio.map_or(0, |(b, _)| b)
    }

    /// Whether a model can take this place: every range non-empty, ports
    /// inside the 64 KiB port space, MMIO not past the end of the address
    /// space, a register file's windows no larger than [`MAX_WINDOW`]
    /// (its bytes are allocated). A spec read from a config or the control
    /// panel is untrusted: hosts check it where they read it, and
    /// [`crate::build`] refuses one that fails.
    pub fn check(&self) -> Result<(), SpecError> {
        let id = self.id;
        if let Some((base, len)) = self.pio {
            // The model decodes at least its own ports from the base.
            let decoded = self.kind.ports().map_or(len, |p| p.max(len));
            if len == 0 {
                return Err(SpecError::Empty { id, space: "port" });
            }
            if u32::from(base) + u32::from(decoded) > PORT_SPACE {
                return Err(SpecError::PastPortSpace { id, base, len: decoded });
            }
        }
        if let Some((base, len)) = self.mmio {
            if len == 0 {
                return Err(SpecError::Empty { id, space: "MMIO" });
            }
            // The last byte must be addressable: `base + len` may be 2^64, no more.
            if base.checked_add(u64::from(len) - 1).is_none() {
                return Err(SpecError::PastAddressSpace { id, base, len });
            }
            if self.kind == DeviceKind::RegFile && len > MAX_WINDOW {
                return Err(SpecError::WindowTooBig { id, len, max: MAX_WINDOW });
            }
        }
        Ok(())
    }

    /// The spec cut down to what [`DeviceSpec::check`] accepts: empty
    /// ranges dropped, ranges cut at the end of their space, a register
    /// file's MMIO window cut to [`MAX_WINDOW`]. What [`crate::fresh`] builds
    /// when a host hands it an unchecked spec: never an allocation or a
    /// panic the spec asked for.
    pub fn confined(&self) -> DeviceSpec {
        let pio = self.pio.filter(|(_, len)| *len > 0).and_then(|(base, len)| {
            let decoded = self.kind.ports().unwrap_or(1);
            let room = PORT_SPACE - u32::from(base);
            (room >= u32::from(decoded)).then(|| (base, u32::from(len).min(room) as u16))
        });
        let mmio = self.mmio.filter(|(_, len)| *len > 0).map(|(base, len)| {
            // Bytes from base to the end of the address space, at least 1.
            let room = (u64::MAX - base).saturating_add(1);
            let mut len = u64::from(len).min(room) as u32;
            if self.kind == DeviceKind::RegFile {
                len = len.min(MAX_WINDOW);
            }
            (base, len)
        });
        DeviceSpec { pio, mmio, ..self.clone() }
    }
}

/// Why a device cannot sit where its spec says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("Device {id} has an empty {space} range: give it a length of at least 1")]
    Empty { id: u32, space: &'static str },
    #[error("Device {id}'s ports {base:#x}+{len:#x} run past the 64 KiB port space: move it below 0x10000")]
    PastPortSpace { id: u32, base: u16, len: u16 },
    #[error("Device {id}'s MMIO {base:#x}+{len:#x} runs past the end of the address space: give a lower base")]
    PastAddressSpace { id: u32, base: u64, len: u32 },
    #[error("Device {id} is a register file of {len} bytes of MMIO, more than the {max} it may hold: make it smaller")]
    WindowTooBig { id: u32, len: u32, max: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regfile(pio: Option<(u16, u16)>, mmio: Option<(u64, u32)>) -> DeviceSpec {
        DeviceSpec { id: 7, kind: DeviceKind::RegFile, pio, mmio, vm: None, shard: None }
    }

    #[test]
    fn the_pc_devices_and_test_devices_pass() {
        let mut specs = pc::PcLayout::new(1).unwrap().specs();
        specs.push(pc::test_device(1));
        specs.push(pc::irq_test_device(0));
        for s in specs {
            assert_eq!(s.check(), Ok(()), "{s:?}");
            assert_eq!(s.confined(), s, "a valid spec is left as it is");
        }
        assert_eq!(regfile(Some((0xff00, 0x100)), Some((u64::MAX - 0xfff, 0x1000))).check(), Ok(()), "up to the ends");
    }

    #[test]
    fn virtio_blk_is_a_model_in_mmio_space() {
        assert!(DeviceKind::NAMES.contains(&"virtio-blk"));
        let kind = DeviceKind::parse("virtio-blk", &[]).unwrap();
        assert_eq!(kind, DeviceKind::VirtioBlk { line: pc::VIRTIO_BLK_IRQ });
        assert_eq!(kind.name(), "virtio-blk");
        assert_eq!(DeviceKind::parse("virtio-blk", &[11]).unwrap().lines(), vec![11]);
        assert_eq!((kind.ports(), kind.usual_base(), kind.fixed_base()), (None, None, None));
        assert_eq!(kind.usual_mmio(), Some((0xfeb0_0000, 0x200)));
        let spec = pc::virtio_blk_device(5, Some(1));
        assert_eq!((spec.pio, spec.mmio), (None, Some((pc::VIRTIO_BLK_MMIO, pc::VIRTIO_MMIO_LEN))));
        assert_eq!(spec.check(), Ok(()));
        assert_eq!(spec.confined(), spec);
    }

    #[test]
    fn the_hpet_is_a_model_in_mmio_space_with_its_own_lines() {
        let kind = DeviceKind::parse("hpet", &[5, 12]).unwrap();
        assert_eq!((kind, kind.name()), (DeviceKind::Hpet, "hpet"));
        assert_eq!(kind.lines(), vec![0, 2, 8, 16, 17, 18, 19, 20, 21, 22, 23], "given lines are ignored");
        assert_eq!((kind.ports(), kind.usual_base(), kind.fixed_base()), (None, None, None));
        assert_eq!(kind.usual_mmio(), Some((0xfed0_0000, 0x400)));
        let spec = pc::hpet_device(6, Some(1));
        assert_eq!((spec.pio, spec.mmio, spec.check()), (None, Some((0xfed0_0000, 0x400)), Ok(())));
        assert_eq!(spec.confined(), spec);
    }

    #[test]
    fn the_ioapic_is_a_model_in_mmio_space_without_lines() {
        let kind = DeviceKind::parse("ioapic", &[3]).unwrap();
        assert_eq!((kind, kind.name()), (DeviceKind::IoApic, "ioapic"));
        assert!(DeviceKind::NAMES.contains(&"ioapic"));
        assert_eq!(kind.lines(), Vec::<u32>::new(), "it sends MSIs, it raises no lines");
        assert_eq!((kind.ports(), kind.usual_base(), kind.fixed_base(), kind.may_reset()), (None, None, None, false));
        assert_eq!(kind.usual_mmio(), Some((0xfec0_0000, 0x1000)));
        let spec = pc::ioapic_device(7, Some(1));
        assert_eq!((spec.pio, spec.mmio, spec.check()), (None, Some((0xfec0_0000, 0x1000)), Ok(())));
        assert_eq!(spec.confined(), spec);
    }

    #[test]
    fn a_regfile_window_larger_than_the_cap_is_refused() {
        let huge = regfile(None, Some((0xd000_0000, u32::MAX)));
        assert_eq!(huge.check(), Err(SpecError::WindowTooBig { id: 7, len: u32::MAX, max: MAX_WINDOW }));
        assert_eq!(huge.confined().mmio, Some((0xd000_0000, MAX_WINDOW)));
        assert_eq!(regfile(None, Some((0, MAX_WINDOW))).check(), Ok(()));
        let uart_mmio = DeviceSpec {
            mmio: Some((0xd000_0000, u32::MAX)),
            ..DeviceSpec::at(1, DeviceKind::parse("uart", &[]).unwrap(), 0x3f8, None)
        };
        assert_eq!(uart_mmio.check(), Ok(()), "only a register file allocates its window");
    }

    #[test]
    fn ranges_that_overflow_or_are_empty_are_refused() {
        let cases = [
            (regfile(None, Some((u64::MAX - 0xff, 0x1000))), "runs past the end of the address space"),
            (regfile(None, Some((u64::MAX, 2))), "runs past the end of the address space"),
            (regfile(Some((0xfff0, 0x20)), None), "run past the 64 KiB port space"),
            (regfile(Some((0x500, 0)), None), "empty port range"),
            (regfile(None, Some((0x1000, 0))), "empty MMIO range"),
            (DeviceSpec::at(2, DeviceKind::Uart { line: 4 }, 0xfffc, None), "run past the 64 KiB port space"),
        ];
        for (spec, why) in cases {
            let err = spec.check().expect_err(why);
            assert!(err.to_string().contains(why), "{err}");
            let c = spec.confined();
            assert_eq!(c.check(), Ok(()), "{spec:?} confined to {c:?}");
        }
        assert_eq!(regfile(None, Some((u64::MAX, 1))).check(), Ok(()), "the very last byte");
        assert_eq!(regfile(Some((0xfff0, 0x20)), None).confined().pio, Some((0xfff0, 0x10)));
        assert_eq!(DeviceSpec::at(2, DeviceKind::Uart { line: 4 }, 0xfffc, None).confined().pio, None);
    }
}
