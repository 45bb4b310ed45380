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

/// `scratch_loop`: rdi round trips of OUT then IN on port rsi (COM1's
/// scratch register), each exit timed with the guest's TSC into two u32
/// samples per round trip at guest address rdx; reports round trips and a
/// checksum, exits (under QEMU: halts, for its memory to be read).
pub const SCRATCH_LOOP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/scratch_loop.bin"));

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
    ("scratch_loop", SCRATCH_LOOP),
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
