/*
 * vtl_wake_bench (2 vCPUs, 2 planes, personality vtl; for scripts/bench): how long a halted
 * VTL0 takes to be preempted by an interrupt for its VTL1, per interrupt source.
 * BI_ARG = rounds (bits 31:0, 0 means 200) | source << 32 (bits 39:32) | delay_max << 40.
 *   source 0: x2APIC IPI (ICR write) from vCPU 0's VTL1 (a VtlCall; the VTL1 makes a PykvmmNop
 *             hypercall right before the write: the host's timestamp of the send)
 *          1: an MSI from the host (hypercall WAKE_HOST_MSI, registered by the bench: RDX = vCPU,
 *             R8 = vector | VTL << 8)
 *          2: SendSyntheticClusterIpi from vCPU 0's VTL1 (a VtlCall: a lower VTL cannot
 *             interrupt a higher one; the send's own hypercall exit is the timestamp)
 * vCPU 1's VTL0 sits in `sti; hlt` for the whole run (a preemption does not wake it). Each round
 * vCPU 0's VTL0 makes a pseudo-random number (0..delay_max-1) of PORT_NULL exits, so that sends
 * are spread over the kick period, sends V_WAKE to vCPU 1's VTL1, and waits for the
 * acknowledgement. VTL1's handler first makes a PORT_NULL exit (the host's timestamp of the
 * wake-up), acknowledges and EOIs; after the last round it rings VTL0 (V_DOOR), which finishes.
 * Reports: vCPU 0 VTL0: SYNC 1, acknowledgements (rounds). vCPU 1 VTL0: SYNC 2, rounds. DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_DOOR, 0x40
.set V_WAKE, 0x90
.set WAKE_HOST_MSI, 0x80B1
.set DEFAULT_ROUNDS, 200
.set RECEIVER, 1

.text
.globl main
main:
    BENCH_ARGS DEFAULT_ROUNDS
    mov [rip + source], rcx
    shr rax, 40
    jnz 2f
    inc eax
2:  mov [rip + delay_max], rax
    VTL_MAIN_DISPATCH 2
    call idt_install
    SET_HANDLER V_DOOR, door_handler
    call apic_enable
    call vtl_call                       /* initialise VTL1 */
    cmp qword ptr gs:[PCPU_VCPU], RECEIVER
    je receiver

/* ---- vCPU 0, VTL0: the sender ------------------------------------------------------------ */
    WAIT_EQ ready, 1
    mov r15, 0x2545F4914F6CDD1D         /* xorshift state for the delays */
    xor r14d, r14d                      /* rounds sent */
.Lround:
    mov rax, r15
    shl rax, 13
    xor r15, rax
    mov rax, r15
    shr rax, 7
    xor r15, rax
    mov rax, r15
    shl rax, 17
    xor r15, rax
    mov rax, r15
    xor edx, edx
    div qword ptr [rip + delay_max]
    test rdx, rdx
    jz 2f
1:  out PORT_NULL, al
    dec rdx
    jnz 1b
2:  inc r14
    mov rax, [rip + source]
    cmp rax, 1
    je .Lmsi
    mov rdi, [rip + receiver_vtl1_id]
    mov esi, V_WAKE
    xor eax, eax
    call vtl_call                       /* VTL1 sends: ICR (after a timestamp) or synthetic */
    jmp .Lwait
.Lmsi:
    mov edi, WAKE_HOST_MSI
    mov esi, RECEIVER
    mov edx, V_WAKE | 1 << 8
    call hypercall
.Lwait:
    lea rdi, [rip + acks]
    mov rsi, r14
    call pause_until_eq
    cmp r14, [rip + rounds]
    jb .Lround
    GUEST_SYNC 1, [rip + acks]
.Ldone:
    GUEST_DONE

/* ---- vCPU 1, VTL0: halted until the end ----------------------------------------------------- */
receiver:
    mov qword ptr [rip + ready], 1
1:  cli
    cmp qword ptr [rip + finished], 0
    jne 2f
    sti
    hlt
    jmp 1b
2:  sti
    GUEST_SYNC 2, [rip + acks]
    GUEST_DONE

door_handler:
    call apic_eoi
    iretq

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER V_WAKE, wake_handler
    call apic_enable
    cmp qword ptr gs:[PCPU_VCPU], RECEIVER
    jne 1f
    call apic_id
    mov [rip + receiver_vtl1_id], rax
1:  sti
    lea rdi, [rip + vtl1_send]
    call vtl_serve                      /* never returns */

/* VtlCall handler (vCPU 0): rdi = destination x2APIC ID, rsi = vector; with source 2 a
 * SendSyntheticClusterIpi of the vector to VTL1 of the receiver instead. */
vtl1_send:
    cmp qword ptr [rip + source], 2
    jne 1f
    mov edi, esi
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    mov edx, 1 << RECEIVER
    call vtl_send_ipi
    clc
    ret
1:  push rdi
    push rsi
    mov edi, HVCALL_PYKVMM_NOP          /* the host's timestamp of the send */
    xor esi, esi
    xor edx, edx
    call hypercall
    pop rsi
    pop rdi
    call apic_send_ipi
    clc
    ret

wake_handler:
    out PORT_NULL, al                   /* the host's timestamp of the wake-up */
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    lock inc qword ptr [rip + acks]
    call apic_eoi
    mov rax, [rip + acks]
    cmp rax, [rip + rounds]
    jb 1f
    mov qword ptr [rip + finished], 1
    mov edi, V_DOOR
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    mov edx, 1 << RECEIVER
    call vtl_send_ipi
1:  pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

.bss
.balign 64
rounds:           .space 8
source:           .space 8
delay_max:        .space 8
ready:            .space 8
acks:             .space 8
finished:         .space 8
receiver_vtl1_id: .space 8
