/*
 * vtl_tpr (1 vCPU, 2 planes, personality vtl): an interrupt for VTL1 that VTL1's TPR masks does
 * not preempt VTL0; one above the TPR does; the masked one is taken once VTL1 lowers its TPR.
 * VTL0 cannot interrupt VTL1 (the TLFS grants a lower VTL no way to), so VTL1 makes its own
 * interrupts, on VTL0's request (VtlCall).
 * VTL1: handlers for 0x48 (class 4) and 0x68 (class 6), APIC on, TPR = 0x50, interrupts on,
 * vtl_serve. VTL0:
 *   1. VtlCall CMD_LOW: VTL1 sends itself 0x48 (SendSyntheticClusterIpi to its own VTL: masked,
 *      it stays pending) and returns; VTL0 makes 20 more exits (PYKVMM_NOP);
 *   2. VtlCall CMD_HIGH: VTL1 masks interrupts (cli), sends itself 0x68 and returns: 0x68 is
 *      above its TPR, and RFLAGS.IF does not hold back a switch to a higher VTL, so the return
 *      bounces straight back into VTL1 (entry reason Interrupt), which takes it after `sti`;
 *   3. VtlCall with rbx = CMD_TPR0: VTL1 sets its TPR to 0 and makes exits until 0x48 came.
 * VTL0 checks each step itself (GUEST_ASSERT_*): the send succeeds; 0x48 waits through the
 * exits; 0x68 is taken right after its VtlCall (entry reason Interrupt) while 0x48 still waits;
 * 0x48 comes once VTL1 lowers its TPR. Reports: DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_LOW, 0x48
.set V_HIGH, 0x68
.set VTL1_TPR, 0x50
.set CMD_TPR0, 0x7e50
.set CMD_LOW, 0x7e51
.set CMD_HIGH, 0x7e52
.set EXITS, 20

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    call vtl_call                       /* initialise VTL1 */

    mov rbx, CMD_LOW
    call vtl_call
    GUEST_ASSERT_EQ [rip + low_status], HV_STATUS_SUCCESS, "VTL1's send of 0x48 to itself"
    NOP_EXITS EXITS
    GUEST_ASSERT_EQ [rip + count_low], 0, "0x48 (below VTL1's TPR) did not preempt VTL0"

    mov rbx, CMD_HIGH
    call vtl_call
    mov rax, [rip + count_high]
    mov rbx, [rip + count_low]
    GUEST_ASSERT_EQ rax, 1, "0x68 (above VTL1's TPR) taken right after the VtlCall"
    GUEST_ASSERT_EQ rbx, 0, "0x48 still masked then"

    mov rbx, CMD_TPR0
    call vtl_call
    GUEST_ASSERT_EQ [rip + count_low], 1, "0x48 taken once VTL1 lowered its TPR"
    GUEST_ASSERT_EQ [rip + first_vector], V_HIGH, "the first vector VTL1's handler saw"
    GUEST_ASSERT_EQ [rip + high_reason], VTL_ENTRY_INTERRUPT, "the entry reason 0x68's handler saw"
.Ldone:
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V_LOW, handler_low
    SET_HANDLER V_HIGH, handler_high
    VTL1_SERVE vtl1_call, tpr=VTL1_TPR

vtl1_call:
    cmp rbx, CMD_LOW
    jne 3f
    mov edi, V_LOW
    xor esi, esi                        /* its own VTL */
    mov edx, 1
    call vtl_send_ipi
    mov [rip + low_status], rax
    clc
    ret
3:  cmp rbx, CMD_HIGH
    jne 4f
    cli
    mov edi, V_HIGH
    xor esi, esi
    mov edx, 1
    call vtl_send_ipi                   /* pending: interrupts are off */
    mov ecx, HV_VTL_RETURN_FAST
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    sti                                 /* back at once, by the interrupt: take it */
    WAIT_EQ count_high, 1
    clc                                 /* and return to the VTL0 it preempted */
    ret
4:  mov rax, CMD_TPR0
    cmp rbx, rax
    jne 2f
    xor edi, edi
    call apic_set_tpr
    mov ebx, 1000
1:  cmp qword ptr [rip + count_low], 0
    jne 2f
    mov edi, HVCALL_PYKVMM_NOP
    xor esi, esi
    xor edx, edx
    call hypercall
    dec ebx
    jnz 1b
2:  clc
    ret

handler_low:
    push rax
    mov eax, V_LOW
    lock inc qword ptr [rip + count_low]
    jmp handler_common
handler_high:
    push rax
    call vtl_entry_reason
    mov [rip + high_reason], rax
    mov eax, V_HIGH
    lock inc qword ptr [rip + count_high]
handler_common:
    cmp qword ptr [rip + first_vector], 0
    jne 1f
    mov [rip + first_vector], rax
1:  call apic_eoi
    pop rax
    iretq

.bss
.balign 64
count_low:    .space 8
count_high:   .space 8
first_vector: .space 8
low_status:   .space 8
high_reason:  .space 8
