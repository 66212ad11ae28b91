/*
 * vtl_ipi_within (2 vCPUs, 2 planes, personality vtl): an x2APIC IPI inside VTL1 preempts VTL0.
 * Every vCPU's VTL0 first VtlCalls its VTL1 to initialise it (IDT with a handler for 0x60,
 * APIC on, x2APIC ID published, interrupts on, vtl_serve). Then:
 *   vCPU1/VTL0: sentinels in rbx, rbp, r13-r15, then spins (pause) counting in r12 until
 *               VTL1 of vCPU1 handled the IPI; checks the sentinels and that r12 kept counting.
 *   vCPU0/VTL0: once vCPU1 spins, VtlCalls VTL1 with rbx = CMD_SEND_IPI (a shared register);
 *               VTL1 of vCPU0 sends vector 0x60 through its x2APIC ICR to VTL1 of vCPU1,
 *               which preempts vCPU1's VTL0 (entry reason Interrupt).
 * vCPU1/VTL0 checks after the spin (GUEST_ASSERT_EQ): VTL1 of vCPU1 handled 0x60 once, with
 * EntryReason Interrupt; VTL0's sentinels survived and its spin went on. Reports: DONE on both.
 */
.include "guest.inc"
.include "vtl.inc"

.set IPI_VECTOR, 0x60
.set CMD_SEND_IPI, 0x5e4d
.set SENT_RBX, 0x0b0b0b0b0b0b0b0b
.set SENT_RBP, 0x0bbb0bbb0bbb0bbb
.set SENT_R13, 0x1313131313131313
.set SENT_R14, 0x1414141414141414
.set SENT_R15, 0x1515151515151515

.text
.globl main
main:
    VTL_MAIN_DISPATCH 2
    mov r12, rdi
    call vtl_call                       /* initialise this vCPU's VTL1 */
    mov rdi, gs:[PCPU_VCPU]
    test rdi, rdi
    jz vcpu0

    /* vCPU1/VTL0: spin until preempted and the handler ran */
    mov rbx, SENT_RBX
    mov rbp, SENT_RBP
    mov r13, SENT_R13
    mov r14, SENT_R14
    mov r15, SENT_R15
    xor r12d, r12d
    mov qword ptr [rip + vcpu1_spinning], 1
1:  inc r12
    pause
    cmp qword ptr [rip + handled], 0
    je 1b
    mov [rip + spins_at_end], r12
    xor eax, eax
    mov rcx, SENT_RBX
    cmp rbx, rcx
    jne 2f
    mov rcx, SENT_RBP
    cmp rbp, rcx
    jne 2f
    mov rcx, SENT_R13
    cmp r13, rcx
    jne 2f
    mov rcx, SENT_R14
    cmp r14, rcx
    jne 2f
    mov rcx, SENT_R15
    cmp r15, rcx
    jne 2f
    cmp r12, 1
    jbe 2f
    mov eax, 1
2:  GUEST_ASSERT_EQ rax, 1, "VTL0's sentinels survived and its spin went on"
    GUEST_ASSERT_EQ [rip + seen_vector], 0x60, "the vector VTL1's handler saw"
    GUEST_ASSERT_EQ [rip + seen_reason], VTL_ENTRY_INTERRUPT, "VTL1's entry reason"
    GUEST_ASSERT_EQ [rip + handled], 1, "interrupts VTL1 handled"
    GUEST_ASSERT_EQ [rip + seen_vcpu], 1, "the vCPU whose VTL1 handled it"
.Ldone:
    GUEST_DONE

vcpu0:
    WAIT_EQ vcpu1_spinning, 1
    mov rbx, CMD_SEND_IPI
    call vtl_call
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER IPI_VECTOR, ipi_handler
    VTL1_SERVE vtl1_call, record_id=1

/* VtlCall handler (vtl_serve): rbx = command from VTL0. Fast return (CF clear). */
vtl1_call:
    mov rax, CMD_SEND_IPI
    cmp rbx, rax
    jne 1f
    mov rdi, [rip + vtl1_apic_id + 8]   /* VTL1's x2APIC ID on vCPU1 */
    mov esi, IPI_VECTOR
    call apic_send_ipi
1:  clc
    ret

ipi_handler:
    push rax
    mov qword ptr [rip + seen_vector], IPI_VECTOR
    call vtl_entry_reason
    mov [rip + seen_reason], rax
    mov rax, gs:[PCPU_VCPU]
    mov [rip + seen_vcpu], rax
    call apic_eoi
    lock inc qword ptr [rip + handled]
    pop rax
    iretq

.bss
.balign 64
vtl1_apic_id:   .space 8 * 2
vcpu1_spinning: .space 8
handled:        .space 8
seen_vector:    .space 8
seen_reason:    .space 8
seen_vcpu:      .space 8
spins_at_end:   .space 8
