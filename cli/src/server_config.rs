//! The server's config (`dmfabric server --config FILE`, or `--clients
//! FILE` for the client platforms alone): which devices exist — their
//! kind, id, VM, ports or MMIO, IRQ lines and shard — and which client
//! platforms may use them: each one's id, registered MAC, key file and VMs
//! with their vCPU counts. A server acts for nobody else.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use dmfabric_devices::{DeviceKind, DeviceSpec};
use dmfabric_wire::MacAddr;
use serde::Deserialize;

pub const EXAMPLE: &str = r#"# dmfabric server devices, and the client platforms that may use them.
# Ports and IRQs default to a PC's.

# A client platform: answers go to its MAC, sealed with its key (the same
# key file its client uses; `dmfabric keygen --client 3 --out client-3.key`).
# Only its VMs, and only their vCPUs, may use the devices.
[[client]]
id = 3
mac = "02:00:00:00:00:03"
key_file = "client-3.key"   # relative to this file; mode 0600
vms = [{ id = 1, vcpus = 1 }]

[[device]]
id = 11
kind = "uart"        # uart | rtc | i8042 | timer | regfile | irqtest
vm = 1               # the VM it belongs to (requests from other VMs are refused)
pio = 0x3f8          # first port (the model's size follows), or [base, len]
irq = 4
shard = 0            # worker shard in the split layout

[[device]]
id = 12
kind = "rtc"
vm = 1               # pio 0x70, irq 8

[[device]]
id = 13
kind = "i8042"
vm = 1               # pio 0x60/0x64, irq [1, 12]

[[device]]
id = 14
kind = "timer"
vm = 1
pio = 0x700
irq = 5

[[device]]
id = 1
kind = "regfile"     # the test device: any VM
pio = [0x500, 0x100]
mmio = [0xd0000000, 0x1000]

# A disk: virtio-blk on virtio-mmio (mmio 0xfeb00000, 0x200 bytes; irq 10),
# its image a raw file on this server read and written through io_uring
# (O_DIRECT where the file system allows it).
# [[device]]
# id = 15
# kind = "virtio-blk"
# vm = 1
# image = "vm1.img"    # relative to this file
# size = "64M"         # create the image this size if it does not exist
# read_only = false
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device: Vec<Device>,
    #[serde(default)]
    client: Vec<ClientConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    id: u16,
    mac: String,
    #[serde(default = "one")]
    hypervisor: u16,
    key_file: PathBuf,
    #[serde(default)]
    vms: Vec<VmConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmConfig {
    id: u32,
    #[serde(default = "one")]
    vcpus: u16,
}

fn one() -> u16 {
    1
}

/// A client platform of a server's config, its key file not read yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEntry {
    pub id: u16,
    pub mac: MacAddr,
    pub hypervisor: u16,
    /// Made absolute against the config file's directory.
    pub key_file: PathBuf,
    /// (VM, vCPUs).
    pub vms: Vec<(u32, u16)>,
}

/// What a server config holds.
#[derive(Debug, Clone, Default)]
pub struct ServerFile {
    pub devices: Vec<DeviceSpec>,
    pub clients: Vec<ClientEntry>,
    /// The images of the block devices.
    pub images: Vec<BlockImage>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Range {
    Base(u64),
    BaseLen([u64; 2]),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Irq {
    One(u32),
    Two([u32; 2]),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Device {
    id: u32,
    kind: String,
    vm: Option<u32>,
    pio: Option<Range>,
    mmio: Option<Range>,
    irq: Option<Irq>,
    shard: Option<usize>,
    /// virtio-blk: the image file, its size if it is to be made, read-only.
    image: Option<PathBuf>,
    size: Option<String>,
    read_only: Option<bool>,
}

/// A block device's image, as a server config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockImage {
    pub device: u32,
    /// Made absolute against the config file's directory.
    pub path: PathBuf,
    pub read_only: bool,
    /// Create the image this many bytes large if it does not exist.
    pub create: Option<u64>,
}

/// Read and check the devices and client platforms of `path` (key files
/// named relative to its directory).
pub fn load(path: &Path) -> anyhow::Result<ServerFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let mut file = parse(&text).with_context(|| path.display().to_string())?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for c in &mut file.clients {
        c.key_file = dir.join(&c.key_file);
    }
    for i in &mut file.images {
        i.path = dir.join(&i.path);
    }
    Ok(file)
}

/// Most client platforms and VMs a config may list (a server's state for
/// them is sized from these).
const MAX_CLIENTS: usize = 4096;
const MAX_VMS: usize = 65_536;
/// Most vCPUs of a listed VM (the load generator simulates 512).
const MAX_VCPUS: u16 = 1024;

pub fn parse(text: &str) -> anyhow::Result<ServerFile> {
    let file: File = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().replace('\n', " ")))?;
    let mut specs: Vec<DeviceSpec> = Vec::new();
    let mut images = Vec::new();
    for d in &file.device {
        specs.push(spec(d).with_context(|| format!("device {}", d.id))?);
        if let Some(i) = image(d).with_context(|| format!("device {}", d.id))? {
            images.push(i);
        }
    }
    check(&specs)?;
    if file.client.len() > MAX_CLIENTS {
        bail!("{} client platforms: at most {MAX_CLIENTS}", file.client.len());
    }
    let mut clients = Vec::new();
    let mut ids = BTreeSet::new();
    let mut vms = BTreeSet::new();
    for c in &file.client {
        let mac: MacAddr =
            c.mac.parse().map_err(|_| anyhow::anyhow!("client {}: mac {:?} is not aa:bb:cc:dd:ee:ff", c.id, c.mac))?;
        if !ids.insert(c.id) {
            bail!("client {} is listed twice", c.id);
        }
        for v in &c.vms {
            if !vms.insert(v.id) {
                bail!("VM {} is listed for two client platforms (or twice)", v.id);
            }
            if v.vcpus == 0 || v.vcpus > MAX_VCPUS {
                bail!("client {}: VM {}: vcpus {}: 1 to {MAX_VCPUS}", c.id, v.id, v.vcpus);
            }
        }
        clients.push(ClientEntry {
            id: c.id,
            mac,
            hypervisor: c.hypervisor,
            key_file: c.key_file.clone(),
            vms: c.vms.iter().map(|v| (v.id, v.vcpus)).collect(),
        });
    }
    if vms.len() > MAX_VMS {
        bail!("{} VMs: at most {MAX_VMS}", vms.len());
    }
    Ok(ServerFile { devices: specs, clients, images })
}

/// The image of a block device, checked; `None` for other kinds.
fn image(d: &Device) -> anyhow::Result<Option<BlockImage>> {
    if d.kind != "virtio-blk" {
        if d.image.is_some() || d.size.is_some() || d.read_only.is_some() {
            bail!("image, size and read_only are for a virtio-blk, not a {}", d.kind);
        }
        return Ok(None);
    }
    let Some(path) = d.image.clone() else {
        bail!("a virtio-blk needs image = \"PATH\" (a raw image file; add size = \"64M\" to create it)");
    };
    let create = d.size.as_deref().map(dmfabric_storage::parse_size).transpose().context("size")?;
    Ok(Some(BlockImage { device: d.id, path, read_only: d.read_only.unwrap_or(false), create }))
}

/// The one line `d` names, if any (its kind's usual one otherwise).
fn line(d: &Device) -> anyhow::Result<Vec<u32>> {
    match d.irq {
        None => Ok(Vec::new()),
        Some(Irq::One(n)) if n < 24 => Ok(vec![n]),
        Some(Irq::One(n)) => bail!("irq {n}: lines are 0 to 23"),
        Some(Irq::Two(_)) => bail!("irq: one line for a {}", d.kind),
    }
}

fn spec(d: &Device) -> anyhow::Result<DeviceSpec> {
    if d.id == dmfabric_dm_workers::rx::ANY_DEVICE {
        bail!("id 0 is reserved (it means \"any device at this address\")");
    }
    let (kind, default_base) = match d.kind.as_str() {
        name @ ("uart" | "rtc" | "timer" | "irqtest") => {
            let kind = DeviceKind::parse(name, &line(d)?)?;
            (kind, kind.usual_base().map_or(0, u64::from))
        }
        "i8042" => {
            let lines = match d.irq {
                None => Vec::new(),
                Some(Irq::Two([a, b])) if a < 24 && b < 24 => vec![a, b],
                _ => bail!("irq: an i8042 takes two lines, [keyboard, aux], each 0 to 23"),
            };
            let kind = DeviceKind::parse("i8042", &lines)?;
            let base = kind.fixed_base().map_or(0, u64::from);
            if d.pio.is_some() {
                bail!("an i8042 sits at the PC's keyboard ports ({base:#x}): no pio");
            }
            (kind, base)
        }
        "regfile" => {
            if d.irq.is_some() {
                bail!("a regfile raises no interrupts: no irq");
            }
            let pio = match d.pio {
                None => None,
                Some(Range::BaseLen([b, l])) if l > 0 && b.checked_add(l).is_some_and(|e| e <= 0x1_0000) => {
                    Some((b as u16, l as u16))
                }
                _ => bail!("pio: [base, len] within the 64 KiB port space"),
            };
            let mmio = match d.mmio {
                None => None,
                Some(Range::BaseLen([b, l])) if l > 0 && l <= 1 << 20 && b.checked_add(l).is_some() => {
                    Some((b, l as u32))
                }
                _ => bail!("mmio: [base, len], at most 1 MiB"),
            };
            if pio.is_none() && mmio.is_none() {
                bail!("a regfile needs pio = [base, len] or mmio = [base, len]");
            }
            return Ok(DeviceSpec { id: d.id, pio, mmio, kind: DeviceKind::RegFile, vm: d.vm, shard: d.shard });
        }
        "virtio-blk" => {
            let kind = DeviceKind::parse("virtio-blk", &line(d)?)?;
            let (usual, len) = kind.usual_mmio().unwrap_or((0, 0x200));
            if d.pio.is_some() {
                bail!("a virtio-blk sits in MMIO space: no pio");
            }
            let base = match d.mmio {
                None => usual,
                Some(Range::Base(b)) => b,
                Some(Range::BaseLen([b, l])) if l == u64::from(len) => b,
                Some(Range::BaseLen([_, l])) => bail!("mmio: a virtio-blk takes {len:#x} bytes, not {l:#x}"),
            };
            if base.checked_add(u64::from(len)).is_none() || base % 0x200 != 0 {
                bail!("mmio {base:#x}: a virtio-blk's window must be 512-byte aligned and inside the address space");
            }
            return Ok(DeviceSpec { id: d.id, kind, pio: None, mmio: Some((base, len)), vm: d.vm, shard: d.shard });
        }
        name @ ("ioapic" | "hpet") => {
            let kind = DeviceKind::parse(name, &[])?;
            let (base, len) = kind.usual_mmio().unwrap_or((0, 0));
            if d.pio.is_some() || d.mmio.is_some() || d.irq.is_some() {
                bail!("an {name} sits at the PC's {base:#x} and has its own lines: no pio, mmio or irq");
            }
            if d.vm.is_none() {
                bail!("an {name} belongs to one VM: give vm");
            }
            return Ok(DeviceSpec { id: d.id, kind, pio: None, mmio: Some((base, len)), vm: d.vm, shard: d.shard });
        }
        other => bail!("unknown kind {other:?}: uart, rtc, i8042, timer, regfile, irqtest, virtio-blk, ioapic or hpet"),
    };
    if d.mmio.is_some() {
        bail!("a {} sits in port space: no mmio", d.kind);
    }
    let size = kind.ports().unwrap_or(1);
    let base = match d.pio {
        None => default_base,
        Some(Range::Base(b)) => b,
        Some(Range::BaseLen([b, l])) if l == u64::from(size) => b,
        Some(Range::BaseLen([_, l])) => bail!("pio: a {} takes {size} ports, not {l}", d.kind),
    };
    if base.checked_add(u64::from(size)).is_none_or(|end| end > 0x1_0000) {
        bail!("pio {base:#x}: past the 64 KiB port space");
    }
    Ok(DeviceSpec { shard: d.shard, ..DeviceSpec::at(d.id, kind, base as u16, d.vm) })
}

/// Unique ids; no two devices of one VM on the same ports or MMIO (devices
/// for any VM may share addresses: each VM maps the one it uses by id).
pub fn check(specs: &[DeviceSpec]) -> anyhow::Result<()> {
    let mut ids = BTreeSet::new();
    for s in specs {
        if !ids.insert(s.id) {
            bail!("device id {} is used twice", s.id);
        }
    }
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[i + 1..] {
            let same_vm = a.vm.is_some() && a.vm == b.vm;
            let overlap = |x: Option<(u64, u64)>, y: Option<(u64, u64)>| match (x, y) {
                (Some((xb, xl)), Some((yb, yl))) => xb < yb + yl && yb < xb + xl,
                _ => false,
            };
            let pio = |s: &DeviceSpec| s.pio.map(|(b, l)| (u64::from(b), u64::from(l)));
            let mmio = |s: &DeviceSpec| s.mmio.map(|(b, l)| (b, u64::from(l)));
            if same_vm && (overlap(pio(a), pio(b)) || overlap(mmio(a), mmio(b))) {
                let vm = a.vm.unwrap_or_default();
                bail!("devices {} and {} overlap in the address space of VM {vm}", a.id, b.id);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_valid() {
        let file = parse(EXAMPLE).unwrap();
        assert_eq!(file.clients.len(), 1);
        assert_eq!(file.clients[0].vms, vec![(1, 1)]);
        assert_eq!(file.clients[0].mac, MacAddr([2, 0, 0, 0, 0, 3]));
        let specs = file.devices;
        assert_eq!(specs.len(), 5);
        assert_eq!(
            specs[0],
            DeviceSpec { shard: Some(0), ..DeviceSpec::at(11, DeviceKind::Uart { line: 4 }, 0x3f8, Some(1)) }
        );
        assert_eq!(specs[2].kind, DeviceKind::I8042 { kbd_line: 1, aux_line: 12 });
        assert_eq!(specs[4].mmio, Some((0xd000_0000, 0x1000)));
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn bad_configs_name_the_problem() {
        assert!(err("[[device]]\nid = 1\nkind = \"gpu\"\n").contains("unknown kind \"gpu\""));
        assert!(err("[[device]]\nid = 1\nkind = \"uart\"\n[[device]]\nid = 1\nkind = \"rtc\"\n").contains("used twice"));
        let overlap =
            "[[device]]\nid = 1\nkind = \"uart\"\nvm = 1\n[[device]]\nid = 2\nkind = \"timer\"\nvm = 1\npio = 0x3fc\n";
        assert!(err(overlap).contains("devices 1 and 2 overlap in the address space of VM 1"), "{}", err(overlap));
        let other_vm = overlap.replace("vm = 1\npio", "vm = 2\npio");
        assert!(parse(&other_vm).is_ok(), "different VMs may use the same ports");
        assert!(err("[[device]]\nid = 1\nkind = \"uart\"\nirq = 99\n").contains("lines are 0 to 23"));
        assert!(err("[[device]]\nid = 1\nkind = \"uart\"\npio = [0x3f8, 4]\n").contains("takes 8 ports"));
        assert!(err("[[device]]\nid = 0\nkind = \"uart\"\n").contains("reserved"));
        assert!(err("[[device]]\nid = 1\nkind = \"regfile\"\n").contains("needs pio"));
        assert!(err("[[device]]\nid = 1\nkind = \"uart\"\ncolour = 1\n").contains("colour"));
        // Ranges that would run past the end of their space (and overflow).
        let huge = "[[device]]\nid = 1\nkind = \"regfile\"\npio = [0xffffffffffffffff, 2]\n";
        assert!(err(huge).contains("within the 64 KiB"), "{}", err(huge));
        let huge = "[[device]]\nid = 1\nkind = \"regfile\"\nmmio = [0xffffffffffffffff, 2]\n";
        assert!(err(huge).contains("at most 1 MiB"), "{}", err(huge));
        let huge = "[[device]]\nid = 1\nkind = \"uart\"\npio = 0xffffffffffffffff\n";
        assert!(err(huge).contains("past the 64 KiB"), "{}", err(huge));
        // Client platforms.
        let client = |body: &str| format!("[[client]]\nid = 3\nkey_file = \"k\"\n{body}");
        assert!(err(&client("mac = \"nope\"\n")).contains("not aa:bb"));
        let two = format!(
            "{}{}",
            client("mac = \"02:00:00:00:00:03\"\nvms = [{ id = 1 }]\n"),
            client("mac = \"02:00:00:00:00:04\"\n")
        );
        assert!(err(&two).contains("listed twice"));
        assert!(err(&client("mac = \"02:00:00:00:00:03\"\nvms = [{ id = 1, vcpus = 0 }]\n")).contains("1 to 1024"));
    }
}
