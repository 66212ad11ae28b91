/*
 * planes_switch (2 planes, bare policy `--personality none`): plane 0 asks to switch to
 * plane 1 three times through HVCALL_PYKVMM_SWITCH_PLANE; plane 1 reports each entry and
 * clobbers registers before resuming plane 0, whose own registers must be intact.
 *   plane 1: GUEST_SYNC 1, <entry number 1..3>
 *   plane 0: GUEST_SYNC 2, rbx (0x5EED); GUEST_SYNC 3, <round trips = 3>; DONE.
 * First plane 0 checks the errors: a resume with no plane suspended -> HV_STATUS_INVALID_VTL_STATE
 * (the TLFS value, 0x51), a switch to itself or a plane that does not exist -> INVALID_PARAMETER.
 */
.include "guest.inc"

.set RESUME_SUSPENDED, -1

.text
.globl main
main:
    cmp rsi, 1
    je plane1
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov rdx, RESUME_SUSPENDED
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_VTL_STATE, "resume with nothing suspended"
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    xor edx, edx
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "switch to the running plane"
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov edx, 2
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_PARAMETER, "switch to plane 2 of 2"
    mov rbx, 0x5EED
    xor r12d, r12d
1:  mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov edx, 1
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "switch to plane 1 failed"
    inc r12
    cmp r12, 3
    jb 1b
    GUEST_SYNC 2, rbx
    GUEST_SYNC 3, r12
    GUEST_DONE

plane1:
    xor r13d, r13d
2:  inc r13
    GUEST_SYNC 1, r13
    mov rbx, 0xdead
    mov r12, 0xdead
    mov ecx, HVCALL_PYKVMM_SWITCH_PLANE
    mov rdx, RESUME_SUSPENDED
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    jmp 2b
