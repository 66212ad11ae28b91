/*
 * vsm_overlay (1 vCPU, 2 VTLs, --hyperv, pykvmm boot): overlay pages are per VTL, cover guest
 * RAM for that VTL only, and give the RAM back when they go.
 * VTL0 fills two pages of RAM: page[0] = A, page[8] = B at `page`, hcpage[0] = C at `hcpage`.
 *   VtlCall CMD_ON: VTL1 enables its SynIC with its message page (SIMP) at `page` and makes
 *     `guarded` --- for VTL0: 0x11 page[0] as VTL1 sees it (0: a fresh overlay), it writes
 *     page[0x800] = D.
 *   0x01 page[0] as VTL0 sees it (A: its RAM); VTL0 writes page[8] = E; 0x02 page[0x800] (0:
 *     VTL1's overlay is not VTL0's).
 *   VTL0 makes a memory-form HvCallGetVpRegisters (its own CR3) with its input at page[0x100]
 *     and its output at page[0x200]: the hypervisor reads and writes VTL0's RAM there, not
 *     VTL1's overlay (asserted: the call succeeds and the value is in VTL0's RAM; 0x16, VTL1's
 *     page[0x200] as VTL1 sees it at CMD_OFF, stays 0).
 *   VTL0 writes `guarded`: a secure intercept; its message lands in SINT0's slot of VTL1's
 *     message page: 0x12 the type VTL1 reads there (0x80000001); VTL1 skips the write and frees
 *     the slot. 0x03 page[0] as VTL0 sees it (A: the message is not in VTL0's view).
 *   VtlCall CMD_OFF: VTL1 disables its message page: 0x13 page[0] as VTL1 sees it now (A: the
 *     RAM is back); 0x04 page[0], 0x05 page[8], 0x06 page[0x800] as VTL0 sees them (A, E - its
 *     write while the overlay was there stayed in the RAM - and 0).
 *   VtlCall CMD_HC_ON: VTL1 moves its hypercall page to `hcpage`: 0x14 its first byte there
 *     as VTL1 sees it (0xe6, `out`: the hypercall stub); 0x07 hcpage[0] as VTL0 sees it (C).
 *   VtlCall CMD_HC_OFF: VTL1 moves its hypercall page back: 0x15 hcpage[0] as VTL1 sees it (C).
 * DONE.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set A, 0xA1A1
.set B, 0xB2B2
.set C, 0xC3C3
.set D, 0xD4D4
.set E, 0xE5E5
.set CMD_ON, 0x0e01
.set CMD_OFF, 0x0e02
.set CMD_HC_ON, 0x0e03
.set CMD_HC_OFF, 0x0e04

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    VSM_VTL_INIT
    mov qword ptr [rip + page], A
    mov qword ptr [rip + page + 8], B
    mov qword ptr [rip + hcpage], C
    call vtl_call                       /* VTL1 sets itself up */
    mov rbx, CMD_ON
    call vtl_call
    GUEST_SYNC 0x01, [rip + page]
    mov qword ptr [rip + page + 8], E
    GUEST_SYNC 0x02, [rip + page + 0x800]
    mov qword ptr [rip + page + 0x100], -1                  /* PartitionId: self */
    mov dword ptr [rip + page + 0x108], HV_VP_INDEX_SELF
    mov dword ptr [rip + page + 0x10c], 0                   /* HV_INPUT_VTL: its own */
    mov dword ptr [rip + page + 0x110], HV_REG_CR3
    mov rdi, HVCALL_GET_VP_REGISTERS | 1 << HV_CONTROL_REP_COUNT_SHIFT
    lea rsi, [rip + page + 0x100]
    lea rdx, [rip + page + 0x200]
    call hv_call
    GUEST_ASSERT_EQ rax, 1 << 32, "GetVpRegisters with input and output in RAM VTL1 overlays"
    mov rax, cr3
    GUEST_ASSERT_EQ rax, [rip + page + 0x200], "the output is in VTL0's RAM"
    mov qword ptr [rip + guarded], 0x77 /* intercepted, skipped */
    GUEST_SYNC 0x03, [rip + page]
    mov rbx, CMD_OFF
    call vtl_call
    GUEST_SYNC 0x04, [rip + page]
    GUEST_SYNC 0x05, [rip + page + 8]
    GUEST_SYNC 0x06, [rip + page + 0x800]
    mov rbx, CMD_HC_ON
    call vtl_call
    GUEST_SYNC 0x07, [rip + hcpage]
    mov rbx, CMD_HC_OFF
    call vtl_call
.Ldone:
    GUEST_DONE

vtl1_main:
    VSM_VTL_INIT
    lea rdi, [rip + vtl1_intercept]
    lea rsi, [rip + vtl1_call]
    jmp vsm_serve

/* the intercept's message is in SINT0's slot of this VTL's message page, `page` */
vtl1_intercept:
    lea rdi, [rip + page]
    mov eax, [rdi + HV_MSG_HEADER_TYPE]
    GUEST_SYNC 0x12, rax
    call vsm_skip_intercepted
    GUEST_ASSERT_EQ rax, 1 << 32, "SetVpRegisters RIP"
    mov dword ptr [rip + page + HV_MSG_HEADER_TYPE], 0
    WRMSR_OK HV_MSR_EOM, 0
    ret

vtl1_call:
    cmp rbx, CMD_ON
    jne 1f
    WRMSR_OK HV_MSR_SCONTROL, 1
    lea rsi, [rip + page]
    or rsi, 1
    WRMSR_OK HV_MSR_SIMP, rsi
    GUEST_SYNC 0x11, [rip + page]
    mov qword ptr [rip + page + 0x800], D
    lea rdi, [rip + guarded]
    mov esi, 1
    xor edx, edx                        /* --- */
    mov ecx, HV_INPUT_VTL_USE_TARGET | 0
    call vsm_protect
    GUEST_ASSERT_EQ rax, 1 << 32, "ModifyVtlProtectionMask"
    clc
    ret
1:  cmp rbx, CMD_OFF
    jne 2f
    GUEST_SYNC 0x16, [rip + page + 0x200]
    WRMSR_OK HV_MSR_SIMP, 0
    GUEST_SYNC 0x13, [rip + page]
    clc
    ret
2:  cmp rbx, CMD_HC_ON
    jne 3f
    lea rsi, [rip + hcpage]
    or rsi, 1
    WRMSR_OK HV_MSR_HYPERCALL, rsi
    movzx eax, byte ptr [rip + hcpage]
    GUEST_SYNC 0x14, rax
    clc
    ret
3:  mov esi, HYPERCALL_PAGE_ADDR | 1
    WRMSR_OK HV_MSR_HYPERCALL, rsi
    GUEST_SYNC 0x15, [rip + hcpage]
    clc
    ret

.bss
.balign 4096
page: .skip 4096
hcpage: .skip 4096
guarded: .skip 4096
