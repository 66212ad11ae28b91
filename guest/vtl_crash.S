/*
 * vtl_crash (2 planes, vtl personality): VTL0 calls VTL1, which triple-faults (ud2 with no
 * IDT) while VTL0 waits suspended. The VMM must stop, dump both planes and exit "crashed".
 */
.include "guest.inc"

.text
.globl main
main:
    cmp rsi, 1
    je vtl1
    mov rbx, 0xB0B0
    call vtl_call
    GUEST_FAIL "VTL1 was supposed to crash"

vtl1:
    mov r12, 0x7777
.globl vtl1_fault
vtl1_fault:
    ud2
