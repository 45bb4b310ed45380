//! How device models raise interrupts. A model is generic over an
//! [`IrqLine`] (vm-superio's `Trigger` is the model) and does not know
//! where its interrupts go: on a server the line queues an Interrupt frame
//! for the VM's client, next to the VM it drives KVM's irqchip, in a unit
//! test it counts.

/// An interrupt output of a device model.
pub trait IrqLine: Send {
    /// An edge: one interrupt.
    fn pulse(&mut self);
    /// Drive a level-triggered line. A line remembers its level: repeating
    /// the current level is a no-op, so the host's side must never lose a
    /// change it was given (a level is state).
    fn set_level(&mut self, asserted: bool);
}

/// An interrupt controller a host feeds its VM's other devices' lines
/// into (the I/O APIC model, [`crate::ioapic`]): `pin`'s input is driven
/// to `high`; an edge is a rise and a fall.
pub trait IrqChip {
    fn set_pin(&mut self, pin: u32, high: bool);
}

/// A test's interrupt line: counts edges and level changes.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountingLine {
    pub pulses: u64,
    pub level: bool,
    pub level_changes: u64,
}

#[cfg(any(test, feature = "testing"))]
impl IrqLine for CountingLine {
    fn pulse(&mut self) {
        self.pulses += 1;
    }

    fn set_level(&mut self, asserted: bool) {
        if asserted != self.level {
            self.level = asserted;
            self.level_changes += 1;
        }
    }
}
