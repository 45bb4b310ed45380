//! What a device model is: registers in one or both address spaces, time
//! passed in, and a state that can be saved and restored elsewhere.

use std::time::Instant;

use dmfabric_wire::{AccessSize, Space};
use serde::{Deserialize, Serialize};

use crate::hpet::HpetState;
use crate::i8042::I8042State;
use crate::ioapic::IoApicState;
use crate::irqtest::IrqTesterState;
use crate::kind::SpecError;
use crate::regfile::RegisterFileState;
use crate::rtc::RtcState;
use crate::timer::TimerState;
use crate::uart::UartState;
use crate::virtio::blk::VirtioBlkState;

/// A device model: register reads and writes in one or both address spaces.
///
/// `addr` is the full guest address of the access. A model that has no
/// register of that size at that address returns `None` from `read` and
/// `false` from `write`; its host then completes the access the way real
/// hardware would (reads all ones, writes ignored) and counts it.
///
/// Time is passed in: the host calls [`Device::tick`] with the current
/// instant before every access and whenever the deadline it returned has
/// come, so timers and console input are testable without sleeping.
pub trait Device: Send {
    /// The model's name, for counters ("uart16550", "regfile", ...).
    fn kind(&self) -> &'static str;
    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64>;
    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool;
    /// Bring the model to `now` (timers fire, input arrives); returns when
    /// it next wants a tick, if ever.
    fn tick(&mut self, _now: Instant) -> Option<Instant> {
        None
    }
    /// The model's state, to rebuild it elsewhere with [`crate::build`].
    fn save(&self) -> DeviceState;
    /// A model that reads and writes guest memory and does backend I/O
    /// asynchronously ([`crate::dma`]); the others have none.
    fn dma(&mut self) -> Option<&mut dyn crate::dma::DmaDevice> {
        None
    }
    /// An interrupt controller whose pins the host drives from the VM's
    /// other devices' lines (the I/O APIC); the others are none.
    fn irqchip(&mut self) -> Option<&mut dyn crate::irq::IrqChip> {
        None
    }
    /// The model's own counters by name (what it did, what bad input it
    /// refused), for hosts to print or export; most models have none.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Saving and restoring a model (Firecracker's `Persist` is the model):
/// the state is a plain struct; what the model is wired to (interrupt
/// lines, console, clock, where it sits) comes from the host as
/// constructor arguments. `restore` checks every length, index and range
/// of the state: a state read from a store or the wire is untrusted, and a
/// bad one is an error, never a panic later.
pub trait Persist: Sized {
    type State;
    type ConstructorArgs;

    fn save(&self) -> Self::State;
    fn restore(args: Self::ConstructorArgs, state: Self::State) -> Result<Self, RestoreError>;
}

/// The saved state of any model, tagged by model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "model", content = "state", rename_all = "snake_case")]
pub enum DeviceState {
    RegFile(RegisterFileState),
    IrqTest(IrqTesterState),
    Uart(UartState),
    Rtc(RtcState),
    I8042(I8042State),
    Timer(TimerState),
    VirtioBlk(VirtioBlkState),
    Hpet(HpetState),
    IoApic(IoApicState),
}

impl DeviceState {
    /// The model the state belongs to, as [`crate::DeviceKind::name`] says it.
    pub fn model(&self) -> &'static str {
        match self {
            DeviceState::RegFile(_) => "regfile",
            DeviceState::IrqTest(_) => "irqtest",
            DeviceState::Uart(_) => "uart",
            DeviceState::Rtc(_) => "rtc",
            DeviceState::I8042(_) => "i8042",
            DeviceState::Timer(_) => "timer",
            DeviceState::VirtioBlk(_) => "virtio-blk",
            DeviceState::Hpet(_) => "hpet",
            DeviceState::IoApic(_) => "ioapic",
        }
    }
}

/// Why a saved state (or a spec, [`crate::build`]) cannot become a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("The saved state is a {got}'s, not a {expected}'s")]
    WrongModel { expected: &'static str, got: &'static str },
    #[error("The saved {model} state is invalid: {what}")]
    Invalid { model: &'static str, what: String },
}

impl RestoreError {
    pub(crate) fn invalid(model: &'static str, what: impl Into<String>) -> RestoreError {
        RestoreError::Invalid { model, what: what.into() }
    }
}
