//! A VM on KVM with guest memory and vCPUs started in 64-bit long mode, and
//! a run loop that turns each port-I/O or MMIO exit into a plain [`Exit`]
//! value for the caller to decide on (the decision is a function of the
//! exit, testable without KVM). The only `unsafe` of this crate is here.
//!
//! Guest-physical layout of a test VM:
//!
//! ```text
//! 0x0500  GDT (null, 64-bit code, data)
//! 0x1000  PML4, 0x2000 PDPT, 0x3000..0x6fff four page directories:
//!         the first 4 GiB identity-mapped with 2 MiB pages, so MMIO
//!         below 4 GiB is reachable
//! 0x8_0000 initial stack (grows down)
//! 0x10_0000 guest code (guests::LOAD_ADDR)
//! ```

#![allow(unsafe_code)]

use std::cell::Cell;
use std::io;
use std::sync::{Arc, Mutex, Once};

use dmfabric_wire::{AccessSize, Direction, IrqSource, Space, Trigger};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msi, kvm_msr_entry,
    kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    kvm_xcrs, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memmap2::MmapMut;

const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
/// Top of the initial stack of vCPU 0; vCPU `n` starts [`STACK_BYTES`] × n lower.
pub const STACK_TOP: u64 = 0x8_0000;
/// Stack of each test vCPU.
pub const STACK_BYTES: u64 = 0x4000;
/// Most vCPUs a test VM can have (their stacks sit below [`STACK_TOP`]).
pub const MAX_VCPUS: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("No /dev/kvm: this host has no KVM; load kvm_intel or kvm_amd, or enable nested virtualisation")]
    NoKvm,
    #[error("Cannot open /dev/kvm: permission denied; run as root or join the kvm group")]
    NoPermission,
    #[error("{what}: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot allocate {0} bytes of guest memory: {1}")]
    Memory(usize, #[source] io::Error),
    #[error("The guest image ({len} bytes at {addr:#x}) does not fit in {mem} bytes of guest memory")]
    ImageTooBig { addr: u64, len: usize, mem: usize },
    #[error("Guest memory can be written only before the VM's interrupt handles are given out")]
    MemoryShared,
    #[error("The guest stopped: {0}")]
    Guest(String),
    #[error("A {space:?} access of {len} bytes at {addr:#x}")]
    BadAccess { space: Space, addr: u64, len: usize },
    #[error("MSR list: {0}")]
    Msrs(String),
    #[error("KVM_SET_MSRS refused MSR {0:#x} of the saved state")]
    MsrRefused(u32),
    #[error("Cannot install the vCPU kick signal handler: {0}")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    #[error("vCPU {0} is out of range: a test VM has at most {MAX_VCPUS}")]
    TooManyVcpus(u64),
    /// Asked to stop, and why (another vCPU failed, the run limit, Ctrl-C).
    #[error("{0}")]
    Stopped(String),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// One port-I/O or MMIO exit, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub space: Space,
    pub addr: u64,
    pub size: AccessSize,
    pub dir: Direction,
    /// Write data (zero for reads).
    pub data: u64,
}

/// What the exit handler wants after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Re-enter the guest; the value is the data of a read.
    Continue(u64),
    /// The guest asked to stop (a test guest's exit port) with this code.
    Exit(u32),
    /// A device model of the VM reset it (a local i8042): stop cleanly.
    Reset,
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub io_exits: u64,
    pub mmio_exits: u64,
    /// KVM_RUN returns without an exit to serve (a signal, a kick).
    pub interrupted: u64,
    /// The code the guest exited with.
    pub exit_code: u32,
    /// Stopped cleanly from outside the guest's exit port: reset by a
    /// device, shut down or migrated (the VM's report says which).
    pub reset: bool,
}

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

thread_local! {
    /// The `immediate_exit` byte of the kvm_run page of the vCPU this
    /// thread runs, while it is inside [`Vcpu::run`].
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Firecracker's way: make the vCPU's next (or current) KVM_RUN return at
    // once, so a kick that lands just before the thread enters the guest is
    // not lost.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: IMMEDIATE_EXIT is set by this thread to a byte of its
        // vCPU's kvm_run page — a mapping the VcpuFd owns for the whole of
        // `Vcpu::run` — and cleared before `run` returns; a signal handler
        // runs on the thread it interrupts, so the page is mapped here. The
        // page is shared with the kernel, which reads this byte on KVM_RUN:
        // a volatile one-byte store, nothing else, is all that happens.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// Install the kick signal's handler (once per process).
fn install_kick_handler() -> Result<(), KvmError> {
    static HANDLER: Once = Once::new();
    let mut installed = Ok(());
    HANDLER.call_once(|| installed = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal));
    installed.map_err(KvmError::KickHandler)
}

/// Kick the vCPU thread `thread` out of KVM_RUN (a thread that is not
/// inside [`Vcpu::run`] ignores the signal).
pub fn kick<T>(thread: &std::thread::JoinHandle<T>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: a JoinHandle that exists has not been joined, so the thread's
    // pthread_t is valid (an ended thread that was not joined can still be
    // signalled: pthread_kill returns ESRCH or does nothing). The handler
    // only sets immediate_exit; it is installed before any vCPU runs, and
    // without it the real-time signal would not be sent to a thread that
    // runs no vCPU anyway (only vCPU threads are kicked).
    unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
}

/// What a VM's vCPUs and interrupt handles share. `fd` is declared before
/// `mem`, so it drops (and KVM forgets the memory region) before the memory
/// is unmapped; and since every holder of the VM fd holds this whole
/// struct, no fd can outlive the memory registered with it.
struct VmShared {
    fd: VmFd,
    mem: Arc<MmapMut>,
    kvm: Kvm,
    irqchip: IrqChipMode,
    /// Split irqchip: the level-triggered MSIs seen so far, each on a GSI
    /// below [`SPLIT_IRQCHIP_PINS`] so that KVM exits on their EOIs.
    level_routes: Mutex<Vec<(u64, u32)>>,
}

/// Where a VM's interrupt controllers are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IrqChipMode {
    /// KVM's PIC, I/O APIC and local APICs, and its PIT.
    #[default]
    Kernel,
    /// KVM_CAP_SPLIT_IRQCHIP: the local APICs in KVM, the I/O APIC a
    /// device model (on a server): its messages come as MSIs, and the EOIs
    /// of level-triggered vectors leave KVM ([`IOAPIC_EOI`]). No PIC, no PIT.
    Split,
}

/// Pins of the I/O APIC a split irqchip has outside KVM.
pub const SPLIT_IRQCHIP_PINS: u64 = 24;

/// Where a split irqchip VM's EOI of a level-triggered vector goes: the
/// I/O APIC's EOI register (the vCPU writes the vector there, to the model).
pub const IOAPIC_EOI: u64 = dmfabric_devices::platform::pc::IOAPIC_MMIO + 0x40;

/// A VM with its guest memory.
pub struct Vm {
    shared: Arc<VmShared>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("mem_bytes", &self.shared.mem.len()).finish()
    }
}

fn open_kvm() -> Result<Kvm, KvmError> {
    const ENOENT: i32 = 2;
    const EPERM: i32 = 1;
    const EACCES: i32 = 13;
    Kvm::new().map_err(|e| match e.errno() {
        ENOENT => KvmError::NoKvm,
        EPERM | EACCES => KvmError::NoPermission,
        _ => KvmError::Ioctl { what: "open /dev/kvm", source: e },
    })
}

/// Can this process use KVM? (Opens /dev/kvm and closes it again.)
pub fn probe() -> Result<(), KvmError> {
    open_kvm().map(drop)
}

impl Vm {
    /// A VM with `mem_bytes` of guest memory at guest-physical 0.
    pub fn new(mem_bytes: usize) -> Result<Vm, KvmError> {
        Vm::with_irqchip(mem_bytes, IrqChipMode::Kernel)
    }

    /// A VM with `mem_bytes` of guest memory and its interrupt controllers
    /// where `irqchip` says.
    pub fn with_irqchip(mem_bytes: usize, irqchip: IrqChipMode) -> Result<Vm, KvmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        match irqchip {
            IrqChipMode::Kernel => {
                // The in-kernel PIC, IOAPIC and local APICs, and the PIT:
                // interrupts are injected with KVM_IRQ_LINE / KVM_SIGNAL_MSI
                // on the VM fd and a halted vCPU waits in the kernel.
                fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
                let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
                fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
            }
            IrqChipMode::Split => {
                // Before any vCPU: the local APICs stay in the kernel.
                let mut cap =
                    kvm_bindings::kvm_enable_cap { cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP, ..Default::default() };
                cap.args[0] = SPLIT_IRQCHIP_PINS;
                fd.enable_cap(&cap).map_err(ioctl("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
            }
        }
        let mem = MmapMut::map_anon(mem_bytes).map_err(|e| KvmError::Memory(mem_bytes, e))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes as u64,
            userspace_addr: mem.as_ptr() as u64,
        };
        // SAFETY: the region is `mem`, a private anonymous mapping that
        // `VmShared` owns together with `fd`: the memory is unmapped only
        // when the last holder of the VM fd (a `Vm`, a `Vcpu`, an
        // `IrqHandle`) is gone, after the fd itself is closed (field order),
        // and when no `GuestRam` holds it any more (a `GuestRam` keeps the
        // mapping, not the fd: memory outliving the fd is harmless).
        unsafe { fd.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        let shared = VmShared { fd, mem: Arc::new(mem), kvm, irqchip, level_routes: Mutex::new(Vec::new()) };
        let mut vm = Vm { shared: Arc::new(shared) };
        write_page_tables_and_gdt(vm.memory_mut()?);
        Ok(vm)
    }

    fn fd(&self) -> &VmFd {
        &self.shared.fd
    }

    /// Copy `bytes` into guest memory at `addr`.
    pub fn load(&mut self, addr: u64, bytes: &[u8]) -> Result<(), KvmError> {
        let mem = self.memory_mut()?;
        let start = addr as usize;
        let end = start.checked_add(bytes.len()).filter(|&e| e <= mem.len());
        let Some(end) = end else {
            return Err(KvmError::ImageTooBig { addr, len: bytes.len(), mem: mem.len() });
        };
        mem[start..end].copy_from_slice(bytes);
        Ok(())
    }
}

fn write_u64(mem: &mut [u8], addr: u64, v: u64) {
    let a = addr as usize;
    mem[a..a + 8].copy_from_slice(&v.to_le_bytes());
}

fn write_page_tables_and_gdt(mem: &mut [u8]) {
    // GDT: null, 64-bit code (selector 0x8, test guests), 64-bit code
    // (0x10) and data (0x18): Linux's __BOOT_CS and __BOOT_DS.
    let code = 0x00af_9b00_0000_ffff;
    for (i, entry) in [0u64, code, code, 0x00cf_9300_0000_ffff].into_iter().enumerate() {
        write_u64(mem, GDT_ADDR + 8 * i as u64, entry);
    }
    const PRESENT_RW: u64 = 0b11;
    const HUGE: u64 = 1 << 7;
    write_u64(mem, PML4_ADDR, PDPT_ADDR | PRESENT_RW);
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        write_u64(mem, PDPT_ADDR + gib * 8, pd | PRESENT_RW);
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            write_u64(mem, pd + i * 8, phys | PRESENT_RW | HUGE);
        }
    }
}

impl Vm {
    /// A handle that raises this VM's interrupts from any thread.
    pub fn irq_handle(&self) -> IrqHandle {
        IrqHandle(self.shared.clone())
    }

    /// A handle on this VM's guest memory for device DMA from any thread
    /// ([`GuestRam`]); it keeps the memory mapped. Take it after loading:
    /// [`Vm::memory_mut`] fails while one exists.
    pub fn ram(&self) -> GuestRam {
        GuestRam { mem: self.shared.mem.clone() }
    }

    /// Bytes of guest memory at `addr` (None if out of range).
    pub fn memory(&self, addr: u64, len: usize) -> Option<&[u8]> {
        memory_at(&self.shared.mem, addr, len)
    }

    /// A vCPU in 64-bit long mode at CPL0, about to run `entry` with its
    /// own stack below [`STACK_TOP`] and `args` in rdi, rsi, rdx. vCPUs
    /// other than 0 start running too (no INIT/SIPI dance for test guests).
    pub fn long_mode_vcpu(&self, id: u64, entry: u64, args: [u64; 3]) -> Result<Vcpu, KvmError> {
        self.vcpu(id, VcpuStart { entry, args, code_selector: 0x8, hide_xsave_cx16: false })
    }

    /// vCPU `id` entering a Linux kernel's 64-bit entry point with the boot
    /// parameters at `zero_page` (rsi), as the x86 boot protocol asks:
    /// paging on, __BOOT_CS/__BOOT_DS loaded, interrupts off. CPUID hides
    /// XSAVE and CMPXCHG16B, which this host's nested hypervisor cannot
    /// emulate in guest kernel mode (MACHINE-FACTS.md).
    pub fn linux_vcpu(&self, id: u64, entry: u64, zero_page: u64) -> Result<Vcpu, KvmError> {
        self.vcpu(id, VcpuStart { entry, args: [0, zero_page, 0], code_selector: 0x10, hide_xsave_cx16: true })
    }

    fn vcpu(&self, id: u64, start: VcpuStart) -> Result<Vcpu, KvmError> {
        if id >= MAX_VCPUS {
            return Err(KvmError::TooManyVcpus(id));
        }
        let fd = self.fd().create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        if id != 0 {
            // With the in-kernel irqchip an AP waits for a SIPI; start it now.
            let runnable = kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE };
            fd.set_mp_state(runnable).map_err(ioctl("KVM_SET_MP_STATE"))?;
        }
        self.set_cpuid(&fd, id, start.hide_xsave_cx16)?;

        let mut sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: start.code_selector,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment { selector: 0x18, type_: 0x3, l: 0, db: 1, ..code };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 4 * 8 - 1;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 31); // PE, ET, NE, PG
        sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
        fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;

        let mut regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        regs.rip = start.entry;
        regs.rsp = STACK_TOP - id * STACK_BYTES;
        regs.rflags = 0x2;
        regs.rdi = start.args[0];
        regs.rsi = start.args[1];
        regs.rdx = start.args[2];
        fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(Vcpu { fd, vm: self.shared.clone() })
    }

    /// An application processor of a Linux VM: it waits, as on hardware,
    /// for the boot processor's INIT and SIPI.
    pub fn linux_ap(&self, id: u64) -> Result<Vcpu, KvmError> {
        if id == 0 || id >= MAX_VCPUS {
            return Err(KvmError::TooManyVcpus(id));
        }
        let fd = self.fd().create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        self.set_cpuid(&fd, id, true)?;
        Ok(Vcpu { fd, vm: self.shared.clone() })
    }

    /// KVM's supported CPUID with this vCPU's APIC id, and without XSAVE
    /// (and what needs it) and CMPXCHG16B if `hide_xsave_cx16`.
    fn set_cpuid(&self, fd: &VcpuFd, id: u64, hide_xsave_cx16: bool) -> Result<(), KvmError> {
        let mut cpuid =
            self.shared.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    // This vCPU's initial APIC id.
                    e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24);
                    if hide_xsave_cx16 {
                        const CX16: u32 = 1 << 13;
                        const XSAVE: u32 = 1 << 26;
                        const OSXSAVE: u32 = 1 << 27;
                        const AVX: u32 = 1 << 28;
                        e.ecx &= !(CX16 | XSAVE | OSXSAVE | AVX);
                    }
                }
                0xb | 0x1f => e.edx = id as u32,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))
    }

    /// Guest memory, for loaders: only before vCPUs, interrupt handles or
    /// RAM handles ([`Vm::ram`]) share the VM.
    pub fn memory_mut(&mut self) -> Result<&mut [u8], KvmError> {
        Arc::get_mut(&mut self.shared)
            .and_then(|s| Arc::get_mut(&mut s.mem))
            .map(|m| &mut m[..])
            .ok_or(KvmError::MemoryShared)
    }

    /// Guest memory as a whole (to move the VM: read while its vCPUs are held).
    pub fn all_memory(&self) -> &[u8] {
        &self.shared.mem
    }

    /// The VM-wide device state KVM keeps: both PICs, the I/O APIC, the
    /// PIT and the guest clock; with a split irqchip (those are models on a
    /// server, whose state stays there) the clock and the GSI routes of the
    /// level-triggered MSIs, so that their EOIs still leave KVM.
    pub fn save_state(&self) -> Result<VmDeviceState, KvmError> {
        let clock = self.fd().get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
        if self.shared.irqchip == IrqChipMode::Split {
            let level_routes = self.shared.level_routes.lock().unwrap_or_else(|e| e.into_inner()).clone();
            return Ok(VmDeviceState {
                pic_master: None,
                pic_slave: None,
                ioapic: None,
                pit: None,
                clock,
                level_routes,
            });
        }
        let chip = |id: u32| -> Result<kvm_irqchip, KvmError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd().get_irqchip(&mut c).map_err(ioctl("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmDeviceState {
            pic_master: Some(chip(KVM_IRQCHIP_PIC_MASTER)?),
            pic_slave: Some(chip(KVM_IRQCHIP_PIC_SLAVE)?),
            ioapic: Some(chip(KVM_IRQCHIP_IOAPIC)?),
            pit: Some(self.fd().get_pit2().map_err(ioctl("KVM_GET_PIT2"))?),
            clock,
            level_routes: Vec::new(),
        })
    }

    /// Put [`Vm::save_state`]'s state (from another host) into this VM.
    pub fn restore_state(&self, s: &VmDeviceState) -> Result<(), KvmError> {
        match (self.shared.irqchip, &s.pic_master, &s.pic_slave, &s.ioapic, &s.pit) {
            (IrqChipMode::Kernel, Some(master), Some(slave), Some(ioapic), Some(pit)) => {
                for chip in [master, slave, ioapic] {
                    self.fd().set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
                }
                self.fd().set_pit2(pit).map_err(ioctl("KVM_SET_PIT2"))?;
            }
            (IrqChipMode::Split, None, None, None, None) => {
                if s.level_routes.len() as u64 > SPLIT_IRQCHIP_PINS {
                    return Err(KvmError::Guest(format!(
                        "the snapshot has {} level interrupt routes, more than the {SPLIT_IRQCHIP_PINS} a split irqchip has",
                        s.level_routes.len()
                    )));
                }
                let mut routes = self.shared.level_routes.lock().unwrap_or_else(|e| e.into_inner());
                routes.clone_from(&s.level_routes);
                set_level_routes(&self.shared.fd, &routes)?;
            }
            (IrqChipMode::Kernel, ..) => {
                return Err(KvmError::Guest(
                    "the snapshot is of a VM whose I/O APIC is remote (split irqchip), this VM's is KVM's: give it irqchip = \"remote\" as before".into(),
                ))
            }
            (IrqChipMode::Split, ..) => {
                return Err(KvmError::Guest(
                    "the snapshot is of a VM with KVM's irqchip, this VM's I/O APIC is remote (split irqchip): give it irqchip = \"kernel\" as before".into(),
                ))
            }
        }
        // Only the clock value: the flags of the source host do not apply here.
        let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
        self.fd().set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

fn memory_at(mem: &[u8], addr: u64, len: usize) -> Option<&[u8]> {
    let start = usize::try_from(addr).ok()?;
    mem.get(start..start.checked_add(len)?)
}

/// A VM's guest memory as its devices see it: DMA by copy, from any thread,
/// while the guest runs. Cheap to clone (an `Arc` of the mapping, which it
/// keeps mapped: a handle may outlive its [`Vm`]).
///
/// The guest writes the same memory concurrently, as real hardware's DMA
/// races the CPU: [`GuestRam::read`] and [`GuestRam::write`] copy bytes in
/// or out and never hand out a reference into guest memory, so nothing in
/// Rust assumes those bytes hold still. What a copy sees of a range the
/// guest writes at the same time is the guest's business (a driver does
/// not touch a buffer it handed to its device).
#[derive(Clone)]
pub struct GuestRam {
    mem: Arc<MmapMut>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("size", &self.size()).finish()
    }
}

impl GuestRam {
    /// `size` bytes of zeroed memory that no VM uses: for tests, and tools
    /// that serve DMA without KVM.
    pub fn anonymous(size: usize) -> Result<GuestRam, KvmError> {
        let mem = MmapMut::map_anon(size).map_err(|e| KvmError::Memory(size, e))?;
        Ok(GuestRam { mem: Arc::new(mem) })
    }

    /// Bytes of guest memory, from guest-physical 0.
    pub fn size(&self) -> u64 {
        self.mem.len() as u64
    }

    /// Whether `[addr, addr + len)` is all guest memory (an empty range at
    /// the very end is; any range whose end overflows is not).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| end <= self.size())
    }

    /// The offset of `addr` in the mapping if `[addr, addr + len)` is all
    /// guest memory.
    fn offset(&self, addr: u64, len: usize) -> Option<usize> {
        let len = u64::try_from(len).ok()?;
        // Within the mapping, so it fits a usize.
        self.contains(addr, len).then_some(addr as usize)
    }

    /// Copy guest memory at `addr` into `buf`; false (and `buf` untouched)
    /// if the range is not all guest memory.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(off) = self.offset(addr, buf.len()) else { return false };
        // In ascending address order, eight bytes at a time (volatile loads
        // are not reordered by the compiler, nor loads by an x86 CPU): a
        // driver writes a ring's entries before its index, so a read that
        // takes the index first sees entries at least that new. (memcpy
        // may load the end of a range first, and did: a virtio-blk read an
        // available index newer than the entries after it.)
        let mut chunks = buf.chunks_exact_mut(8);
        let mut at = off;
        for word in &mut chunks {
            // SAFETY: `off + buf.len() <= size` (checked above, without
            // overflow) and `at + 8 <= off + buf.len()`, so the eight bytes
            // lie inside the mapping, which `self.mem` keeps mapped; the
            // pointer comes from the mapping's own raw pointer, and no Rust
            // reference into guest memory exists while this runs (GuestRam
            // never makes one; `Vm::memory_mut` cannot be reached while the
            // Arc is shared). `[u8; 8]` has alignment 1. The guest may write
            // the source concurrently: the bytes read are then old or new,
            // which is what a device's DMA sees on hardware too.
            let v = unsafe { std::ptr::read_volatile(self.mem.as_ptr().add(at) as *const [u8; 8]) };
            word.copy_from_slice(&v);
            at += 8;
        }
        for byte in chunks.into_remainder() {
            // SAFETY: as above, for one byte inside the checked range.
            *byte = unsafe { std::ptr::read_volatile(self.mem.as_ptr().add(at)) };
            at += 1;
        }
        true
    }

    /// Copy `data` into guest memory at `addr`; false (and nothing
    /// written) if the range is not all guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some(off) = self.offset(addr, data.len()) else { return false };
        // SAFETY: as in `read`: the destination range is inside the
        // mapping (checked, no overflow), which stays mapped while `self`
        // lives, and it is a writable (PROT_WRITE, MAP_PRIVATE anonymous)
        // mapping. The pointer is the mapping's raw pointer, never derived
        // from a Rust reference to its bytes, and no such reference exists
        // now, so writing through it does not break aliasing rules; `data`
        // is ordinary memory (a shared borrow of it cannot point into guest
        // memory, since no reference into it is ever handed out), so the
        // ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.mem.as_ptr().cast_mut().add(off), data.len()) };
        true
    }
}

/// Where a VM's interrupts are delivered: the one delivery abstraction
/// (device models raise lines through `dmfabric_devices::IrqLine`; what
/// their lines, or Interrupt frames, turn into is an `inject`).
pub trait IrqSink: Send + Sync {
    fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), KvmError>;
}

/// Injects into a VM through its VM fd (KVM_IRQ_LINE, KVM_SIGNAL_MSI): VM
/// ioctls, cheap, from any thread.
#[derive(Clone)]
pub struct IrqHandle(Arc<VmShared>);

impl std::fmt::Debug for IrqHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqHandle")
    }
}

impl IrqHandle {
    pub fn set_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        self.0.fd.set_irq_line(gsi, level).map_err(ioctl("KVM_IRQ_LINE"))
    }

    /// Deliver a message-signalled interrupt.
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<(), KvmError> {
        if self.0.irqchip == IrqChipMode::Split && data & (1 << 15) != 0 {
            self.track_level(address, data)?;
        }
        let msi =
            kvm_msi { address_lo: address as u32, address_hi: (address >> 32) as u32, data, ..Default::default() };
        self.0.fd.signal_msi(msi).map(|_| ()).map_err(ioctl("KVM_SIGNAL_MSI"))
    }

    /// A split irqchip exits on the EOI of a vector only if a GSI route
    /// below [`SPLIT_IRQCHIP_PINS`] sends a level-triggered MSI with it (KVM
    /// scans those routes for the I/O APIC's vectors): give each level
    /// message seen one (the oldest gives up its place past 24).
    fn track_level(&self, address: u64, data: u32) -> Result<(), KvmError> {
        let mut routes = self.0.level_routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.contains(&(address, data)) {
            return Ok(());
        }
        if routes.len() as u64 >= SPLIT_IRQCHIP_PINS {
            routes.remove(0);
        }
        routes.push((address, data));
        set_level_routes(&self.0.fd, &routes)
    }
}

/// Route GSI `i` to level MSI `routes[i]`: KVM then exits on their EOIs.
fn set_level_routes(fd: &VmFd, routes: &[(u64, u32)]) -> Result<(), KvmError> {
    let entries: Vec<kvm_bindings::kvm_irq_routing_entry> = routes
        .iter()
        .zip(0u32..)
        .map(|(&(address, data), gsi)| {
            let mut e = kvm_bindings::kvm_irq_routing_entry {
                gsi,
                type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_bindings::kvm_irq_routing_msi {
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
                ..Default::default()
            };
            e
        })
        .collect();
    let table = kvm_bindings::KvmIrqRouting::from_entries(&entries)
        .map_err(|_| KvmError::Guest("too many interrupt routes".into()))?;
    fd.set_gsi_routing(&table).map_err(ioctl("KVM_SET_GSI_ROUTING"))
}

impl IrqSink for IrqHandle {
    /// A level is mirrored exactly; an edge is a raise and a lower. A VM
    /// with a split irqchip has no I/O APIC or PIC in KVM to raise a line
    /// on (its GSIs below 24 route level MSIs): a line is refused.
    fn inject(&self, source: IrqSource, trigger: Trigger) -> Result<(), KvmError> {
        match (source, trigger) {
            (IrqSource::Line(gsi), _) if self.0.irqchip == IrqChipMode::Split => Err(KvmError::Guest(format!(
                "line {gsi}: this VM's I/O APIC is remote (split irqchip), so its lines go to that model, not to KVM"
            ))),
            (IrqSource::Line(gsi), Trigger::Level { asserted }) => self.set_line(gsi, asserted),
            (IrqSource::Line(gsi), Trigger::Edge) => self.set_line(gsi, true).and_then(|()| self.set_line(gsi, false)),
            (IrqSource::Msi { address, data }, _) => self.signal_msi(address, data),
        }
    }
}

/// A vCPU's architectural state, to move it to another host.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: FpuState,
    xcrs: Option<kvm_xcrs>,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

/// kvm_fpu's fields (kvm-bindings gives it no serde).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

/// The device state KVM keeps per VM: the in-kernel irqchip and PIT (none
/// with a split irqchip), the clock, and a split irqchip's level routes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmDeviceState {
    #[serde(default)]
    pic_master: Option<kvm_irqchip>,
    #[serde(default)]
    pic_slave: Option<kvm_irqchip>,
    #[serde(default)]
    ioapic: Option<kvm_irqchip>,
    #[serde(default)]
    pit: Option<kvm_pit_state2>,
    clock: kvm_clock_data,
    /// Split irqchip: the level MSIs on GSI routes, in GSI order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    level_routes: Vec<(u64, u32)>,
}

/// How a vCPU starts.
#[derive(Debug, Clone, Copy)]
struct VcpuStart {
    entry: u64,
    args: [u64; 3],
    code_selector: u16,
    hide_xsave_cx16: bool,
}

/// One vCPU of a [`Vm`] (whose fd and memory it keeps alive); runs on the
/// thread that calls [`Vcpu::run`].
pub struct Vcpu {
    fd: VcpuFd,
    vm: Arc<VmShared>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vcpu")
    }
}

fn le(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

/// Why a vCPU's run ended with an error: KVM's, or its exit handler's.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Exit(E),
}

/// What happens before each entry into the guest: the vCPU's owner looks
/// at its events (and may hold, save or stop the vCPU) — see `crate::vcpu`.
#[derive(Debug)]
pub enum Entry {
    /// Enter the guest.
    Run,
    /// End the run cleanly (shut down, migrated, reset).
    End,
    /// End the run with this error.
    Fail(KvmError),
}

impl Vcpu {
    /// Run until the guest exits through its exit port, the handler fails,
    /// or `before` ends the run. Every port-I/O and MMIO exit goes to
    /// `on_exit`; its error stops the VM. A kick ([`kick_thread`]) makes
    /// KVM_RUN return, also while the guest is halted, and `before` is
    /// asked again.
    pub fn run<E>(
        &mut self,
        before: &mut dyn FnMut(&mut Vcpu) -> Entry,
        on_exit: &mut dyn FnMut(&Exit) -> Result<Flow, E>,
    ) -> Result<RunStats, RunError<E>> {
        install_kick_handler()?;
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|f| f.set(flag));
        let result = self.run_loop(before, on_exit);
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
        result
    }

    fn run_loop<E>(
        &mut self,
        before: &mut dyn FnMut(&mut Vcpu) -> Entry,
        on_exit: &mut dyn FnMut(&Exit) -> Result<Flow, E>,
    ) -> Result<RunStats, RunError<E>> {
        const EINTR: i32 = 4;
        const EAGAIN: i32 = 11;
        let mut stats = RunStats::default();
        loop {
            match before(self) {
                Entry::Run => {}
                Entry::End => {
                    stats.reset = true;
                    return Ok(stats);
                }
                Entry::Fail(e) => return Err(e.into()),
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == EINTR || e.errno() == EAGAIN => {
                    // A kick: the next entry is the guest's again unless `before` says otherwise.
                    self.fd.set_kvm_immediate_exit(0);
                    stats.interrupted += 1;
                    continue;
                }
                Err(e) => return Err(KvmError::Ioctl { what: "KVM_RUN", source: e }.into()),
            };
            let flow = match exit {
                VcpuExit::IoOut(port, data) => {
                    stats.io_exits += 1;
                    let e = io_exit(Space::Pio, u64::from(port), data.len(), Direction::Write, le(data))?;
                    on_exit(&e)
                }
                VcpuExit::IoIn(port, data) => {
                    stats.io_exits += 1;
                    let e = io_exit(Space::Pio, u64::from(port), data.len(), Direction::Read, 0)?;
                    let flow = on_exit(&e);
                    if let Ok(Flow::Continue(v)) = flow {
                        let n = data.len().min(8);
                        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
                    }
                    flow
                }
                VcpuExit::MmioWrite(addr, data) => {
                    stats.mmio_exits += 1;
                    let e = io_exit(Space::Mmio, addr, data.len(), Direction::Write, le(data))?;
                    on_exit(&e)
                }
                VcpuExit::MmioRead(addr, data) => {
                    stats.mmio_exits += 1;
                    let e = io_exit(Space::Mmio, addr, data.len(), Direction::Read, 0)?;
                    let flow = on_exit(&e);
                    if let Ok(Flow::Continue(v)) = flow {
                        let n = data.len().min(8);
                        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
                    }
                    flow
                }
                VcpuExit::IoapicEoi(vector) => {
                    // A split irqchip's level-triggered vector is done: to
                    // the I/O APIC model, as a write of its EOI register.
                    stats.mmio_exits += 1;
                    let e = io_exit(Space::Mmio, IOAPIC_EOI, 4, Direction::Write, u64::from(vector))?;
                    on_exit(&e)
                }
                VcpuExit::Intr => {
                    stats.interrupted += 1;
                    continue;
                }
                VcpuExit::InternalError => {
                    let what = "KVM_EXIT_INTERNAL_ERROR (the host could not emulate an instruction)";
                    return Err(KvmError::Guest(self.describe(what)).into());
                }
                VcpuExit::Shutdown => {
                    return Err(KvmError::Guest(self.describe("KVM_EXIT_SHUTDOWN (a triple fault)")).into())
                }
                other => {
                    let what = format!("exit {other:?}");
                    return Err(KvmError::Guest(self.describe(&what)).into());
                }
            };
            match flow {
                Ok(Flow::Continue(_)) => {}
                Ok(Flow::Exit(code)) => {
                    stats.exit_code = code;
                    return Ok(stats);
                }
                Ok(Flow::Reset) => {
                    stats.reset = true;
                    return Ok(stats);
                }
                Err(e) => return Err(RunError::Exit(e)),
            }
        }
    }
}

impl Vcpu {
    /// Finish the I/O exit just served (its data goes into the guest on the
    /// next KVM_RUN): with immediate_exit that run completes it and returns
    /// at once, so the state read afterwards is the one after the instruction.
    pub fn finish_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// The vCPU's architectural state (call while it is out of the guest,
    /// with no I/O pending).
    pub fn save(&self) -> Result<VcpuState, KvmError> {
        let fd = &self.fd;
        let fpu = fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?;
        Ok(VcpuState {
            regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            fpu: FpuState {
                fpr: fpu.fpr,
                fcw: fpu.fcw,
                fsw: fpu.fsw,
                ftwx: fpu.ftwx,
                last_opcode: fpu.last_opcode,
                last_ip: fpu.last_ip,
                last_dp: fpu.last_dp,
                xmm: fpu.xmm,
                mxcsr: fpu.mxcsr,
            },
            xcrs: fd.get_xcrs().ok(),
            lapic: fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            msrs: self.save_msrs()?,
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            debugregs: fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Every MSR KVM lists that this vCPU can read.
    fn save_msrs(&self) -> Result<Vec<kvm_msr_entry>, KvmError> {
        let list = self.vm.kvm.get_msr_index_list().map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let mut out = Vec::new();
        for chunk in list.as_slice().chunks(64) {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Msrs(format!("{e:?}")))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
            if n == entries.len() {
                out.extend_from_slice(msrs.as_slice());
                continue;
            }
            // KVM stops at the first MSR it cannot read: take them one by one.
            for e in &entries {
                let mut one =
                    Msrs::from_entries(std::slice::from_ref(e)).map_err(|e| KvmError::Msrs(format!("{e:?}")))?;
                if self.fd.get_msrs(&mut one).map_err(ioctl("KVM_GET_MSRS"))? == 1 {
                    out.extend_from_slice(one.as_slice());
                }
            }
        }
        Ok(out)
    }

    /// Put `state` (from [`Vcpu::save`] on another host) into this vCPU
    /// before it first runs.
    pub fn restore(&self, state: &VcpuState) -> Result<(), KvmError> {
        let fd = &self.fd;
        fd.set_mp_state(state.mp_state).map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        let f = &state.fpu;
        let fpu = kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        }
        fd.set_lapic(&state.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        for chunk in state.msrs.chunks(64) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| KvmError::Msrs(format!("{e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(KvmError::MsrRefused(chunk[n].index));
            }
        }
        fd.set_vcpu_events(&state.events).map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&state.debugregs).map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }

    /// `what` happened: where (RIP) and the instruction bytes there.
    fn describe(&self, what: &str) -> String {
        let Ok(regs) = self.fd.get_regs() else { return format!("{what}; registers unreadable") };
        let bytes = self
            .fd
            .translate_gva(regs.rip)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| memory_at(&self.vm.mem, t.physical_address, 16))
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "));
        match bytes {
            Some(b) => format!("{what} at rip {:#x}, instruction bytes {b}", regs.rip),
            None => format!("{what} at rip {:#x}", regs.rip),
        }
    }
}

fn io_exit(space: Space, addr: u64, len: usize, dir: Direction, data: u64) -> Result<Exit, KvmError> {
    let size = AccessSize::new(len as u8, space).ok_or(KvmError::BadAccess { space, addr, len })?;
    Ok(Exit { space, addr, size, dir, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_copies_in_and_out_inside_its_bounds() {
        let ram = GuestRam::anonymous(0x2000).unwrap();
        assert_eq!(ram.size(), 0x2000);
        assert!(ram.write(0x100, b"hello"));
        let mut buf = [0u8; 7];
        assert!(ram.read(0xff, &mut buf));
        assert_eq!(&buf, b"\0hello\0");
        // The last byte is guest memory, the one after it is not.
        assert!(ram.write(0x1fff, &[0xaa]));
        let mut last = [0u8; 1];
        assert!(ram.read(0x1fff, &mut last));
        assert_eq!(last, [0xaa]);
        assert!(ram.write(0x1ffe, &[1, 2]));
        assert!(!ram.write(0x1fff, &[1, 2]));
        assert!(!ram.read(0x2000, &mut last));
        assert!(!ram.write(0x2000, &[1]));
        // Empty ranges: up to the end, not past it.
        assert!(ram.read(0x2000, &mut []));
        assert!(!ram.read(0x2001, &mut []));
        // A refused copy leaves both sides alone.
        let mut two = [7u8; 2];
        assert!(!ram.read(0x1fff, &mut two));
        assert_eq!(two, [7, 7]);
        assert!(ram.read(0x1ffe, &mut two));
        assert_eq!(two, [1, 2]);
    }

    #[test]
    fn guest_ram_refuses_ranges_that_overflow() {
        let ram = GuestRam::anonymous(0x1000).unwrap();
        let mut buf = [0u8; 16];
        assert!(!ram.read(u64::MAX, &mut buf));
        assert!(!ram.read(u64::MAX - 8, &mut buf));
        assert!(!ram.write(u64::MAX - 15, &buf));
        assert!(!ram.write(u64::MAX, &[]));
        assert!(!ram.contains(1, u64::MAX));
        assert!(ram.contains(0, 0x1000));
        assert!(!ram.contains(0, 0x1001));
    }

    #[test]
    fn guest_ram_clones_share_the_memory_and_keep_it_mapped() {
        let ram = GuestRam::anonymous(0x1000).unwrap();
        let other = ram.clone();
        drop(ram);
        assert!(other.write(0x10, &[5]));
        let copy = other.clone();
        let mut b = [0u8];
        assert!(copy.read(0x10, &mut b));
        assert_eq!(b, [5]);
        let moved = std::thread::spawn(move || {
            let mut b = [0u8];
            copy.read(0x10, &mut b) && b == [5]
        });
        assert!(moved.join().unwrap());
    }
}
