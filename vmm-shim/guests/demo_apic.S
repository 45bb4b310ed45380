# demo_apic: the guest of `dmfabric demo` with its interrupts through the
# local APIC and the I/O APIC (KVM's split irqchip: the I/O APIC is a
# device model), its ticks from the HPET; no 8259, no PIT, no event timer.
# 64-bit, CPL0, paging on, with the I/O APIC (0xfec00000), the HPET
# (0xfed00000) and the local APIC (0xfee00000) mapped, as the shim maps
# them. Its other devices are a PC's: COM1 at 0x3f8 (IRQ 4, I/O APIC pin
# 4), the CMOS RTC at 0x70/0x71 and the i8042 at 0x60/0x64.
#
# In:  rdi = HPET ticks to show, rsi = tick period in microseconds,
#      rdx = ticks to wait for a line typed at the console (0: don't wait).
# 1. Masks both 8259s; enables the local APIC (spurious vector 0xff, TPR
#    0, LINT0 masked); I/O APIC pin 4 (COM1) to vector 0x24 and pin 16
#    (HPET timer 0) to vector 0x30, both edge, fixed, physical, to this
#    CPU's APIC id. Sets up COM1 (115200 8N1, FIFO, receive interrupts)
#    and prints a banner.
# 2. Reads the date and time from the RTC and prints them, as demo.S.
# 3. Starts HPET timer 0 periodic (edge, routed to pin 16; its route
#    capability allows 2, 8 and 16-23 on dmfabric's model) and prints a
#    line on each tick.
# 4. Prints "echo> ", echoes what is typed until a newline (or until the
#    wait runs out).
# 5. Stops the HPET, prints a goodbye and resets the VM through the i8042.
# The handlers only count (or echo) and write the local APIC's EOI: each
# is a handful of instructions (CPL0 is emulated on some hosts).
# Reports (debug port): ticks seen, bytes echoed.

    .intel_syntax noprefix
    .include "common.inc"
    .include "demo.inc"
    .code64
    .text
    .globl _start

    .equ COM1, 0x3f8
    .equ UART_VECTOR, 0x24
    .equ TIMER_VECTOR, 0x30
    .equ SPURIOUS_VECTOR, 0xff
    .equ UART_PIN, 4
    .equ TIMER_PIN, 16

    .equ LAPIC, 0xfee00000
    .equ L_ID, 0x020
    .equ L_TPR, 0x080
    .equ L_EOI, 0x0b0
    .equ L_SVR, 0x0f0
    .equ L_LVT_LINT0, 0x350

    .equ IOAPIC, 0xfec00000
    .equ IO_WIN, 0x10

    .equ HPET, 0xfed00000
    .equ H_CONF, 0x010
    .equ H_STATUS, 0x020
    .equ H_COUNTER, 0x0f0
    .equ H_T0_CONF, 0x100
    .equ H_T0_CMP, 0x108
    .equ TN_INT_ENB, 1 << 2
    .equ TN_PERIODIC, 1 << 3
    .equ TN_SETVAL, 1 << 6
    .equ TN_ROUTE_SHIFT, 9

_start:
    cli
    mov     [rip + ticks_wanted], rdi
    mov     [rip + period_us], rsi
    mov     [rip + echo_wait], rdx
    # The 8259s: masked, and never touched again.
    mov     al, 0xff
    out     0xa1, al
    out     0x21, al
    install_idt uart_isr, stray_isr, UART_VECTOR
    lea     rax, [rip + timer_isr]
    mov     rdi, 0x9000 + TIMER_VECTOR * 16
    call    write_gate
    lea     rax, [rip + spurious_isr]
    mov     rdi, 0x9000 + SPURIOUS_VECTOR * 16
    call    write_gate

    # The local APIC.
    mov     r15d, LAPIC
    mov     eax, [r15 + L_ID]
    and     eax, 0xff000000
    mov     [rip + lapic_id], eax
    mov     dword ptr [r15 + L_TPR], 0
    mov     dword ptr [r15 + L_SVR], 0x100 | SPURIOUS_VECTOR
    mov     dword ptr [r15 + L_LVT_LINT0], 1 << 16

    # The I/O APIC: COM1's pin and the HPET's, edge, to this CPU.
    mov     edx, UART_PIN
    mov     eax, UART_VECTOR
    call    rte_write
    mov     edx, TIMER_PIN
    mov     eax, TIMER_VECTOR
    call    rte_write

    demo_com1_init

    lea     rsi, [rip + banner]
    call    puts

    demo_print_rtc

    # The HPET: halted, counter 0; the period in main-counter ticks
    # (µs * 10^9 / fs, at least 1).
    mov     ebx, HPET
    mov     ecx, [rbx + 4]          # the counter's period in fs
    test    ecx, ecx
    jnz     1f
    lea     rsi, [rip + no_hpet_msg]
    call    puts
    jmp     4f
1:
    mov     dword ptr [rbx + H_CONF], 0
    mov     dword ptr [rbx + H_T0_CONF], 0
    mov     dword ptr [rbx + H_STATUS], 1
    xor     eax, eax
    mov     [rbx + H_COUNTER], rax
    mov     rax, [rip + period_us]
    imul    rax, rax, 1000000000
    xor     edx, edx
    div     rcx
    test    rax, rax
    jnz     1f
    inc     eax
1:
    mov     r14, rax
    # Timer 0: the comparator one-shot first, then periodic with
    # Tn_VAL_SET_CNF (comparator and period), routed to its pin; go.
    mov     [rbx + H_T0_CMP], r14
    mov     eax, TIMER_PIN << TN_ROUTE_SHIFT | TN_INT_ENB | TN_PERIODIC | TN_SETVAL
    mov     [rbx + H_T0_CONF], eax
    mov     [rbx + H_T0_CMP], r14
    mov     dword ptr [rbx + H_CONF], 1 # ENABLE_CNF
    xor     r12, r12                # ticks printed
2:
    sti
    hlt
    cli
    mov     rax, [rip + ticks]
    cmp     r12, rax
    jae     2b
    inc     r12
    lea     rsi, [rip + tick_msg]
    call    puts
    mov     al, r12b
    add     al, '0'
    call    putc
    lea     rsi, [rip + tick_tail]
    call    puts
    cmp     r12, [rip + ticks_wanted]
    jb      2b

    # Echo a line typed at the server's console, while the HPET runs on.
    demo_echo_wait
4:
    mov     ebx, HPET               # stop the HPET
    mov     dword ptr [rbx + H_CONF], 0
    mov     dword ptr [rbx + H_T0_CONF], 0
    demo_report_and_reset

# Pin edx's redirection entry: low dword eax, destination this CPU's local
# APIC id. The high dword first, the low (which unmasks) last. Clobbers ecx.
rte_write:
    push    rax
    lea     ecx, [rdx * 2 + 0x11]
    mov     eax, [rip + lapic_id]
    mov     r8d, IOAPIC
    mov     [r8], ecx
    mov     [r8 + IO_WIN], eax
    pop     rax
    dec     ecx
    mov     [r8], ecx
    mov     [r8 + IO_WIN], eax
    ret

    demo_routines

# HPET timer 0 (edge): count, EOI.
timer_isr:
    push    rax
    inc     qword ptr [rip + ticks]
    mov     eax, LAPIC
    mov     dword ptr [rax + L_EOI], 0
    pop     rax
    iretq

uart_isr:
    push    rax
    push    rdx
    demo_uart_rx
10:
    mov     eax, LAPIC
    mov     dword ptr [rax + L_EOI], 0
    pop     rdx
    pop     rax
    iretq

stray_isr:
    push    rax
    inc     qword ptr [rip + others]
    mov     eax, LAPIC
    mov     dword ptr [rax + L_EOI], 0
    pop     rax
    iretq

# No EOI for the spurious vector.
spurious_isr:
    iretq

    .balign 8
ticks_wanted: .quad 0
period_us:    .quad 0
echo_wait:    .quad 0
ticks:        .quad 0
echoed:       .quad 0
line_done:    .quad 0
lapic_id:     .long 0
banner:       .asciz "dmfabric demo guest: my UART, clock, HPET, I/O APIC and keyboard controller are dmfabric device models\n"
time_msg:     .asciz "time from the RTC: "
utc_msg:      .asciz " UTC\n"
no_hpet_msg:  .asciz "no HPET\n"
tick_msg:     .asciz "HPET tick "
tick_tail:    .asciz " (through the remote I/O APIC)\n"
echo_msg:     .asciz "echo> "
no_input_msg: .asciz "(nothing typed)\n"
bye_msg:      .asciz "resetting through the i8042\n"

    idt_helpers
