/*
 * hcall_fuzz: issues the hypercalls the host put in a table, for fuzzing the dispatcher.
 * Table at boot-info BI_FREE_START: u64 count, then count entries of
 *   { u64 rcx (control word), u64 rdx, u64 r8, u64 result }.
 * Each call goes through the generic stub (HYPERCALL_PAGE_ADDR + 0); RAX after it is stored
 * in result. A #UD (the documented answer to malformed VTL calls) is caught: the handler
 * returns to the caller of the stub and the result becomes UD_MARK. Every interrupt vector
 * 16..254 has a handler that counts and EOIs, so fuzzed IPIs cannot kill the guest.
 * Plane 1 (when present) installs the same handlers and answers every entry with VtlReturn.
 *   plane 0: GUEST_SYNC 1, <calls made>; GUEST_SYNC 2, <#UDs>; DONE.
 */
.include "guest.inc"

.set UD_MARK, 0xFFFFFFFF00000006
.set ENTRY_SIZE, 32

.text
.globl main
main:
    mov r15, rsi                        /* plane */
    call idt_install
    SET_HANDLER 6, ud_handler
    mov edi, 16
1:  lea rsi, [rip + irq_handler]
    call idt_set_handler
    inc edi
    cmp edi, 255
    jb 1b
    call apic_enable
    sti
    cmp r15, 0
    jne plane_high

    /* Loop state lives in memory: a VtlCall shares every GPR with VTL1, whose code (and
     * first entry through _start) is free to change them. */
    mov rbx, [rdx + BI_FREE_START]      /* rdx: boot info */
    mov rax, [rbx]
    mov [rip + count], rax
    lea rax, [rbx + 8]
    mov [rip + entry], rax
2:  mov rax, [rip + done]
    cmp rax, [rip + count]
    jae 3f
    mov rbx, [rip + entry]
    mov rcx, [rbx + 0]
    mov rdx, [rbx + 8]
    mov r8,  [rbx + 16]
    mov qword ptr [rip + in_call], 1
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    cmp qword ptr [rip + in_call], 2
    jne 4f
    mov rax, UD_MARK
4:  mov qword ptr [rip + in_call], 0
    mov rbx, [rip + entry]
    mov [rbx + 24], rax
    add qword ptr [rip + entry], ENTRY_SIZE
    inc qword ptr [rip + done]
    jmp 2b
3:  GUEST_SYNC 1, [rip + done]
    GUEST_SYNC 2, [rip + ud_count]
    GUEST_DONE

plane_high:
5:  xor edi, edi
    call vtl_return
    jmp 5b

/* #UD: pretend the stub returned (pop its return address into the saved RIP). */
ud_handler:
    push rax
    push rbx
    lock inc qword ptr [rip + ud_count]
    mov qword ptr [rip + in_call], 2
    mov rax, [rsp + 16 + 24]            /* saved RSP of the interrupted context */
    mov rbx, [rax]                      /* the stub's return address */
    mov [rsp + 16 + 0], rbx             /* saved RIP */
    add qword ptr [rsp + 16 + 24], 8    /* saved RSP: as after ret */
    pop rbx
    pop rax
    iretq

irq_handler:
    lock inc qword ptr [rip + irq_count]
    call apic_eoi
    iretq

.data
.balign 8
in_call:   .quad 0
count:     .quad 0
entry:     .quad 0
done:      .quad 0
ud_count:  .quad 0
irq_count: .quad 0
