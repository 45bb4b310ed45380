//! The test guests' Multiboot builds boot under QEMU with KVM and run to
//! their exit port, the same code the shim runs (needs qemu-system-x86,
//! which the set-up installs, and /dev/kvm).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dmfabric_testkit::Need;
use dmfabric_vmm_shim::guests::{self, MULTIBOOT, UART_HELLO_TEXT};

fn qemu_present() -> bool {
    Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Sectors of the disk `virtio_blk` gets under QEMU.
const VIRTIO_BLK_SECTORS: u64 = 4099;

#[test]
fn multiboot_guests_run_to_their_exit_port_under_qemu() {
    if !dmfabric_testkit::privileged_or_skip("multiboot_guests_run_under_qemu", &[Need::Kvm]) {
        return;
    }
    if !qemu_present() {
        assert!(
            std::env::var_os("DMFABRIC_REQUIRE_PRIVILEGED").is_none(),
            "qemu-system-x86_64 is missing: run scripts/setup.sh"
        );
        eprintln!("multiboot_guests_run_under_qemu: skipped, qemu-system-x86_64 not installed (scripts/setup.sh)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dmfabric-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, image) in MULTIBOOT {
        let kernel = dir.join(format!("{name}.mb.bin"));
        let debug = dir.join(format!("{name}.debug"));
        let serial = dir.join(format!("{name}.serial"));
        std::fs::write(&kernel, image).unwrap();
        // virtio_blk finds its disk on one of microvm's (modern) virtio-mmio transports.
        let machine = if *name == "virtio_blk" {
            let disk = dir.join("disk.img");
            std::fs::write(&disk, vec![0u8; VIRTIO_BLK_SECTORS as usize * 512]).unwrap();
            vec![
                "-M".to_string(),
                "microvm".into(),
                "-global".into(),
                "virtio-mmio.force-legacy=false".into(),
                "-drive".into(),
                format!("id=d0,file={},format=raw,if=none", disk.display()),
                "-device".into(),
                "virtio-blk-device,drive=d0".into(),
            ]
        } else if *name == "apic_hpet" {
            // pc's HPET offers pin 2 alone, where the PIT ticks too: q35's pins (apic_hpet_qemu.rs).
            vec!["-M".to_string(), "pc".into(), "-global".into(), "hpet.hpet-intcap=0xff0104".into()]
        } else {
            vec!["-M".to_string(), "pc".into()]
        };
        let start = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-enable-kvm", "-cpu", "qemu64"])
            .args(&machine)
            .args(["-m", "16", "-nodefaults", "-display", "none"])
            .args(["-no-reboot", "-device", "isa-debug-exit,iobase=0x4f4,iosize=4", "-kernel"])
            .arg(&kernel)
            .arg("-chardev")
            .arg(format!("file,id=dbg,path={}", debug.display()))
            .args(["-device", "isa-debugcon,iobase=0x4f0,chardev=dbg"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("{name}: QEMU did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        // isa-debug-exit: exit status (code << 1) | 1; the guests exit with
        // 0. A reset ends QEMU (-no-reboot) with 0.
        let want = if *name == "kbd_reset" { 0 } else { 1 };
        assert_eq!(status.code(), Some(want), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let reports = std::fs::read(&debug).unwrap();
        match *name {
            // Interrupts counted (none asked for) and stray vectors: both 0.
            "irq_wait" => assert_eq!(&reports[..2], &[0, 0], "{name}: {reports:?}"),
            // The text went out of QEMU's own 16550; the byte count reported.
            "uart_hello" => {
                assert_eq!(std::fs::read_to_string(&serial).unwrap(), UART_HELLO_TEXT);
                assert_eq!(reports, [UART_HELLO_TEXT.len() as u8]);
            }
            // QEMU's i8042 passed its self-test, then reset the machine.
            "kbd_reset" => assert_eq!(reports, [0x55]),
            // The build's defaults (build.rs): 64 requests of 1 sector, seed 1;
            // every dword's low byte: set up, 64 + flush + 64 done, the
            // checksum, no mismatch, no bad status, the capacity
            // (low byte), VERSION_1 accepted, 4 in flight.
            "virtio_blk" => {
                let sum = guests::virtio_blk_checksum(1, VIRTIO_BLK_SECTORS, 1, 64);
                let lo = |v: u64| (v & 0xff) as u8;
                assert_eq!(reports.len(), 13, "{name}: {reports:?}");
                assert_eq!(reports[..6], [0, 129, lo(sum), lo(sum >> 32), 0, 0], "{name}: {reports:?}");
                assert_eq!(reports[6], lo(VIRTIO_BLK_SECTORS), "{name}: {reports:?}");
                assert_eq!((reports[9], reports[11]), (1, 4), "{name}: {reports:?}");
            }
            // No error, 20 periodic interrupts, no watchdog; the rest in apic_hpet_qemu.rs.
            "apic_hpet" => {
                assert_eq!(reports.len(), guests::APIC_HPET_REPORT_WORDS, "{name}: {reports:?}");
                assert_eq!((reports[0], reports[1], reports[4]), (0, 20, 0), "{name}: {reports:?}");
            }
            // Two checksum dwords, one byte each through debugcon.
            _ => assert_eq!(reports.len(), 2, "{name}: {reports:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
