/*
 * planes_msi (2 planes, bare policy): plane 1 sets up a handler for vector 0x61, reports
 * GUEST_SYNC 1, 0 (ready) and resumes plane 0 with interrupts enabled. Plane 0 spins until
 * the handler ran; the host sends an MSI to plane 1 meanwhile, which must preempt plane 0.
 *   plane 1: GUEST_SYNC 1, 0; after the interrupt: GUEST_SYNC 2, <vector seen>
 *   plane 0: GUEST_SYNC 3, 1; DONE.
 */
.include "guest.inc"

.set MSI_VECTOR, 0x61
.set RESUME_SUSPENDED, -1

.text
.globl main
main:
    cmp rsi, 1
    je plane1
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE     /* let plane 1 initialise */
    mov edx, 1
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
1:  pause
    cmp qword ptr [rip + reported], 0
    je 1b
    GUEST_SYNC 3, 1
    GUEST_DONE

plane1:
    call idt_install
    SET_HANDLER MSI_VECTOR, msi_handler
    call apic_enable
    GUEST_SYNC 1, 0
    sti
2:  mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov rdx, RESUME_SUSPENDED
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    cmp qword ptr [rip + got], 0
    je 2b
    cmp qword ptr [rip + reported], 0
    jne 2b
    GUEST_SYNC 2, [rip + seen_vector]
    mov qword ptr [rip + reported], 1
    jmp 2b

msi_handler:
    mov qword ptr [rip + seen_vector], MSI_VECTOR
    mov qword ptr [rip + got], 1
    call apic_eoi
    iretq

.data
.balign 8
got:         .quad 0
reported:    .quad 0
seen_vector: .quad 0
