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
 * Reports:
 *   VTL1: SYNC 0x101, r12 it sees on call 1 (VTL1_R12); SYNC 0x102, CR2 it sees (0);
 *         SYNC 0x103, EntryReason (1)
 *   VTL0: SYNC 1, r13 after call 1 (VTL0_R13); SYNC 2, rax (0: its own, from the VtlCall stub);
 *         SYNC 3, rcx (0x11, likewise); SYNC 4, rax after the normal return of call 2 (0);
 *         SYNC 5, status of the send (0); SYNC 6, 0x49 count after the exits (0);
 *         SYNC 7, 0x49 count after call 4 (1). DONE.
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
    GUEST_SYNC 1, r13
    GUEST_SYNC 2, rax
    GUEST_SYNC 3, rcx
    /* 2 */
    call vtl_call
    GUEST_SYNC 4, rax
    /* 3 */
    mov edi, V_IRQ
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    mov edx, 1
    call vtl_send_ipi
    GUEST_SYNC 5, rax
    mov ebx, EXITS
1:  mov edi, HVCALL_PYKVMM_NOP
    xor esi, esi
    xor edx, edx
    call hypercall
    dec ebx
    jnz 1b
    GUEST_SYNC 6, [rip + count]
    /* 4 */
    call vtl_call
    GUEST_SYNC 7, [rip + count]
.Ldone:
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V_IRQ, irq_handler
    call apic_enable
    mov r12, VTL1_R12
    sti
    lea rdi, [rip + vtl1_call]
    call vtl_serve                      /* never returns */

vtl1_call:
    inc qword ptr [rip + calls]
    cmp qword ptr [rip + calls], 1
    jne 1f
    GUEST_SYNC 0x101, r12
    mov rax, cr2
    GUEST_SYNC 0x102, rax
    call vtl_entry_reason
    GUEST_SYNC 0x103, rax
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
