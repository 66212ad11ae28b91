/*
 * vtl_roundtrip (1 vCPU, 2 planes; vtl or vmpl): BI_ARG VtlCall/VtlReturn round trips
 * (0 means 10000), for measuring. VTL1 runs vtl_serve with no handler (fast returns).
 * Reports: SYNC 1, 0 before the loop; SYNC 2, <round trips> after it (time between them on
 * the host: trace events); DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set DEFAULT_N, 10000

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    mov rax, gs:[PCPU_BOOT_INFO]
    mov rbx, [rax + BI_ARG]
    test rbx, rbx
    jnz 1f
    mov ebx, DEFAULT_N
1:  mov [rip + rounds], rbx
    call vtl_call                       /* initialise VTL1 (first entry) */
    GUEST_SYNC 1, 0
    mov rbx, [rip + rounds]
2:  call vtl_call
    dec qword ptr [rip + rounds]
    jnz 2b
    mov rax, gs:[PCPU_BOOT_INFO]
    mov rbx, [rax + BI_ARG]
    GUEST_SYNC 2, rbx
.Ldone:
    GUEST_DONE

vtl1_main:
    xor edi, edi
    call vtl_serve                      /* never returns */

.bss
.balign 8
rounds: .space 8
