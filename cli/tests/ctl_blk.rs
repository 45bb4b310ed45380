//! `dmfabric ctl` and virtio-blk devices: a record names its image, `--size`
//! creates it, `ls` shows it, and what cannot be a virtio-blk (no image, a
//! relative path, an image on another kind, a missing file) is one line
//! that says what to do, with nothing written and no file made.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_dmfabric");

/// A directory of this test's own, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dmfabric ctl --store <dir>/store.redb args`, run in `dir`: exit code, stdout, stderr.
fn ctl(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let store = dir.join("store.redb");
    let out = Command::new(BIN)
        .args(["ctl", "--store", store.to_str().unwrap()])
        .args(args)
        .current_dir(dir)
        .env_remove("DMFABRIC_STORE")
        .stdin(Stdio::null())
        .output()
        .expect("run dmfabric");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `ctl args`, which must succeed: its stdout.
fn ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = ctl(dir, args);
    assert_eq!(code, 0, "ctl {args:?}: {out}{err}");
    out
}

/// `ctl args`, which must fail: its one line of stderr.
fn refused(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = ctl(dir, args);
    assert_eq!(code, 1, "ctl {args:?} should fail: {out}{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err.trim().to_string()
}

#[test]
fn ctl_adds_a_virtio_blk_with_its_image_lists_it_and_refuses_one_without() {
    let dir = Dir(std::env::temp_dir().join(format!("dmfabric-ctl-blk-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let d = dir.0.as_path();
    ok(d, &["add", "client", "--id", "1", "--mac", "02:00:00:00:00:01"]);
    ok(d, &["add", "server", "--id", "10", "--mac", "02:00:00:00:00:0a"]);
    ok(d, &["add", "server", "--id", "11", "--mac", "02:00:00:00:00:0b", "--role", "io"]);
    ok(d, &["add", "vm", "--id", "100", "--client", "1"]);
    fn with<'a>(id: &'a str, more: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["add", "device", "--id", id, "--server", "10", "--vm", "100"];
        a.extend_from_slice(more);
        a
    }

    // --size creates the image (here: ctl runs where the server would).
    let img = d.join("vm1.img");
    let img_s = img.to_str().unwrap();
    let out = ok(d, &with("15", &["--model", "virtio-blk", "--image", img_s, "--size", "1M"]));
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(format!("added device 15 (virtio-blk) of VM 100 on server 10, image {img_s}").as_str())
    );
    assert!(out.contains(&format!("created image {img_s} (1048576 bytes) on this machine")), "{out}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);

    // Without --size the image must be there.
    let ro = d.join("ro.img");
    let ro_s = ro.to_str().unwrap();
    let second = with("16", &["--kind", "virtio-blk", "--image", ro_s, "--read-only", "--mmio", "0xfeb00200"]);
    let e = refused(d, &second);
    assert_eq!(
        e,
        format!(
            "dmfabric: image {ro_s} does not exist: pass --size (e.g. --size 64M) to create it, or create it first"
        )
    );
    std::fs::File::create(&ro).unwrap().set_len(4096).unwrap();
    let out = ok(d, &second);
    assert!(out.starts_with(&format!("added device 16 (virtio-blk) of VM 100 on server 10, image {ro_s} (read-only)")));
    assert!(!out.contains("created image"), "{out}");

    // Refused, one line each, nothing written, no file made.
    let e = refused(d, &with("17", &["--kind", "virtio-blk"]));
    assert_eq!(e, "dmfabric: a virtio-blk needs --image PATH (a raw image file; add --size 64M to create it)");
    let e = refused(d, &with("17", &["--kind", "uart", "--pio", "0x3f8:8", "--image", img_s]));
    assert_eq!(e, "dmfabric: --image, --size and --read-only are for a virtio-blk, not a uart");
    let e = refused(
        d,
        &with("17", &["--kind", "virtio-blk", "--image", "rel.img", "--size", "1M", "--mmio", "0xfeb00400"]),
    );
    assert_eq!(e, "dmfabric: device 17: image \"rel.img\": the path must be absolute (its server opens it)");
    assert!(!d.join("rel.img").exists(), "a refused device makes no image");
    let other = d.join("other.img");
    let other_s = other.to_str().unwrap();
    let e = refused(d, &with("17", &["--kind", "virtio-blk", "--image", other_s, "--size", "1M"]));
    assert_eq!(e, "dmfabric: device 17's mmio 0xfeb00000+0x200 overlaps device 15's mmio 0xfeb00000+0x200 in VM 100");
    assert!(!other.exists(), "a refused device makes no image");
    let e = refused(d, &with("17", &["--kind", "virtio-blk", "--image", other_s, "--mmio", "0xfeb00100"]));
    assert!(e.contains("a virtio-blk has one MMIO window of 0x200 bytes at a 512-byte aligned base"), "{e}");
    let e = refused(
        d,
        &with("17", &["--kind", "virtio-blk", "--image", other_s, "--size", "1000", "--mmio", "0xfeb00400"]),
    );
    assert!(e.contains("Image size 1000 is not a positive multiple of 512 bytes"), "{e}");
    let e =
        refused(d, &with("17", &["--kind", "virtio-blk", "--image", img_s, "--size", "2M", "--mmio", "0xfeb00400"]));
    assert!(e.contains("exists with 1048576 bytes, not the 2097152 asked for"), "{e}");

    // Listed with their images, as a table and as JSON.
    let table = ok(d, &["ls", "devices"]);
    let mut rows = table.lines();
    assert!(rows.next().unwrap().ends_with("RANGES                   IMAGE"), "{table}");
    let row15 = rows.next().unwrap();
    assert!(
        row15.starts_with("15       virtio-blk 10       0      100    10         mmio 0xfeb00000+0x200"),
        "{table}"
    );
    assert!(row15.ends_with(&format!(" {img_s}")), "{table}");
    assert!(rows.next().unwrap().ends_with(&format!(" {ro_s} (read-only)")), "{table}");
    assert_eq!(rows.next(), None, "no refused device was written: {table}");
    let json: serde_json::Value = serde_json::from_str(&ok(d, &["ls", "devices", "--json"])).unwrap();
    assert_eq!(json[0]["image"], serde_json::json!({ "path": img_s, "read_only": false }));
    assert_eq!(json[0]["ranges"], serde_json::json!([{ "mmio": true, "base": 0xfeb0_0000_u64, "len": 0x200 }]));
    assert_eq!(json[0]["irqs"], serde_json::json!([10]));
    assert_eq!(json[1]["image"], serde_json::json!({ "path": ro_s, "read_only": true }));

    // A move says the new server opens the same path.
    let out = ok(d, &["device", "move", "15", "--to", "11"]);
    assert!(out.starts_with("updated device 15 (server 11, shard 0)"), "{out}");
    assert!(out.contains(&format!("server 11 opens the image {img_s} as server 10 did")), "{out}");
    let help = ok(d, &["device", "move", "--help"]);
    assert!(help.contains("same image path") && help.contains("empty drive"), "{help}");
}
