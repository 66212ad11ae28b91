/*
 * vtl.S: helpers for guests of the VTL personality (pykvmm/vmm/vtl.py). A higher VTL's
 * registers are shared with the lower one (RAX..R15 but RSP, CR2, DR0-3, x87/SSE/AVX): after
 * every switch each VTL sees the GPRs the other left. RIP, RSP, RFLAGS, CR0/3/4, the IDT,
 * GS base and the LAPIC are each VTL's own.
 */
.include "guest.inc"
.include "vtl.inc"


.text

/* vtl_entry_reason -> rax = this (vCPU, plane)'s EntryReason (1 VtlCall, 2 Interrupt). */
.globl vtl_entry_reason
.type vtl_entry_reason, @function
vtl_entry_reason:
    mov rax, gs:[PCPU_CONTROL_PAGE]
    mov eax, dword ptr [rax + VTL_ENTRY_REASON]
    ret
.size vtl_entry_reason, . - vtl_entry_reason

/*
 * vtl_return_preserving: VtlReturn that hands the lower VTL every GPR as it is now (but rsp):
 * RAX and RCX go through this VTL's VtlReturnX64Rax/Rcx (a normal, non-fast return), so the
 * stub clobbering them does not matter. Use it after an Interrupt entry, so that the lower VTL
 * continues exactly where it was preempted. Returns when this VTL is entered again, with the
 * GPRs the lower VTL left then. Changes RFLAGS (private to this VTL).
 */
.globl vtl_return_preserving
.type vtl_return_preserving, @function
vtl_return_preserving:
    push rdx
    mov rdx, gs:[PCPU_CONTROL_PAGE]
    mov [rdx + VTL_RETURN_RAX], rax
    mov [rdx + VTL_RETURN_RCX], rcx
    pop rdx
    xor ecx, ecx                        /* VTL input 0: normal return */
    call qword ptr [rip + vtl_return_stub]   /* lib/hypercall.S */
    ret
.size vtl_return_preserving, . - vtl_return_preserving

/*
 * vtl_serve(rdi = VtlCall handler, or 0): the main loop of a higher VTL; never returns. Run it
 * with this VTL's IDT, APIC and handlers set up and interrupts enabled (sti).
 * It returns (fast) to the lower VTL; then, each time this VTL is entered:
 *  - EntryReason VtlCall: `call`s the handler with every GPR as the caller left them (rax = 0,
 *    rcx = 0x11 from the VtlCall stub) on this VTL's stack. The GPRs the handler returns with go
 *    back to the caller; it returns with CF clear for a fast return (the caller then sees
 *    rax = 1, rcx = 0x12, as the stub left them) or CF set for a normal one (rax and rcx from
 *    VtlReturnX64Rax/Rcx, which the handler writes). With no handler: a fast return.
 *  - anything else (Interrupt): the interrupt was taken by this VTL's IDT handler as soon as
 *    the VTL ran (interrupts are on); return with every GPR unchanged (vtl_return_preserving).
 */
.globl vtl_serve
.type vtl_serve, @function
vtl_serve:
    push rdi                            /* [rsp] = the VtlCall handler */
.Lserve_fast:
    mov ecx, HV_VTL_RETURN_FAST
    call qword ptr [rip + vtl_return_stub]   /* lib/hypercall.S */
.Lserve_entry:
    push rax
    mov rax, gs:[PCPU_CONTROL_PAGE]
    cmp dword ptr [rax + VTL_ENTRY_REASON], VTL_ENTRY_VTL_CALL
    pop rax
    jne .Lserve_interrupt
    cmp qword ptr [rsp], 0
    je .Lserve_fast
    call qword ptr [rsp]
    jnc .Lserve_fast
    xor ecx, ecx                        /* normal return */
    call qword ptr [rip + vtl_return_stub]   /* lib/hypercall.S */
    jmp .Lserve_entry
.Lserve_interrupt:
    call vtl_return_preserving
    jmp .Lserve_entry
.size vtl_serve, . - vtl_serve

/*
 * vtl_send_ipi(rdi = vector, rsi = HV_INPUT_VTL byte (HV_INPUT_VTL_USE_TARGET | vtl, or 0 for
 * the caller's own VTL), rdx = processor mask) -> rax = status of HvCallSendSyntheticClusterIpi
 * (fast form). Preserves every other register.
 */
.globl vtl_send_ipi
.type vtl_send_ipi, @function
vtl_send_ipi:
    push rcx
    push rdx
    push r8
    mov r8, rdx                         /* R8 = processor mask */
    movzx edx, sil
    shl rdx, 32                         /* TargetVtl @4 */
    mov eax, edi
    or rdx, rax                         /* Vector @0 */
    mov ecx, HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop r8
    pop rdx
    pop rcx
    ret
.size vtl_send_ipi, . - vtl_send_ipi
