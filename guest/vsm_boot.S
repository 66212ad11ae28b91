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
 *   0x12 #UDs in VTL0 in all (1). DONE.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set REG_ES, 0x00060000
.set REG_IDTR, 0x00070000
.set REG_GDTR, 0x00070001
.set REG_CR0, 0x00040000
.set REG_CR3, 0x00040002
.set REG_CR4, 0x00040003
.set REG_EFER, 0x00080001
.set REG_VSM_PARTITION_STATUS, 0x000D0004
.set REG_VSM_PARTITION_CONFIG, 0x000D0007
.set CTX, 16                            /* HV_INITIAL_VP_CONTEXT in the EnableVpVtl input */
.set VSM_OUT, 2048

/* SEG_TO_CTX hv_name, ctx_offset: VTL0's 16-byte register value -> the context */
.macro SEG_TO_CTX name:req, off:req
    mov edi, \name
    xor esi, esi
    call vsm_get_register
    GUEST_ASSERT_EQ rax, 1 << 32, "GetVpRegisters"
    call vsm_buffer
    mov rdx, [rax + VSM_OUT]
    mov [rip + ctx + CTX + \off], rdx
    mov rdx, [rax + VSM_OUT + 8]
    mov [rip + ctx + CTX + \off + 8], rdx
.endm

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
    SET_HANDLER VECTOR_UD, ud_handler
    mov eax, 0x40000003
    cpuid
    shr ebx, 16
    and ebx, 3
    GUEST_SYNC 0x01, rbx
    call vtl_call
    GUEST_SYNC 0x02, [rip + ud_count]
    mov edi, REG_VSM_PARTITION_STATUS
    xor esi, esi
    call vsm_get_register
    GUEST_SYNC 0x03, rdx

    /* the initial context: VTL0's segments, tables and control registers, VTL1's RIP/RSP */
    mov qword ptr [rip + ctx], -1
    lea rax, [rip + vtl1_entry]
    mov [rip + ctx + CTX + 0], rax
    mov rax, gs:[PCPU_BOOT_INFO]
    mov rax, gs:[PCPU_VCPU]
    imul rax, rax, MAX_PLANES
    add rax, 2                          /* the top of (vCPU, plane 1)'s stack slot */
    imul rax, rax, STACK_SIZE
    add rax, STACK_BASE
    mov [rip + ctx + CTX + 8], rax
    mov qword ptr [rip + ctx + CTX + 16], 2
    SEG_TO_CTX REG_ES + 1, 24           /* CS */
    SEG_TO_CTX REG_ES + 3, 40           /* DS */
    SEG_TO_CTX REG_ES + 0, 56           /* ES */
    SEG_TO_CTX REG_ES + 4, 72           /* FS */
    SEG_TO_CTX REG_ES + 5, 88           /* GS: its base is patched below */
    SEG_TO_CTX REG_ES + 2, 104          /* SS */
    SEG_TO_CTX REG_ES + 7, 120          /* TR */
    SEG_TO_CTX REG_ES + 6, 136          /* LDTR */
    SEG_TO_CTX REG_GDTR, 168
    SEG_TO_CTX REG_EFER, 184
    SEG_TO_CTX REG_CR0, 192
    SEG_TO_CTX REG_CR3, 200
    SEG_TO_CTX REG_CR4, 208
    mov rax, 0x0007040600070406
    mov [rip + ctx + CTX + 216], rax
    /* VTL1's per-CPU block (as crt.S makes one): its GS base in the context */
    mov rbx, gs:[PCPU_VCPU]
    imul rcx, rbx, MAX_PLANES
    inc rcx                             /* index = vcpu * MAX_PLANES + 1 */
    imul rdx, rcx, PCPU_SIZE
    lea rax, [rip + pcpu_blocks]
    add rdx, rax
    mov [rdx + PCPU_SELF], rdx
    mov [rdx + PCPU_VCPU], rbx
    mov qword ptr [rdx + PCPU_PLANE], 1
    mov rax, gs:[PCPU_BOOT_INFO]
    mov [rdx + PCPU_BOOT_INFO], rax
    mov [rdx + PCPU_INDEX], rcx
    shl rcx, 12
    add rcx, [rax + BI_CONTROL_PAGE_BASE]
    mov [rdx + PCPU_CONTROL_PAGE], rcx
    mov [rip + ctx + CTX + 88], rdx     /* GS.Base */

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
    mov rbx, [rip + ctx + CTX + 192]
    mov qword ptr [rip + ctx + CTX + 192], 0
    ENABLE_VP 0
    GUEST_SYNC 0x0b, rax
    mov [rip + ctx + CTX + 192], rbx
    ENABLE_VP 0
    GUEST_SYNC 0x0c, rax
    ENABLE_VP 0
    GUEST_SYNC 0x0d, rax
    mov edi, REG_VSM_PARTITION_CONFIG
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
    mov edi, REG_VSM_PARTITION_CONFIG
    mov esi, 1 | (HV_MAP_GPA_ALL << 1)
    xor edx, edx
    call vsm_set_register
    GUEST_SYNC 0x34, rax
    mov edi, REG_VSM_PARTITION_CONFIG
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
    GUEST_FAIL "VTL1 entered a third time"

.data
ud_count: .quad 0

.bss
.balign 4096
vtl1_assist:
    .skip 4096
.balign 256
ctx:
    .skip 256
