//! Assembles the test guests under `guests/` with the system assembler
//! (no opaque blobs in the repository), twice each:
//! - `NAME.bin`: a flat binary linked at 1 MiB, entered by the shim in long
//!   mode with its arguments in rdi, rsi, rdx;
//! - `NAME.mb.bin`: the same code behind `guests/multiboot.S`, a Multiboot
//!   image that QEMU (`-kernel`) boots, with the default arguments below.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed");
}

/// The guests under `guests/`, by file stem, with the arguments their
/// Multiboot build passes (nothing else gives them any under QEMU).
const GUESTS: &[(&str, [u64; 3])] = &[
    // 1000 iterations on the shim's test device ports/MMIO (absent under QEMU: all ones).
    ("io_loop", [1000, 0x500, 0xd000_0000]),
    // 1000 round trips on port 0x510.
    ("pio_loop", [1000, 0x510, 0]),
    // No interrupts to wait for: installs its IDT and PICs, reports, exits.
    ("irq_wait", [0, 0x600, 0]),
    // COM1.
    ("uart_hello", [0x3f8, 0, 0]),
    // 100 interrupts from a 1 ms timer at 0x700 (no such device under QEMU).
    ("timer_count", [1000, 0x700, 100]),
    // COM1, IRQ 4.
    ("uart_echo", [0x3f8, 0x24, 0]),
    // The i8042 at 0x60/0x64 (QEMU has one).
    ("kbd_reset", [0, 0, 0]),
    // 5 ticks of 100 ms, no waiting for input (no event timer under QEMU: it would wait forever).
    ("demo", [5, 100_000, 0]),
    // The same through the local APIC, the I/O APIC and HPET timer 0 on pin 16 (QEMU's HPET
    // allows pin 2 alone unless given `-global hpet.hpet-intcap=0xff0104`).
    ("demo_apic", [5, 100_000, 0]),
    // 1000 round trips to COM1's scratch register, samples at 2 MiB (the bench patches these).
    ("scratch_loop", [1000, 0x3ff, 0x20_0000]),
    // The virtio-mmio block device found by scanning microvm's transports; the check (mode 0)
    // of 64 requests of 1 sector, 4 in flight; seed 1, driver memory at 2 MiB.
    ("virtio_blk", [0, (64 << 32) | (1 << 16) | (4 << 8), 1]),
    // 20 interrupts of QEMU's HPET timer 0 every 10 ms, then the level test; a watchdog of 5 s
    // a phase; the guest picks the I/O APIC pins from the timers' route capabilities.
    ("apic_hpet", [20 | (5000 << 32), 10_000, 0xffff]),
];

fn link_flat(out: &Path, objs: &[&Path], entry: &str, name: &str) {
    let elf = out.join(format!("{name}.elf"));
    let bin = out.join(format!("{name}.bin"));
    run(Command::new("ld").args(["-nostdlib", "-static", "-Ttext=0x100000", "-e", entry, "-o"]).arg(&elf).args(objs));
    run(Command::new("objcopy").args(["-O", "binary", "-j", ".text"]).arg(&elf).arg(&bin));
}

/// Where `mb_args` sits in a Multiboot image, from its ELF's symbol table.
fn mb_args_offset(elf: &Path) -> usize {
    let out = Command::new("nm").arg(elf).output().unwrap_or_else(|e| panic!("cannot run nm: {e} (install binutils)"));
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text
        .lines()
        .find_map(|l| l.strip_suffix(" mb_args").and_then(|l| l.split_whitespace().next()))
        .and_then(|a| usize::from_str_radix(a, 16).ok())
        .unwrap_or_else(|| panic!("no mb_args in {}", elf.display()));
    addr - 0x10_0000
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mut offsets = String::from("/// Offset of the three argument words in each Multiboot image.\npub const MB_ARGS_OFFSET: &[(&str, usize)] = &[\n");
    println!("cargo:rerun-if-changed=guests/multiboot.S");
    println!("cargo:rerun-if-changed=guests/common.inc");
    println!("cargo:rerun-if-changed=guests/demo.inc");
    for (name, args) in GUESTS {
        let src = format!("guests/{name}.S");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        run(Command::new("as").args(["--64", "-I", "guests", "-o"]).arg(&obj).arg(&src));
        link_flat(&out, &[&obj], "_start", name);

        let mb_obj = out.join(format!("{name}.mb.o"));
        let mut asm = Command::new("as");
        asm.arg("--64");
        for (i, a) in args.iter().enumerate() {
            asm.arg(format!("--defsym=ARG{i}={a}"));
        }
        run(asm.arg("-o").arg(&mb_obj).arg("guests/multiboot.S"));
        link_flat(&out, &[&mb_obj, &obj], "mb_start", &format!("{name}.mb"));
        let off = mb_args_offset(&out.join(format!("{name}.mb.elf")));
        offsets.push_str(&format!("    ({name:?}, {off:#x}),\n"));
    }
    offsets.push_str("];\n");
    std::fs::write(out.join("mb_args.rs"), offsets).expect("write mb_args.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
