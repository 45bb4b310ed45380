//! Builds dmfabric's XDP program (bpf/dmfabric_xsk.c) with clang for the BPF
//! target; `xdp.rs` embeds the object. Set CLANG to use another clang.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "bpf/dmfabric_xsk.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("dmfabric_xsk.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-c", SOURCE, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{clang} -target bpf` could not build {SOURCE} ({s}): see its messages above"),
        Err(e) => panic!(
            "Cannot run `{clang}` to build the XDP program {SOURCE}: {e}; install clang (scripts/setup.sh does) or set CLANG"
        ),
    }
}
