//! `UringImage` against real files: concurrency, refusals, open errors,
//! O_DIRECT, and durability across a SIGKILL.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dmfabric_devices::dma::SubmitError;
use dmfabric_devices::{BlockBackend, BlockOp, BlockResult};
use dmfabric_storage::{create_image, Direct, ImageError, OpenOptions, UringImage, MAX_REQUEST};

const EINVAL: i32 = libc::EINVAL;

/// A directory on the file system cargo builds on (a disk, not tmpfs).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("storage-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    create_image(&path, size).unwrap();
    path
}

fn open(path: &Path, direct: Direct) -> UringImage {
    UringImage::open(path, OpenOptions { direct, ..OpenOptions::default() }).unwrap()
}

/// Poll until `n` completions are in (30 s at most).
fn wait(img: &mut UringImage, n: usize) -> Vec<(u64, BlockResult)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < n {
        img.poll(&mut out);
        assert!(Instant::now() < deadline, "{} of {n} completions after 30 s", out.len());
        if out.len() < n {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    assert_eq!(img.in_flight(), 0);
    out
}

fn result_of(done: &[(u64, BlockResult)], tag: u64) -> &BlockResult {
    let mut it = done.iter().filter(|(t, _)| *t == tag);
    let (_, result) = it.next().unwrap_or_else(|| panic!("no completion for tag {tag}"));
    assert!(it.next().is_none(), "two completions for tag {tag}");
    result
}

/// The 4 KiB a test writes to block `block` in round `round`.
fn pattern(block: u64, round: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (block.wrapping_mul(31) ^ round.wrapping_mul(131) ^ (i as u64 / 7)) as u8).collect()
}

/// xorshift: the same "random" offsets every run.
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// The file system type of the mount `path` is on (from /proc/self/mountinfo).
fn fs_type(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut best = (0, String::from("unknown"));
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(mount), Some(kind)) = (fields.get(4), fields.get(dash + 1)) else { continue };
        if path.starts_with(mount) && mount.len() >= best.0 {
            best = (mount.len(), kind.to_string());
        }
    }
    best.1
}

fn concurrent_round_trip(direct: Direct) {
    let dir = scratch();
    let blocks = 4096u64; // 16 MiB
    let path = image(dir.path(), "disk.img", blocks * 4096);
    let mut img = open(&path, direct);
    println!("round trip: O_DIRECT {} on {}", img.direct(), fs_type(dir.path()));
    assert_eq!(img.capacity(), blocks * 4096);
    assert_eq!(img.depth(), 64);
    let targets: Vec<u64> = shuffled(blocks, 0x5eed)[..192].to_vec();

    for round in 0..3u64 {
        let batch = &targets[round as usize * 64..][..64];
        for (tag, &block) in batch.iter().enumerate() {
            let op = BlockOp::Write { offset: block * 4096, data: pattern(block, round, 4096) };
            img.submit(tag as u64, op).unwrap();
        }
        assert_eq!(img.in_flight(), 64);
        assert_eq!(img.submit(99, BlockOp::Flush), Err(SubmitError::Full));
        let done = wait(&mut img, 64);
        for tag in 0..64 {
            assert_eq!(result_of(&done, tag), &BlockResult::Done);
        }
        // Read back, 64 at once.
        for (tag, &block) in batch.iter().enumerate() {
            img.submit(tag as u64, BlockOp::Read { offset: block * 4096, len: 4096 }).unwrap();
        }
        let done = wait(&mut img, 64);
        for (tag, &block) in batch.iter().enumerate() {
            assert_eq!(result_of(&done, tag as u64), &BlockResult::Read(pattern(block, round, 4096)), "block {block}");
        }
    }
    img.submit(7, BlockOp::Flush).unwrap();
    assert_eq!(wait(&mut img, 1), vec![(7, BlockResult::Done)]);
    drop(img);

    let file = File::open(&path).unwrap();
    let mut buf = vec![0; 4096];
    for (i, &block) in targets.iter().enumerate() {
        file.read_at(&mut buf, block * 4096).unwrap();
        assert_eq!(buf, pattern(block, i as u64 / 64, 4096), "block {block} in the file");
    }
    // A block never written reads as zeroes (the image is sparse).
    let untouched = (0..blocks).find(|b| !targets.contains(b)).unwrap();
    file.read_at(&mut buf, untouched * 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn concurrent_round_trip_auto() {
    concurrent_round_trip(Direct::Auto);
}

#[test]
fn concurrent_round_trip_buffered() {
    concurrent_round_trip(Direct::Off);
}

#[test]
fn sector_sized_and_odd_lengths() {
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 1 << 20);
    for direct in [Direct::Auto, Direct::Off] {
        let mut img = open(&path, direct);
        // 512 B to 68 KiB, none a multiple of 4096 after the first few, at sector offsets.
        let lens = [512usize, 1024, 4096, 1536, 8192 + 512, 65536 + 3584];
        let mut offset = 512u64;
        let mut written = Vec::new();
        for (tag, &len) in lens.iter().enumerate() {
            let data = pattern(offset, tag as u64, len);
            img.submit(tag as u64, BlockOp::Write { offset, data: data.clone() }).unwrap();
            written.push((offset, data));
            offset += len as u64 + 512;
        }
        let done = wait(&mut img, lens.len());
        assert!(done.iter().all(|(_, r)| *r == BlockResult::Done), "{done:?}");
        for (tag, (offset, data)) in written.iter().enumerate() {
            img.submit(tag as u64, BlockOp::Read { offset: *offset, len: data.len() as u32 }).unwrap();
        }
        let done = wait(&mut img, lens.len());
        for (tag, (_, data)) in written.iter().enumerate() {
            assert_eq!(result_of(&done, tag as u64), &BlockResult::Read(data.clone()));
        }
    }
}

#[test]
fn flush_completes() {
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 1 << 20);
    let mut img = open(&path, Direct::Auto);
    img.submit(1, BlockOp::Write { offset: 0, data: vec![0xaa; 4096] }).unwrap();
    img.submit(2, BlockOp::Flush).unwrap();
    img.submit(3, BlockOp::Write { offset: 4096, data: vec![0xbb; 512] }).unwrap();
    img.submit(4, BlockOp::Flush).unwrap();
    let done = wait(&mut img, 4);
    for tag in 1..=4 {
        assert_eq!(result_of(&done, tag), &BlockResult::Done);
    }
    // A flush with nothing written before it.
    img.submit(5, BlockOp::Flush).unwrap();
    assert_eq!(wait(&mut img, 1), vec![(5, BlockResult::Done)]);
}

#[test]
fn read_only_refuses_writes() {
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 1 << 20);
    File::options().write(true).open(&path).unwrap().write_all_at(&[7; 512], 1024).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    let mut img = UringImage::open(&path, OpenOptions { read_only: true, ..OpenOptions::default() }).unwrap();
    assert!(img.read_only());
    img.submit(1, BlockOp::Write { offset: 0, data: vec![1; 512] }).unwrap();
    img.submit(2, BlockOp::Read { offset: 1024, len: 512 }).unwrap();
    img.submit(3, BlockOp::Flush).unwrap();
    let done = wait(&mut img, 3);
    assert_eq!(result_of(&done, 1), &BlockResult::Failed(libc::EROFS));
    assert_eq!(result_of(&done, 2), &BlockResult::Read(vec![7; 512]));
    assert_eq!(result_of(&done, 3), &BlockResult::Done);
    let mut first = [0xff; 512];
    File::open(&path).unwrap().read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, [0; 512], "the refused write reached the file");
}

#[test]
fn refused_requests_fail_without_panicking() {
    let dir = scratch();
    let size = 1u64 << 20;
    let path = image(dir.path(), "disk.img", size);
    for direct in [Direct::Auto, Direct::Off] {
        let mut img = open(&path, direct);
        let bad = [
            BlockOp::Read { offset: 1, len: 512 },
            BlockOp::Read { offset: 0, len: 511 },
            BlockOp::Read { offset: 0, len: 100 },
            BlockOp::Read { offset: size, len: 512 },
            BlockOp::Read { offset: size - 512, len: 1024 },
            BlockOp::Read { offset: u64::MAX - 511, len: 1024 },
            BlockOp::Read { offset: 0, len: MAX_REQUEST + 512 },
            BlockOp::Read { offset: !511, len: !511 },
            BlockOp::Write { offset: 256, data: vec![0; 512] },
            BlockOp::Write { offset: 0, data: vec![0; 513] },
            BlockOp::Write { offset: size, data: vec![0; 512] },
            BlockOp::Write { offset: u64::MAX - 511, data: vec![0; 1024] },
        ];
        let n = bad.len() as u64;
        for (tag, op) in bad.into_iter().enumerate() {
            img.submit(tag as u64, op).unwrap();
        }
        // Empty requests are fine; the last sector is in range.
        img.submit(100, BlockOp::Read { offset: 0, len: 0 }).unwrap();
        img.submit(101, BlockOp::Write { offset: size, data: Vec::new() }).unwrap();
        img.submit(102, BlockOp::Read { offset: size - 512, len: 512 }).unwrap();
        let done = wait(&mut img, n as usize + 3);
        for tag in 0..n {
            assert_eq!(result_of(&done, tag), &BlockResult::Failed(EINVAL), "request {tag}");
        }
        assert_eq!(result_of(&done, 100), &BlockResult::Read(Vec::new()));
        assert_eq!(result_of(&done, 101), &BlockResult::Done);
        assert_eq!(result_of(&done, 102), &BlockResult::Read(vec![0; 512]));
    }
}

#[test]
fn full_at_depth() {
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 1 << 20);
    // Not a power of two: the ring has 4 entries, the backend takes 3.
    let mut img = UringImage::open(&path, OpenOptions { depth: 3, ..OpenOptions::default() }).unwrap();
    assert_eq!(img.depth(), 3);
    img.submit(0, BlockOp::Read { offset: 0, len: 4096 }).unwrap();
    img.submit(1, BlockOp::Write { offset: 4096, data: vec![1; 4096] }).unwrap();
    // A refused request holds its place until polled too.
    img.submit(3, BlockOp::Read { offset: 3, len: 512 }).unwrap();
    assert_eq!(img.in_flight(), 3);
    assert_eq!(img.submit(4, BlockOp::Read { offset: 0, len: 512 }), Err(SubmitError::Full));
    assert_eq!(img.submit(4, BlockOp::Read { offset: 3, len: 1 }), Err(SubmitError::Full));
    let done = wait(&mut img, 3);
    assert_eq!(result_of(&done, 3), &BlockResult::Failed(EINVAL));
    img.submit(4, BlockOp::Read { offset: 4096, len: 512 }).unwrap();
    img.submit(5, BlockOp::Flush).unwrap();
    let done = wait(&mut img, 2);
    assert_eq!(result_of(&done, 4), &BlockResult::Read(vec![1; 512]));
    assert_eq!(result_of(&done, 5), &BlockResult::Done);
}

#[test]
fn is_a_send_block_backend() {
    fn send<T: Send>() {}
    send::<UringImage>();
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 1 << 20);
    let backend: Box<dyn BlockBackend> = Box::new(open(&path, Direct::Auto));
    let mut backend = std::thread::spawn(move || backend).join().unwrap();
    assert_eq!(backend.capacity(), 1 << 20);
    assert!(format!("{:?}", &*backend).contains("capacity"));
    backend.submit(1, BlockOp::Flush).unwrap();
}

/// `poll` makes no system call once everything is submitted: completions
/// must still arrive to a thread that only spins on it.
#[test]
fn completions_reach_a_spinning_poller() {
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 4 << 20);
    for direct in [Direct::Auto, Direct::Off] {
        let mut img = open(&path, direct);
        for tag in 0..32u64 {
            img.submit(tag, BlockOp::Write { offset: tag * 65536, data: pattern(tag, 3, 65536) }).unwrap();
        }
        img.submit(32, BlockOp::Flush).unwrap();
        for tag in 33..64u64 {
            img.submit(tag, BlockOp::Read { offset: (tag - 33) * 65536, len: 65536 }).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        while out.len() < 64 {
            img.poll(&mut out);
            std::hint::spin_loop();
            assert!(Instant::now() < deadline, "{} of 64 completions after 30 s of spinning", out.len());
        }
        assert!(out.iter().all(|(_, r)| !matches!(r, BlockResult::Failed(_))), "{out:?}");
    }
}

#[test]
fn read_of_a_shrunk_file_fails_with_eio() {
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 1 << 20);
    let mut img = open(&path, Direct::Off);
    File::options().write(true).open(&path).unwrap().set_len(512 << 10).unwrap();
    // Half in the file (a short read, submitted again, then nothing), and wholly past its end.
    img.submit(1, BlockOp::Read { offset: (512 << 10) - 4096, len: 8192 }).unwrap();
    img.submit(2, BlockOp::Read { offset: 768 << 10, len: 4096 }).unwrap();
    img.submit(3, BlockOp::Read { offset: 0, len: 4096 }).unwrap();
    let done = wait(&mut img, 3);
    assert_eq!(result_of(&done, 1), &BlockResult::Failed(libc::EIO));
    assert_eq!(result_of(&done, 2), &BlockResult::Failed(libc::EIO));
    assert_eq!(result_of(&done, 3), &BlockResult::Read(vec![0; 4096]));
}

#[test]
fn drop_waits_for_requests_in_flight() {
    let dir = scratch();
    let path = image(dir.path(), "disk.img", 4 << 20);
    for direct in [Direct::Auto, Direct::Off] {
        let mut img = open(&path, direct);
        for tag in 0..32u64 {
            img.submit(tag, BlockOp::Write { offset: tag * 65536, data: pattern(tag, 9, 65536) }).unwrap();
        }
        for tag in 32..64u64 {
            img.submit(tag, BlockOp::Read { offset: (tag - 32) * 65536, len: 65536 }).unwrap();
        }
        // Some in the kernel, the rest still queued: dropping hands them over and waits.
        let mut out = Vec::new();
        img.poll(&mut out);
        drop(img);
        let file = File::open(&path).unwrap();
        let mut buf = vec![0; 65536];
        for tag in 0..32u64 {
            file.read_exact_at(&mut buf, tag * 65536).unwrap();
            assert!(buf == pattern(tag, 9, 65536), "write {tag} was lost");
        }
    }
}

#[test]
fn direct_io_on_disk_file_systems() {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for base in [target.as_path(), Path::new("/var/tmp"), Path::new("/dev/shm")] {
        let Ok(dir) = tempfile::Builder::new().prefix("storage-direct-").tempdir_in(base) else {
            println!("{}: cannot make a directory there, skipped", base.display());
            continue;
        };
        let kind = fs_type(dir.path());
        let path = image(dir.path(), "disk.img", 1 << 20);
        let auto = open(&path, Direct::Auto);
        let on = UringImage::open(&path, OpenOptions { direct: Direct::On, ..OpenOptions::default() });
        println!(
            "{} ({kind}): auto uses O_DIRECT: {}; direct=on: {}",
            base.display(),
            auto.direct(),
            match &on {
                Ok(img) => format!("opened, O_DIRECT {}", img.direct()),
                Err(e) => e.to_string(),
            }
        );
        if matches!(kind.as_str(), "ext4" | "xfs") {
            assert!(auto.direct(), "{kind} takes O_DIRECT");
            assert!(on.is_ok_and(|img| img.direct()));
        } else if let Err(e) = on {
            assert!(matches!(e, ImageError::NoDirect { .. }), "{e}");
        }
    }
}

/// `chattr +i` for as long as it lives (root ignores mode bits).
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn open_errors_say_what_to_do() {
    let dir = scratch();
    let missing = dir.path().join("nope.img");
    let err = UringImage::open(&missing, OpenOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Image {} does not exist: create it with `dmfabric ctl add device ... --size` or give an existing image",
            missing.display()
        )
    );

    let err = UringImage::open(dir.path(), OpenOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Image {} is a directory, not a regular file or a block device: give an image file",
            dir.path().display()
        )
    );
    let err = UringImage::open("/dev/null", OpenOptions::default()).unwrap_err();
    assert!(matches!(err, ImageError::NotAnImage { kind: "character device", .. }), "{err}");

    let tiny = dir.path().join("tiny.img");
    File::create(&tiny).unwrap().set_len(100).unwrap();
    let err = UringImage::open(&tiny, OpenOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Image {} holds 100 bytes, fewer than the 512 the device needs: grow it (truncate -s 512) or give a larger image",
            tiny.display()
        )
    );
    let empty = dir.path().join("empty.img");
    File::create(&empty).unwrap();
    assert!(matches!(UringImage::open(&empty, OpenOptions::default()), Err(ImageError::TooSmall { size: 0, .. })));

    let small = image(dir.path(), "small.img", 4096);
    let err = UringImage::open(&small, OpenOptions { min_bytes: 8192, ..OpenOptions::default() }).unwrap_err();
    assert!(matches!(err, ImageError::TooSmall { size: 4096, min: 8192, .. }), "{err}");
    assert!(UringImage::open(&small, OpenOptions { min_bytes: 4096, ..OpenOptions::default() }).is_ok());

    let odd = dir.path().join("odd.img");
    File::create(&odd).unwrap().set_len(1000).unwrap();
    let err = UringImage::open(&odd, OpenOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Image {} holds 1000 bytes, not a whole number of 512-byte sectors: resize it to a multiple of 512 (truncate -s)",
            odd.display()
        )
    );

    for depth in [0, 4097] {
        let err = UringImage::open(&small, OpenOptions { depth, ..OpenOptions::default() }).unwrap_err();
        assert_eq!(err.to_string(), format!("Queue depth {depth} is out of range: give 1 to 4096"));
    }

    let enosys = std::io::Error::from_raw_os_error(libc::ENOSYS);
    assert_eq!(
        ImageError::NoUring { err: enosys }.to_string(),
        "io_uring is unavailable (Function not implemented (os error 38)): the kernel lacks io_uring or it is \
         disabled by sysctl kernel.io_uring_disabled; use a kernel with io_uring and set kernel.io_uring_disabled=0"
    );
}

#[test]
fn read_write_open_of_a_read_only_file() {
    let dir = scratch();
    let path = image(dir.path(), "ro.img", 4096);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    // Root ignores the mode: make the file immutable as well.
    let _guard = Command::new("chattr")
        .arg("+i")
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then(|| Immutable(path.clone()));
    if File::options().write(true).open(&path).is_ok() {
        println!("skipped: this user may write a file of mode 0444 and chattr +i is not available");
        return;
    }
    let err = UringImage::open(&path, OpenOptions::default()).unwrap_err();
    println!("{err}");
    assert!(matches!(err, ImageError::ReadOnly { .. }), "{err}");
    let text = err.to_string();
    assert!(text.starts_with(&format!("Image {} is read-only (", path.display())), "{text}");
    assert!(text.ends_with("): make it writable, or attach the device read-only"), "{text}");
    // Read-only is what it takes.
    assert!(UringImage::open(&path, OpenOptions { read_only: true, ..OpenOptions::default() }).is_ok());
}

#[test]
fn create_image_makes_a_sparse_file_and_refuses_another_size() {
    let dir = scratch();
    let path = dir.path().join("new.img");
    create_image(&path, 1 << 30).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "not sparse: {} blocks", meta.blocks());
    // Same size: kept (and its data).
    File::options().write(true).open(&path).unwrap().write_all_at(b"keep", 0).unwrap();
    create_image(&path, 1 << 30).unwrap();
    let mut head = [0; 4];
    File::open(&path).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"keep");

    let err = create_image(&path, 1 << 20).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Image {} exists with 1073741824 bytes, not the 1048576 asked for: remove it first, or ask for 1073741824 bytes",
            path.display()
        )
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 30);

    for size in [0, 1000] {
        let err = create_image(dir.path().join("bad.img"), size).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("Image size {size} is not a positive multiple of 512 bytes: give whole sectors, e.g. 64M")
        );
    }
    assert!(!dir.path().join("bad.img").exists());

    let orphan = dir.path().join("no/such/dir/x.img");
    let err = create_image(&orphan, 4096).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("The directory of image {} does not exist: create it first (mkdir -p)", orphan.display())
    );
    assert!(matches!(create_image(dir.path(), 4096), Err(ImageError::NotAnImage { .. })));
}

// --- durability: a child writes and flushes, and is killed with SIGKILL ---

const CHILD_ENV: &str = "DMFABRIC_STORAGE_DURABILITY_IMAGE";
const FLUSHED: &str = "DMFABRIC-STORAGE-FLUSHED";
const SECTORS: u64 = 48;

fn durable_sector(i: u64) -> (u64, Vec<u8>) {
    let offset = (i * 37 + 5) * 512;
    (offset, pattern(i, 0xd0, 512))
}

/// Kills the child if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child's half of [`flushed_writes_survive_sigkill`]; does nothing in
/// an ordinary test run.
#[test]
fn durability_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let mut img = open(Path::new(&path), Direct::Auto);
    for i in 0..SECTORS {
        let (offset, data) = durable_sector(i);
        img.submit(i, BlockOp::Write { offset, data }).unwrap();
    }
    let done = wait(&mut img, SECTORS as usize);
    assert!(done.iter().all(|(_, r)| *r == BlockResult::Done), "{done:?}");
    img.submit(1000, BlockOp::Flush).unwrap();
    assert_eq!(wait(&mut img, 1), vec![(1000, BlockResult::Done)]);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "\n{FLUSHED} direct={}", img.direct()).unwrap();
    stdout.flush().unwrap();
    // Spin until killed (or give up after two minutes if the parent is gone).
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        std::hint::spin_loop();
        std::thread::sleep(Duration::from_millis(1));
    }
    std::process::exit(3);
}

#[test]
fn flushed_writes_survive_sigkill() {
    let dir = scratch();
    let path = image(dir.path(), "durable.img", 1 << 20);
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "durability_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let mut marker = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest prints "test durability_child ... " before it, on the same line.
        if let Some(at) = line.find(FLUSHED) {
            marker = Some(line[at..].to_owned());
            break;
        }
    }
    let marker = marker.expect("the child ended without flushing");
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the child was not killed: {status}");
    println!("child: {marker}, then SIGKILL");

    let file = File::open(&path).unwrap();
    let mut buf = vec![0; 512];
    for i in 0..SECTORS {
        let (offset, data) = durable_sector(i);
        file.read_exact_at(&mut buf, offset).unwrap();
        assert_eq!(buf, data, "flushed sector {i} at {offset} is not in the file");
    }
}
