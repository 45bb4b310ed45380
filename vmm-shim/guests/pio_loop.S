# pio_loop: the exit benchmark's guest (64-bit, CPL0, paging on).
#
# In:  rdi = round trips, rsi = I/O port.
# Per round trip i: OUT i to the port (one exit), IN it back (another);
# everything read is summed into a checksum.
# Out: the checksum (low, high dword) on the report port 0x4f0, then exit
#      code 0 on the exit port 0x4f4.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start
_start:
    mov     rdx, rsi
    xor     r8, r8              # checksum
    xor     rcx, rcx            # i
    test    rdi, rdi
    jz      2f
1:
    mov     eax, ecx
    out     dx, eax
    in      eax, dx
    add     r8, rax
    inc     rcx
    cmp     rcx, rdi
    jb      1b
2:
    report_u64 r8
    guest_exit
