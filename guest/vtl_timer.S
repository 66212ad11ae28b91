/*
 * vtl_timer (1 vCPU, 2 VTLs, personality vtl): a higher VTL's own LAPIC timer preempts the
 * lower VTL while the higher VTL does not run (TLFS: a higher VTL's interrupts preempt a lower
 * one), and a lower VTL's timer waits until that VTL runs.
 * BI_ARG = TSC kHz (bits 31:0, from KVM_GET_TSC_KHZ: the guest's time unit)
 *        | mode << 32 (bits 35:32) | VTL0 halts << 40 | VTL1 returns with IF set << 41
 *        | round trips << 42 | expiries << 48 (bits 55:48; 0 means N_EXPIRIES, at most MAX_EXPIRIES).
 *   mode 0 one-shot, 1 periodic, 2 TSC deadline, 3 one-shot with the LVT timer masked, 5
 *     one-shot with VTL1's TPR (0xF0) masking it:
 *     VTL0 arms its own guard timer (V0_GUARD: 8 s; 100 ms in modes 3 and 5) and VtlCalls VTL1
 *     (CMD_ARM), which arms its timer (V1T, every PERIOD_MS: 25 ms) and returns. VTL0 then spins
 *     (`pause`, no exits) or sits in `sti; hlt` until VTL1 says it is done or its guard fires.
 *     VTL1's handler records each expiry's lateness (its TSC minus the TSC the expiry was due
 *     at), re-arms (one-shot, TSC deadline) until the last expiry, then stops the timer and rings
 *     VTL0 (SendSyntheticClusterIpi V0_DOOR; a preemption does not wake a halted VTL0).
 *     Every entry of VTL1 for an interrupt is counted. VTL0 finally VtlCalls CMD_STOP (in
 *     mode 5 VTL1 then lowers its TPR and takes the expiry held back).
 *     Reports: 0x100 + k: lateness of expiry k in TSC ticks; 0x10 expiries handled; 0x11 VTL1
 *     entries for an interrupt; 0x12 whether VTL0's guard fired; 0x13 VTL1's TMCCT at
 *     CMD_STOP; 0x14 CPUID.1:ECX.TSC-deadline (mode 2 without it: nothing else is reported).
 *   mode 4 (a lower VTL's timer waits): VTL0 arms its timer (V0_TIMER, 1 ms) and VtlCalls VTL1
 *     (CMD_LOWER), which runs for 2 periods (the first making exits, then spinning): 0x30 the
 *     VTL0 timer's count seen by VTL1 (0); back in VTL0, once it fired: 0x31 the count (1).
 *   round trips (modes 0-3): VTL1 arms its timer for 4 s (it does not expire in the run), then
 *     VTL0 makes ROUNDS VtlCalls (CMD_NOP) and CMD_STOP: 0x20 ROUNDS, 0x14. For counting what a
 *     switch costs with the timer armed.
 * DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set MODE_ONESHOT, 0
.set MODE_PERIODIC, 1
.set MODE_TSC_DEADLINE, 2
.set MODE_MASKED, 3
.set MODE_LOWER, 4
.set MODE_TPR_MASKED, 5
.set CMD_ARM, 0x7101
.set CMD_STOP, 0x7102
.set CMD_LOWER, 0x7103
.set CMD_NOP, 0x7104
.set V0_DOOR, 0x40
.set V0_GUARD, 0x41
.set V0_TIMER, 0x42
.set V1T, 0xB1
.set PERIOD_MS, 25
.set ROUND_TRIP_PERIOD_MS, 4000         /* TMICT counts ns at divide 1 (KVM: 1 GHz): < 2^32 */
.set ROUNDS, 500
.set N_EXPIRIES, 4
.set MAX_EXPIRIES, 255
.set GUARD_COUNT, 4000000000            /* 8 s at divide 2 */
.set MASKED_WAIT_MS, 100                /* modes 3 and 5: 4 periods */
.set DCR_DIVIDE_1, 0xB
.set DCR_DIVIDE_2, 0x0

/* WRMSR_IMM msr, value: wrmsr of a 32-bit immediate or register. Clobbers rax, rcx, rdx. */
.macro WRMSR_VAL msr:req, value:req
    mov ecx, \msr
    mov eax, \value
    xor edx, edx
    wrmsr
.endm

.text
.globl main
main:
    mov rax, [rdx + BI_ARG]
    mov ecx, eax
    mov [rip + tsc_khz], rcx
    mov r8d, PERIOD_MS
    bt rax, 42
    setc byte ptr [rip + round_trips]
    jnc 1f
    mov r8d, ROUND_TRIP_PERIOD_MS
1:  imul rcx, r8
    mov [rip + period_tsc], rcx
    imul r8d, r8d, 1000000
    mov [rip + period_ns], r8d
    mov rcx, rax
    shr rcx, 32
    and ecx, 0xF
    mov [rip + mode], rcx
    bt rax, 40
    setc byte ptr [rip + vtl0_halts]
    mov rcx, rax
    shr rcx, 48
    movzx ecx, cl
    test ecx, ecx
    jnz 2f
    mov ecx, N_EXPIRIES
2:  mov [rip + n_expiries], rcx
    bt rax, 41
    setc byte ptr [rip + vtl1_if]
    VTL_MAIN_DISPATCH 1
    call idt_install
    SET_HANDLER V0_DOOR, door_handler
    SET_HANDLER V0_GUARD, guard_handler
    SET_HANDLER V0_TIMER, v0_timer_handler
    call apic_enable
    sti
    call vtl_call                       /* VTL1's first entry: it sets up and returns */
    cmp qword ptr [rip + mode], MODE_LOWER
    je lower
    cmp qword ptr [rip + mode], MODE_TSC_DEADLINE
    jne 1f
    mov eax, 1
    cpuid
    bt ecx, 24
    jc 1f
    GUEST_SYNC 0x14, 0
    jmp .Ldone
1:  WRMSR_VAL X2APIC_TIMER_DIVIDE, DCR_DIVIDE_2
    WRMSR_VAL X2APIC_LVT_TIMER, V0_GUARD
    mov ebx, GUARD_COUNT
    cmp qword ptr [rip + mode], MODE_MASKED
    jb 2f
    mov ebx, MASKED_WAIT_MS * 1000000 / 2
2:  cmp byte ptr [rip + round_trips], 0
    je 3f
    xor ebx, ebx
3:  WRMSR_VAL X2APIC_TIMER_INITIAL, ebx
    mov ebx, CMD_ARM
    call vtl_call
    cmp byte ptr [rip + round_trips], 0
    jne .Lround_trips
    cmp byte ptr [rip + vtl0_halts], 0
    jne .Lhalt
.Lspin:
    cmp qword ptr [rip + done], 0
    jne .Lwaited
    cmp qword ptr [rip + guard_fired], 0
    jne .Lwaited
    pause
    jmp .Lspin
.Lhalt:
    cli
    cmp qword ptr [rip + done], 0
    jne 3f
    cmp qword ptr [rip + guard_fired], 0
    jne 3f
    sti
    hlt
    jmp .Lhalt
3:  sti
.Lwaited:
    WRMSR_VAL X2APIC_TIMER_INITIAL, 0   /* the guard */
    mov ebx, CMD_STOP
    call vtl_call
    xor r12d, r12d
4:  cmp r12, [rip + expiries]
    jae 5f
    cmp r12, MAX_EXPIRIES
    jae 5f
    lea rax, [rip + lateness]
    mov rax, [rax + r12 * 8]
    lea rbx, [r12 + 0x100]
    GUEST_SYNC rbx, rax
    inc r12
    jmp 4b
5:  GUEST_SYNC 0x10, [rip + expiries]
    GUEST_SYNC 0x11, [rip + irq_entries]
    GUEST_SYNC 0x12, [rip + guard_fired]
    GUEST_SYNC 0x13, [rip + tmcct_at_stop]
    GUEST_SYNC 0x14, 1
.Ldone:
    GUEST_DONE

.Lround_trips:
    mov qword ptr [rip + rounds_left], ROUNDS
1:  mov ebx, CMD_NOP
    call vtl_call
    dec qword ptr [rip + rounds_left]
    jnz 1b
    mov ebx, CMD_STOP
    call vtl_call
    GUEST_SYNC 0x20, ROUNDS
    GUEST_SYNC 0x14, 1
    GUEST_DONE

lower:
    cli                                 /* (a slow host may take 1 ms to reach the VtlCall) */
    WRMSR_VAL X2APIC_TIMER_DIVIDE, DCR_DIVIDE_1
    WRMSR_VAL X2APIC_LVT_TIMER, V0_TIMER
    WRMSR_VAL X2APIC_TIMER_INITIAL, 1000000
    mov ebx, CMD_LOWER
    call vtl_call
    sti
    WAIT_EQ v0_timer_count, 1
    GUEST_SYNC 0x31, [rip + v0_timer_count]
    GUEST_DONE

door_handler:
    call apic_eoi
    iretq

guard_handler:
    mov qword ptr [rip + guard_fired], 1
    call apic_eoi
    iretq

v0_timer_handler:
    lock inc qword ptr [rip + v0_timer_count]
    call apic_eoi
    iretq

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V1T, v1_timer_handler
    call apic_enable
    WRMSR_VAL X2APIC_TIMER_DIVIDE, DCR_DIVIDE_1
    WRMSR_VAL X2APIC_LVT_TIMER, V1T     /* set up (unmasked, not counting), as an OS does */
/* Return to VTL0 (fast), with interrupts on or off as BI_ARG says (the TLFS: a higher VTL's
 * RFLAGS.IF does not hold back its preemption of a lower one). */
serve:
    cli
    cmp byte ptr [rip + vtl1_if], 0
    je 1f
    sti
1:  mov ecx, HV_VTL_RETURN_FAST
    call qword ptr [rip + vtl_return_stub]
entry:
    cli
    push rax
    mov rax, gs:[PCPU_CONTROL_PAGE]
    cmp dword ptr [rax + VTL_ENTRY_REASON], VTL_ENTRY_VTL_CALL
    pop rax
    je command
    /* Preempting VTL0 for an interrupt: take it, then give VTL0 back every GPR. An exit with
     * interrupts on, not `sti; nop`: kvm_pvm delivers a pending interrupt only at an entry. */
    lock inc qword ptr [rip + irq_entries]
    sti
    out PORT_NULL, al
    cli
    cmp byte ptr [rip + vtl1_if], 0
    je 2f
    sti
2:  call vtl_return_preserving
    jmp entry

command:
    cmp rbx, CMD_ARM
    je vtl1_arm
    cmp rbx, CMD_STOP
    je vtl1_stop
    cmp rbx, CMD_LOWER
    je vtl1_lower
    jmp serve

vtl1_arm:
    mov qword ptr [rip + expiries], 0
    mov qword ptr [rip + done], 0
    mov rax, [rip + mode]
    lea rcx, [rip + lvt_of_mode]
    mov eax, [rcx + rax * 4]
    WRMSR_VAL X2APIC_LVT_TIMER, eax
    mfence                              /* the LVT write before a TSC-deadline write (SDM) */
    cmp qword ptr [rip + mode], MODE_TPR_MASKED
    jne 1f
    WRMSR_VAL X2APIC_TPR, 0xF0
1:  call arm_next
    jmp serve

vtl1_stop:
    mov ecx, X2APIC_TIMER_CURRENT
    rdmsr
    mov [rip + tmcct_at_stop], rax
    cmp qword ptr [rip + mode], MODE_TPR_MASKED
    jne 1f
    WRMSR_VAL X2APIC_TPR, 0
    sti
    out PORT_NULL, al                   /* the expiry held back (see entry) */
    cli
1:  call timer_stop
    jmp serve

vtl1_lower:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rbx, rax
    add rbx, [rip + period_tsc]         /* the first period making exits */
1:  out PORT_NULL, al
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, rbx
    jb 1b
    add rbx, [rip + period_tsc]         /* the second one spinning */
2:  pause
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, rbx
    jb 2b
    GUEST_SYNC 0x30, [rip + v0_timer_count]
    jmp serve

/* arm_next: the next expiry one period from now (TMICT, or IA32_TSC_DEADLINE in mode 2), its
 * due TSC in t_due. Clobbers rax, rcx, rdx. */
arm_next:
    rdtsc
    shl rdx, 32
    or rax, rdx
    add rax, [rip + period_tsc]
    mov [rip + t_due], rax
    cmp qword ptr [rip + mode], MODE_TSC_DEADLINE
    jne 1f
    mov rdx, rax
    shr rdx, 32
    mov ecx, MSR_IA32_TSC_DEADLINE
    wrmsr
    ret
1:  WRMSR_VAL X2APIC_TIMER_INITIAL, [rip + period_ns]
    ret

/* timer_stop: VTL1's timer masked and disarmed. Clobbers rax, rcx, rdx. */
timer_stop:
    WRMSR_VAL X2APIC_LVT_TIMER, V1T | LVT_MASKED
    WRMSR_VAL X2APIC_TIMER_INITIAL, 0
    ret

v1_timer_handler:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rcx, [rip + expiries]
    cmp rcx, MAX_EXPIRIES
    jae 1f
    sub rax, [rip + t_due]
    lea rsi, [rip + lateness]
    mov [rsi + rcx * 8], rax
1:  inc rcx
    mov [rip + expiries], rcx
    cmp rcx, [rip + n_expiries]
    jae 3f
    cmp qword ptr [rip + mode], MODE_PERIODIC
    jne 2f
    mov rax, [rip + period_tsc]
    add [rip + t_due], rax
    jmp 4f
2:  call arm_next
    jmp 4f
3:  call timer_stop
    mov qword ptr [rip + done], 1
    mov edi, V0_DOOR
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    mov edx, 1
    call vtl_send_ipi
4:  call apic_eoi
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

.section .rodata
.balign 4
lvt_of_mode:
    .long V1T | LVT_TIMER_ONESHOT, V1T | LVT_TIMER_PERIODIC, V1T | LVT_TIMER_TSC_DEADLINE
    .long V1T | LVT_TIMER_ONESHOT | LVT_MASKED, 0, V1T | LVT_TIMER_ONESHOT

.bss
.balign 8
tsc_khz:        .space 8
period_tsc:     .space 8
period_ns:      .space 8
rounds_left:    .space 8
mode:           .space 8
t_due:          .space 8
expiries:       .space 8
n_expiries:     .space 8
lateness:       .space 8 * MAX_EXPIRIES
done:           .space 8
guard_fired:    .space 8
irq_entries:    .space 8
tmcct_at_stop:  .space 8
v0_timer_count: .space 8
vtl0_halts:     .space 1
vtl1_if:        .space 1
round_trips:    .space 1
