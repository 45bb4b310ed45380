# uart_echo: echoes what is typed at the console (64-bit, CPL0, paging on).
#
# In:  rdi = the UART's base port (0x3f8), rsi = its IRQ's vector (0x24 for IRQ 4).
# Sets the UART up (115200 8N1, FIFO with a trigger of 1, receive
# interrupts, OUT2), writes "ready\n", then sleeps with `sti; hlt`; the
# interrupt handler reads every received byte and echoes it back. A
# newline ends the run.
# Out (report port): bytes received, stray interrupts; exit code 0.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start

    .equ VECTOR, 0x24
    .equ IRQ_MASK, 0xef             # all masked but IRQ 4

_start:
    mov     [rip + port], rdi
    install_idt uart_isr, other_isr, VECTOR
    init_pics IRQ_MASK, 0xff
    mov     r8, [rip + port]
    lea     rdx, [r8 + 3]           # LCR: DLAB
    mov     al, 0x80
    out     dx, al
    mov     rdx, r8                 # DLL = 1
    mov     al, 1
    out     dx, al
    lea     rdx, [r8 + 1]           # DLM = 0
    xor     eax, eax
    out     dx, al
    lea     rdx, [r8 + 3]           # 8N1
    mov     al, 0x03
    out     dx, al
    lea     rdx, [r8 + 2]           # FCR: FIFO on, clear, trigger 1
    mov     al, 0x07
    out     dx, al
    lea     rdx, [r8 + 4]           # MCR: DTR, RTS, OUT2
    mov     al, 0x0b
    out     dx, al
    lea     rdx, [r8 + 1]           # IER: received data
    mov     al, 0x01
    out     dx, al
    lea     rsi, [rip + ready]
1:
    mov     al, [rsi]
    test    al, al
    jz      2f
    call    putc
    inc     rsi
    jmp     1b
2:
    sti
    hlt
    cli
    cmp     qword ptr [rip + done], 0
    je      2b
    mov     dx, REPORT_PORT
    mov     eax, [rip + received]
    out     dx, eax
    mov     eax, [rip + others]
    out     dx, eax
    guest_exit

# al = byte; waits for THRE. Keeps everything but rdx.
putc:
    push    rax
3:
    mov     rdx, [rip + port]
    add     rdx, 5                  # LSR
    in      al, dx
    test    al, 0x20
    jz      3b
    pop     rax
    mov     rdx, [rip + port]
    out     dx, al
    ret

uart_isr:
    push    rax
    push    rdx
4:
    mov     rdx, [rip + port]
    add     rdx, 5                  # LSR: data ready?
    in      al, dx
    test    al, 0x01
    jz      5f
    mov     rdx, [rip + port]       # RBR
    in      al, dx
    inc     qword ptr [rip + received]
    cmp     al, 0x0a
    jne     6f
    mov     qword ptr [rip + done], 1
6:
    call    putc
    jmp     4b
5:
    mov     al, 0x20                # EOI
    out     0x20, al
    pop     rdx
    pop     rax
    iretq

    .balign 8
port:     .quad 0
received: .quad 0
done:     .quad 0
ready:    .asciz "ready\n"

    idt_helpers
