# timer_count: counts event-timer interrupts (64-bit, CPL0, paging on).
#
# In:  rdi = period in microseconds, rsi = the timer's base port,
#      rdx = interrupts to count.
# Installs an IDT (IRQ 5 = vector 0x25 to the counting handler), programs
# the PICs, starts the timer periodic with edge interrupts, and sleeps with
# `sti; hlt` until the handler has counted enough; then stops the timer.
# The handler notes the timer's NOW_US at the first and the last interrupt.
# Out (report port): interrupts counted, stray interrupts, NOW_US at the
# first and at the last, the timer's COUNT; exit code 0.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start

    .equ VECTOR, 0x25
    .equ IRQ_MASK, 0xdf             # all masked but IRQ 5

_start:
    mov     [rip + port], rsi
    mov     [rip + target], rdx
    mov     r12, rdi
    install_idt timer_isr, other_isr, VECTOR
    init_pics IRQ_MASK, 0xff
    mov     rdx, [rip + port]
    add     rdx, 4                  # PERIOD_US
    mov     eax, r12d
    out     dx, eax
    mov     rdx, [rip + port]       # CTRL: enable, periodic, edge
    mov     eax, 3
    out     dx, eax
1:
    sti
    hlt
    cli
    mov     rax, [rip + count]
    cmp     rax, [rip + target]
    jb      1b
    mov     rdx, [rip + port]       # stop
    xor     eax, eax
    out     dx, eax
    mov     dx, REPORT_PORT
    mov     eax, [rip + count]
    out     dx, eax
    mov     eax, [rip + others]
    out     dx, eax
    mov     eax, [rip + first_us]
    out     dx, eax
    mov     eax, [rip + last_us]
    out     dx, eax
    mov     rdx, [rip + port]
    add     rdx, 0x0c               # COUNT
    in      eax, dx
    mov     dx, REPORT_PORT
    out     dx, eax
    guest_exit

timer_isr:
    push    rax
    push    rdx
    mov     rdx, [rip + port]
    add     rdx, 0x10               # NOW_US
    in      eax, dx
    mov     [rip + last_us], eax
    cmp     qword ptr [rip + count], 0
    jne     2f
    mov     [rip + first_us], eax
2:
    inc     qword ptr [rip + count]
    mov     al, 0x20                # EOI
    out     0x20, al
    pop     rdx
    pop     rax
    iretq

    .balign 8
port:     .quad 0
target:   .quad 0
count:    .quad 0
first_us: .long 0
last_us:  .long 0

    idt_helpers
