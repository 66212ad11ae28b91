/*
 * vtl_isolation (2 vCPUs, 2 planes, personality vtl): each VTL has its own APIC namespace.
 * Both VTLs of vCPU1 have handlers for 0x44 and 0x45 (counted per VTL and vector), APIC on,
 * interrupts on. vCPU0/VTL0 then:
 *   1. sends 0x44 through its x2APIC ICR to vCPU1's VTL0 x2APIC ID: only vCPU1/VTL0 takes it;
 *   2. VtlCalls its VTL1 with rbx = CMD_ICR: VTL1 of vCPU0 sends 0x45 through ITS ICR to
 *      vCPU1's VTL1 x2APIC ID: only vCPU1/VTL1 takes it (preempting vCPU1/VTL0). VTL1 of vCPU1
 *      has now run with interrupts on, so a leaked 0x44 would have been taken;
 *   3. positive control: VtlCall with rbx = CMD_SYN: VTL1 of vCPU0 sends 0x44 to VTL1 of vCPU1
 *      with HvCallSendSyntheticClusterIpi: VTL1 takes it.
 * vCPU0 starts each step only after vCPU1's VTL0 ran again (its heartbeat moved: its VTL1 has
 * returned), so each interrupt for VTL1 has a preemption of its own. vCPU1/VTL0 checks the
 * counts itself at the end (GUEST_ASSERT_EQ): VTL0 took 0x44 once and never 0x45; VTL1 took
 * 0x45 once, 0x44 not after step 2 and once after the control. Reports: DONE on both.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_A, 0x44
.set V_B, 0x45
.set CMD_ICR, 0x1c1c
.set CMD_SYN, 0x1c1d

.text
.globl main
main:
    VTL_MAIN_DISPATCH 2
    call vtl_call                       /* initialise this vCPU's VTL1 */
    call idt_install
    SET_HANDLER V_A, handler_a
    SET_HANDLER V_B, handler_b
    call apic_enable
    call apic_id
    mov rcx, gs:[PCPU_VCPU]
    lea rdx, [rip + vtl0_apic_id]
    mov [rdx + rcx * 8], rax
    sti
    test rcx, rcx
    jz vcpu0

    /* vCPU1/VTL0 */
    mov qword ptr [rip + vcpu1_ready], 1
1:  lock inc qword ptr [rip + heartbeat]   /* VTL0 runs: VTL1 has returned */
    pause
    cmp qword ptr [rip + finished], 1
    jne 1b
    GUEST_ASSERT_EQ [rip + count + 0 * 8], 1, "VTL0 took its own 0x44 once"
    GUEST_ASSERT_EQ [rip + vtl1_a_after_step2], 0, "VTL1 never took VTL0's 0x44"
    GUEST_ASSERT_EQ [rip + count + 3 * 8], 1, "VTL1 took its own 0x45 once"
    GUEST_ASSERT_EQ [rip + count + 1 * 8], 0, "VTL0 never took VTL1's 0x45"
    GUEST_ASSERT_EQ [rip + count + 2 * 8], 1, "VTL1 took the synthetic 0x44 (the control)"
.Ldone:
    GUEST_DONE

vcpu0:
    WAIT_EQ vcpu1_ready, 1
    /* 1 */
    mov rdi, [rip + vtl0_apic_id + 8]
    mov esi, V_A
    call apic_send_ipi
    lea rdi, [rip + count + 0 * 8]
    mov esi, 1
    call pause_until_eq
    /* 2 */
    mov rbx, CMD_ICR
    call vtl_call
    lea rdi, [rip + count + 3 * 8]
    mov esi, 1
    call pause_until_eq
    mov rax, [rip + count + 2 * 8]
    mov [rip + vtl1_a_after_step2], rax
    mov rax, [rip + heartbeat]          /* until vCPU1's VTL1 has returned */
3:  pause
    cmp rax, [rip + heartbeat]
    je 3b
    /* 3 */
    mov rbx, CMD_SYN
    call vtl_call
    lea rdi, [rip + count + 2 * 8]
    mov esi, 1
    call pause_until_eq
    mov qword ptr [rip + finished], 1
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V_A, handler_a
    SET_HANDLER V_B, handler_b
    VTL1_SERVE vtl1_call, record_id=1

vtl1_call:
    mov rax, CMD_ICR
    cmp rbx, rax
    jne 1f
    mov rdi, [rip + vtl1_apic_id + 8]
    mov esi, V_B
    call apic_send_ipi
    jmp 2f
1:  mov rax, CMD_SYN
    cmp rbx, rax
    jne 2f
    mov edi, V_A
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    mov edx, 1 << 1
    call vtl_send_ipi
    GUEST_ASSERT_EQ rax, 0, "SendSyntheticClusterIpi to VTL1"
2:  clc
    ret

/* count[plane * 2 + (vector - V_A)] += 1 (the IDT is per plane, the handlers shared) */
handler_a:
    push rax
    xor eax, eax
    jmp handler_common
handler_b:
    push rax
    mov eax, 1
handler_common:
    push rcx
    mov rcx, gs:[PCPU_PLANE]
    lea rax, [rax + rcx * 2]
    lea rcx, [rip + count]
    lock inc qword ptr [rcx + rax * 8]
    pop rcx
    call apic_eoi
    pop rax
    iretq

.bss
.balign 64
vtl0_apic_id:       .space 16
vtl1_apic_id:       .space 16
vcpu1_ready:        .space 8
finished:           .space 8
heartbeat:          .space 8
count:              .space 4 * 8
vtl1_a_after_step2: .space 8
