/*
 * vtl_bad (1 vCPU, 2 planes, personality vtl): malformed VtlCall/VtlReturn get #UD, and the
 * VMM and the guest carry on.
 * Both VTLs install a #UD handler (ud_handler) that counts per VTL, records the faulting RIP,
 * and resumes at the caller of the hypercall stub: it pops the stub's return address off the
 * interrupted stack into the saved RIP (so it works for any stub layout or transport; the
 * VMM points the faulting RIP at the stub's hypercall instruction).
 * VTL0:
 *   1. generic stub (+0), RCX = 0x10011 (VtlCall with the Fast bit)      -> #UD
 *   2. generic stub (+0), RCX = 0x11 | 1 << 40 (VtlCall with a rep count)  -> #UD
 *   3. VtlCall stub (+0x0F) with RCX = 5 (VTL input 5 ends up in RAX)      -> #UD
 *   4. VtlReturn stub (+0x26) from VTL0                                      -> #UD
 *   5. generic stub (+0), RCX = 0x10012 (VtlReturn with the Fast bit)      -> #UD
 *   then VtlCall with rbx = CMD_BAD; VTL1 (the highest VTL of 2) does:
 *   6. VtlCall (vtl_call) from the top VTL                                   -> #UD in VTL1
 *   7. VtlReturn stub with RCX = 3 (fast + a reserved bit)                   -> #UD in VTL1
 *   8. VtlReturn stub with RCX = 0x100                                        -> #UD in VTL1
 *   and returns normally; 9. a valid VtlCall (rbx = CMD_ECHO, rdx = 0x1234): VTL1 returns
 *   rdx + 1.
 * Each case asserts its VTL's #UD count went up by exactly one and that the #UD's RIP lies
 * in the stub it called (the generic stub below VtlCall's offset, VtlCall's below VtlReturn's,
 * VtlReturn's after it: the offsets VsmCodePageOffsets reports). Then the guest checks the
 * valid VtlCall's answer (0x1235) and the #UDs per VTL (5 in VTL0, 3 in VTL1). Reports: DONE.
 */
.include "guest.inc"
.include "vtl.inc"

.set CMD_BAD, 0xbad
.set CMD_ECHO, 0xec0

/* BAD_BEGIN; <the bad call>; BAD_END lo, hi: check exactly one #UD came, at an offset of the
 * hypercall page in [lo, hi) (the stub called).
 * rbx holds the expected count across the call (the #UD handler resumes after the call). */
.macro BAD_BEGIN
    mov rax, gs:[PCPU_PLANE]
    lea rdx, [rip + ud_count]
    mov rbx, [rdx + rax * 8]
    inc rbx                             /* the count after this case */
.endm

.macro BAD_END lo:req, hi:req
    mov rax, gs:[PCPU_PLANE]
    lea rdx, [rip + ud_count]
    GUEST_ASSERT_EQ rbx, "qword ptr [rdx + rax * 8]", "expected exactly one #UD"
    lea rdx, [rip + ud_rip]
    mov rdx, [rdx + rax * 8]
    sub rdx, HYPERCALL_PAGE_ADDR + \lo
    GUEST_ASSERT_LT rdx, "(\hi)-(\lo)", "the #UD's RIP is in the stub called"
.endm
.set STUB_GENERIC, HCPAGE_HYPERCALL
.set STUB_CALL, HCPAGE_VTL_CALL
.set STUB_RETURN, HCPAGE_VTL_RETURN
.set PAGE_END, 0x1000

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    call idt_install
    SET_HANDLER VEC_UD, ud_handler
    call vtl_call                       /* initialise VTL1 */

    BAD_BEGIN
    mov rcx, 0x10011
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    BAD_END STUB_GENERIC, STUB_CALL
    BAD_BEGIN
    mov rcx, 0x11 | (1 << 40)
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    BAD_END STUB_GENERIC, STUB_CALL
    BAD_BEGIN
    mov ecx, 5
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_CALL
    BAD_END STUB_CALL, STUB_RETURN
    BAD_BEGIN
    xor ecx, ecx
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    BAD_END STUB_RETURN, PAGE_END
    BAD_BEGIN
    mov rcx, 0x10012
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    BAD_END STUB_GENERIC, STUB_CALL

    mov rbx, CMD_BAD
    call vtl_call
    mov rbx, CMD_ECHO
    mov edx, 0x1234
    call vtl_call
    GUEST_ASSERT_EQ rdx, 0x1235, "a valid VtlCall after the bad ones"
    GUEST_ASSERT_EQ [rip + ud_count], 5, "#UDs VTL0 took"
    GUEST_ASSERT_EQ [rip + ud_count + 8], 3, "#UDs VTL1 took"
.Ldone:
    GUEST_DONE

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    SET_HANDLER VEC_UD, ud_handler
    VTL1_SERVE vtl1_call, apic=0

vtl1_call:
    mov rax, CMD_ECHO
    cmp rbx, rax
    jne 1f
    inc rdx
    clc
    ret
1:  mov rax, CMD_BAD
    cmp rbx, rax
    jne 2f
    BAD_BEGIN
    call vtl_call
    BAD_END STUB_CALL, STUB_RETURN
    BAD_BEGIN
    mov ecx, 3
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    BAD_END STUB_RETURN, PAGE_END
    BAD_BEGIN
    mov ecx, 0x100
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    BAD_END STUB_RETURN, PAGE_END
2:  clc
    ret

/* #UD: count, record RIP, resume at the stub's caller. Frame: RIP, CS, RFLAGS, RSP, SS. */
ud_handler:
    push rax
    push rcx
    push rdx
    mov rcx, gs:[PCPU_PLANE]
    lea rdx, [rip + ud_count]
    inc qword ptr [rdx + rcx * 8]
    mov rax, [rsp + 24]                 /* the faulting RIP */
    lea rdx, [rip + ud_rip]
    mov [rdx + rcx * 8], rax
    mov rcx, [rsp + 24 + 24]            /* the interrupted RSP: [RSP] = the stub's return address */
    mov rax, [rcx]
    mov [rsp + 24], rax
    add qword ptr [rsp + 24 + 24], 8
    pop rdx
    pop rcx
    pop rax
    iretq

.bss
.balign 64
ud_count: .space 16
ud_rip:   .space 16
