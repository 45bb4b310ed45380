# virtio_blk: a small virtio-mmio (version 2, virtio 1.x) block driver,
# 64-bit long mode, CPL0, interrupts off: it polls the used ring.
#
# In:  rdi = MMIO base of the transport; 0: scan QEMU microvm's slots
#            0xfeb00000 + 0x200 n (n < 32; QEMU fills the last first) for a
#            block device (under QEMU the transport must be modern:
#            -global virtio-mmio.force-legacy=false).
#      rsi = mode | qd << 8 | bs << 16 | count << 32:
#            mode  0 check, 1 randread, 2 randwrite, 3 seqread; | 0x80:
#                  do the I/O in user mode (CPL3, IOPL 3: see below);
#            qd    requests in flight (0: 1; at most queue size / 3);
#            bs    sectors (512 bytes) per request (0: 1; at most 256);
#            count requests (per phase in mode 0).
#      rdx = seed | area << 32: seed of the LCG (32 bits); area the
#            guest-physical address of the driver's memory (0: 2 MiB),
#            identity-mapped and RAM for 64 KiB + 4 count (rounded up to
#            4 KiB) + qd bs 512 bytes:
#              area + 0x0000 descriptor table   (3 descriptors per slot)
#              area + 0x0800 available ring
#              area + 0x1000 used ring
#              area + 0x2000 request headers    (16 bytes per slot)
#              area + 0x2800 status bytes       (1 per slot)
#              area + 0x3000 slot bookkeeping   (sector, submit TSC)
#              area + 0x10000 latency samples   (u32 TSC cycles per request,
#                             in completion order, saturated)
#              then the data buffers            (bs 512 bytes per slot)
#
# Set-up: magic, version 2, device id 2; reset; ACKNOWLEDGE | DRIVER;
# features VERSION_1 (required) and SEG_MAX, RO, BLK_SIZE, FLUSH where
# offered; FEATURES_OK, read back; queue 0 of size Q = the largest power
# of two <= min(QueueNumMax, 128); DRIVER_OK; capacity from config 0x100.
#
# Mode 0 (check): count OUT requests of bs sectors at sectors s_i, each
# sector s filled with the pattern word j = ((s ^ seed << 32) * K) + j
# (K = 0x9e3779b97f4a7c15, j < 64), qd in flight; a FLUSH if offered;
# then count IN requests of the same sectors, every word compared with
# the pattern and summed into the checksum: sum of rol(word_j, j).
# s_i: x_0 = seed, x_{i+1} = x_i * 6364136223846793005 + 1442695040888963407,
# s_i = (x_{i+1} >> 33) mod (capacity - bs + 1) (guests.rs has the same).
# Modes 1-3 (benchmark): count requests, qd in flight; random sectors are
# ((x >> 33) mod (capacity / bs)) bs, sequential ones wrap at capacity;
# the report carries the TSC cycles from the first submission to the last
# completion.
#
# Out: report port, dwords: [0] 0, or an error code (then it exits with
# that code and reports nothing more): 1 no block device, 2 not a
# version-2 transport, 3 VERSION_1 missing or FEATURES_OK refused,
# 4 queue 0 unusable (in use, or smaller than 4), 5 capacity < bs,
# 6 a used-ring entry names no request, 7 bad mode;
# [1] requests completed (mode 0: both phases and the flush);
# [2,3] mode 0: the checksum, else TSC cycles; [4] mismatched words;
# [5] requests whose status was not OK; [6,7] capacity in sectors;
# [8,9] features accepted (low, high dword); [10] queue size;
# [11] requests in flight; [12] address of the samples.
# Then it resets the device, exits through the exit port with code 0 and
# (under QEMU) halts with interrupts off so its memory can be read.
#
# Guest kernel mode is emulated instruction by instruction on this host
# (MACHINE-FACTS.md, ~0.5 us each: ~100 us a request), user mode runs
# natively: with 0x80 in the mode, after the set-up the driver sets the
# user bit in every page-table entry of the identity map, loads a GDT of
# its own with user segments and drops to CPL3 with IOPL 3 (port I/O
# allowed) and interrupts off. It never comes back (an exception there
# would triple-fault: none is expected), and the final halt is a pause
# loop. Under the shim, its exit port ends the vCPU before that.

    .intel_syntax noprefix
    .include "common.inc"
    .code64

    .equ VIRTIO_MAGIC, 0x74726976
    .equ R_MAGIC, 0x000
    .equ R_VERSION, 0x004
    .equ R_DEVICE_ID, 0x008
    .equ R_DEV_FEAT, 0x010
    .equ R_DEV_FEAT_SEL, 0x014
    .equ R_DRV_FEAT, 0x020
    .equ R_DRV_FEAT_SEL, 0x024
    .equ R_QUEUE_SEL, 0x030
    .equ R_QUEUE_NUM_MAX, 0x034
    .equ R_QUEUE_NUM, 0x038
    .equ R_QUEUE_READY, 0x044
    .equ R_QUEUE_NOTIFY, 0x050
    .equ R_STATUS, 0x070
    .equ R_QUEUE_DESC, 0x080
    .equ R_QUEUE_DRIVER, 0x090
    .equ R_QUEUE_DEVICE, 0x0a0
    .equ R_CONFIG_GEN, 0x0fc
    .equ R_CAPACITY, 0x100

    .equ ST_ACKNOWLEDGE, 1
    .equ ST_DRIVER, 2
    .equ ST_DRIVER_OK, 4
    .equ ST_FEATURES_OK, 8
    .equ ST_FAILED, 0x80

    # Feature bits of the low dword the driver takes when offered.
    .equ F_SEG_MAX, 1 << 2
    .equ F_RO, 1 << 5
    .equ F_BLK_SIZE, 1 << 6
    .equ F_FLUSH, 1 << 9
    .equ ACCEPT_LO, F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH

    .equ T_IN, 0
    .equ T_OUT, 1
    .equ T_FLUSH, 4

    .equ D_NEXT, 1
    .equ D_WRITE, 2

    .equ MAX_QUEUE, 128
    .equ MAX_BS, 256
    .equ SCAN_BASE, 0xfeb00000
    .equ SCAN_SLOTS, 32
    .equ SCAN_STRIDE, 0x200

    .equ A_DESC, 0x0000
    .equ A_AVAIL, 0x0800
    .equ A_USED, 0x1000
    .equ A_HDR, 0x2000
    .equ A_STATUS, 0x2800
    .equ A_META, 0x3000
    .equ A_ZERO_END, 0x4000
    .equ A_SAMPLES, 0x10000
    .equ AREA_DEFAULT, 0x200000

# Report the dword variable \var.
.macro report_var var
    mov     eax, [rip + \var]
    mov     dx, REPORT_PORT
    out     dx, eax
.endm

# Call the routine whose address is in variable \var with r12 = slot.
.macro call_var var
    call    qword ptr [rip + \var]
.endm

    .text
    .globl _start
_start:
    # rbx holds the transport's base from here on; no routine changes it.
    mov     [rip + v_mmio], rdi
    movzx   eax, sil
    mov     ecx, eax
    and     ecx, 0x80
    mov     [rip + v_user], rcx
    and     eax, 0x7f
    mov     [rip + v_mode], rax
    mov     rax, rsi
    shr     rax, 8
    movzx   eax, al
    test    eax, eax
    jnz     1f
    inc     eax
1:
    mov     [rip + v_qd], rax
    mov     rax, rsi
    shr     rax, 16
    movzx   eax, ax
    test    eax, eax
    jnz     1f
    inc     eax
1:
    cmp     eax, MAX_BS
    jbe     1f
    mov     eax, MAX_BS
1:
    mov     [rip + v_bs], rax
    shl     rax, 9
    mov     [rip + v_bytes], rax
    mov     rax, rsi
    shr     rax, 32
    mov     [rip + v_count], rax
    mov     eax, edx
    mov     [rip + v_seed], rax
    shl     rax, 32
    mov     [rip + v_seedhi], rax
    mov     rax, rdx
    shr     rax, 32
    jnz     1f
    mov     eax, AREA_DEFAULT
1:
    mov     [rip + v_area], rax
    lea     rcx, [rax + A_DESC]
    mov     [rip + v_desc], rcx
    lea     rcx, [rax + A_AVAIL]
    mov     [rip + v_avail], rcx
    lea     rcx, [rax + A_USED]
    mov     [rip + v_used], rcx
    lea     rcx, [rax + A_HDR]
    mov     [rip + v_hdr], rcx
    lea     rcx, [rax + A_STATUS]
    mov     [rip + v_stat], rcx
    lea     rcx, [rax + A_META]
    mov     [rip + v_meta], rcx
    lea     rcx, [rax + A_SAMPLES]
    mov     [rip + v_samples], rcx
    # Buffers after the samples (4 count bytes, rounded up to 4 KiB).
    mov     rdx, [rip + v_count]
    lea     rdx, [rdx * 4 + 0xfff]
    and     rdx, -0x1000
    add     rcx, rdx
    mov     [rip + v_bufs], rcx

    mov     eax, 7
    cmp     qword ptr [rip + v_mode], 3
    ja      fail_nodev

    # Find the transport.
    mov     rbx, [rip + v_mmio]
    test    rbx, rbx
    jz      scan
    mov     eax, [rbx + R_MAGIC]
    cmp     eax, VIRTIO_MAGIC
    jne     no_device
    mov     eax, [rbx + R_DEVICE_ID]
    cmp     eax, 2
    jne     no_device
    jmp     found
scan:
    mov     rbx, SCAN_BASE
    mov     ecx, SCAN_SLOTS
1:
    mov     eax, [rbx + R_MAGIC]
    cmp     eax, VIRTIO_MAGIC
    jne     2f
    mov     eax, [rbx + R_DEVICE_ID]
    cmp     eax, 2
    je      found
2:
    add     rbx, SCAN_STRIDE
    dec     ecx
    jnz     1b
no_device:
    mov     eax, 1
    jmp     fail_nodev
found:
    mov     [rip + v_mmio], rbx
    mov     eax, [rbx + R_VERSION]
    cmp     eax, 2
    mov     eax, 2
    jne     fail_nodev

    # Reset (and wait until it reads back 0), ACKNOWLEDGE, DRIVER.
    xor     eax, eax
    mov     [rbx + R_STATUS], eax
1:
    mov     eax, [rbx + R_STATUS]
    test    eax, eax
    jz      1f
    pause
    jmp     1b
1:
    mov     eax, ST_ACKNOWLEDGE
    mov     [rbx + R_STATUS], eax
    mov     eax, ST_ACKNOWLEDGE | ST_DRIVER
    mov     [rbx + R_STATUS], eax

    # Features: VERSION_1 (bit 32) is required.
    xor     eax, eax
    mov     [rbx + R_DEV_FEAT_SEL], eax
    mov     r8d, [rbx + R_DEV_FEAT]
    mov     eax, 1
    mov     [rbx + R_DEV_FEAT_SEL], eax
    mov     r9d, [rbx + R_DEV_FEAT]
    mov     eax, 3
    test    r9d, 1
    jz      fail
    and     r8d, ACCEPT_LO
    mov     r9d, 1
    mov     [rip + v_feat_lo], r8
    mov     [rip + v_feat_hi], r9
    xor     eax, eax
    mov     [rbx + R_DRV_FEAT_SEL], eax
    mov     [rbx + R_DRV_FEAT], r8d
    mov     eax, 1
    mov     [rbx + R_DRV_FEAT_SEL], eax
    mov     [rbx + R_DRV_FEAT], r9d
    mov     eax, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK
    mov     [rbx + R_STATUS], eax
    mov     eax, [rbx + R_STATUS]
    test    eax, ST_FEATURES_OK
    mov     eax, 3
    jz      fail

    # Queue 0: not in use, at least 4 entries (one request's 3 descriptors).
    xor     eax, eax
    mov     [rbx + R_QUEUE_SEL], eax
    mov     eax, [rbx + R_QUEUE_READY]
    test    eax, eax
    mov     eax, 4
    jnz     fail
    mov     eax, [rbx + R_QUEUE_NUM_MAX]
    cmp     eax, MAX_QUEUE
    jbe     1f
    mov     eax, MAX_QUEUE
1:
    mov     ecx, eax
    mov     eax, 4
    cmp     ecx, 4
    jb      fail
    bsr     ecx, ecx
    mov     eax, 1
    shl     eax, cl
    mov     [rip + v_qsize], rax
    lea     ecx, [rax - 1]
    mov     [rip + v_qmask], rcx
    mov     [rbx + R_QUEUE_NUM], eax
    # Slots in flight: min(qd, Q / 3).
    xor     edx, edx
    mov     ecx, 3
    div     ecx
    cmp     rax, [rip + v_qd]
    jbe     1f
    mov     rax, [rip + v_qd]
1:
    mov     [rip + v_nslots], rax

    # Rings, headers, status bytes and bookkeeping start zeroed.
    mov     rdi, [rip + v_area]
    xor     eax, eax
    mov     ecx, A_ZERO_END / 8
    cld
    rep stosq

    mov     rax, [rip + v_desc]
    mov     [rbx + R_QUEUE_DESC], eax
    shr     rax, 32
    mov     [rbx + R_QUEUE_DESC + 4], eax
    mov     rax, [rip + v_avail]
    mov     [rbx + R_QUEUE_DRIVER], eax
    shr     rax, 32
    mov     [rbx + R_QUEUE_DRIVER + 4], eax
    mov     rax, [rip + v_used]
    mov     [rbx + R_QUEUE_DEVICE], eax
    shr     rax, 32
    mov     [rbx + R_QUEUE_DEVICE + 4], eax
    mov     eax, 1
    mov     [rbx + R_QUEUE_READY], eax
    mov     eax, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK
    mov     [rbx + R_STATUS], eax

    # Capacity, read until the config generation holds still.
1:
    mov     r8d, [rbx + R_CONFIG_GEN]
    mov     eax, [rbx + R_CAPACITY]
    mov     ecx, [rbx + R_CAPACITY + 4]
    mov     r9d, [rbx + R_CONFIG_GEN]
    cmp     r8d, r9d
    jne     1b
    shl     rcx, 32
    or      rax, rcx
    mov     [rip + v_capacity], rax
    mov     rcx, [rip + v_bs]
    cmp     rax, rcx
    mov     eax, 5
    jb      fail
    # Spans: mode 0 starts anywhere a request fits, random reads and
    # writes at multiples of bs.
    mov     rax, [rip + v_capacity]
    sub     rax, rcx
    inc     rax
    mov     [rip + v_span], rax
    mov     rax, [rip + v_capacity]
    xor     edx, edx
    div     rcx
    mov     [rip + v_blocks], rax

    call    setup_descriptors
    cmp     qword ptr [rip + v_user], 0
    je      1f
    call    enter_user
1:

    mov     rax, [rip + v_mode]
    test    rax, rax
    jz      mode_check
    cmp     rax, 3
    je      mode_seq
    # Random reads (1) or writes (2).
    cmp     rax, 1
    mov     eax, T_IN
    mov     ecx, T_OUT
    cmovne  eax, ecx
    mov     [rip + v_type], rax
    lea     rax, [rip + prep_random]
    mov     [rip + v_prep], rax
    jmp     bench
mode_seq:
    mov     qword ptr [rip + v_type], T_IN
    lea     rax, [rip + prep_seq]
    mov     [rip + v_prep], rax
bench:
    lea     rax, [rip + nothing]
    mov     [rip + v_done], rax
    mov     rax, [rip + v_count]
    mov     [rip + v_total], rax
    mov     rax, [rip + v_seed]
    mov     [rip + v_x], rax
    lfence
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     [rip + v_t0], rax
    call    engine
    lfence
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    sub     rax, [rip + v_t0]
    mov     [rip + v_sum], rax
    jmp     finish

mode_check:
    # Write the pattern.
    mov     qword ptr [rip + v_type], T_OUT
    lea     rax, [rip + prep_fill]
    mov     [rip + v_prep], rax
    lea     rax, [rip + nothing]
    mov     [rip + v_done], rax
    mov     rax, [rip + v_count]
    mov     [rip + v_total], rax
    mov     rax, [rip + v_seed]
    mov     [rip + v_x], rax
    call    engine
    # Flush, if the device has a cache to flush.
    test    qword ptr [rip + v_feat_lo], F_FLUSH
    jz      1f
    mov     qword ptr [rip + v_type], T_FLUSH
    lea     rax, [rip + prep_zero]
    mov     [rip + v_prep], rax
    mov     qword ptr [rip + v_total], 1
    call    engine
1:
    # Read it back and compare.
    mov     qword ptr [rip + v_type], T_IN
    lea     rax, [rip + prep_sector]
    mov     [rip + v_prep], rax
    lea     rax, [rip + check_slot]
    mov     [rip + v_done], rax
    mov     rax, [rip + v_count]
    mov     [rip + v_total], rax
    mov     rax, [rip + v_seed]
    mov     [rip + v_x], rax
    call    engine

finish:
    mov     dx, REPORT_PORT
    xor     eax, eax
    out     dx, eax
    report_var v_completed
    mov     r8, [rip + v_sum]
    report_u64 r8
    report_var v_mismatch
    report_var v_bad
    mov     r8, [rip + v_capacity]
    report_u64 r8
    report_var v_feat_lo
    report_var v_feat_hi
    report_var v_qsize
    report_var v_nslots
    report_var v_samples
    # Reset the device: it lets go of the queue.
    xor     eax, eax
    mov     [rbx + R_STATUS], eax
    mov     dx, EXIT_PORT
    xor     eax, eax
    out     dx, eax
    cli
    cmp     qword ptr [rip + v_user], 0
    jne     2f
1:
    hlt
    jmp     1b
2:
    pause
    jmp     2b

# Failure with code eax after the device was found: mark it FAILED.
fail:
    mov     ecx, ST_FAILED
    mov     [rbx + R_STATUS], ecx
# Failure with code eax: report it, exit with it.
fail_nodev:
    mov     ecx, eax
    mov     dx, REPORT_PORT
    out     dx, eax
    mov     dx, EXIT_PORT
    mov     eax, ecx
    out     dx, eax
    cli
    cmp     qword ptr [rip + v_user], 0
    jne     2f
1:
    hlt
    jmp     1b
2:
    pause
    jmp     2b

# Return to the caller in user mode (CPL3, IOPL 3, interrupts off) on the
# same stack: the user bit in the identity map's PML4[0], PDPT[0..4] and
# their page directories (2 MiB pages), then a GDT with user segments and
# an iretq. Clobbers rax, rcx, rdx, rsi, rdi, r8.
enter_user:
    movabs  r8, 0x000ffffffffff000
    mov     rsi, cr3
    and     rsi, r8
    or      qword ptr [rsi], 4
    mov     rsi, [rsi]
    and     rsi, r8
    xor     ecx, ecx
1:
    or      qword ptr [rsi + rcx * 8], 4
    mov     rdi, [rsi + rcx * 8]
    and     rdi, r8
    xor     edx, edx
2:
    or      qword ptr [rdi + rdx * 8], 4
    inc     edx
    cmp     edx, 512
    jb      2b
    inc     ecx
    cmp     ecx, 4
    jb      1b
    mov     rax, cr3
    mov     cr3, rax
    lgdt    [rip + user_gdt_ptr]
    pop     rcx
    mov     rax, rsp
    push    0x23
    push    rax
    push    0x3002
    push    0x2b
    push    rcx
    iretq

# Each slot's three descriptors: header (device reads), data, status
# (device writes). Clobbers rax, rcx, rdx, rsi, rdi, r8.
setup_descriptors:
    xor     ecx, ecx
1:
    cmp     rcx, [rip + v_nslots]
    jae     2f
    mov     rdi, rcx
    imul    rdi, rdi, 48
    add     rdi, [rip + v_desc]
    lea     r8d, [rcx + rcx * 2]
    # Header.
    mov     rax, rcx
    shl     rax, 4
    add     rax, [rip + v_hdr]
    mov     [rdi], rax
    mov     dword ptr [rdi + 8], 16
    mov     word ptr [rdi + 12], D_NEXT
    lea     eax, [r8 + 1]
    mov     [rdi + 14], ax
    # Data (flags and the head's next set per request).
    mov     rax, rcx
    imul    rax, [rip + v_bytes]
    add     rax, [rip + v_bufs]
    mov     [rdi + 16], rax
    mov     rax, [rip + v_bytes]
    mov     [rdi + 24], eax
    mov     word ptr [rdi + 28], D_NEXT
    lea     eax, [r8 + 2]
    mov     [rdi + 30], ax
    # Status.
    mov     rax, rcx
    add     rax, [rip + v_stat]
    mov     [rdi + 32], rax
    mov     dword ptr [rdi + 40], 1
    mov     word ptr [rdi + 44], D_WRITE
    mov     word ptr [rdi + 46], 0
    inc     rcx
    jmp     1b
2:
    ret

# Run v_total requests of type v_type, v_nslots at most in flight: v_prep
# sets up slot r12 before each submission, v_done looks at it after each
# completion. r13 submitted, r14 completed, r15 whether to notify.
engine:
    xor     r13d, r13d
    xor     r14d, r14d
    xor     r12d, r12d
1:
    cmp     r12, [rip + v_nslots]
    jae     2f
    cmp     r13, [rip + v_total]
    jae     2f
    call_var v_prep
    call    post
    inc     r13
    inc     r12
    jmp     1b
2:
    call    notify
wait_used:
    cmp     r14, [rip + v_total]
    jae     engine_done
    mov     rsi, [rip + v_used]
    movzx   eax, word ptr [rsi + 2]
    cmp     ax, [rip + v_last_used]
    jne     reap
    pause
    jmp     wait_used
reap:
    xor     r15d, r15d
reap_one:
    mov     rsi, [rip + v_used]
    movzx   eax, word ptr [rsi + 2]
    movzx   ecx, word ptr [rip + v_last_used]
    cmp     ax, cx
    je      reaped
    and     ecx, [rip + v_qmask]
    mov     eax, [rsi + 4 + rcx * 8]
    inc     word ptr [rip + v_last_used]
    # The entry must name a slot's head descriptor.
    xor     edx, edx
    mov     ecx, 3
    div     ecx
    test    edx, edx
    jnz     bad_used
    cmp     rax, [rip + v_nslots]
    jae     bad_used
    mov     r12, rax
    call    complete
    call_var v_done
    inc     r14
    inc     qword ptr [rip + v_completed]
    cmp     r13, [rip + v_total]
    jae     reap_one
    call_var v_prep
    call    post
    inc     r13
    mov     r15d, 1
    jmp     reap_one
reaped:
    test    r15d, r15d
    jz      wait_used
    call    notify
    jmp     wait_used
engine_done:
    ret
bad_used:
    mov     eax, 6
    jmp     fail

# Queue slot r12's request (sector in its bookkeeping) in the available
# ring. Clobbers rax, rcx, rdx, rsi, rdi.
post:
    mov     rsi, r12
    shl     rsi, 4
    mov     rdi, rsi
    add     rsi, [rip + v_meta]
    add     rdi, [rip + v_hdr]
    mov     rax, [rip + v_type]
    mov     [rdi], rax
    mov     rax, [rsi]
    mov     [rdi + 8], rax
    # Head -> data -> status, or head -> status for a flush; data the
    # device writes for a read.
    imul    rdi, r12, 48
    add     rdi, [rip + v_desc]
    lea     ecx, [r12 + r12 * 2]
    mov     rax, [rip + v_type]
    cmp     eax, T_FLUSH
    lea     edx, [rcx + 1]
    lea     ecx, [rcx + 2]
    cmove   edx, ecx
    mov     [rdi + 14], dx
    test    eax, eax
    mov     ecx, D_NEXT
    mov     edx, D_NEXT | D_WRITE
    cmovz   ecx, edx
    mov     [rdi + 28], cx
    mov     rdi, [rip + v_stat]
    mov     byte ptr [rdi + r12], 0xff
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     [rsi + 8], rax
    # The ring entry, then the index that publishes it.
    mov     rdi, [rip + v_avail]
    movzx   eax, word ptr [rip + v_avail_idx]
    mov     ecx, eax
    and     ecx, [rip + v_qmask]
    lea     edx, [r12 + r12 * 2]
    mov     [rdi + 4 + rcx * 2], dx
    inc     eax
    mov     [rip + v_avail_idx], ax
    mov     [rdi + 2], ax
    ret

# Everything written before is visible to the device; then the notify.
notify:
    mfence
    xor     eax, eax
    mov     [rbx + R_QUEUE_NOTIFY], eax
    ret

# Slot r12 completed as the r14-th request: count a bad status, keep its
# latency. Clobbers rax, rcx, rdx, rsi.
complete:
    mov     rsi, [rip + v_stat]
    movzx   eax, byte ptr [rsi + r12]
    test    eax, eax
    jz      1f
    inc     qword ptr [rip + v_bad]
1:
    rdtsc
    shl     rdx, 32
    or      rax, rdx
    mov     rsi, r12
    shl     rsi, 4
    add     rsi, [rip + v_meta]
    sub     rax, [rsi + 8]
    mov     ecx, 0xffffffff
    cmp     rax, rcx
    cmova   rax, rcx
    mov     rsi, [rip + v_samples]
    mov     [rsi + r14 * 4], eax
    ret

# The next LCG value's top 31 bits in rax. Clobbers rdx.
lcg:
    mov     rax, [rip + v_x]
    imul    rax, [rip + k_lcg_mul]
    add     rax, [rip + k_lcg_add]
    mov     [rip + v_x], rax
    shr     rax, 33
    ret

# Set slot r12's sector (rax). Clobbers rsi.
set_sector:
    mov     rsi, r12
    shl     rsi, 4
    add     rsi, [rip + v_meta]
    mov     [rsi], rax
    ret

# v_prep routines: slot r12's sector (and data) for its next request.
prep_zero:
    xor     eax, eax
    jmp     set_sector

prep_random:
    call    lcg
    xor     edx, edx
    div     qword ptr [rip + v_blocks]
    mov     rax, rdx
    imul    rax, [rip + v_bs]
    jmp     set_sector

prep_seq:
    mov     rax, [rip + v_seq]
    mov     rcx, rax
    add     rcx, [rip + v_bs]
    mov     rdx, rcx
    add     rdx, [rip + v_bs]
    cmp     rdx, [rip + v_capacity]
    jbe     1f
    xor     ecx, ecx
1:
    mov     [rip + v_seq], rcx
    jmp     set_sector

prep_sector:
    call    lcg
    xor     edx, edx
    div     qword ptr [rip + v_span]
    mov     rax, rdx
    jmp     set_sector

prep_fill:
    call    prep_sector
    # Fill the slot's buffer with the pattern of its sectors.
    call    slot_buffer
1:
    mov     rax, r8
    xor     rax, [rip + v_seedhi]
    imul    rax, [rip + k_pattern]
    xor     ecx, ecx
2:
    lea     rdx, [rax + rcx]
    mov     [rdi + rcx * 8], rdx
    inc     ecx
    cmp     ecx, 64
    jb      2b
    add     rdi, 512
    inc     r8
    dec     r9
    jnz     1b
    ret

# rdi = slot r12's buffer, r8 = its first sector, r9 = sectors.
slot_buffer:
    mov     rdi, r12
    imul    rdi, [rip + v_bytes]
    add     rdi, [rip + v_bufs]
    mov     rsi, r12
    shl     rsi, 4
    add     rsi, [rip + v_meta]
    mov     r8, [rsi]
    mov     r9, [rip + v_bs]
    ret

# v_done of the read-back: compare slot r12's buffer with the pattern,
# add it to the checksum. Clobbers rax, rcx, rdx, rsi, rdi, r8-r11.
check_slot:
    call    slot_buffer
    mov     r11, [rip + v_sum]
1:
    mov     rax, r8
    xor     rax, [rip + v_seedhi]
    imul    rax, [rip + k_pattern]
    xor     ecx, ecx
2:
    lea     rdx, [rax + rcx]
    mov     r10, [rdi + rcx * 8]
    cmp     r10, rdx
    je      3f
    inc     qword ptr [rip + v_mismatch]
3:
    rol     r10, cl
    add     r11, r10
    inc     ecx
    cmp     ecx, 64
    jb      2b
    add     rdi, 512
    inc     r8
    dec     r9
    jnz     1b
    mov     [rip + v_sum], r11
    ret

nothing:
    ret

    .balign 8
# null, kernel code and data as the shim's and Multiboot's, user data
# (0x23) and user code (0x2b).
user_gdt:
    .quad 0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00cf93000000ffff
    .quad 0x00cff3000000ffff, 0x00affb000000ffff
user_gdt_ptr:
    .word 6 * 8 - 1
    .quad user_gdt
    .balign 8
k_lcg_mul:  .quad 6364136223846793005
k_lcg_add:  .quad 1442695040888963407
k_pattern:  .quad 0x9e3779b97f4a7c15
v_mmio:     .quad 0
v_mode:     .quad 0
v_user:     .quad 0
v_qd:       .quad 0
v_bs:       .quad 0
v_bytes:    .quad 0
v_count:    .quad 0
v_seed:     .quad 0
v_seedhi:   .quad 0
v_area:     .quad 0
v_desc:     .quad 0
v_avail:    .quad 0
v_used:     .quad 0
v_hdr:      .quad 0
v_stat:     .quad 0
v_meta:     .quad 0
v_samples:  .quad 0
v_bufs:     .quad 0
v_feat_lo:  .quad 0
v_feat_hi:  .quad 0
v_qsize:    .quad 0
v_qmask:    .quad 0
v_nslots:   .quad 0
v_capacity: .quad 0
v_span:     .quad 0
v_blocks:   .quad 0
v_type:     .quad 0
v_total:    .quad 0
v_prep:     .quad 0
v_done:     .quad 0
v_x:        .quad 0
v_seq:      .quad 0
v_t0:       .quad 0
v_sum:      .quad 0
v_mismatch: .quad 0
v_bad:      .quad 0
v_completed: .quad 0
v_avail_idx: .quad 0
v_last_used: .quad 0
