/* halt_idle: never finishes: halted with interrupts on and nothing to wake it (no LAPIC timer,
 * no IPI); for the timeout report's sti_shadow note (tests/test_mainline.py). */
.include "guest.inc"

.text
.globl main
main:
    sti
1:  hlt
    jmp 1b
