/*
 * ipi (2 vCPUs): vCPU 0 sends one fixed IPI, vector 0x40, to vCPU 1 through the x2APIC ICR.
 *   vCPU 1: GUEST_SYNC 1, <vector its handler was entered through> (0x40),
 *           GUEST_ASSERT_EQ <handler count>, 1; DONE.
 *   vCPU 0: GUEST_SYNC 1, 0 once vCPU 1 acknowledged; DONE.
 *   Other vCPUs: DONE.
 */
.include "guest.inc"

.set IPI_VECTOR, 0x40

.text
.globl main
main:
    cmp rdi, 1
    je vcpu1_main
    test rdi, rdi
    jz vcpu0_main
    GUEST_DONE

vcpu0_main:
    call apic_enable
    WAIT_EQ ready, 1                 /* vCPU 1 has its IDT, APIC and ID published */
    mov rdi, [rip + target_apic_id]
    mov esi, IPI_VECTOR
    call apic_send_ipi
    WAIT_EQ ack, 1
    GUEST_SYNC 1, 0
    GUEST_DONE

vcpu1_main:
    call idt_install
    SET_HANDLER IPI_VECTOR, ipi_handler
    call apic_enable
    call apic_id
    mov [rip + target_apic_id], rax
    mov qword ptr [rip + ready], 1
.Lwait:
    cli
    cmp qword ptr [rip + irq_count], 0
    jne .Lgot_it
    sti                                 /* the interrupt shadow of sti covers hlt: */
    hlt                                 /* no wakeup can be lost between check and hlt */
    jmp .Lwait
.Lgot_it:
    mov qword ptr [rip + ack], 1
    GUEST_SYNC 1, [rip+seen_vector]
    GUEST_ASSERT_EQ [rip+irq_count], 1, "vCPU 1 should have taken exactly one IPI"
    GUEST_DONE

.globl ipi_handler
ipi_handler:
    /* This gate is installed at IPI_VECTOR only: any other vector would have gone to a
     * default handler (UCALL_ASSERT "unhandled interrupt"). (apic_in_service would read the
     * ISR instead, but the PVM host's LAPIC does not show the vector in service there.) */
    mov qword ptr [rip + seen_vector], IPI_VECTOR
    lock inc qword ptr [rip + irq_count]
    call apic_eoi
    iretq

.bss
.balign 64
ready:          .space 8
ack:            .space 8
target_apic_id: .space 8
irq_count:      .space 8
seen_vector:    .space 8
