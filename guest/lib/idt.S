/*
 * idt.S: one 256-entry IDT per plane (shared by that plane's vCPUs), with default handlers
 * that report UCALL_ASSERT "unhandled exception" (vectors 0-31) / "unhandled interrupt"
 * (32-254) with args[0] = vector, args[1] = RIP of the interrupted/faulting instruction,
 * args[2] = error code (0 if the vector has none), args[3] = CR2; then halt with interrupts
 * off. Vector 0xFF (the APIC spurious vector) just returns.
 */
.include "guest.inc"

.set IDT_TABLE_SIZE, IDT_ENTRIES * IDT_ENTRY_SIZE
.set IDT_STATE_EMPTY, 0
.set IDT_STATE_FILLING, 1
.set IDT_STATE_READY, 2
.set UC_BUF, (UC_SIZE + 15) & ~15

.text

/*
 * idt_install: on the first call in a plane, fill that plane's IDT with the default
 * handlers (other vCPUs of the plane wait for it; later calls never undo idt_set_handler);
 * then lidt it on this vCPU. Preserves every register except RFLAGS.
 */
.globl idt_install
.type idt_install, @function
idt_install:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    mov rcx, gs:[PCPU_PLANE]
    lea rdx, [rip + idt_state]
    lea rdx, [rdx + rcx * 8]
1:  mov rax, [rdx]
    cmp rax, IDT_STATE_READY
    je .Lload
    cmp rax, IDT_STATE_EMPTY
    jne .Lwait
    mov ecx, IDT_STATE_FILLING
    lock cmpxchg [rdx], rcx             /* rax == EMPTY */
    jne 1b
    /* We fill it. */
    xor edi, edi
    lea rsi, [rip + idt_default_stubs]
2:  call idt_set_handler
    add rsi, IDT_STUB_SIZE
    inc edi
    cmp edi, IDT_ENTRIES
    jb 2b
    mov edi, APIC_SPURIOUS_VECTOR
    lea rsi, [rip + idt_spurious]
    call idt_set_handler
    mov qword ptr [rdx], IDT_STATE_READY  /* x86 stores are ordered: the table is visible */
    jmp .Lload
.Lwait:
    pause
    cmp qword ptr [rdx], IDT_STATE_READY
    jne .Lwait
.Lload:
    mov rcx, gs:[PCPU_PLANE]
    shl rcx, 12                         /* IDT_TABLE_SIZE */
    lea rax, [rip + idt_tables]
    add rax, rcx
    sub rsp, 16
    mov word ptr [rsp + 6], IDT_TABLE_SIZE - 1
    mov [rsp + 8], rax
    lidt [rsp + 6]
    add rsp, 16
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret
.size idt_install, . - idt_install

/*
 * idt_set_handler(rdi = vector (low 8 bits), rsi = handler address): a present DPL0 64-bit
 * interrupt gate (IF cleared on entry, IST 0) in the current plane's IDT. Set handlers before
 * the vector can fire. Preserves every register except RFLAGS.
 */
.globl idt_set_handler
.type idt_set_handler, @function
idt_set_handler:
    push rax
    push rcx
    mov rcx, gs:[PCPU_PLANE]
    shl rcx, 12                         /* IDT_TABLE_SIZE */
    lea rax, [rip + idt_tables]
    add rcx, rax
    movzx eax, dil
    shl eax, 4                          /* IDT_ENTRY_SIZE */
    add rcx, rax
    mov rax, rsi
    mov [rcx + 0], ax                   /* offset 15:0 */
    mov word ptr [rcx + 2], SEL_CODE64
    mov word ptr [rcx + 4], 0x8E00      /* IST 0; P=1, DPL=0, type 0xE (interrupt gate) */
    shr rax, 16
    mov [rcx + 6], ax                   /* offset 31:16 */
    shr rax, 16
    mov [rcx + 8], eax                  /* offset 63:32 */
    mov dword ptr [rcx + 12], 0
    pop rcx
    pop rax
    ret
.size idt_set_handler, . - idt_set_handler

/* The spurious-interrupt vector needs no EOI. */
.type idt_spurious, @function
idt_spurious:
    iretq
.size idt_spurious, . - idt_spurious

/*
 * One 16-byte slot per vector: push a 0 error code unless the CPU pushes one, push the
 * vector, jump to the common handler. At most 2 + 5 + 5 = 12 bytes, so the .balign makes
 * the stub of vector v start at idt_default_stubs + v * IDT_STUB_SIZE.
 */
.balign IDT_STUB_SIZE
.globl idt_default_stubs
idt_default_stubs:
.set .Lvec, 0
.rept IDT_ENTRIES
    .balign IDT_STUB_SIZE
    .if (.Lvec == 8) || ((.Lvec >= 10) && (.Lvec <= 14)) || (.Lvec == 17) || (.Lvec == 21) || (.Lvec == 29) || (.Lvec == 30)
    .else
    push 0
    .endif
    push .Lvec
    jmp idt_default_common
    .set .Lvec, .Lvec + 1
.endr
.size idt_default_stubs, . - idt_default_stubs

/* [rsp] vector, +8 error code, +16 RIP, +24 CS, +32 RFLAGS, +40 RSP, +48 SS. */
.type idt_default_common, @function
idt_default_common:
    push rax
    push rcx
    sub rsp, UC_BUF
    .set F, UC_BUF + 16                 /* F+0 = vector */
    mov dword ptr [rsp + UC_VERB], UCALL_ASSERT
    mov dword ptr [rsp + UC_LINE], 0
    mov qword ptr [rsp + UC_FILE], 0
    mov rax, [rsp + F]
    mov [rsp + UC_ARGS + 0], rax
    mov rax, [rsp + F + 16]
    mov [rsp + UC_ARGS + 8], rax
    mov rax, [rsp + F + 8]
    mov [rsp + UC_ARGS + 16], rax
    mov rax, cr2
    mov [rsp + UC_ARGS + 24], rax
    lea rax, [rip + msg_exception]
    lea rcx, [rip + msg_interrupt]
    cmp qword ptr [rsp + F], 32
    cmovae rax, rcx
    mov [rsp + UC_MSG], rax
    mov rax, rsp
    out PORT_UCALL, eax
    add rsp, UC_BUF
    pop rcx                             /* registers as at the fault, for a state dump */
    pop rax
    jmp halt_forever
.size idt_default_common, . - idt_default_common

.section .rodata
msg_exception: .asciz "unhandled exception"
msg_interrupt: .asciz "unhandled interrupt"

.bss
.balign 4096
.globl idt_tables
idt_tables:
    .space MAX_PLANES * IDT_TABLE_SIZE
.size idt_tables, . - idt_tables
.balign 64
idt_state:
    .space MAX_PLANES * 8
.size idt_state, . - idt_state
