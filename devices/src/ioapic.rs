//! An I/O APIC at the register level (Intel 82093AA datasheet, with the
//! EOI register of the ICH's version 0x20, as QEMU's `hw/intc/ioapic.c`
//! and Linux's `arch/x86/kvm/ioapic.c` implement it): 24 input pins, each
//! with a redirection table entry that turns the pin into a message to the
//! local APICs.
//!
//! Built for KVM's split irqchip: the local APICs live in KVM on the
//! client, this model on a server. Device models' lines drive its pins
//! ([`IoApic::set_level`]); what it sends is an MSI (address, data) as a
//! local APIC takes it ([`msi_of`]), handed to an [`MsiSink`] — on a
//! server, the VM's interrupt stream to its client, which injects it with
//! `KVM_SIGNAL_MSI`. The client reports EOIs of level-triggered vectors
//! (`KVM_EXIT_IOAPIC_EOI`) back ([`IoApic::eoi`]), so remote IRR clears and
//! a line still asserted interrupts again.
//!
//! Register map (MMIO, 32-bit accesses; the window decodes its low byte,
//! as QEMU and KVM do):
//!
//! | offset | name | meaning |
//! |---|---|---|
//! | 0x00 | IOREGSEL | index of the register IOWIN reaches (8 bits) |
//! | 0x10 | IOWIN | the register IOREGSEL selects |
//! | 0x40 | EOI | write a vector: as an EOI broadcast of it (version 0x20) |
//!
//! Indirect registers: 0x00 ID (bits 24–27 writable), 0x01 version (reads
//! 0x0017_0020: version 0x20, 24 entries), 0x02 arbitration (reads the
//! ID, as QEMU's), 0x10 + 2·pin / + 1 the low / high dword of a pin's
//! redirection entry. Other indices read 0 and ignore writes.
//!
//! Redirection entry (reset: masked, everything else 0): vector (0–7),
//! delivery mode (8–10: fixed, lowest priority, SMI, —, NMI, INIT, —,
//! ExtINT), destination mode (11, logical), delivery status (12, read-only,
//! always 0: a message goes out at once), polarity (13, active low),
//! remote IRR (14, read-only), trigger mode (15, level), mask (16),
//! destination (56–63). Bits 17–55 are reserved: they read 0.
//!
//! Behaviour, where the datasheet, QEMU and KVM are the references:
//!
//! - An edge-triggered pin sends one message per rising edge of its input
//!   (after polarity); an edge on a masked pin is lost (82093AA; QEMU),
//!   and counted. Nothing coalesces edges on hardware: each edge sends.
//! - A level-triggered pin sends while its input is asserted and its
//!   remote IRR is clear, and sets remote IRR; an input that stays
//!   asserted sends nothing more until the EOI of its vector, which clears
//!   remote IRR and sends again if the input is still asserted and the pin
//!   unmasked. Unmasking (or reprogramming) an asserted level pin sends.
//! - NMI, SMI, INIT and ExtINT are edge-triggered whatever the trigger bit
//!   says (82093AA: "treated as an edge triggered interrupt"): they never
//!   set remote IRR, which no EOI would clear.
//! - Making an entry edge-triggered clears its remote IRR (KVM and QEMU:
//!   Linux uses it as an EOI on I/O APICs without the EOI register).
//! - Reserved delivery modes 3 and 6 send nothing and are counted: to a
//!   KVM local APIC they would mean "remote read" (a PV unhalt) and
//!   "start-up" (a SIPI).
//! - Vectors 0–15 with fixed or lowest-priority delivery send nothing and
//!   are counted (`bad_vector`); remote IRR is not set. KVM's own I/O APIC
//!   and local APIC pass such vectors through unchecked (nothing in
//!   `ioapic_service` or `__apic_accept_irq` looks at them), but a real
//!   local APIC refuses them ("receive illegal vector", Intel SDM 10.5.3),
//!   and here no local APIC on the way would: injecting an exception's
//!   vector as an interrupt only confuses a guest. KVM sets remote IRR only
//!   for a message some CPU took: a refused one leaves it clear here too.
//! - The model does not know the VM's CPUs: a destination no CPU answers
//!   to is sent like any other, and the client's side drops and counts it
//!   (KVM takes such an MSI and delivers it to nobody). Unlike KVM, which
//!   then leaves remote IRR clear, remote IRR is set here: a level pin
//!   aimed at nobody waits for an EOI that never comes until the guest
//!   reprograms the entry (its pin does not interrupt in a loop).
//!
//! The optional [`DeliveryBound`] caps the messages one pin sends per
//! window of time; what goes past it is held back and sent once when the
//! window turns over (each held-back pin sends once: a source faster than
//! the guest coalesces, as a local APIC's IRR would coalesce it). Off
//! unless a host sets it. Time is passed in with [`Device::tick`]; a host
//! that sets a bound ticks the model before and after it drives a pin or
//! reports an EOI, as around accesses, and ticks it when the deadline it
//! returned comes.

use std::time::{Duration, Instant};

use dmfabric_wire::{AccessSize, Space};

use crate::device::{Device, DeviceState, Persist, RestoreError};

/// Input pins (redirection entries).
pub const PINS: usize = 24;
/// The version register's version (ICH-style, with the EOI register).
pub const VERSION: u32 = 0x20;
/// The MMIO window the model decodes.
pub const WINDOW: u64 = 0x1000;

/// Register offsets in the window.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
pub const EOI: u64 = 0x40;

/// Indirect registers.
pub const REG_ID: u8 = 0x00;
pub const REG_VERSION: u8 = 0x01;
pub const REG_ARBITRATION: u8 = 0x02;
pub const REG_REDIRECTION: u8 = 0x10;

/// Redirection entry fields.
pub const RTE_VECTOR: u64 = 0xff;
pub const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
pub const RTE_DEST_LOGICAL: u64 = 1 << 11;
pub const RTE_DELIVERY_STATUS: u64 = 1 << 12;
pub const RTE_ACTIVE_LOW: u64 = 1 << 13;
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
pub const RTE_LEVEL: u64 = 1 << 15;
pub const RTE_MASKED: u64 = 1 << 16;
pub const RTE_DEST_SHIFT: u32 = 56;
/// What a guest may write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask, destination.
pub const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;
/// What only the model changes.
pub const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;
/// Bits 17–55.
pub const RTE_RESERVED: u64 = !(RTE_WRITABLE | RTE_READ_ONLY);
/// An entry after reset: masked.
pub const RTE_RESET: u64 = RTE_MASKED;

/// The local APICs' MSI address window, and the fields of an MSI.
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
pub const MSI_ADDR_DEST_SHIFT: u32 = 12;
pub const MSI_ADDR_REDIRECTION_HINT: u64 = 1 << 3;
pub const MSI_ADDR_DEST_LOGICAL: u64 = 1 << 2;
pub const MSI_DATA_DELIVERY_SHIFT: u32 = 8;
pub const MSI_DATA_ASSERT: u32 = 1 << 14;
pub const MSI_DATA_LEVEL: u32 = 1 << 15;

/// How a redirection entry delivers (bits 8–10); 3 and 6 are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed = 0,
    LowestPriority = 1,
    Smi = 2,
    Nmi = 4,
    Init = 5,
    ExtInt = 7,
}

impl DeliveryMode {
    /// The mode of `entry`, None for a reserved one.
    pub fn of(entry: u64) -> Option<DeliveryMode> {
        Some(match (entry >> RTE_DELIVERY_MODE_SHIFT) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        })
    }

    /// Whether the local APIC takes the vector of the entry (the others
    /// ignore it).
    pub fn uses_vector(self) -> bool {
        matches!(self, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
    }
}

/// An MSI as the local APICs take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msi {
    pub address: u64,
    pub data: u32,
}

/// Why an entry sends nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Delivery mode 3 or 6.
    ReservedMode,
    /// A vector below 16 with fixed or lowest-priority delivery.
    BadVector,
}

/// Whether `entry` is level-triggered in effect: its trigger bit says so
/// and its delivery mode has a level form (fixed, lowest priority).
pub fn is_level(entry: u64) -> bool {
    entry & RTE_LEVEL != 0 && DeliveryMode::of(entry).is_none_or(DeliveryMode::uses_vector)
}

/// The MSI `entry` sends (whether masked or not):
///
/// - address: `0xfee0_0000 | destination << 12 | RH << 3 | DM << 2`,
///   with DM the entry's destination mode (1: logical) and the
///   redirection hint RH set for lowest-priority delivery (as Linux
///   composes MSIs; KVM treats RH or mode 1 alike as lowest priority);
/// - data: `vector | delivery mode << 8 | 1 << 14 (assert) | trigger << 15`,
///   the trigger 1 for a level-triggered entry ([`is_level`]).
///
/// This is QEMU's `ioapic_entry_parse` message, with assert set (a level
/// message is an assertion; KVM ignores the bit for `KVM_SIGNAL_MSI`).
pub fn msi_of(entry: u64) -> Result<Msi, Refused> {
    let mode = DeliveryMode::of(entry).ok_or(Refused::ReservedMode)?;
    let vector = (entry & RTE_VECTOR) as u32;
    if mode.uses_vector() && vector < 16 {
        return Err(Refused::BadVector);
    }
    let mut address = MSI_ADDRESS_BASE | (entry >> RTE_DEST_SHIFT) << MSI_ADDR_DEST_SHIFT;
    if entry & RTE_DEST_LOGICAL != 0 {
        address |= MSI_ADDR_DEST_LOGICAL;
    }
    if mode == DeliveryMode::LowestPriority {
        address |= MSI_ADDR_REDIRECTION_HINT;
    }
    let mut data = vector | (mode as u32) << MSI_DATA_DELIVERY_SHIFT | MSI_DATA_ASSERT;
    if is_level(entry) {
        data |= MSI_DATA_LEVEL;
    }
    Ok(Msi { address, data })
}

/// Where the I/O APIC's messages go: on a server, the VM's interrupt
/// stream to its client (which injects them with `KVM_SIGNAL_MSI`); in a
/// test, a list.
pub trait MsiSink: Send {
    fn msi(&mut self, address: u64, data: u32);
}

impl MsiSink for Box<dyn MsiSink> {
    fn msi(&mut self, address: u64, data: u32) {
        (**self).msi(address, data)
    }
}

/// A sink that drops every message and counts it: what a host that has
/// nowhere to send MSIs wires an I/O APIC to ([`crate::Wiring::msi`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropMsi {
    pub dropped: u64,
}

impl MsiSink for DropMsi {
    fn msi(&mut self, _address: u64, _data: u32) {
        self.dropped += 1;
    }
}

/// A test's sink: keeps every message.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountingMsi {
    pub messages: Vec<Msi>,
}

#[cfg(any(test, feature = "testing"))]
impl CountingMsi {
    pub fn count(&self) -> usize {
        self.messages.len()
    }

    /// The messages with `vector` (data bits 0–7).
    pub fn of_vector(&self, vector: u8) -> usize {
        self.messages.iter().filter(|m| m.data & 0xff == u32::from(vector)).count()
    }
}

#[cfg(any(test, feature = "testing"))]
impl MsiSink for CountingMsi {
    fn msi(&mut self, address: u64, data: u32) {
        self.messages.push(Msi { address, data });
    }
}

/// At most `per_pin` messages from one pin per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryBound {
    pub per_pin: u32,
    pub window: Duration,
}

/// What the I/O APIC did and what it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoApicCounters {
    /// Messages sent.
    pub messages: u64,
    /// ... of them from edge-triggered pins.
    pub edge_messages: u64,
    /// ... of them from level-triggered pins.
    pub level_messages: u64,
    /// ... of them sent again by an EOI of a level still asserted.
    pub eoi_resends: u64,
    /// EOIs (reported or written to the EOI register) that cleared a
    /// remote IRR.
    pub eois: u64,
    /// Rising edges lost on a masked pin.
    pub masked_edges: u64,
    /// Messages refused for a vector below 16.
    pub bad_vector: u64,
    /// Messages refused for a reserved delivery mode.
    pub reserved_mode: u64,
    /// Messages held back by the [`DeliveryBound`].
    pub deferred: u64,
    /// Accesses the model does not decode (not 32 bits, unaligned, outside
    /// the window, in port space).
    pub bad_access: u64,
    /// Inputs driven on pins past the last.
    pub bad_pin: u64,
    /// Messages sent, per pin.
    pub per_pin: [u64; PINS],
}

impl IoApicCounters {
    /// The totals by name.
    pub fn list(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("messages", self.messages),
            ("edge_messages", self.edge_messages),
            ("level_messages", self.level_messages),
            ("eoi_resends", self.eoi_resends),
            ("eois", self.eois),
            ("masked_edges", self.masked_edges),
            ("bad_vector", self.bad_vector),
            ("reserved_mode", self.reserved_mode),
            ("deferred", self.deferred),
            ("bad_access", self.bad_access),
            ("bad_pin", self.bad_pin),
        ]
    }
}

/// The saved state of the I/O APIC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApicState {
    /// The I/O APIC ID (4 bits).
    pub id: u8,
    pub ioregsel: u8,
    /// The redirection table: [`PINS`] entries.
    pub redirection: Vec<u64>,
    /// The inputs' electrical levels, a bit per pin (1: high).
    pub inputs: u32,
    /// Pins whose message the [`DeliveryBound`] holds back.
    pub deferred: u32,
}

impl Default for IoApicState {
    fn default() -> Self {
        IoApicState { id: 0, ioregsel: 0, redirection: vec![RTE_RESET; PINS], inputs: 0, deferred: 0 }
    }
}

const ALL_PINS: u32 = (1 << PINS) - 1;

/// An I/O APIC whose window starts at `base` (None: it decodes no MMIO).
#[derive(Debug)]
pub struct IoApic<S> {
    base: Option<u64>,
    id: u8,
    ioregsel: u8,
    rte: [u64; PINS],
    inputs: u32,
    deferred: u32,
    bound: Option<DeliveryBound>,
    window_start: Instant,
    window_sent: [u32; PINS],
    now: Instant,
    counters: IoApicCounters,
    sink: S,
}

impl<S: MsiSink> IoApic<S> {
    /// An I/O APIC after reset, sending to `sink`.
    pub fn new(base: Option<u64>, sink: S, now: Instant) -> Self {
        IoApic {
            base,
            id: 0,
            ioregsel: 0,
            rte: [RTE_RESET; PINS],
            inputs: 0,
            deferred: 0,
            bound: None,
            window_start: now,
            window_sent: [0; PINS],
            now,
            counters: IoApicCounters::default(),
            sink,
        }
    }

    /// Cap the messages a pin sends per window (None: no cap).
    pub fn set_bound(&mut self, bound: Option<DeliveryBound>) {
        self.bound = bound.filter(|b| b.per_pin > 0 && !b.window.is_zero());
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    pub fn stats(&self) -> &IoApicCounters {
        &self.counters
    }

    /// Redirection entry `pin` as the guest reads it.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.rte.get(pin).copied()
    }

    /// The message each unmasked pin would send (None: masked or refused).
    /// What a split-irqchip client installs as the GSI routes of pins
    /// 0–23, so that KVM knows which vectors are level-triggered I/O APIC
    /// vectors and exits on their EOIs (`KVM_EXIT_IOAPIC_EOI`).
    pub fn routes(&self) -> [Option<Msi>; PINS] {
        std::array::from_fn(|pin| {
            let e = self.rte[pin];
            (e & RTE_MASKED == 0).then(|| msi_of(e).ok()).flatten()
        })
    }

    fn asserted(&self, pin: usize) -> bool {
        let high = self.inputs & (1 << pin) != 0;
        high != (self.rte[pin] & RTE_ACTIVE_LOW != 0)
    }

    /// Drive input `pin` to `high` (its electrical level). A pin that is
    /// active high (polarity 0, the reset value, a PC's ISA lines) is
    /// asserted when high, an active-low one when low. Repeating the
    /// current level does nothing. Pins past the last are counted.
    pub fn set_level(&mut self, pin: u32, high: bool) {
        let Some(p) = usize::try_from(pin).ok().filter(|&p| p < PINS) else {
            self.counters.bad_pin += 1;
            return;
        };
        let was = self.asserted(p);
        if high {
            self.inputs |= 1 << p;
        } else {
            self.inputs &= !(1 << p);
        }
        if was || !self.asserted(p) {
            return;
        }
        // A rising edge of the pin's asserted state.
        let e = self.rte[p];
        if !is_level(e) && e & RTE_MASKED != 0 {
            self.counters.masked_edges += 1;
            return;
        }
        self.service(p);
    }

    /// The EOI of `vector` (a level-triggered interrupt the guest is done
    /// with, as the client reports it, or a write to the EOI register):
    /// clears remote IRR of the level-triggered entries with that vector
    /// and sends again those whose input is still asserted and unmasked.
    pub fn eoi(&mut self, vector: u8) {
        for p in 0..PINS {
            let e = self.rte[p];
            if e & RTE_VECTOR != u64::from(vector) || !is_level(e) || e & RTE_REMOTE_IRR == 0 {
                continue;
            }
            self.rte[p] = e & !RTE_REMOTE_IRR;
            self.counters.eois += 1;
            let before = self.counters.messages;
            self.service(p);
            if self.counters.messages > before {
                self.counters.eoi_resends += 1;
            }
        }
    }

    /// Send pin `p`'s message if its entry lets it: unmasked, and for a
    /// level-triggered entry asserted with remote IRR clear. (An edge
    /// pin's caller has seen the rising edge.)
    fn service(&mut self, p: usize) {
        let e = self.rte[p];
        if e & RTE_MASKED != 0 {
            return;
        }
        let level = is_level(e);
        if level && (e & RTE_REMOTE_IRR != 0 || !self.asserted(p)) {
            return;
        }
        let msg = match msi_of(e) {
            Ok(m) => m,
            Err(Refused::ReservedMode) => return self.counters.reserved_mode += 1,
            Err(Refused::BadVector) => return self.counters.bad_vector += 1,
        };
        if let Some(b) = self.bound {
            if self.window_sent[p] >= b.per_pin {
                if self.deferred & (1 << p) == 0 {
                    self.deferred |= 1 << p;
                    self.counters.deferred += 1;
                }
                return;
            }
            self.window_sent[p] += 1;
        }
        if level {
            self.rte[p] |= RTE_REMOTE_IRR;
            self.counters.level_messages += 1;
        } else {
            self.counters.edge_messages += 1;
        }
        self.counters.messages += 1;
        self.counters.per_pin[p] += 1;
        self.sink.msi(msg.address, msg.data);
    }

    /// Send what the bound held back: an edge once if its pin is still
    /// unmasked, a level if it still should.
    fn release_deferred(&mut self) {
        let deferred = std::mem::take(&mut self.deferred);
        for p in (0..PINS).filter(|p| deferred & (1 << p) != 0) {
            let e = self.rte[p];
            if !is_level(e) && e & RTE_MASKED != 0 {
                self.counters.masked_edges += 1;
                continue;
            }
            self.service(p);
        }
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << 24,
            REG_VERSION => VERSION | ((PINS as u32 - 1) << 16),
            sel => match self.redirection_index(sel) {
                Some((p, true)) => (self.rte[p] >> 32) as u32,
                Some((p, false)) => self.rte[p] as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, v: u32) {
        match self.ioregsel {
            REG_ID => self.id = ((v >> 24) & 0xf) as u8,
            REG_VERSION | REG_ARBITRATION => {}
            sel => {
                let Some((p, high)) = self.redirection_index(sel) else { return };
                let old = self.rte[p];
                let merged =
                    if high { (old & 0xffff_ffff) | u64::from(v) << 32 } else { (old & !0xffff_ffff) | u64::from(v) };
                let mut e = (merged & RTE_WRITABLE) | (old & RTE_READ_ONLY);
                if !is_level(e) {
                    e &= !RTE_REMOTE_IRR;
                }
                self.rte[p] = e;
                // Unmasked (or made level, or its polarity turned) while
                // asserted: a level pin sends.
                if is_level(e) {
                    self.service(p);
                }
            }
        }
    }

    /// The pin and half (true: high dword) of redirection register `sel`.
    fn redirection_index(&self, sel: u8) -> Option<(usize, bool)> {
        let i = usize::from(sel.checked_sub(REG_REDIRECTION)?);
        (i / 2 < PINS).then_some((i / 2, i % 2 == 1))
    }

    /// The offset in the window (its low byte) of a 32-bit access.
    fn offset(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let off = self
            .base
            .filter(|_| space == Space::Mmio && size == AccessSize::B4)
            .and_then(|b| addr.checked_sub(b))
            .filter(|o| *o < WINDOW && o % 4 == 0);
        if off.is_none() {
            self.counters.bad_access += 1;
        }
        off.map(|o| o & 0xff)
    }
}

impl<S: MsiSink> Persist for IoApic<S> {
    type State = IoApicState;
    /// Where the window starts (None: nowhere), where messages go, and the
    /// time the state is restored at.
    type ConstructorArgs = (Option<u64>, S, Instant);

    fn save(&self) -> IoApicState {
        IoApicState {
            id: self.id,
            ioregsel: self.ioregsel,
            redirection: self.rte.to_vec(),
            inputs: self.inputs,
            deferred: self.deferred,
        }
    }

    fn restore((base, sink, now): Self::ConstructorArgs, s: IoApicState) -> Result<Self, RestoreError> {
        let invalid = |what: String| Err(RestoreError::invalid("ioapic", what));
        if s.id > 0xf {
            return invalid(format!("ID {:#x} is wider than 4 bits", s.id));
        }
        let Ok(rte) = <[u64; PINS]>::try_from(s.redirection.as_slice()) else {
            return invalid(format!("{} redirection entries, not {PINS}", s.redirection.len()));
        };
        for (pin, &e) in rte.iter().enumerate() {
            if e & RTE_RESERVED != 0 {
                return invalid(format!("redirection entry {pin} ({e:#x}) has reserved bits set"));
            }
            if e & RTE_DELIVERY_STATUS != 0 {
                return invalid(format!("redirection entry {pin} ({e:#x}) has a message pending"));
            }
            if e & RTE_REMOTE_IRR != 0 && !is_level(e) {
                return invalid(format!("redirection entry {pin} ({e:#x}) is edge-triggered with remote IRR set"));
            }
        }
        for (what, bits) in [("inputs", s.inputs), ("deferred pins", s.deferred)] {
            if bits & !ALL_PINS != 0 {
                return invalid(format!("{what} {bits:#x} name pins past {}", PINS - 1));
            }
        }
        let mut a = IoApic::new(base, sink, now);
        a.id = s.id;
        a.ioregsel = s.ioregsel;
        a.rte = rte;
        a.inputs = s.inputs;
        a.deferred = s.deferred;
        Ok(a)
    }
}

impl<S: MsiSink> crate::irq::IrqChip for IoApic<S> {
    fn set_pin(&mut self, pin: u32, high: bool) {
        self.set_level(pin, high);
    }
}

impl<S: MsiSink + 'static> Device for IoApic<S> {
    fn kind(&self) -> &'static str {
        "ioapic"
    }

    fn irqchip(&mut self) -> Option<&mut dyn crate::irq::IrqChip> {
        Some(self)
    }

    fn save(&self) -> DeviceState {
        DeviceState::IoApic(Persist::save(self))
    }

    fn read(&mut self, space: Space, addr: u64, size: AccessSize) -> Option<u64> {
        let v = match self.offset(space, addr, size)? {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(),
            _ => 0,
        };
        Some(u64::from(v))
    }

    fn write(&mut self, space: Space, addr: u64, size: AccessSize, data: u64) -> bool {
        let Some(off) = self.offset(space, addr, size) else { return false };
        let v = data as u32;
        match off {
            IOREGSEL => self.ioregsel = v as u8,
            IOWIN => self.write_register(v),
            EOI => self.eoi(v as u8),
            _ => {}
        }
        true
    }

    fn tick(&mut self, now: Instant) -> Option<Instant> {
        if now > self.now {
            self.now = now;
        }
        let Some(b) = self.bound else {
            // No bound (any more): what was held back goes now.
            if self.deferred != 0 {
                self.release_deferred();
            }
            return None;
        };
        if self.now >= self.window_start + b.window {
            self.window_start = self.now;
            self.window_sent = [0; PINS];
            self.release_deferred();
        }
        (self.deferred != 0).then(|| self.window_start + b.window)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.counters.list()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xfec0_0000;

    type Apic = IoApic<CountingMsi>;

    fn apic() -> Apic {
        IoApic::new(Some(BASE), CountingMsi::default(), Instant::now())
    }

    fn w(a: &mut Apic, off: u64, v: u32) {
        assert!(a.write(Space::Mmio, BASE + off, AccessSize::B4, u64::from(v)), "write at +{off:#x}");
    }

    fn r(a: &mut Apic, off: u64) -> u32 {
        a.read(Space::Mmio, BASE + off, AccessSize::B4).expect("a 32-bit read in the window") as u32
    }

    fn reg(a: &mut Apic, sel: u8) -> u32 {
        w(a, IOREGSEL, u32::from(sel));
        r(a, IOWIN)
    }

    fn set_reg(a: &mut Apic, sel: u8, v: u32) {
        w(a, IOREGSEL, u32::from(sel));
        w(a, IOWIN, v);
    }

    /// Program pin `pin` as a guest does: the high dword, then the low.
    fn program(a: &mut Apic, pin: u8, entry: u64) {
        set_reg(a, REG_REDIRECTION + 2 * pin + 1, (entry >> 32) as u32);
        set_reg(a, REG_REDIRECTION + 2 * pin, entry as u32);
    }

    /// Redirection entry `pin` as the guest reads it.
    fn rte(a: &mut Apic, pin: u8) -> u64 {
        let lo = reg(a, REG_REDIRECTION + 2 * pin);
        let hi = reg(a, REG_REDIRECTION + 2 * pin + 1);
        u64::from(hi) << 32 | u64::from(lo)
    }

    fn sent(a: &Apic) -> usize {
        a.sink().count()
    }

    /// Fixed delivery to physical APIC `dest`.
    fn fixed(vector: u8, dest: u8) -> u64 {
        u64::from(vector) | u64::from(dest) << RTE_DEST_SHIFT
    }

    fn mode(m: u64) -> u64 {
        m << RTE_DELIVERY_MODE_SHIFT
    }

    #[test]
    fn reset_values_are_the_datasheets() {
        let mut a = apic();
        assert_eq!(r(&mut a, IOREGSEL), 0);
        assert_eq!(reg(&mut a, REG_ID), 0, "ID 0");
        assert_eq!(reg(&mut a, REG_VERSION), 0x0017_0020, "version 0x20, 24 entries");
        assert_eq!(reg(&mut a, REG_ARBITRATION), 0);
        for pin in 0..PINS as u8 {
            assert_eq!(rte(&mut a, pin), RTE_MASKED, "pin {pin}: masked, all else 0");
        }
        assert_eq!(reg(&mut a, 0x03), 0, "undefined index");
        assert_eq!(reg(&mut a, 0x40), 0, "past the table");
        assert_eq!(reg(&mut a, 0xff), 0);
        assert_eq!(r(&mut a, EOI), 0, "the EOI register reads 0");
        assert_eq!(Persist::save(&a), IoApicState { ioregsel: 0xff, ..IoApicState::default() }, "the last selection");
        assert_eq!(a.routes(), [None; PINS], "every pin masked");
    }

    #[test]
    fn id_version_and_arbitration() {
        let mut a = apic();
        set_reg(&mut a, REG_ID, 0xffff_ffff);
        assert_eq!(reg(&mut a, REG_ID), 0x0f00_0000, "only bits 24-27");
        assert_eq!(reg(&mut a, REG_ARBITRATION), 0x0f00_0000, "arbitration reads the ID");
        set_reg(&mut a, REG_ID, 0x0500_0000);
        assert_eq!(reg(&mut a, REG_ID), 0x0500_0000);
        set_reg(&mut a, REG_VERSION, 0xffff_ffff);
        set_reg(&mut a, REG_ARBITRATION, 0xffff_ffff);
        assert_eq!(reg(&mut a, REG_VERSION), 0x0017_0020, "read-only");
        assert_eq!(reg(&mut a, REG_ARBITRATION), 0x0500_0000, "read-only");
        w(&mut a, IOREGSEL, 0x1234_5611);
        assert_eq!(r(&mut a, IOREGSEL), 0x11, "IOREGSEL is 8 bits");
        set_reg(&mut a, 0x03, 0xffff_ffff);
        set_reg(&mut a, 0x40, 0xffff_ffff);
        assert_eq!((reg(&mut a, 0x03), reg(&mut a, 0x40)), (0, 0), "writes past the registers are ignored");
        assert_eq!(Persist::save(&a).redirection, vec![RTE_MASKED; PINS]);
    }

    #[test]
    fn each_half_of_an_entry_is_its_own_register() {
        let mut a = apic();
        set_reg(&mut a, 0x10 + 2 * 5, 0xffff_ffff);
        assert_eq!(reg(&mut a, 0x10 + 2 * 5), 0x0001_afff, "no delivery status, no remote IRR, no reserved bits");
        assert_eq!(reg(&mut a, 0x10 + 2 * 5 + 1), 0, "the high half untouched");
        set_reg(&mut a, 0x10 + 2 * 5 + 1, 0xffff_ffff);
        assert_eq!(reg(&mut a, 0x10 + 2 * 5 + 1), 0xff00_0000, "destination only; bits 32-55 reserved");
        assert_eq!(reg(&mut a, 0x10 + 2 * 5), 0x0001_afff, "the low half untouched");
        set_reg(&mut a, 0x10 + 2 * 5, 0x0000_0031);
        assert_eq!(rte(&mut a, 5), 0xff00_0000_0000_0031);
        assert_eq!(rte(&mut a, 4), RTE_MASKED, "the neighbours untouched");
        assert_eq!(rte(&mut a, 6), RTE_MASKED);
        // The last entry is at 0x3e / 0x3f.
        set_reg(&mut a, 0x3f, 0x0200_0000);
        set_reg(&mut a, 0x3e, 0x0001_0042);
        assert_eq!(rte(&mut a, 23), 0x0200_0000_0001_0042);
        assert_eq!(a.entry(23), Some(0x0200_0000_0001_0042));
        assert_eq!(a.entry(24), None);
    }

    #[test]
    fn read_only_bits_do_not_change_on_writes() {
        let mut a = apic();
        let level = fixed(0x40, 1) | RTE_LEVEL;
        program(&mut a, 3, level);
        a.set_level(3, true);
        assert_eq!(rte(&mut a, 3), level | RTE_REMOTE_IRR);
        // The guest writes remote IRR clear and delivery status set.
        set_reg(&mut a, 0x10 + 6, (level | RTE_DELIVERY_STATUS) as u32);
        assert_eq!(rte(&mut a, 3), level | RTE_REMOTE_IRR, "remote IRR kept, delivery status still 0");
        set_reg(&mut a, 0x10 + 7, 0xffff_ffff);
        assert_eq!(rte(&mut a, 3) & RTE_READ_ONLY, RTE_REMOTE_IRR, "a high write keeps them too");
        // Remote IRR cannot be set by a write either.
        program(&mut a, 4, fixed(0x41, 1) | RTE_LEVEL | RTE_REMOTE_IRR | RTE_DELIVERY_STATUS);
        assert_eq!(rte(&mut a, 4) & RTE_READ_ONLY, 0);
        assert_eq!(sent(&a), 1);
    }

    #[test]
    fn an_edge_pin_sends_once_per_rising_edge() {
        let mut a = apic();
        program(&mut a, 4, fixed(0x34, 0));
        a.set_level(4, true);
        assert_eq!(a.sink().messages, vec![Msi { address: 0xfee0_0000, data: 0x4034 }]);
        a.set_level(4, true);
        assert_eq!(sent(&a), 1, "no new edge");
        a.set_level(4, false);
        assert_eq!(sent(&a), 1, "a falling edge sends nothing");
        for _ in 0..5 {
            a.set_level(4, true);
            a.set_level(4, false);
        }
        assert_eq!(sent(&a), 6, "every edge sends: nothing coalesces them");
        assert_eq!(rte(&mut a, 4) & RTE_REMOTE_IRR, 0, "edges never set remote IRR");
        a.eoi(0x34);
        assert_eq!(sent(&a), 6, "an EOI means nothing to an edge pin");
        let c = *a.stats();
        assert_eq!((c.messages, c.edge_messages, c.level_messages, c.per_pin[4], c.eois), (6, 6, 0, 6, 0));
    }

    #[test]
    fn a_level_pin_sends_once_until_eoi_and_again_while_asserted() {
        let mut a = apic();
        let e = fixed(0x51, 2) | RTE_LEVEL;
        program(&mut a, 9, e);
        a.set_level(9, true);
        assert_eq!(a.sink().messages, vec![Msi { address: 0xfee0_2000, data: 0xc051 }]);
        assert_eq!(rte(&mut a, 9), e | RTE_REMOTE_IRR);
        // Held asserted, pulsed, repeated: no flood before the EOI.
        a.set_level(9, true);
        a.set_level(9, false);
        a.set_level(9, true);
        assert_eq!(sent(&a), 1);
        a.eoi(0x52);
        assert_eq!((sent(&a), rte(&mut a, 9) & RTE_REMOTE_IRR), (1, RTE_REMOTE_IRR), "another vector's EOI");
        a.eoi(0x51);
        assert_eq!(sent(&a), 2, "still asserted: sent again");
        assert_eq!(rte(&mut a, 9) & RTE_REMOTE_IRR, RTE_REMOTE_IRR);
        a.set_level(9, false);
        a.eoi(0x51);
        assert_eq!(sent(&a), 2, "deasserted: nothing");
        assert_eq!(rte(&mut a, 9), e, "remote IRR clear");
        a.eoi(0x51);
        assert_eq!(a.stats().eois, 2, "an EOI with no remote IRR to clear is not counted");
        a.set_level(9, true);
        assert_eq!(sent(&a), 3, "asserted again");
        let c = *a.stats();
        assert_eq!((c.level_messages, c.eoi_resends, c.per_pin[9]), (3, 1, 3));
    }

    #[test]
    fn an_eoi_clears_every_level_entry_with_its_vector() {
        let mut a = apic();
        program(&mut a, 10, fixed(0x60, 0) | RTE_LEVEL);
        program(&mut a, 11, fixed(0x60, 1) | RTE_LEVEL);
        a.set_level(10, true);
        a.set_level(11, true);
        a.set_level(11, false);
        assert_eq!(sent(&a), 2);
        a.eoi(0x60);
        assert_eq!(sent(&a), 3, "pin 10 still asserted, pin 11 not");
        assert_eq!(rte(&mut a, 11) & RTE_REMOTE_IRR, 0);
        assert_eq!(a.sink().messages[2].address, 0xfee0_0000, "pin 10's message");
    }

    #[test]
    fn masked_pins_send_nothing_and_a_level_sends_on_unmask() {
        let mut a = apic();
        program(&mut a, 1, fixed(0x31, 0) | RTE_MASKED);
        a.set_level(1, true);
        a.set_level(1, false);
        assert_eq!((sent(&a), a.stats().masked_edges), (0, 1), "an edge on a masked pin is lost, counted");
        a.set_level(1, true);
        program(&mut a, 1, fixed(0x31, 0));
        assert_eq!(sent(&a), 0, "unmasking does not bring a lost edge back");
        assert_eq!(a.stats().masked_edges, 2);

        program(&mut a, 2, fixed(0x32, 0) | RTE_LEVEL | RTE_MASKED);
        a.set_level(2, true);
        assert_eq!(sent(&a), 0);
        assert_eq!(rte(&mut a, 2) & RTE_REMOTE_IRR, 0);
        program(&mut a, 2, fixed(0x32, 0) | RTE_LEVEL);
        assert_eq!(sent(&a), 1, "unmasked while asserted: sent");
        assert_eq!(rte(&mut a, 2) & RTE_REMOTE_IRR, RTE_REMOTE_IRR);
        program(&mut a, 2, fixed(0x32, 0) | RTE_LEVEL);
        assert_eq!(sent(&a), 1, "rewriting the entry with remote IRR set sends nothing");

        // Masked at the EOI: sent when unmasked.
        program(&mut a, 2, fixed(0x32, 0) | RTE_LEVEL | RTE_MASKED);
        a.eoi(0x32);
        assert_eq!((sent(&a), rte(&mut a, 2) & RTE_REMOTE_IRR), (1, 0));
        program(&mut a, 2, fixed(0x32, 0) | RTE_LEVEL);
        assert_eq!(sent(&a), 2);
        // Deasserted while masked: nothing on unmask.
        program(&mut a, 2, fixed(0x32, 0) | RTE_LEVEL | RTE_MASKED);
        a.eoi(0x32);
        a.set_level(2, false);
        program(&mut a, 2, fixed(0x32, 0) | RTE_LEVEL);
        assert_eq!(sent(&a), 2);
    }

    #[test]
    fn an_active_low_pin_is_asserted_when_its_input_is_low() {
        let mut a = apic();
        // Level, active low, input high (idle): nothing on unmask.
        a.set_level(5, true);
        program(&mut a, 5, fixed(0x45, 0) | RTE_LEVEL | RTE_ACTIVE_LOW);
        assert_eq!(sent(&a), 0);
        a.set_level(5, false);
        assert_eq!(sent(&a), 1, "driven low: asserted");
        a.eoi(0x45);
        assert_eq!(sent(&a), 2, "still low");
        a.set_level(5, true);
        a.eoi(0x45);
        assert_eq!(sent(&a), 2, "high again: deasserted");
        // Edge, active low: the falling input edge sends.
        program(&mut a, 6, fixed(0x46, 0) | RTE_ACTIVE_LOW);
        a.set_level(6, true);
        assert_eq!(sent(&a), 2);
        a.set_level(6, false);
        assert_eq!(sent(&a), 3);
        assert_eq!(a.sink().messages[2].data & MSI_DATA_LEVEL, 0, "polarity does not show in the message");
        // A level pin at reset polarity with its input low: idle, until
        // the guest turns its polarity: asserted.
        program(&mut a, 7, fixed(0x47, 0) | RTE_LEVEL);
        assert_eq!(sent(&a), 3);
        program(&mut a, 7, fixed(0x47, 0) | RTE_LEVEL | RTE_ACTIVE_LOW);
        assert_eq!(sent(&a), 4);
    }

    #[test]
    fn the_eoi_register_is_an_eoi() {
        let mut a = apic();
        program(&mut a, 12, fixed(0x70, 0) | RTE_LEVEL);
        a.set_level(12, true);
        w(&mut a, EOI, 0x71);
        assert_eq!((sent(&a), rte(&mut a, 12) & RTE_REMOTE_IRR), (1, RTE_REMOTE_IRR));
        w(&mut a, EOI, 0xffff_ff70);
        assert_eq!(sent(&a), 2, "bits 0-7 are the vector");
        a.set_level(12, false);
        w(&mut a, EOI, 0x70);
        assert_eq!((sent(&a), rte(&mut a, 12) & RTE_REMOTE_IRR), (2, 0));
    }

    #[test]
    fn making_an_entry_edge_triggered_clears_remote_irr() {
        // Linux's EOI on an I/O APIC without the EOI register: mask, edge,
        // level, unmask.
        let mut a = apic();
        let e = fixed(0x48, 0) | RTE_LEVEL;
        program(&mut a, 8, e);
        a.set_level(8, true);
        assert_eq!(rte(&mut a, 8), e | RTE_REMOTE_IRR);
        program(&mut a, 8, e | RTE_MASKED);
        assert_eq!(rte(&mut a, 8), e | RTE_MASKED | RTE_REMOTE_IRR, "masking keeps it");
        program(&mut a, 8, (e & !RTE_LEVEL) | RTE_MASKED);
        assert_eq!(rte(&mut a, 8) & RTE_REMOTE_IRR, 0, "edge: cleared");
        program(&mut a, 8, e | RTE_MASKED);
        program(&mut a, 8, e);
        assert_eq!(sent(&a), 2, "still asserted: sent on unmask");
    }

    #[test]
    fn vectors_below_16_and_reserved_modes_send_nothing_and_are_counted() {
        let mut a = apic();
        program(&mut a, 0, fixed(0x0f, 0) | RTE_LEVEL);
        a.set_level(0, true);
        assert_eq!((sent(&a), a.stats().bad_vector), (0, 1));
        assert_eq!(rte(&mut a, 0) & RTE_REMOTE_IRR, 0, "nothing taken: remote IRR clear");
        a.set_level(0, true);
        assert_eq!(a.stats().bad_vector, 1, "a repeated level is no new attempt");
        program(&mut a, 1, fixed(0x05, 0) | mode(1));
        a.set_level(1, true);
        assert_eq!((sent(&a), a.stats().bad_vector), (0, 2), "lowest priority too");
        program(&mut a, 2, fixed(0x10, 0));
        a.set_level(2, true);
        assert_eq!(sent(&a), 1, "16 is the first vector");
        for (pin, m) in [(3u8, 3u64), (4, 6)] {
            program(&mut a, pin, fixed(0x80, 0) | mode(m));
            a.set_level(u32::from(pin), true);
        }
        program(&mut a, 5, fixed(0x80, 0) | mode(3) | RTE_LEVEL);
        a.set_level(5, true);
        assert_eq!(rte(&mut a, 5) & RTE_REMOTE_IRR, 0);
        assert_eq!((sent(&a), a.stats().reserved_mode), (1, 3));
        // NMI, SMI, INIT, ExtINT ignore the vector: 0 is fine.
        for (pin, m) in [(6u8, 2u64), (7, 4), (8, 5), (9, 7)] {
            program(&mut a, pin, mode(m));
            a.set_level(u32::from(pin), true);
        }
        assert_eq!((sent(&a), a.stats().bad_vector), (5, 2));
        assert_eq!(msi_of(fixed(0x0f, 0)), Err(Refused::BadVector));
        assert_eq!(msi_of(mode(6)), Err(Refused::ReservedMode));
        assert_eq!(a.routes()[0], None, "a refused entry has no route");
        assert_eq!(a.routes()[2], Some(Msi { address: 0xfee0_0000, data: 0x4010 }));
    }

    #[test]
    fn messages_are_encoded_as_the_local_apic_takes_them() {
        // (entry, address, data)
        let cases = [
            // Fixed, physical, edge, to APIC 3.
            (fixed(0x31, 3), 0xfee0_3000, 0x0000_4031),
            // Fixed, physical, level, broadcast.
            (fixed(0x31, 0xff) | RTE_LEVEL, 0xfeef_f000, 0x0000_c031),
            // Fixed, logical, edge, to APICs 0x0f.
            (fixed(0x41, 0x0f) | RTE_DEST_LOGICAL, 0xfee0_f004, 0x0000_4041),
            // Lowest priority, logical, level: redirection hint.
            (fixed(0x51, 0x0f) | RTE_DEST_LOGICAL | mode(1) | RTE_LEVEL, 0xfee0_f00c, 0x0000_c151),
            // Lowest priority, physical, edge.
            (fixed(0x52, 0x01) | mode(1), 0xfee0_1008, 0x0000_4152),
            // SMI, NMI, INIT, ExtINT: edge whatever the trigger bit says.
            (fixed(0, 0x01) | mode(2), 0xfee0_1000, 0x0000_4200),
            (fixed(0, 0x02) | mode(4) | RTE_LEVEL, 0xfee0_2000, 0x0000_4400),
            (fixed(0, 0x03) | mode(5) | RTE_DEST_LOGICAL, 0xfee0_3004, 0x0000_4500),
            (fixed(0x20, 0x00) | mode(7) | RTE_LEVEL, 0xfee0_0000, 0x0000_4720),
            // Polarity and the mask do not show.
            (fixed(0x99, 0x80) | RTE_ACTIVE_LOW | RTE_MASKED, 0xfee8_0000, 0x0000_4099),
        ];
        for (entry, address, data) in cases {
            assert_eq!(msi_of(entry), Ok(Msi { address, data }), "entry {entry:#x}");
        }
        // And through the pins: an NMI programmed level sends each edge and
        // never sets remote IRR.
        let mut a = apic();
        program(&mut a, 2, fixed(0, 1) | mode(4) | RTE_LEVEL);
        a.set_level(2, true);
        a.set_level(2, true);
        a.set_level(2, false);
        a.set_level(2, true);
        assert_eq!(a.sink().messages, vec![Msi { address: 0xfee0_1000, data: 0x4400 }; 2]);
        assert_eq!(rte(&mut a, 2) & RTE_REMOTE_IRR, 0);
        program(&mut a, 3, fixed(0x51, 0x0f) | RTE_DEST_LOGICAL | mode(1) | RTE_LEVEL);
        a.set_level(3, true);
        assert_eq!(a.sink().messages[2], Msi { address: 0xfee0_f00c, data: 0xc151 });
    }

    #[test]
    fn the_bound_holds_back_what_a_pin_sends_past_it_and_sends_it_once() {
        let t0 = Instant::now();
        let mut a = IoApic::new(Some(BASE), CountingMsi::default(), t0);
        a.set_bound(Some(DeliveryBound { per_pin: 2, window: Duration::from_millis(1) }));
        assert_eq!(a.tick(t0), None);
        program(&mut a, 0, fixed(0x30, 0));
        for _ in 0..5 {
            a.set_level(0, true);
            a.set_level(0, false);
        }
        assert_eq!(sent(&a), 2);
        assert_eq!(a.stats().deferred, 1, "held back once");
        let due = a.tick(t0 + Duration::from_micros(500)).expect("something held back");
        assert_eq!(due, t0 + Duration::from_millis(1));
        assert_eq!(a.tick(due), None, "sent, nothing left");
        assert_eq!(sent(&a), 3, "the held-back edges as one");
        // A level storm: EOIs faster than the bound.
        program(&mut a, 1, fixed(0x31, 0) | RTE_LEVEL);
        a.set_level(1, true);
        a.eoi(0x31);
        a.eoi(0x31);
        assert_eq!(sent(&a), 5);
        assert_eq!(rte(&mut a, 1) & RTE_REMOTE_IRR, 0, "held back: not sent, not pending");
        let due = a.tick(due).expect("held back");
        a.set_level(1, false);
        assert_eq!(a.tick(due), None);
        assert_eq!(sent(&a), 5, "deasserted before the window turned: nothing");
        // Without a bound, what was held back goes at the next tick.
        a.set_level(0, true);
        a.set_level(0, false);
        a.set_level(0, true);
        a.set_level(0, false);
        a.set_level(0, true);
        assert_eq!(sent(&a), 7);
        a.set_bound(None);
        assert_eq!(a.tick(due), None);
        assert_eq!(sent(&a), 8);
    }

    #[test]
    fn state_round_trips_and_the_restored_model_carries_on() {
        let t0 = Instant::now();
        let mut a = apic();
        set_reg(&mut a, REG_ID, 0x0300_0000);
        program(&mut a, 9, fixed(0x51, 2) | RTE_LEVEL);
        program(&mut a, 4, fixed(0x34, 1) | RTE_ACTIVE_LOW);
        a.set_level(9, true);
        a.set_level(4, true);
        w(&mut a, IOREGSEL, 0x13);
        let s = Persist::save(&a);
        assert_eq!(s.id, 3);
        assert_eq!(s.ioregsel, 0x13);
        assert_eq!(s.inputs, 1 << 9 | 1 << 4);
        assert_eq!(s.redirection[9], fixed(0x51, 2) | RTE_LEVEL | RTE_REMOTE_IRR);
        let DeviceState::IoApic(back) = Device::save(&a) else { panic!("not an I/O APIC's") };
        assert_eq!(back, s);
        assert_eq!(Device::save(&a).model(), "ioapic");
        let mut b = IoApic::restore((Some(BASE), CountingMsi::default(), t0), back).unwrap();
        assert_eq!(Persist::save(&b), s);
        assert_eq!(sent(&b), 0, "restoring sends nothing");
        assert_eq!(r(&mut b, IOREGSEL), 0x13);
        b.eoi(0x51);
        assert_eq!(sent(&b), 1, "still asserted: the EOI sends");
        b.set_level(4, false);
        assert_eq!(b.sink().messages[1], Msi { address: 0xfee0_1000, data: 0x4034 }, "active-low edge");
    }

    #[test]
    fn bad_states_are_refused_not_run() {
        let t0 = Instant::now();
        let good = IoApicState {
            redirection: {
                let mut r = vec![RTE_RESET; PINS];
                r[1] = fixed(0x40, 1) | RTE_LEVEL | RTE_REMOTE_IRR;
                r[2] = mode(3);
                r
            },
            inputs: 1 << 23,
            deferred: 1 << 1,
            ..IoApicState::default()
        };
        assert!(IoApic::restore((Some(BASE), CountingMsi::default(), t0), good.clone()).is_ok());
        let with = |pin: usize, e: u64| {
            let mut s = good.clone();
            s.redirection[pin] = e;
            s
        };
        let cases = [
            (IoApicState { redirection: vec![RTE_RESET; PINS - 1], ..good.clone() }, "23 redirection entries"),
            (IoApicState { redirection: vec![RTE_RESET; PINS + 1], ..good.clone() }, "25 redirection entries"),
            (IoApicState { redirection: Vec::new(), ..good.clone() }, "0 redirection entries"),
            (IoApicState { id: 0x10, ..good.clone() }, "wider than 4 bits"),
            (IoApicState { inputs: 1 << 24, ..good.clone() }, "past 23"),
            (IoApicState { deferred: 1 << 31, ..good.clone() }, "past 23"),
            (with(0, RTE_RESET | 1 << 17), "reserved bits"),
            (with(0, 1 << 55), "reserved bits"),
            (with(0, RTE_DELIVERY_STATUS), "a message pending"),
            (with(0, fixed(0x40, 0) | RTE_REMOTE_IRR), "edge-triggered with remote IRR"),
            (with(0, mode(4) | RTE_LEVEL | RTE_REMOTE_IRR), "edge-triggered with remote IRR"),
        ];
        for (bad, why) in cases {
            let err = IoApic::restore((Some(BASE), CountingMsi::default(), t0), bad.clone()).err();
            let err = err.unwrap_or_else(|| panic!("{bad:?} was taken"));
            assert!(err.to_string().contains(why), "{err} (wanted {why:?})");
            assert!(err.to_string().starts_with("The saved ioapic state is invalid"), "{err}");
        }
    }

    #[test]
    fn only_32_bit_accesses_in_the_window_are_decoded() {
        let mut a = apic();
        program(&mut a, 0, fixed(0x30, 0));
        for size in [AccessSize::B1, AccessSize::B2, AccessSize::B8] {
            assert_eq!(a.read(Space::Mmio, BASE, size), None, "{size:?}");
            assert!(!a.write(Space::Mmio, BASE, size, 0x12), "{size:?}");
        }
        assert_eq!(a.read(Space::Mmio, BASE + 2, AccessSize::B4), None, "unaligned");
        assert_eq!(a.read(Space::Mmio, BASE + WINDOW, AccessSize::B4), None, "past the window");
        assert_eq!(a.read(Space::Mmio, BASE - 4, AccessSize::B4), None, "below it");
        assert_eq!(a.read(Space::Pio, 0xfec0, AccessSize::B4), None, "no ports");
        assert_eq!(a.stats().bad_access, 10);
        assert_eq!(r(&mut a, IOREGSEL), 0x10, "nothing changed: the last selection");
        assert_eq!(r(&mut a, 0x20), 0, "other offsets read 0");
        w(&mut a, 0x30, 0xffff_ffff);
        // The window decodes its low byte, as QEMU's and KVM's do.
        assert!(a.write(Space::Mmio, BASE + 0x300, AccessSize::B4, 0x11));
        assert_eq!(r(&mut a, 0x310), 0, "pin 0's high half through an alias");
        assert_eq!(r(&mut a, IOREGSEL), 0x11);
        let mut nowhere = IoApic::new(None, CountingMsi::default(), Instant::now());
        assert_eq!(nowhere.read(Space::Mmio, BASE, AccessSize::B4), None, "no window: nothing decoded");
        // Pins past the last are counted, not a panic.
        a.set_level(24, true);
        a.set_level(u32::MAX, true);
        assert_eq!(a.stats().bad_pin, 2);
        assert_eq!(Persist::save(&a).inputs, 0);
        let names: Vec<&str> = Device::counters(&a).iter().map(|&(n, _)| n).collect();
        for n in ["messages", "bad_vector", "reserved_mode", "masked_edges", "deferred", "bad_access", "bad_pin"] {
            assert!(names.contains(&n), "{n}");
        }
        assert_eq!(a.kind(), "ioapic");
    }

    #[test]
    fn drop_msi_counts_what_it_drops() {
        let mut a = IoApic::new(Some(BASE), DropMsi::default(), Instant::now());
        assert!(a.write(Space::Mmio, BASE, AccessSize::B4, 0x10));
        assert!(a.write(Space::Mmio, BASE + IOWIN, AccessSize::B4, 0x30));
        a.set_level(0, true);
        assert_eq!((a.sink().dropped, a.stats().messages), (1, 1));
    }
}
