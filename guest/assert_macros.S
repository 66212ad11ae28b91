/*
 * assert_macros: GUEST_ASSERT_NE/LT/BITS. Every assertion below holds (the guest goes on),
 * except the one --arg selects (1: NE, 2: LT, 3: BITS), which must fail with its operands
 * and, without a message, its own text. --arg 0: all hold; SYNC 1, 3 (assertions passed); DONE.
 */
.include "guest.inc"

.text
.globl main
main:
    mov rax, gs:[PCPU_BOOT_INFO]
    mov rbx, [rax + BI_ARG]
    mov r12, 5
    GUEST_ASSERT_NE r12, 4
    GUEST_ASSERT_LT r12, 6
    GUEST_ASSERT_BITS r12, 0b101
    GUEST_ASSERT_EQ r12, 5, "the macros changed r12"
    cmp rbx, 1
    jne 1f
    GUEST_ASSERT_NE r12, 5
1:  cmp rbx, 2
    jne 2f
    GUEST_ASSERT_LT r12, 5
2:  cmp rbx, 3
    jne 3f
    GUEST_ASSERT_BITS r12, 0b110, "r12 lacks bit 1"
3:  GUEST_SYNC 1, 3
    GUEST_DONE
