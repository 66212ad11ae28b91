/*
 * vtl_vmpl (1 vCPU, 2 planes, personality vmpl): VtlCall/VtlReturn switch planes but nothing
 * is shared, nothing is loaded from the control page, and interrupts never preempt.
 * VTL1: handler for 0x49, APIC on, r12 = VTL1_R12, interrupts on, vtl_serve (its handler
 * reports what it sees and picks fast / normal returns by call number). VTL0:
 *   1. r12 = VTL0_R12, r13 = VTL0_R13, CR2 = VTL0_CR2; VtlCall. VTL1 sees its own r12 and CR2,
 *      sets r13 = VTL1_R13 and returns fast;
 *   2. VtlCall; VTL1 writes VtlReturnX64Rax/Rcx and returns normally: nothing is loaded;
 *   3. SendSyntheticClusterIpi 0x49 to its own VTL1, 20 more exits: no preemption;
 *   4. VtlCall: VTL1 takes 0x49 as soon as it runs.
 * The guest checks each of these itself (GUEST_ASSERT_*) and reports only DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_IRQ, 0x49
.set VTL0_R12, 0x0a12
.set VTL0_R13, 0x0a13
.set VTL1_R12, 0x1b12
.set VTL1_R13, 0x1b13
.set VTL0_CR2, 0xc2c2
.set RET_RAX, 0x77
.set EXITS, 20

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    call vtl_call                       /* initialise VTL1 */
    /* 1 */
    mov r12, VTL0_R12
    mov r13, VTL0_R13
    mov rax, VTL0_CR2
    mov cr2, rax
    call vtl_call
    GUEST_ASSERT_EQ r13, VTL0_R13, "VTL0 keeps its r13 (VTL1 set its own)"
    GUEST_ASSERT_EQ rax, 0, "VTL0's rax as its own VtlCall stub left it"
    GUEST_ASSERT_EQ rcx, HVCALL_VTL_CALL, "VTL0's rcx as its own VtlCall stub left it"
    /* 2 */
    call vtl_call
    GUEST_ASSERT_EQ rax, 0, "a normal return loads nothing from the control page"
    /* 3 */
    mov edi, V_IRQ
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    mov edx, 1
    call vtl_send_ipi
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "SendSyntheticClusterIpi to VTL1"
    NOP_EXITS EXITS
    GUEST_ASSERT_EQ [rip + count], 0, "the IPI for VTL1 did not preempt VTL0"
    /* 4 */
    call vtl_call
    GUEST_ASSERT_EQ [rip + count], 1, "VTL1 took the IPI when next called"
.Ldone:
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V_IRQ, irq_handler
    mov r12, VTL1_R12
    VTL1_SERVE vtl1_call

vtl1_call:
    inc qword ptr [rip + calls]
    cmp qword ptr [rip + calls], 1
    jne 1f
    GUEST_ASSERT_EQ r12, VTL1_R12, "VTL1 sees its own r12, not VTL0's"
    mov rax, cr2
    GUEST_ASSERT_EQ rax, 0, "VTL1 does not see VTL0's CR2"
    call vtl_entry_reason
    GUEST_ASSERT_EQ rax, VTL_ENTRY_VTL_CALL, "VTL1's entry reason"
    mov r13, VTL1_R13
    clc
    ret
1:  cmp qword ptr [rip + calls], 2
    jne 2f
    mov rax, gs:[PCPU_CONTROL_PAGE]
    mov qword ptr [rax + VTL_RETURN_RAX], RET_RAX
    mov qword ptr [rax + VTL_RETURN_RCX], RET_RAX
    stc                                 /* normal return: would load RAX/RCX under vtl */
    ret
2:  clc
    ret

irq_handler:
    lock inc qword ptr [rip + count]
    call apic_eoi
    iretq

.bss
.balign 64
calls: .space 8
count: .space 8
