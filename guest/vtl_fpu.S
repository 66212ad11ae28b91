/*
 * vtl_fpu (1 vCPU, 2 planes, personality vtl): x87 and SSE registers are shared state of a
 * VTL switch (TLFS), checked with the guest's own FPU instructions. Needs a host whose KVM
 * runs guest x87/SSE (mainline does; kvm_pvm ends them in an emulation failure, so
 * tests/test_mainline.py probes the host first).
 *   VTL0: xmm0 = XMM_A, st0 = 3.0, VtlCall.
 *   VTL1: reports what it got (0x101 xmm0 low, 0x102 xmm0 high, 0x103 st0 as an integer),
 *         sets xmm1 = XMM_B, st0 = 5.0, VtlReturn (fast).
 *   VTL0: reports 0x11 xmm1 low, 0x12 xmm1 high, 0x13 st0 as an integer, 0x14 xmm0 low
 *         (still XMM_A: VTL1 left xmm0 alone), then DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    call vtl_call                       /* 0: VTL1's first entry */
    fninit
    movdqu xmm0, [rip + xmm_a]
    fild qword ptr [rip + three]
    call vtl_call                       /* 1: the FPU state goes to VTL1 and comes back */
    movq rax, xmm1
    GUEST_SYNC 0x11, rax
    pextrq rax, xmm1, 1
    GUEST_SYNC 0x12, rax
    fistp qword ptr [rip + scratch]
    mov rax, [rip + scratch]
    GUEST_SYNC 0x13, rax
    movq rax, xmm0
    GUEST_SYNC 0x14, rax
.Ldone:
    GUEST_DONE

vtl1_main:
    mov ecx, HV_VTL_RETURN_FAST         /* first entry: nothing to do yet */
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    movq rax, xmm0
    GUEST_SYNC 0x101, rax
    pextrq rax, xmm0, 1
    GUEST_SYNC 0x102, rax
    fistp qword ptr [rip + scratch]
    mov rax, [rip + scratch]
    GUEST_SYNC 0x103, rax
    movdqu xmm1, [rip + xmm_b]
    fild qword ptr [rip + five]
    mov ecx, HV_VTL_RETURN_FAST
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    GUEST_FAIL "VTL1 entered a third time"

.data
.balign 16
xmm_a:   .quad 0xa0a1a2a3a4a5a6a7, 0xa8a9aaabacadaeaf
xmm_b:   .quad 0xb0b1b2b3b4b5b6b7, 0xb8b9babbbcbdbebf
three:   .quad 3
five:    .quad 5
scratch: .quad 0
