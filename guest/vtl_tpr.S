/*
 * vtl_tpr (1 vCPU, 2 planes, personality vtl): an interrupt for VTL1 that VTL1's TPR masks does
 * not preempt VTL0; one above the TPR does; the masked one is taken once VTL1 lowers its TPR.
 * VTL1: handlers for 0x48 (class 4) and 0x68 (class 6), APIC on, TPR = 0x50, interrupts on,
 * vtl_serve. VTL0:
 *   1. SendSyntheticClusterIpi 0x48 to its own VTL1, then 20 more exits (PYKVMM_NOP);
 *   2. SendSyntheticClusterIpi 0x68 to its own VTL1: preempts VTL0 at once (next entry);
 *   3. VtlCall with rbx = CMD_TPR0: VTL1 sets its TPR to 0 and makes exits until 0x48 came.
 * Reports (VTL0): SYNC 1, status of send 1 (0); SYNC 2, 0x48 count after the exits (0);
 *   SYNC 3, 0x68 count right after send 2 (1); SYNC 4, 0x48 count then (0);
 *   SYNC 5, 0x48 count after VTL1 lowered its TPR (1); SYNC 6, the vector VTL1's handler saw
 *   first (0x68). DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_LOW, 0x48
.set V_HIGH, 0x68
.set VTL1_TPR, 0x50
.set CMD_TPR0, 0x7e50
.set EXITS, 20

.macro SEND_SELF_VTL1 vector:req
    mov edi, \vector
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    mov edx, 1
    call vtl_send_ipi
.endm

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    call vtl_call                       /* initialise VTL1 */

    SEND_SELF_VTL1 V_LOW
    GUEST_SYNC 1, rax
    mov ebx, EXITS
1:  mov edi, HVCALL_PYKVMM_NOP
    xor esi, esi
    xor edx, edx
    call hypercall
    dec ebx
    jnz 1b
    GUEST_SYNC 2, [rip + count_low]

    SEND_SELF_VTL1 V_HIGH
    mov rax, [rip + count_high]
    mov rbx, [rip + count_low]
    GUEST_SYNC 3, rax
    GUEST_SYNC 4, rbx

    mov rbx, CMD_TPR0
    call vtl_call
    GUEST_SYNC 5, [rip + count_low]
    GUEST_SYNC 6, [rip + first_vector]
.Ldone:
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V_LOW, handler_low
    SET_HANDLER V_HIGH, handler_high
    VTL1_SERVE vtl1_call, tpr=VTL1_TPR

vtl1_call:
    mov rax, CMD_TPR0
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
