/*
 * console.S: debug console on PORT_CONSOLE. Each call is one exit (rep outsb).
 * All functions preserve every register except RFLAGS.
 */
.include "guest.inc"

.text

/* console_puts(rdi = NUL-terminated string) */
.globl console_puts
.type console_puts, @function
console_puts:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    cld
    mov rsi, rdi
    xor eax, eax
    mov rcx, -1
    repne scasb                         /* rcx = -(len + 2) */
    not rcx
    dec rcx                             /* rcx = len */
    mov edx, PORT_CONSOLE
    rep outsb
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret
.size console_puts, . - console_puts

/* console_putc(dil = byte) */
.globl console_putc
.type console_putc, @function
console_putc:
    push rax
    mov eax, edi
    out PORT_CONSOLE, al
    pop rax
    ret
.size console_putc, . - console_putc

/* console_put_hex(rdi = value): lowercase hex, no prefix, no leading zeros ("0" for 0). */
.globl console_put_hex
.type console_put_hex, @function
console_put_hex:
    push rax
    push rcx
    push rdx
    push rsi
    push r8
    sub rsp, 32
    lea rsi, [rsp + 32]                 /* digits are written backwards from here */
    lea r8, [rip + hex_digits]
    mov rax, rdi
1:  mov edx, eax
    and edx, 15
    movzx edx, byte ptr [r8 + rdx]
    dec rsi
    mov [rsi], dl
    shr rax, 4
    jnz 1b
    jmp console_write_digits
.size console_put_hex, . - console_put_hex

/* console_put_dec(rdi = value): unsigned decimal. */
.globl console_put_dec
.type console_put_dec, @function
console_put_dec:
    push rax
    push rcx
    push rdx
    push rsi
    push r8
    sub rsp, 32
    lea rsi, [rsp + 32]
    mov r8d, 10
    mov rax, rdi
1:  xor edx, edx
    div r8
    add dl, '0'
    dec rsi
    mov [rsi], dl
    test rax, rax
    jnz 1b
    /* fall through */
.size console_put_dec, . - console_put_dec

/* Shared tail of put_hex/put_dec: write [rsi, rsp + 32) and unwind their frame. */
.type console_write_digits, @function
console_write_digits:
    cld
    lea rcx, [rsp + 32]
    sub rcx, rsi
    mov edx, PORT_CONSOLE
    rep outsb
    add rsp, 32
    pop r8
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret
.size console_write_digits, . - console_write_digits

.section .rodata
hex_digits: .ascii "0123456789abcdef"

/* console_lock: a spin lock (spin_lock/spin_unlock) guests may take to keep lines whole. */
.bss
.balign 64
.globl console_lock
console_lock: .space 8
.size console_lock, 8
