# io_loop: a 64-bit test guest (entered in long mode, CPL0, paging on).
#
# In:  rdi = iterations, rsi = I/O port of the test device, rdx = MMIO
#      address of the test device.
# Per iteration i: OUT i to the port, IN it back, MMIO-write i*3 (8 bytes),
# MMIO-read it back; everything read is summed into a checksum.
# Out: the checksum, low then high 32 bits, through OUT to the report port
#      0x4f0, then exit code 0 on the exit port 0x4f4.
#
# Kept short: on a nested hypervisor that emulates guest kernel mode every
# instruction here costs hundreds of nanoseconds.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start
_start:
    mov     r9, rdx             # MMIO address
    mov     r10, rsi            # port
    xor     r8, r8              # checksum
    xor     rcx, rcx            # i
    test    rdi, rdi
    jz      2f
1:
    mov     rdx, r10
    mov     eax, ecx
    out     dx, eax
    in      eax, dx
    add     r8, rax
    lea     rax, [rcx + rcx * 2]
    mov     [r9], rax
    mov     rax, [r9]
    add     r8, rax
    inc     rcx
    cmp     rcx, rdi
    jb      1b
2:
    report_u64 r8
    guest_exit
