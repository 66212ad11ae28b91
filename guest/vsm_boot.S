/*
 * vsm_boot (1 vCPU, 2 VTLs, --hyperv, --vtl-boot tlfs): VSM brought up the way a Hyper-V
 * guest does it. Only VTL0 runs at reset; it discovers VSM, enables VTL1 for the partition and
 * on its VP with an initial context built from its own registers (read with
 * HvCallGetVpRegisters), and enters it with VtlCall. Every status is reported as SYNC <case>, RAX.
 * VTL0:
 *   0x01 CPUID 0x40000003 EBX bits 16 (AccessVsm) and 17 (AccessVpRegisters): SYNC = EBX >> 16 & 3
 *   0x02 VtlCall with no VTL1 yet -> #UD (SYNC = #UDs seen, 1)
 *   0x03 VsmPartitionStatus -> EnabledVtlSet 1, MaximumVtl 1 (SYNC = value)
 *   0x04 EnableVpVtl before EnablePartitionVtl -> INVALID_VTL_STATE
 *   0x05 EnablePartitionVtl VTL0 -> ACCESS_DENIED; 0x06 VTL2 -> INVALID_PARAMETER;
 *   0x07 VTL1 with EnableMbec -> INVALID_PARAMETER; 0x08 VTL1 -> SUCCESS; 0x09 again -> INVALID_VTL_STATE
 *   0x0a EnableVpVtl VP 7 -> INVALID_VP_INDEX; 0x0b CR0 = 0 -> INVALID_PARAMETER;
 *   0x0c the real one -> SUCCESS; 0x0d again -> INVALID_VTL_STATE
 *   0x0e VsmPartitionConfig of VTL0 (VTL0 has none) -> INVALID_PARAMETER
 *   VtlCall (rbx = 0x1111): VTL1 runs from the context's RIP on its own stack:
 *     0x31 its EntryReason (1, VtlCall) in its control page; 0x32 VsmVpStatus (ActiveVtl 1,
 *     EnabledVtlSet 3 = 0x301); 0x33 rbx as VTL0 left it (0x1111: shared);
 *     0x34 VsmPartitionConfig EnableVtlProtection, default mask rwx -> SUCCESS;
 *     0x35 changing the default mask now -> INVALID_PARAMETER (write-once);
 *     0x36 enables its VP assist page; then VtlReturn (normal) with VtlReturnX64Rax/Rcx =
 *     0xaaaa/0xcccc in that page.
 *   0x10 RAX, 0x11 RCX after the VtlCall (0xaaaa, 0xcccc: from VTL1's VP assist page)
 *   VtlCall again: 0x37 VTL1's EntryReason in its VP assist page (1); fast VtlReturn.
 *   0x12 #UDs in VTL0 in all (1).
 *   VtlCall again: VTL1 enables its SynIC and message page (SINT0 stays masked) and makes
 *   `guarded` --- for VTL0; VTL0's write to it is intercepted: 0x38 VTL1's EntryReason (3,
 *   Intercept), 0x39 the message type in SINT0's slot (HvMessageTypeGpaIntercept), 0x3a its
 *   GPA - `guarded` (0), 0x3b access type (1, write); VTL1 skips the write, frees the slot
 *   and writes EOM; 0x3c `guarded` as VTL1 reads it (0: the write did not land); 0x13 VTL0
 *   went on (1).
 *   0x14 VTL0's GetVpRegisters with its output in `guarded` -> ACCESS_DENIED;
 *   0x15 VTL0's SendSyntheticClusterIpi into VTL1 -> ACCESS_DENIED (a lower VTL cannot
 *   interrupt a higher one); VtlCall: 0x3d `guarded` as VTL1 reads it (0: nothing written);
 *   0x3e VTL1's HvRegisterVpAssistPage - the page (1: enabled). DONE.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"


/* ENABLE_PARTITION vtl, flags -> rax */
.macro ENABLE_PARTITION vtl:req, flags:req
    call vsm_buffer
    mov qword ptr [rax], -1
    mov qword ptr [rax + 8], (\vtl) | (\flags) << 8
    mov rdx, rax
    mov ecx, HVCALL_ENABLE_PARTITION_VTL
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
.endm

/* ENABLE_VP vp: EnableVpVtl(VTL1) with the input block ctx -> rax */
.macro ENABLE_VP vp:req
    mov dword ptr [rip + ctx + 8], \vp
    mov byte ptr [rip + ctx + 12], 1
    lea rdx, [rip + ctx]
    mov ecx, HVCALL_ENABLE_VP_VTL
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
.endm

.text
.globl main
main:
    cmp rdi, 1
    jae .Ldone
    VSM_VTL_INIT
    SET_HANDLER VEC_UD, ud_handler
    mov eax, 0x40000003
    cpuid
    shr ebx, 16
    and ebx, 3
    GUEST_SYNC 0x01, rbx
    call vtl_call
    GUEST_SYNC 0x02, [rip + ud_count]
    mov edi, HV_REG_VSM_PARTITION_STATUS
    xor esi, esi
    call vsm_get_register
    GUEST_SYNC 0x03, rdx

    /* the initial context: VTL0's own segments, tables and control registers (read back with
     * HvCallGetVpRegisters), VTL1's entry, stack and per-CPU block */
    mov edi, 1
    lea rsi, [rip + vtl1_entry]
    lea rdx, [rip + ctx]
    call vsm_initial_context
    GUEST_ASSERT_EQ rax, 0, "vsm_initial_context"
    ENABLE_VP 0
    GUEST_SYNC 0x04, rax
    ENABLE_PARTITION 0, 0
    GUEST_SYNC 0x05, rax
    ENABLE_PARTITION 2, 0
    GUEST_SYNC 0x06, rax
    ENABLE_PARTITION 1, 1
    GUEST_SYNC 0x07, rax
    ENABLE_PARTITION 1, 0
    GUEST_SYNC 0x08, rax
    ENABLE_PARTITION 1, 0
    GUEST_SYNC 0x09, rax
    ENABLE_VP 7
    GUEST_SYNC 0x0a, rax
    mov rbx, [rip + ctx + CTX_CR0]
    mov qword ptr [rip + ctx + CTX_CR0], 0
    ENABLE_VP 0
    GUEST_SYNC 0x0b, rax
    mov [rip + ctx + CTX_CR0], rbx
    ENABLE_VP 0
    GUEST_SYNC 0x0c, rax
    ENABLE_VP 0
    GUEST_SYNC 0x0d, rax
    mov edi, HV_REG_VSM_PARTITION_CONFIG
    mov esi, 1
    xor edx, edx
    call vsm_set_register
    GUEST_SYNC 0x0e, rax

    mov rbx, 0x1111
    call vtl_call
    GUEST_SYNC 0x10, rax
    GUEST_SYNC 0x11, rcx
    call vtl_call
    GUEST_SYNC 0x12, [rip + ud_count]
    call vtl_call                       /* VTL1: SynIC on, `guarded` --- for VTL0 */
    mov qword ptr [rip + guarded], 0x77 /* intercepted, skipped */
    GUEST_SYNC 0x13, 1                  /* VTL0 went on after the skipped write */
    /* a hypercall whose output lands in `guarded`: refused, nothing written */
    call vsm_buffer
    mov qword ptr [rax], -1
    mov dword ptr [rax + 8], HV_VP_INDEX_SELF
    mov dword ptr [rax + 12], 0
    mov dword ptr [rax + 16], HV_REG_RSP
    mov rdx, rax
    lea r8, [rip + guarded]
    mov rcx, HVCALL_GET_VP_REGISTERS | 1 << HV_CONTROL_REP_COUNT_SHIFT
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    GUEST_SYNC 0x14, rax
    /* a synthetic IPI from VTL0 into VTL1 */
    mov edi, 0x40
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    mov edx, 1
    call vtl_send_ipi
    GUEST_SYNC 0x15, rax
    call vtl_call                       /* VTL1 reports `guarded` once more */
.Ldone:
    GUEST_DONE

/* #UD from a VtlCall stub: count it, resume at the stub's caller (pop its return address). */
ud_handler:
    push rax
    push rbx
    inc qword ptr [rip + ud_count]
    mov rax, [rsp + 16 + 24]            /* the interrupted RSP */
    mov rbx, [rax]                      /* the return address the stub's call pushed */
    mov [rsp + 16], rbx                 /* iret RIP */
    add qword ptr [rsp + 16 + 24], 8
    pop rbx
    pop rax
    iretq

/* VTL1 starts here, with the registers of the initial context */
vtl1_entry:
    GUEST_SYNC 0x33, rbx
    VSM_VTL_INIT
    mov rax, gs:[PCPU_CONTROL_PAGE]
    mov eax, [rax + VTL_ENTRY_REASON]
    GUEST_SYNC 0x31, rax
    mov edi, HV_REG_VSM_VP_STATUS
    xor esi, esi
    call vsm_get_register
    GUEST_SYNC 0x32, rdx
    mov edi, HV_REG_VSM_PARTITION_CONFIG
    mov esi, 1 | (HV_MAP_GPA_MASK << 1)
    xor edx, edx
    call vsm_set_register
    GUEST_SYNC 0x34, rax
    mov edi, HV_REG_VSM_PARTITION_CONFIG
    mov esi, 1 | (HV_MAP_GPA_RX << 1)
    xor edx, edx
    call vsm_set_register
    GUEST_SYNC 0x35, rax
    lea rsi, [rip + vtl1_assist]
    or rsi, 1
    mov edi, HV_MSR_VP_ASSIST_PAGE
    call wrmsr_safe
    GUEST_SYNC 0x36, rax
    lea rax, [rip + vtl1_assist]
    mov qword ptr [rax + VTL_RETURN_RAX], 0xaaaa
    mov qword ptr [rax + VTL_RETURN_RCX], 0xcccc
    xor edi, edi
    call vtl_return                     /* normal: VTL0 gets RAX/RCX from the assist page */
    lea rax, [rip + vtl1_assist]
    mov eax, [rax + VTL_ENTRY_REASON]
    GUEST_SYNC 0x37, rax
    mov edi, 1
    call vtl_return
    /* third VtlCall: SynIC with a message page, SINT0 masked (polled), `guarded` --- */
    WRMSR_OK HV_MSR_SCONTROL, 1
    lea rsi, [rip + vtl1_simp]
    or rsi, 1
    WRMSR_OK HV_MSR_SIMP, rsi
    VSM_PROTECT 1, 0, at=guarded
    GUEST_ASSERT_EQ rax, 1 << 32, "ModifyVtlProtectionMask"
    mov edi, 1
    call vtl_return
    /* the intercept: the message is in SINT0's slot of the SynIC message page */
    lea rax, [rip + vtl1_assist]
    mov eax, [rax + VTL_ENTRY_REASON]
    GUEST_SYNC 0x38, rax
    lea rbx, [rip + vtl1_simp]
    mov eax, [rbx + HV_MSG_HEADER_TYPE]
    GUEST_SYNC 0x39, rax
    mov rax, [rbx + HV_MSG_PAYLOAD + HV_MI_GPA]
    lea rcx, [rip + guarded]
    sub rax, rcx
    GUEST_SYNC 0x3a, rax
    movzx eax, byte ptr [rbx + HV_MSG_PAYLOAD + HV_IH_ACCESS_TYPE]
    GUEST_SYNC 0x3b, rax
    GUEST_SYNC 0x3c, [rip + guarded]    /* the write did not land */
    mov rdi, rbx
    call vsm_skip_intercepted
    GUEST_ASSERT_EQ rax, 1 << 32, "SetVpRegisters RIP"
    mov dword ptr [rbx + HV_MSG_HEADER_TYPE], 0 /* free the slot, then EOM */
    WRMSR_OK HV_MSR_EOM, 0
    mov edi, 1
    call vtl_return
    GUEST_SYNC 0x3d, [rip + guarded]    /* still 0: the refused hypercall wrote nothing */
    mov edi, HV_REG_VP_ASSIST_PAGE
    xor esi, esi
    call vsm_get_register
    lea rax, [rip + vtl1_assist]
    sub rdx, rax
    GUEST_SYNC 0x3e, rdx                /* HvRegisterVpAssistPage = the page | enable */
    mov edi, 1
    call vtl_return
    GUEST_FAIL "VTL1 entered a sixth time"

.data
ud_count: .quad 0

.bss
.balign 4096
vtl1_assist:
    .skip 4096
vtl1_simp:
    .skip 4096
guarded:
    .skip 4096
.balign 256
ctx:
    .skip 256
