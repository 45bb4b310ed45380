//! `dmfabric ctl`: list, show and edit the control panel's database. Every
//! edit is checked against the stored database before it is written and
//! says what it changed; a conflict is one line naming it.
//!
//! Client platforms' keys: `ctl add client` makes key 1, `ctl client
//! rekey` adds the next and moves senders to it once every host has it,
//! `ctl client export-key` writes them as a key file (0600) for hosts run
//! from a config, `ctl client retire-keys` drops the old ones. Keys are
//! never printed, by `ls` and `show` or otherwise. `dmfabric keygen` makes a
//! key file without a store. Against an `etcds://` store, `ctl etcd-auth`
//! sets up etcd's users and every commit re-derives their grants
//! (`dmfabric_control::etcd`).
//!
//! A virtio-blk's record names its image, a raw file on the server that
//! holds the device (`ctl add device --kind virtio-blk --image PATH`); the
//! server opens it when it builds the model, and a server it moves to
//! opens the same path (shared storage). `--size` creates the image, on
//! the machine ctl runs on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use dmfabric_control::keys::{now_unix, ClientKeys, KeyFile};
use dmfabric_control::model::{
    BlockImage, Change, ClientPlatform, Db, Device, IrqChip, Lifecycle, Range, Server, ServerRole, Vm, VmState,
    VIRTIO_BLK, VIRTIO_BLK_WINDOW,
};
use dmfabric_control::store::{Store, DEFAULT_STORE};
use dmfabric_devices::platform::pc;

use crate::io::number;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The store: a redb file (created 0600 if missing),
    /// etcds://HOST:PORT[,HOST:PORT...]?ca=PATH&cert=PATH&key=PATH (TLS; without
    /// the query, DMFABRIC_ETCD_CA, _CERT and _KEY name the files), or
    /// etcd://HOST:PORT[,...] (plain http, unauthenticated: local tests only).
    #[arg(long, env = "DMFABRIC_STORE", default_value = DEFAULT_STORE)]
    store: String,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum What {
    Clients,
    Servers,
    Vms,
    Devices,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum One {
    Client,
    Server,
    Vm,
    Device,
}

#[derive(Debug, Subcommand)]
pub enum CtlCmd {
    /// List records, as a table or JSON.
    Ls {
        /// What to list (everything by default).
        what: Option<What>,
        #[arg(long)]
        json: bool,
    },
    /// Show one record.
    Show {
        what: One,
        id: u32,
        #[arg(long)]
        json: bool,
    },
    /// Add a record.
    #[command(subcommand)]
    Add(AddCmd),
    /// Remove a record (refused while something refers to it).
    Rm { what: One, id: u32 },
    /// Edit a device's placement.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// A VM's life: launch, suspend, resume, shut down, migrate. The client
    /// platform running it carries the change out.
    #[command(subcommand)]
    Vm(VmCmd),
    /// A client platform's keys: rekey, export, retire.
    #[command(subcommand)]
    Client(ClientCmd),
    /// Set up etcd's users (an etcds:// store): root, dmfabric-admin, one per
    /// server and client platform record with the grants it needs, then turn
    /// authentication on. Idempotent. etcd, run with --client-cert-auth,
    /// takes each request's user from its certificate's CN: run this (and
    /// every later ctl command) with the certificate whose CN is
    /// dmfabric-admin; servers use CN=dmfabric-server-<id>, client platforms
    /// CN=dmfabric-client-<id>.
    EtcdAuth,
}

#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// Give a client platform a new key without dropping a frame: add it
    /// (every host accepts it), wait, then send with it. At most two keys
    /// are kept (the oldest one not sent with is dropped).
    Rekey {
        id: u16,
        /// How long to wait between adding the key and sending with it, for
        /// every host watching the store to load it.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
    /// Write a client platform's keys as a key file (mode 0600), for hosts
    /// run from a config (key_file = ...).
    ExportKey {
        id: u16,
        #[arg(long)]
        out: PathBuf,
        /// Replace a file already there.
        #[arg(long)]
        force: bool,
    },
    /// Keep only the key a client platform sends with (after a rekey, once
    /// every host sends with the new key).
    RetireKeys { id: u16 },
}

/// `dmfabric keygen`: a key file without a store.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The client platform the key is for.
    #[arg(long)]
    client: u16,
    /// Where to write it (mode 0600).
    #[arg(long)]
    out: PathBuf,
    /// Replace a file already there.
    #[arg(long)]
    force: bool,
}

/// Write a fresh key file (key 1 of a client platform), refusing to
/// replace one unless asked.
pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let file = KeyFile::generate(args.client)?;
    if args.force {
        file.save(&args.out)?;
    } else {
        file.save_new(&args.out)?;
    }
    println!(
        "wrote a new key (id 1) of client platform {} to {} (mode 0600): the client platform and every server that serves it use the same file (key_file = ...)",
        args.client,
        args.out.display()
    );
    Ok(())
}

/// The ids, "1, 2".
fn ids(keys: &ClientKeys) -> String {
    keys.ids().iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// `ctl client ...`.
fn client_keys_cmd(store: &dyn Store, cmd: ClientCmd) -> anyhow::Result<()> {
    match cmd {
        ClientCmd::Rekey { id, wait_ms } => {
            let Some(keys) = store.client_keys(id)? else {
                let keys = ClientKeys::generate(id)?;
                let revision = store.put_client_keys(&keys)?;
                println!("client platform {id} had no keys: made key 1 and sends with it (revision {revision})");
                return Ok(());
            };
            let (added, new) = keys.with_new_key(now_unix())?;
            let dropped: Vec<u8> = keys.ids().into_iter().filter(|k| !added.ids().contains(k)).collect();
            let revision = store.put_client_keys(&added)?;
            let also = if dropped.is_empty() {
                String::new()
            } else {
                format!(", dropped key {}", dropped.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
            };
            println!(
                "client platform {id}: added key {new}{also}; hosts accept keys {}, still sending with key {} (revision {revision})",
                ids(&added),
                added.send
            );
            std::thread::sleep(Duration::from_millis(wait_ms));
            // Another rekey may have got in while we waited.
            let now = store.client_keys(id)?.context("its keys were removed while waiting")?;
            if !now.ids().contains(&new) {
                bail!(
                    "client platform {id}: key {new} was dropped while waiting (another rekey?): not switching to it"
                );
            }
            let revision = store.put_client_keys(&now.sending_with(new)?)?;
            println!("client platform {id}: now sending with key {new} (revision {revision})");
            println!(
                "hosts run from a key file need it again (dmfabric ctl client export-key {id} --out FILE --force); once every host sends with key {new}: dmfabric ctl client retire-keys {id}"
            );
        }
        ClientCmd::ExportKey { id, out, force } => {
            let keys = store.client_keys(id)?.with_context(|| {
                format!("client platform {id} has no keys: dmfabric ctl client rekey {id} makes one")
            })?;
            let file = KeyFile::from(&keys);
            if force {
                file.save(&out)?;
            } else {
                file.save_new(&out)?;
            }
            println!(
                "wrote keys {} of client platform {id} (sending with key {}) to {} (mode 0600): the client platform and every server that serves it use it (key_file = ...)",
                ids(&keys),
                keys.send,
                out.display()
            );
        }
        ClientCmd::RetireKeys { id } => {
            let keys = store.client_keys(id)?.with_context(|| format!("client platform {id} has no keys"))?;
            let kept = keys.retired()?;
            if kept.keys.len() == keys.keys.len() {
                println!("client platform {id} has only key {}: nothing to retire", keys.send);
                return Ok(());
            }
            let revision = store.put_client_keys(&kept)?;
            println!(
                "client platform {id}: retired keys other than {} (was {}) (revision {revision})",
                kept.send,
                ids(&keys)
            );
        }
    }
    Ok(())
}

/// `ctl etcd-auth`.
fn etcd_auth(spec: &str) -> anyhow::Result<()> {
    if !spec.starts_with("etcds://") {
        if spec.starts_with("etcd://") {
            bail!("etcd-auth needs an etcds:// store (TLS with client certificates): over plain http, users would send passwords in the clear");
        }
        bail!("etcd-auth is for etcd stores: a redb file's access control is its mode (0600, root's)");
    }
    let target = dmfabric_control::etcd::EtcdSpec::parse(spec)?;
    let store = dmfabric_control::etcd::EtcdStore::connect_spec(&target)?;
    for line in store.setup_auth()? {
        println!("{line}");
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Start a defined (or stopped) VM on its client platform.
    Launch { id: u32 },
    /// Pause its vCPUs (memory and devices stay).
    Suspend { id: u32 },
    /// Let a suspended VM run again.
    Resume { id: u32 },
    /// Stop it.
    Shutdown { id: u32 },
    /// Move it, memory and vCPU state, to another client platform; its
    /// completions and interrupts follow it.
    Migrate {
        id: u32,
        #[arg(long)]
        to: u16,
    },
}

#[derive(Debug, Subcommand)]
pub enum AddCmd {
    Client {
        #[arg(long)]
        id: u16,
        #[arg(long)]
        mac: String,
        #[arg(long, default_value_t = 1)]
        hypervisor: u16,
    },
    Server {
        #[arg(long)]
        id: u16,
        #[arg(long)]
        mac: String,
        #[arg(long, value_enum, default_value = "owner")]
        role: Role,
    },
    Vm {
        #[arg(long)]
        id: u32,
        #[arg(long)]
        client: u16,
        #[arg(long, default_value_t = 1)]
        vcpus: u16,
        #[arg(long, default_value_t = 4)]
        memory_mib: u32,
        #[arg(long, default_value = "io_loop")]
        image: String,
        /// The owner server its requests go to (it forwards each to the
        /// device's server); without it, straight to each device's server.
        #[arg(long)]
        owner: Option<u16>,
        /// The test guest's arguments (rdi, rsi, rdx), comma-separated.
        #[arg(long, value_delimiter = ',')]
        args: Vec<String>,
        /// Its interrupt controllers: kernel (KVM's PICs, I/O APIC and PIT
        /// on the client) or remote (KVM's split irqchip: its I/O APIC is a
        /// device of kind ioapic on a server, and the lines of its devices
        /// on every server drive that model's pins).
        #[arg(long, value_enum, default_value = "kernel")]
        irqchip: Chip,
    },
    /// A device of a VM, on a server. A virtio-blk (--kind virtio-blk
    /// --image PATH) takes the PC's window (--mmio 0xfeb00000:0x200) and
    /// line (--irq 10) unless given others.
    Device {
        #[arg(long)]
        id: u32,
        /// uart, rtc, i8042, timer, regfile, irqtest, virtio-blk, ioapic or
        /// hpet (the last two take their PC windows, 0xfec00000:0x1000 and
        /// 0xfed00000:0x400, unless given others).
        #[arg(long, visible_alias = "model")]
        kind: String,
        #[arg(long)]
        server: u16,
        #[arg(long)]
        vm: u32,
        #[arg(long, default_value_t = 0)]
        shard: u32,
        /// Port ranges, BASE:LEN (repeatable).
        #[arg(long)]
        pio: Vec<String>,
        /// MMIO ranges, BASE:LEN (repeatable; a virtio-blk's one window may
        /// be given as BASE).
        #[arg(long)]
        mmio: Vec<String>,
        /// Interrupt lines (repeatable).
        #[arg(long)]
        irq: Vec<u32>,
        /// A virtio-blk's image: the absolute path of a raw image file on the
        /// server that holds the device, which opens it. A device that may
        /// move between servers needs it on storage they share, at the same
        /// path.
        #[arg(long, value_name = "PATH")]
        image: Option<String>,
        /// The virtio-blk's disk is read-only (the server opens the image
        /// read-only).
        #[arg(long)]
        read_only: bool,
        /// Create the image this large (64M, 1G: whole 512-byte sectors) if it
        /// does not exist; one that does must be this size. It is created on
        /// the machine ctl runs on: right when that is the server, or when the
        /// path is on storage the servers share. Without --size the image
        /// must exist here already.
        #[arg(long)]
        size: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Chip {
    Kernel,
    Remote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Owner,
    Io,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Place a device on another server (and shard). Its model's state
    /// moves with it, through the store. A virtio-blk's new server opens
    /// the same image path: keep images of devices that move on storage
    /// every server mounts at the same path (a server that cannot open it
    /// logs so, and the device runs as an empty drive there).
    Move {
        id: u32,
        #[arg(long)]
        to: u16,
        #[arg(long)]
        shard: Option<u32>,
    },
}

/// `BASE:LEN`, or `BASE` where the kind has a fixed length.
fn range(s: &str, mmio: bool, fixed: Option<u64>) -> anyhow::Result<Range> {
    match (s.split_once(':'), fixed) {
        (Some((b, l)), _) => Ok(Range { mmio, base: number(b)?, len: number(l)? }),
        (None, Some(len)) => Ok(Range { mmio, base: number(s)?, len }),
        (None, None) => bail!("{s:?}: a range is BASE:LEN"),
    }
}

/// What `ctl add` asks: the change, and for a virtio-blk, the size to
/// create its image if it does not exist.
fn change(cmd: AddCmd) -> anyhow::Result<(Change, Option<u64>)> {
    let mut create = None;
    let change = match cmd {
        AddCmd::Client { id, mac, hypervisor } => {
            Change::AddClient(ClientPlatform { id, mac, hypervisor, hypervisor_kind: "kvm".into() })
        }
        AddCmd::Server { id, mac, role } => Change::AddServer(Server {
            id,
            mac,
            role: if role == Role::Owner { ServerRole::Owner } else { ServerRole::Io },
        }),
        AddCmd::Vm { id, client, vcpus, memory_mib, image, owner, args, irqchip } => {
            let args = args.iter().map(|a| number(a)).collect::<anyhow::Result<Vec<u64>>>()?;
            if args.len() > 3 {
                bail!("--args: at most three (rdi, rsi, rdx)");
            }
            Change::AddVm(Vm {
                id,
                client,
                vcpus,
                memory_mib,
                image,
                state: VmState::Defined,
                owner,
                args,
                migrate_to: None,
                irqchip: if irqchip == Chip::Remote { IrqChip::Remote } else { IrqChip::Kernel },
            })
        }
        AddCmd::Device { id, kind, server, vm, shard, pio, mmio, mut irq, image, read_only, size } => {
            let blk = kind == VIRTIO_BLK;
            let image = match image {
                Some(path) if blk => Some(BlockImage { path, read_only }),
                None if blk => bail!("a virtio-blk needs --image PATH (a raw image file; add --size 64M to create it)"),
                _ if !blk && (image.is_some() || read_only || size.is_some()) => {
                    bail!("--image, --size and --read-only are for a virtio-blk, not a {kind}")
                }
                _ => None,
            };
            create = size.as_deref().map(dmfabric_storage::parse_size).transpose().context("--size")?;
            let mut ranges = Vec::new();
            for p in &pio {
                ranges.push(range(p, false, None)?);
            }
            for m in &mmio {
                ranges.push(range(m, true, blk.then_some(VIRTIO_BLK_WINDOW))?);
            }
            if blk && ranges.is_empty() {
                ranges.push(Range { mmio: true, base: pc::VIRTIO_BLK_MMIO, len: VIRTIO_BLK_WINDOW });
            }
            // The I/O APIC and the HPET have their one window in a PC.
            if ranges.is_empty() && (kind == "ioapic" || kind == "hpet") {
                if let Some((base, len)) =
                    dmfabric_devices::DeviceKind::parse(&kind, &[]).ok().and_then(|k| k.usual_mmio())
                {
                    ranges.push(Range { mmio: true, base, len: len.into() });
                }
            }
            if blk && irq.is_empty() {
                irq.push(pc::VIRTIO_BLK_IRQ);
            }
            Change::AddDevice(Device { id, kind, server, shard, vm, ranges, irqs: irq, image })
        }
    };
    Ok((change, create))
}

/// A virtio-blk's image, on this machine: created `create` bytes large if
/// it is not there (kept if it is that size already), or there already.
/// Says what it did, if anything.
fn prepare_image(image: &BlockImage, create: Option<u64>) -> anyhow::Result<Option<String>> {
    let path = Path::new(&image.path);
    let there = path.exists();
    if let Some(size) = create {
        dmfabric_storage::create_image(path, size)?;
        if !there {
            return Ok(Some(format!(
                "created image {} ({size} bytes) on this machine: the server opens that path",
                image.path
            )));
        }
        return Ok(None);
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!("image {} is a directory: give a raw image file", image.path),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("image {} does not exist: pass --size (e.g. --size 64M) to create it, or create it first", image.path)
        }
        Err(e) => bail!("image {}: {e}", image.path),
    }
}

fn ranges(d: &Device) -> String {
    d.ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// A device's image as the table shows it: its path, "(read-only)", or "-".
fn image(d: &Device) -> String {
    d.image.as_ref().map_or_else(|| "-".into(), ToString::to_string)
}

fn print_table(db: &Db, what: Option<What>) {
    let all = what.is_none();
    if all || what == Some(What::Clients) {
        println!("{:<8} {:<18} {:<10}", "CLIENT", "MAC", "HYPERVISOR");
        for c in db.clients.values() {
            println!("{:<8} {:<18} {} ({})", c.id, c.mac, c.hypervisor, c.hypervisor_kind);
        }
    }
    if all || what == Some(What::Servers) {
        println!("{:<8} {:<18} {:<6}", "SERVER", "MAC", "ROLE");
        for s in db.servers.values() {
            println!("{:<8} {:<18} {:?}", s.id, s.mac, s.role);
        }
    }
    if all || what == Some(What::Vms) {
        println!("{:<8} {:<8} {:<6} {:<8} {:<10} {:<8} IMAGE", "VM", "CLIENT", "VCPUS", "MEM MIB", "STATE", "IRQCHIP");
        for v in db.vms.values() {
            println!(
                "{:<8} {:<8} {:<6} {:<8} {:<10} {:<8} {}",
                v.id,
                v.client,
                v.vcpus,
                v.memory_mib,
                format!("{:?}", v.state),
                v.irqchip.to_string(),
                v.image
            );
        }
    }
    if all || what == Some(What::Devices) {
        println!(
            "{:<8} {:<10} {:<8} {:<6} {:<6} {:<10} {:<24} IMAGE",
            "DEVICE", "KIND", "SERVER", "SHARD", "VM", "IRQS", "RANGES"
        );
        for d in db.devices.values() {
            let irqs = d.irqs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            println!(
                "{:<8} {:<10} {:<8} {:<6} {:<6} {:<10} {:<24} {}",
                d.id,
                d.kind,
                d.server,
                d.shard,
                d.vm,
                irqs,
                ranges(d),
                image(d)
            );
        }
    }
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    if args.store.starts_with("etcd://") {
        eprintln!(
            "dmfabric: warning: {} is etcd over plain http without authentication: anyone who reaches it can read the keys and change the control panel (use etcds://)",
            args.store
        );
    }
    if matches!(args.cmd, CtlCmd::EtcdAuth) {
        return etcd_auth(&args.store);
    }
    let store = dmfabric_control::store::open(&args.store)?;
    let commit = |changes: &[Change]| -> anyhow::Result<u64> {
        let (revision, said) = store.commit(changes)?;
        for line in said {
            println!("{line}");
        }
        println!("(revision {revision})");
        // Placement decides which server may read which client's keys.
        let access = store.sync_access().with_context(|| {
            format!("revision {revision} is in, but etcd's grants do not follow it yet: run dmfabric ctl etcd-auth")
        })?;
        for line in access {
            println!("{line}");
        }
        Ok(revision)
    };
    match args.cmd {
        CtlCmd::Ls { what, json } => {
            let db = store.load()?;
            if json {
                let value = match what {
                    None => serde_json::to_value(&db)?,
                    Some(What::Clients) => serde_json::to_value(db.clients.values().collect::<Vec<_>>())?,
                    Some(What::Servers) => serde_json::to_value(db.servers.values().collect::<Vec<_>>())?,
                    Some(What::Vms) => serde_json::to_value(db.vms.values().collect::<Vec<_>>())?,
                    Some(What::Devices) => serde_json::to_value(db.devices.values().collect::<Vec<_>>())?,
                };
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_table(&db, what);
            }
        }
        CtlCmd::Show { what, id, json } => {
            let db = store.load()?;
            let value = match what {
                One::Client => u16::try_from(id).ok().and_then(|i| db.clients.get(&i)).map(serde_json::to_value),
                One::Server => u16::try_from(id).ok().and_then(|i| db.servers.get(&i)).map(serde_json::to_value),
                One::Vm => db.vms.get(&id).map(serde_json::to_value),
                One::Device => db.devices.get(&id).map(serde_json::to_value),
            };
            let Some(value) = value.transpose()? else { bail!("no {what:?} {id}") };
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else if let Some(map) = value.as_object() {
                for (k, v) in map {
                    println!("{k:<16} {v}");
                }
            }
        }
        CtlCmd::Add(cmd) => {
            let (change, create) = change(cmd)?;
            let mut made = None;
            if let Change::AddDevice(Device { image: Some(image), .. }) = &change {
                // What the store would refuse is refused before the image is touched.
                store.load()?.check(&change)?;
                made = prepare_image(image, create)?;
            }
            commit(std::slice::from_ref(&change))?;
            if let Some(line) = made {
                println!("{line}");
            }
            if let Change::AddClient(c) = change {
                let keys = ClientKeys::generate(c.id)?;
                let revision = store.put_client_keys(&keys).with_context(|| {
                    format!("client platform {} is in, but its key is not: dmfabric ctl client rekey {}", c.id, c.id)
                })?;
                println!(
                    "made key 1 of client platform {} (revision {revision}); hosts run from a config need it as a file: dmfabric ctl client export-key {} --out FILE",
                    c.id, c.id
                );
            }
        }
        CtlCmd::Rm { what, id } => {
            let narrow = || u16::try_from(id).with_context(|| format!("{what:?} ids are 16-bit"));
            let c = match what {
                One::Client => Change::RemoveClient(narrow()?),
                One::Server => Change::RemoveServer(narrow()?),
                One::Vm => Change::RemoveVm(id),
                One::Device => Change::RemoveDevice(id),
            };
            let gone = matches!(c, Change::RemoveClient(_));
            commit(&[c])?;
            if gone {
                println!("(its keys are removed with it)");
            }
        }
        CtlCmd::Vm(cmd) => {
            let (id, action) = match cmd {
                VmCmd::Launch { id } => (id, Lifecycle::Launch),
                VmCmd::Suspend { id } => (id, Lifecycle::Suspend),
                VmCmd::Resume { id } => (id, Lifecycle::Resume),
                VmCmd::Shutdown { id } => (id, Lifecycle::Shutdown),
                VmCmd::Migrate { id, to } => (id, Lifecycle::Migrate(to)),
            };
            let db = store.load()?;
            let Some(vm) = db.vms.get(&id) else { bail!("no VM {id}") };
            commit(&[Change::UpdateVm(vm.after(action)?)])?;
        }
        CtlCmd::Device(DeviceCmd::Move { id, to, shard }) => {
            let db = store.load()?;
            let Some(d) = db.devices.get(&id) else { bail!("no device {id}") };
            let moved = Device { server: to, shard: shard.unwrap_or(d.shard), ..d.clone() };
            let (from, image) = (d.server, d.image.clone());
            commit(&[Change::UpdateDevice(moved)])?;
            if let Some(image) = image.filter(|_| from != to) {
                println!(
                    "server {to} opens the image {} as server {from} did: both need it at that path (shared storage), or the device runs there as an empty drive",
                    image.path
                );
            }
        }
        CtlCmd::Client(cmd) => client_keys_cmd(&*store, cmd)?,
        // Handled above, before a store is opened; here for completeness.
        CtlCmd::EtcdAuth => etcd_auth(&args.store)?,
    }
    Ok(())
}
