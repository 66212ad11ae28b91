/*
 * fault: prints "about to fault" on the console, loads recognisable values, then executes
 * ud2 with no IDT loaded: #UD -> #DF -> triple fault (KVM_EXIT_SHUTDOWN). The VMM should show
 * the registers and the disassembly at RIP (= fault_ud2).
 */
.include "guest.inc"

.text
.globl main
main:
    CONSOLE_PUTS "about to fault\n"
    mov rax, 0xfa17
    mov rbx, 0x1234
    mov rcx, 0xc0ffee
    mov rdx, 0xdeadbeef
.globl fault_ud2
fault_ud2:
    ud2
