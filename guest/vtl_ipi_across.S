/*
 * vtl_ipi_across (2 vCPUs, 2 planes, personality vtl): HvCallSendSyntheticClusterIpi from VTL1
 * of vCPU0 to VTL1 of vCPU1 (fast and memory forms; vCPU0's VTL0 asks for them with a VtlCall:
 * a lower VTL cannot interrupt a higher one, ACCESS_DENIED), from VTL0 of vCPU0 to VTL0 of
 * vCPU1 (UseTargetVtl = 0: the caller's own VTL), and every error status.
 * VTL1 (both vCPUs): IDT with handlers for 0x50 and 0x51 that record the vector and the
 * EntryReason they see, APIC on, interrupts on, vtl_serve. vCPU1/VTL0: handler for 0x52,
 * APIC on, interrupts on, spins until vCPU0 finished.
 * The guest checks every status (the TLFS's, named) and what each handler saw itself
 * (GUEST_ASSERT_*): the sends succeed; the bad calls answer INVALID_PARAMETER (vector 0x0f,
 * 0x100, reserved HV_INPUT_VTL bits, VTL2 of 2, a mask naming vCPU2, a memory-form GPA past
 * RAM), INVALID_ALIGNMENT (GPA not 8-aligned), INVALID_HYPERCALL_INPUT (a rep count, a variable
 * header), SUCCESS for an empty mask (nothing sent) and ACCESS_DENIED for VTL0 -> VTL1;
 * VTL1 of vCPU1 took 0x50 then 0x51, each preempting VTL0 (EntryReason Interrupt), VTL0 of
 * vCPU1 took 0x52 once. vCPU0 sends the next interrupt only after vCPU1's VTL0 ran again
 * (its heartbeat moved), so each interrupt has a preemption of its own. Reports: DONE on both.
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

/* WAIT_VTL0_RAN: until vCPU1's VTL0 moves its heartbeat (its VTL1 returned). Clobbers rax. */
.macro WAIT_VTL0_RAN
    mov rax, [rip + heartbeat]
.Lhb\@:
    pause
    cmp rax, [rip + heartbeat]
    je .Lhb\@
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
1:  lock inc qword ptr [rip + heartbeat]   /* VTL0 runs: VTL1 has returned */
    pause
    cmp qword ptr [rip + finished], 1
    jne 1b
    cli
    GUEST_ASSERT_EQ [rip + vtl1_vectors], V_FAST, "the first vector VTL1 took"
    GUEST_ASSERT_EQ [rip + vtl1_vectors + 8], V_MEM, "the second vector VTL1 took"
    GUEST_ASSERT_EQ [rip + vtl1_reasons], VTL_ENTRY_INTERRUPT, "VTL1's entry reason for 0x50"
    GUEST_ASSERT_EQ [rip + vtl1_reasons + 8], VTL_ENTRY_INTERRUPT, "VTL1's entry reason for 0x51"
    GUEST_ASSERT_EQ [rip + vtl1_count], 2, "interrupts VTL1 took"
    GUEST_ASSERT_EQ [rip + vtl0_vector], V_OWN, "the vector VTL0 took"
    GUEST_ASSERT_EQ [rip + vtl0_count], 1, "interrupts VTL0 took"
    GUEST_ASSERT_EQ [rip + vtl1_vcpu], 1, "the vCPU whose VTL1 took them"
.Ldone:
    GUEST_DONE

vcpu0:
    WAIT_EQ vcpu1_ready, 1

    mov rbx, CMD_FAST                   /* VTL1 sends (fast form) */
    call vtl_call
    GUEST_ASSERT_EQ [rip + vtl1_status], HV_STATUS_SUCCESS, "VTL1's fast send to VTL1 of vCPU1"
    WAIT_EQ vtl1_count, 1
    WAIT_VTL0_RAN
    mov rbx, CMD_MEM                    /* VTL1 sends (memory form) */
    call vtl_call
    GUEST_ASSERT_EQ [rip + vtl1_status], HV_STATUS_SUCCESS, "VTL1's memory-form send"
    WAIT_EQ vtl1_count, 2
    WAIT_VTL0_RAN

    SEND_FAST V_OWN, 0, 1 << 1          /* UseTargetVtl = 0: VTL0, the caller's own */
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "send to VTL0 of vCPU1 (TargetVtl 0)"
    WAIT_EQ vtl0_count, 1

    /* the errors (none of them sends anything) */
    SEND_FAST 0x0f, TO_VTL1, 1 << 1
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "vector 0x0f"
    SEND_FAST 0x100, TO_VTL1, 1 << 1    /* vtl_send_ipi passes the low 32 bits: 0x100 */
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "vector 0x100"
    SEND_FAST V_FAST, 0x31, 1 << 1
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "reserved HV_INPUT_VTL bits"
    SEND_FAST V_FAST, HV_INPUT_VTL_USE_TARGET | 2, 1 << 1
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "VTL2 of 2"
    SEND_FAST V_FAST, TO_VTL1, 1 << 2
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "a mask naming vCPU2 of 2"
    lea rdx, [rip + ipi_input + 4]
    RAW CTL_IPI, rdx, 0
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_ALIGNMENT, "GPA not 8-aligned"
    mov rdx, gs:[PCPU_BOOT_INFO]
    mov rdx, [rdx + BI_MEM_SIZE]
    RAW CTL_IPI, rdx, 0
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "GPA past the end of RAM"
    mov rdx, V_FAST | (TO_VTL1 << 32)
    RAW CTL_IPI_FAST | (1 << HV_CONTROL_REP_COUNT_SHIFT), rdx, 1 << 1
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_HYPERCALL_INPUT, "a rep count"
    mov rdx, V_FAST | (TO_VTL1 << 32)
    RAW CTL_IPI_FAST | (1 << 17), rdx, 1 << 1
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_HYPERCALL_INPUT, "a variable header"
    SEND_FAST V_FAST, 0, 0
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "an empty mask"
    SEND_FAST V_FAST, TO_VTL1, 1 << 1
    GUEST_ASSERT_EQ rax, HV_STATUS_ACCESS_DENIED, "VTL0 into VTL1"

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
heartbeat:      .space 8
vtl1_count:     .space 8
vtl1_vectors:   .space 16
vtl1_reasons:   .space 16
vtl1_vcpu:      .space 8
vtl0_count:     .space 8
vtl0_vector:    .space 8
vtl1_status:    .space 8
