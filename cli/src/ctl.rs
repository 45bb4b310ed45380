//! `dmfabric ctl`: list, show and edit the control panel's database. Every
//! edit is checked against the stored database before it is written and
//! says what it changed; a conflict is one line naming it.

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use dmfabric_control::model::{Change, ClientPlatform, Db, Device, Lifecycle, Range, Server, ServerRole, Vm, VmState};
use dmfabric_control::store::DEFAULT_STORE;

use crate::io::number;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The store: a redb file (created if missing) or etcd://HOST:PORT[,HOST:PORT...].
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
    },
    Device {
        #[arg(long)]
        id: u32,
        /// uart, rtc, i8042, timer, regfile or irqtest.
        #[arg(long)]
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
        /// MMIO ranges, BASE:LEN (repeatable).
        #[arg(long)]
        mmio: Vec<String>,
        /// Interrupt lines (repeatable).
        #[arg(long)]
        irq: Vec<u32>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Owner,
    Io,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Place a device on another server (and shard).
    Move {
        id: u32,
        #[arg(long)]
        to: u16,
        #[arg(long)]
        shard: Option<u32>,
    },
}

fn range(s: &str, mmio: bool) -> anyhow::Result<Range> {
    let (b, l) = s.split_once(':').with_context(|| format!("{s:?}: a range is BASE:LEN"))?;
    Ok(Range { mmio, base: number(b)?, len: number(l)? })
}

fn change(cmd: AddCmd) -> anyhow::Result<Change> {
    Ok(match cmd {
        AddCmd::Client { id, mac, hypervisor } => {
            Change::AddClient(ClientPlatform { id, mac, hypervisor, hypervisor_kind: "kvm".into() })
        }
        AddCmd::Server { id, mac, role } => Change::AddServer(Server {
            id,
            mac,
            role: if role == Role::Owner { ServerRole::Owner } else { ServerRole::Io },
        }),
        AddCmd::Vm { id, client, vcpus, memory_mib, image, owner, args } => {
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
            })
        }
        AddCmd::Device { id, kind, server, vm, shard, pio, mmio, irq } => {
            let mut ranges = Vec::new();
            for p in &pio {
                ranges.push(range(p, false)?);
            }
            for m in &mmio {
                ranges.push(range(m, true)?);
            }
            Change::AddDevice(Device { id, kind, server, shard, vm, ranges, irqs: irq })
        }
    })
}

fn ranges(d: &Device) -> String {
    d.ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
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
        println!("{:<8} {:<8} {:<6} {:<8} {:<10} IMAGE", "VM", "CLIENT", "VCPUS", "MEM MIB", "STATE");
        for v in db.vms.values() {
            println!(
                "{:<8} {:<8} {:<6} {:<8} {:<10} {}",
                v.id,
                v.client,
                v.vcpus,
                v.memory_mib,
                format!("{:?}", v.state),
                v.image
            );
        }
    }
    if all || what == Some(What::Devices) {
        println!("{:<8} {:<8} {:<8} {:<6} {:<6} {:<10} RANGES", "DEVICE", "KIND", "SERVER", "SHARD", "VM", "IRQS");
        for d in db.devices.values() {
            let irqs = d.irqs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            println!("{:<8} {:<8} {:<8} {:<6} {:<6} {:<10} {}", d.id, d.kind, d.server, d.shard, d.vm, irqs, ranges(d));
        }
    }
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let store = dmfabric_control::store::open(&args.store)?;
    let commit = |changes: &[Change]| -> anyhow::Result<()> {
        let (revision, said) = store.commit(changes)?;
        for line in said {
            println!("{line}");
        }
        println!("(revision {revision})");
        Ok(())
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
        CtlCmd::Add(cmd) => commit(&[change(cmd)?])?,
        CtlCmd::Rm { what, id } => {
            let narrow = || u16::try_from(id).with_context(|| format!("{what:?} ids are 16-bit"));
            let c = match what {
                One::Client => Change::RemoveClient(narrow()?),
                One::Server => Change::RemoveServer(narrow()?),
                One::Vm => Change::RemoveVm(id),
                One::Device => Change::RemoveDevice(id),
            };
            commit(&[c])?;
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
            commit(&[Change::UpdateDevice(moved)])?;
        }
    }
    Ok(())
}
