//! Which model a device runs, and where one device instance sits.

use crate::platform::pc;

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
}

/// A model name no model answers to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("No device model is called {0:?}: the models are {names}", names = DeviceKind::NAMES.join(", "))]
pub struct KindError(pub String);

impl DeviceKind {
    /// The model names configs and the control panel's records use.
    pub const NAMES: [&'static str; 6] = ["uart", "rtc", "i8042", "timer", "regfile", "irqtest"];

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
        }
    }

    /// Ports the model decodes from its base; None: as many as it is given
    /// (the register file).
    /// The IRQ lines a model of this kind raises.
    pub fn lines(&self) -> Vec<u32> {
        match *self {
            DeviceKind::RegFile => Vec::new(),
            DeviceKind::IrqTest { line }
            | DeviceKind::Uart { line }
            | DeviceKind::Rtc { line }
            | DeviceKind::Timer { line } => vec![line],
            DeviceKind::I8042 { kbd_line, aux_line } => vec![kbd_line, aux_line],
        }
    }

    /// Whether a model of this kind may reset its VM (the i8042's reset line).
    pub fn may_reset(&self) -> bool {
        matches!(self, DeviceKind::I8042 { .. })
    }

    pub fn ports(&self) -> Option<u16> {
        match self {
            DeviceKind::RegFile => None,
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
            DeviceKind::RegFile => None,
            DeviceKind::IrqTest { .. } => Some(pc::IRQ_TEST.base),
            DeviceKind::Uart { .. } => Some(pc::COM1.base),
            DeviceKind::Rtc { .. } => Some(pc::RTC.base),
            DeviceKind::I8042 { .. } => Some(pc::I8042.base),
            DeviceKind::Timer { .. } => Some(pc::EVENT_TIMER.base),
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
}
