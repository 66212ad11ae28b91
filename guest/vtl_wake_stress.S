/*
 * vtl_wake_stress (2-4 vCPUs, 2 planes, personality vtl): a seeded random mix of halts, masks,
 * VtlCalls and interrupts from three sources; every interrupt must arrive exactly once and
 * every halted VTL0 must wake (a lost wake-up ends the run in a timeout).
 * BI_ARG = rounds (bits 15:0, 0 means 100) | seed << 16. vCPU v draws from a xorshift64
 * seeded with seed and v. Each round VTL0 of v picks one of:
 *   - a deliverable interrupt (vector 0x90 + v) for VTL1 of another vCPU t, sent as an x2APIC
 *     IPI from v's own VTL1 (VtlCall), an MSI from the host (hypercall WAKE_HOST_MSI, registered
 *     by the test) or a SendSyntheticClusterIpi from v's own VTL1 (VtlCall: a lower VTL cannot
 *     interrupt a higher one); then it waits for t's VTL1 to count it, in one
 *     of three ways: halted (`cli; check; sti; hlt`, woken by t's VTL1 ringing v's VTL0 with
 *     V_DOOR), spinning, or making exits;
 *   - a masked interrupt (vector 0x50 + v: every VTL1 keeps TPR = 0x70) for VTL1 of another vCPU,
 *     by one of the same three sources, unless the previous one from v to it is still pending;
 *   - a VtlCall that makes its VTL1 drop its TPR to 0 for a few exits (pending masked vectors
 *     are taken then), or spin with interrupts on for a while (interrupts arrive while it runs).
 * At the end (every vCPU finished its rounds) each VTL1 drops its TPR until every masked
 * interrupt sent to it arrived.
 * Reports, VTL0 of every vCPU v (N = vCPUs used, at most 4): SYNC 1, deliverable interrupts sent
 * to v; SYNC 2, those v's VTL1 took; SYNC 3, masked ones sent to v; SYNC 4, those taken;
 * SYNC 5, the number of (sender, receiver) pairs where sent and taken differ (0); SYNC 6, the
 * halts v's VTL0 made while waiting. DONE. vCPUs past 4 only report DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_DOOR, 0x40
.set V_MASKED_BASE, 0x50
.set V_DELIVER_BASE, 0x90
.set MASK_TPR, 0x70
.set WAKE_HOST_MSI, 0x80B1
.set MAXV, 4
.set DEFAULT_ROUNDS, 100
.set CMD_ICR, 1
.set CMD_FLUSH, 2
.set CMD_SPIN, 3
.set CMD_FINAL_FLUSH, 4
.set CMD_SYN, 5

/* this (vCPU, plane)'s private variables in the per-CPU scratch area */
.set RNG, PCPU_SCRATCH
.set ROUND, PCPU_SCRATCH + 8
.set ME, PCPU_SCRATCH + 16
.set HALTS, PCPU_SCRATCH + 24

/* PAIR reg, from, to: reg = from * MAXV + to (the index of a sender/receiver matrix cell) */
.macro PAIR reg:req, from:req, to:req
    mov \reg, \from
    shl \reg, 2
    add \reg, \to
.endm

/* TALLY sent, taken, sum_sent, sum_taken: add cell rdx of both matrices to the sums; count a
 * difference in rbx. Clobbers rax, rsi, rdi. */
.macro TALLY sent_m:req, taken_m:req, sum_sent:req, sum_taken:req
    lea rax, [rip + \sent_m]
    mov rsi, [rax + rdx * 8]
    add \sum_sent, rsi
    lea rax, [rip + \taken_m]
    mov rdi, [rax + rdx * 8]
    add \sum_taken, rdi
    cmp rsi, rdi
    je .Ltally\@
    inc ebx
.Ltally\@:
.endm

/* CMD cmd: VtlCall to this vCPU's VTL1 with rbx = cmd (rdi, rsi are its arguments). */
.macro CMD cmd:req
    mov ebx, \cmd
    xor eax, eax
    call vtl_call
.endm

.text
.globl main
main:
    test rsi, rsi
    jnz vtl1_main
    mov rax, gs:[PCPU_BOOT_INFO]
    mov ecx, [rax + BI_VCPU_COUNT]
    cmp ecx, MAXV
    jbe 1f
    mov ecx, MAXV
1:  mov [rip + nvcpus], rcx
    cmp rdi, rcx
    jae .Ldone
    mov gs:[ME], rdi
    mov rax, [rax + BI_ARG]
    mov rcx, rax
    and ecx, 0xffff
    jnz 2f
    mov ecx, DEFAULT_ROUNDS
2:  mov [rip + rounds], rcx
    shr rax, 16
    mov rcx, 0x9E3779B97F4A7C15         /* seed and vCPU into a non-zero xorshift state */
    lea rdx, [rdi + 1]
    imul rdx, rcx
    xor rax, rdx
    jnz 3f
    inc rax
3:  mov gs:[RNG], rax
    call idt_install
    SET_HANDLER V_DOOR, door_handler
    call apic_enable
    call vtl_call                       /* initialise VTL1 */
    lock inc qword ptr [rip + started]
    lea rdi, [rip + started]
    mov rsi, [rip + nvcpus]
    call pause_until_eq                 /* every VTL1 published its x2APIC ID */
    sti

.Lround:
    mov rax, gs:[ROUND]
    cmp rax, [rip + rounds]
    jae .Lfinish
    inc qword ptr gs:[ROUND]
    mov edi, 8
    call rand_below
    cmp eax, 4
    jb .Ldeliverable
    je .Lmasked
    cmp eax, 6
    jb .Lflush
    mov edi, 2000                       /* VTL1 spins with interrupts on */
    call rand_below
    mov rdi, rax
    CMD CMD_SPIN
    jmp .Lround
.Lflush:
    CMD CMD_FLUSH
    jmp .Lround

.Ldeliverable:
    call random_other                   /* r12 = t */
    mov r13, gs:[ME]
    PAIR r14, r13, r12                  /* r14 = cell (me -> t) */
    lea rax, [rip + sent]
    lock inc qword ptr [rax + r14 * 8]  /* counted before it can arrive */
    lea rsi, [r13 + V_DELIVER_BASE]
    call send_from_random_source
    mov edi, 3
    call rand_below
    mov rsi, rax
    mov rdi, r14
    call wait_acked
    jmp .Lround

.Lmasked:
    call random_other
    mov r13, gs:[ME]
    PAIR r14, r13, r12
    lea rax, [rip + msent]
    mov rcx, [rax + r14 * 8]
    lea rdx, [rip + mrecv]
    cmp rcx, [rdx + r14 * 8]
    jne .Lround                         /* the last one is still pending: it would merge */
    lock inc qword ptr [rax + r14 * 8]
    lea rsi, [r13 + V_MASKED_BASE]
    call send_from_random_source
    jmp .Lround

.Lfinish:
    lock inc qword ptr [rip + finished]
    lea rdi, [rip + finished]
    mov rsi, [rip + nvcpus]
    call pause_until_eq                 /* nobody sends any more */
    CMD CMD_FINAL_FLUSH
    lock inc qword ptr [rip + flushed]
    lea rdi, [rip + flushed]
    mov rsi, [rip + nvcpus]
    call pause_until_eq
    /* the totals for this vCPU as receiver */
    mov r13, gs:[ME]
    xor r8d, r8d                        /* deliverable sent to me */
    xor r9d, r9d                        /* ... taken */
    xor r10d, r10d                      /* masked sent to me */
    xor r11d, r11d                      /* ... taken */
    xor ebx, ebx                        /* mismatching pairs */
    xor ecx, ecx                        /* sender s */
4:  PAIR rdx, rcx, r13
    TALLY sent, recv, r8, r9
    TALLY msent, mrecv, r10, r11
    inc ecx
    cmp rcx, [rip + nvcpus]
    jb 4b
    GUEST_SYNC 1, r8
    GUEST_SYNC 2, r9
    GUEST_SYNC 3, r10
    GUEST_SYNC 4, r11
    GUEST_SYNC 5, rbx
    GUEST_SYNC 6, "qword ptr gs:[HALTS]"
.Ldone:
    GUEST_DONE

/* rand -> rax: xorshift64 on gs:[RNG]. Preserves everything else. */
rand:
    push rcx
    mov rax, gs:[RNG]
    mov rcx, rax
    shl rcx, 13
    xor rax, rcx
    mov rcx, rax
    shr rcx, 7
    xor rax, rcx
    mov rcx, rax
    shl rcx, 17
    xor rax, rcx
    mov gs:[RNG], rax
    pop rcx
    ret

/* rand_below(rdi = n) -> rax in 0..n-1. Preserves everything else. */
rand_below:
    push rdx
    call rand
    shr rax, 1
    xor edx, edx
    div rdi
    mov rax, rdx
    pop rdx
    ret

/* random_other -> r12 = a random vCPU other than this one. */
random_other:
    push rdi
    mov rdi, [rip + nvcpus]
    dec rdi
    call rand_below
    cmp rax, gs:[ME]
    jb 1f
    inc rax                             /* skip myself */
1:  mov r12, rax
    pop rdi
    ret

/* send_from_random_source(r12 = target vCPU, rsi = vector) for VTL1 of the target:
 * x2APIC IPI from this vCPU's VTL1, a host MSI, or SendSyntheticClusterIpi from this vCPU's
 * VTL1 (which counts a failed send itself). */
send_from_random_source:
    mov edi, 3
    call rand_below
    cmp eax, 1
    jb .Lsrc_x2apic
    je .Lsrc_msi
    CMD CMD_SYN                         /* r12 = target vCPU, rsi = vector */
    xor eax, eax
    jmp .Lsrc_check
.Lsrc_msi:
    mov edi, WAKE_HOST_MSI
    mov rdx, rsi
    or rdx, 1 << 8                      /* VTL1 */
    mov rsi, r12
    call hypercall
    jmp .Lsrc_check
.Lsrc_x2apic:
    lea rax, [rip + vtl1_ids]
    mov rdi, [rax + r12 * 8]
    CMD CMD_ICR                         /* rdi = destination, rsi = vector */
    xor eax, eax
.Lsrc_check:
    test ax, ax
    jz 1f
    lock inc qword ptr [rip + send_errors]
1:  ret

/* wait_acked(rdi = cell me -> t, rsi = 0 halted / 1 spinning / 2 making exits): until t's
 * VTL1 took as many as I sent. */
wait_acked:
    lea rax, [rip + sent]
    mov rcx, [rax + rdi * 8]
    lea rdx, [rip + recv]
1:  cli
    cmp [rdx + rdi * 8], rcx
    jae 4f
    cmp esi, 1
    je 2f
    ja 3f
    inc qword ptr gs:[HALTS]
    sti
    hlt                                 /* sti's shadow: nothing is taken between them */
    jmp 1b
2:  sti
    pause
    jmp 1b
3:  sti
    out PORT_NULL, al
    jmp 1b
4:  sti
    ret

door_handler:
    call apic_eoi
    iretq

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    cmp rdi, MAXV
    jae .Lvtl1_idle
    call idt_install
    .irp s, 0, 1, 2, 3
    SET_HANDLER V_DELIVER_BASE + \s, deliver_\s
    SET_HANDLER V_MASKED_BASE + \s, masked_\s
    .endr
    call apic_enable
    mov edi, MASK_TPR
    call apic_set_tpr
    call apic_id
    mov rcx, gs:[PCPU_VCPU]
    lea rdx, [rip + vtl1_ids]
    mov [rdx + rcx * 8], rax
.Lvtl1_idle:
    sti
    lea rdi, [rip + vtl1_command]
    call vtl_serve                      /* never returns */

/* VtlCall handler: rbx = command; rdi, rsi its arguments. */
vtl1_command:
    cmp ebx, CMD_ICR
    jne 1f
    call apic_send_ipi
    clc
    ret
1:  cmp ebx, CMD_SYN
    jne 1f
    mov rdi, rsi
    xor esi, esi                        /* to its own VTL */
    mov edx, 1
    mov ecx, r12d
    shl edx, cl
    call vtl_send_ipi
    test ax, ax
    jz 2f
    lock inc qword ptr [rip + send_errors]
2:  clc
    ret
1:  cmp ebx, CMD_SPIN
    jne 3f
2:  test rdi, rdi
    jz 9f
    pause
    dec rdi
    jmp 2b
3:  cmp ebx, CMD_FLUSH
    jne 5f
    xor edi, edi
    call apic_set_tpr
    mov ecx, 4                          /* a few exits: the kernel injects one per entry */
4:  out PORT_NULL, al
    dec ecx
    jnz 4b
    mov edi, MASK_TPR
    call apic_set_tpr
    clc
    ret
5:  cmp ebx, CMD_FINAL_FLUSH
    jne 9f
    xor edi, edi
    call apic_set_tpr
    mov r13, gs:[PCPU_VCPU]
6:  xor ecx, ecx                        /* until every masked one sent to me arrived */
7:  PAIR rdx, rcx, r13
    lea rax, [rip + msent]
    mov rsi, [rax + rdx * 8]
    lea rax, [rip + mrecv]
    cmp rsi, [rax + rdx * 8]
    je 8f
    out PORT_NULL, al
    jmp 6b
8:  inc ecx
    cmp rcx, [rip + nvcpus]
    jb 7b
9:  clc
    ret

/* deliver_s / masked_s: count (sender s -> this vCPU); a deliverable one rings s's VTL0. */
.irp s, 0, 1, 2, 3
deliver_\s:
    push rax
    mov eax, \s
    jmp deliver_common
masked_\s:
    push rax
    mov eax, \s
    jmp masked_common
.endr

deliver_common:                         /* [rsp] = saved rax, rax = sender */
    push rcx
    push rdx
    push rsi
    push rdi
    mov rcx, gs:[PCPU_VCPU]
    PAIR rdx, rax, rcx
    lea rsi, [rip + recv]
    lock inc qword ptr [rsi + rdx * 8]
    call apic_eoi
    mov ecx, eax
    mov edx, 1
    shl edx, cl                         /* the sender's VTL0 */
    mov edi, V_DOOR
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    call vtl_send_ipi
    test ax, ax
    jz 1f
    lock inc qword ptr [rip + send_errors]
1:  pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

masked_common:
    push rcx
    push rdx
    push rsi
    mov rcx, gs:[PCPU_VCPU]
    PAIR rdx, rax, rcx
    lea rsi, [rip + mrecv]
    lock inc qword ptr [rsi + rdx * 8]
    call apic_eoi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

.bss
.balign 64
nvcpus:      .space 8
rounds:      .space 8
started:     .space 8
finished:    .space 8
flushed:     .space 8
send_errors: .space 8
vtl1_ids:    .space 8 * MAXV
sent:        .space 8 * MAXV * MAXV     /* [sender * MAXV + receiver] deliverable sent */
recv:        .space 8 * MAXV * MAXV     /* ... taken by the receiver's VTL1 */
msent:       .space 8 * MAXV * MAXV     /* masked sent */
mrecv:       .space 8 * MAXV * MAXV     /* masked taken */
