/* assert_fail: GUEST_ASSERT_EQ 1, 2, "one is not two" -> UCALL_ASSERT args 1, 2, then halts. */
.include "guest.inc"

.text
.globl main
main:
    GUEST_ASSERT_EQ 1, 2, "one is not two"
    GUEST_DONE                          /* not reached */
