# apic_hpet: the local APIC, the I/O APIC and the HPET, with no 8259 and
# no PIT (64-bit long mode, CPL0, paging on, the first 4 GiB identity-
# mapped: the shim's kvm.rs and multiboot.S both map 0xfec00000 (I/O
# APIC), 0xfed00000 (HPET) and 0xfee00000 (local APIC) with 2 MiB pages).
#
# In:  rdi = periodic interrupts to count N (bits 0-31, at least 2: 0
#            means 2) | watchdog per phase in ms (bits 32-63; 0: 10000);
#      rsi = period P in µs of the periodic timer (0: 1000); also the
#            delay of the one-shot and the settling time after it;
#      rdx = I/O APIC pins: bits 0-7 timer 0's, bits 8-15 timer 1's;
#            0xff: the guest picks from the timer's Tn_INT_ROUTE_CAP:
#            timer 0 its lowest allowed pin >= 16, else pin 2, else its
#            lowest; timer 1 its lowest allowed pin >= 16 other than
#            timer 0's, else its lowest other than timer 0's, else timer
#            0's (the two phases below run one after the other, so they
#            may share a pin). Pins >= 16 first: the ISA pins have other
#            drivers; under QEMU pc the PIT (in-kernel or not) still
#            ticks at 18.2 Hz into pin 2 while legacy replacement is off,
#            and with the in-kernel irqchip QEMU routes no GSI 2 at all,
#            so an HPET timer routed to 2 is lost there (QEMU pc's
#            capability is pin 2 alone: give QEMU
#            `-global hpet.hpet-intcap=0xff0104`, q35's and dmfabric's
#            HPET's, for pins 2, 8 and 16-23);
#            bits 16-47: lateness samples to keep, C (0: none, as before;
#            at most 0x100000). The VM then needs RAM up to SAMPLES_AT +
#            4 C: 8 MiB for the most (the flat image is at 1 MiB and the
#            Multiboot build's stack and page tables below 0x80000, so
#            0x400000 up is free RAM in any VM of 8 MiB or more);
#            bits 48-63: phase 2's delay D in ms (0: P, as before): the
#            one-shot's delay and the settling time after it. A short P
#            is too short for a remote HPET: the comparator written P
#            ahead has passed by the time the configuration write that
#            enables its interrupt arrives, and the one-shot is lost.
#
# Set-up: both 8259s masked (0x21, 0xa1 = 0xff) and never touched again;
# an IDT at 0x9000 (exceptions: stop with error 8; vector 0x30 the
# periodic timer, 0x31 the level timer, 0x3e the watchdog, 0xff the
# spurious vector, any other: counted as stray, EOI); the local APIC
# (xAPIC MMIO) enabled with spurious vector 0xff, TPR 0, LINT0 masked,
# its timer (divide by 128, one-shot, vector 0x3e) as a watchdog only;
# the I/O APIC's version read and all its pins masked; the HPET's
# capabilities read, the HPET halted (legacy replacement off), its main
# counter set to 0, its status cleared.
#
# Phase 1 (edge, periodic): timer 0 periodic, edge, routed to its pin,
# whose redirection entry is vector 0x30, edge, fixed, physical, to the
# local APIC id the guest reads from its APIC; ENABLE_CNF; `sti; hlt`
# until the handler has counted N. The handler reads the TSC, the main
# counter (one 64-bit read of 0x0f0), the TSC again, and keeps the
# midpoint of the two TSC reads with the counter, at the first and at the
# last interrupt; at the N-th it disables timer 0 itself (before its
# EOI), so exactly N are expected. The report carries both deltas
# (last - first): N - 1 periods of the main counter and of the TSC.
#
# Lateness: the handler also divides the main counter it read by the
# period P (in ticks): the quotient is the index of the latest period
# boundary at or before that read, the remainder how many ticks (10 ns on
# QEMU's and dmfabric's HPET) past it the read came. Why that boundary is
# the comparator that matched: the counter is set to 0 while the HPET is
# halted and timer 0's comparator to P, and in periodic mode the HPET adds
# P to the comparator at each match (QEMU's and dmfabric's keep it on that
# grid even when they coalesce late periods), so the k-th period matches
# at counter k P. Reading Tn_COMPARATOR in the handler would say the same
# (the matched one is the current one minus P) at the cost of one more
# register access per interrupt, which a remote HPET pays in a round trip.
# The remainder is the interrupt's lateness: from the comparator match to
# the handler's read of the counter (delivery, the few emulated
# instructions before the read, and the read's own way to the model).
# It is exact while lateness < P; a later one aliases to the next period
# (then the period indices jump, as they do for a coalesced period). The
# k-th interrupt's lateness (k from 0, k < C) is kept as a u32 (saturated)
# at SAMPLES_AT + 4 k, SAMPLES_AT = 0x400000; the first and the last
# interrupt's period indices go in the report: (last - first + 1) periods
# elapsed, N interrupts delivered, the difference periods missed
# (coalesced, or later than P).
#
# Phase 2 (level, one-shot): timer 0's pin masked; timer 1 one-shot,
# level, routed to its pin, whose entry is vector 0x31, level; its
# comparator D (P unless given) from now. The handler, at its first delivery, sends only
# the EOI: the line is still asserted, so the I/O APIC (its remote IRR
# cleared by the EOI) must deliver it again; at the second it clears
# the status bit (writes 2 to the general interrupt status, 0x020) and
# then sends the EOI. Each delivery also notes whether timer 1's status
# bit was set when it came. After the second, D more with interrupts on
# (polling the main counter) catch any further delivery: 2 expected.
# Then timer 1 is disabled, its pin masked, the HPET halted.
#
# The watchdog (local APIC timer; KVM's APIC bus runs at 1 GHz, so 128 ns
# a tick: the bound is only as good as that) ends a phase that waits too
# long, with error 6 or 7.
#
# Out: the report, 25 dwords, both on the report port 0x4f0 and at
# guest-physical 0xa000 (written before the port, for QEMU, whose
# debugcon keeps only each dword's low byte; the test reads the memory):
#   [0]  0, or an error code: 1 no I/O APIC (version all ones or not
#        0x1x/0x2x), 2 no HPET (capabilities all ones, or a period of 0
#        or above 100 ns), 3 fewer than 2 HPET timers, 4 timer 0 cannot
#        be periodic, 5 a pin not in its timer's Tn_INT_ROUTE_CAP or past
#        the I/O APIC's last, 6 timeout in phase 1, 7 timeout in phase 2,
#        8 an exception
#   [1]  vector 0x30 deliveries (periodic timer 0)
#   [2]  vector 0x31 deliveries (level timer 1)
#   [3]  of those, deliveries that found timer 1's status bit set
#   [4]  vector 0x3e deliveries (watchdog)
#   [5]  deliveries on any other vector
#   [6]  spurious interrupts (vector 0xff)
#   [7]  the HPET's period in fs (capabilities, high dword)
#   [8]  the HPET's capabilities, low dword
#   [9]  HPET timers (NUM_TIM_CAP + 1)
#   [10,11] main counter, last periodic interrupt - first
#   [12,13] TSC, last periodic interrupt - first
#   [14] the I/O APIC's version register (index 1)
#   [15] the local APIC's ID register (0x020)
#   [16] the local APIC's version register (0x030)
#   [17] timer 0's Tn_INT_ROUTE_CAP
#   [18] timer 1's Tn_INT_ROUTE_CAP
#   [19] pins used: timer 0's | timer 1's << 8
#   [20] the period in main-counter ticks
#   [21] where the lateness samples are (SAMPLES_AT), 0 if C is 0
#   [22] lateness samples kept: min(N delivered, C)
#   [23] the first periodic interrupt's period index (counter / P), low dword
#   [24] the last periodic interrupt's period index, low dword
# (Words 0-20 are as they were before 21-24 were added.)
# then exit code 0 on the exit port 0x4f4, and (under QEMU, where
# nothing answers there) a halt with interrupts off.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start

    .equ LAPIC, 0xfee00000
    .equ L_ID, 0x020
    .equ L_VERSION, 0x030
    .equ L_TPR, 0x080
    .equ L_EOI, 0x0b0
    .equ L_SVR, 0x0f0
    .equ L_LVT_TIMER, 0x320
    .equ L_LVT_LINT0, 0x350
    .equ L_TIMER_INIT, 0x380
    .equ L_TIMER_DIV, 0x3e0

    .equ IOAPIC, 0xfec00000
    .equ IO_WIN, 0x10
    .equ RTE_LEVEL, 1 << 15
    .equ RTE_MASKED, 1 << 16

    .equ HPET, 0xfed00000
    .equ H_CONF, 0x010
    .equ H_STATUS, 0x020
    .equ H_COUNTER, 0x0f0
    .equ H_T0_CONF, 0x100
    .equ H_T0_CMP, 0x108
    .equ H_T1_CONF, 0x120
    .equ H_T1_CMP, 0x128
    .equ TN_LEVEL, 1 << 1
    .equ TN_INT_ENB, 1 << 2
    .equ TN_PERIODIC, 1 << 3
    .equ TN_PER_CAP, 1 << 4
    .equ TN_SETVAL, 1 << 6
    .equ TN_ROUTE_SHIFT, 9

    .equ V_PERIODIC, 0x30
    .equ V_LEVEL, 0x31
    .equ V_WATCHDOG, 0x3e
    .equ V_SPURIOUS, 0xff

    .equ IDT_AT, 0x9000
    .equ REPORT_AT, 0xa000
    .equ REPORT_WORDS, 25
    .equ SAMPLES_AT, 0x400000
    .equ SAMPLES_MAX, 0x100000

_start:
    cli
    mov     eax, edi
    cmp     eax, 2
    jae     1f
    mov     eax, 2
1:
    mov     [rip + target], rax
    shr     rdi, 32
    jnz     1f
    mov     edi, 10000
1:
    imul    rdi, rdi, 7812              # ms in 128 ns ticks
    mov     eax, 0xffffffff
    cmp     rdi, rax
    cmova   rdi, rax
    mov     [rip + watchdog_ticks], rdi
    test    rsi, rsi
    jnz     1f
    mov     esi, 1000
1:
    mov     [rip + period_us], rsi
    mov     [rip + pins_arg], rdx
    mov     rax, rdx
    shr     rax, 48
    mov     [rip + level_ms], rax
    shr     rdx, 16
    mov     edx, edx
    mov     eax, SAMPLES_MAX
    cmp     rdx, rax
    cmova   rdx, rax
    mov     [rip + samples_cap], rdx

    # The 8259s: masked, and that is all.
    mov     al, 0xff
    out     0xa1, al
    out     0x21, al

    # IDT: exceptions, then everything else as stray, then ours.
    mov     rdi, IDT_AT
    lea     rax, [rip + exception_isr]
    mov     ecx, 32
1:
    call    gate
    add     rdi, 16
    dec     ecx
    jnz     1b
    lea     rax, [rip + stray_isr]
    mov     ecx, 256 - 32
1:
    call    gate
    add     rdi, 16
    dec     ecx
    jnz     1b
    lea     rax, [rip + periodic_isr]
    mov     rdi, IDT_AT + V_PERIODIC * 16
    call    gate
    lea     rax, [rip + level_isr]
    mov     rdi, IDT_AT + V_LEVEL * 16
    call    gate
    lea     rax, [rip + watchdog_isr]
    mov     rdi, IDT_AT + V_WATCHDOG * 16
    call    gate
    lea     rax, [rip + spurious_isr]
    mov     rdi, IDT_AT + V_SPURIOUS * 16
    call    gate
    lidt    [rip + idtr]

    # The local APIC.
    mov     r15d, LAPIC
    mov     eax, [r15 + L_ID]
    mov     [rip + lapic_id], eax
    mov     eax, [r15 + L_VERSION]
    mov     [rip + lapic_version], eax
    mov     dword ptr [r15 + L_TPR], 0
    mov     dword ptr [r15 + L_SVR], 0x100 | V_SPURIOUS
    mov     dword ptr [r15 + L_LVT_LINT0], 1 << 16
    mov     dword ptr [r15 + L_TIMER_INIT], 0
    mov     dword ptr [r15 + L_TIMER_DIV], 0xa      # divide by 128
    mov     dword ptr [r15 + L_LVT_TIMER], V_WATCHDOG

    # The I/O APIC: version, then every pin masked.
    mov     ebp, IOAPIC
    mov     ecx, 1
    call    ioapic_read
    mov     [rip + ioapic_version], eax
    mov     r8d, 1
    cmp     eax, 0xffffffff
    je      fail
    mov     edx, eax
    and     edx, 0xf0
    cmp     edx, 0x10
    je      1f
    cmp     edx, 0x20
    jne     fail
1:
    shr     eax, 16
    movzx   eax, al
    inc     eax
    mov     [rip + ioapic_pins], eax
    xor     r9d, r9d
1:
    mov     edx, r9d
    mov     eax, RTE_MASKED
    call    rte_write
    inc     r9d
    cmp     r9d, [rip + ioapic_pins]
    jb      1b

    # The HPET: capabilities, halted, counter 0, status cleared.
    mov     ebx, HPET
    mov     eax, [rbx]
    mov     [rip + hpet_caps], eax
    mov     ecx, [rbx + 4]
    mov     [rip + hpet_period], ecx
    mov     r8d, 2
    cmp     eax, 0xffffffff
    je      fail
    test    ecx, ecx
    jz      fail
    cmp     ecx, 100000000
    ja      fail
    shr     eax, 8
    and     eax, 0x1f
    inc     eax
    mov     [rip + hpet_timers], eax
    mov     r8d, 3
    cmp     eax, 2
    jb      fail
    mov     dword ptr [rbx + H_CONF], 0
    mov     dword ptr [rbx + H_T0_CONF], 0
    mov     dword ptr [rbx + H_T1_CONF], 0
    mov     dword ptr [rbx + H_STATUS], 3
    xor     eax, eax
    mov     [rbx + H_COUNTER], rax
    mov     eax, [rbx + H_T0_CONF + 4]
    mov     [rip + route_cap0], eax
    mov     eax, [rbx + H_T1_CONF + 4]
    mov     [rip + route_cap1], eax
    mov     r8d, 4
    test    dword ptr [rbx + H_T0_CONF], TN_PER_CAP
    jz      fail

    # Pins: each below 32, allowed by its timer's route capability, and
    # one of the I/O APIC's.
    mov     r8d, 5
    movzx   eax, byte ptr [rip + pins_arg]
    mov     ecx, [rip + route_cap0]
    cmp     eax, 0xff
    jne     2f
    mov     edx, ecx
    and     edx, 0xffff0000             # >= 16 if any ...
    bsf     eax, edx
    jnz     2f
    mov     eax, 2                      # ... else 2 ...
    bt      ecx, 2
    jc      2f
    bsf     eax, ecx                    # ... else any
    jz      fail
2:
    call    check_pin
    mov     [rip + pin0], eax
    movzx   eax, byte ptr [rip + pins_arg + 1]
    mov     ecx, [rip + route_cap1]
    cmp     eax, 0xff
    jne     3f
    mov     edx, [rip + pin0]
    btr     ecx, edx                    # not timer 0's ...
    mov     edx, ecx
    and     edx, 0xffff0000             # ... >= 16 if any ...
    bsf     eax, edx
    jnz     3f
    bsf     eax, ecx                    # ... else any other ...
    jnz     3f
    mov     eax, [rip + pin0]           # ... else shared
3:
    mov     ecx, [rip + route_cap1]
    call    check_pin
    mov     [rip + pin1], eax

    # The period in ticks: µs * 10^9 / fs (at least 1).
    mov     rax, [rip + period_us]
    imul    rax, rax, 1000000000
    mov     ecx, [rip + hpet_period]
    xor     edx, edx
    div     rcx
    test    rax, rax
    jnz     1f
    inc     eax
1:
    mov     [rip + period_ticks], rax
    # Phase 2's delay in ticks: D ms * 10^12 / fs, or P's.
    mov     [rip + level_ticks], rax
    mov     rax, [rip + level_ms]
    test    rax, rax
    jz      1f
    imul    rax, rax, 1000000
    imul    rax, rax, 1000000
    mov     ecx, [rip + hpet_period]
    xor     edx, edx
    div     rcx
    mov     [rip + level_ticks], rax
1:

    # Phase 1. Timer 0: the comparator set one-shot first (a periodic
    # timer's comparator write without Tn_VAL_SET_CNF sets only the
    # period, and a 64-bit write may arrive as two halves), then
    # periodic with Tn_VAL_SET_CNF: comparator and period P.
    mov     rax, [rip + period_ticks]
    mov     [rbx + H_T0_CMP], rax
    mov     eax, [rip + pin0]
    shl     eax, TN_ROUTE_SHIFT
    or      eax, TN_INT_ENB | TN_PERIODIC | TN_SETVAL
    mov     [rbx + H_T0_CONF], eax
    mov     rax, [rip + period_ticks]
    mov     [rbx + H_T0_CMP], rax
    mov     edx, [rip + pin0]
    mov     eax, V_PERIODIC
    call    rte_write
    call    watchdog_start
    mov     dword ptr [rbx + H_CONF], 1     # ENABLE_CNF
    mov     r8d, 6
1:
    sti
    hlt
    cli
    cmp     byte ptr [rip + timed_out], 0
    jne     fail
    mov     rax, [rip + periodic]
    cmp     rax, [rip + target]
    jb      1b
    mov     dword ptr [r15 + L_TIMER_INIT], 0
    mov     dword ptr [rbx + H_T0_CONF], 0
    mov     edx, [rip + pin0]
    mov     eax, V_PERIODIC | RTE_MASKED
    call    rte_write

    # Phase 2. Timer 1: one-shot, level, P from now. The comparator
    # first, with the interrupt still disabled: QEMU arms a timer on each
    # comparator (half) and configuration write, and one armed while its
    # comparator's high half is still the reset value's (all ones) can
    # fire at once (its ticks-to-ns conversion overflows).
    mov     edx, [rip + pin1]
    mov     eax, V_LEVEL | RTE_LEVEL
    call    rte_write
    mov     rax, [rbx + H_COUNTER]
    add     rax, [rip + level_ticks]
    mov     [rbx + H_T1_CMP], rax
    mov     dword ptr [rbx + H_STATUS], 2
    mov     eax, [rip + pin1]
    shl     eax, TN_ROUTE_SHIFT
    or      eax, TN_INT_ENB | TN_LEVEL
    mov     [rbx + H_T1_CONF], eax
    call    watchdog_start
    mov     r8d, 7
1:
    sti
    hlt
    cli
    cmp     byte ptr [rip + timed_out], 0
    jne     fail
    cmp     qword ptr [rip + level], 2
    jb      1b
    # D more with interrupts on: any further delivery is counted.
    mov     r9, [rbx + H_COUNTER]
    add     r9, [rip + level_ticks]
    sti
1:
    pause
    mov     rax, [rbx + H_COUNTER]
    cmp     rax, r9
    jb      1b
    cli
    mov     dword ptr [r15 + L_TIMER_INIT], 0
    mov     dword ptr [rbx + H_T1_CONF], 0
    mov     edx, [rip + pin1]
    mov     eax, V_LEVEL | RTE_LEVEL | RTE_MASKED
    call    rte_write
    mov     dword ptr [rbx + H_CONF], 0
    xor     r8d, r8d

# r8d: the error code (0: none). The report, then the exit.
fail:
    cli
    mov     r15d, LAPIC
    mov     dword ptr [r15 + L_TIMER_INIT], 0
    mov     ebx, HPET
    mov     dword ptr [rbx + H_CONF], 0
    mov     rdi, REPORT_AT
    mov     [rdi], r8d
    mov     eax, [rip + periodic]
    mov     [rdi + 4], eax
    mov     eax, [rip + level]
    mov     [rdi + 8], eax
    mov     eax, [rip + level_status]
    mov     [rdi + 12], eax
    mov     eax, [rip + watchdog]
    mov     [rdi + 16], eax
    mov     eax, [rip + stray]
    mov     [rdi + 20], eax
    mov     eax, [rip + spurious]
    mov     [rdi + 24], eax
    mov     eax, [rip + hpet_period]
    mov     [rdi + 28], eax
    mov     eax, [rip + hpet_caps]
    mov     [rdi + 32], eax
    mov     eax, [rip + hpet_timers]
    mov     [rdi + 36], eax
    mov     rax, [rip + last_counter]
    sub     rax, [rip + first_counter]
    mov     [rdi + 40], rax
    mov     rax, [rip + last_tsc]
    sub     rax, [rip + first_tsc]
    mov     [rdi + 48], rax
    mov     eax, [rip + ioapic_version]
    mov     [rdi + 56], eax
    mov     eax, [rip + lapic_id]
    mov     [rdi + 60], eax
    mov     eax, [rip + lapic_version]
    mov     [rdi + 64], eax
    mov     eax, [rip + route_cap0]
    mov     [rdi + 68], eax
    mov     eax, [rip + route_cap1]
    mov     [rdi + 72], eax
    mov     eax, [rip + pin1]
    shl     eax, 8
    or      eax, [rip + pin0]
    mov     [rdi + 76], eax
    mov     eax, [rip + period_ticks]
    mov     [rdi + 80], eax
    xor     eax, eax
    cmp     qword ptr [rip + samples_cap], 0
    je      1f
    mov     eax, SAMPLES_AT
1:
    mov     [rdi + 84], eax
    mov     rax, [rip + periodic]
    cmp     rax, [rip + samples_cap]
    cmova   rax, [rip + samples_cap]
    mov     [rdi + 88], eax
    mov     eax, [rip + first_index]
    mov     [rdi + 92], eax
    mov     eax, [rip + last_index]
    mov     [rdi + 96], eax
    mov     rsi, rdi
    mov     ecx, REPORT_WORDS
    mov     dx, REPORT_PORT
1:
    mov     eax, [rsi]
    out     dx, eax
    add     rsi, 4
    dec     ecx
    jnz     1b
    mov     dx, EXIT_PORT
    xor     eax, eax
    out     dx, eax
2:
    cli
    hlt
    jmp     2b

# Pin eax against route capability ecx and the I/O APIC: to fail (r8d
# set) if it is not usable.
check_pin:
    cmp     eax, 32
    jae     fail
    bt      ecx, eax
    jnc     fail
    cmp     eax, [rip + ioapic_pins]
    jae     fail
    ret

# Start the watchdog (clobbers nothing but flags).
watchdog_start:
    push    rax
    mov     byte ptr [rip + timed_out], 0
    mov     rax, [rip + watchdog_ticks]
    mov     [r15 + L_TIMER_INIT], eax
    pop     rax
    ret

# I/O APIC register ecx: read into eax / write eax (rbp: the I/O APIC).
ioapic_read:
    mov     [rbp], ecx
    mov     eax, [rbp + IO_WIN]
    ret

ioapic_write:
    mov     [rbp], ecx
    mov     [rbp + IO_WIN], eax
    ret

# Pin edx's redirection entry: low dword eax, destination the local APIC
# id (the xAPIC ID register keeps it in bits 24-31, as the entry's high
# dword does). High dword first, the low (which may unmask) last.
# Clobbers ecx.
rte_write:
    push    rax
    lea     ecx, [rdx * 2 + 0x11]
    mov     eax, [rip + lapic_id]
    and     eax, 0xff000000
    call    ioapic_write
    pop     rax
    dec     ecx
    jmp     ioapic_write

# An interrupt gate at rdi for the handler at rax (keeps rax, rcx, rdi).
gate:
    mov     rdx, rax
    and     edx, 0xffff
    mov     rsi, 0x8e0000080000         # present, DPL 0, interrupt gate; CS 0x8
    or      rdx, rsi
    mov     rsi, rax
    shr     rsi, 16
    and     esi, 0xffff
    shl     rsi, 48
    or      rdx, rsi
    mov     [rdi], rdx
    mov     rdx, rax
    shr     rdx, 32
    mov     [rdi + 8], rdx
    ret

# Timer 0, periodic: TSC (the midpoint of two reads around the counter's)
# and main counter at the first and the last; each one's period index and
# lateness (counter / P, counter % P: the header's Lateness), the lateness
# kept as a sample while fewer than C are; the N-th disables timer 0.
periodic_isr:
    push    rax
    push    rcx
    push    rdx
    push    rsi
    lfence
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     rcx, rax
    mov     edx, HPET
    mov     rsi, [rdx + H_COUNTER]
    lfence
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    sub     rax, rcx
    shr     rax, 1
    add     rax, rcx
    cmp     qword ptr [rip + periodic], 0
    jne     1f
    mov     [rip + first_tsc], rax
    mov     [rip + first_counter], rsi
1:
    mov     [rip + last_tsc], rax
    mov     [rip + last_counter], rsi
    # Lateness: the counter past the latest period boundary (see the header).
    mov     rax, rsi
    xor     edx, edx
    div     qword ptr [rip + period_ticks]
    cmp     qword ptr [rip + periodic], 0
    jne     3f
    mov     [rip + first_index], rax
3:
    mov     [rip + last_index], rax
    mov     rcx, [rip + periodic]
    cmp     rcx, [rip + samples_cap]
    jae     4f
    mov     eax, 0xffffffff
    cmp     rdx, rax
    cmova   rdx, rax
    mov     [rcx * 4 + SAMPLES_AT], edx
4:
    inc     qword ptr [rip + periodic]
    mov     rax, [rip + periodic]
    cmp     rax, [rip + target]
    jb      2f
    mov     edx, HPET
    mov     dword ptr [rdx + H_T0_CONF], 0
2:
    mov     edx, LAPIC
    mov     dword ptr [rdx + L_EOI], 0
    pop     rsi
    pop     rdx
    pop     rcx
    pop     rax
    iretq

# Timer 1, level: the first delivery only EOIs (the line stays asserted);
# later ones clear timer 1's status, then EOI.
level_isr:
    push    rax
    push    rdx
    mov     edx, HPET
    test    dword ptr [rdx + H_STATUS], 2
    jz      1f
    inc     qword ptr [rip + level_status]
1:
    inc     qword ptr [rip + level]
    cmp     qword ptr [rip + level], 1
    je      2f
    mov     dword ptr [rdx + H_STATUS], 2
2:
    mov     edx, LAPIC
    mov     dword ptr [rdx + L_EOI], 0
    pop     rdx
    pop     rax
    iretq

watchdog_isr:
    push    rdx
    inc     qword ptr [rip + watchdog]
    mov     byte ptr [rip + timed_out], 1
    mov     edx, LAPIC
    mov     dword ptr [rdx + L_EOI], 0
    pop     rdx
    iretq

stray_isr:
    push    rdx
    inc     qword ptr [rip + stray]
    mov     edx, LAPIC
    mov     dword ptr [rdx + L_EOI], 0
    pop     rdx
    iretq

# No EOI for the spurious vector.
spurious_isr:
    inc     qword ptr [rip + spurious]
    iretq

# An exception: report error 8 with what there is.
exception_isr:
    mov     r8d, 8
    jmp     fail

    .balign 8
target:         .quad 0
watchdog_ticks: .quad 0
period_us:      .quad 0
pins_arg:       .quad 0
period_ticks:   .quad 0
periodic:       .quad 0
level:          .quad 0
level_status:   .quad 0
watchdog:       .quad 0
stray:          .quad 0
spurious:       .quad 0
first_tsc:      .quad 0
last_tsc:       .quad 0
first_counter:  .quad 0
last_counter:   .quad 0
samples_cap:    .quad 0
level_ms:       .quad 0
level_ticks:    .quad 0
first_index:    .quad 0
last_index:     .quad 0
pin0:           .long 0
pin1:           .long 0
ioapic_pins:    .long 0
ioapic_version: .long 0
lapic_id:       .long 0
lapic_version:  .long 0
hpet_caps:      .long 0
hpet_period:    .long 0
hpet_timers:    .long 0
route_cap0:     .long 0
route_cap1:     .long 0
timed_out:      .byte 0
    .balign 8
idtr:
    .word 256 * 16 - 1
    .quad IDT_AT
