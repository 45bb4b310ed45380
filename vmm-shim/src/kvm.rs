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

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use dmfabric_wire::{AccessSize, Direction, Space};
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
    #[error("The vCPU stopped: {0}")]
    Stopped(String),
    #[error("vCPU {0} is out of range: a test VM has at most {MAX_VCPUS}")]
    TooManyVcpus(u64),
    #[error("An access could not be served: {0}")]
    Device(String),
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
    /// The VM was reset (its i8042 pulsed the reset line): stopped cleanly.
    pub reset: bool,
}

/// Stops a vCPU from another thread, also while its guest is halted inside
/// KVM_RUN: a flag the run loop checks plus a signal that makes KVM_RUN
/// return (the way Firecracker and cloud-hypervisor kick vCPUs).
#[derive(Debug, Default)]
pub struct Kick {
    stop: AtomicBool,
    /// The stop ends the run cleanly (a reset the guest asked for).
    clean: AtomicBool,
    /// Hold the vCPU outside the guest (suspended, or about to move).
    pause: AtomicBool,
    /// The vCPU is held: no access of its is in flight, its state is still.
    paused: AtomicBool,
    /// Save the vCPU's state while held ([`Kick::take_saved`] gives it).
    save: AtomicBool,
    saved: Mutex<Option<Result<VcpuState, String>>>,
    /// pthread_t of the thread inside [`Vcpu::run`], 0 outside it.
    thread: AtomicU64,
    reason: Mutex<Option<String>>,
}

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Kick {
    pub fn new() -> Kick {
        Kick::default()
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Why the vCPU was asked to stop.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// End the run cleanly for `reason` (shut down, migrated away).
    pub fn end(&self, reason: &str) {
        self.clean.store(true, Ordering::Release);
        self.stop(reason, Duration::ZERO);
    }

    /// Stop the vCPU because its VM was reset: the run ends without an error.
    pub fn reset(&self, within: Duration) {
        self.clean.store(true, Ordering::Release);
        self.stop("the VM was reset", within);
    }

    /// Ask the vCPU to stop (the first reason is kept) and kick it out of
    /// KVM_RUN, retrying for up to `within` in case the signal lands just
    /// before the thread enters the guest.
    pub fn stop(&self, reason: &str, within: Duration) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            r.get_or_insert_with(|| reason.to_string());
        }
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + within;
        while self.poke() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Hold the vCPU outside its guest once its current exit is served
    /// (an access in flight completes first), saving its state if `save`.
    /// [`Kick::paused`] says when it is held.
    pub fn pause(&self, save: bool) {
        if save {
            self.save.store(true, Ordering::Release);
        }
        self.pause.store(true, Ordering::Release);
        self.poke();
    }

    /// Let a held vCPU run again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }

    /// Whether the vCPU is held (and its state saved, if that was asked).
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Whether a pause was asked for (held or on its way there).
    pub fn pausing(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// The state saved by a [`Kick::pause`] with `save`.
    pub fn take_saved(&self) -> Option<Result<VcpuState, String>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Signal the vCPU's thread if it is inside [`Vcpu::run`] (for a stop
    /// whose first signal may have come just before it entered the guest);
    /// false when it is not there.
    pub fn poke(&self) -> bool {
        let thread = self.thread.load(Ordering::Acquire);
        if thread == 0 {
            return false;
        }
        // SAFETY: `thread` was stored by the vCPU thread from pthread_self()
        // on entering `Vcpu::run` and is cleared before it leaves, so while
        // it is non-zero it names a live thread (a signal racing with the
        // clear reaches a thread that ignores it: the handler does nothing).
        unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        true
    }
}

/// A VM with its guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    mem: MmapMut,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("mem_bytes", &self.mem.len()).finish()
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
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        // The in-kernel PIC, IOAPIC and local APICs, and the PIT: interrupts
        // are injected with KVM_IRQ_LINE / KVM_SIGNAL_MSI on the VM fd and
        // a halted vCPU waits in the kernel.
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        let mem = MmapMut::map_anon(mem_bytes).map_err(|e| KvmError::Memory(mem_bytes, e))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes as u64,
            userspace_addr: mem.as_ptr() as u64,
        };
        // SAFETY: the region is `mem`, a private anonymous mapping owned by
        // this `Vm`; it is unmapped only when the `Vm` drops, after `fd`
        // (field order), and every `Vcpu` borrows the `Vm`, so no vCPU can
        // run after the memory is gone.
        unsafe { fd.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        let mut vm = Vm { kvm, fd: Arc::new(fd), mem };
        vm.write_page_tables_and_gdt();
        Ok(vm)
    }

    /// Copy `bytes` into guest memory at `addr`.
    pub fn load(&mut self, addr: u64, bytes: &[u8]) -> Result<(), KvmError> {
        let start = addr as usize;
        let end = start.checked_add(bytes.len()).filter(|&e| e <= self.mem.len());
        let Some(end) = end else {
            return Err(KvmError::ImageTooBig { addr, len: bytes.len(), mem: self.mem.len() });
        };
        self.mem[start..end].copy_from_slice(bytes);
        Ok(())
    }

    fn write_u64(&mut self, addr: u64, v: u64) {
        let a = addr as usize;
        self.mem[a..a + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn write_page_tables_and_gdt(&mut self) {
        // GDT: null, 64-bit code (selector 0x8, test guests), 64-bit code
        // (0x10) and data (0x18): Linux's __BOOT_CS and __BOOT_DS.
        let code = 0x00af_9b00_0000_ffff;
        for (i, entry) in [0u64, code, code, 0x00cf_9300_0000_ffff].into_iter().enumerate() {
            self.write_u64(GDT_ADDR + 8 * i as u64, entry);
        }
        const PRESENT_RW: u64 = 0b11;
        const HUGE: u64 = 1 << 7;
        self.write_u64(PML4_ADDR, PDPT_ADDR | PRESENT_RW);
        for gib in 0..4u64 {
            let pd = PD_ADDR + gib * 0x1000;
            self.write_u64(PDPT_ADDR + gib * 8, pd | PRESENT_RW);
            for i in 0..512u64 {
                let phys = (gib << 30) | (i << 21);
                self.write_u64(pd + i * 8, phys | PRESENT_RW | HUGE);
            }
        }
    }

    /// A handle that raises this VM's interrupt lines from any thread (for
    /// device models kept in the client process).
    pub fn irq_handle(&self) -> IrqHandle {
        IrqHandle(self.fd.clone())
    }

    /// Set interrupt line (GSI) `gsi` to `level` (PIC and IOAPIC).
    pub fn set_irq_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        self.fd.set_irq_line(gsi, level).map_err(ioctl("KVM_IRQ_LINE"))
    }

    /// Deliver a message-signalled interrupt.
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<(), KvmError> {
        let msi =
            kvm_msi { address_lo: address as u32, address_hi: (address >> 32) as u32, data, ..Default::default() };
        self.fd.signal_msi(msi).map(|_| ()).map_err(ioctl("KVM_SIGNAL_MSI"))
    }

    /// Bytes of guest memory at `addr` (None if out of range).
    pub fn memory(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(addr).ok()?;
        self.mem.get(start..start.checked_add(len)?)
    }

    /// A vCPU in 64-bit long mode at CPL0, about to run `entry` with its
    /// own stack below [`STACK_TOP`] and `args` in rdi, rsi, rdx. vCPUs
    /// other than 0 start running too (no INIT/SIPI dance for test guests).
    pub fn long_mode_vcpu(&self, id: u64, entry: u64, args: [u64; 3]) -> Result<Vcpu<'_>, KvmError> {
        self.vcpu(id, VcpuStart { entry, args, code_selector: 0x8, hide_xsave_cx16: false })
    }

    /// vCPU `id` entering a Linux kernel's 64-bit entry point with the boot
    /// parameters at `zero_page` (rsi), as the x86 boot protocol asks:
    /// paging on, __BOOT_CS/__BOOT_DS loaded, interrupts off. CPUID hides
    /// XSAVE and CMPXCHG16B, which this host's nested hypervisor cannot
    /// emulate in guest kernel mode (MACHINE-FACTS.md).
    pub fn linux_vcpu(&self, id: u64, entry: u64, zero_page: u64) -> Result<Vcpu<'_>, KvmError> {
        self.vcpu(id, VcpuStart { entry, args: [0, zero_page, 0], code_selector: 0x10, hide_xsave_cx16: true })
    }

    fn vcpu(&self, id: u64, start: VcpuStart) -> Result<Vcpu<'_>, KvmError> {
        if id >= MAX_VCPUS {
            return Err(KvmError::TooManyVcpus(id));
        }
        let fd = self.fd.create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
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
        Ok(Vcpu { fd, vm: self })
    }

    /// An application processor of a Linux VM: it waits, as on hardware,
    /// for the boot processor's INIT and SIPI.
    pub fn linux_ap(&self, id: u64) -> Result<Vcpu<'_>, KvmError> {
        if id == 0 || id >= MAX_VCPUS {
            return Err(KvmError::TooManyVcpus(id));
        }
        let fd = self.fd.create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        self.set_cpuid(&fd, id, true)?;
        Ok(Vcpu { fd, vm: self })
    }

    /// KVM's supported CPUID with this vCPU's APIC id, and without XSAVE
    /// (and what needs it) and CMPXCHG16B if `hide_xsave_cx16`.
    fn set_cpuid(&self, fd: &VcpuFd, id: u64, hide_xsave_cx16: bool) -> Result<(), KvmError> {
        let mut cpuid =
            self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
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

    /// Guest memory, for loaders.
    pub fn memory_mut(&mut self) -> &mut [u8] {
        &mut self.mem
    }

    /// Guest memory as a whole (to move the VM: read while its vCPUs are held).
    pub fn all_memory(&self) -> &[u8] {
        &self.mem
    }

    /// The VM-wide device state KVM keeps: both PICs, the I/O APIC, the
    /// PIT and the guest clock.
    pub fn save_state(&self) -> Result<VmDeviceState, KvmError> {
        let chip = |id: u32| -> Result<kvm_irqchip, KvmError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map_err(ioctl("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmDeviceState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    /// Put [`Vm::save_state`]'s state (from another host) into this VM.
    pub fn restore_state(&self, s: &VmDeviceState) -> Result<(), KvmError> {
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&s.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        // Only the clock value: the flags of the source host do not apply here.
        let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

/// Raises a VM's interrupt lines (KVM_IRQ_LINE on its VM fd).
#[derive(Clone)]
pub struct IrqHandle(Arc<VmFd>);

impl std::fmt::Debug for IrqHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqHandle")
    }
}

impl IrqHandle {
    pub fn set_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        self.0.set_irq_line(gsi, level).map_err(ioctl("KVM_IRQ_LINE"))
    }

    /// Deliver a message-signalled interrupt.
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<(), KvmError> {
        let msi =
            kvm_msi { address_lo: address as u32, address_hi: (address >> 32) as u32, data, ..Default::default() };
        self.0.signal_msi(msi).map(|_| ()).map_err(ioctl("KVM_SIGNAL_MSI"))
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

/// The device state KVM keeps per VM (in-kernel irqchip, PIT, clock).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmDeviceState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// How a vCPU starts.
#[derive(Debug, Clone, Copy)]
struct VcpuStart {
    entry: u64,
    args: [u64; 3],
    code_selector: u16,
    hide_xsave_cx16: bool,
}

/// One vCPU of a [`Vm`] (which it borrows: the guest memory outlives it);
/// runs on the thread that calls [`Vcpu::run`].
pub struct Vcpu<'vm> {
    fd: VcpuFd,
    vm: &'vm Vm,
}

impl std::fmt::Debug for Vcpu<'_> {
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

impl Vcpu<'_> {
    /// Run until the guest exits through its exit port, the handler fails,
    /// or `kick` stops the vCPU. Every port-I/O and MMIO exit goes to
    /// `on_exit`; its error stops the VM.
    pub fn run(
        &mut self,
        kick: &Kick,
        on_exit: &mut dyn FnMut(&Exit) -> Result<Flow, String>,
    ) -> Result<RunStats, KvmError> {
        static HANDLER: Once = Once::new();
        let mut installed = Ok(());
        HANDLER.call_once(|| installed = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal));
        installed.map_err(|e| KvmError::Stopped(format!("cannot install the vCPU kick signal handler: {e}")))?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        kick.thread.store(me, Ordering::Release);
        let result = self.run_loop(kick, on_exit);
        kick.thread.store(0, Ordering::Release);
        result
    }

    fn run_loop(
        &mut self,
        kick: &Kick,
        on_exit: &mut dyn FnMut(&Exit) -> Result<Flow, String>,
    ) -> Result<RunStats, KvmError> {
        const EINTR: i32 = 4;
        const EAGAIN: i32 = 11;
        let mut stats = RunStats::default();
        let stopped = |kick: &Kick| KvmError::Stopped(kick.reason().unwrap_or_else(|| "asked to stop".into()));
        loop {
            if kick.pause.load(Ordering::Acquire) && !kick.stopped() {
                self.hold(kick);
                continue;
            }
            if kick.stopped() {
                if kick.clean.load(Ordering::Acquire) {
                    stats.reset = true;
                    return Ok(stats);
                }
                return Err(stopped(kick));
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == EINTR || e.errno() == EAGAIN => {
                    stats.interrupted += 1;
                    continue;
                }
                Err(e) => return Err(KvmError::Ioctl { what: "KVM_RUN", source: e }),
            };
            let flow = match exit {
                VcpuExit::IoOut(port, data) => {
                    stats.io_exits += 1;
                    let e = io_exit(Space::Pio, u64::from(port), data.len(), Direction::Write, le(data))?;
                    on_exit(&e).map_err(KvmError::Device)?
                }
                VcpuExit::IoIn(port, data) => {
                    stats.io_exits += 1;
                    let e = io_exit(Space::Pio, u64::from(port), data.len(), Direction::Read, 0)?;
                    let flow = on_exit(&e).map_err(KvmError::Device)?;
                    if let Flow::Continue(v) = flow {
                        let n = data.len().min(8);
                        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
                    }
                    flow
                }
                VcpuExit::MmioWrite(addr, data) => {
                    stats.mmio_exits += 1;
                    let e = io_exit(Space::Mmio, addr, data.len(), Direction::Write, le(data))?;
                    on_exit(&e).map_err(KvmError::Device)?
                }
                VcpuExit::MmioRead(addr, data) => {
                    stats.mmio_exits += 1;
                    let e = io_exit(Space::Mmio, addr, data.len(), Direction::Read, 0)?;
                    let flow = on_exit(&e).map_err(KvmError::Device)?;
                    if let Flow::Continue(v) = flow {
                        let n = data.len().min(8);
                        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
                    }
                    flow
                }
                VcpuExit::Intr => {
                    stats.interrupted += 1;
                    continue;
                }
                VcpuExit::InternalError => {
                    return Err(KvmError::Stopped(
                        self.describe("KVM_EXIT_INTERNAL_ERROR (the host could not emulate an instruction)"),
                    ))
                }
                VcpuExit::Shutdown => {
                    return Err(KvmError::Stopped(self.describe("KVM_EXIT_SHUTDOWN (a triple fault)")))
                }
                other => {
                    let what = format!("exit {other:?}");
                    return Err(KvmError::Stopped(self.describe(&what)));
                }
            };
            if let Flow::Exit(code) = flow {
                stats.exit_code = code;
                return Ok(stats);
            }
        }
    }
}

impl Vcpu<'_> {
    /// Stay out of the guest while `kick` pauses the vCPU, saving its state
    /// first if asked.
    fn hold(&mut self, kick: &Kick) {
        // An I/O exit just served is finished by the next KVM_RUN; with
        // immediate_exit that run completes it and returns at once, so the
        // state read below is the one after the instruction.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        if kick.save.swap(false, Ordering::AcqRel) {
            let state = self.save().map_err(|e| e.to_string());
            *kick.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
        }
        kick.paused.store(true, Ordering::Release);
        while kick.pause.load(Ordering::Acquire) && !kick.stopped() {
            if kick.save.swap(false, Ordering::AcqRel) {
                let state = self.save().map_err(|e| e.to_string());
                *kick.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        kick.paused.store(false, Ordering::Release);
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
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmError::Stopped(format!("MSR list: {e:?}")))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
            if n == entries.len() {
                out.extend_from_slice(msrs.as_slice());
                continue;
            }
            // KVM stops at the first MSR it cannot read: take them one by one.
            for e in &entries {
                let mut one = Msrs::from_entries(std::slice::from_ref(e))
                    .map_err(|e| KvmError::Stopped(format!("MSR list: {e:?}")))?;
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
            let msrs = Msrs::from_entries(chunk).map_err(|e| KvmError::Stopped(format!("MSR list: {e:?}")))?;
            let n = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                let index = chunk[n].index;
                return Err(KvmError::Stopped(format!("KVM_SET_MSRS refused MSR {index:#x} of the saved state")));
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
            .and_then(|t| self.vm.memory(t.physical_address, 16))
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "));
        match bytes {
            Some(b) => format!("{what} at rip {:#x}, instruction bytes {b}", regs.rip),
            None => format!("{what} at rip {:#x}", regs.rip),
        }
    }
}

fn io_exit(space: Space, addr: u64, len: usize, dir: Direction, data: u64) -> Result<Exit, KvmError> {
    let size = AccessSize::new(len as u8, space)
        .ok_or_else(|| KvmError::Stopped(format!("{space:?} access of {len} bytes at {addr:#x}")))?;
    Ok(Exit { space, addr, size, dir, data })
}
