/*
 * dbg_planes (2 planes, bare policy: --personality none; any number of vCPUs): plane 0 of
 * every vCPU switches to plane 1 and back `rounds` times (rounds = --arg, at least 1) with
 * HVCALL_PYKVMM_SWITCH_PLANE. Used by the debugging tests (trace, gdb stub).
 *   plane 1: each time it is entered, plane1_work adds 1 to p1_count[vCPU] and stores
 *            0x5a5a0000 + count in p1_mark[vCPU], then switches back (RDX = all-ones:
 *            resume the suspended plane).
 *   plane 0: after the rounds, GUEST_ASSERT_EQ p1_count[vCPU], rounds;
 *            GUEST_SYNC 1, rounds; DONE.
 */
.include "guest.inc"

.text
.globl main
main:
    mov rbx, rdi                        /* vCPU index */
    test rsi, rsi
    jnz plane1_main

/* ---- plane 0 --------------------------------------------------------------------------- */
    mov r12, [rdx + BI_ARG]             /* rounds */
    test r12, r12
    jnz 1f
    mov r12, 1
1:  xor r13d, r13d                      /* rounds done */
.globl plane0_switch
plane0_switch:
    mov edi, HVCALL_PYKVMM_SWITCH_PLANE
    mov esi, 1                          /* RDX = target plane 1 */
    xor edx, edx
    call hypercall
.globl plane0_back
plane0_back:
    and eax, 0xffff
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "PykvmmSwitchPlane to plane 1"
    inc r13
    cmp r13, r12
    jb plane0_switch
    lea rax, [rip + p1_count]
    mov rax, [rax + rbx * 8]
    GUEST_ASSERT_EQ rax, r12, "plane 1 should have run once per round"
    GUEST_SYNC 1, r12
    GUEST_DONE

/* ---- plane 1 --------------------------------------------------------------------------- */
plane1_main:
.globl plane1_work
plane1_work:
    lea rax, [rip + p1_count]
    inc qword ptr [rax + rbx * 8]
    mov rcx, [rax + rbx * 8]
    add rcx, 0x5a5a0000
    lea rax, [rip + p1_mark]
    mov [rax + rbx * 8], rcx
.globl plane1_return
plane1_return:
    mov edi, HVCALL_PYKVMM_SWITCH_PLANE
    mov rsi, -1                         /* RDX = all-ones: back to the suspended plane */
    xor edx, edx
    call hypercall
    jmp plane1_work                     /* entered again on the next round */

.bss
.balign 8
.globl p1_count
p1_count:
    .space MAX_VCPUS * 8
.globl p1_mark
p1_mark:
    .space MAX_VCPUS * 8
