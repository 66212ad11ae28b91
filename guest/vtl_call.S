/*
 * vtl_call (1 vCPU, 2 planes, personality vtl): VtlCall / VtlReturn and the shared and private
 * state of a VTL switch. VTL0 makes three VtlCalls:
 *   0. initialise VTL1 (first entry: it starts at _start). VTL1 loads its own CR3 (a copy of
 *      the identity PML4), its own LSTAR, and returns fast.
 *   1. VTL0 sets every GPR but rsp/rax/rcx to A values, CR2, DR0, DR3, CF = 1, LSTAR;
 *      VTL1 checks it sees them (rax = 0 and rcx = 0x11 from the stub), that its own CR3,
 *      LSTAR, RSP and CF = 0 survived, sets B values, CR2, DR1 and returns fast:
 *      VTL0 sees the B values, rax = 1, rcx = 0x12 (as the stub left them) and its own
 *      CR3, LSTAR, RSP and CF = 1.
 *   2. VTL0 sets C values; VTL1 checks them, writes VtlReturnX64Rax/Rcx in ITS control page,
 *      sets rbx = D_rbx and returns normally: VTL0 sees rax/rcx from the control page.
 * The guest checks all of this itself (GUEST_ASSERT_*, the expected values are the TLFS's
 * shared/private split); it reports only DONE (VTL0).
 * No x87/SSE here: on the kvm_pvm host any FPU data instruction ends in an emulation
 * failure; tests/test_vtl.py checks the XSAVE copy from the host side.
 */
.include "guest.inc"
.include "vtl.inc"

.set A_CR2, 0x00000000c2c20a0a
.set B_CR2, 0x00000000c2c20b0b
.set A_DR0, 0x0000000000da0000
.set A_DR3, 0x0000000000da3000
.set B_DR1, 0x0000000000db1000
.set A_LSTAR, 0xffffffff8a000000
.set B_LSTAR, 0xffffffff8b000000
.set RET_RAX, 0x5afe00000000a0a0
.set RET_RCX, 0x5afe00000000c0c0
.set RFLAGS_CF, 1

/* Sentinels X_<reg> for X in A, B, C, D and every GPR but rsp, rax and rcx. */
.set .Ln, 1
.irp r, rbx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
.set A_\r, 0xa000000000000000 + .Ln * 0x0101010101
.set B_\r, 0xb000000000000000 + .Ln * 0x0101010101
.set C_\r, 0xc000000000000000 + .Ln * 0x0101010101
.set D_\r, 0xd000000000000000 + .Ln * 0x0101010101
.set .Ln, .Ln + 1
.endr

.macro SET_ALL set:req
.irp r, rbx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
    mov \r, \set\()_\r
.endr
.endm

.macro CHECK_ALL set:req, what:req
.irp r, rbx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
    GUEST_ASSERT_EQ \r, \set\()_\r, "\what: \r"
.endr
.endm

/* rax = MSR \msr (clobbers rcx, rdx). */
.macro RDMSR64 msr:req
    mov ecx, \msr
    rdmsr
    shl rdx, 32
    or rax, rdx
.endm

.macro WRMSR64 msr:req, value:req
    mov ecx, \msr
    mov rax, \value
    mov rdx, rax
    shr rdx, 32
    wrmsr
.endm

.text
.globl main
main:
    cmp rsi, 1
    je vtl1_main
    test rsi, rsi
    jnz .Lother
    test rdi, rdi
    jnz .Lother

    /* ---- VTL0 -------------------------------------------------------------------------- */
    WRMSR64 MSR_LSTAR, A_LSTAR
    call vtl_call                       /* 0: VTL1 initialises */

    /* 1: shared state to VTL1 and back, fast return */
    mov rax, A_CR2
    mov cr2, rax
    mov rax, A_DR0
    mov dr0, rax
    mov rax, A_DR3
    mov dr3, rax
    mov [rip + vtl0_rsp], rsp
    SET_ALL A
    stc
    call vtl_call
    pushfq
    pop qword ptr [rip + vtl0_flags]
    CHECK_ALL B, "VTL0 after fast return"
    GUEST_ASSERT_EQ rax, HV_VTL_RETURN_FAST, "VTL0: rax after a fast return (the stub's)"
    GUEST_ASSERT_EQ rcx, HVCALL_VTL_RETURN, "VTL0: rcx after a fast return (the stub's)"
    mov rax, cr2
    GUEST_ASSERT_EQ rax, B_CR2, "VTL0: CR2 is shared"
    mov rax, dr1
    GUEST_ASSERT_EQ rax, B_DR1, "VTL0: DR1 is shared"
    mov rax, dr0
    GUEST_ASSERT_EQ rax, A_DR0, "VTL0: DR0 kept"
    GUEST_ASSERT_BITS "qword ptr [rip + vtl0_flags]", RFLAGS_CF, "VTL0: its own RFLAGS.CF (private)"
    mov rax, cr3
    GUEST_ASSERT_EQ rax, PAGE_TABLE_ADDR, "VTL0: its own CR3 (private)"
    RDMSR64 MSR_LSTAR
    GUEST_ASSERT_EQ rax, A_LSTAR, "VTL0: its own LSTAR (private)"
    mov rax, rsp
    GUEST_ASSERT_EQ rax, "qword ptr [rip + vtl0_rsp]", "VTL0: its own RSP (private)"

    /* 2: normal (non-fast) return: RAX/RCX from VTL1's control page */
    SET_ALL C
    call vtl_call
    GUEST_ASSERT_EQ rax, RET_RAX, "VTL0: rax from VTL1's VtlReturnX64Rax (normal return)"
    GUEST_ASSERT_EQ rcx, RET_RCX, "VTL0: rcx from VTL1's VtlReturnX64Rcx (normal return)"
    GUEST_ASSERT_EQ rbx, D_rbx, "VTL0: rbx as VTL1 left it"
    GUEST_ASSERT_EQ rsi, C_rsi, "VTL0: rsi as VTL1 left it"
    GUEST_DONE

.Lother:
    GUEST_DONE

    /* ---- VTL1 -------------------------------------------------------------------------- */
vtl1_main:
    call vtl_entry_reason
    GUEST_ASSERT_EQ rax, VTL_ENTRY_VTL_CALL, "VTL1: first entry reason"
    /* Own page tables: a copy of the VMM's PML4 (same PDPT below it), so CR3 differs. */
    lea rdi, [rip + vtl1_pml4]
    mov esi, PAGE_TABLE_ADDR
    mov ecx, 512
    cld
    rep movsq
    lea rax, [rip + vtl1_pml4]
    mov cr3, rax
    WRMSR64 MSR_LSTAR, B_LSTAR
    mov [rip + vtl1_rsp], rsp
    clc
    mov ecx, HV_VTL_RETURN_FAST
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN

    /* entered by call 1: VTL0's registers */
    pushfq
    pop qword ptr [rip + vtl1_flags]
    CHECK_ALL A, "VTL1 on VtlCall"
    GUEST_ASSERT_EQ rax, 0, "VTL1: rax after the VtlCall stub"
    GUEST_ASSERT_EQ rcx, HVCALL_VTL_CALL, "VTL1: rcx after the VtlCall stub"
    call vtl_entry_reason
    GUEST_ASSERT_EQ rax, VTL_ENTRY_VTL_CALL, "VTL1: entry reason"
    mov rax, cr2
    GUEST_ASSERT_EQ rax, A_CR2, "VTL1: CR2 is shared"
    mov rax, dr0
    GUEST_ASSERT_EQ rax, A_DR0, "VTL1: DR0 is shared"
    mov rax, dr3
    GUEST_ASSERT_EQ rax, A_DR3, "VTL1: DR3 is shared"
    mov rax, cr3
    GUEST_ASSERT_EQ rax, "OFFSET vtl1_pml4", "VTL1: its own CR3 (private)"
    RDMSR64 MSR_LSTAR
    GUEST_ASSERT_EQ rax, B_LSTAR, "VTL1: its own LSTAR (private)"
    mov rax, [rip + vtl1_flags]
    and rax, RFLAGS_CF
    GUEST_ASSERT_EQ rax, 0, "VTL1: its own RFLAGS.CF (private)"
    mov rax, rsp
    GUEST_ASSERT_EQ rax, "qword ptr [rip + vtl1_rsp]", "VTL1: its own RSP (private)"
    /* hand back B values, CR2, DR1; fast return */
    mov rax, B_CR2
    mov cr2, rax
    mov rax, B_DR1
    mov dr1, rax
    SET_ALL B
    clc
    mov ecx, HV_VTL_RETURN_FAST
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN

    /* entered by call 2 */
    CHECK_ALL C, "VTL1 on the second VtlCall"
    call vtl_entry_reason
    GUEST_ASSERT_EQ rax, VTL_ENTRY_VTL_CALL, "VTL1: entry reason of the second call"
    mov rax, gs:[PCPU_CONTROL_PAGE]
    mov rcx, RET_RAX
    mov [rax + VTL_RETURN_RAX], rcx
    mov rcx, RET_RCX
    mov [rax + VTL_RETURN_RCX], rcx
    mov rbx, D_rbx
    mov rsi, C_rsi
    xor ecx, ecx                        /* normal return */
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    GUEST_FAIL "VTL1 entered a third time"

.bss
.balign 4096
vtl1_pml4:  .space 4096
vtl0_rsp:   .space 8
vtl1_rsp:   .space 8
vtl0_flags: .space 8
vtl1_flags: .space 8
