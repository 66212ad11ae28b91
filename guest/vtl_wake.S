/*
 * vtl_wake (2 vCPUs, 2 or 3 planes, personality vtl): an interrupt for a higher VTL of vCPU 1
 * always preempts vCPU 1's VTL0, whether VTL0 is halted, spinning or making exits, and whatever
 * happened before (an interrupt delivered while that VTL ran, a masked one).
 * BI_ARG = source | receiver << 2 | before << 4 | target << 6:
 *   source   0: x2APIC IPI (ICR write, in the kernel) from vCPU 0's target VTL
 *            1: an MSI from the host (hypercall WAKE_HOST_MSI, registered by the test:
 *               RDX = vCPU, R8 = vector | VTL << 8; Plane.signal_msi)
 *            2: SendSyntheticClusterIpi from vCPU 0's target VTL (asked by its VTL0 with a
 *               VtlCall: a lower VTL cannot interrupt a higher one)
 *   receiver 0: vCPU 1's VTL0 waits in `cli; check; sti; hlt`   1: spins (pause)
 *            2: makes PORT_NULL exits
 *   before   0: nothing
 *            1: vCPU 1's VTL0 VtlCalls the target VTL, which spins (interrupts on) until a
 *               SendSyntheticClusterIpi V_PRE from vCPU 0's target VTL arrives, takes it there
 *               and returns
 *            2: the target VTL of vCPU 1 keeps TPR = 0x70; vCPU 0's target VTL first sends
 *               V_MASKED (class 5) by SendSyntheticClusterIpi, which must stay pending
 *   target   the VTL the interrupts are for; 0 = the highest.
 * Every VTL >= 1 (both vCPUs): handlers for V_WAKE, V_PRE, V_MASKED, APIC on, publishes its
 * x2APIC ID, initialises the next VTL (VtlCall), vtl_serve. Its V_WAKE handler counts, records
 * the EntryReason and the V_MASKED count, and rings VTL0 of its vCPU (V_DOOR by
 * SendSyntheticClusterIpi) so that a halted VTL0, which a preemption does not wake, wakes.
 * After the wake-up, with before = 2, VTL0 asks the target VTL to lower its TPR (VtlCall), which
 * takes V_MASKED then.
 * Reports (vCPU 1, VTL0): SYNC 1, V_WAKE count (1); SYNC 2, EntryReason at V_WAKE (2);
 *   SYNC 3, V_PRE count (1 with before = 1, else 0); SYNC 4, V_MASKED count at the end (1 with
 *   before = 2, else 0); SYNC 5, V_MASKED count when V_WAKE was taken (0); SYNC 6, the VTL
 *   that took V_WAKE. (vCPU 0, VTL0): SYNC 1, the status of the wake-up send (0). DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_DOOR, 0x40
.set V_MASKED, 0x50
.set V_WAKE, 0x90
.set V_PRE, 0x91
.set MASK_TPR, 0x70
.set WAKE_HOST_MSI, 0x80B1
.set SETTLE_EXITS, 200
.set CMD_SPIN, 1
.set CMD_ICR, 2
.set CMD_TPR0, 3
.set CMD_SYN, 4
.set RECEIVER, 1
.set SENDER, 0

/* VTL_CMD cmd: VtlCall with rbx = command, r12 = target VTL (forwarded up to it). */
.macro VTL_CMD cmd:req
    mov ebx, \cmd
    mov r12, [rip + target]
    xor eax, eax
    call vtl_call
.endm

.text
.globl main
main:
    call parse_arg
    test rsi, rsi
    jnz vtlk_main
    cmp rdi, 2
    jae .Ldone
    call idt_install
    SET_HANDLER V_DOOR, door_handler
    call apic_enable
    call vtl_call                       /* initialise VTL1 (and VTL2) of this vCPU */
    cmp qword ptr gs:[PCPU_VCPU], SENDER
    je sender

/* ---- vCPU 1, VTL0: the receiver --------------------------------------------------------- */
    cmp qword ptr [rip + before], 1
    jne 1f
    VTL_CMD CMD_SPIN                    /* V_PRE is taken by the target VTL while it runs */
1:  mov qword ptr [rip + ready], 1
    mov rax, [rip + receiver]
    cmp rax, 1
    je .Lspin
    cmp rax, 2
    je .Lexits
.Lhalt:
    cli
    cmp qword ptr [rip + wake_count], 0
    jne .Lwoke
    sti
    hlt
    jmp .Lhalt
.Lspin:
    sti
    WAIT_EQ wake_count, 1
    jmp .Lwoke
.Lexits:
    sti
2:  out PORT_NULL, al
    cmp qword ptr [rip + wake_count], 0
    je 2b
.Lwoke:
    sti
    cmp qword ptr [rip + before], 2
    jne 3f
    VTL_CMD CMD_TPR0                    /* the target VTL drops its mask: V_MASKED comes now */
3:  mov qword ptr [rip + woke], 1
    GUEST_SYNC 1, [rip + wake_count]
    GUEST_SYNC 2, [rip + wake_reason]
    GUEST_SYNC 3, [rip + pre_count]
    GUEST_SYNC 4, [rip + masked_count]
    GUEST_SYNC 5, [rip + masked_at_wake]
    GUEST_SYNC 6, [rip + wake_vtl]
.Ldone:
    GUEST_DONE

/* ---- vCPU 0, VTL0: the sender ----------------------------------------------------------- */
sender:
    mov rax, [rip + before]
    cmp rax, 1
    jne 1f
    WAIT_EQ spinning, 1
    mov edi, V_PRE
    call send_synthetic
1:  WAIT_EQ ready, 1
    cmp qword ptr [rip + before], 2
    jne 2f
    mov edi, V_MASKED
    call send_synthetic
2:  mov ebx, SETTLE_EXITS               /* let the receiver settle in its wait (e.g. halt) */
3:  mov edi, HVCALL_PYKVMM_NOP
    xor esi, esi
    xor edx, edx
    call hypercall
    dec ebx
    jnz 3b

    mov rax, [rip + source]
    cmp rax, 1
    je .Lsend_msi
    cmp rax, 2
    je .Lsend_synthetic
    mov rdx, [rip + target]             /* x2APIC: from this vCPU's target VTL */
    mov rdi, RECEIVER * MAX_PLANES
    add rdi, rdx
    lea rax, [rip + apic_ids]
    mov rdi, [rax + rdi * 8]
    mov esi, V_WAKE
    VTL_CMD CMD_ICR
    xor eax, eax
    jmp .Lsent
.Lsend_msi:
    mov edi, WAKE_HOST_MSI
    mov esi, RECEIVER
    mov rdx, [rip + target]
    shl rdx, 8
    or rdx, V_WAKE
    call hypercall
    and eax, 0xffff
    jmp .Lsent
.Lsend_synthetic:
    mov edi, V_WAKE
    call send_synthetic
.Lsent:
    GUEST_SYNC 1, rax
    WAIT_EQ woke, 1
    GUEST_DONE

/* send_synthetic(rdi = vector) -> rax = status: this vCPU's target VTL (VtlCall) sends a
 * SendSyntheticClusterIpi to the target VTL of the receiver. */
send_synthetic:
    push rbx
    push r12
    mov rsi, rdi
    VTL_CMD CMD_SYN
    mov rax, [rip + syn_status]
    pop r12
    pop rbx
    ret

/* parse_arg: BI_ARG and the plane count into source, receiver, before, target. */
parse_arg:
    push rax
    push rcx
    mov rax, gs:[PCPU_BOOT_INFO]
    mov rcx, [rax + BI_ARG]
    mov eax, ecx
    and eax, 3
    mov [rip + source], rax
    mov eax, ecx
    shr eax, 2
    and eax, 3
    mov [rip + receiver], rax
    mov eax, ecx
    shr eax, 4
    and eax, 3
    mov [rip + before], rax
    shr ecx, 6
    and ecx, 3
    jnz 1f
    mov rax, gs:[PCPU_BOOT_INFO]
    mov ecx, [rax + BI_PLANE_COUNT]
    dec ecx
1:  mov [rip + target], rcx
    pop rcx
    pop rax
    ret

door_handler:
    lock inc qword ptr [rip + door_count]
    call apic_eoi
    iretq

/* ---- VTL k >= 1 --------------------------------------------------------------------------- */
vtlk_main:
    call idt_install
    SET_HANDLER V_WAKE, wake_handler
    SET_HANDLER V_PRE, pre_handler
    SET_HANDLER V_MASKED, masked_handler
    call apic_enable
    mov rax, gs:[PCPU_PLANE]
    cmp rax, [rip + target]
    jne 1f
    cmp qword ptr gs:[PCPU_VCPU], RECEIVER
    jne 1f
    cmp qword ptr [rip + before], 2
    jne 1f
    mov edi, MASK_TPR
    call apic_set_tpr
1:  call apic_id
    mov rcx, gs:[PCPU_INDEX]
    lea rdx, [rip + apic_ids]
    mov [rdx + rcx * 8], rax
    mov rax, gs:[PCPU_PLANE]
    inc rax
    mov rcx, gs:[PCPU_BOOT_INFO]
    cmp eax, [rcx + BI_PLANE_COUNT]
    jae 2f
    xor eax, eax
    call vtl_call                       /* initialise the next VTL */
2:  sti
    lea rdi, [rip + vtl_command]
    call vtl_serve                      /* never returns */

/* VtlCall handler: rbx = command, r12 = the VTL it is for (forwarded up until there). */
vtl_command:
    cmp r12, gs:[PCPU_PLANE]
    je 1f
    call vtl_call                       /* rax is 0 here: the VtlCall stub left it so */
    clc
    ret
1:  cmp ebx, CMD_SPIN
    jne 2f
    mov qword ptr [rip + spinning], 1
    WAIT_EQ pre_count, 1
    clc
    ret
2:  cmp ebx, CMD_ICR
    jne 3f
    call apic_send_ipi                  /* rdi = destination, rsi = vector */
    clc
    ret
3:  cmp ebx, CMD_SYN
    jne 5f
    mov edi, esi                        /* the vector */
    xor esi, esi                        /* to its own VTL */
    mov edx, 1 << RECEIVER
    call vtl_send_ipi
    and eax, 0xffff
    mov [rip + syn_status], rax
    clc
    ret
5:  cmp ebx, CMD_TPR0
    jne 4f
    xor edi, edi
    call apic_set_tpr
    WAIT_EQ masked_count, 1
4:  clc
    ret

wake_handler:
    push rax
    push rcx
    push rdi
    push rsi
    push rdx
    call vtl_entry_reason
    mov [rip + wake_reason], rax
    mov rax, [rip + masked_count]
    mov [rip + masked_at_wake], rax
    mov rax, gs:[PCPU_PLANE]
    mov [rip + wake_vtl], rax
    lock inc qword ptr [rip + wake_count]
    call apic_eoi
    mov edi, V_DOOR                     /* ring VTL0 of this vCPU */
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    mov edx, 1
    mov rcx, gs:[PCPU_VCPU]
    shl edx, cl
    call vtl_send_ipi
    pop rdx
    pop rsi
    pop rdi
    pop rcx
    pop rax
    iretq

pre_handler:
    lock inc qword ptr [rip + pre_count]
    call apic_eoi
    iretq

masked_handler:
    lock inc qword ptr [rip + masked_count]
    call apic_eoi
    iretq

.bss
.balign 64
source:         .space 8
receiver:       .space 8
before:         .space 8
target:         .space 8
ready:          .space 8
spinning:       .space 8
woke:           .space 8
wake_count:     .space 8
wake_reason:    .space 8
wake_vtl:       .space 8
pre_count:      .space 8
masked_count:   .space 8
masked_at_wake: .space 8
door_count:     .space 8
syn_status:     .space 8
apic_ids:       .space 8 * MAX_VCPUS * MAX_PLANES
