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

    # COM1: 115200 8N1, FIFO (trigger 1), DTR RTS OUT2, receive interrupts.
    mov     dx, COM1 + 3
    mov     al, 0x80
    out     dx, al
    mov     dx, COM1
    mov     al, 1
    out     dx, al
    mov     dx, COM1 + 1
    xor     eax, eax
    out     dx, al
    mov     dx, COM1 + 3
    mov     al, 0x03
    out     dx, al
    mov     dx, COM1 + 2
    mov     al, 0x07
    out     dx, al
    mov     dx, COM1 + 4
    mov     al, 0x0b
    out     dx, al
    mov     dx, COM1 + 1
    mov     al, 0x01
    out     dx, al

    lea     rsi, [rip + banner]
    call    puts

    # The RTC: wait while an update is in progress, then read.
1:
    mov     al, 0x0a
    out     0x70, al
    in      al, 0x71
    test    al, 0x80
    jnz     1b
    lea     rsi, [rip + time_msg]
    call    puts
    mov     bl, 0x32                # century
    call    rtc_bcd
    mov     bl, 0x09                # year
    call    rtc_bcd
    mov     al, '-'
    call    putc
    mov     bl, 0x08                # month
    call    rtc_bcd
    mov     al, '-'
    call    putc
    mov     bl, 0x07                # day
    call    rtc_bcd
    mov     al, ' '
    call    putc
    mov     bl, 0x04                # hours
    call    rtc_bcd
    mov     al, ':'
    call    putc
    mov     bl, 0x02                # minutes
    call    rtc_bcd
    mov     al, ':'
    call    putc
    mov     bl, 0x00                # seconds
    call    rtc_bcd
    lea     rsi, [rip + utc_msg]
    call    puts

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
    cmp     qword ptr [rip + echo_wait], 0
    je      4f
    lea     rsi, [rip + echo_msg]
    call    puts
    mov     r13, [rip + ticks]
    add     r13, [rip + echo_wait]  # give up at this tick
3:
    sti
    hlt
    cli
    cmp     qword ptr [rip + line_done], 0
    jne     4f
    cmp     [rip + ticks], r13
    jb      3b
    lea     rsi, [rip + no_input_msg]
    call    puts
4:
    mov     dx, TIMER               # stop the timer
    xor     eax, eax
    out     dx, eax
    mov     dx, REPORT_PORT
    mov     eax, [rip + ticks]
    out     dx, eax
    mov     eax, [rip + echoed]
    out     dx, eax
    lea     rsi, [rip + bye_msg]
    call    puts
    # Wait for the transmitter to drain, then pulse the reset line.
5:
    mov     dx, COM1 + 5
    in      al, dx
    test    al, 0x40
    jz      5b
    mov     al, 0xfe
    out     0x64, al
6:
    hlt
    jmp     6b

# Print the RTC register bl as two BCD digits.
rtc_bcd:
    mov     al, bl
    out     0x70, al
    in      al, 0x71
    mov     bl, al
    shr     al, 4
    add     al, '0'
    call    putc
    mov     al, bl
    and     al, 0x0f
    add     al, '0'
    jmp     putc

# Print the NUL-terminated string at rsi.
puts:
    mov     al, [rsi]
    test    al, al
    jz      7f
    call    putc
    inc     rsi
    jmp     puts
7:
    ret

# Send al when THR is empty. Keeps everything but rdx.
putc:
    push    rax
8:
    mov     dx, COM1 + 5
    in      al, dx
    test    al, 0x20
    jz      8b
    pop     rax
    mov     dx, COM1
    out     dx, al
    ret

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
9:
    mov     dx, COM1 + 5
    in      al, dx
    test    al, 0x01
    jz      10f
    mov     dx, COM1
    in      al, dx
    cmp     al, 0x0d                # a terminal's Enter
    jne     11f
    mov     al, 0x0a
11:
    inc     qword ptr [rip + echoed]
    call    putc
    cmp     al, 0x0a
    jne     9b
    mov     qword ptr [rip + line_done], 1
    jmp     9b
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
