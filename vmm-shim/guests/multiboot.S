# multiboot: a Multiboot (v1) entry for the test guests, so the very same
# guest code runs under QEMU (`-kernel guest.mb.bin`) as under the shim.
#
# QEMU enters in 32-bit protected mode without paging. This stub builds
# what the shim gives its vCPUs (kvm.rs): the GDT, an identity map of the
# first 4 GiB with 2 MiB pages at 0x1000..0x6fff, PAE + long mode + paging,
# the stack at 0x80000, and the guest's arguments in rdi, rsi, rdx (from
# mb_args, assembled in with --defsym ARG0/ARG1/ARG2); then it jumps to the
# guest's _start. Linked first, at 1 MiB, so the header is at the start of
# the flat image (the a.out kludge: flag 16 gives the load addresses).

    .intel_syntax noprefix
    .text
    .code32
    .globl mb_start
    .balign 4
mb_header:
    .long 0x1badb002
    .long 0x00010000
    .long -(0x1badb002 + 0x00010000)
    .long mb_header             # header_addr
    .long mb_header             # load_addr: the image starts with this header
    .long 0                     # load_end_addr: the whole file
    .long 0                     # bss_end_addr: none
    .long mb_start              # entry_addr

mb_start:
    cli
    # Zero the page-table area, then PML4[0] -> PDPT, PDPT[0..4] -> PDs.
    mov     edi, 0x1000
    xor     eax, eax
    mov     ecx, 0x6000 / 4
    rep stosd
    mov     dword ptr [0x1000], 0x2003
    mov     edi, 0x2000
    mov     eax, 0x3003
    mov     ecx, 4
1:
    mov     [edi], eax
    add     eax, 0x1000
    add     edi, 8
    loop    1b
    # 2048 PD entries: 2 MiB pages, present, writable.
    mov     edi, 0x3000
    mov     eax, 0x83
    mov     ecx, 2048
2:
    mov     [edi], eax
    add     eax, 0x200000
    add     edi, 8
    loop    2b

    lgdt    [gdt_ptr]
    mov     eax, cr4
    or      eax, 1 << 5             # PAE
    mov     cr4, eax
    mov     eax, 0x1000
    mov     cr3, eax
    mov     ecx, 0xc0000080         # EFER
    rdmsr
    or      eax, 1 << 8             # LME
    wrmsr
    mov     eax, cr0
    or      eax, 0x80000001         # PG, PE
    mov     cr0, eax
    .att_syntax
    ljmp    $0x8, $long_entry
    .intel_syntax noprefix

    .code64
long_entry:
    mov     ax, 0x10
    mov     ds, ax
    mov     es, ax
    mov     ss, ax
    mov     fs, ax
    mov     gs, ax
    mov     rsp, 0x80000
    mov     rdi, [rip + mb_args]
    mov     rsi, [rip + mb_args + 8]
    mov     rdx, [rip + mb_args + 16]
    jmp     _start

    .balign 8
mb_args:
    .quad ARG0, ARG1, ARG2
gdt:
    .quad 0, 0x00af9b000000ffff, 0x00cf93000000ffff
gdt_ptr:
    .word 3 * 8 - 1
    .long gdt
