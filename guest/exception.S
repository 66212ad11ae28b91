/*
 * exception: installs the default IDT, then ud2. The default handler reports
 * UCALL_ASSERT "unhandled exception" with args[0] = 6 (#UD), args[1] = RIP of the ud2
 * (symbol exception_ud2), args[2] = 0 (no error code), args[3] = CR2; then halts.
 */
.include "guest.inc"

.text
.globl main
main:
    call idt_install
.globl exception_ud2
exception_ud2:
    ud2
    GUEST_FAIL "ud2 did not fault"
