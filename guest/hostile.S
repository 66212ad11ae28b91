/*
 * hostile: what a careless or hostile guest does to its VMM, one behaviour per --arg.
 * BI_ARG bits 7:0 = mode, bits 63:8 = count (0: forever). Every vCPU does the same.
 *   1 console spam: COUNT lines "spam spam spam spam" on the console, then DONE
 *   2 sync spam: GUEST_SYNC 1, i for i = 1..COUNT, then DONE
 *   3 every port: `out dx, al` to each of the 65,536 ports (except pykvmm's own
 *     0xe8-0xeb and isa-debug-exit's 0xf4), then DONE
 *   4 terminal escapes: a window title, hidden text, a fake summary line, byte 0xff, then DONE
 *   5 outside RAM: maps GPA 0x7fe00000 (past RAM unless --mem is 2 GiB or more), reads it
 *     (SYNC 1, value), writes it and reads again (SYNC 2, value), then DONE
 *   6 hang: cli; hlt (nothing can wake it)
 *   7 wait: sti; hlt (an interrupt could wake it; nothing sends one)
 *   8 escapes in an assertion: GUEST_FAIL with a message hiding text and retitling the window
 */
.include "guest.inc"

.set MODE_CONSOLE, 1
.set MODE_SYNC, 2
.set MODE_PORTS, 3
.set MODE_ESCAPES, 4
.set MODE_OUTSIDE_RAM, 5
.set MODE_CLI_HLT, 6
.set MODE_STI_HLT, 7
.set MODE_FAIL_ESCAPES, 8
.set OUTSIDE_GPA, 0x7fe00000            /* the last 2 MiB page of the first 2 GiB */

.text
.globl main
main:
    mov r12, [rdx + BI_ARG]
    mov r13, r12
    shr r13, 8                          /* count; 0 = forever */
    and r12d, 0xff
    cmp r12d, MODE_CONSOLE
    je console_spam
    cmp r12d, MODE_SYNC
    je sync_spam
    cmp r12d, MODE_PORTS
    je every_port
    cmp r12d, MODE_ESCAPES
    je escapes
    cmp r12d, MODE_OUTSIDE_RAM
    je outside_ram
    cmp r12d, MODE_CLI_HLT
    je cli_hlt
    cmp r12d, MODE_STI_HLT
    je sti_hlt
    cmp r12d, MODE_FAIL_ESCAPES
    je fail_escapes
    GUEST_FAIL "hostile: unknown mode in --arg", r12

console_spam:
    xor ebx, ebx
1:  CONSOLE_PUTS "spam spam spam spam\n"
    inc rbx
    cmp rbx, r13                        /* never equal when count is 0 */
    jne 1b
    GUEST_DONE

sync_spam:
    xor ebx, ebx
1:  inc rbx
    GUEST_SYNC 1, rbx
    cmp rbx, r13
    jne 1b
    GUEST_DONE

every_port:
    xor edx, edx
    xor eax, eax
1:  cmp edx, PORT_UCALL
    jb 2f
    cmp edx, PORT_NULL
    jbe 3f
2:  cmp edx, 0xf4
    je 3f
    out dx, al
3:  inc edx
    cmp edx, 0x10000
    jne 1b
    GUEST_DONE

escapes:
    CONSOLE_PUTS "\033]0;owned\007title set\n"
    CONSOLE_PUTS "\033[8mhidden\033[0m text\n"
    CONSOLE_PUTS "\r--- done after 1.0 ms\n"
    CONSOLE_PUTS "byte \377 end\n"
    GUEST_DONE

outside_ram:
    /* a 2 MiB identity page for OUTSIDE_GPA in the first page directory (0-1 GiB is PD 0,
       1-2 GiB PD 1: the VMM made one PD per GiB of RAM, so PD 1 may be missing: use a PDPT
       entry of our own) */
    lea rdi, [rip + outside_pd]
    mov rax, OUTSIDE_GPA | 0x83         /* present, writable, 2 MiB */
    mov [rdi + 8 * ((OUTSIDE_GPA >> 21) & 511)], rax
    mov rax, rdi
    or rax, 3
    mov [PAGE_TABLE_ADDR + 0x1000 + 8], rax   /* PDPT[1] -> our PD (1-2 GiB) */
    mov rax, cr3
    mov cr3, rax
    mov rbx, OUTSIDE_GPA
    mov rax, [rbx]
    GUEST_SYNC 1, rax
    mov qword ptr [rbx], 0x1234
    mov rax, [rbx]
    GUEST_SYNC 2, rax
    GUEST_DONE

fail_escapes:
    GUEST_FAIL "\033]0;owned\007\033[8mall good"

cli_hlt:
    cli
1:  hlt
    jmp 1b

sti_hlt:
    sti
1:  hlt
    jmp 1b

.bss
.balign 4096
outside_pd:
    .space 4096
