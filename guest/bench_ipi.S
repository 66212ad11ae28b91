/*
 * bench_ipi (2 vCPUs, 2 planes, bare policy `--personality none`; for scripts/bench):
 * latency of an interrupt into plane 1 of vCPU 1 while vCPU 1 runs plane 0 in a tight
 * `pause` loop (plane 1 is inactive).
 *
 * BI_ARG = rounds (bits 31:0, 0 means 200) | mode << 32 (bits 39:32) | delay_max << 40.
 *   mode 0, in-kernel IPI: vCPU 0 switches to its plane 1, which sends each round a fixed
 *     x2APIC IPI (ICR write, no exit) to vCPU 1's plane-1 LAPIC. multivm only sees it by
 *     scanning the inactive plane's IRR (on a kick, every kick_interval).
 *   mode 1, hypercall: vCPU 0's plane 0 asks the host with hypercall BENCH_SEND_IPI
 *     (RDX = target vCPU, R8 = vector; registered by scripts/bench), which signals an
 *     MSI into plane 1 (the path a cross-VTL SendSyntheticClusterIpi takes).
 *   mode | 4: vCPU 1's plane 0 makes a PORT_NULL exit in every turn of its loop instead of
 *     only `pause` (a busy plane 0: the IRR is then also scanned after its exits).
 * Each round the sender first makes a pseudo-random number (0..delay_max-1) of PORT_NULL
 * exits, so that sends are spread over the kick period, then a PykvmmNop hypercall (mode
 * 0: the host's timestamp of the send, right before the ICR write) or BENCH_SEND_IPI
 * (mode 1), then waits until the handler acknowledged. The handler (vector 0x50, in vCPU
 * 1's plane 1) first makes one PORT_NULL exit (the host's timestamp of the handler),
 * acknowledges, EOIs, and plane 1 resumes plane 0.
 *   vCPU 0 plane 0: GUEST_SYNC 1, <acks seen>; DONE.  vCPU 1 plane 0: GUEST_SYNC 2, <acks>; DONE.
 */
.include "guest.inc"

.set BENCH_IPI_VECTOR, 0x50
.set BENCH_IPI_DEFAULT_ROUNDS, 200
.set BENCH_SEND_IPI, 0x80B0
.set RESUME_SUSPENDED, -1

.text
.globl main
main:
    BENCH_ARGS BENCH_IPI_DEFAULT_ROUNDS
    mov r8, rcx
    and ecx, 3
    mov [rip + mode], rcx
    and r8d, 4
    mov [rip + busy], r8
    shr rax, 40
    mov [rip + delay_max], rax
    test rsi, rsi
    jnz plane1
    cmp rdi, 1
    je vcpu1_plane0
    test rdi, rdi
    jz vcpu0_plane0
    GUEST_DONE

/* ---- vCPU 1 ---------------------------------------------------------------------------- */
vcpu1_plane0:
    call switch_to_plane1               /* plane 1 sets up its IDT and APIC, then resumes us */
2:  pause                               /* the tight loop: no exits (mode | 4: one each turn) */
    cmp qword ptr [rip + busy], 0
    je 13f
    xor eax, eax
    out PORT_NULL, al
13: mov rax, [rip + acks]
    cmp rax, [rip + rounds]
    jb 2b
    GUEST_SYNC 2, [rip + acks]
    GUEST_DONE

vcpu1_plane1:
    call idt_install
    SET_HANDLER BENCH_IPI_VECTOR, bench_ipi_handler
    call apic_enable
    call apic_id
    mov [rip + target_apic_id], rax
    mov qword ptr [rip + ready], 1
    sti
3:  call resume_plane0                  /* entered again only through the interrupt */
    jmp 3b

.globl bench_ipi_handler
bench_ipi_handler:
    push rax
    xor eax, eax
    out PORT_NULL, al                   /* the host's "handler entered" timestamp */
    lock inc qword ptr [rip + acks]
    call apic_eoi
    pop rax
    iretq

/* ---- vCPU 0 ---------------------------------------------------------------------------- */
vcpu0_plane0:
    WAIT_EQ ready, 1
    cmp qword ptr [rip + mode], 0
    jne 4f
    call switch_to_plane1               /* mode 0: plane 1 sends every round, then resumes us */
    jmp 5f
4:  call sender_rounds                  /* mode 1: this plane sends through the host */
5:  GUEST_SYNC 1, [rip + acks]
    GUEST_DONE

plane1:
    cmp rdi, 1
    je vcpu1_plane1
    test rdi, rdi
    jnz 6f
    call apic_enable                    /* vCPU 0 plane 1: the in-kernel sender (mode 0) */
    call sender_rounds
6:  call resume_plane0
    jmp 6b

/* sender_rounds: rounds x (delay, send, wait for the ack). Clobbers rax, rbx, rcx, rdx, r8, r12. */
sender_rounds:
    xor r12d, r12d
    mov rbx, 0x9E3779B97F4A7C15         /* LCG state */
7:  mov rcx, [rip + delay_max]
    test rcx, rcx
    jz 9f
    mov rax, 6364136223846793005
    imul rbx, rax
    mov rax, 1442695040888963407
    add rbx, rax
    mov rax, rbx
    shr rax, 33
    xor edx, edx
    div rcx                             /* rdx = pseudo-random 0..delay_max-1 */
    xor eax, eax
    test rdx, rdx
    jz 9f
8:  out PORT_NULL, al
    dec rdx
    jnz 8b
9:  cmp qword ptr [rip + mode], 0
    jne 10f
    mov ecx, HVCALL_PYKVMM_NOP          /* mode 0: timestamp, then the ICR write */
    xor edx, edx
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    mov rdi, [rip + target_apic_id]
    mov esi, BENCH_IPI_VECTOR
    call apic_send_ipi
    jmp 11f
10: mov ecx, BENCH_SEND_IPI             /* mode 1: the host delivers it */
    mov edx, 1
    mov r8d, BENCH_IPI_VECTOR
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "BENCH_SEND_IPI failed"
11: inc r12
12: pause
    cmp [rip + acks], r12
    jb 12b
    cmp r12, [rip + rounds]
    jb 7b
    ret

switch_to_plane1:
    push rcx
    push rdx
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov edx, 1
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop rdx
    pop rcx
    ret

resume_plane0:
    push rcx
    push rdx
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov rdx, RESUME_SUSPENDED
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop rdx
    pop rcx
    ret

.data
.balign 64
rounds:         .quad 0
mode:           .quad 0
busy:           .quad 0
delay_max:      .quad 0
ready:          .quad 0
target_apic_id: .quad 0
.balign 64
acks:           .quad 0
