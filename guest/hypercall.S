/*
 * hypercall: exercises the hypercall page.
 *   1. direct call, control = HVCALL_PYKVMM_NOP, rdx = 5, r8 = 7:
 *      assert status (rax & 0xffff) == HV_STATUS_SUCCESS, rdx == 12, and that the stub kept
 *      every other register (rbx, rcx, rsi, rdi, rbp, r9-r15).
 *   2. via hypercall(), unknown code 0x7777: assert status == HV_STATUS_INVALID_HYPERCALL_CODE.
 *   GUEST_SYNC 1, 1; DONE.
 */
.include "guest.inc"

.set UNKNOWN_CODE, 0x7777

.macro CHECK_KEPT reg:req, value:req
    GUEST_ASSERT_EQ \reg, \value, "hypercall stub clobbered \reg"
.endm

.text
.globl main
main:
    mov rbx, 0x0b0b0b0b0b0b0b0b
    mov rsi, 0x5151515151515151
    mov rdi, 0xd1d1d1d1d1d1d1d1
    mov rbp, 0xb9b9b9b9b9b9b9b9
    mov r9,  0x0909090909090909
    mov r10, 0x1010101010101010
    mov r11, 0x1111111111111111
    mov r12, 0x1212121212121212
    mov r13, 0x1313131313131313
    mov r14, 0x1414141414141414
    mov r15, 0x1515151515151515
    mov ecx, HVCALL_PYKVMM_NOP
    mov edx, 5
    mov r8d, 7
.globl hypercall_nop_call
hypercall_nop_call:
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    and eax, 0xffff
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "HVCALL_PYKVMM_NOP status"
    GUEST_ASSERT_EQ rdx, 12, "HVCALL_PYKVMM_NOP: rdx = 5 + 7"
    CHECK_KEPT rcx, HVCALL_PYKVMM_NOP
    CHECK_KEPT rbx, 0x0b0b0b0b0b0b0b0b
    CHECK_KEPT rsi, 0x5151515151515151
    CHECK_KEPT rdi, 0xd1d1d1d1d1d1d1d1
    CHECK_KEPT rbp, 0xb9b9b9b9b9b9b9b9
    CHECK_KEPT r9,  0x0909090909090909
    CHECK_KEPT r10, 0x1010101010101010
    CHECK_KEPT r11, 0x1111111111111111
    CHECK_KEPT r12, 0x1212121212121212
    CHECK_KEPT r13, 0x1313131313131313
    CHECK_KEPT r14, 0x1414141414141414
    CHECK_KEPT r15, 0x1515151515151515

    mov edi, UNKNOWN_CODE
    xor esi, esi
    xor edx, edx
    call hypercall
    and eax, 0xffff
    GUEST_ASSERT_EQ rax, HV_STATUS_INVALID_HYPERCALL_CODE, "unknown hypercall code 0x7777"

    GUEST_SYNC 1, 1
    GUEST_DONE
