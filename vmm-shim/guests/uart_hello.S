# uart_hello: writes a line to a 16550 UART (64-bit, CPL0, paging on).
#
# In:  rdi = the UART's base port (0x3f8 for COM1).
# Sets 8N1 at 115200 baud, then sends "hello from a dmfabric guest\n" byte
# by byte, each when LSR says the transmitter holding register is empty.
# Out: the number of bytes sent on the report port; exit code 0.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start
_start:
    mov     r8, rdi                 # UART base
    lea     rdx, [r8 + 3]           # LCR: DLAB
    mov     al, 0x80
    out     dx, al
    mov     rdx, r8                 # DLL = 1: 115200 baud
    mov     al, 1
    out     dx, al
    lea     rdx, [r8 + 1]           # DLM = 0
    xor     eax, eax
    out     dx, al
    lea     rdx, [r8 + 3]           # LCR: 8N1
    mov     al, 0x03
    out     dx, al
    lea     rsi, [rip + message]
    xor     ecx, ecx
1:
    mov     al, [rsi + rcx]
    test    al, al
    jz      3f
    mov     r9b, al
2:
    lea     rdx, [r8 + 5]           # LSR
    in      al, dx
    test    al, 0x20                # THRE
    jz      2b
    mov     rdx, r8                 # THR
    mov     al, r9b
    out     dx, al
    inc     ecx
    jmp     1b
3:
    mov     dx, REPORT_PORT
    mov     eax, ecx
    out     dx, eax
    guest_exit

message:
    .asciz "hello from a dmfabric guest\n"
