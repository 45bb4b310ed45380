//! The control panel's data: client platforms, servers, VMs and devices,
//! and the changes that edit them — each checked before it is applied, so
//! the database is never left with a duplicate, a dangling reference or
//! two devices of a VM on the same addresses.
//!
//! Every record is also checked on its own ([`ClientPlatform::validate`],
//! [`Vm::validate`], ...): string lengths, id and size ranges, address
//! ranges that cannot overflow. A change is checked before it is written
//! and a record is checked again when it is read back
//! (`store::read_record`), so a corrupt or hostile record in a store is a
//! one-line error, never a panic or a huge allocation downstream. The
//! limits are the `MAX_*` constants below.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest VM image (a kernel's path or a test guest's name), in bytes.
pub const MAX_IMAGE_LEN: usize = 4096;
/// Longest short name (a device kind, a hypervisor kind), in bytes.
pub const MAX_NAME_LEN: usize = 32;
/// Most vCPUs of a VM.
pub const MAX_VCPUS: u16 = 255;
/// Most memory of a VM, in MiB (64 GiB).
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;
/// Most test-guest arguments (rdi, rsi, rdx).
pub const MAX_ARGS: usize = 3;
/// Most address ranges of a device.
pub const MAX_RANGES: usize = 16;
/// Longest MMIO range (16 MiB): models allocate what they decode.
pub const MAX_MMIO_LEN: u64 = 16 << 20;
/// The port space: a port range ends at or before it.
pub const PIO_SPACE: u64 = 0x1_0000;
/// Most interrupt lines of a device.
pub const MAX_IRQS: usize = 8;
/// Interrupt lines are the IOAPIC's pins, 0 to 23.
pub const IRQ_LINES: u32 = 24;
/// Largest stored record, in bytes (a record within the limits above is
/// well under it): a larger one is refused before it is parsed.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// A client platform: a host running VMs through the KVM shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientPlatform {
    pub id: u16,
    /// MAC of its data-plane interface, e.g. "02:00:00:00:00:01".
    pub mac: String,
    pub hypervisor: u16,
    /// "kvm" for the shim.
    pub hypervisor_kind: String,
}

/// What a server does for the placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerRole {
    /// Clients send to it; it forwards what it does not hold.
    Owner,
    /// Holds device models; answers clients directly.
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub id: u16,
    pub mac: String,
    pub role: ServerRole,
}

/// Where a VM's interrupt controllers are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IrqChip {
    /// KVM's in the client's kernel: PICs, I/O APIC and PIT (the default).
    #[default]
    Kernel,
    /// KVM's split irqchip: the local APICs in the client's kernel, the I/O
    /// APIC a device model (kind "ioapic") of the VM on a server. The lines
    /// of the VM's devices on every server drive that model's pins.
    Remote,
}

impl IrqChip {
    pub fn is_kernel(&self) -> bool {
        *self == IrqChip::Kernel
    }
}

impl fmt::Display for IrqChip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IrqChip::Kernel => "kernel",
            IrqChip::Remote => "remote",
        })
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Defined,
    Running,
    Suspended,
    Stopped,
    Migrating,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: u32,
    /// The client platform it runs on.
    pub client: u16,
    pub vcpus: u16,
    pub memory_mib: u32,
    /// A test guest's name or a kernel's path.
    pub image: String,
    pub state: VmState,
    /// The owner server its requests go to, which forwards each to the
    /// server holding the device; None: straight to each device's server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u16>,
    /// A test guest's rdi, rsi, rdx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<u64>,
    /// While migrating: the client platform it is moving to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_to: Option<u16>,
    /// Its interrupt controllers (records written before VMs had one load
    /// as `kernel`).
    #[serde(default, skip_serializing_if = "IrqChip::is_kernel")]
    pub irqchip: IrqChip,
}

/// What `dmfabric ctl vm ...` asks of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Launch,
    Suspend,
    Resume,
    Shutdown,
    /// Move it to this client platform.
    Migrate(u16),
}

impl Vm {
    /// The VM after `action`, or why it cannot be done in its state.
    pub fn after(&self, action: Lifecycle) -> Result<Vm, Conflict> {
        use VmState::*;
        let refuse =
            |what: &str| Err(Conflict::Invalid(format!("VM {} is {:?}: cannot {what} it", self.id, self.state)));
        let state = |state| Ok(Vm { state, ..self.clone() });
        match (action, self.state) {
            (Lifecycle::Launch, Defined | Stopped) => state(Running),
            (Lifecycle::Launch, _) => refuse("launch"),
            (Lifecycle::Suspend, Running) => state(Suspended),
            (Lifecycle::Suspend, _) => refuse("suspend"),
            (Lifecycle::Resume, Suspended) => state(Running),
            (Lifecycle::Resume, _) => refuse("resume"),
            (Lifecycle::Shutdown, Defined | Running | Suspended) => state(Stopped),
            (Lifecycle::Shutdown, _) => refuse("shut down"),
            (Lifecycle::Migrate(to), _) if to == self.client => {
                Err(Conflict::Invalid(format!("VM {} already runs on client platform {to}", self.id)))
            }
            (Lifecycle::Migrate(to), Running | Suspended) => {
                Ok(Vm { state: Migrating, migrate_to: Some(to), ..self.clone() })
            }
            (Lifecycle::Migrate(_), _) => refuse("migrate"),
        }
    }
}

/// An address range of a device: port or MMIO, base and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub mmio: bool,
    pub base: u64,
    pub len: u64,
}

impl Range {
    fn overlaps(&self, o: &Range) -> bool {
        self.mmio == o.mmio && self.base < o.base.saturating_add(o.len) && o.base < self.base.saturating_add(self.len)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = if self.mmio { "mmio" } else { "pio" };
        write!(f, "{space} {:#x}+{:#x}", self.base, self.len)
    }
}

/// A virtio-blk's disk: a raw image file on the server that holds the
/// device, which opens it when it builds the model.
///
/// The path is the server's: a device moved to another server (its
/// model's state moves through the store) is opened there at the same
/// path, so a virtio-blk that may move keeps its image on storage every
/// such server mounts at the same place. A server that cannot open it
/// says so (path and server) and runs the device as an empty drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockImage {
    /// An absolute path, 1 to [`MAX_IMAGE_LEN`] bytes, no control characters.
    pub path: String,
    /// The guest sees a read-only disk; the server opens the file read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl fmt::Display for BlockImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if self.read_only {
            f.write_str(" (read-only)")?;
        }
        Ok(())
    }
}

/// The one model kind with an image.
pub const VIRTIO_BLK: &str = "virtio-blk";
/// A virtio-blk's window: `VIRTIO_MMIO_LEN` bytes at a base aligned to it.
pub const VIRTIO_BLK_WINDOW: u64 = dmfabric_devices::platform::pc::VIRTIO_MMIO_LEN as u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: u32,
    /// A model kind: uart, rtc, i8042, timer, regfile, irqtest, virtio-blk.
    pub kind: String,
    /// The server holding the model.
    pub server: u16,
    pub shard: u32,
    /// The VM it belongs to.
    pub vm: u32,
    pub ranges: Vec<Range>,
    pub irqs: Vec<u32>,
    /// A virtio-blk's image (and only a virtio-blk's). Records written
    /// before devices had images load without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<BlockImage>,
}

fn check_name(what: &str, id: u64, field: &str, value: &str) -> Result<(), Conflict> {
    if value.is_empty() || value.len() > MAX_NAME_LEN || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Conflict::Invalid(format!(
            "{what} {id}: {field} must be 1 to {MAX_NAME_LEN} printable ASCII characters"
        )));
    }
    Ok(())
}

impl ClientPlatform {
    /// Check the record on its own (its references are [`Db::check`]'s).
    pub fn validate(&self) -> Result<(), Conflict> {
        check_mac(&self.mac)?;
        check_name("client platform", self.id.into(), "hypervisor_kind", &self.hypervisor_kind)
    }
}

impl Server {
    /// Check the record on its own.
    pub fn validate(&self) -> Result<(), Conflict> {
        check_mac(&self.mac)
    }
}

impl Vm {
    /// Check the record on its own (its references are [`Db::check`]'s).
    pub fn validate(&self) -> Result<(), Conflict> {
        let bad = |what: String| Err(Conflict::Invalid(format!("VM {}: {what}", self.id)));
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return bad(format!("vcpus must be 1 to {MAX_VCPUS}, not {}", self.vcpus));
        }
        if !(1..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return bad(format!("memory_mib must be 1 to {MAX_MEMORY_MIB}, not {}", self.memory_mib));
        }
        if self.image.is_empty() || self.image.len() > MAX_IMAGE_LEN || self.image.contains('\0') {
            return bad(format!(
                "image must be 1 to {MAX_IMAGE_LEN} bytes without NUL, not {} bytes",
                self.image.len()
            ));
        }
        if self.args.len() > MAX_ARGS {
            return bad(format!("at most {MAX_ARGS} arguments (rdi, rsi, rdx), not {}", self.args.len()));
        }
        if (self.state == VmState::Migrating) != self.migrate_to.is_some() {
            return bad("a migrating VM names the client platform it moves to, and only it".into());
        }
        Ok(())
    }
}

impl Range {
    /// Why this range cannot be a device's, if it cannot: empty, past the
    /// end of its space (port ranges end at [`PIO_SPACE`]; `base + len`
    /// never overflows) or an MMIO range longer than [`MAX_MMIO_LEN`].
    pub fn validate(&self) -> Result<(), String> {
        let end = self.base.checked_add(self.len);
        let ok = self.len > 0
            && match (self.mmio, end) {
                (_, None) => false,
                (false, Some(end)) => end <= PIO_SPACE,
                (true, Some(_)) => self.len <= MAX_MMIO_LEN,
            };
        if ok {
            return Ok(());
        }
        Err(if self.mmio {
            format!("bad range {self}: an MMIO range is 1 byte to {} MiB and ends within 64 bits", MAX_MMIO_LEN >> 20)
        } else {
            format!("bad range {self}: a port range is at least 1 port and ends at or before {PIO_SPACE:#x}")
        })
    }
}

impl Device {
    /// Check the record on its own (its references and overlaps are
    /// [`Db::check`]'s).
    pub fn validate(&self) -> Result<(), Conflict> {
        let bad = |what: String| Err(Conflict::Invalid(format!("device {}: {what}", self.id)));
        if self.id == 0 {
            return Err(Conflict::Invalid("device id 0 is reserved (any device at an address)".into()));
        }
        if !dmfabric_devices::DeviceKind::NAMES.contains(&self.kind.as_str()) {
            let shown: String = self.kind.chars().take(MAX_NAME_LEN).collect();
            return bad(format!("unknown kind {shown:?} ({})", dmfabric_devices::DeviceKind::NAMES.join(", ")));
        }
        if self.ranges.len() > MAX_RANGES {
            return bad(format!("at most {MAX_RANGES} address ranges, not {}", self.ranges.len()));
        }
        for r in &self.ranges {
            r.validate().or_else(bad)?;
        }
        if self.irqs.len() > MAX_IRQS {
            return bad(format!("at most {MAX_IRQS} interrupt lines, not {}", self.irqs.len()));
        }
        if let Some(line) = self.irqs.iter().find(|l| **l >= IRQ_LINES) {
            return bad(format!("interrupt line {line} does not exist (lines are 0 to {})", IRQ_LINES - 1));
        }
        if self.kind != VIRTIO_BLK {
            if self.image.is_some() {
                return bad(format!("an image is for a virtio-blk, not a {}", self.kind));
            }
            return Ok(());
        }
        let window = match self.ranges.as_slice() {
            [r] => r.mmio && r.len == VIRTIO_BLK_WINDOW && r.base % VIRTIO_BLK_WINDOW == 0,
            _ => false,
        };
        if !window {
            let ranges: Vec<String> = self.ranges.iter().map(ToString::to_string).collect();
            return bad(format!(
                "a virtio-blk has one MMIO window of {VIRTIO_BLK_WINDOW:#x} bytes at a {VIRTIO_BLK_WINDOW}-byte aligned base and no ports, not [{}]",
                ranges.join(", ")
            ));
        }
        if self.irqs.len() > 1 {
            return bad(format!("a virtio-blk raises one interrupt line, not {}", self.irqs.len()));
        }
        let Some(image) = &self.image else {
            return bad("a virtio-blk needs an image (the absolute path of a raw image file on its server)".into());
        };
        image.validate().or_else(bad)
    }
}

impl BlockImage {
    /// Why this cannot be an image's path, if it cannot (a hostile path is
    /// not echoed whole).
    pub fn validate(&self) -> Result<(), String> {
        let path = &self.path;
        if path.is_empty() || path.len() > MAX_IMAGE_LEN {
            return Err(format!("an image path is 1 to {MAX_IMAGE_LEN} bytes, not {}", path.len()));
        }
        if path.chars().any(char::is_control) {
            return Err("an image path has no control characters".into());
        }
        if !path.starts_with('/') {
            let shown: String = path.chars().take(64).collect();
            return Err(format!("image {shown:?}: the path must be absolute (its server opens it)"));
        }
        Ok(())
    }
}

/// One edit of the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    AddClient(ClientPlatform),
    AddServer(Server),
    AddVm(Vm),
    AddDevice(Device),
    /// Replace a record that exists (same id).
    UpdateVm(Vm),
    UpdateDevice(Device),
    RemoveClient(u16),
    RemoveServer(u16),
    RemoveVm(u32),
    RemoveDevice(u32),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::AddClient(c) => write!(f, "added client platform {} ({})", c.id, c.mac),
            Change::AddServer(s) => write!(f, "added server {} ({:?}, {})", s.id, s.role, s.mac),
            Change::AddVm(v) => write!(f, "added VM {} on client platform {}", v.id, v.client),
            Change::AddDevice(d) => {
                write!(f, "added device {} ({}) of VM {} on server {}", d.id, d.kind, d.vm, d.server)?;
                match &d.image {
                    Some(image) => write!(f, ", image {image}"),
                    None => Ok(()),
                }
            }
            Change::UpdateVm(v) => write!(f, "updated VM {} (client platform {}, {:?})", v.id, v.client, v.state),
            Change::UpdateDevice(d) => write!(f, "updated device {} (server {}, shard {})", d.id, d.server, d.shard),
            Change::RemoveClient(id) => write!(f, "removed client platform {id}"),
            Change::RemoveServer(id) => write!(f, "removed server {id}"),
            Change::RemoveVm(id) => write!(f, "removed VM {id}"),
            Change::RemoveDevice(id) => write!(f, "removed device {id}"),
        }
    }
}

/// Why a change was refused: names the conflict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("{what} {id} already exists")]
    Exists { what: &'static str, id: u64 },
    #[error("{what} {id} does not exist")]
    Missing { what: &'static str, id: u64 },
    #[error("{what} {id} refers to {target} {target_id}, which does not exist")]
    Dangling { what: &'static str, id: u64, target: &'static str, target_id: u64 },
    #[error("{what} {id} is still used by {user} {user_id}: move or remove that first")]
    InUse { what: &'static str, id: u64, user: &'static str, user_id: u64 },
    #[error("device {id}'s {range} overlaps device {other}'s {other_range} in VM {vm}")]
    Overlap { id: u32, range: Range, other: u32, other_range: Range, vm: u32 },
    #[error("{0}")]
    Invalid(String),
}

/// The whole database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Db {
    pub clients: BTreeMap<u16, ClientPlatform>,
    pub servers: BTreeMap<u16, Server>,
    pub vms: BTreeMap<u32, Vm>,
    pub devices: BTreeMap<u32, Device>,
}

fn check_mac(mac: &str) -> Result<(), Conflict> {
    if mac.parse::<dmfabric_wire::MacAddr>().is_ok() && mac.len() == 17 {
        Ok(())
    } else {
        Err(Conflict::Invalid(format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")))
    }
}

impl Db {
    /// Check `change` against the database as it is.
    pub fn check(&self, change: &Change) -> Result<(), Conflict> {
        match change {
            Change::AddClient(c) => {
                if self.clients.contains_key(&c.id) {
                    return Err(Conflict::Exists { what: "client platform", id: c.id.into() });
                }
                c.validate()
            }
            Change::AddServer(s) => {
                if self.servers.contains_key(&s.id) {
                    return Err(Conflict::Exists { what: "server", id: s.id.into() });
                }
                s.validate()
            }
            Change::AddVm(v) | Change::UpdateVm(v) => {
                v.validate()?;
                let exists = self.vms.contains_key(&v.id);
                if matches!(change, Change::AddVm(_)) && exists {
                    return Err(Conflict::Exists { what: "VM", id: v.id.into() });
                }
                if matches!(change, Change::UpdateVm(_)) && !exists {
                    return Err(Conflict::Missing { what: "VM", id: v.id.into() });
                }
                if !self.clients.contains_key(&v.client) {
                    return Err(Conflict::Dangling {
                        what: "VM",
                        id: v.id.into(),
                        target: "client platform",
                        target_id: v.client.into(),
                    });
                }
                if let Some(to) = v.migrate_to.filter(|c| !self.clients.contains_key(c)) {
                    return Err(Conflict::Dangling {
                        what: "VM",
                        id: v.id.into(),
                        target: "client platform",
                        target_id: to.into(),
                    });
                }
                if let Some(owner) = v.owner.filter(|o| !self.servers.contains_key(o)) {
                    return Err(Conflict::Dangling {
                        what: "VM",
                        id: v.id.into(),
                        target: "server",
                        target_id: owner.into(),
                    });
                }
                Ok(())
            }
            Change::AddDevice(d) | Change::UpdateDevice(d) => {
                let exists = self.devices.contains_key(&d.id);
                if matches!(change, Change::AddDevice(_)) && exists {
                    return Err(Conflict::Exists { what: "device", id: d.id.into() });
                }
                if matches!(change, Change::UpdateDevice(_)) && !exists {
                    return Err(Conflict::Missing { what: "device", id: d.id.into() });
                }
                d.validate()?;
                if !self.servers.contains_key(&d.server) {
                    return Err(Conflict::Dangling {
                        what: "device",
                        id: d.id.into(),
                        target: "server",
                        target_id: d.server.into(),
                    });
                }
                if !self.vms.contains_key(&d.vm) {
                    return Err(Conflict::Dangling {
                        what: "device",
                        id: d.id.into(),
                        target: "VM",
                        target_id: d.vm.into(),
                    });
                }
                for other in self.devices.values().filter(|o| o.vm == d.vm && o.id != d.id) {
                    for r in &d.ranges {
                        if let Some(o) = other.ranges.iter().find(|o| r.overlaps(o)) {
                            return Err(Conflict::Overlap {
                                id: d.id,
                                range: *r,
                                other: other.id,
                                other_range: *o,
                                vm: d.vm,
                            });
                        }
                    }
                }
                Ok(())
            }
            Change::RemoveClient(id) => {
                if !self.clients.contains_key(id) {
                    return Err(Conflict::Missing { what: "client platform", id: (*id).into() });
                }
                match self.vms.values().find(|v| v.client == *id || v.migrate_to == Some(*id)) {
                    Some(v) => Err(Conflict::InUse {
                        what: "client platform",
                        id: (*id).into(),
                        user: "VM",
                        user_id: v.id.into(),
                    }),
                    None => Ok(()),
                }
            }
            Change::RemoveServer(id) => {
                if !self.servers.contains_key(id) {
                    return Err(Conflict::Missing { what: "server", id: (*id).into() });
                }
                if let Some(d) = self.devices.values().find(|d| d.server == *id) {
                    return Err(Conflict::InUse {
                        what: "server",
                        id: (*id).into(),
                        user: "device",
                        user_id: d.id.into(),
                    });
                }
                match self.vms.values().find(|v| v.owner == Some(*id)) {
                    Some(v) => {
                        Err(Conflict::InUse { what: "server", id: (*id).into(), user: "VM", user_id: v.id.into() })
                    }
                    None => Ok(()),
                }
            }
            Change::RemoveVm(id) => {
                if !self.vms.contains_key(id) {
                    return Err(Conflict::Missing { what: "VM", id: (*id).into() });
                }
                match self.devices.values().find(|d| d.vm == *id) {
                    Some(d) => {
                        Err(Conflict::InUse { what: "VM", id: (*id).into(), user: "device", user_id: d.id.into() })
                    }
                    None => Ok(()),
                }
            }
            Change::RemoveDevice(id) => {
                if self.devices.contains_key(id) {
                    Ok(())
                } else {
                    Err(Conflict::Missing { what: "device", id: (*id).into() })
                }
            }
        }
    }

    /// Apply a checked change.
    fn apply_one(&mut self, change: Change) {
        match change {
            Change::AddClient(c) => {
                self.clients.insert(c.id, c);
            }
            Change::AddServer(s) => {
                self.servers.insert(s.id, s);
            }
            Change::AddVm(v) | Change::UpdateVm(v) => {
                self.vms.insert(v.id, v);
            }
            Change::AddDevice(d) | Change::UpdateDevice(d) => {
                self.devices.insert(d.id, d);
            }
            Change::RemoveClient(id) => {
                self.clients.remove(&id);
            }
            Change::RemoveServer(id) => {
                self.servers.remove(&id);
            }
            Change::RemoveVm(id) => {
                self.vms.remove(&id);
            }
            Change::RemoveDevice(id) => {
                self.devices.remove(&id);
            }
        }
    }

    /// The client platforms server `server` serves: those with a VM that
    /// has a device on it or whose owner it is — and, for such a VM that is
    /// migrating, the client platform it moves to (which sends already).
    /// What the server needs the keys of (and, with etcd, may read).
    pub fn clients_served_by(&self, server: u16) -> std::collections::BTreeSet<u16> {
        let mut out = std::collections::BTreeSet::new();
        for v in self.vms.values() {
            let serves = v.owner == Some(server) || self.devices.values().any(|d| d.vm == v.id && d.server == server);
            if serves {
                out.insert(v.client);
                out.extend(v.migrate_to);
            }
        }
        out
    }

    /// Heap bytes the records hold, roughly (B-tree nodes counted as their
    /// entries plus a third).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let tree = |n: usize, entry: usize| n * entry * 4 / 3;
        let devices: usize = self
            .devices
            .values()
            .map(|d| {
                d.kind.capacity()
                    + d.ranges.capacity() * size_of::<Range>()
                    + d.irqs.capacity() * 4
                    + d.image.as_ref().map_or(0, |i| i.path.capacity())
            })
            .sum();
        let vms: usize = self.vms.values().map(|v| v.image.capacity() + v.args.capacity() * 8).sum();
        let named: usize =
            self.clients.values().map(|c| c.mac.capacity() + c.hypervisor_kind.capacity()).sum::<usize>()
                + self.servers.values().map(|s| s.mac.capacity()).sum::<usize>();
        tree(self.devices.len(), size_of::<(u32, Device)>())
            + tree(self.vms.len(), size_of::<(u32, Vm)>())
            + tree(self.clients.len(), size_of::<(u16, ClientPlatform)>())
            + tree(self.servers.len(), size_of::<(u16, Server)>())
            + devices
            + vms
            + named
    }

    /// Apply `changes` all or nothing: each is checked against the database
    /// as the ones before it left it. Returns what changed, a line each.
    pub fn apply(&mut self, changes: &[Change]) -> Result<Vec<String>, Conflict> {
        let mut next = self.clone();
        let mut said = Vec::new();
        for c in changes {
            next.check(c)?;
            said.push(c.to_string());
            next.apply_one(c.clone());
        }
        *self = next;
        Ok(said)
    }
}

/// Records the tests start from (this crate's and the store suite's).
#[doc(hidden)]
pub mod fixtures {
    use super::*;

    /// Client platform 1, server 10 (owner) and VM 100 on the client.
    pub fn platform() -> Vec<Change> {
        vec![
            Change::AddClient(ClientPlatform {
                id: 1,
                mac: "02:00:00:00:00:01".into(),
                hypervisor: 1,
                hypervisor_kind: "kvm".into(),
            }),
            Change::AddServer(Server { id: 10, mac: "02:00:00:00:00:0a".into(), role: ServerRole::Owner }),
            Change::AddVm(Vm {
                id: 100,
                client: 1,
                vcpus: 1,
                memory_mib: 4,
                image: "io_loop".into(),
                state: VmState::Defined,
                owner: None,
                args: Vec::new(),
                migrate_to: None,
                irqchip: IrqChip::Kernel,
            }),
        ]
    }

    /// A UART `id` of VM 100 on server 10 at ports `base`.
    pub fn uart(id: u32, base: u64) -> Device {
        Device {
            id,
            kind: "uart".into(),
            server: 10,
            shard: 0,
            vm: 100,
            ranges: vec![Range { mmio: false, base, len: 8 }],
            irqs: vec![4],
            image: None,
        }
    }

    /// A virtio-blk `id` of VM 100 on server 10 at MMIO `base`, its image `path`.
    pub fn virtio_blk(id: u32, base: u64, path: &str) -> Device {
        Device {
            id,
            kind: VIRTIO_BLK.into(),
            server: 10,
            shard: 0,
            vm: 100,
            ranges: vec![Range { mmio: true, base, len: VIRTIO_BLK_WINDOW }],
            irqs: vec![10],
            image: Some(BlockImage { path: path.into(), read_only: false }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{platform, uart, virtio_blk};
    use super::*;

    fn base() -> Db {
        let mut db = Db::default();
        db.apply(&platform()).unwrap();
        db
    }

    #[test]
    fn changes_are_checked_and_say_what_they_did() {
        let mut db = base();
        let said = db.apply(&[Change::AddDevice(uart(1, 0x3f8))]).unwrap();
        assert_eq!(said, vec!["added device 1 (uart) of VM 100 on server 10"]);
        let err = db.apply(&[Change::AddDevice(uart(2, 0x3fc))]).unwrap_err();
        assert_eq!(err.to_string(), "device 2's pio 0x3fc+0x8 overlaps device 1's pio 0x3f8+0x8 in VM 100");
        let err = db.apply(&[Change::AddDevice(uart(1, 0x2f8))]).unwrap_err();
        assert_eq!(err.to_string(), "device 1 already exists");
        let err = db.apply(&[Change::AddDevice(Device { server: 11, ..uart(3, 0x2f8) })]).unwrap_err();
        assert_eq!(err.to_string(), "device 3 refers to server 11, which does not exist");
        let err = db.apply(&[Change::RemoveServer(10)]).unwrap_err();
        assert_eq!(err.to_string(), "server 10 is still used by device 1: move or remove that first");
        let err = db.apply(&[Change::RemoveVm(100)]).unwrap_err();
        assert!(err.to_string().contains("still used by device 1"));
        assert!(db.apply(&[Change::AddDevice(Device { kind: "gpu".into(), ..uart(4, 0x2f8) })]).is_err());
        assert!(db.apply(&[Change::AddServer(Server { id: 12, mac: "zz".into(), role: ServerRole::Io })]).is_err());
    }

    #[test]
    fn a_vm_record_without_an_irqchip_is_kernel_and_a_remote_one_says_so() {
        let vm = base().vms[&100].clone();
        let json = serde_json::to_value(&vm).unwrap();
        assert!(json.get("irqchip").is_none(), "the default is not written: {json}");
        let old: Vm = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(old.irqchip, IrqChip::Kernel);
        let remote = Vm { irqchip: IrqChip::Remote, ..vm };
        let json = serde_json::to_value(&remote).unwrap();
        assert_eq!(json["irqchip"], "remote");
        assert_eq!(serde_json::from_value::<Vm>(json).unwrap(), remote);
        let mut bad = serde_json::to_value(&remote).unwrap();
        bad["irqchip"] = "pic".into();
        assert!(serde_json::from_value::<Vm>(bad).is_err());
    }

    #[test]
    fn a_batch_is_all_or_nothing() {
        let mut db = base();
        let before = db.clone();
        // The second change conflicts with the first: nothing is applied.
        let err = db.apply(&[Change::AddDevice(uart(1, 0x3f8)), Change::AddDevice(uart(2, 0x3f8))]).unwrap_err();
        assert!(matches!(err, Conflict::Overlap { .. }));
        assert_eq!(db, before);
        // A move in one batch: remove then re-add elsewhere.
        db.apply(&[Change::AddDevice(uart(1, 0x3f8))]).unwrap();
        db.apply(&[Change::AddServer(Server { id: 11, mac: "02:00:00:00:00:0b".into(), role: ServerRole::Io })])
            .unwrap();
        let said = db.apply(&[Change::UpdateDevice(Device { server: 11, ..uart(1, 0x3f8) })]).unwrap();
        assert_eq!(said, vec!["updated device 1 (server 11, shard 0)"]);
        assert_eq!(db.devices[&1].server, 11);
    }

    #[test]
    fn lifecycle_steps_follow_the_state_and_name_what_they_refuse() {
        let mut db = base();
        let vm = db.vms[&100].clone();
        assert_eq!(vm.after(Lifecycle::Launch).unwrap().state, VmState::Running);
        assert_eq!(vm.after(Lifecycle::Resume).unwrap_err().to_string(), "VM 100 is Defined: cannot resume it");
        let running = vm.after(Lifecycle::Launch).unwrap();
        let suspended = running.after(Lifecycle::Suspend).unwrap();
        assert_eq!(suspended.after(Lifecycle::Resume).unwrap(), running);
        assert_eq!(suspended.after(Lifecycle::Shutdown).unwrap().state, VmState::Stopped);
        assert!(running.after(Lifecycle::Migrate(1)).unwrap_err().to_string().contains("already runs on"));
        let moving = running.after(Lifecycle::Migrate(2)).unwrap();
        assert_eq!((moving.state, moving.migrate_to), (VmState::Migrating, Some(2)));
        // The target must exist, and stays in use while the VM moves there.
        let err = db.apply(&[Change::UpdateVm(moving.clone())]).unwrap_err();
        assert_eq!(err.to_string(), "VM 100 refers to client platform 2, which does not exist");
        let two =
            ClientPlatform { id: 2, mac: "02:00:00:00:00:02".into(), hypervisor: 1, hypervisor_kind: "kvm".into() };
        db.apply(&[Change::AddClient(two), Change::UpdateVm(moving)]).unwrap();
        assert!(db.apply(&[Change::RemoveClient(2)]).unwrap_err().to_string().contains("still used by VM 100"));
        let half = Vm { migrate_to: None, ..db.vms[&100].clone() };
        assert!(db.apply(&[Change::UpdateVm(half)]).is_err(), "Migrating without a target");
    }

    #[test]
    fn changes_past_the_limits_are_refused_with_the_limit() {
        let mut db = base();
        let vm = db.vms[&100].clone();
        let refused = |db: &mut Db, c: Change| db.apply(&[c]).unwrap_err().to_string();
        let e = refused(&mut db, Change::UpdateVm(Vm { vcpus: 256, ..vm.clone() }));
        assert_eq!(e, "VM 100: vcpus must be 1 to 255, not 256");
        let e = refused(&mut db, Change::UpdateVm(Vm { memory_mib: MAX_MEMORY_MIB + 1, ..vm.clone() }));
        assert_eq!(e, "VM 100: memory_mib must be 1 to 65536, not 65537");
        let e = refused(&mut db, Change::UpdateVm(Vm { image: "/k".repeat(MAX_IMAGE_LEN), ..vm.clone() }));
        assert!(e.contains("image must be 1 to 4096 bytes"), "{e}");
        assert!(refused(&mut db, Change::UpdateVm(Vm { image: String::new(), ..vm.clone() })).contains("image"));
        let range = |mmio, base, len| Device { ranges: vec![Range { mmio, base, len }], ..uart(1, 0) };
        let e = refused(&mut db, Change::AddDevice(range(true, u64::MAX - 1, 4)));
        assert!(e.starts_with("device 1: bad range mmio 0xfffffffffffffffe+0x4"), "overflow: {e}");
        let e = refused(&mut db, Change::AddDevice(range(false, u64::MAX, 1)));
        assert!(e.contains("ends at or before 0x10000"), "{e}");
        assert!(refused(&mut db, Change::AddDevice(range(false, 0xfff8, 9))).contains("bad range"));
        assert!(db.apply(&[Change::AddDevice(range(false, 0xfff8, 8))]).is_ok(), "the last ports are fine");
        let e = refused(&mut db, Change::AddDevice(Device { id: 2, ..range(true, 0xd000_0000, MAX_MMIO_LEN + 1) }));
        assert!(e.contains("an MMIO range is 1 byte to 16 MiB"), "{e}");
        let e = refused(&mut db, Change::AddDevice(Device { irqs: vec![4, 24], ..uart(3, 0x2f8) }));
        assert_eq!(e, "device 3: interrupt line 24 does not exist (lines are 0 to 23)");
        let e = refused(&mut db, Change::AddDevice(Device { irqs: vec![1; 9], ..uart(3, 0x2f8) }));
        assert!(e.contains("at most 8 interrupt lines"), "{e}");
        let e = refused(&mut db, Change::AddDevice(Device { kind: "x".repeat(10_000), ..uart(3, 0x2f8) }));
        assert!(e.len() < 200, "a hostile name is not echoed whole: {e}");
        let kvm = ClientPlatform { id: 9, mac: "02:00:00:00:00:09".into(), hypervisor: 1, hypervisor_kind: "".into() };
        assert!(refused(&mut db, Change::AddClient(kvm)).contains("hypervisor_kind must be 1 to 32"));
    }

    #[test]
    fn a_virtio_blk_has_an_absolute_image_and_one_mmio_window() {
        let mut db = base();
        let blk = virtio_blk(15, 0xfeb0_0000, "/srv/vm1.img");
        let said = db.apply(&[Change::AddDevice(blk.clone())]).unwrap();
        assert_eq!(said, vec!["added device 15 (virtio-blk) of VM 100 on server 10, image /srv/vm1.img"]);
        let ro = Device { image: Some(BlockImage { path: "/srv/ro.img".into(), read_only: true }), ..blk.clone() };
        let said = db.apply(&[Change::UpdateDevice(ro)]).unwrap();
        assert_eq!(said, vec!["updated device 15 (server 10, shard 0)"]);
        assert_eq!(db.devices[&15].image.as_ref().unwrap().to_string(), "/srv/ro.img (read-only)");
        let refused = |d: Device| base().apply(&[Change::AddDevice(d)]).unwrap_err().to_string();
        // No image.
        let e = refused(Device { image: None, ..blk.clone() });
        assert_eq!(e, "device 15: a virtio-blk needs an image (the absolute path of a raw image file on its server)");
        // An image on another kind.
        let e = refused(Device { image: blk.image.clone(), ..uart(3, 0x2f8) });
        assert_eq!(e, "device 3: an image is for a virtio-blk, not a uart");
        // Paths: relative, empty, too long, with control characters.
        let path = |p: &str| Device { image: Some(BlockImage { path: p.into(), read_only: false }), ..blk.clone() };
        let e = refused(path("vm1.img"));
        assert_eq!(e, "device 15: image \"vm1.img\": the path must be absolute (its server opens it)");
        assert!(refused(path("")).contains("an image path is 1 to 4096 bytes, not 0"));
        let e = refused(path(&"/x".repeat(MAX_IMAGE_LEN)));
        assert!(e.contains("not 8192") && e.len() < 200, "{e}");
        assert!(refused(path("/srv/a\nb.img")).contains("no control characters"));
        // The window: one MMIO range of 0x200 bytes, 512-byte aligned, no ports.
        let window = "a virtio-blk has one MMIO window of 0x200 bytes at a 512-byte aligned base and no ports";
        let e = refused(virtio_blk(15, 0xfeb0_0100, "/srv/vm1.img"));
        assert_eq!(e, format!("device 15: {window}, not [mmio 0xfeb00100+0x200]"));
        let long = Device { ranges: vec![Range { mmio: true, base: 0xfeb0_0000, len: 0x1000 }], ..blk.clone() };
        assert!(refused(long).contains(window));
        let ports = Device { ranges: vec![Range { mmio: false, base: 0x500, len: 0x200 }], ..blk.clone() };
        assert!(refused(ports).contains(window));
        let two = Device { ranges: vec![blk.ranges[0], Range { mmio: false, base: 0x500, len: 8 }], ..blk.clone() };
        assert!(refused(two).contains(window));
        assert!(refused(Device { ranges: vec![], ..blk.clone() }).contains(window));
        assert!(refused(Device { irqs: vec![10, 11], ..blk.clone() }).contains("one interrupt line, not 2"));
    }

    #[test]
    fn a_device_record_without_an_image_still_loads_and_one_with_round_trips() {
        // As a version before images wrote it.
        let old = r#"{"id":1,"kind":"uart","server":10,"shard":0,"vm":100,"ranges":[{"mmio":false,"base":1016,"len":8}],"irqs":[4]}"#;
        let d: Device = serde_json::from_str(old).unwrap();
        assert_eq!(d, uart(1, 0x3f8));
        assert_eq!(serde_json::to_string(&d).unwrap(), old, "no image field written for other kinds");
        let blk = virtio_blk(15, 0xfeb0_0000, "/srv/vm1.img");
        let text = serde_json::to_string(&blk).unwrap();
        assert!(text.ends_with(r#""image":{"path":"/srv/vm1.img","read_only":false}}"#), "{text}");
        assert_eq!(serde_json::from_str::<Device>(&text).unwrap(), blk);
        // read_only may be left out.
        let short = text.replace(r#","read_only":false"#, "");
        assert_eq!(serde_json::from_str::<Device>(&short).unwrap(), blk);
    }

    #[test]
    fn the_database_round_trips_through_json() {
        let mut db = base();
        db.apply(&[Change::AddDevice(uart(1, 0x3f8))]).unwrap();
        let text = serde_json::to_string(&db).unwrap();
        assert_eq!(serde_json::from_str::<Db>(&text).unwrap(), db);
    }
}
