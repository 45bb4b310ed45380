//! `dmfabric bench irq` as a user runs it: the apic_hpet guest's periodic
//! HPET interrupts against dmfabric's I/O APIC and HPET on a server in
//! another namespace and against QEMU's, a row each with its lateness and
//! rate (and nothing left behind: no namespace, no temporary directory, no
//! QEMU); bad arguments are one line.

use std::process::{Command, Stdio};

use dmfabric_testkit::Need;

mod common;
use common::{leftover_namespaces, BIN};

/// Processes whose command line names `needle` (a QEMU the bench left).
fn processes_naming(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

fn qemu_present() -> bool {
    Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

#[test]
fn bench_irq_reports_remote_and_qemu_and_leaves_nothing() {
    if !dmfabric_testkit::privileged_or_skip("bench_irq_reports_remote_and_qemu", &[Need::Root, Need::Kvm]) {
        return;
    }
    let modes: &[&str] = if qemu_present() {
        &["remote", "qemu"]
    } else {
        assert!(
            std::env::var_os("DMFABRIC_REQUIRE_PRIVILEGED").is_none(),
            "qemu-system-x86_64 is missing: run scripts/setup.sh"
        );
        eprintln!("bench_irq_reports_remote_and_qemu: qemu-system-x86_64 not installed, remote only");
        &["remote"]
    };
    let dir = std::env::temp_dir().join(format!("dmfabric-bench-irq-test-{}", std::process::id()));
    let json = dir.join("irq.json");
    let child = Command::new(BIN)
        .args(["bench", "irq", "--mode", &modes.join(","), "--interrupts", "50", "--json"])
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
    let got: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(got, modes, "{stdout}");
    for row in rows {
        assert_eq!(row["interrupts"].as_u64(), Some(50), "{row}");
        assert!(row["delivered"].as_u64().unwrap() >= 50, "{row}");
        let (p50, p99) = (row["p50_us"].as_f64().unwrap(), row["p99_us"].as_f64().unwrap());
        assert!(p50 > 0.0 && p99 >= p50, "{row}");
        assert!(row["max_us"].as_f64().unwrap() >= p99, "{row}");
        assert!(row["interrupts_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["nominal_per_s"].as_f64(), Some(10_000.0), "{row}");
        assert_eq!(row["rate_period_us"].as_u64(), Some(100), "{row}");
    }
    let irqchips: Vec<&str> = rows.iter().map(|r| r["irqchip"].as_str().unwrap()).collect();
    assert_eq!(irqchips, &["remote", "split"][..modes.len()], "{stdout}");
    assert_eq!(rows[0]["transport"], "xdp");
    assert!(leftover_namespaces(pid).is_empty(), "{:?}", leftover_namespaces(pid));
    let scratch = format!("dmfabric-bench-irq-{pid}");
    assert!(!std::env::temp_dir().join(&scratch).exists(), "the bench's directory removed");
    assert!(processes_naming(&scratch).is_empty(), "{:?}", processes_naming(&scratch));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_irq_refuses_bad_arguments_in_one_line() {
    for (args, says) in [
        (&["--interrupts", "1"][..], "--interrupts must be between 2"),
        (&["--period-us", "0"][..], "--period-us and --rate-period-us must be between 1"),
        (&["--server", "thread"][..], "--server process"),
    ] {
        let out = Command::new(BIN).args(["bench", "irq"]).args(args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), err.lines().count()), (Some(1), 1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
