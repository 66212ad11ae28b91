/*
 * apic.S: the local APIC in x2APIC mode (MSRs). The VMM enables x2APIC mode in
 * IA32_APIC_BASE; apic_enable software-enables it (SVR). All functions preserve every
 * register except RFLAGS and their documented result in rax.
 */
.include "guest.inc"

.text

/* apic_enable: SVR = APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR (0x1FF). */
.globl apic_enable
.type apic_enable, @function
apic_enable:
    push rax
    push rcx
    push rdx
    mov ecx, X2APIC_SVR
    mov eax, APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    ret
.size apic_enable, . - apic_enable

/* apic_id -> rax = this LAPIC's x2APIC ID. */
.globl apic_id
.type apic_id, @function
apic_id:
    push rcx
    push rdx
    mov ecx, X2APIC_ID
    rdmsr                               /* zero-extends into rax */
    pop rdx
    pop rcx
    ret
.size apic_id, . - apic_id

/* apic_send_ipi(rdi = destination x2APIC ID, rsi = vector): fixed, physical, edge. */
.globl apic_send_ipi
.type apic_send_ipi, @function
apic_send_ipi:
    push rax
    push rcx
    push rdx
    mov ecx, X2APIC_ICR
    mov edx, edi                        /* ICR[63:32] = destination */
    movzx eax, sil
    or eax, APIC_ICR_LEVEL_ASSERT
    wrmsr
    pop rdx
    pop rcx
    pop rax
    ret
.size apic_send_ipi, . - apic_send_ipi

/* apic_eoi: EOI = 0. */
.globl apic_eoi
.type apic_eoi, @function
apic_eoi:
    push rax
    push rcx
    push rdx
    mov ecx, X2APIC_EOI
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    ret
.size apic_eoi, . - apic_eoi

/* apic_set_tpr(rdi = task priority, low 8 bits). */
.globl apic_set_tpr
.type apic_set_tpr, @function
apic_set_tpr:
    push rax
    push rcx
    push rdx
    mov ecx, X2APIC_TPR
    movzx eax, dil
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    ret
.size apic_set_tpr, . - apic_set_tpr

/* apic_in_service -> rax = highest vector set in the ISR (the one being handled), or -1.
 * Architectural, but on the PVM host (HOST.md) the ISR reads 0 inside a handler. */
.globl apic_in_service
.type apic_in_service, @function
apic_in_service:
    push rcx
    push rdx
    mov ecx, X2APIC_ISR0 + 7
1:  rdmsr
    test eax, eax
    jnz 2f
    dec ecx
    cmp ecx, X2APIC_ISR0
    jae 1b
    mov rax, -1
    jmp 3f
2:  bsr eax, eax
    sub ecx, X2APIC_ISR0
    shl ecx, 5
    add eax, ecx
3:  pop rdx
    pop rcx
    ret
.size apic_in_service, . - apic_in_service
