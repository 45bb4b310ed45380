//! VMs whose interrupt controller is a model on this server (an I/O APIC,
//! for a client running the VM with KVM's split irqchip): the lines of the
//! VM's other devices here drive the controller's pins instead of going to
//! the wire ([`PinLine`], [`Pins`]), and what the controller sends — MSI
//! messages — goes to the VM's client as Interrupt frames ([`WireMsi`]).
//!
//! A line may be raised on any worker shard; the pins are driven where the
//! controller runs, by the table that holds it ([`crate::table::Devices`]),
//! from a queue per VM, in the order the lines changed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dmfabric_devices::ioapic::MsiSink;
use dmfabric_devices::{DeviceKind, DeviceSpec, IrqChip, IrqLine};
use dmfabric_wire::{IrqSource, Trigger};

use crate::irq::{IrqEvent, IrqQueue};

/// Pin changes that may wait for the controller, per VM.
pub const PIN_QUEUE: usize = 4096;

/// One VM's pin changes, in order: (pin, input high).
#[derive(Debug, Default)]
pub struct PinQueue {
    changes: Mutex<VecDeque<(u32, bool)>>,
    dropped: AtomicU64,
}

impl PinQueue {
    /// Queue a change of `pin`'s input (counted as dropped when full).
    pub fn push(&self, pin: u32, high: bool) {
        let mut q = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= PIN_QUEUE {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back((pin, high));
    }

    /// Drive `chip`'s pins with every change queued so far.
    pub fn drive(&self, chip: &mut dyn IrqChip) {
        let changes = std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()));
        for (pin, high) in changes {
            chip.set_pin(pin, high);
        }
    }

    /// Changes lost because the queue was full (a model toggling a line
    /// faster than the controller's core runs).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Which devices' lines drive which VM's controller.
#[derive(Debug, Default)]
pub struct Pins {
    /// device → its VM, for the devices of VMs with a controller here.
    routed: RwLock<HashMap<u32, u32>>,
    queues: RwLock<HashMap<u32, Arc<PinQueue>>>,
}

impl Pins {
    /// Route the lines of every device of `specs` whose VM has an I/O APIC
    /// among them into that controller (call before the devices are built).
    pub fn route(&self, specs: &[DeviceSpec]) {
        let with_chip: Vec<u32> = specs.iter().filter(|s| s.kind == DeviceKind::IoApic).filter_map(|s| s.vm).collect();
        let mut routed = self.routed.write().unwrap_or_else(|e| e.into_inner());
        let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
        for s in specs {
            if let Some(vm) = s.vm.filter(|vm| with_chip.contains(vm)) {
                routed.insert(s.id, vm);
                queues.entry(vm).or_default();
            }
        }
    }

    /// The VMs whose controllers are here now are `vms` (a server placed by
    /// the control panel): each has a queue, which the lines of its devices
    /// reach through the data-plane core ([`crate::interrupts`]) whatever
    /// server they are on. Devices routed by [`Pins::route`] keep theirs.
    pub fn set_chips(&self, vms: &[u32]) {
        let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
        let routed = self.routed.read().unwrap_or_else(|e| e.into_inner());
        queues.retain(|vm, _| vms.contains(vm) || routed.values().any(|v| v == vm));
        for vm in vms {
            queues.entry(*vm).or_default();
        }
    }

    /// The VM whose controller `device`'s lines drive, if any.
    pub fn vm_of(&self, device: u32) -> Option<u32> {
        self.routed.read().unwrap_or_else(|e| e.into_inner()).get(&device).copied()
    }

    /// VM `vm`'s pin queue.
    pub fn queue(&self, vm: u32) -> Option<Arc<PinQueue>> {
        self.queues.read().unwrap_or_else(|e| e.into_inner()).get(&vm).cloned()
    }
}

/// A device's line into its VM's controller: GSI `pin`.
#[derive(Debug)]
pub struct PinLine {
    pin: u32,
    level: bool,
    queue: Arc<PinQueue>,
}

impl PinLine {
    pub fn new(pin: u32, queue: Arc<PinQueue>) -> PinLine {
        PinLine { pin, level: false, queue }
    }
}

impl IrqLine for PinLine {
    fn pulse(&mut self) {
        self.queue.push(self.pin, true);
        self.queue.push(self.pin, false);
    }

    fn set_level(&mut self, asserted: bool) {
        if asserted != self.level {
            self.level = asserted;
            self.queue.push(self.pin, asserted);
        }
    }
}

/// A controller's messages, to its VM's client as Interrupt frames.
#[derive(Debug)]
pub struct WireMsi {
    device: u32,
    queue: Arc<IrqQueue>,
}

impl WireMsi {
    pub fn new(device: u32, queue: Arc<IrqQueue>) -> WireMsi {
        WireMsi { device, queue }
    }
}

impl MsiSink for WireMsi {
    fn msi(&mut self, address: u64, data: u32) {
        let e = IrqEvent { device: self.device, source: IrqSource::Msi { address, data }, trigger: Trigger::Edge };
        self.queue.push_edge(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmfabric_devices::platform::pc;

    #[derive(Default)]
    struct Chip(Vec<(u32, bool)>);

    impl IrqChip for Chip {
        fn set_pin(&mut self, pin: u32, high: bool) {
            self.0.push((pin, high));
        }
    }

    #[test]
    fn lines_of_a_vm_with_a_controller_here_drive_its_pins_in_order() {
        let pins = Pins::default();
        let specs = [pc::ioapic_device(20, Some(7)), pc::hpet_device(21, Some(7)), pc::hpet_device(22, Some(8))];
        pins.route(&specs);
        assert_eq!((pins.vm_of(21), pins.vm_of(20), pins.vm_of(22)), (Some(7), Some(7), None));
        let q = pins.queue(7).unwrap();
        let mut a = PinLine::new(2, q.clone());
        let mut b = PinLine::new(9, q.clone());
        a.pulse();
        b.set_level(true);
        b.set_level(true);
        b.set_level(false);
        let mut chip = Chip::default();
        q.drive(&mut chip);
        assert_eq!(chip.0, [(2, true), (2, false), (9, true), (9, false)]);
        q.drive(&mut chip);
        assert_eq!(chip.0.len(), 4, "each change once");
    }
}
