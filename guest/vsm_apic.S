/*
 * vsm_apic (1 vCPU, 2 VTLs, personality vtl): the local APIC is per VTL. VTL1 turns its own
 * APIC off (IA32_APIC_BASE: EN and EXTD clear); VTL0's stays on and keeps working.
 * VTL0: IDT with a handler for 0x50, APIC on; VtlCall: VTL1 reads its APIC base (SYNC 0x11,
 * EN|EXTD = 0xc00), disables it, reads it back (SYNC 0x12, 0) and returns. VTL0 then reads
 * its own (SYNC 1, 0xc00), sends itself 0x50 through its x2APIC ICR and takes it (SYNC 2,
 * handler count 1). DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set VECTOR, 0x50

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    call idt_install
    SET_HANDLER VECTOR, handler
    call apic_enable
    call vtl_call
    mov ecx, MSR_IA32_APICBASE
    rdmsr
    and eax, (APICBASE_ENABLE | APICBASE_X2APIC)
    GUEST_SYNC 1, rax
    sti
    call apic_id
    mov rdi, rax
    mov esi, VECTOR
    call apic_send_ipi
    lea rdi, [rip + count]
    mov esi, 1
    call pause_until_eq
    GUEST_SYNC 2, [rip + count]
.Ldone:
    GUEST_DONE

handler:
    inc qword ptr [rip + count]
    call apic_eoi
    iretq

vtl1_main:
    mov ecx, MSR_IA32_APICBASE
    rdmsr
    push rax
    and eax, (APICBASE_ENABLE | APICBASE_X2APIC)
    GUEST_SYNC 0x11, rax
    pop rax
    and eax, ~(APICBASE_ENABLE | APICBASE_X2APIC)
    mov ecx, MSR_IA32_APICBASE
    wrmsr
    rdmsr
    and eax, (APICBASE_ENABLE | APICBASE_X2APIC)
    GUEST_SYNC 0x12, rax
    xor edi, edi
    call vtl_serve

.data
count: .quad 0
