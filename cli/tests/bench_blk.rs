//! `dmfabric bench blk` as a user runs it: the block guest against a
//! virtio-blk in the client process, on a server in another namespace and
//! in QEMU, every point reported (and nothing left behind); bad arguments
//! are one line.

use std::process::{Command, Stdio};

use dmfabric_testkit::Need;

mod common;
use common::{leftover_namespaces, BIN};

fn qemu_present() -> bool {
    Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

#[test]
fn bench_blk_reports_every_mode_and_depth_and_leaves_nothing() {
    if !dmfabric_testkit::privileged_or_skip("bench_blk_reports_every_mode", &[Need::Root, Need::Kvm]) {
        return;
    }
    let modes: &[&str] = if qemu_present() {
        &["local", "remote", "qemu"]
    } else {
        assert!(
            std::env::var_os("DMFABRIC_REQUIRE_PRIVILEGED").is_none(),
            "qemu-system-x86_64 is missing: run scripts/setup.sh"
        );
        eprintln!("bench_blk_reports_every_mode: qemu-system-x86_64 not installed, local and remote only");
        &["local", "remote"]
    };
    let dir = std::env::temp_dir().join(format!("dmfabric-bench-blk-test-{}", std::process::id()));
    let json = dir.join("blk.json");
    let child = Command::new(BIN)
        .args(["bench", "blk", "--mode", &modes.join(","), "--pattern", "randwrite", "--bs", "4k"])
        .args(["--qd", "1,4", "--requests", "200", "--image-size", "8M", "--timeout-ms", "50", "--retries", "40"])
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().expect("an array of rows");
    let points: Vec<(&str, u64)> =
        rows.iter().map(|r| (r["mode"].as_str().unwrap(), r["qd"].as_u64().unwrap())).collect();
    let want: Vec<(&str, u64)> = modes.iter().flat_map(|&m| [(m, 1), (m, 4)]).collect();
    assert_eq!(points, want, "{stdout}");
    for row in rows {
        assert_eq!((row["requests"].as_u64(), row["bs"].as_u64()), (Some(200), Some(4096)), "{row}");
        assert_eq!((row["pattern"].as_str(), row["guest"].as_str()), (Some("randwrite"), Some("user")), "{row}");
        for key in ["iops", "mb_per_s", "p50_us", "seconds"] {
            assert!(row[key].as_f64().unwrap() > 0.0, "{key} in {row}");
        }
        assert!(row["p99_us"].as_f64().unwrap() >= row["p50_us"].as_f64().unwrap(), "{row}");
        assert!(row["max_us"].as_f64().unwrap() >= row["p99_us"].as_f64().unwrap(), "{row}");
        assert_eq!(row["direct"], true, "{row}");
    }
    // The remote disk's data went by device DMA over the fabric.
    for row in rows.iter().filter(|r| r["mode"] == "remote") {
        assert_eq!(row["transport"], "xdp", "{row}");
        assert!(row["dma_chunks_per_request"].as_f64().unwrap() >= 1.0, "{row}");
    }
    assert!(stdout.contains("remote (xdp) / local IOPS at qd 4:"), "{stdout}");
    assert!(leftover_namespaces(pid).is_empty(), "{:?}", leftover_namespaces(pid));
    assert!(!std::env::temp_dir().join(format!("dmfabric-bench-blk-{pid}")).exists(), "the image's directory removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_blk_refuses_bad_arguments_in_one_line() {
    for (args, says) in [
        (&["--bs", "1000"][..], "--bs must be a multiple of 512"),
        (&["--bs", "256k"][..], "--bs must be a multiple of 512 up to 128k"),
        (&["--qd", "1,0"][..], "--qd must be between 1 and 42"),
        (&["--qd", "64"][..], "--qd must be between 1 and 42"),
        (&["--requests", "0"][..], "--requests must be between 1"),
        (&["--image-size", "100k"][..], "--image-size must be a whole number of MiB"),
        (&["--server", "thread"][..], "--server process"),
    ] {
        let out = Command::new(BIN).args(["bench", "blk"]).args(args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), err.lines().count()), (Some(1), 1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
