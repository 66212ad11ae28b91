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
    jmp HYPERCALL_PAGE_ADDR + HCPAGE_VTL_CALL
.size vtl_call, . - vtl_call

/* vtl_return(rdi = 0 normal / 1 fast): RCX = rdi, then the VTL-return stub. As vtl_call. */
.globl vtl_return
.type vtl_return, @function
vtl_return:
    mov rcx, rdi
    jmp HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
.size vtl_return, . - vtl_return
