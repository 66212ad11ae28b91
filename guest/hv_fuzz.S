/*
 * hv_fuzz (--hyperv, 1 vCPU): runs the operations the host put in a table, for fuzzing the
 * Hyper-V personality. Table at boot-info BI_FREE_START: u64 count, then entries of
 *   { u64 kind, a, b, c, result, vector }  kind 0: hypercall RCX=a RDX=b R8=c (through the
 *   page, after GUEST_OS_ID and HYPERCALL are set up); 1: WRMSR a = b; 2: RDMSR a.
 * result = RAX after a hypercall / the value read; vector = the exception taken (#GP 13,
 * #UD 6) or 0. Every interrupt vector 16..254 counts and EOIs, so fuzzed timers, SINTs and
 * IPIs cannot kill the guest. GUEST_SYNC 1, <operations done>; GUEST_SYNC 2, <interrupts>; DONE.
 */
.include "guest.inc"
.include "hv.inc"

.set ENTRY_SIZE, 48

.text
.globl main
main:
    mov r15, rdx
    call idt_install
    call hv_safe_install
    mov edi, 16
1:  lea rsi, [rip + irq_handler]
    call idt_set_handler
    inc edi
    cmp edi, 255
    jb 1b
    call apic_enable
    lea rdi, [rip + hcpage]
    call hv_enable
    lea rsi, [rip + hcpage]             /* the calls go through a copy of the stub: the fuzzed */
    lea rdi, [rip + stub_copy]          /* MSRs move and disable the page (an overlay: its RAM */
    mov ecx, 16                         /* comes back), the copy stays */
    rep movsb
    lea rax, [rip + stub_copy]
    mov [rip + hv_page_of], rax
    sti
    mov rbx, [r15 + BI_FREE_START]
    mov r13, [rbx]                      /* count */
    lea rbx, [rbx + 8]
    xor r12d, r12d
2:  cmp r12, r13
    jae 5f
    mov rax, [rbx]
    cmp rax, 1
    je 3f
    ja 4f
    mov rdi, [rbx + 8]
    mov rsi, [rbx + 16]
    mov rdx, [rbx + 24]
    call hv_call_safe
    mov [rbx + 32], rax
    mov [rbx + 40], rcx
    jmp 6f
3:  mov rdi, [rbx + 8]
    mov rsi, [rbx + 16]
    call wrmsr_safe
    mov [rbx + 40], rax
    jmp 6f
4:  mov rdi, [rbx + 8]
    call rdmsr_safe
    mov [rbx + 32], rdx
    mov [rbx + 40], rax
6:  add rbx, ENTRY_SIZE
    inc r12
    jmp 2b
5:  cli
    GUEST_SYNC 1, r12
    GUEST_SYNC 2, [rip + irq_count]
    GUEST_DONE

irq_handler:
    lock inc qword ptr [rip + irq_count]
    call apic_eoi
    iretq

.bss
.balign 4096
hcpage: .space 4096
irq_count: .space 8
stub_copy: .space 16
