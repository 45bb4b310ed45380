//! dmfabric's device models.
//!
//! Owns: what a device model is ([`Device`]), how it raises interrupts
//! ([`IrqLine`]) and how its state is saved and restored ([`Persist`],
//! [`DeviceState`]: plain structs, validated on the way back in); the
//! models themselves — 16550A UART, CMOS RTC, i8042, event timer, register
//! file, interrupt tester, HPET, I/O APIC, virtio-blk on virtio-mmio ([`virtio`], which does
//! its I/O through [`dma`]); building a model from its description wired to
//! whatever the host gives it ([`build`], [`Wiring`]); and the PC layout
//! ([`platform::pc`]): ports, IRQ lines and device ids, written once.
//!
//! Does not own: where a model runs or how its interrupts travel. The
//! server (`dmfabric-dm-workers`) and the client's shim
//! (`dmfabric-vmm-shim`, for models kept next to the VM) both use this
//! crate; it depends on the frame format's plain types and serde only.

#![forbid(unsafe_code)]

mod build;
mod device;
pub mod dma;
pub mod hpet;
pub mod i8042;
pub mod ioapic;
pub mod irq;
pub mod irqtest;
mod kind;
#[cfg(any(test, feature = "testing"))]
mod membackend;
pub mod platform;
pub mod regfile;
pub mod rtc;
pub mod timer;
pub mod uart;
pub mod virtio;

pub use build::{build, fresh, Wiring};
pub use device::{Device, DeviceState, Persist, RestoreError};
pub use dma::{BlockBackend, BlockOp, BlockResult, DmaDevice, DmaOp, DmaRequest, DmaResult};
pub use hpet::{Hpet, HpetLines, HpetState};
pub use i8042::ResetSink;
pub use ioapic::{IoApic, IoApicCounters, IoApicState, MsiSink};
pub use irq::{IrqChip, IrqLine};
pub use kind::{DeviceKind, DeviceSpec, KindError, SpecError};
pub use rtc::WallClock;
pub use uart::{ByteSink, ByteSource};
pub use virtio::blk::{VirtioBlk, VirtioBlkCounters, VirtioBlkState};

/// Test doubles for other crates' tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    pub use crate::ioapic::CountingMsi;
    pub use crate::irq::CountingLine;
    pub use crate::membackend::MemBackend;
}
