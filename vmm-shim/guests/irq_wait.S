# irq_wait: counts interrupts a device model raises (64-bit, CPL0, paging on).
#
# In:  rdi = interrupts to wait for, rsi = I/O port of an irqtest device,
#      rdx = mode: 0 edge, 1 level.
#
# Installs an IDT (every vector to a counting stub, vector 0x25 = IRQ 5 to
# the device's handler), programs the in-kernel 8259 PICs (master at vector
# 0x20, only IRQ 5 unmasked), then per interrupt: asks the device for one
# (edge: command 1 = pulse; level: command 2 = assert), and waits with
# `sti; hlt` until the handler has counted it. In level mode the handler
# lowers the line (command 3) before its EOI, as a driver acks its device.
#
# Out (report port 0x4f0, one dword each): interrupts counted by the
# handler, interrupts on any other vector, the device's own count of
# interrupts raised (register +4); then exit code 0 on port 0x4f4.

    .intel_syntax noprefix
    .include "common.inc"
    .code64
    .text
    .globl _start

    .equ VECTOR, 0x25
    .equ IRQ_MASK, 0xdf         # all masked but IRQ 5

_start:
    mov     [rip + target], rdi
    mov     [rip + port], rsi
    mov     [rip + mode], rdx

    install_idt device_isr, other_isr, VECTOR
    init_pics IRQ_MASK, 0xff

next:
    mov     rax, [rip + count]
    cmp     rax, [rip + target]
    jae     done
    mov     r12, rax                # count before asking
    mov     rdx, [rip + port]
    mov     eax, 1                  # pulse
    cmp     qword ptr [rip + mode], 0
    je      2f
    mov     eax, 2                  # assert the level
2:
    out     dx, eax
wait:
    sti
    hlt
    cli
    cmp     [rip + count], r12
    je      wait
    jmp     next

done:
    mov     dx, REPORT_PORT
    mov     eax, [rip + count]
    out     dx, eax
    mov     eax, [rip + others]
    out     dx, eax
    mov     rdx, [rip + port]
    add     rdx, 4
    in      eax, dx
    mov     dx, REPORT_PORT
    out     dx, eax
    guest_exit

device_isr:
    push    rax
    push    rdx
    inc     qword ptr [rip + count]
    cmp     qword ptr [rip + mode], 0
    je      1f
    mov     rdx, [rip + port]
    mov     eax, 3                  # lower the level
    out     dx, eax
1:
    mov     al, 0x20                # EOI
    out     0x20, al
    pop     rdx
    pop     rax
    iretq

    .balign 8
target: .quad 0
port:   .quad 0
mode:   .quad 0
count:  .quad 0

    idt_helpers
