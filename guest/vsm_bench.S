/*
 * vsm_bench (1 vCPU, 2 VTLs, --hyperv, --vtl-boot tlfs; --arg = N | mode << 32, N = 0 for
 * 10000, mode 0 both loops, 1 the VtlCall loop only, 2 the intercept loop only): the TLFS
 * path's costs (scripts/bench row 8). VTL0 enables VTL1 (EnablePartitionVtl, EnableVpVtl),
 * VTL1 enables its VP assist page (entry reasons go there) and makes one page --- for VTL0.
 * Then VTL0 does:
 *   SYNC 1, 0; N VtlCall + fast VtlReturn round trips; SYNC 2, N;
 *   N writes to the protected page, each a secure intercept that VTL1 answers by skipping
 *   the write (HvCallSetVpRegisters RIP) and a fast VtlReturn; SYNC 3, N. DONE.
 * The host times the stretches between the SYNCs.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set DEFAULT_N, 10000

.text
.globl main
main:
    cmp rdi, 1
    jae .Ldone
    VSM_VTL_INIT
    mov rax, gs:[PCPU_BOOT_INFO]
    mov rax, [rax + BI_ARG]
    mov rcx, rax
    shr rcx, 32
    mov [rip + mode], rcx
    mov eax, eax
    test rax, rax
    jnz 1f
    mov eax, DEFAULT_N
1:  mov [rip + rounds], rax
    mov edi, 1
    call vsm_enable_partition_vtl
    GUEST_ASSERT_EQ rax, 0, "EnablePartitionVtl"
    mov edi, 1
    lea rsi, [rip + vtl1_main]
    lea rdx, [rip + enable_block]
    call vsm_initial_context
    GUEST_ASSERT_EQ rax, 0, "initial context"
    lea rdx, [rip + enable_block]
    call vsm_enable_vp_vtl
    GUEST_ASSERT_EQ rax, 0, "EnableVpVtl"
    call vtl_call                       /* VTL1 sets itself up */

    GUEST_SYNC 1, 0
    cmp qword ptr [rip + mode], 2
    je 4f
    mov rax, [rip + rounds]
    mov [rip + left], rax
2:  call vtl_call
    dec qword ptr [rip + left]
    jnz 2b
4:  GUEST_SYNC 2, [rip + rounds]
    cmp qword ptr [rip + mode], 1
    je 5f
    mov rax, [rip + rounds]
    mov [rip + left], rax
3:  mov qword ptr [rip + protected], 1  /* intercepted, skipped */
    dec qword ptr [rip + left]
    jnz 3b
5:  GUEST_SYNC 3, [rip + rounds]
.Ldone:
    GUEST_DONE

vtl1_main:
    VSM_VTL_INIT
    lea rsi, [rip + vtl1_assist]
    or rsi, 1
    mov edi, HV_MSR_VP_ASSIST_PAGE
    call wrmsr_safe
    GUEST_ASSERT_EQ rax, 0, "VP assist page"
    VSM_PROTECT 1, 0, at=protected
    GUEST_ASSERT_EQ rax, 1 << 32, "ModifyVtlProtectionMask"
1:  mov ecx, HV_VTL_RETURN_FAST
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    cmp dword ptr [rip + vtl1_assist + VTL_ENTRY_REASON], VTL_ENTRY_INTERCEPT
    jne 1b
    call vsm_intercept_message
    mov rdi, rax
    call vsm_skip_intercepted
    jmp 1b

.data
rounds: .quad 0
left: .quad 0
mode: .quad 0

.bss
.balign 4096
vtl1_assist:
    .skip 4096
protected:
    .skip 4096
.balign 8
enable_block:
    .skip 240
