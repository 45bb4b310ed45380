# demo: the guest of `dmfabric demo` (64-bit, CPL0, paging on). Every
# device it touches is a PC's: COM1 at 0x3f8 (IRQ 4), the CMOS RTC at
# 0x70/0x71, an event timer at 0x700 (IRQ 5) and the i8042 at 0x60/0x64.
#
# In:  rdi = timer ticks to show, rsi = tick period in microseconds,
#      rdx = ticks to wait for a line typed at the console (0: don't wait).
# 1. Sets up COM1 (115200 8N1, FIFO, receive interrupts) and prints a banner.
# 2. Reads the date and time from the RTC (BCD, 24-hour, waiting out UIP)
#    and prints them.
# 3. Starts the event timer periodic and prints a line on each tick.
# 4. Prints "echo> ", echoes what is typed until a newline (or until the
#    wait runs out).
# 5. Prints a goodbye and resets the VM through the i8042 (command 0xFE).
# Reports (debug port): ticks seen, bytes echoed.

    .intel_syntax noprefix
    .include "common.inc"
    .include "demo.inc"
    .code64
    .text
    .globl _start

    .equ COM1, 0x3f8
    .equ TIMER, 0x700
    .equ UART_VECTOR, 0x24
    .equ TIMER_VECTOR, 0x25
    .equ IRQ_MASK, 0xcf             # IRQ 4 and 5 open

_start:
    mov     [rip + ticks_wanted], rdi
    mov     [rip + period_us], rsi
    mov     [rip + echo_wait], rdx
    install_idt uart_isr, other_isr, UART_VECTOR
    lea     rax, [rip + timer_isr]
    mov     rdi, 0x9000 + TIMER_VECTOR * 16
    call    write_gate
    init_pics IRQ_MASK, 0xff

    demo_com1_init

    lea     rsi, [rip + banner]
    call    puts

    demo_print_rtc

    # The event timer: periodic, edge; a line per tick.
    mov     dx, TIMER + 4
    mov     eax, [rip + period_us]
    out     dx, eax
    mov     dx, TIMER
    mov     eax, 3
    out     dx, eax
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
    mov     al, 0x0a
    call    putc
    cmp     r12, [rip + ticks_wanted]
    jb      2b

    # Echo a line typed at the server's console, while the timer runs on.
    demo_echo_wait
4:
    mov     dx, TIMER               # stop the timer
    xor     eax, eax
    out     dx, eax
    demo_report_and_reset

    demo_routines

timer_isr:
    push    rax
    inc     qword ptr [rip + ticks]
    mov     al, 0x20
    out     0x20, al
    pop     rax
    iretq

uart_isr:
    push    rax
    push    rdx
    demo_uart_rx
10:
    mov     al, 0x20
    out     0x20, al
    pop     rdx
    pop     rax
    iretq

    .balign 8
ticks_wanted: .quad 0
period_us:    .quad 0
echo_wait:    .quad 0
ticks:        .quad 0
echoed:       .quad 0
line_done:    .quad 0
banner:       .asciz "dmfabric demo guest: my UART, clock, timer and keyboard controller are dmfabric device models\n"
time_msg:     .asciz "time from the RTC: "
utc_msg:      .asciz " UTC\n"
tick_msg:     .asciz "event timer tick "
echo_msg:     .asciz "echo> "
no_input_msg: .asciz "(nothing typed)\n"
bye_msg:      .asciz "resetting through the i8042\n"

    idt_helpers
