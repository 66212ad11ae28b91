/*
 * vtl_pingpong (an even number of vCPUs, 2 planes, personality vtl): N round trips of
 * cross-VTL IPIs in both directions at once between the vCPU pairs (0,1), (2,3), ...;
 * N = BI_ARG (0 means 1000). With an odd vCPU count the last vCPU just reports DONE.
 * On each vCPU v (other = v ^ 1), VTL0 sends N pings, one at a time: it asks its own VTL1 with a
 * VtlCall (a lower VTL cannot interrupt a higher one), which sends PING (0x70) to VTL1 of the
 * other vCPU with HvCallSendSyntheticClusterIpi; then VTL0 waits (cli; check; sti; hlt) for the pong.
 * VTL1's PING handler (preempting the other vCPU's VTL0, halted or not) counts the ping, checks
 * it is the one the sender announced (seq), and answers PONG (0x71) to VTL0 of the sender with
 * SendSyntheticClusterIpi (TargetVtl 0). VTL0's PONG handler counts and checks it too.
 * So every round trip is a VtlCall, one VTL1-to-VTL1 IPI, one preemption of a VTL0, one
 * VTL1-to-VTL0 IPI and two VtlReturns.
 * Each vCPU's VTL0 checks at the end (after both vCPUs finished sending) that its VTL0 got N
 * pongs, its VTL1 N pings, and nothing came out of sequence or failed to send
 * (GUEST_ASSERT_EQ); it reports SYNC 1, N (the round trips it checked), then DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set PING, 0x70
.set PONG, 0x71
.set DEFAULT_N, 1000

.text
.globl main
main:
    cmp rsi, 1
    je vtl1_main
    mov rax, rdx
    mov eax, [rax + BI_VCPU_COUNT]
    and eax, ~1                         /* vCPUs in pairs */
    cmp rdi, rax
    jae .Ldone
    mov [rip + participants], rax
    mov r15, rdi                        /* r15 = v (callee-saved by our own code) */
    call vtl_call                       /* initialise this vCPU's VTL1 */
    mov r15, gs:[PCPU_VCPU]
    mov rax, gs:[PCPU_BOOT_INFO]
    mov r14, [rax + BI_ARG]
    test r14, r14
    jnz 1f
    mov r14d, DEFAULT_N
1:  call idt_install
    SET_HANDLER PONG, pong_handler
    call apic_enable
    lea rax, [rip + ready]
    mov qword ptr [rax + r15 * 8], 1
    mov rdi, r15
    xor rdi, 1
    lea rdi, [rax + rdi * 8]
    mov esi, 1
    call pause_until_eq                 /* the other vCPU's VTL0 and VTL1 are set up */

    lea r13, [rip + seq]
    lea r12, [rip + pongs]
    xor ebx, ebx                        /* rbx = round */
.Lround:
    inc rbx
    mov [r13 + r15 * 8], rbx            /* the ping the other VTL1 will see */
    mov ecx, r15d
    xor ecx, 1
    mov edx, 1
    shl edx, cl                         /* mask: the other vCPU (rdx is shared with VTL1) */
    call vtl_call                       /* VTL1 sends the ping */
2:  cli
    cmp [r12 + r15 * 8], rbx
    jae 3f
    sti
.Lwait_hlt:
    hlt                                 /* in sti's shadow: a pong wakes it, never lands before it */
    jmp 2b
3:  sti
    cmp rbx, r14
    jb .Lround

    lea rax, [rip + finished]
    lock inc qword ptr [rax]
    mov rdi, rax
    mov rsi, [rip + participants]
    call pause_until_eq                 /* spin, not hlt: the other vCPU's pings still preempt us */
    lea rax, [rip + pongs]
    GUEST_ASSERT_EQ "qword ptr [rax + r15 * 8]", r14, "pongs VTL0 received"
    lea rax, [rip + pings]
    GUEST_ASSERT_EQ "qword ptr [rax + r15 * 8]", r14, "pings VTL1 received"
    GUEST_ASSERT_EQ [rip + errors], 0, "pings or pongs out of sequence, or failed sends"
    GUEST_SYNC 1, r14
    lea rax, [rip + shadow_misses]
    mov rax, [rax + r15 * 8]
    GUEST_SYNC 2, rax
.Ldone:
    GUEST_DONE

/* VTL0: pong from the other vCPU's VTL1. A CPU that drops the STI shadow when it enters the
 * guest (QEMU's emulated SVM before 9.1: host convention sti_shadow) can deliver it on the
 * wait's `hlt` after an exit between `sti` and `hlt`; returning there would halt for good, so it
 * resumes after the `hlt` instead, as a wake-up from it would, and counts it in shadow_misses. */
pong_handler:
    push rax
    push rcx
    mov rcx, gs:[PCPU_VCPU]
    lea rax, [rip + .Lwait_hlt]
    cmp [rsp + 16], rax                 /* the RIP the pong interrupted */
    jne 1f
    inc qword ptr [rsp + 16]
    lea rax, [rip + shadow_misses]
    inc qword ptr [rax + rcx * 8]
1:  lea rax, [rip + pongs]
    inc qword ptr [rax + rcx * 8]
    mov rax, [rax + rcx * 8]
    push rdx
    lea rdx, [rip + seq]
    cmp rax, [rdx + rcx * 8]
    pop rdx
    je 2f
    lock inc qword ptr [rip + errors]
2:  call apic_eoi
    pop rcx
    pop rax
    iretq

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER PING, ping_handler
    VTL1_SERVE send_ping

/* VtlCall from this vCPU's VTL0: PING to VTL1 of the vCPUs in rdx. */
send_ping:
    mov edi, PING
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    call vtl_send_ipi
    test eax, eax
    jz 1f
    lock inc qword ptr [rip + errors]
1:  clc
    ret

/* VTL1: ping from the other vCPU's VTL0; answer with a pong to it. */
ping_handler:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    mov rcx, gs:[PCPU_VCPU]
    lea rax, [rip + pings]
    inc qword ptr [rax + rcx * 8]
    mov rax, [rax + rcx * 8]
    mov rdx, rcx
    xor rdx, 1                          /* the sender */
    lea rsi, [rip + seq]
    cmp rax, [rsi + rdx * 8]
    je 1f
    lock inc qword ptr [rip + errors]
1:  call apic_eoi
    mov edi, PONG
    mov esi, HV_INPUT_VTL_USE_TARGET | 0  /* UseTargetVtl = 0 would mean VTL1: name VTL0 */
    mov ecx, edx
    mov edx, 1
    shl edx, cl
    call vtl_send_ipi
    test eax, eax
    jz 2f
    lock inc qword ptr [rip + errors]
2:  pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

.bss
.balign 64
ready:    .space 8 * MAX_VCPUS
seq:      .space 8 * MAX_VCPUS
pings:    .space 8 * MAX_VCPUS
pongs:    .space 8 * MAX_VCPUS
shadow_misses: .space 8 * MAX_VCPUS
errors:   .space 8
finished: .space 8
participants: .space 8
