/*
 * hello: every vCPU (and plane) prints "hello from vCPU <n> plane <p>" (hex) on the console,
 * then GUEST_PRINT "hello via ucall", GUEST_SYNC 1, 42, GUEST_SYNC 2, <vCPU index>, DONE.
 */
.include "guest.inc"

.text
.globl main
main:
    mov rbx, rdi                        /* vCPU index */
    mov r12, rsi                        /* plane id */

    lea rdi, [rip + console_lock]       /* keep each vCPU's line whole */
    call spin_lock
    CONSOLE_PUTS "hello from vCPU "
    mov rdi, rbx
    call console_put_hex
    CONSOLE_PUTS " plane "
    mov rdi, r12
    call console_put_hex
    CONSOLE_PUTS "\n"
    lea rdi, [rip + console_lock]
    call spin_unlock

    GUEST_PRINT "hello via ucall"
    GUEST_SYNC 1, 42
    GUEST_SYNC 2, rbx
    GUEST_DONE
