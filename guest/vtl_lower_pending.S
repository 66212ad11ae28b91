/*
 * vtl_lower_pending (2 vCPUs, 2 planes, personality vtl): an interrupt for VTL0 that arrives
 * while VTL1 runs is held until VtlReturn, then delivered in VTL0.
 * vCPU0/VTL0 has handlers for 0x46 and 0x47, APIC on, interrupts on, and VtlCalls VTL1 with
 * rbx = CMD_HOLD. VTL1 of vCPU0 then:
 *   - lets vCPU1/VTL0 send 0x46 through the x2APIC ICR to vCPU0's VTL0 APIC, and waits for it;
 *   - sends itself 0x47 for VTL0 with HvCallSendSyntheticClusterIpi (TargetVtl 0, mask vCPU0);
 *   - makes 50 more exits (HVCALL_PYKVMM_NOP), then checks VTL0's handlers have not run;
 *   - returns (fast). VTL0 takes the first interrupt before its next instruction, the second
 *     at once after it (real KVM) or at its next exit (kvm_pvm injects one per entry); VTL0
 *     waits for both with the cli/sti;hlt loop.
 * The guest checks each of these itself (GUEST_ASSERT_*): the send succeeds; VTL0 takes neither
 * while VTL1 runs; after the return it takes one before its next instruction, each once, 0x47
 * (the higher priority) first. Reports: DONE on both.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_ICR, 0x46
.set V_SYN, 0x47
.set CMD_HOLD, 0x401d
.set EXTRA_EXITS, 50

.text
.globl main
main:
    VTL_MAIN_DISPATCH 2
    call vtl_call                       /* initialise this vCPU's VTL1 */
    cmp qword ptr gs:[PCPU_VCPU], 0
    je vcpu0

    /* vCPU1/VTL0: once VTL1 of vCPU0 runs, IPI vCPU0's VTL0 */
    WAIT_EQ in_vtl1, 1
    call apic_enable
    mov rdi, [rip + vtl0_apic_id]
    mov esi, V_ICR
    call apic_send_ipi
    mov qword ptr [rip + sent], 1
.Ldone:
    GUEST_DONE

vcpu0:
    call idt_install
    SET_HANDLER V_ICR, handler_icr
    SET_HANDLER V_SYN, handler_syn
    call apic_enable
    call apic_id
    mov [rip + vtl0_apic_id], rax
    sti
    mov rbx, CMD_HOLD
    call vtl_call
    /* VTL0 runs again: its pending interrupts are injected. On the kvm_pvm host only the first
     * one comes at once; the next is injected at the next exit, so wait with the hlt loop. */
    mov rax, [rip + taken]
    mov [rip + taken_at_return], rax
1:  cli
    cmp qword ptr [rip + taken], 2
    jae 2f
    sti
    hlt
    jmp 1b
2:  GUEST_ASSERT_NE [rip + taken_at_return], 0, "an interrupt before VTL0's first instruction after the return"
    GUEST_ASSERT_EQ [rip + count_icr], 1, "VTL0 took the ICR IPI 0x46 once"
    GUEST_ASSERT_EQ [rip + count_syn], 1, "VTL0 took the synthetic 0x47 once"
    GUEST_ASSERT_EQ [rip + order], V_SYN, "0x47 (higher priority) first"
    GUEST_ASSERT_EQ [rip + order + 8], V_ICR, "then 0x46"
    GUEST_DONE

handler_icr:
    push rax
    mov eax, V_ICR
    jmp handler_common
handler_syn:
    push rax
    mov eax, V_SYN
handler_common:
    push rcx
    mov rcx, [rip + taken]
    and ecx, 1
    push rdx
    lea rdx, [rip + order]
    mov [rdx + rcx * 8], rax
    pop rdx
    inc qword ptr [rip + taken]
    cmp eax, V_ICR
    jne 1f
    lock inc qword ptr [rip + count_icr]
    jmp 2f
1:  lock inc qword ptr [rip + count_syn]
2:  pop rcx
    call apic_eoi
    pop rax
    iretq

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    VTL1_SERVE vtl1_call

vtl1_call:
    mov rax, CMD_HOLD
    cmp rbx, rax
    jne .Lret
    mov qword ptr [rip + in_vtl1], 1
    WAIT_EQ sent, 1
    mov edi, V_SYN
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    mov edx, 1 << 0
    call vtl_send_ipi
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "VTL1's send of 0x47 down to VTL0"
    NOP_EXITS EXTRA_EXITS
    GUEST_ASSERT_EQ [rip + count_icr], 0, "VTL0 takes no 0x46 while VTL1 runs"
    GUEST_ASSERT_EQ [rip + count_syn], 0, "VTL0 takes no 0x47 while VTL1 runs"
.Lret:
    clc
    ret

.bss
.balign 64
vtl0_apic_id: .space 8
in_vtl1:      .space 8
sent:         .space 8
count_icr:    .space 8
count_syn:    .space 8
taken:        .space 8
order:        .space 16
taken_at_return: .space 8
