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
 * Reports (VTL0): SYNC 1, status of the send in 1 (0); SYNC 2, 0x48 count after the exits (0);
 *   SYNC 3, 0x68 count right after the VtlCall (1); SYNC 4, 0x48 count then (0);
 *   SYNC 5, 0x48 count after VTL1 lowered its TPR (1); SYNC 6, the vector VTL1's handler saw
 *   first (0x68); SYNC 7, the EntryReason 0x68's handler saw (2: Interrupt). DONE.
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
    GUEST_SYNC 1, [rip + low_status]
    mov ebx, EXITS
1:  mov edi, HVCALL_PYKVMM_NOP
    xor esi, esi
    xor edx, edx
    call hypercall
    dec ebx
    jnz 1b
    GUEST_SYNC 2, [rip + count_low]

    mov rbx, CMD_HIGH
    call vtl_call
    mov rax, [rip + count_high]
    mov rbx, [rip + count_low]
    GUEST_SYNC 3, rax
    GUEST_SYNC 4, rbx

    mov rbx, CMD_TPR0
    call vtl_call
    GUEST_SYNC 5, [rip + count_low]
    GUEST_SYNC 6, [rip + first_vector]
    GUEST_SYNC 7, [rip + high_reason]
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
