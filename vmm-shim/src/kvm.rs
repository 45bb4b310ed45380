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

use dmfabric_wire::{AccessSize, Direction, Space};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memmap2::MmapMut;

const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
/// Top of the initial stack of a test vCPU.
pub const STACK_TOP: u64 = 0x8_0000;

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

/// How a run ended and what it did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub other_exits: u64,
}

/// A VM with its guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: MmapMut,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("mem_bytes", &self.mem.len()).finish()
    }
}

impl Vm {
    /// A VM with `mem_bytes` of guest memory at guest-physical 0.
    pub fn new(mem_bytes: usize) -> Result<Vm, KvmError> {
        const ENOENT: i32 = 2;
        const EPERM: i32 = 1;
        const EACCES: i32 = 13;
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            ENOENT => KvmError::NoKvm,
            EPERM | EACCES => KvmError::NoPermission,
            _ => KvmError::Ioctl { what: "open /dev/kvm", source: e },
        })?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
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
        let mut vm = Vm { kvm, fd, mem };
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
        // GDT: null, 64-bit code (selector 0x8), data (selector 0x10).
        for (i, entry) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff].into_iter().enumerate() {
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

    /// A vCPU in 64-bit long mode at CPL0, about to run `entry` with the
    /// stack at [`STACK_TOP`] and `args` in rdi, rsi, rdx.
    pub fn long_mode_vcpu(&self, id: u64, entry: u64, args: [u64; 3]) -> Result<Vcpu<'_>, KvmError> {
        let fd = self.fd.create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let cpuid = self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;

        let mut sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
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
        let data = kvm_segment { selector: 0x10, type_: 0x3, l: 0, db: 1, ..code };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 31); // PE, ET, NE, PG
        sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
        fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;

        let mut regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        regs.rip = entry;
        regs.rsp = STACK_TOP;
        regs.rflags = 0x2;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(Vcpu { fd, _vm: std::marker::PhantomData })
    }
}

/// One vCPU of a [`Vm`] (which it borrows: the guest memory outlives it);
/// runs on the thread that calls [`Vcpu::run_until_halt`].
pub struct Vcpu<'vm> {
    fd: VcpuFd,
    _vm: std::marker::PhantomData<&'vm Vm>,
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
    /// Run until the guest halts. Every port-I/O and MMIO exit goes to
    /// `on_exit`, whose value is the data of a read; its error stops the VM.
    pub fn run_until_halt(
        &mut self,
        on_exit: &mut dyn FnMut(&Exit) -> Result<u64, String>,
    ) -> Result<RunStats, KvmError> {
        let mut stats = RunStats::default();
        loop {
            let exit = self.fd.run().map_err(ioctl("KVM_RUN"))?;
            match exit {
                VcpuExit::IoOut(port, data) => {
                    stats.io_exits += 1;
                    let e = io_exit(Space::Pio, u64::from(port), data.len(), Direction::Write, le(data))?;
                    on_exit(&e).map_err(KvmError::Device)?;
                }
                VcpuExit::IoIn(port, data) => {
                    stats.io_exits += 1;
                    let e = io_exit(Space::Pio, u64::from(port), data.len(), Direction::Read, 0)?;
                    let v = on_exit(&e).map_err(KvmError::Device)?.to_le_bytes();
                    let n = data.len();
                    data.copy_from_slice(&v[..n]);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    stats.mmio_exits += 1;
                    let e = io_exit(Space::Mmio, addr, data.len(), Direction::Write, le(data))?;
                    on_exit(&e).map_err(KvmError::Device)?;
                }
                VcpuExit::MmioRead(addr, data) => {
                    stats.mmio_exits += 1;
                    let e = io_exit(Space::Mmio, addr, data.len(), Direction::Read, 0)?;
                    let v = on_exit(&e).map_err(KvmError::Device)?.to_le_bytes();
                    let n = data.len().min(8);
                    data[..n].copy_from_slice(&v[..n]);
                }
                VcpuExit::Hlt => return Ok(stats),
                other => {
                    let what = format!("{other:?}");
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(KvmError::Stopped(format!("exit {what} at rip {rip:#x}")));
                }
            }
        }
    }
}

fn io_exit(space: Space, addr: u64, len: usize, dir: Direction, data: u64) -> Result<Exit, KvmError> {
    let size = AccessSize::new(len as u8, space)
        .ok_or_else(|| KvmError::Stopped(format!("{space:?} access of {len} bytes at {addr:#x}")))?;
    Ok(Exit { space, addr, size, dir, data })
}
