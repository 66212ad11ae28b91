/* halt_idle: never finishes. vCPUs 0 and 1 halt with interrupts on and nothing to wake them
 * (no LAPIC timer, no IPI); any further vCPU spins with interrupts off, so the timeout report
 * sees halted vCPUs beside one still running. For the timeout report's sti_shadow note
 * (tests/test_mainline.py). rdi = vCPU index (pykvmm boot). */
.include "guest.inc"

.text
.globl main
main:
    cmp rdi, 2
    jae spin
    sti
1:  hlt
    jmp 1b

spin:
    cli
2:  pause
    jmp 2b
