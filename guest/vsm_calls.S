/*
 * vsm_calls (1 vCPU, 2 VTLs, personality vtl): HvCallModifyVtlProtectionMask and
 * HvCallGet/SetVpRegisters answer the TLFS statuses, including the negative cases.
 * Every result is reported as SYNC <case>, RAX (status | reps completed << 32).
 * VTL0:
 *   0x01 Modify, target VTL0 (its own)                  -> ACCESS_DENIED
 *   0x02 Modify, target VTL1 (higher)                   -> ACCESS_DENIED
 *   0x03 GetVpRegisters of VTL1 (higher) from VTL0      -> ACCESS_DENIED
 *   0x04 GetVpRegisters VsmCodePageOffsets of VTL0      -> SUCCESS | 1 rep; SYNC 0x05 = value
 * VTL1 (VtlCall; its GPRs go back to VTL0 as they are, a fast return):
 *   0x11 Modify, MapFlags with a reserved bit (0x10)    -> INVALID_PARAMETER
 *   0x12 Modify, write without read (0x2)               -> INVALID_PARAMETER
 *   0x13 Modify, read-only (0x1: no-execute data)       -> INVALID_PARAMETER (multivm cannot)
 *   0x14 Modify, 3 pages, the third outside RAM         -> INVALID_PARAMETER | 2 reps done
 *   0x15 Modify, another partition's id                 -> INVALID_PARTITION_ID
 *   0x16 Modify, HV_INPUT_VTL reserved bits             -> INVALID_PARAMETER
 *   0x17 Modify, fast form (the page in XMM0)           -> SUCCESS | 1 rep
 *   0x20 Get VTL0's RSP, fast form, XMM output          -> SUCCESS | 1 rep; SYNC 0x21 = [XMM1]
 *        - vtl0_after_call (0)
 *   0x22 Get, fast, 30 names (more than the XMM registers hold) -> INVALID_HYPERCALL_INPUT
 *   0x18 Modify, rep count 0                            -> INVALID_HYPERCALL_INPUT
 *   0x19 Get, unknown register name                     -> INVALID_PARAMETER
 *   0x1a Get, VP index 5 (no such VP)                   -> INVALID_VP_INDEX
 *   0x1b Set VsmCodePageOffsets (read-only)             -> INVALID_PARAMETER
 *   0x1c Get VTL0's RSP (private) -> SUCCESS; SYNC 0x1d = [RSP] - vtl0_after_call (0: it is
 *        VTL0's stack, holding the return address of its vtl_call)
 *   0x1e Set VTL0's R12 (shared) = 0x77 -> SUCCESS; VTL0 sees r12 = 0x77 (SYNC 0x06)
 *   HvCallTranslateVirtualAddress of VTL0's addresses (SYNC case, TranslationResult code;
 *   the status is asserted):
 *   0x40 `page`, validate read+write -> 0 (success); 0x41 its GPA page - page >> 12 (0)
 *   0x42 GVA 512 GiB (no PML4 entry) -> 1 (PageNotPresent)
 *   0x43 after VTL1 made `page` r-x for VTL0: validate write -> 6 (GpaNoWriteAccess);
 *   0x44 validate read -> 0; 0x45 after `page` ---: validate read -> 5 (GpaNoReadAccess)
 *   0x46 a reserved control flag -> status INVALID_PARAMETER (SYNC = the status)
 *   0x07 (VTL0) translating for VTL1 -> status ACCESS_DENIED (SYNC = the status)
 * DONE.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set BUF, 0

/* TRANSLATE case, flags: vsm_translate(rdi) that must succeed as a call; SYNC case = the
 * TranslationResult code. Leaves rcx = the GPA page. */
.macro TRANSLATE case:req, flags:req
    mov rsi, \flags
    call vsm_translate
    GUEST_ASSERT_EQ rax, 0, "TranslateVirtualAddress status"
    mov eax, edx
    GUEST_SYNC \case, rax
.endm

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    VSM_VTL_INIT
    call vtl_call                       /* initialise VTL1 */
    VSM_PROTECT 1, HV_MAP_GPA_RX, at=page
    GUEST_SYNC 0x01, rax
    mov ecx, HV_INPUT_VTL_USE_TARGET | 1
    call vsm_protect
    GUEST_SYNC 0x02, rax
    mov edi, HV_REG_RIP
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    call vsm_get_register
    GUEST_SYNC 0x03, rax
    mov edi, HV_REG_VSM_CODE_PAGE_OFFSETS
    xor esi, esi
    call vsm_get_register
    GUEST_SYNC 0x04, rax
    GUEST_SYNC 0x05, rdx
    lea rdi, [rip + page]
    mov rsi, 1 | (HV_INPUT_VTL_USE_TARGET | 1) << 56
    call vsm_translate
    GUEST_SYNC 0x07, rax
    mov rbx, 1
    call vtl_call
vtl0_after_call:
    GUEST_SYNC 0x06, r12
.Ldone:
    GUEST_DONE

vtl1_main:
    VSM_VTL_INIT
    lea rdi, [rip + vtl1_tests]
    jmp vtl_serve

/* one VtlCall: every negative case; rbx = 0x77 goes back to VTL0 */
vtl1_tests:
    VSM_PROTECT 1, "0x10 | HV_MAP_GPA_READABLE", at=page
    GUEST_SYNC 0x11, rax
    mov edx, HV_MAP_GPA_WRITABLE
    call vsm_protect
    GUEST_SYNC 0x12, rax
    mov edx, HV_MAP_GPA_READABLE
    call vsm_protect
    GUEST_SYNC 0x13, rax
    /* three pages ending past the end of guest memory */
    mov rax, gs:[PCPU_BOOT_INFO]
    mov rdi, [rax + BI_MEM_SIZE]
    sub rdi, 0x2000
    mov esi, 3
    mov edx, HV_MAP_GPA_MASK
    call vsm_protect
    GUEST_SYNC 0x14, rax
    /* a hand-made header for the cases vsm_protect cannot express */
    call vsm_buffer
    mov rbx, rax
    lea rax, [rip + page]
    shr rax, 12
    mov [rbx + 16], rax
    mov qword ptr [rbx], 7              /* PartitionId 7 */
    mov dword ptr [rbx + 8], HV_MAP_GPA_MASK
    mov dword ptr [rbx + 12], HV_INPUT_VTL_USE_TARGET | 0
    mov rcx, HVCALL_MODIFY_VTL_PROTECTION_MASK | 1 << HV_CONTROL_REP_COUNT_SHIFT
    call modify_raw
    GUEST_SYNC 0x15, rax
    mov qword ptr [rbx], -1
    mov dword ptr [rbx + 12], 0x80 | HV_INPUT_VTL_USE_TARGET
    mov rcx, HVCALL_MODIFY_VTL_PROTECTION_MASK | 1 << HV_CONTROL_REP_COUNT_SHIFT
    call modify_raw
    GUEST_SYNC 0x16, rax
    mov dword ptr [rbx + 12], HV_INPUT_VTL_USE_TARGET
    /* fast form: header in RDX/R8, the page number in XMM0 (XMM input) */
    lea r12, [rip + fxbuf]
    fxsave [r12]
    lea rax, [rip + page]
    shr rax, 12
    mov [r12 + 160], rax
    fxrstor [r12]
    mov rcx, HVCALL_MODIFY_VTL_PROTECTION_MASK | HV_CONTROL_FAST | 1 << HV_CONTROL_REP_COUNT_SHIFT
    mov rdx, -1
    mov r8, HV_MAP_GPA_MASK | (HV_INPUT_VTL_USE_TARGET << 32)
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_SYNC 0x17, rax
    /* fast GetVpRegisters with XMM output: VTL0's RSP lands in XMM1 */
    mov dword ptr [r12 + 160], HV_REG_RSP
    fxrstor [r12]
    mov rcx, HVCALL_GET_VP_REGISTERS | HV_CONTROL_FAST | 1 << HV_CONTROL_REP_COUNT_SHIFT
    mov rdx, -1
    mov r8, HV_VP_INDEX_SELF | (HV_INPUT_VTL_USE_TARGET << 32)
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_SYNC 0x20, rax
    fxsave [r12]
    mov rax, [r12 + 176]
    mov rax, [rax]                      /* VTL0's stack: its vtl_call's return address */
    lea rdx, [rip + vtl0_after_call]
    sub rax, rdx
    GUEST_SYNC 0x21, rax
    /* 30 names do not fit the fast registers (16 + 30 * 4 > 112 bytes) */
    mov rcx, HVCALL_GET_VP_REGISTERS | HV_CONTROL_FAST | 30 << HV_CONTROL_REP_COUNT_SHIFT
    mov rdx, -1
    mov r8, HV_VP_INDEX_SELF | (HV_INPUT_VTL_USE_TARGET << 32)
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_SYNC 0x22, rax
    mov rcx, HVCALL_MODIFY_VTL_PROTECTION_MASK
    call modify_raw
    GUEST_SYNC 0x18, rax
    mov edi, 0x1234567
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    call vsm_get_register
    GUEST_SYNC 0x19, rax
    /* VP index 5 */
    call vsm_buffer
    mov rbx, rax
    mov qword ptr [rbx], -1
    mov dword ptr [rbx + 8], 5
    mov dword ptr [rbx + 12], 0
    mov dword ptr [rbx + 16], HV_REG_RIP
    mov rcx, HVCALL_GET_VP_REGISTERS | 1 << HV_CONTROL_REP_COUNT_SHIFT
    mov rdx, rbx
    lea r8, [rbx + 2048]
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_SYNC 0x1a, rax
    mov edi, HV_REG_VSM_CODE_PAGE_OFFSETS
    mov esi, 0
    mov edx, HV_INPUT_VTL_USE_TARGET | 0
    call vsm_set_register
    GUEST_SYNC 0x1b, rax
    mov edi, HV_REG_RSP
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    call vsm_get_register
    GUEST_SYNC 0x1c, rax
    mov rdx, [rdx]                      /* VTL0's stack: the return address of its vtl_call */
    lea rax, [rip + vtl0_after_call]
    sub rdx, rax
    GUEST_SYNC 0x1d, rdx
    mov edi, HV_REG_RAX + 12            /* R12 (shared: the wrapper leaves it alone) */
    mov esi, 0x77
    mov edx, HV_INPUT_VTL_USE_TARGET | 0
    call vsm_set_register
    GUEST_SYNC 0x1e, rax
    /* TranslateVirtualAddress of VTL0's addresses */
    .set TR_VTL0, (HV_INPUT_VTL_USE_TARGET | 0) << 56
    lea rdi, [rip + page]
    TRANSLATE 0x40, TR_VTL0 | 3
    lea rax, [rip + page]
    shr rax, 12
    sub rcx, rax
    GUEST_SYNC 0x41, rcx
    mov rdi, 1 << 39
    TRANSLATE 0x42, TR_VTL0 | 1
    VSM_PROTECT 1, HV_MAP_GPA_RX, at=page
    lea rdi, [rip + page]
    TRANSLATE 0x43, TR_VTL0 | 2
    lea rdi, [rip + page]
    TRANSLATE 0x44, TR_VTL0 | 1
    VSM_PROTECT 1, 0, at=page
    lea rdi, [rip + page]
    TRANSLATE 0x45, TR_VTL0 | 1
    VSM_PROTECT 1, HV_MAP_GPA_MASK, at=page
    lea rdi, [rip + page]
    mov rsi, TR_VTL0 | 1 << 6
    call vsm_translate
    GUEST_SYNC 0x46, rax
    clc
    ret

/* modify_raw(rcx = control, rbx = the input block) -> rax */
modify_raw:
    mov rdx, rbx
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    ret

.bss
.balign 16
fxbuf:
    .skip 512

.data
.balign 4096
page:
    .skip 4096
