//! The systemd units in `systemd/`: `systemd-analyze verify` finds nothing
//! to say about them. verify needs each unit's ExecStart binary to exist,
//! and /usr/local/bin/dmfabric (where the units run it from) is not there
//! on a build machine: each unit is verified as a copy whose ExecStart is
//! the binary this build made, the only line that differs. Skips with one
//! line where systemd-analyze is missing (fails under
//! DMFABRIC_REQUIRE_PRIVILEGED=1, as CI runs it; scripts/setup.sh installs
//! it). This machine does not run systemd as PID 1, so the units are not
//! started here.

use std::path::Path;
use std::process::Command;

use dmfabric_testkit::TestDir;

const BIN: &str = env!("CARGO_BIN_EXE_dmfabric");
const UNITS: [&str; 2] = ["dmfabric-server@.service", "dmfabric-client@.service"];
const INSTALLED: &str = "/usr/local/bin/dmfabric";

fn have_analyze(test: &str) -> bool {
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    let msg = format!("{test}: skipped, systemd-analyze is not installed (Debian: apt-get install systemd)");
    if std::env::var("DMFABRIC_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{msg} (DMFABRIC_REQUIRE_PRIVILEGED=1 makes this a failure)");
    }
    eprintln!("{msg}");
    false
}

fn shipped(unit: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(unit);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `text` as unit `name` in `dir`, run from this build's binary; verify's
/// complaints about it (an instance of a template, as systemctl starts it).
fn verify(dir: &TestDir, name: &str, text: &str) -> Vec<String> {
    let local = text.replace(INSTALLED, BIN);
    let instance = name.replace("@.", "@ci.");
    std::fs::write(dir.join(name), &local).unwrap();
    std::fs::write(dir.join(&instance), &local).unwrap();
    let mut said = Vec::new();
    for unit in [name, instance.as_str()] {
        let out = Command::new("systemd-analyze").arg("verify").arg(dir.join(unit)).output().unwrap();
        let stem = unit.split('@').next().unwrap();
        // Only what concerns this unit (verify also loads the system's own units).
        let lines: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&out.stdout).lines())
            .filter(|l| l.contains(stem))
            .map(String::from)
            .collect();
        if !out.status.success() && lines.is_empty() {
            said.push(format!("{unit}: systemd-analyze verify failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        said.extend(lines);
    }
    said
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !have_analyze("the_units_pass_systemd_analyze_verify") {
        return;
    }
    let dir = TestDir::new("systemd-verify");
    for unit in UNITS {
        let text = shipped(unit);
        let exec: Vec<&str> = text.lines().filter(|l| l.starts_with("ExecStart=")).collect();
        assert_eq!(exec.len(), 1, "{unit}: one ExecStart");
        assert!(exec[0].starts_with(&format!("ExecStart={INSTALLED} ")), "{unit}: {}", exec[0]);
        let said = verify(&dir, unit, &text);
        assert!(said.is_empty(), "{unit}: {said:#?}");
    }
}

#[test]
fn verify_catches_a_broken_unit() {
    if !have_analyze("verify_catches_a_broken_unit") {
        return;
    }
    let dir = TestDir::new("systemd-broken");
    let text = shipped(UNITS[0]).replace("Restart=on-failure", "Restart=sometimes");
    let said = verify(&dir, "dmfabric-broken@.service", &text);
    assert!(said.iter().any(|l| l.contains("sometimes")), "{said:#?}");
    let text = shipped(UNITS[1]).replace(INSTALLED, "/nonexistent/dmfabric");
    let said = verify(&dir, "dmfabric-broken2@.service", &text);
    assert!(said.iter().any(|l| l.contains("/nonexistent/dmfabric")), "{said:#?}");
}

/// What the units grant: the capabilities AF_XDP needs and no others, the
/// KVM device to the client alone, locked memory, a restart on failure.
#[test]
fn the_units_grant_what_the_data_plane_needs_and_no_more() {
    for unit in UNITS {
        let text = shipped(unit);
        let value = |key: &str| -> Vec<String> {
            text.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(String::from).collect()
        };
        let caps = "CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_ADMIN CAP_IPC_LOCK";
        assert_eq!(value("CapabilityBoundingSet"), [caps], "{unit}");
        assert_eq!(value("AmbientCapabilities"), [caps], "{unit}");
        assert_eq!(value("LimitMEMLOCK"), ["infinity"], "{unit}");
        assert_eq!(value("Restart"), ["on-failure"], "{unit}");
        assert_eq!(value("StateDirectory"), ["dmfabric"], "{unit}: the default store's directory");
        assert_eq!(value("DevicePolicy"), ["closed"], "{unit}");
        let kvm = value("DeviceAllow");
        if unit.starts_with("dmfabric-client") {
            assert_eq!(kvm, ["/dev/kvm rw"], "{unit}");
        } else {
            assert!(kvm.is_empty(), "{unit}: a server needs no device: {kvm:?}");
        }
        assert_eq!(value("CPUAffinity").len(), 1, "{unit}");
        assert!(value("ExecStart")[0].contains("$DMFABRIC_CONFIG $DMFABRIC_ARGS"), "{unit}");
        assert_eq!(value("EnvironmentFile"), ["/etc/dmfabric/%i.env"], "{unit}");
    }
}
