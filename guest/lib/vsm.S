/*
 * vsm.S: TLFS VSM hypercall wrappers for the VSM guests (pykvmm/vmm/vsm/). Memory-form
 * calls through a per-vCPU page (input at +0, output at +2048). Each VTL of a vCPU runs at a
 * different time, so one page per vCPU is enough. Every function preserves every register
 * but rax (the status: bits 15:0 status, 43:32 reps completed) and RFLAGS, unless it says so.
 */
.include "guest.inc"
.include "vtl.inc"
.include "vsm.inc"

.set VSM_OUT, 2048

.text

/* reg = this vCPU's hypercall page (input at +0, output at +VSM_OUT) */
.macro VSM_BUF reg:req
    mov \reg, gs:[PCPU_VCPU]
    shl \reg, 12
    add \reg, OFFSET vsm_buffers
.endm

/* vsm_buffer -> rax = this vCPU's hypercall page, for hand-made calls */
.globl vsm_buffer
.type vsm_buffer, @function
vsm_buffer:
    VSM_BUF rax
    ret
.size vsm_buffer, . - vsm_buffer

/* the header the VP-register and protection calls share: PartitionId SELF, VpIndex SELF
 * (or MapFlags), HV_INPUT_VTL */
.macro VSM_HEADER buf:req, second:req, input_vtl:req
    mov qword ptr [\buf], -1
    mov dword ptr [\buf + 8], \second
    mov dword ptr [\buf + 12], 0
    mov byte ptr [\buf + 12], \input_vtl
.endm

/*
 * vsm_protect(rdi = first GPA (page aligned), rsi = page count (1..254), rdx = HV_MAP_GPA
 * flags, rcx = HV_INPUT_VTL of the target) -> rax = HvCallModifyVtlProtectionMask result.
 */
.globl vsm_protect
.type vsm_protect, @function
vsm_protect:
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    VSM_BUF rbx
    VSM_HEADER rbx, edx, cl
    xor eax, eax
1:  mov rcx, rdi
    shr rcx, 12
    mov [rbx + 16 + rax * 8], rcx
    add rdi, 0x1000
    inc rax
    cmp rax, rsi
    jb 1b
    mov rcx, rsi
    shl rcx, HV_CONTROL_REP_COUNT_SHIFT
    or rcx, HVCALL_MODIFY_VTL_PROTECTION_MASK
    mov rdx, rbx
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret
.size vsm_protect, . - vsm_protect

/*
 * vsm_get_register(rdi = HV_REGISTER_NAME, rsi = HV_INPUT_VTL) -> rax = result,
 * rdx = the value's low 64 bits (rdx is clobbered); of this VP.
 * vsm_get_vp_register: the same with rdx = the VP index.
 */
.globl vsm_get_register
.type vsm_get_register, @function
vsm_get_register:
    mov edx, HV_VP_INDEX_SELF
.globl vsm_get_vp_register
.type vsm_get_vp_register, @function
vsm_get_vp_register:
    push rbx
    push rcx
    push r8
    VSM_BUF rbx
    VSM_HEADER rbx, edx, sil
    mov [rbx + 16], edi
    mov qword ptr [rbx + VSM_OUT], 0
    mov rcx, HVCALL_GET_VP_REGISTERS | 1 << HV_CONTROL_REP_COUNT_SHIFT
    mov rdx, rbx
    lea r8, [rbx + VSM_OUT]
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    mov rdx, [rbx + VSM_OUT]
    pop r8
    pop rcx
    pop rbx
    ret
.size vsm_get_vp_register, . - vsm_get_vp_register
.size vsm_get_register, . - vsm_get_register

/* vsm_set_register(rdi = HV_REGISTER_NAME, rsi = value (low 64 bits), rdx = HV_INPUT_VTL)
 * -> rax = result, for this VP; vsm_set_vp_register: the same with rcx = the VP index. */
.globl vsm_set_register
.type vsm_set_register, @function
vsm_set_register:
    push rcx
    mov ecx, HV_VP_INDEX_SELF
    call vsm_set_vp_register
    pop rcx
    ret
.size vsm_set_register, . - vsm_set_register

.globl vsm_set_vp_register
.type vsm_set_vp_register, @function
vsm_set_vp_register:
    push rbx
    push rcx
    push rdx
    push r8
    VSM_BUF rbx
    VSM_HEADER rbx, ecx, dl
    mov qword ptr [rbx + 16], 0
    mov qword ptr [rbx + 24], 0
    mov [rbx + 16], edi
    mov [rbx + 32], rsi
    mov qword ptr [rbx + 40], 0
    mov rcx, HVCALL_SET_VP_REGISTERS | 1 << HV_CONTROL_REP_COUNT_SHIFT
    mov rdx, rbx
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop r8
    pop rdx
    pop rcx
    pop rbx
    ret
.size vsm_set_vp_register, . - vsm_set_vp_register

/*
 * vsm_translate(rdi = GVA, rsi = control flags, InputVtl in bits 63:56) -> rax = result of
 * HvCallTranslateVirtualAddress, rdx = TranslationResult, rcx = GpaPage (rdx, rcx clobbered),
 * on this VP; vsm_translate_vp: the same with rdx = the VP index.
 */
.globl vsm_translate
.type vsm_translate, @function
vsm_translate:
    mov edx, HV_VP_INDEX_SELF
.globl vsm_translate_vp
.type vsm_translate_vp, @function
vsm_translate_vp:
    push rbx
    push r8
    VSM_BUF rbx
    mov qword ptr [rbx], -1
    mov dword ptr [rbx + 8], edx
    mov dword ptr [rbx + 12], 0
    mov [rbx + 16], rsi
    mov rax, rdi
    shr rax, 12
    mov [rbx + 24], rax
    mov qword ptr [rbx + VSM_OUT], -1
    mov qword ptr [rbx + VSM_OUT + 8], -1
    mov ecx, HVCALL_TRANSLATE_VIRTUAL_ADDRESS
    mov rdx, rbx
    lea r8, [rbx + VSM_OUT]
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    mov rdx, [rbx + VSM_OUT]
    mov rcx, [rbx + VSM_OUT + 8]
    pop r8
    pop rbx
    ret
.size vsm_translate_vp, . - vsm_translate_vp
.size vsm_translate, . - vsm_translate

/*
 * vsm_initial_context(rdi = VTL, rsi = entry RIP, rdx = a 240-byte, 8-aligned HvCallEnableVpVtl
 * input block): fill it for this VP: PartitionId SELF, VpIndex, TargetVtl, and an
 * HV_INITIAL_VP_CONTEXT made of this VTL's own CS..LDTR, GDTR, EFER, CR0, CR3, CR4 (read with
 * HvCallGetVpRegisters), IDTR 0, RIP = rsi, RSP = the top of pykvmm's stack slot for (vCPU,
 * VTL), RFLAGS 2, PAT the reset value, and GS.Base = a per-CPU block for (vCPU, VTL) filled as
 * crt.S fills one (so the new VTL can use the runtime library at once). rax = 0, or the
 * failing GetVpRegisters result.
 */
.globl vsm_initial_context
.type vsm_initial_context, @function
vsm_initial_context:
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r12
    push r13
    mov r12, rdx                        /* the block */
    mov r13, rdi                        /* the VTL */
    mov qword ptr [r12], -1
    mov rax, gs:[PCPU_VCPU]
    mov [r12 + 8], eax
    mov dword ptr [r12 + 12], 0
    mov [r12 + 12], r13b
    mov [r12 + CTX_RIP], rsi
    imul rax, rax, MAX_PLANES
    add rax, r13
    lea rax, [rax + 1]
    imul rax, rax, STACK_SIZE
    add rax, STACK_BASE
    mov [r12 + CTX_RSP], rax
    mov qword ptr [r12 + CTX_RFLAGS], 2
    lea rbx, [rip + vsm_context_regs]
1:  mov edi, [rbx]
    test edi, edi
    jz 2f
    xor esi, esi
    call vsm_get_register
    mov rcx, 1 << 32
    cmp rax, rcx
    jne 3f
    call vsm_buffer
    mov ecx, [rbx + 4]                  /* offset in the block */
    mov rdx, [rax + VSM_OUT]
    mov [r12 + rcx], rdx
    mov rdx, [rax + VSM_OUT + 8]
    mov [r12 + rcx + 8], rdx
    add rbx, 8
    jmp 1b
2:  mov rax, 0x0007040600070406
    mov [r12 + CTX_PAT], rax
    /* the new VTL's per-CPU block */
    mov rbx, gs:[PCPU_VCPU]
    imul rcx, rbx, MAX_PLANES
    add rcx, r13
    imul rdx, rcx, PCPU_SIZE
    lea rax, [rip + pcpu_blocks]
    add rdx, rax
    mov [rdx + PCPU_SELF], rdx
    mov [rdx + PCPU_VCPU], rbx
    mov [rdx + PCPU_PLANE], r13
    mov rax, gs:[PCPU_BOOT_INFO]
    mov [rdx + PCPU_BOOT_INFO], rax
    mov [rdx + PCPU_INDEX], rcx
    shl rcx, 12
    add rcx, [rax + BI_CONTROL_PAGE_BASE]
    mov [rdx + PCPU_CONTROL_PAGE], rcx
    mov [r12 + CTX_GS + 0], rdx         /* GS.Base */
    xor eax, eax
3:  pop r13
    pop r12
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret
.size vsm_initial_context, . - vsm_initial_context

/* vsm_enable_partition_vtl(rdi = VTL) -> rax = HvCallEnablePartitionVtl result (no flags) */
.globl vsm_enable_partition_vtl
.type vsm_enable_partition_vtl, @function
vsm_enable_partition_vtl:
    push rcx
    push rdx
    push r8
    call vsm_buffer
    mov qword ptr [rax], -1
    mov qword ptr [rax + 8], 0
    mov [rax + 8], dil
    mov rdx, rax
    mov ecx, HVCALL_ENABLE_PARTITION_VTL
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop r8
    pop rdx
    pop rcx
    ret
.size vsm_enable_partition_vtl, . - vsm_enable_partition_vtl

/* vsm_enable_vp_vtl(rdx = input block, as vsm_initial_context made it) -> rax = result */
.globl vsm_enable_vp_vtl
.type vsm_enable_vp_vtl, @function
vsm_enable_vp_vtl:
    push rcx
    push r8
    mov ecx, HVCALL_ENABLE_VP_VTL
    xor r8d, r8d
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop r8
    pop rcx
    ret
.size vsm_enable_vp_vtl, . - vsm_enable_vp_vtl

/* vsm_intercept_message -> rax = address of this (vCPU, VTL)'s latest intercept message
 * (pykvmm ABI: the control page, for a VTL without a SynIC message page). */
.globl vsm_intercept_message
.type vsm_intercept_message, @function
vsm_intercept_message:
    mov rax, gs:[PCPU_CONTROL_PAGE]
    add rax, VTL_INTERCEPT_MESSAGE
    ret
.size vsm_intercept_message, . - vsm_intercept_message

/*
 * vsm_skip_intercepted(rdi = message address): the lower VTL resumes after the instruction
 * the memory intercept stopped: RIP = message RIP + InstructionLength (SetVpRegisters on the
 * VTL the message names). rax = result.
 */
.globl vsm_skip_intercepted
.type vsm_skip_intercepted, @function
vsm_skip_intercepted:
    push rdi
    push rsi
    push rdx
    movzx esi, byte ptr [rdi + HV_MSG_PAYLOAD + HV_IH_INSN_LENGTH_CR8]
    and esi, 0xF
    add rsi, [rdi + HV_MSG_PAYLOAD + HV_IH_RIP]
    movzx edx, word ptr [rdi + HV_MSG_PAYLOAD + HV_IH_EXECUTION_STATE]
    shr edx, 7
    and edx, 0xF
    or edx, HV_INPUT_VTL_USE_TARGET
    mov edi, HV_REG_RIP
    call vsm_set_register
    pop rdx
    pop rsi
    pop rdi
    ret
.size vsm_skip_intercepted, . - vsm_skip_intercepted

/*
 * vsm_emulate_ret(rdi = HV_INPUT_VTL of a lower VTL): make that VTL behave as if it executed
 * `ret` (RIP = [RSP], RSP += 8), e.g. after an execute intercept of a `call` into a page it
 * may not run. rax = result of the last call.
 */
.globl vsm_emulate_ret
.type vsm_emulate_ret, @function
vsm_emulate_ret:
    push rdi
    push rsi
    push rdx
    push rbx
    mov rbx, rdi
    mov edi, HV_REG_RSP
    mov rsi, rbx
    call vsm_get_register
    mov rsi, [rdx]                      /* the return address on that VTL's stack */
    add rdx, 8
    push rsi
    mov rsi, rdx
    mov edi, HV_REG_RSP
    mov rdx, rbx
    call vsm_set_register
    pop rsi
    mov edi, HV_REG_RIP
    mov rdx, rbx
    call vsm_set_register
    pop rbx
    pop rdx
    pop rsi
    pop rdi
    ret
.size vsm_emulate_ret, . - vsm_emulate_ret

/*
 * vsm_serve(rdi = intercept handler, rsi = VtlCall handler or 0): the main loop of a higher
 * VTL (as vtl_serve) that also takes secure intercepts; never returns. First returns (fast)
 * to the lower VTL. On an Intercept entry it saves every GPR (they are the lower VTL's: GPRs
 * are shared), calls the intercept handler with rdi = the message, restores them and returns
 * with them unchanged (vtl_return_preserving). VtlCall entries go to the VtlCall handler as
 * in vtl_serve (CF clear: fast return); Interrupt entries return with every GPR unchanged.
 */
.globl vsm_serve
.type vsm_serve, @function
vsm_serve:
    push rdi                            /* [rsp + 8] = intercept handler */
    push rsi                            /* [rsp] = VtlCall handler */
.Lvsm_fast:
    mov ecx, HV_VTL_RETURN_FAST
    call qword ptr [rip + vtl_return_stub]   /* lib/hypercall.S */
.Lvsm_entry:
    push rax
    mov rax, gs:[PCPU_CONTROL_PAGE]
    mov eax, dword ptr [rax + VTL_ENTRY_REASON]
    cmp eax, VTL_ENTRY_INTERCEPT
    je .Lvsm_intercept
    cmp eax, VTL_ENTRY_VTL_CALL
    pop rax
    jne .Lvsm_interrupt
    cmp qword ptr [rsp], 0
    je .Lvsm_fast
    call qword ptr [rsp]
    jnc .Lvsm_fast
    xor ecx, ecx
    call qword ptr [rip + vtl_return_stub]   /* lib/hypercall.S */
    jmp .Lvsm_entry
.Lvsm_intercept:
    pop rax
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    call vsm_intercept_message
    mov rdi, rax
    call qword ptr [rsp + 15 * 8 + 8]
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
.Lvsm_interrupt:
    call vtl_return_preserving
    jmp .Lvsm_entry
.size vsm_serve, . - vsm_serve

.section .rodata
/* (HV_REGISTER_NAME, offset in the EnableVpVtl input) for vsm_initial_context; 0-terminated.
 * The 16-byte values of EFER..CR4 overlap the next slot's first 8 bytes with zeros, which the
 * next entry then writes: keep the order. */
.balign 8
vsm_context_regs:
    .long 0x00060001, CTX_CS
    .long 0x00060003, CTX_DS
    .long 0x00060000, CTX_ES
    .long 0x00060004, CTX_FS
    .long 0x00060005, CTX_GS
    .long 0x00060002, CTX_SS
    .long 0x00060007, CTX_TR
    .long 0x00060006, CTX_LDTR
    .long 0x00070001, CTX_GDTR
    .long 0x00080001, CTX_EFER
    .long 0x00040000, CTX_CR0
    .long 0x00040002, CTX_CR3
    .long 0x00040003, CTX_CR4
    .long 0, 0

.bss
.balign 4096
vsm_buffers:
    .skip 4096 * MAX_VCPUS
