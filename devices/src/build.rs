//! Building a model from its description, wired to what its host gives it:
//! the one place that knows which constructor each [`DeviceKind`] takes.

use std::time::Instant;

use crate::device::{Device, DeviceState, Persist, RestoreError};
use crate::hpet::{Hpet, HpetLines};
use crate::i8042::{ResetSink, I8042};
use crate::ioapic::{DropMsi, IoApic, MsiSink};
use crate::irq::IrqLine;
use crate::irqtest::IrqTester;
use crate::kind::{DeviceKind, DeviceSpec};
use crate::regfile::RegisterFile;
use crate::rtc::{Cmos, WallClock};
use crate::timer::EventTimer;
use crate::uart::{ByteSink, ByteSource, Uart16550};
use crate::virtio::blk::{NoMedia, VirtioBlk};

/// What a host wires its models to. A server's lines queue Interrupt
/// frames and its UARTs talk to its consoles; the client's shim wires
/// models kept next to the VM to KVM's irqchip and a log file.
pub trait Wiring {
    type Line: IrqLine + 'static;

    /// Interrupt line `gsi` of device `device`.
    fn line(&self, device: u32, gsi: u32) -> Self::Line;
    /// Where UART `device` of `vm` sends its output and takes its input from.
    fn console(&self, vm: Option<u32>, device: u32) -> (Box<dyn ByteSink>, Box<dyn ByteSource>);
    /// Where i8042 `device` asks for a reset of its VM.
    fn reset(&self, device: u32) -> Box<dyn ResetSink>;
    /// The wall clock RTCs read.
    fn clock(&self) -> WallClock;
    /// The storage of block device `device` (its image), if the host has
    /// one for it; a block device without is an empty drive.
    fn block(&self, _device: u32) -> Option<Box<dyn crate::dma::BlockBackend>> {
        None
    }
    /// Where I/O APIC `device` sends its MSIs; a host without a way to
    /// the VM's local APICs drops them (the model counts what it sent).
    fn msi(&self, _device: u32) -> Box<dyn MsiSink> {
        Box::new(DropMsi::default())
    }
}

/// The state in `saved` if it is a `want`'s, or the model's fresh state.
fn state_of<S: Default>(
    saved: Option<DeviceState>,
    want: &'static str,
    take: fn(DeviceState) -> Result<S, DeviceState>,
) -> Result<S, RestoreError> {
    match saved.map(take) {
        None => Ok(S::default()),
        Some(Ok(s)) => Ok(s),
        Some(Err(other)) => Err(RestoreError::WrongModel { expected: want, got: other.model() }),
    }
}

/// The model `spec` describes, wired by `wiring`: fresh, or restored from
/// `saved` (which [`Device::save`] gave where it ran before; checked). A
/// spec that fails [`DeviceSpec::check`] is refused.
pub fn build<W: Wiring>(
    spec: &DeviceSpec,
    wiring: &W,
    saved: Option<DeviceState>,
    now: Instant,
) -> Result<Box<dyn Device>, RestoreError> {
    spec.check()?;
    let line = |gsi: u32| wiring.line(spec.id, gsi);
    let base = spec.base();
    let name = spec.kind.name();
    Ok(match spec.kind {
        DeviceKind::RegFile => {
            let state = state_of(saved, name, |s| if let DeviceState::RegFile(s) = s { Ok(s) } else { Err(s) })?;
            Box::new(RegisterFile::restore((spec.pio, spec.mmio), state)?)
        }
        DeviceKind::IrqTest { line: n } => {
            let state = state_of(saved, name, |s| if let DeviceState::IrqTest(s) = s { Ok(s) } else { Err(s) })?;
            Box::new(IrqTester::restore((base, line(n)), state)?)
        }
        DeviceKind::Uart { line: n } => {
            let state = state_of(saved, name, |s| if let DeviceState::Uart(s) = s { Ok(s) } else { Err(s) })?;
            let (out, input) = wiring.console(spec.vm, spec.id);
            Box::new(Uart16550::restore((base, line(n), out, input), state)?)
        }
        DeviceKind::Rtc { line: n } => {
            let state = state_of(saved, name, |s| if let DeviceState::Rtc(s) = s { Ok(s) } else { Err(s) })?;
            Box::new(Cmos::restore((base, line(n), wiring.clock(), now), state)?)
        }
        DeviceKind::I8042 { kbd_line, aux_line } => {
            let state = state_of(saved, name, |s| if let DeviceState::I8042(s) = s { Ok(s) } else { Err(s) })?;
            Box::new(I8042::restore((line(kbd_line), line(aux_line), wiring.reset(spec.id)), state)?)
        }
        DeviceKind::Timer { line: n } => {
            let state = state_of(saved, name, |s| if let DeviceState::Timer(s) = s { Ok(s) } else { Err(s) })?;
            Box::new(EventTimer::restore((base, line(n), now), state)?)
        }
        DeviceKind::VirtioBlk { line: n } => {
            let state = state_of(saved, name, |s| if let DeviceState::VirtioBlk(s) = s { Ok(s) } else { Err(s) })?;
            let backend = wiring.block(spec.id).unwrap_or_else(|| Box::new(NoMedia::default()));
            Box::new(VirtioBlk::restore((spec.mmio, line(n), backend, spec.id), state)?)
        }
        DeviceKind::Hpet => {
            let state = state_of(saved, name, |s| if let DeviceState::Hpet(s) = s { Ok(s) } else { Err(s) })?;
            Box::new(Hpet::restore((spec.mmio, HpetLines::wire(line), now), state)?)
        }
        DeviceKind::IoApic => {
            let state = state_of(saved, name, |s| if let DeviceState::IoApic(s) = s { Ok(s) } else { Err(s) })?;
            Box::new(IoApic::restore((spec.mmio.map(|(b, _)| b), wiring.msi(spec.id), now), state)?)
        }
    })
}

/// The model `spec` describes, fresh, wired by `wiring`. Hosts check a spec
/// ([`DeviceSpec::check`]) where they read it, to say what is wrong with it;
/// one that fails anyway is built [`DeviceSpec::confined`], so that no spec
/// makes this allocate more than a model may hold or panic.
pub fn fresh<W: Wiring>(spec: &DeviceSpec, wiring: &W, now: Instant) -> Box<dyn Device> {
    let confined;
    let spec = match spec.check() {
        Ok(()) => spec,
        Err(_) => {
            confined = spec.confined();
            &confined
        }
    };
    // A confined spec passes its check and every model's default state
    // passes its own (both tested below), so this cannot fail on any input.
    build(spec, wiring, None, now).unwrap_or_else(|e| unreachable!("a fresh {} is valid: {e}", spec.kind.name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingLine;
    use crate::platform::pc::{self, PcLayout};
    use dmfabric_wire::{AccessSize, Space};
    use std::collections::VecDeque;

    struct TestWiring;

    impl Wiring for TestWiring {
        type Line = CountingLine;
        fn line(&self, _device: u32, _gsi: u32) -> CountingLine {
            CountingLine::default()
        }
        fn console(&self, _vm: Option<u32>, _device: u32) -> (Box<dyn ByteSink>, Box<dyn ByteSource>) {
            (Box::new(Vec::new()), Box::new(VecDeque::new()))
        }
        fn reset(&self, _device: u32) -> Box<dyn ResetSink> {
            Box::new(0u64)
        }
        fn clock(&self) -> WallClock {
            WallClock::host()
        }
    }

    #[test]
    fn every_model_saves_and_restores_through_one_builder() {
        let now = Instant::now();
        let mut specs = PcLayout::new(1).unwrap().specs();
        specs.push(pc::test_device(1));
        specs.push(pc::irq_test_device(0));
        for spec in &specs {
            let mut d = build(spec, &TestWiring, None, now).unwrap();
            let port = u64::from(spec.base());
            d.write(Space::Pio, port + 7, AccessSize::B1, 0x5a);
            let saved = d.save();
            assert_eq!(saved.model(), spec.kind.name());
            let back = build(spec, &TestWiring, Some(saved.clone()), now).unwrap();
            assert_eq!(back.save(), saved, "{}", spec.kind.name());
        }
    }

    #[test]
    fn a_spec_that_fails_its_check_is_refused_by_build_and_confined_by_fresh() {
        let now = Instant::now();
        let huge = DeviceSpec { mmio: Some((0xd000_0000, u32::MAX)), ..pc::test_device(9) };
        let err = build(&huge, &TestWiring, None, now).err().unwrap();
        assert!(matches!(err, RestoreError::Spec(crate::SpecError::WindowTooBig { id: 9, .. })), "{err}");
        let mut d = fresh(&huge, &TestWiring, now);
        let DeviceState::RegFile(state) = d.save() else { panic!("not a register file") };
        assert_eq!(state.mmio.len(), crate::regfile::MAX_WINDOW as usize);
        assert!(d.write(Space::Mmio, 0xd000_0000, AccessSize::B4, 1));
        let wrapping =
            DeviceSpec { mmio: Some((u64::MAX - 1, 0x1000)), pio: Some((0xfff0, 0x100)), ..pc::test_device(9) };
        assert!(build(&wrapping, &TestWiring, None, now).is_err());
        let mut d = fresh(&wrapping, &TestWiring, now);
        assert_eq!(d.read(Space::Mmio, u64::MAX, AccessSize::B1), Some(0));
        assert_eq!(d.read(Space::Pio, 0xffff, AccessSize::B1), Some(0));
    }

    /// TestWiring with a disk for block devices.
    struct DiskWiring(crate::testing::MemBackend);

    impl Wiring for DiskWiring {
        type Line = CountingLine;
        fn line(&self, device: u32, gsi: u32) -> CountingLine {
            TestWiring.line(device, gsi)
        }
        fn console(&self, vm: Option<u32>, device: u32) -> (Box<dyn ByteSink>, Box<dyn ByteSource>) {
            TestWiring.console(vm, device)
        }
        fn reset(&self, device: u32) -> Box<dyn ResetSink> {
            TestWiring.reset(device)
        }
        fn clock(&self) -> WallClock {
            TestWiring.clock()
        }
        fn block(&self, _device: u32) -> Option<Box<dyn crate::dma::BlockBackend>> {
            Some(Box::new(self.0.clone()))
        }
    }

    #[test]
    fn a_virtio_blk_is_built_on_its_wiring_disk_or_as_an_empty_drive() {
        let now = Instant::now();
        let spec = pc::virtio_blk_device(1005, Some(1));
        assert_eq!(spec.check(), Ok(()));
        let capacity = |d: &mut Box<dyn Device>| d.read(Space::Mmio, pc::VIRTIO_BLK_MMIO + 0x100, AccessSize::B8);
        let mut empty = build(&spec, &TestWiring, None, now).unwrap();
        assert_eq!(capacity(&mut empty), Some(0), "no disk: no sectors");
        assert_eq!(empty.read(Space::Mmio, pc::VIRTIO_BLK_MMIO, AccessSize::B4), Some(0x7472_6976));
        assert!(empty.dma().is_some());
        let disk = DiskWiring(crate::testing::MemBackend::new(1 << 20));
        let mut d = build(&spec, &disk, None, now).unwrap();
        assert_eq!(capacity(&mut d), Some(2048));
        d.write(Space::Mmio, pc::VIRTIO_BLK_MMIO + 0x70, AccessSize::B4, 3);
        let saved = d.save();
        assert_eq!(saved.model(), "virtio-blk");
        let back = build(&spec, &disk, Some(saved.clone()), now).unwrap();
        assert_eq!(back.save(), saved);
        assert!(back.counters().iter().any(|&(name, _)| name == "requests"));
        let timer = DeviceSpec::at(2, pc::Role::EventTimer.kind(), 0x700, None);
        assert!(build(&timer, &TestWiring, None, now).unwrap().counters().is_empty(), "a model without counters");
        // In port space it decodes nothing, and nothing breaks.
        let at_ports = DeviceSpec::at(9, DeviceKind::VirtioBlk { line: 10 }, 0x500, None);
        assert_eq!(at_ports.check(), Ok(()));
        let mut d = fresh(&at_ports, &TestWiring, now);
        assert_eq!(d.read(Space::Pio, 0x500, AccessSize::B4), None);
    }

    #[test]
    fn an_hpet_is_built_at_its_window_and_restores_its_counter() {
        let now = Instant::now();
        let spec = pc::hpet_device(6, Some(1));
        let mut d = build(&spec, &TestWiring, None, now).unwrap();
        assert_eq!(d.read(Space::Mmio, pc::HPET_MMIO + 4, AccessSize::B4), Some(10_000_000), "period in fs");
        assert!(d.write(Space::Mmio, pc::HPET_MMIO + 0xf0, AccessSize::B8, 1234));
        let saved = d.save();
        assert_eq!(saved.model(), "hpet");
        let mut back = build(&spec, &TestWiring, Some(saved.clone()), now).unwrap();
        assert_eq!(back.save(), saved);
        assert_eq!(back.read(Space::Mmio, pc::HPET_MMIO + 0xf0, AccessSize::B8), Some(1234));
        assert!(back.counters().iter().any(|&(name, _)| name == "missed_periods"));
    }

    #[test]
    fn an_ioapic_is_built_at_its_window_sending_to_its_wiring() {
        let now = Instant::now();
        let spec = pc::ioapic_device(7, Some(1));
        let mut d = build(&spec, &TestWiring, None, now).unwrap();
        let (sel, win) = (pc::IOAPIC_MMIO, pc::IOAPIC_MMIO + 0x10);
        assert!(d.write(Space::Mmio, sel, AccessSize::B4, 1));
        assert_eq!(d.read(Space::Mmio, win, AccessSize::B4), Some(0x0017_0020), "version 0x20, 24 pins");
        assert!(d.write(Space::Mmio, sel, AccessSize::B4, 0x10));
        assert!(d.write(Space::Mmio, win, AccessSize::B4, 0x8030), "pin 0: level, vector 0x30, unmasked");
        let saved = d.save();
        assert_eq!(saved.model(), "ioapic");
        let mut back = build(&spec, &TestWiring, Some(saved.clone()), now).unwrap();
        assert_eq!(back.save(), saved);
        assert_eq!(back.read(Space::Mmio, win, AccessSize::B4), Some(0x8030));
        assert!(back.counters().iter().any(|&(name, _)| name == "bad_vector"));
        let DeviceState::IoApic(mut bad) = saved else { panic!("not an I/O APIC's") };
        bad.redirection.pop();
        assert!(build(&spec, &TestWiring, Some(DeviceState::IoApic(bad)), now).is_err());
        // A fresh one from a spec without a window decodes nothing.
        let nowhere = DeviceSpec { mmio: None, ..spec };
        assert_eq!(fresh(&nowhere, &TestWiring, now).read(Space::Mmio, sel, AccessSize::B4), None);
    }

    #[test]
    fn a_state_of_another_model_is_refused() {
        let now = Instant::now();
        let uart = pc::Role::Com1;
        let spec = DeviceSpec::at(1, uart.kind(), uart.window().base, None);
        let timer =
            build(&DeviceSpec::at(2, pc::Role::EventTimer.kind(), 0x700, None), &TestWiring, None, now).unwrap().save();
        let err = build(&spec, &TestWiring, Some(timer), now).err().unwrap();
        assert_eq!(err, RestoreError::WrongModel { expected: "uart", got: "timer" });
    }
}
