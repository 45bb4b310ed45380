# kbd_reset: resets its VM the way a PC does (64-bit, CPL0, paging on):
# reports the i8042's self-test answer, then pulses the CPU reset line
# through the i8042 (command 0xFE) and halts until the reset takes it.
#
# Out (report port): the self-test answer (0x55 from a working i8042).

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start
_start:
    mov     al, 0xaa                # self-test
    out     0x64, al
1:
    in      al, 0x64                # wait for the answer (OBF)
    test    al, 0x01
    jz      1b
    in      al, 0x60
    movzx   eax, al
    mov     dx, REPORT_PORT
    out     dx, eax
    mov     al, 0xfe                # pulse the reset line
    out     0x64, al
2:
    hlt
    jmp     2b
