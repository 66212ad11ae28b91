/*
 * demo (what `pykvmm run` runs with no argument; best with 2 vCPUs and 2 planes, personality
 * vtl): a cross-VTL story told through GUEST_PRINT, within the TLFS rule that a lower VTL can
 * never raise an interrupt in a higher VTL: VTL0 asks its own VTL1 with a VtlCall, and only
 * VTL1 (the secure kernel) sends interrupts to VTL1 of another vCPU.
 *   Each vCPU's VTL0 starts its VTL1 with a VtlCall (first entry, reason VtlCall).
 *   vCPU1's VTL0 then works (spins). vCPU0's VTL0 asks its VTL1 to wake VTL1 on vCPU1 with a
 *   VtlCall; that VTL1 sends HvCallSendSyntheticClusterIpi (vector 0x50, its own VTL) to vCPU1
 *   and returns. VTL1 preempts vCPU1's VTL0 (entry reason Interrupt), answers VTL0 on vCPU0
 *   with vector 0x51 (a higher VTL may interrupt a lower one) and VtlReturns; vCPU1's VTL0
 *   resumes where it was; vCPU0's VTL0 takes the answer.
 * With 1 vCPU, VTL1 of vCPU0 itself takes 0x50 (during the VtlCall) and answers. With 1 plane
 * it says it needs two.
 * On a Hyper-V partition with VSM (--hyperv, --vtl-boot tlfs: only VTL0 runs at reset) it
 * first brings VTL1 up as a VSM guest does: finds VSM in CPUID ("Microsoft Hv", AccessVsm),
 * enables its hypercall page with HV_X64_MSR_HYPERCALL, calls VtlCall/VtlReturn where
 * VsmCodePageOffsets says they are in it, then HvCallEnablePartitionVtl (vCPU0) and
 * HvCallEnableVpVtl with an initial context made of its own registers (each vCPU); VTL1
 * starts at vtl1_tlfs_entry and takes its entry reasons from its VP assist page.
 * Reports: the PRINTs; SYNC 1, 0x51 (the answer vCPU0's VTL0 took); DONE on every vCPU.
 * The guest checks every status and entry reason itself (GUEST_ASSERT_*).
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set HV_VENDOR_EBX, 0x7263694D          /* "Micr" of "Microsoft Hv" */

.set V_HELP, 0x50
.set V_ANSWER, 0x51

/* SAY "VTLn: text": GUEST_PRINT "vCPU<this vCPU>/VTLn: text" (vCPU 0 or 1). Changes RFLAGS. */
.macro SAY text:req
    cmp qword ptr gs:[PCPU_VCPU], 0
    jne .Lsay1\@
    GUEST_PRINT "vCPU0/\text"
    jmp .Lsay_end\@
.Lsay1\@:
    GUEST_PRINT "vCPU1/\text"
.Lsay_end\@:
.endm

.text
.globl main
main:
    mov rax, gs:[PCPU_BOOT_INFO]
    cmp dword ptr [rax + BI_PLANE_COUNT], 2
    jb .Lone_plane
    cmp rsi, 1
    je vtl1_main
    test rsi, rsi
    jnz .Ldone
    cmp rdi, 1
    ja .Ldone
    xor ecx, ecx
    cmp dword ptr [rax + BI_VCPU_COUNT], 2
    setae cl
    mov [rip + helper_vcpu], rcx        /* the vCPU whose VTL1 helps: 1, or 0 if alone */
    test rdi, rdi
    jnz vcpu1

    /* ---- vCPU0/VTL0 ---- */
    call tlfs_enable_vtl1
    SAY "VTL0: hello! starting the secure kernel in VTL1 with a VtlCall"
    call vtl_call
    call idt_install
    SET_HANDLER V_ANSWER, answer_handler
    call apic_enable
    sti
    mov qword ptr [rip + vcpu0_started], 1
    cmp qword ptr [rip + helper_vcpu], 0
    je 1f
    WAIT_EQ vcpu1_working, 1
1:  SAY "VTL0: I may not interrupt VTL1, so I ask my own VTL1 for help with a VtlCall"
    call vtl_call
3:  cli
    cmp qword ptr [rip + answer], 0
    jne 4f
    sti
    hlt
    jmp 3b
4:  sti
    SAY "VTL0: VTL1 answered with interrupt 0x51. The end."
    GUEST_SYNC 1, [rip + answer]
    mov qword ptr [rip + finished], 1
.Ldone:
    GUEST_DONE

.Lone_plane:
    test rdi, rdi
    jnz .Ldone
    GUEST_PRINT "demo: this story needs two planes (run with --planes 2)"
    GUEST_DONE

    /* ---- vCPU1/VTL0 ---- */
vcpu1:
    WAIT_EQ vcpu0_started, 1
    call tlfs_enable_vtl1
    SAY "VTL0: hello! starting the secure kernel in VTL1 with a VtlCall"
    call vtl_call
    SAY "VTL0: working in VTL0 (spinning)"
    mov qword ptr [rip + vcpu1_working], 1
    xor r12d, r12d
1:  inc r12
    pause
    cmp qword ptr [rip + helped], 0
    je 1b
    SAY "VTL0: ...resumed right where VTL1 preempted me"
    WAIT_EQ finished, 1
    GUEST_DONE

/* ---- VSM bring-up on a Hyper-V partition (TLFS "Virtual Secure Mode") ---- */

/* tlfs_enable_vtl1: if this partition is Hyper-V with VSM and VTL1 is not enabled on this VP
 * yet, enable it (see the header). Nothing otherwise. Clobbers rax, rbx, rcx, rdx, rsi, rdi. */
tlfs_enable_vtl1:
    mov eax, HV_CPUID_VENDOR
    cpuid
    cmp ebx, HV_VENDOR_EBX
    jne 9f
    mov eax, HV_CPUID_FEATURES
    cpuid
    test ebx, HV_ACCESS_VSM
    jz 9f
    VSM_VTL_INIT
    mov edi, HV_REG_VSM_VP_STATUS
    xor esi, esi
    call vsm_get_register
    GUEST_ASSERT_EQ rax, 1 << HV_RESULT_REP_SHIFT, "GetVpRegisters(VsmVpStatus)"
    test edx, 1 << (8 + 1)              /* EnabledVtlSet bit 1: VTL1 already runs (pykvmm boot) */
    jnz 9f
    mov edi, HV_REG_VSM_CODE_PAGE_OFFSETS
    xor esi, esi
    call vsm_get_register
    GUEST_ASSERT_EQ rax, 1 << HV_RESULT_REP_SHIFT, "GetVpRegisters(VsmCodePageOffsets)"
    mov edi, HYPERCALL_PAGE_ADDR        /* the page its HV_X64_MSR_HYPERCALL names (VSM_VTL_INIT) */
    mov rsi, rdx
    call vtl_use_code_page_offsets      /* VtlCall/VtlReturn through the stubs it names */
    cmp qword ptr gs:[PCPU_VCPU], 0
    jne 1f
    SAY "VTL0: Hyper-V with VSM (CPUID AccessVsm): HvCallEnablePartitionVtl(VTL1)"
    mov edi, 1
    call vsm_enable_partition_vtl
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "HvCallEnablePartitionVtl(VTL1)"
    mov qword ptr [rip + partition_vtl1], 1
1:  WAIT_EQ partition_vtl1, 1
    SAY "VTL0: HvCallEnableVpVtl(VTL1) with my own registers as its initial context"
    mov rbx, gs:[PCPU_VCPU]
    imul rbx, rbx, ENABLE_VP_VTL_INPUT_SIZE
    lea rdx, [rip + enable_vp_input]
    add rdx, rbx
    mov edi, 1
    lea rsi, [rip + vtl1_tlfs_entry]
    call vsm_initial_context
    GUEST_ASSERT_EQ rax, 0, "vsm_initial_context"
    call vsm_enable_vp_vtl
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "HvCallEnableVpVtl(VTL1)"
9:  ret

/* VTL1's first instruction on a VSM partition (the initial context's RIP): its own IDT and
 * hypercall page, then its VP assist page, a page of its own: from now on the VMM writes its
 * entry reasons there (HV_VP_VTL_CONTROL), and the library reads them there (PCPU_CONTROL_PAGE);
 * then the same secure kernel as in pykvmm's boot. */
vtl1_tlfs_entry:
    VSM_VTL_INIT
    mov rsi, gs:[PCPU_CONTROL_PAGE]     /* before it has a VP assist page: pykvmm's control page */
    mov eax, [rsi + VTL_ENTRY_REASON]
    GUEST_ASSERT_EQ rax, VTL_ENTRY_VTL_CALL, "VTL1's first entry reason"
    mov rsi, gs:[PCPU_VCPU]
    shl rsi, 12
    lea rax, [rip + vp_assist]
    add rsi, rax
    mov gs:[PCPU_CONTROL_PAGE], rsi
    or rsi, HV_PAGE_ENABLE
    mov edi, HV_MSR_VP_ASSIST_PAGE
    call wrmsr_safe
    GUEST_ASSERT_EQ rax, 0, "HV_X64_MSR_VP_ASSIST_PAGE write faulted"
    jmp vtl1_main

/* ---- VTL1 (both vCPUs) ---- */
vtl1_main:
    SAY "VTL1: secure kernel up (entered by VtlCall, entry reason 1); VtlReturn to VTL0"
    call idt_install
    SET_HANDLER V_HELP, help_handler
    VTL1_SERVE ask_helper

/* VTL0's request (a VtlCall on vCPU0): wake VTL1 on the helper vCPU. Returns fast (CF clear)
 * with VTL0's registers as they were (but rax, rcx: the stubs'). */
ask_helper:
    push rdx
    push rsi
    push rdi
    call vtl_entry_reason
    GUEST_ASSERT_EQ rax, VTL_ENTRY_VTL_CALL, "VTL0's request must enter VTL1 by VtlCall"
    cmp qword ptr [rip + helper_vcpu], 0
    je 1f
    SAY "VTL1: VTL0 asked (entry reason 1: VtlCall): SendSyntheticClusterIpi(0x50) to VTL1 on vCPU1"
    jmp 2f
1:  SAY "VTL1: VTL0 asked (entry reason 1: VtlCall): SendSyntheticClusterIpi(0x50) to myself"
2:  mov edi, V_HELP
    xor esi, esi                        /* HV_INPUT_VTL 0: the caller's own VTL */
    mov ecx, [rip + helper_vcpu]
    mov edx, 1
    shl edx, cl
    call vtl_send_ipi
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "SendSyntheticClusterIpi within VTL1"
    pop rdi
    pop rsi
    pop rdx
    clc
    ret

help_handler:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    call vtl_entry_reason
    cmp eax, VTL_ENTRY_INTERRUPT
    jne 1f
    SAY "VTL1: interrupt 0x50 preempted VTL0 (entry reason 2: Interrupt)"
    jmp 2f
1:  SAY "VTL1: interrupt 0x50 arrived while VTL1 ran"
2:  SAY "VTL1: answering VTL0 on vCPU0 with interrupt 0x51, then VtlReturn"
    mov edi, V_ANSWER
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    mov edx, 1
    call vtl_send_ipi
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "SendSyntheticClusterIpi down to VTL0"
    call apic_eoi
    mov qword ptr [rip + helped], 1
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

answer_handler:
    mov qword ptr [rip + answer], V_ANSWER
    call apic_eoi
    iretq

.bss
.balign 4096
vp_assist:     .space 2 * 4096          /* VTL1's VP assist page of vCPU0 and vCPU1 */
.balign 64
enable_vp_input: .space 2 * ENABLE_VP_VTL_INPUT_SIZE
partition_vtl1: .space 8
helper_vcpu:   .space 8
vcpu0_started: .space 8
vcpu1_working: .space 8
helped:        .space 8
answer:        .space 8
finished:      .space 8
