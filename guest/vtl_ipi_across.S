/*
 * vtl_ipi_across (2 vCPUs, 2 planes, personality vtl): HvCallSendSyntheticClusterIpi from VTL1
 * of vCPU0 to VTL1 of vCPU1 (fast and memory forms; vCPU0's VTL0 asks for them with a VtlCall:
 * a lower VTL cannot interrupt a higher one, ACCESS_DENIED), from VTL0 of vCPU0 to VTL0 of
 * vCPU1 (UseTargetVtl = 0: the caller's own VTL), and every error status.
 * VTL1 (both vCPUs): IDT with handlers for 0x50 and 0x51 that record the vector and the
 * EntryReason they see, APIC on, interrupts on, vtl_serve. vCPU1/VTL0: handler for 0x52,
 * APIC on, interrupts on, spins until vCPU0 finished.
 * Reports:
 *   vCPU0/VTL0: SYNC 1, status of VTL1's fast send of 0x50 to VTL1 of vCPU1 (0)
 *               SYNC 2, status of VTL1's memory-form send of 0x51 (0)
 *               SYNC 3, status of the send of 0x52 with TargetVtl = 0 (0)
 *               SYNC 0x10.. 0x19: statuses of the bad calls, in order:
 *                 0x10 vector 0x0f (5), 0x11 vector 0x100 (5), 0x12 TargetVtl 0x31 reserved
 *                 bit (5), 0x13 TargetVtl 0x12 = VTL2 (5), 0x14 mask bit 2 = vCPU2 (5),
 *                 0x15 memory form, GPA not 8-aligned (4), 0x16 memory form, GPA past the end
 *                 of memory (5), 0x17 rep count 1 (3), 0x18 variable header size 1 (3),
 *                 0x19 empty processor mask (0: nothing sent), 0x1a TargetVtl 1 from VTL0
 *                 (6: a lower VTL cannot interrupt a higher one)
 *   vCPU1/VTL0: SYNC 1, first vector VTL1 handled (0x50); SYNC 2, second (0x51);
 *               SYNC 3, EntryReason seen by VTL1's handler both times (2 and 2 -> 0x22);
 *               SYNC 4, VTL1 handler count (2); SYNC 5, vector VTL0's handler saw (0x52);
 *               SYNC 6, VTL0 handler count (1); SYNC 7, vCPU of VTL1's handler (1).
 *   DONE on both.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_FAST, 0x50
.set V_MEM, 0x51
.set V_OWN, 0x52
.set TO_VTL1, HV_INPUT_VTL_USE_TARGET | 1
.set CTL_IPI, HVCALL_SEND_SYNTHETIC_CLUSTER_IPI
.set CTL_IPI_FAST, HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST
.set CMD_FAST, 0x1f01
.set CMD_MEM, 0x1f02

/* SEND_FAST vector, input_vtl, mask: rax = status (vtl_send_ipi; clobbers rdi, rsi, rdx). */
.macro SEND_FAST vector:req, input_vtl:req, mask:req
    mov rdi, \vector
    mov esi, \input_vtl
    mov rdx, \mask
    call vtl_send_ipi
.endm

/* RAW control, rdx, r8: the generic stub with RCX/RDX/R8 as given; rax = status. */
.macro RAW control:req, rdx_value:req, r8_value:req
    mov rcx, \control
    mov rdx, \rdx_value
    mov r8, \r8_value
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    and eax, 0xffff
.endm

.text
.globl main
main:
    VTL_MAIN_DISPATCH 2
    call vtl_call                       /* initialise this vCPU's VTL1 */
    cmp qword ptr gs:[PCPU_VCPU], 0
    je vcpu0

    /* vCPU1/VTL0 */
    call idt_install
    SET_HANDLER V_OWN, vtl0_handler
    call apic_enable
    sti
    mov qword ptr [rip + vcpu1_ready], 1
    WAIT_EQ_BEATING finished, 1, vcpu1_beat   /* vCPU0 sees VTL0 run again after each preemption */
    cli
    GUEST_SYNC 1, [rip + vtl1_vectors]
    GUEST_SYNC 2, [rip + vtl1_vectors + 8]
    mov rax, [rip + vtl1_reasons]
    shl rax, 4
    or rax, [rip + vtl1_reasons + 8]
    GUEST_SYNC 3, rax
    GUEST_SYNC 4, [rip + vtl1_count]
    GUEST_SYNC 5, [rip + vtl0_vector]
    GUEST_SYNC 6, [rip + vtl0_count]
    GUEST_SYNC 7, [rip + vtl1_vcpu]
.Ldone:
    GUEST_DONE

vcpu0:
    WAIT_EQ vcpu1_ready, 1

    mov rbx, CMD_FAST                   /* VTL1 sends (fast form) */
    call vtl_call
    GUEST_SYNC 1, [rip + vtl1_status]
    WAIT_EQ vtl1_count, 1
    WAIT_MOVED vcpu1_beat               /* vCPU1 is back in VTL0: the next IPI is a new entry */
    mov rbx, CMD_MEM                    /* VTL1 sends (memory form) */
    call vtl_call
    GUEST_SYNC 2, [rip + vtl1_status]
    WAIT_EQ vtl1_count, 2

    SEND_FAST V_OWN, 0, 1 << 1          /* UseTargetVtl = 0: VTL0, the caller's own */
    GUEST_SYNC 3, rax
    WAIT_EQ vtl0_count, 1

    /* the errors (none of them sends anything) */
    SEND_FAST 0x0f, TO_VTL1, 1 << 1
    GUEST_SYNC 0x10, rax
    SEND_FAST 0x100, TO_VTL1, 1 << 1    /* vtl_send_ipi passes the low 32 bits: 0x100 */
    GUEST_SYNC 0x11, rax
    SEND_FAST V_FAST, 0x31, 1 << 1
    GUEST_SYNC 0x12, rax
    SEND_FAST V_FAST, HV_INPUT_VTL_USE_TARGET | 2, 1 << 1
    GUEST_SYNC 0x13, rax
    SEND_FAST V_FAST, TO_VTL1, 1 << 2
    GUEST_SYNC 0x14, rax
    lea rdx, [rip + ipi_input + 4]
    RAW CTL_IPI, rdx, 0
    GUEST_SYNC 0x15, rax
    mov rdx, gs:[PCPU_BOOT_INFO]
    mov rdx, [rdx + BI_MEM_SIZE]
    RAW CTL_IPI, rdx, 0
    GUEST_SYNC 0x16, rax
    mov rdx, V_FAST | (TO_VTL1 << 32)
    RAW CTL_IPI_FAST | (1 << HV_CONTROL_REP_COUNT_SHIFT), rdx, 1 << 1
    GUEST_SYNC 0x17, rax
    mov rdx, V_FAST | (TO_VTL1 << 32)
    RAW CTL_IPI_FAST | (1 << 17), rdx, 1 << 1
    GUEST_SYNC 0x18, rax
    SEND_FAST V_FAST, 0, 0
    GUEST_SYNC 0x19, rax
    SEND_FAST V_FAST, TO_VTL1, 1 << 1
    GUEST_SYNC 0x1a, rax

    mov qword ptr [rip + finished], 1
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V_FAST, vtl1_handler_fast
    SET_HANDLER V_MEM, vtl1_handler_mem
    VTL1_SERVE vtl1_call

/* VtlCall (vCPU0's VTL1): rbx = CMD_FAST or CMD_MEM: send 0x50 / 0x51 to VTL1 of vCPU1 (its
 * own VTL, named explicitly); the status in vtl1_status. */
vtl1_call:
    cmp rbx, CMD_FAST
    jne 1f
    SEND_FAST V_FAST, TO_VTL1, 1 << 1
    jmp 2f
1:  lea rdx, [rip + ipi_input]          /* memory form: RDX = GPA of the 16-byte input */
    mov dword ptr [rdx], V_MEM
    mov byte ptr [rdx + 4], TO_VTL1
    mov qword ptr [rdx + 8], 1 << 1
    RAW CTL_IPI, rdx, 0
2:  mov [rip + vtl1_status], rax
    clc
    ret

vtl1_handler_fast:
    push rax
    mov eax, V_FAST
    jmp vtl1_handler_common
vtl1_handler_mem:
    push rax
    mov eax, V_MEM
vtl1_handler_common:                    /* [rsp] = saved rax, rax = vector */
    push rcx
    mov rcx, [rip + vtl1_count]
    and ecx, 1
    lea rcx, [rcx * 8]
    push rdx
    lea rdx, [rip + vtl1_vectors]
    mov [rdx + rcx], rax
    call vtl_entry_reason
    lea rdx, [rip + vtl1_reasons]
    mov [rdx + rcx], rax
    mov rax, gs:[PCPU_VCPU]
    mov [rip + vtl1_vcpu], rax
    pop rdx
    pop rcx
    call apic_eoi
    lock inc qword ptr [rip + vtl1_count]
    pop rax
    iretq

vtl0_handler:
    mov qword ptr [rip + vtl0_vector], V_OWN
    call apic_eoi
    lock inc qword ptr [rip + vtl0_count]
    iretq

.bss
.balign 64
ipi_input:      .space 16
vcpu1_ready:    .space 8
finished:       .space 8
vcpu1_beat:     .space 8
vtl1_count:     .space 8
vtl1_vectors:   .space 16
vtl1_reasons:   .space 16
vtl1_vcpu:      .space 8
vtl0_count:     .space 8
vtl0_vector:    .space 8
vtl1_status:    .space 8
