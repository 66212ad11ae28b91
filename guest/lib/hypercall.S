/*
 * hypercall.S: calls into the hypercall page the VMM fills (Hyper-V offsets and register
 * convention: RCX = control word, RDX/R8 = inputs, RAX = status on return).
 */
.include "guest.inc"

.text

/*
 * hypercall(rdi = control word, rsi = input 1, rdx = input 2) -> rax = status (Hyper-V
 * result value: bits 15:0 status), rdx = RDX after the call (fast output).
 * Preserves every other register (rcx and r8 included); clobbers RFLAGS.
 */
.globl hypercall
.type hypercall, @function
hypercall:
    push rcx
    push r8
    mov rcx, rdi
    mov r8, rdx
    mov rdx, rsi
    call HYPERCALL_PAGE_ADDR + HCPAGE_HYPERCALL
    pop r8
    pop rcx
    ret
.size hypercall, . - hypercall

/*
 * vtl_call: RCX = 0, then the VTL-call stub (a plane switch). Touches nothing else itself:
 * the VMM copies the shared registers across the switch, so on return every GPR except rsp
 * is what the VMM set (Hyper-V: RAX/RCX from the control page's VTL_RETURN_RAX/RCX unless
 * the return was fast). Returns to the caller through the stub's ret.
 */
.globl vtl_call
.type vtl_call, @function
vtl_call:
    mov ecx, 0
    jmp qword ptr [rip + vtl_call_stub]
.size vtl_call, . - vtl_call

/* vtl_return(rdi = 0 normal / 1 fast): RCX = rdi, then the VTL-return stub. As vtl_call. */
.globl vtl_return
.type vtl_return, @function
vtl_return:
    mov rcx, rdi
    jmp qword ptr [rip + vtl_return_stub]
.size vtl_return, . - vtl_return

/*
 * vtl_use_code_page_offsets(rdi = hypercall page GPA, rsi = HvRegisterVsmCodePageOffsets):
 * from now on vtl_call, vtl_return and lib/vtl.S call the stubs where the register says
 * (VtlCallOffset bits 11:0, VtlReturnOffset bits 23:12), as a VSM guest finds them. Until
 * then they use pykvmm's page (HYPERCALL_PAGE_ADDR, Hyper-V's offsets). One page address for
 * every VTL and vCPU. Preserves every register.
 */
.globl vtl_use_code_page_offsets
.type vtl_use_code_page_offsets, @function
vtl_use_code_page_offsets:
    push rax
    mov rax, rsi
    and eax, 0xfff
    add rax, rdi
    mov [rip + vtl_call_stub], rax
    mov rax, rsi
    shr rax, 12
    and eax, 0xfff
    add rax, rdi
    mov [rip + vtl_return_stub], rax
    pop rax
    ret
.size vtl_use_code_page_offsets, . - vtl_use_code_page_offsets

.data
.balign 8
.globl vtl_call_stub, vtl_return_stub
vtl_call_stub:   .quad HYPERCALL_PAGE_ADDR + HCPAGE_VTL_CALL
vtl_return_stub: .quad HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
