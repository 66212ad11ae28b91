/* hang: never finishes (interrupts off, tight loop); for --timeout. */
.include "guest.inc"

.text
.globl main
main:
    cli
.globl hang_loop
hang_loop:
    jmp hang_loop
