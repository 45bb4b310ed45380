# scratch_loop: times port round trips to a 16550's scratch register with
# the guest's own TSC (64-bit, CPL0, paging on), so the same code can be
# timed the same way under the shim and under QEMU.
#
# In:  rdi = round trips, rsi = port (0x3ff: COM1's SCR), rdx = where to
#      store the samples (two u32 TSC deltas per round trip: the OUT, then
#      the IN).
# Out: report port: the round trips done and the sum of what was read
#      (low byte of each IN); then the exit port. Under QEMU, with nothing
#      at the exit port, it halts with interrupts off so that its memory can
#      be read.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start
_start:
    mov     r8, rdi                 # round trips
    mov     r9, rsi                 # port
    mov     r10, rdx                # samples
    xor     r11, r11                # i
    xor     r12, r12                # checksum
    test    r8, r8
    jz      2f
1:
    lfence
    rdtsc
    mov     r13d, eax
    mov     dx, r9w
    mov     al, r11b
    out     dx, al
    lfence
    rdtsc
    mov     r14d, eax
    sub     eax, r13d
    mov     [r10 + r11 * 8], eax
    mov     dx, r9w
    in      al, dx
    movzx   ecx, al
    add     r12, rcx
    lfence
    rdtsc
    sub     eax, r14d
    mov     [r10 + r11 * 8 + 4], eax
    inc     r11
    cmp     r11, r8
    jb      1b
2:
    mov     dx, REPORT_PORT
    mov     eax, r11d
    out     dx, eax
    mov     eax, r12d
    out     dx, eax
    mov     dx, EXIT_PORT
    xor     eax, eax
    out     dx, eax
    cli
3:
    hlt
    jmp     3b
