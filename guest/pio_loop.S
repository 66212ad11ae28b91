/*
 * pio_loop: `out PORT_NULL, al` BI_ARG times (0 means PIO_LOOP_DEFAULT), then DONE.
 * The cheapest possible exit, for benchmarks.
 */
.include "guest.inc"

.set PIO_LOOP_DEFAULT, 1000000

.text
.globl main
main:
    mov rcx, [rdx + BI_ARG]
    test rcx, rcx
    jnz 1f
    mov ecx, PIO_LOOP_DEFAULT
1:  xor eax, eax
.globl pio_loop_out
pio_loop_out:
    out PORT_NULL, al
    dec rcx
    jnz pio_loop_out
    GUEST_DONE
