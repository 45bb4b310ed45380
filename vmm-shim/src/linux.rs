//! Loading a Linux bzImage and initramfs with the x86 boot protocol
//! (Documentation/arch/x86/boot.rst), for the 64-bit entry point.
//!
//! Done by hand rather than with linux-loader: that crate loads through
//! vm-memory's `GuestMemory`, which would mean a second view of guest memory
//! beside the one KVM maps, for what is ~100 lines of header checks and
//! copies. What it does: check the setup header (boot flag, "HdrS",
//! protocol ≥ 2.12, a 64-bit entry), copy the protected-mode kernel to
//! 1 MiB, the initramfs to the top of what the kernel allows, the command
//! line, and fill the zero page (the header, the loader type, the initrd,
//! the command line pointer, an e820 map).
//!
//! Guest-physical layout (on top of kvm.rs's GDT and page tables):
//!
//! ```text
//! 0x0_7000   zero page (struct boot_params)
//! 0x2_0000   command line
//! 0x10_0000  protected-mode kernel (entry: +0x200)
//! top        initramfs, page-aligned, below initrd_addr_max
//! ```

use crate::kvm::Vm;

/// The Debian kernel version the project's guest images use (pinned in
/// guests/linux/VERSION, fetched by scripts/guest-images.sh).
pub const PINNED_VERSION: &str = include_str!("../../guests/linux/VERSION");

/// Where scripts/guest-images.sh leaves the images of `version`
/// (`DMFABRIC_GUEST_CACHE` overrides the cache directory).
pub fn image_dir(version: &str) -> std::path::PathBuf {
    let cache = std::env::var_os("DMFABRIC_GUEST_CACHE").unwrap_or_else(|| "/var/cache/dmfabric".into());
    std::path::PathBuf::from(cache).join(format!("linux-{}", version.trim()))
}

/// The command line dmfabric boots Linux with: the console on COM1 (early
/// and normal), no XSAVE and no CMPXCHG16B (this host cannot emulate them
/// in guest kernel mode), reboot through the keyboard controller, and no
/// waiting after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 clearcpuid=154,141 reboot=k panic=-1";

/// Where the boot parameters go.
pub const ZERO_PAGE: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x2_0000;
/// Where the protected-mode kernel goes.
pub const KERNEL: u64 = 0x10_0000;
/// The 64-bit entry point's offset in the protected-mode kernel.
const ENTRY_64: u64 = 0x200;

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxImage {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
}

/// Where the loaded kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxBoot {
    pub entry: u64,
    pub zero_page: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinuxError {
    #[error("The kernel image is not a bzImage ({0}): pass a bzImage (vmlinuz), not a vmlinux or an archive")]
    NotBzImage(&'static str),
    #[error(
        "The kernel speaks boot protocol {major}.{minor}; 2.12 or later (Linux 3.8+) is needed for the 64-bit entry"
    )]
    OldProtocol { major: u8, minor: u8 },
    #[error("The kernel has no 64-bit entry point (XLF_KERNEL_64): it is a 32-bit kernel")]
    Not64Bit,
    #[error("{what} needs {need} MiB of guest memory; the VM has {have} MiB: give it more memory")]
    TooLittleMemory { what: &'static str, need: u64, have: u64 },
    #[error("The command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("Guest memory can be written only before the VM's interrupt handles are given out")]
    MemoryShared,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The setup header facts the loader needs.
#[derive(Debug, Clone, Copy)]
struct Header {
    setup_sects: usize,
    /// End of the setup header in the image (0x202 + the jump's offset).
    header_end: usize,
    initrd_addr_max: u64,
    cmdline_size: usize,
    init_size: u64,
}

fn header(k: &[u8]) -> Result<Header, LinuxError> {
    if k.len() < 0x270 {
        return Err(LinuxError::NotBzImage("shorter than a setup header"));
    }
    if u16_at(k, 0x1fe) != 0xaa55 {
        return Err(LinuxError::NotBzImage("no boot flag 0xAA55"));
    }
    if &k[0x202..0x206] != b"HdrS" {
        return Err(LinuxError::NotBzImage("no HdrS signature"));
    }
    let version = u16_at(k, 0x206);
    if version < 0x020c {
        return Err(LinuxError::OldProtocol { major: (version >> 8) as u8, minor: version as u8 });
    }
    if k[0x236] & 0x1 == 0 {
        return Err(LinuxError::Not64Bit);
    }
    let setup_sects = match k[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    if (setup_sects + 1) * 512 >= k.len() {
        return Err(LinuxError::NotBzImage("no protected-mode kernel after the setup sectors"));
    }
    let header_end = (0x202 + usize::from(k[0x201])).min(0x280);
    Ok(Header {
        setup_sects,
        header_end,
        initrd_addr_max: u64::from(u32_at(k, 0x22c)),
        cmdline_size: u32_at(k, 0x238) as usize,
        init_size: u64::from(u32_at(k, 0x260)),
    })
}

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

/// Check `img` against a VM of `mem` bytes without loading it: a bzImage
/// with a 64-bit entry, a command line that fits, enough memory for the
/// kernel and its initramfs. Returns the header and where the kernel ends.
fn check_fits(img: &LinuxImage, mem: u64) -> Result<(Header, u64), LinuxError> {
    let k = &img.kernel;
    let h = header(k)?;
    let kernel_end = KERNEL + h.init_size.max((k.len() - (h.setup_sects + 1) * 512) as u64);
    let initrd = img.initrd.as_ref().map_or(0, |i| i.len() as u64);
    if kernel_end + initrd + (16 << 20) > mem {
        let what = if initrd > 0 { "The kernel and its initramfs" } else { "The kernel" };
        return Err(LinuxError::TooLittleMemory { what, need: mib(kernel_end + initrd + (16 << 20)), have: mib(mem) });
    }
    let cmdline = img.cmdline.as_bytes();
    if cmdline.len() + 1 > h.cmdline_size.max(256) {
        return Err(LinuxError::CmdlineTooLong { len: cmdline.len(), max: h.cmdline_size.max(256) - 1 });
    }
    Ok((h, kernel_end))
}

/// Check `img` for a VM of `mem_bytes` before creating it.
pub fn check(img: &LinuxImage, mem_bytes: usize) -> Result<(), LinuxError> {
    check_fits(img, mem_bytes as u64).map(drop)
}

/// Load `img` into `vm` and return where its vCPU 0 starts. With more
/// than one vCPU an MP table tells the kernel about the others.
pub fn load(vm: &mut Vm, img: &LinuxImage, vcpus: u8) -> Result<LinuxBoot, LinuxError> {
    load_with(vm, img, vcpus, false)
}

/// [`load`], for a VM whose I/O APIC and HPET are remote models when
/// `remote_irqchip`: the kernel finds the HPET in an ACPI table.
pub fn load_with(vm: &mut Vm, img: &LinuxImage, vcpus: u8, remote_irqchip: bool) -> Result<LinuxBoot, LinuxError> {
    let k = &img.kernel;
    let m = vm.memory_mut().map_err(|_| LinuxError::MemoryShared)?;
    let mem = m.len() as u64;
    let (h, kernel_end) = check_fits(img, mem)?;
    let cmdline = img.cmdline.as_bytes();
    let pm = &k[(h.setup_sects + 1) * 512..];
    m[KERNEL as usize..KERNEL as usize + pm.len()].copy_from_slice(pm);
    m[CMDLINE as usize..CMDLINE as usize + cmdline.len()].copy_from_slice(cmdline);
    m[CMDLINE as usize + cmdline.len()] = 0;

    // The zero page: the image's setup header, then what the loader fills in.
    let zp = ZERO_PAGE as usize;
    m[zp..zp + 4096].fill(0);
    m[zp + 0x1f1..zp + h.header_end].copy_from_slice(&k[0x1f1..h.header_end]);
    let put16 = |m: &mut [u8], off: usize, v: u16| m[zp + off..zp + off + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |m: &mut [u8], off: usize, v: u32| m[zp + off..zp + off + 4].copy_from_slice(&v.to_le_bytes());
    put16(m, 0x1fa, 0xffff); // vid_mode: normal
    m[zp + 0x210] = 0xff; // type_of_loader: undefined
    m[zp + 0x211] |= 0x80 | 0x01; // loadflags: CAN_USE_HEAP, LOADED_HIGH
    put16(m, 0x224, 0xfe00); // heap_end_ptr
    put32(m, 0x228, CMDLINE as u32); // cmd_line_ptr

    if let Some(initrd) = &img.initrd {
        let top = mem.min(h.initrd_addr_max.saturating_add(1));
        let at = top.saturating_sub(initrd.len() as u64) & !0xfff;
        if at < kernel_end {
            return Err(LinuxError::TooLittleMemory {
                what: "The kernel and its initramfs",
                need: mib(kernel_end + initrd.len() as u64 + (16 << 20)),
                have: mib(mem),
            });
        }
        m[at as usize..at as usize + initrd.len()].copy_from_slice(initrd);
        put32(m, 0x218, at as u32); // ramdisk_image
        put32(m, 0x21c, initrd.len() as u32); // ramdisk_size
    }

    // The e820 map: low RAM, the EBDA and BIOS area reserved, RAM from 1 MiB.
    // With several vCPUs the ACPI tables sit at 0xe0000: reserve from there.
    let acpi = vcpus > 1 || remote_irqchip;
    let bios = if acpi { crate::acpi::ACPI_START } else { 0xf_0000 };
    let map = [
        (0u64, 0x9_fc00u64, E820_RAM),
        (0x9_fc00, 0x400, E820_RESERVED),
        (bios, KERNEL - bios, E820_RESERVED),
        (KERNEL, mem - KERNEL, E820_RAM),
    ];
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let at = zp + 0x2d0 + i * 20;
        m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        m[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
        m[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
    }
    m[zp + 0x1e8] = map.len() as u8;
    if acpi {
        // The other CPUs: an MP table for kernels that parse one, ACPI for
        // those that only read the MADT (and the HPET table).
        let table = crate::mptable::build(vcpus);
        let at = crate::mptable::MPTABLE_START as usize;
        m[at..at + table.len()].copy_from_slice(&table);
        let tables = crate::acpi::build_with(vcpus, remote_irqchip);
        let at = crate::acpi::ACPI_START as usize;
        m[at..at + tables.len()].copy_from_slice(&tables);
        m[zp + 0x70..zp + 0x78].copy_from_slice(&crate::acpi::ACPI_START.to_le_bytes());
        // acpi_rsdp_addr
    }
    Ok(LinuxBoot { entry: KERNEL + ENTRY_64, zero_page: ZERO_PAGE })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage: setup sectors with a valid header, then a "kernel".
    fn fake(version: u16, xloadflags: u8) -> Vec<u8> {
        let mut k = vec![0u8; 5 * 512 + 4096];
        k[0x1f1] = 4;
        k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        k[0x200] = 0xeb;
        k[0x201] = 0x6a; // header to 0x26c
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        k[0x211] = 0x01;
        k[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        k[0x236] = xloadflags;
        k[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        k[0x260..0x264].copy_from_slice(&(4u32 << 20).to_le_bytes());
        k[5 * 512] = 0x90;
        k
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        assert!(matches!(header(&[0u8; 100]), Err(LinuxError::NotBzImage(_))));
        let mut no_magic = fake(0x020f, 1);
        no_magic[0x202] = b'X';
        assert_eq!(header(&no_magic).unwrap_err(), LinuxError::NotBzImage("no HdrS signature"));
        assert_eq!(header(&fake(0x0206, 1)).unwrap_err(), LinuxError::OldProtocol { major: 2, minor: 6 });
        assert_eq!(header(&fake(0x020f, 0)).unwrap_err(), LinuxError::Not64Bit);
        let h = header(&fake(0x020f, 1)).unwrap();
        assert_eq!((h.setup_sects, h.header_end, h.cmdline_size), (4, 0x26c, 2048));
    }
}
