//! Test guests, assembled from `guests/*.S` by build.rs with the system
//! assembler, as flat binaries linked to run at [`LOAD_ADDR`]. Each starts
//! in 64-bit long mode with its arguments in rdi, rsi, rdx, reports through
//! the debug port ([`crate::debugport`]) and exits through its exit port.

/// Guest-physical address the guests are linked for and loaded at.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// `io_loop`: rdi iterations of OUT/IN on port rsi and an 8-byte MMIO
/// write/read at rdx; reports a checksum (two dwords).
pub const IO_LOOP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/io_loop.bin"));

/// `pio_loop`: rdi round trips of OUT then IN on port rsi (two exits
/// each); reports a checksum (two dwords). The exit benchmark's guest.
pub const PIO_LOOP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pio_loop.bin"));

/// `irq_wait`: waits for rdi interrupts on IRQ 5 from the irqtest device at
/// port rsi (rdx: 0 edge, 1 level); reports interrupts counted, interrupts
/// on other vectors and the device's own count.
pub const IRQ_WAIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/irq_wait.bin"));

/// The Multiboot builds of the guests (`guests/multiboot.S` in front):
/// images `qemu-system-x86_64 -kernel` boots, with the default arguments of
/// build.rs. Their debug port is QEMU's `isa-debugcon` at 0x4f0 (one byte
/// per report) and their exit port `isa-debug-exit` at 0x4f4.
pub const MULTIBOOT: &[(&str, &[u8])] = &[
    ("io_loop", include_bytes!(concat!(env!("OUT_DIR"), "/io_loop.mb.bin"))),
    ("pio_loop", include_bytes!(concat!(env!("OUT_DIR"), "/pio_loop.mb.bin"))),
    ("irq_wait", include_bytes!(concat!(env!("OUT_DIR"), "/irq_wait.mb.bin"))),
    ("uart_hello", include_bytes!(concat!(env!("OUT_DIR"), "/uart_hello.mb.bin"))),
    ("kbd_reset", include_bytes!(concat!(env!("OUT_DIR"), "/kbd_reset.mb.bin"))),
    ("scratch_loop", include_bytes!(concat!(env!("OUT_DIR"), "/scratch_loop.mb.bin"))),
    ("virtio_blk", include_bytes!(concat!(env!("OUT_DIR"), "/virtio_blk.mb.bin"))),
    ("apic_hpet", include_bytes!(concat!(env!("OUT_DIR"), "/apic_hpet.mb.bin"))),
];

/// `uart_hello`: sends "hello from a dmfabric guest\n" through the 16550 at
/// port rdi; reports the bytes sent.
pub const UART_HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/uart_hello.bin"));
/// What `uart_hello` sends.
pub const UART_HELLO_TEXT: &str = "hello from a dmfabric guest\n";

/// `timer_count`: programs the event timer at port rsi periodic every rdi
/// µs and counts rdx interrupts on IRQ 5; reports the count, stray
/// interrupts, the timer's NOW_US at the first and last interrupt and its COUNT.
pub const TIMER_COUNT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/timer_count.bin"));

/// `uart_echo`: sets up the 16550 at port rdi with receive interrupts on
/// IRQ 4, writes "ready\n", echoes what it receives until a newline;
/// reports bytes received and stray interrupts.
pub const UART_ECHO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/uart_echo.bin"));

/// `kbd_reset`: reports the i8042's self-test answer, then pulses the reset
/// line (command 0xFE): the VM ends by reset.
pub const KBD_RESET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kbd_reset.bin"));

/// `demo`: the guest of `dmfabric demo`. Banner on COM1, the date and time
/// from the RTC, rdi event-timer ticks of rsi µs, then echoes a line typed
/// at the console (waiting at most rdx ticks), then resets through the
/// i8042. Reports ticks seen and bytes echoed.
pub const DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.bin"));

/// `demo_apic`: what `demo` does, its interrupts through the local APIC and
/// the I/O APIC (a split irqchip: no 8259), its ticks from HPET timer 0
/// (periodic, edge, I/O APIC pin 16) instead of the event timer; COM1's
/// IRQ 4 on pin 4. Same arguments and report as `demo`.
pub const DEMO_APIC: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo_apic.bin"));

/// `scratch_loop`: rdi round trips of OUT then IN on port rsi (COM1's
/// scratch register), each exit timed with the guest's TSC into two u32
/// samples per round trip at guest address rdx; reports round trips and a
/// checksum, exits (under QEMU: halts, for its memory to be read).
pub const SCRATCH_LOOP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/scratch_loop.bin"));

/// `virtio_blk`: a virtio-mmio (version 2) block driver that checks what
/// it writes (mode 0) or keeps requests in flight for a benchmark (modes
/// 1-3); its arguments are [`VirtioBlkArgs::regs`], its report
/// [`VirtioBlkReport::parse`] (the header of `guests/virtio_blk.S` has
/// both in full).
pub const VIRTIO_BLK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/virtio_blk.bin"));

/// `apic_hpet`: the local APIC, the I/O APIC and the HPET with no 8259 or
/// PIT: HPET timer 0 periodic (edge) counted and timed against the TSC,
/// then timer 1 one-shot level-triggered, EOIed once with its line still
/// asserted (the I/O APIC must deliver it again); its arguments are
/// [`ApicHpetArgs::regs`], its report [`ApicHpetReport::parse`] (the
/// header of `guests/apic_hpet.S` has both in full).
pub const APIC_HPET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/apic_hpet.bin"));

include!(concat!(env!("OUT_DIR"), "/mb_args.rs"));

/// The Multiboot image of `name` with its arguments set to `args`.
pub fn multiboot_with_args(name: &str, args: [u64; 3]) -> Option<Vec<u8>> {
    let image = MULTIBOOT.iter().find(|(n, _)| *n == name)?.1;
    let off = MB_ARGS_OFFSET.iter().find(|(n, _)| *n == name)?.1;
    let mut out = image.to_vec();
    for (i, a) in args.iter().enumerate() {
        out.get_mut(off + 8 * i..off + 8 * i + 8)?.copy_from_slice(&a.to_le_bytes());
    }
    Some(out)
}

/// The IRQ line `irq_wait` listens on.
pub const IRQ_WAIT_LINE: u32 = 5;

/// The guests by name, for the client's config.
pub const ALL: &[(&str, &[u8])] = &[
    ("io_loop", IO_LOOP),
    ("pio_loop", PIO_LOOP),
    ("irq_wait", IRQ_WAIT),
    ("uart_hello", UART_HELLO),
    ("timer_count", TIMER_COUNT),
    ("uart_echo", UART_ECHO),
    ("kbd_reset", KBD_RESET),
    ("demo", DEMO),
    ("demo_apic", DEMO_APIC),
    ("scratch_loop", SCRATCH_LOOP),
    ("virtio_blk", VIRTIO_BLK),
    ("apic_hpet", APIC_HPET),
];

/// The checksum `io_loop` reports against a device whose registers read
/// back what was written (a register file).
pub fn io_loop_checksum(iterations: u64) -> u64 {
    (0..iterations).fold(0u64, |sum, i| sum.wrapping_add(i & 0xffff_ffff).wrapping_add(i.wrapping_mul(3)))
}

/// The checksum `pio_loop` reports against a register file.
pub fn pio_loop_checksum(round_trips: u64) -> u64 {
    (0..round_trips).fold(0u64, |sum, i| sum.wrapping_add(i & 0xffff_ffff))
}

/// What `virtio_blk` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioBlkMode {
    /// Write a pattern at pseudo-random sectors, flush, read it back and
    /// compare ([`virtio_blk_checksum`]).
    Check = 0,
    RandRead = 1,
    RandWrite = 2,
    SeqRead = 3,
}

/// The arguments of `virtio_blk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioBlkArgs {
    /// The virtio-mmio transport's base; 0: scan QEMU microvm's slots
    /// ([`VIRTIO_MMIO_SCAN`]).
    pub mmio: u64,
    pub mode: VirtioBlkMode,
    /// Do the I/O in user mode (CPL3), which this host runs natively,
    /// instead of kernel mode, which it emulates an instruction at a time
    /// (MACHINE-FACTS.md): for benchmarks of the device rather than of the
    /// emulator. Each exit costs more there (~25 µs instead of ~8 µs).
    pub user: bool,
    /// Requests in flight (1-255; the guest takes at most its queue size / 3).
    pub qd: u8,
    /// Sectors of 512 bytes per request (1-256).
    pub bs: u16,
    /// Requests (in [`VirtioBlkMode::Check`]: per phase).
    pub count: u32,
    pub seed: u32,
    /// Guest-physical address of the driver's memory ([`VirtioBlkArgs::memory`]
    /// bytes of RAM, below 4 GiB); 0: [`VIRTIO_BLK_AREA`].
    pub area: u32,
}

/// Where `virtio_blk` keeps its rings and buffers unless told otherwise.
pub const VIRTIO_BLK_AREA: u64 = 0x20_0000;
/// Where `virtio_blk` looks for its device when its base is 0: QEMU
/// microvm's virtio-mmio transports, `(first, stride, count)` (QEMU puts
/// the first device on the last transport).
pub const VIRTIO_MMIO_SCAN: (u64, u64, u64) = (0xfeb0_0000, 0x200, 32);

impl VirtioBlkArgs {
    /// rdi, rsi, rdx.
    pub fn regs(&self) -> [u64; 3] {
        let mode = self.mode as u64 | if self.user { 0x80 } else { 0 };
        let rsi = mode | u64::from(self.qd) << 8 | u64::from(self.bs) << 16 | u64::from(self.count) << 32;
        [self.mmio, rsi, u64::from(self.seed) | u64::from(self.area) << 32]
    }

    /// The driver's memory's base.
    pub fn area(&self) -> u64 {
        if self.area == 0 {
            VIRTIO_BLK_AREA
        } else {
            u64::from(self.area)
        }
    }

    /// Bytes of memory the driver uses from [`VirtioBlkArgs::area`]: rings
    /// and bookkeeping, the latency samples, a buffer per request in flight.
    pub fn memory(&self) -> u64 {
        0x1_0000 + self.samples_bytes() + u64::from(self.qd.max(1)) * u64::from(self.bs.clamp(1, 256)) * 512
    }

    fn samples_bytes(&self) -> u64 {
        (u64::from(self.count) * 4).next_multiple_of(0x1000)
    }
}

/// What `virtio_blk` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioBlkReport {
    /// Requests completed (in [`VirtioBlkMode::Check`]: writes, the flush
    /// if the device offers one, and reads).
    pub completed: u32,
    /// [`VirtioBlkMode::Check`]: the checksum of what was read back
    /// ([`virtio_blk_checksum`]); the benchmarks: TSC cycles from the first
    /// submission to the last completion.
    pub sum_or_cycles: u64,
    /// 64-bit words read back that differ from the pattern.
    pub mismatches: u32,
    /// Requests whose status byte was not VIRTIO_BLK_S_OK.
    pub bad_status: u32,
    /// The device's capacity in sectors.
    pub capacity: u64,
    /// Features the driver accepted.
    pub features: u64,
    pub queue_size: u32,
    /// Requests it kept in flight.
    pub in_flight: u32,
    /// Guest-physical address of the latency samples: one u32 of TSC
    /// cycles per request, in completion order (of the last phase).
    pub samples: u32,
}

/// Why `virtio_blk` stopped before doing any I/O: the code it reported
/// (and exited with).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtioBlkError {
    #[error("No virtio-mmio block device at the base given (or in the slots scanned)")]
    NoDevice,
    #[error("The transport is not virtio-mmio version 2 (under QEMU: -global virtio-mmio.force-legacy=false)")]
    Legacy,
    #[error("The device does not offer VIRTIO_F_VERSION_1, or refused FEATURES_OK")]
    Features,
    #[error("Queue 0 is in use or smaller than 4 entries")]
    Queue,
    #[error("The device is smaller than one request")]
    TooSmall,
    #[error("The device put an entry in the used ring that names no request")]
    BadUsed,
    #[error("Unknown mode")]
    BadMode,
    #[error("The guest reported {0:?}, which is no virtio_blk report")]
    Garbled(Vec<u32>),
}

impl VirtioBlkReport {
    /// The report in `words` (what the guest sent to the debug port).
    pub fn parse(words: &[u32]) -> Result<VirtioBlkReport, VirtioBlkError> {
        let garbled = || VirtioBlkError::Garbled(words.to_vec());
        match words.first() {
            Some(0) => {}
            Some(1) => return Err(VirtioBlkError::NoDevice),
            Some(2) => return Err(VirtioBlkError::Legacy),
            Some(3) => return Err(VirtioBlkError::Features),
            Some(4) => return Err(VirtioBlkError::Queue),
            Some(5) => return Err(VirtioBlkError::TooSmall),
            Some(6) => return Err(VirtioBlkError::BadUsed),
            Some(7) => return Err(VirtioBlkError::BadMode),
            _ => return Err(garbled()),
        }
        if words.len() != 13 {
            return Err(garbled());
        }
        let u64_at = |i| crate::debugport::u64_at(words, i).unwrap_or_default();
        Ok(VirtioBlkReport {
            completed: words[1],
            sum_or_cycles: u64_at(2),
            mismatches: words[4],
            bad_status: words[5],
            capacity: u64_at(6),
            features: u64_at(8),
            queue_size: words[10],
            in_flight: words[11],
            samples: words[12],
        })
    }
}

/// The LCG `virtio_blk` draws sectors from (Knuth's MMIX constants):
/// successive values after `seed`.
fn virtio_blk_lcg(seed: u32) -> impl Iterator<Item = u64> {
    std::iter::successors(Some(u64::from(seed)), |x| {
        Some(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407))
    })
    .skip(1)
}

/// The first sectors of the `count` requests of `bs` sectors that
/// `virtio_blk` makes in [`VirtioBlkMode::Check`] on a device of
/// `capacity` sectors (the same in both phases; they may overlap, which
/// the pattern makes harmless).
pub fn virtio_blk_sectors(seed: u32, capacity: u64, bs: u16, count: u32) -> Vec<u64> {
    let bs = u64::from(bs.clamp(1, 256));
    let span = capacity.saturating_sub(bs) + 1;
    virtio_blk_lcg(seed).take(count as usize).map(|x| (x >> 33) % span).collect()
}

/// Word `word` (0..64) of sector `sector` as `virtio_blk` writes it.
pub fn virtio_blk_pattern(seed: u32, sector: u64, word: u64) -> u64 {
    (sector ^ u64::from(seed) << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(word)
}

/// Sector `sector` as `virtio_blk` writes it.
pub fn virtio_blk_sector_bytes(seed: u32, sector: u64) -> [u8; 512] {
    let mut out = [0u8; 512];
    for (j, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&virtio_blk_pattern(seed, sector, j as u64).to_le_bytes());
    }
    out
}

/// The checksum [`VirtioBlkMode::Check`] reports when every word read
/// back is the pattern: the wrapping sum, over each request's sectors, of
/// each word rotated left by its index in the sector.
pub fn virtio_blk_checksum(seed: u32, capacity: u64, bs: u16, count: u32) -> u64 {
    let bs = u64::from(bs.clamp(1, 256));
    let mut sum = 0u64;
    for first in virtio_blk_sectors(seed, capacity, bs as u16, count) {
        for s in first..first + bs {
            for j in 0..64 {
                sum = sum.wrapping_add(virtio_blk_pattern(seed, s, j).rotate_left(j as u32));
            }
        }
    }
    sum
}

/// The arguments of `apic_hpet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicHpetArgs {
    /// Interrupts of the periodic timer to count (at least 2).
    pub periodic: u32,
    /// The periodic timer's period in µs; also the one-shot's delay and
    /// the time the guest waits for stray deliveries after the level test.
    pub period_us: u32,
    /// How long a phase may wait, in ms (the local APIC timer as a
    /// watchdog, assuming KVM's 1 GHz APIC bus); 0: 10 s.
    pub watchdog_ms: u32,
    /// The I/O APIC pin of HPET timer 0; None: the guest picks
    /// ([`ApicHpetArgs::regs`]).
    pub pin0: Option<u8>,
    /// The I/O APIC pin of HPET timer 1; None: the guest picks.
    pub pin1: Option<u8>,
    /// Lateness samples of the periodic timer to keep (0: none; at most
    /// [`APIC_HPET_SAMPLES_MAX`]), a u32 each at [`APIC_HPET_SAMPLES_AT`]:
    /// the VM needs RAM up to [`ApicHpetArgs::memory_end`].
    pub samples: u32,
    /// The level phase's one-shot delay (and the settling time after it)
    /// in ms; 0: `period_us`, as before. A remote HPET needs a few ms:
    /// with a shorter delay the comparator passes before the write that
    /// enables its interrupt arrives, and the one-shot is lost.
    pub level_delay_ms: u16,
}

/// Where `apic_hpet` leaves a copy of its report in guest memory (QEMU's
/// debugcon keeps only each dword's low byte).
pub const APIC_HPET_REPORT_AT: u64 = 0xa000;
/// Dwords of `apic_hpet`'s report.
pub const APIC_HPET_REPORT_WORDS: usize = 25;
/// Dwords of its report before the lateness samples' words were added
/// (what [`ApicHpetReport::parse`] still takes).
pub const APIC_HPET_REPORT_WORDS_V1: usize = 21;
/// Where `apic_hpet` keeps its periodic interrupts' lateness samples (a
/// u32 each, in main-counter ticks past the comparator that matched, in
/// order): above the flat image (at 1 MiB) and the Multiboot build's
/// stack and page tables.
pub const APIC_HPET_SAMPLES_AT: u64 = 0x40_0000;
/// The most samples it keeps (up to 8 MiB of guest memory).
pub const APIC_HPET_SAMPLES_MAX: u32 = 0x10_0000;
/// The vectors `apic_hpet` programs: the periodic timer's, the level
/// timer's, its watchdog's and the spurious vector.
pub const APIC_HPET_VECTORS: (u8, u8, u8, u8) = (0x30, 0x31, 0x3e, 0xff);

impl Default for ApicHpetArgs {
    /// The Multiboot build's: 20 interrupts 10 ms apart, 5 s a phase, pins
    /// picked by the guest.
    fn default() -> ApicHpetArgs {
        ApicHpetArgs {
            periodic: 20,
            period_us: 10_000,
            watchdog_ms: 5000,
            pin0: None,
            pin1: None,
            samples: 0,
            level_delay_ms: 0,
        }
    }
}

impl ApicHpetArgs {
    /// rdi, rsi, rdx. A pin left to the guest: timer 0 takes its lowest
    /// allowed pin (Tn_INT_ROUTE_CAP) >= 16, else 2, else its lowest;
    /// timer 1 its lowest allowed >= 16 other than timer 0's, else any
    /// other, else timer 0's (the phases do not overlap).
    pub fn regs(&self) -> [u64; 3] {
        let pin = |p: Option<u8>| u64::from(p.unwrap_or(0xff));
        [
            u64::from(self.periodic) | u64::from(self.watchdog_ms) << 32,
            u64::from(self.period_us),
            pin(self.pin0)
                | pin(self.pin1) << 8
                | u64::from(self.samples.min(APIC_HPET_SAMPLES_MAX)) << 16
                | u64::from(self.level_delay_ms) << 48,
        ]
    }

    /// The guest-physical end of what the guest uses with these
    /// arguments: its samples' end when it keeps any (a VM needs at least
    /// this much RAM; 8 MiB is always enough).
    pub fn memory_end(&self) -> u64 {
        let kept = self.samples.min(APIC_HPET_SAMPLES_MAX).min(self.periodic.max(2));
        if kept == 0 {
            return 2 << 20;
        }
        APIC_HPET_SAMPLES_AT + 4 * u64::from(kept)
    }
}

/// What `apic_hpet` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicHpetReport {
    /// 0, or the code of an [`ApicHpetError`] ([`ApicHpetReport::error`]);
    /// the rest of the report is what the guest had when it stopped.
    pub status: u32,
    /// Deliveries of the periodic timer's vector (0x30).
    pub periodic: u32,
    /// Deliveries of the level timer's vector (0x31).
    pub level: u32,
    /// Of those, deliveries that found timer 1's status bit set (its line
    /// asserted): the first and the one the EOI brought back.
    pub level_asserted: u32,
    /// Deliveries of the watchdog's vector (0x3e).
    pub watchdog: u32,
    /// Deliveries of any other vector.
    pub stray: u32,
    /// Spurious interrupts (0xff).
    pub spurious: u32,
    /// The HPET's main counter period in femtoseconds.
    pub hpet_period_fs: u32,
    /// The HPET's capabilities and ID register, low dword.
    pub hpet_caps: u32,
    pub hpet_timers: u32,
    /// Main counter ticks from the first periodic interrupt to the last.
    pub counter_delta: u64,
    /// TSC ticks over the same span.
    pub tsc_delta: u64,
    /// The I/O APIC's version register (version in bits 0-7, the last
    /// redirection entry's index in bits 16-23).
    pub ioapic_version: u32,
    /// The local APIC's ID register (the APIC id in bits 24-31).
    pub lapic_id: u32,
    pub lapic_version: u32,
    /// Tn_INT_ROUTE_CAP of timers 0 and 1.
    pub route_caps: [u32; 2],
    /// The I/O APIC pins of timers 0 and 1.
    pub pins: [u8; 2],
    /// The period in main-counter ticks.
    pub period_ticks: u32,
    /// Where the lateness samples are (0: none kept, or an old report).
    pub samples_at: u32,
    /// Lateness samples kept (the first this many periodic interrupts').
    pub samples: u32,
    /// The period index (main counter / period) of the first and the
    /// last periodic interrupt, low dwords (0, 0 in an old report).
    pub period_index: [u32; 2],
}

/// Why `apic_hpet` stopped early (its report's first word), or a report
/// that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApicHpetError {
    #[error("No I/O APIC at 0xfec00000 (its version register reads all ones or is no 82093AA's)")]
    NoIoApic,
    #[error("No HPET at 0xfed00000 (capabilities all ones, or a period of 0 or above 100 ns)")]
    NoHpet,
    #[error("The HPET has fewer than 2 timers")]
    FewTimers,
    #[error("HPET timer 0 cannot be periodic")]
    NotPeriodic,
    #[error("An I/O APIC pin outside its timer's Tn_INT_ROUTE_CAP or past the I/O APIC's last")]
    BadPin,
    #[error("Timed out waiting for the periodic timer's interrupts")]
    PeriodicTimeout,
    #[error("Timed out waiting for the level-triggered timer's interrupts")]
    LevelTimeout,
    #[error("The guest took an exception")]
    Exception,
    #[error("The guest reported error {0}, which apic_hpet has not")]
    Unknown(u32),
    #[error("The guest reported {0:?}, which is no apic_hpet report")]
    Garbled(Vec<u32>),
}

impl ApicHpetReport {
    /// The report in `words` (what the guest sent to the debug port).
    pub fn parse(words: &[u32]) -> Result<ApicHpetReport, ApicHpetError> {
        if words.len() != APIC_HPET_REPORT_WORDS && words.len() != APIC_HPET_REPORT_WORDS_V1 {
            return Err(ApicHpetError::Garbled(words.to_vec()));
        }
        let new = |i: usize| words.get(i).copied().unwrap_or(0);
        let u64_at = |i| crate::debugport::u64_at(words, i).unwrap_or_default();
        Ok(ApicHpetReport {
            status: words[0],
            periodic: words[1],
            level: words[2],
            level_asserted: words[3],
            watchdog: words[4],
            stray: words[5],
            spurious: words[6],
            hpet_period_fs: words[7],
            hpet_caps: words[8],
            hpet_timers: words[9],
            counter_delta: u64_at(10),
            tsc_delta: u64_at(12),
            ioapic_version: words[14],
            lapic_id: words[15],
            lapic_version: words[16],
            route_caps: [words[17], words[18]],
            pins: [words[19] as u8, (words[19] >> 8) as u8],
            period_ticks: words[20],
            samples_at: new(21),
            samples: new(22),
            period_index: [new(23), new(24)],
        })
    }

    /// The report as the guest left it in memory at [`APIC_HPET_REPORT_AT`].
    pub fn from_memory(bytes: &[u8]) -> Result<ApicHpetReport, ApicHpetError> {
        let words: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        ApicHpetReport::parse(&words)
    }

    /// Why the guest stopped early, if it did.
    pub fn error(&self) -> Option<ApicHpetError> {
        Some(match self.status {
            0 => return None,
            1 => ApicHpetError::NoIoApic,
            2 => ApicHpetError::NoHpet,
            3 => ApicHpetError::FewTimers,
            4 => ApicHpetError::NotPeriodic,
            5 => ApicHpetError::BadPin,
            6 => ApicHpetError::PeriodicTimeout,
            7 => ApicHpetError::LevelTimeout,
            8 => ApicHpetError::Exception,
            n => ApicHpetError::Unknown(n),
        })
    }

    /// Periods of the periodic timer from the first interrupt's to the
    /// last's, both counted: what would have been delivered with none
    /// missed (0 in an old report).
    pub fn periods_elapsed(&self) -> u32 {
        if self.period_index == [0, 0] {
            return 0;
        }
        self.period_index[1].wrapping_sub(self.period_index[0]).wrapping_add(1)
    }

    /// Periods missed over the same span: coalesced by the HPET, or
    /// interrupts that came a period or more late.
    pub fn missed_periods(&self) -> u32 {
        self.periods_elapsed().saturating_sub(self.periodic)
    }

    /// The lateness samples in `bytes` (guest memory from `samples_at`),
    /// in nanoseconds at the HPET's advertised period.
    pub fn lateness_ns(&self, bytes: &[u8]) -> Vec<f64> {
        let per_tick = f64::from(self.hpet_period_fs) / 1e6;
        bytes
            .chunks_exact(4)
            .take(self.samples as usize)
            .map(|c| f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) * per_tick)
            .collect()
    }

    /// Redirection entries of the I/O APIC.
    pub fn ioapic_entries(&self) -> u32 {
        ((self.ioapic_version >> 16) & 0xff) + 1
    }

    /// The APIC id of the vCPU that ran it.
    pub fn apic_id(&self) -> u8 {
        (self.lapic_id >> 24) as u8
    }

    /// Level deliveries that found the line already low: none on a correct
    /// interrupt path.
    pub fn level_unasserted(&self) -> u32 {
        self.level.saturating_sub(self.level_asserted)
    }

    /// Nanoseconds between the first and the last periodic interrupt by
    /// the HPET's main counter at its advertised period.
    pub fn hpet_ns(&self) -> f64 {
        self.counter_delta as f64 * f64::from(self.hpet_period_fs) / 1e6
    }

    /// The HPET's time over the TSC's for the same span, the TSC counting
    /// `tsc_per_ns` ticks a nanosecond: 1.0 when the HPET runs at the
    /// period it advertises.
    pub fn hpet_over_tsc(&self, tsc_per_ns: f64) -> f64 {
        self.hpet_ns() / (self.tsc_delta as f64 / tsc_per_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_blk_arguments_pack_as_the_guest_reads_them() {
        let a = VirtioBlkArgs {
            mmio: 0xfeb0_0000,
            mode: VirtioBlkMode::RandWrite,
            user: true,
            qd: 16,
            bs: 8,
            count: 100_000,
            seed: 0xdead_beef,
            area: 0x40_0000,
        };
        assert_eq!(a.regs(), [0xfeb0_0000, 0x82 | 16 << 8 | 8 << 16 | 100_000 << 32, 0xdead_beef | 0x40_0000 << 32]);
        assert_eq!(a.area(), 0x40_0000);
        assert_eq!(a.memory(), 0x1_0000 + 400_000u64.next_multiple_of(0x1000) + 16 * 8 * 512);
        assert_eq!(VirtioBlkArgs { area: 0, ..a }.area(), VIRTIO_BLK_AREA);
    }

    #[test]
    fn virtio_blk_sectors_stay_inside_the_device() {
        let s = virtio_blk_sectors(7, 100, 8, 1000);
        assert_eq!(s.len(), 1000);
        assert!(s.iter().all(|&x| x + 8 <= 100));
        // The first value after the seed, as the guest computes it.
        let x1 = 7u64.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        assert_eq!(s[0], (x1 >> 33) % 93);
        assert_eq!(virtio_blk_sectors(7, 8, 8, 3), vec![0, 0, 0]);
        assert_eq!(virtio_blk_sector_bytes(3, 9)[8..16], virtio_blk_pattern(3, 9, 1).to_le_bytes());
        assert_ne!(virtio_blk_checksum(1, 1 << 20, 1, 4), virtio_blk_checksum(2, 1 << 20, 1, 4));
    }

    #[test]
    fn apic_hpet_arguments_pack_as_the_guest_reads_them() {
        assert_eq!(ApicHpetArgs::default().regs(), [20 | 5000 << 32, 10_000, 0xffff]);
        assert_eq!(ApicHpetArgs::default().memory_end(), 2 << 20);
        let a = ApicHpetArgs {
            periodic: 7,
            period_us: 500,
            watchdog_ms: 0,
            pin0: Some(2),
            pin1: Some(17),
            samples: 0,
            level_delay_ms: 0,
        };
        assert_eq!(a.regs(), [7, 500, 2 | 17 << 8]);
        let s = ApicHpetArgs { samples: 1000, ..a };
        assert_eq!(s.regs()[2], 2 | 17 << 8 | 1000 << 16);
        assert_eq!(s.memory_end(), APIC_HPET_SAMPLES_AT + 28);
        let most = ApicHpetArgs { periodic: u32::MAX, samples: u32::MAX, ..a };
        assert_eq!(most.regs()[2] >> 16, u64::from(APIC_HPET_SAMPLES_MAX));
        assert_eq!(most.memory_end(), 8 << 20);
        assert_eq!(ApicHpetArgs { level_delay_ms: 20, ..s }.regs()[2], 2 | 17 << 8 | 1000 << 16 | 20 << 48);
    }

    #[test]
    fn apic_hpet_reports_parse() {
        let mut w = [0u32; APIC_HPET_REPORT_WORDS];
        w[..10].copy_from_slice(&[0, 20, 2, 2, 0, 0, 0, 10_000_000, 0x8086_a201, 3]);
        w[10..14].copy_from_slice(&[19_000_000, 0, 0xd09d_c300, 0]); // 190 ms; 3.5e9 TSC ticks
        w[14..21].copy_from_slice(&[0x0017_0011, 0, 0x0005_0014, 0xff_0104, 0xff_0104, 16 | 17 << 8, 1_000_000]);
        // An old report (21 words) parses, with no samples.
        let old = ApicHpetReport::parse(&w[..APIC_HPET_REPORT_WORDS_V1]).unwrap();
        assert_eq!((old.samples_at, old.samples, old.periods_elapsed(), old.missed_periods()), (0, 0, 0, 0));
        w[21..].copy_from_slice(&[0x40_0000, 20, 1, 21]);
        let r = ApicHpetReport::parse(&w).unwrap();
        assert_eq!(ApicHpetReport { samples_at: 0, samples: 0, period_index: [0, 0], ..r }, old);
        assert_eq!((r.samples_at, r.samples, r.periods_elapsed(), r.missed_periods()), (0x40_0000, 20, 21, 1));
        let samples: Vec<u8> = [150u32, 7, 99].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(r.lateness_ns(&samples), vec![1500.0, 70.0, 990.0]);
        assert_eq!(r.error(), None);
        assert_eq!((r.periodic, r.level, r.level_asserted, r.level_unasserted()), (20, 2, 2, 0));
        assert_eq!((r.ioapic_entries(), r.apic_id(), r.pins, r.hpet_timers), (24, 0, [16, 17], 3));
        assert_eq!(r.hpet_ns(), 190e6);
        assert!((r.hpet_over_tsc(f64::from(0xd09d_c300u32) / 190e6) - 1.0).abs() < 1e-12);
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(ApicHpetReport::from_memory(&bytes), Ok(r));
        w[0] = 7;
        assert_eq!(ApicHpetReport::parse(&w).unwrap().error(), Some(ApicHpetError::LevelTimeout));
        assert!(matches!(ApicHpetReport::parse(&w[..3]), Err(ApicHpetError::Garbled(_))));
    }

    #[test]
    fn virtio_blk_reports_parse() {
        let ok = [0, 129, 0x89ab_cdef, 0x0123_4567, 0, 0, 2048, 0, 0x244, 1, 128, 4, 0x21_0000];
        let r = VirtioBlkReport::parse(&ok).unwrap();
        assert_eq!(r.sum_or_cycles, 0x0123_4567_89ab_cdef);
        assert_eq!((r.capacity, r.features, r.queue_size, r.in_flight), (2048, 0x1_0000_0244, 128, 4));
        assert_eq!(VirtioBlkReport::parse(&[2]), Err(VirtioBlkError::Legacy));
        assert!(matches!(VirtioBlkReport::parse(&[0, 1]), Err(VirtioBlkError::Garbled(_))));
        assert!(matches!(VirtioBlkReport::parse(&[]), Err(VirtioBlkError::Garbled(_))));
    }
}
