/*
 * bench_switch (any vCPUs, 2+ planes, bare policy `--personality none`; for scripts/bench):
 * every vCPU's plane 0 switches round-robin through planes 1..N-1 with
 * HVCALL_PYKVMM_SWITCH_PLANE, BI_ARG times (0 means 10000); every plane >= 1 resumes the
 * suspended plane 0 at once, forever. One round trip = two plane switches = two hypercalls.
 *   plane 0: GUEST_SYNC 1, <round trips done>; DONE.
 */
.include "guest.inc"

.set BENCH_SWITCH_DEFAULT, 10000
.set RESUME_SUSPENDED, -1

.text
.globl main
main:
    test rsi, rsi
    jnz upper_plane
    mov r12, [rdx + BI_ARG]
    test r12, r12
    jnz 1f
    mov r12d, BENCH_SWITCH_DEFAULT
1:  mov r14d, dword ptr [rdx + BI_PLANE_COUNT]
    cmp r14, 2
    jae 2f
    GUEST_FAIL "bench_switch needs 2 or more planes", r14
2:  xor r13d, r13d                      /* round trips done */
    mov r15d, 1                         /* next target plane */
.globl bench_switch_call
bench_switch_call:
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov rdx, r15
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    test ax, ax                         /* not GUEST_ASSERT_EQ: its pushfq/popfq trap on some */
    jnz switch_failed                   /* hosts and would dominate the loop */
    inc r15
    cmp r15, r14
    jb 3f
    mov r15d, 1
3:  inc r13
    cmp r13, r12
    jb bench_switch_call
    GUEST_SYNC 1, r13
    GUEST_DONE

switch_failed:
    GUEST_FAIL "switch to a higher plane failed", rax

upper_plane:
.globl bench_switch_return
bench_switch_return:
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov rdx, RESUME_SUSPENDED
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    jmp bench_switch_return
