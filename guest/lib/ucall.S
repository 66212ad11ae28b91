/*
 * ucall.S: the guest-to-host channel (as the kernel selftests' ucall). A ucall block (UC_*
 * in abi.py) is built on the stack and its guest-physical address (identity mapped, below
 * 4 GiB) is written with `out PORT_UCALL, eax`. The host reads the block during the exit.
 *
 * Block contents: verb, line, file, msg as given; args[0], args[1] as given;
 * args[2] = return address of the reporting call (the instruction after it, for symbolizing
 * with the ELF); args[3] = 0.
 */
.include "guest.inc"

.set UC_BUF, (UC_SIZE + 15) & ~15

.text

/*
 * __ucall_frame: frame on the stack (pushed by the macros in guest.inc, popped here):
 *   [rsp] ret, +8 verb, +16 line, +24 file, +32 msg, +40 args[0], +48 args[1].
 * Preserves every register and RFLAGS. If verb == UCALL_ASSERT it does not return.
 */
.globl __ucall_frame
.type __ucall_frame, @function
__ucall_frame:
    pushfq
    push rax
    sub rsp, UC_BUF
    .set F, UC_BUF + 16                 /* frame offset from rsp: F+0 = ret */
    mov eax, [rsp + F + 8]
    mov [rsp + UC_VERB], eax
    mov eax, [rsp + F + 16]
    mov [rsp + UC_LINE], eax
    mov rax, [rsp + F + 24]
    mov [rsp + UC_FILE], rax
    mov rax, [rsp + F + 32]
    mov [rsp + UC_MSG], rax
    mov rax, [rsp + F + 40]
    mov [rsp + UC_ARGS + 0], rax
    mov rax, [rsp + F + 48]
    mov [rsp + UC_ARGS + 8], rax
    mov rax, [rsp + F]
    mov [rsp + UC_ARGS + 16], rax
    mov qword ptr [rsp + UC_ARGS + 24], 0
    mov rax, rsp
    out PORT_UCALL, eax
    cmp dword ptr [rsp + UC_VERB], UCALL_ASSERT
    je .Lassert_halt
    add rsp, UC_BUF
    pop rax
    popfq
    ret 48
.Lassert_halt:
    add rsp, UC_BUF
    pop rax                             /* leave the registers as they were for a dump */
    popfq
    jmp halt_forever
.size __ucall_frame, . - __ucall_frame

/*
 * __ucall_assert_eq: same frame; returns (popping it) without an exit if args[0] == args[1],
 * otherwise reports UCALL_ASSERT and halts.
 */
.globl __ucall_assert_eq
.type __ucall_assert_eq, @function
__ucall_assert_eq:
    pushfq
    push rax
    mov rax, [rsp + 16 + 40]
    cmp rax, [rsp + 16 + 48]
    pop rax
    je 1f
    popfq
    jmp __ucall_frame                   /* the stack is as it was on entry */
1:  popfq
    ret 48
.size __ucall_assert_eq, . - __ucall_assert_eq

/*
 * ucall(rdi = verb, rsi = args[0], rdx = args[1], rcx = msg GPA or 0): file = 0, line = 0.
 * Preserves every register and RFLAGS; does not return for UCALL_ASSERT.
 */
.globl ucall
.type ucall, @function
ucall:
    /* Turn [rsp] = ret into the __ucall_frame frame 48 bytes lower, so that its `ret 48`
     * returns to our caller with the stack as the caller expects. */
    sub rsp, 48
    push rax
    mov rax, [rsp + 56]                 /* our return address ... */
    mov [rsp + 8], rax                  /* ... becomes the frame's */
    mov [rsp + 8 + 48], rdx             /* args[1] (over the old return address slot) */
    mov [rsp + 8 + 40], rsi             /* args[0] */
    mov [rsp + 8 + 32], rcx             /* msg */
    mov qword ptr [rsp + 8 + 24], 0     /* file */
    mov qword ptr [rsp + 8 + 16], 0     /* line */
    mov [rsp + 8 + 8], rdi              /* verb */
    pop rax
    jmp __ucall_frame
.size ucall, . - ucall
