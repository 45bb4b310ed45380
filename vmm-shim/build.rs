//! Assembles the test guests under `guests/` with the system assembler
//! into flat binaries in OUT_DIR (no opaque blobs in the repository).

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed");
}

/// The guests under `guests/`, by file stem.
const GUESTS: &[&str] = &["io_loop", "pio_loop", "irq_wait"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for name in GUESTS {
        let src = format!("guests/{name}.S");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        let bin = out.join(format!("{name}.bin"));
        run(Command::new("as").args(["--64", "-o"]).arg(&obj).arg(&src));
        // Linked at the guest address the loader puts it (1 MiB).
        run(Command::new("ld")
            .args(["-nostdlib", "-static", "-Ttext=0x100000", "-e", "_start", "-o"])
            .arg(&elf)
            .arg(&obj));
        run(Command::new("objcopy").args(["-O", "binary", "-j", ".text"]).arg(&elf).arg(&bin));
    }
    println!("cargo:rerun-if-changed=build.rs");
}
