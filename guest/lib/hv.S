/*
 * hv.S: helpers for the Hyper-V guests (see include/hv.inc). Exceptions the helpers expect
 * (#GP from a synthetic MSR, #UD from a refused hypercall) land in hv_recover_handler,
 * which resumes at the recovery address this (vCPU, plane) armed and reports the vector.
 */
.include "guest.inc"
.include "hv.inc"


.text

.globl hv_safe_install
.type hv_safe_install, @function
hv_safe_install:
    push rdi
    push rsi
    SET_HANDLER VEC_GP, hv_gp_entry
    SET_HANDLER VEC_UD, hv_ud_entry
    pop rsi
    pop rdi
    ret
.size hv_safe_install, . - hv_safe_install

/* #GP pushes an error code, #UD does not: make both frames alike, then share the code. */
hv_gp_entry:
    add rsp, 8
    push VEC_GP
    jmp hv_recover_handler
hv_ud_entry:
    push VEC_UD
    jmp hv_recover_handler

/* [rsp] = vector, then the iret frame. Resume at the armed address with rax = vector. */
hv_recover_handler:
    push rbx
    mov rbx, gs:[PCPU_INDEX]
    lea rax, [rip + hv_recover_rip]
    mov rax, [rax + rbx * 8]
    test rax, rax
    jz .Lunexpected
    mov [rsp + 16], rax                 /* the iret frame's RIP */
    lea rax, [rip + hv_recover_rip]
    mov qword ptr [rax + rbx * 8], 0
    pop rbx
    pop rax                             /* the vector */
    iretq
.Lunexpected:
    pop rbx
    pop rax
    GUEST_FAIL "unexpected #GP/#UD", rax, "qword ptr [rsp]"

/* Arm recovery at LABEL for this (vCPU, plane). Clobbers nothing but RFLAGS. */
.macro ARM label:req
    push rax
    push rbx
    mov rbx, gs:[PCPU_INDEX]
    lea rax, [rip + hv_recover_rip]
    lea rax, [rax + rbx * 8]
    push rcx
    lea rcx, [rip + \label]
    mov [rax], rcx
    pop rcx
    pop rbx
    pop rax
.endm
.macro DISARM
    push rax
    push rbx
    mov rbx, gs:[PCPU_INDEX]
    lea rax, [rip + hv_recover_rip]
    mov qword ptr [rax + rbx * 8], 0
    pop rbx
    pop rax
.endm

.globl wrmsr_safe
.type wrmsr_safe, @function
wrmsr_safe:
    push rcx
    push rdx
    mov ecx, edi
    mov rax, rsi
    mov rdx, rsi
    shr rdx, 32
    ARM 1f
    wrmsr
    DISARM
    xor eax, eax
1:  pop rdx
    pop rcx
    ret
.size wrmsr_safe, . - wrmsr_safe

.globl rdmsr_safe
.type rdmsr_safe, @function
rdmsr_safe:
    push rcx
    mov ecx, edi
    ARM 1f
    rdmsr
    DISARM
    shl rdx, 32
    mov eax, eax
    or rdx, rax
    xor eax, eax
    pop rcx
    ret
1:  xor edx, edx
    pop rcx
    ret
.size rdmsr_safe, . - rdmsr_safe

.globl hv_enable
.type hv_enable, @function
hv_enable:
    push rsi
    push rdi
    mov edi, HV_MSR_GUEST_OS_ID
    mov rsi, HV_GUEST_OS_ID_VALUE
    call wrmsr_safe
    GUEST_ASSERT_EQ rax, 0, "GUEST_OS_ID write faulted"
    pop rsi
    push rsi
    or rsi, HV_HYPERCALL_ENABLE
    mov edi, HV_MSR_HYPERCALL
    call wrmsr_safe
    GUEST_ASSERT_EQ rax, 0, "HYPERCALL MSR write faulted"
    mov rdi, [rsp]
    lea rax, [rip + hv_page_of]
    mov rcx, gs:[PCPU_PLANE]
    mov [rax + rcx * 8], rdi
    pop rdi
    pop rsi
    ret
.size hv_enable, . - hv_enable

/* hv_call(rdi = control, rsi = RDX input, rdx = R8 input) through this plane's page. */
.globl hv_call
.type hv_call, @function
hv_call:
    push rcx
    push rbx
    mov rcx, rdi
    mov r8, rdx
    mov rdx, rsi
    lea rbx, [rip + hv_page_of]
    mov rax, gs:[PCPU_PLANE]
    mov rbx, [rbx + rax * 8]
    call rbx
    pop rbx
    pop rcx
    ret
.size hv_call, . - hv_call

/* hv_call_safe: hv_call, but a #UD comes back as rcx = 6 (rcx = 0 otherwise). */
.globl hv_call_safe
.type hv_call_safe, @function
hv_call_safe:
    push rbx
    mov rcx, rdi
    mov r8, rdx
    mov rdx, rsi
    lea rbx, [rip + hv_page_of]
    mov rax, gs:[PCPU_PLANE]
    mov rbx, [rbx + rax * 8]
    ARM 2f
    call rbx
    DISARM
    xor ecx, ecx
    pop rbx
    ret
2:  mov rcx, rax
    add rsp, 8                          /* the return address the stub never popped */
    pop rbx
    ret
.size hv_call_safe, . - hv_call_safe

.bss
.balign 8
hv_recover_rip: .space MAX_VCPUS * MAX_PLANES * 8
.globl hv_page_of
hv_page_of: .space MAX_PLANES * 8
