//! Storage over the fabric as a user runs it: `dmfabric server` with a
//! virtio-blk device over an image file in one network namespace, `dmfabric
//! client` booting the block test guest in another, over AF_XDP; the same
//! guest with the device in the client process (the hybrid case).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dmfabric_dataplane::netns::TestNet;
use dmfabric_testkit::Need;
use dmfabric_vmm_shim::guests::{self, VirtioBlkArgs, VirtioBlkMode, VirtioBlkReport};

mod common;
use common::{spawn_logged, wait_for, Keys, BIN};

/// The disk's device id, and its size.
const DISK: u32 = 15;
const DISK_BYTES: u64 = 16 << 20;

fn check_args() -> VirtioBlkArgs {
    VirtioBlkArgs {
        mmio: dmfabric_devices::platform::pc::VIRTIO_BLK_MMIO,
        mode: VirtioBlkMode::Check,
        user: false,
        qd: 4,
        bs: 8,
        count: 48,
        seed: 0x5eed,
        area: 0,
    }
}

/// A server config beside the keys: the clients of `keys` and the disk.
fn server_config(keys: &Keys, image: &Path) -> PathBuf {
    let clients = std::fs::read_to_string(keys.clients()).unwrap();
    let text = format!(
        "{clients}\n[[device]]\nid = {DISK}\nkind = \"virtio-blk\"\nvm = 1\nimage = \"{}\"\nsize = \"{}M\"\n",
        image.display(),
        DISK_BYTES >> 20
    );
    let path = keys.dir.join("server.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A client config running the block guest with `args` on VM 1, its disk
/// `device` (a `[[vm.device]]` table's fields after space, base and len).
fn client_config(keys: &Keys, args: &VirtioBlkArgs, device: &str) -> PathBuf {
    let [rdi, rsi, rdx] = args.regs();
    let text = format!(
        "client = 3\nhypervisor = 1\nkey_file = \"{key}\"\nrun_seconds = 30\ntimeout_ms = 50\nretries = 40\n\n\
         [link]\ntransport = \"xdp\"\niface = \"dmf0\"\n\n\
         [[vm]]\nid = 1\nvcpus = 1\nmemory_mib = 16\nguest = \"virtio_blk\"\nargs = [{rdi}, {rsi}, {rdx}]\n\n\
         [[vm.device]]\nspace = \"mmio\"\nbase = {base:#x}\nlen = 0x200\n{device}\n",
        key = keys.key(3),
        base = args.mmio,
    );
    let path = keys.dir.join("client.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Run the client of `config` on host 0; its stderr and the guest's report.
/// A client that fails stops `server` (if any) and shows its last words.
fn run_client(net: &TestNet, config: &Path, server: Option<&mut common::Logged>) -> (String, VirtioBlkReport) {
    let mut cmd = net.command(0, BIN);
    cmd.args(["client", "--iface", &net.host(0).iface, "--config"]).arg(config);
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let last = server.map(|(child, rx)| {
            let _ = child.interrupt(Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(300));
            rx.try_iter().collect::<Vec<_>>().join("\n")
        });
        panic!("the client failed:\n{stderr}\nthe server's last words:\n{}", last.unwrap_or_default());
    }
    let line = stderr.lines().find(|l| l.contains("VM 1 vCPU 0: reported")).unwrap_or_else(|| panic!("{stderr}"));
    let words: Vec<u32> = line
        .split("reported")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|w| u32::from_str_radix(w.trim_start_matches("0x"), 16).unwrap())
        .collect();
    let report = VirtioBlkReport::parse(&words).unwrap_or_else(|e| panic!("{e:?}: {stderr}"));
    (stderr, report)
}

/// The guest's check passed and the image holds what it wrote.
fn assert_checked(args: &VirtioBlkArgs, report: &VirtioBlkReport, image: &Path, stderr: &str) {
    let capacity = DISK_BYTES / 512;
    assert_eq!(report.capacity, capacity, "{stderr}");
    assert_eq!((report.mismatches, report.bad_status), (0, 0), "{report:?}\n{stderr}");
    assert_eq!(
        report.sum_or_cycles,
        guests::virtio_blk_checksum(args.seed, capacity, args.bs, args.count),
        "{report:?}\n{stderr}"
    );
    let bytes = std::fs::read(image).unwrap();
    for first in guests::virtio_blk_sectors(args.seed, capacity, args.bs, args.count) {
        for s in first..first + u64::from(args.bs) {
            let at = (s * 512) as usize;
            assert_eq!(&bytes[at..at + 512], &guests::virtio_blk_sector_bytes(args.seed, s)[..], "sector {s}");
        }
    }
}

#[test]
fn the_block_guest_reads_back_what_it_wrote_remote_remote_with_faults_and_local() {
    if !dmfabric_testkit::privileged_or_skip("the_block_guest_reads_back_what_it_wrote", &[Need::Root, Need::Kvm]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let keys = Keys::new("blk", net.host(0).mac, &[(3, &[(1, 1)])]);
    let args = check_args();
    let remote = format!("server = 1\ndevice = {DISK}\nirq = [10]");
    let mut checksums = Vec::new();
    for faults in [None, Some("drop=0.05,dup=0.05,reorder=0.05,seed=11")] {
        let image = keys.dir.join(format!("disk-{}.img", checksums.len()));
        let config = server_config(&keys, &image);
        let iface = net.host(1).iface.clone();
        let mut server_args = vec!["server", "--iface", &iface, "--config", config.to_str().unwrap()];
        if let Some(f) = faults {
            server_args.extend(["--faults", f]);
        }
        let mut logged = spawn_logged(&net, 1, &server_args);
        let ready = wait_for(&logged.1, "dmfabric server: acting for").expect("server ready");
        assert!(ready.iter().any(|l| l.contains(&format!("device {DISK}: created"))), "{ready:?}");
        let (stderr, report) = run_client(&net, &client_config(&keys, &args, &remote), Some(&mut logged));
        let (mut server, rx) = logged;
        assert_checked(&args, &report, &image, &stderr);
        checksums.push(report.sum_or_cycles);
        assert!(server.interrupt(Duration::from_secs(5)).unwrap().success());
        let lines =
            wait_for(&rx, "device DMA").unwrap_or_else(|l| panic!("server's last lines: {l:?}\nclient: {stderr}"));
        let dma = lines.last().unwrap();
        assert!(dma.contains("failed 0"), "{dma}");
        if faults.is_some() {
            assert!(!dma.contains("retransmitted 0,"), "5 % lost: some chunks went again: {dma}");
            // (Said when the data plane stops, before the counters.)
            let f = lines.iter().find(|l| l.contains("faults injected")).unwrap_or_else(|| panic!("{lines:?}"));
            assert!(!f.contains("dropped 0 "), "{f}");
        }
    }
    // The same guest with the disk in the client process.
    let image = keys.dir.join("disk-local.img");
    dmfabric_storage::create_image(&image, DISK_BYTES).unwrap();
    let local = format!("local = \"virtio-blk\"\nimage = \"{}\"\nirq = [10]", image.display());
    let (stderr, report) = run_client(&net, &client_config(&keys, &args, &local), None);
    assert_checked(&args, &report, &image, &stderr);
    checksums.push(report.sum_or_cycles);
    assert!(checksums.windows(2).all(|w| w[0] == w[1]), "{checksums:x?}");
}

#[test]
fn what_the_guest_flushed_survives_kill_9_of_the_server() {
    if !dmfabric_testkit::privileged_or_skip("what_the_guest_flushed_survives_kill_9", &[Need::Root, Need::Kvm]) {
        return;
    }
    let net = TestNet::pair().unwrap();
    let keys = Keys::new("blk-kill", net.host(0).mac, &[(3, &[(1, 1)])]);
    let args = VirtioBlkArgs { count: 96, ..check_args() };
    let image = keys.dir.join("disk.img");
    let config = server_config(&keys, &image);
    let iface = net.host(1).iface.clone();
    let mut logged = spawn_logged(&net, 1, &["server", "--iface", &iface, "--config", config.to_str().unwrap()]);
    wait_for(&logged.1, "dmfabric server: acting for").expect("server ready");
    let remote = format!("server = 1\ndevice = {DISK}");
    let (stderr, report) = run_client(&net, &client_config(&keys, &args, &remote), Some(&mut logged));
    let (mut server, _rx) = logged;
    // The guest's FLUSH completed before it read anything back: kill the
    // server at once, no chance to write anything out.
    server.child().kill().unwrap();
    let status = server.child().wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    assert_checked(&args, &report, &image, &stderr);
}
