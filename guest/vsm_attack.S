/*
 * vsm_attack (1 vCPU, 2 VTLs, personality vtl): VTL0 tries to get its own code run inside VTL1
 * and to read VTL1's secrets; VTL1 protects itself with HvCallModifyVtlProtectionMask and every
 * attempt ends in a secure intercept (entry reason Intercept, a GPA-intercept message), after
 * which VTL1 makes VTL0 skip the instruction (HvCallSetVpRegisters RIP).
 * VTL1 (first VtlCall): protects for VTL0
 *   the hypercall page (VtlCall/VtlReturn stubs) -> r-x,
 *   its code page (vtl1_text) and its secret page (vtl1_data) and its stack -> ---;
 *   SYNC 0x10..0x12: the three statuses (0 = success).
 * VTL0 then:
 *   1. writes `jmp evil` over the VtlReturn stub    -> intercept (write, GPA stub)
 *   2. writes into VTL1's code page                  -> intercept (write)
 *   3. reads VTL1's secret into rbx (rbx preset)     -> intercept (read); rbx unchanged
 *   4. calls into VTL1's code page                   -> intercept (execute); VTL1 emulates `ret`
 *   5. a normal VtlCall + VtlReturn still works: VTL1 answers rdx + 1 and VTL1 never ran VTL0's code
 * Reports (VTL0): SYNC 1..4 = the message's access type for each case (1, 1, 0, 2);
 *   SYNC 5 = GPA of case 1 (the stub); SYNC 6 = rbx after 3 (0x5a5a); SYNC 7 = stub bytes
 *   unchanged (1); SYNC 8 = rdx after the VtlCall (0x1235); SYNC 9 = evil ran in VTL1 (0);
 *   SYNC 10 = intercepts VTL1 counted (4). DONE.
 * If VTL0's code ever runs it reports SYNC 0x99 = the VTL it runs in and ends the run.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set CMD_ECHO, 0xec0
.set STUB, HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    VSM_VTL_INIT
    mov rax, [STUB]
    mov [rip + stub_before], rax
    call vtl_call                       /* VTL1 sets up its protections */

    /* 1: patch the VtlReturn stub with `jmp evil` (rel32 from the stub) */
    lea rax, [rip + evil]
    sub rax, STUB + 5
    shl rax, 8
    or rax, 0xE9
    mov [STUB], rax
    GUEST_SYNC 1, [rip + last_access]
    GUEST_SYNC 5, [rip + last_gpa]
    /* 2: patch VTL1's code */
    mov byte ptr [rip + vtl1_intercept], 0xC3
    GUEST_SYNC 2, [rip + last_access]
    /* 3: read VTL1's secret */
    mov rbx, 0x5a5a
    mov rbx, [rip + secret]
    GUEST_SYNC 3, [rip + last_access]
    GUEST_SYNC 6, rbx
    /* 4: run VTL1's code in VTL0 */
    call vtl1_intercept
    GUEST_SYNC 4, [rip + last_access]
    /* the stub is intact */
    mov rax, [STUB]
    xor ecx, ecx
    cmp rax, [rip + stub_before]
    sete cl
    GUEST_SYNC 7, rcx
    /* 5: a normal round trip */
    mov rbx, CMD_ECHO
    mov rdx, 0x1234
    call vtl_call
    GUEST_SYNC 8, rdx
    GUEST_SYNC 9, [rip + evil_ran]
    GUEST_SYNC 10, [rip + intercepts]
.Ldone:
    GUEST_DONE

/* VTL0's code that the attack wants VTL1 to run: if it ever runs, it says in which VTL and
 * ends the run (the control test runs the attack with protections switched off). */
evil:
    mov qword ptr [rip + evil_ran], 1
    GUEST_SYNC 0x99, gs:[PCPU_PLANE]
    GUEST_DONE

.section .text.vtl1, "ax"
.balign 4096
vtl1_text:
vtl1_main:
    VSM_VTL_INIT
    mov rdi, HYPERCALL_PAGE_ADDR
    VSM_PROTECT 1, HV_MAP_GPA_RX
    GUEST_SYNC 0x10, rax
    VSM_PROTECT 1, 0, at=vtl1_text
    GUEST_SYNC 0x11, rax
    VSM_PROTECT 1, 0, at=vtl1_data
    GUEST_SYNC 0x12, rax
    mov rdi, rsp                        /* this VTL's stack: the 4 pages below its top */
    add rdi, 0xFFF
    and rdi, -0x1000
    sub rdi, STACK_SIZE
    VSM_PROTECT "STACK_SIZE / 0x1000", 0
    GUEST_SYNC 0x13, rax
    lea rdi, [rip + vtl1_intercept]
    lea rsi, [rip + vtl1_echo]
    jmp vsm_serve

/* vtl1_intercept(rdi = message): record it, then make VTL0 skip the instruction; for an
 * execute intercept, emulate `ret` in VTL0 instead (RIP = [RSP], RSP += 8). */
vtl1_intercept:
    inc qword ptr [rip + intercepts]
    mov eax, [rdi + HV_MSG_HEADER_TYPE]
    GUEST_ASSERT_EQ rax, HVMSG_GPA_INTERCEPT, "message type"
    movzx eax, byte ptr [rdi + HV_MSG_PAYLOAD + HV_IH_ACCESS_TYPE]
    mov [rip + last_access], rax
    mov rax, [rdi + HV_MSG_PAYLOAD + HV_MI_GPA]
    mov [rip + last_gpa], rax
    cmp byte ptr [rdi + HV_MSG_PAYLOAD + HV_IH_ACCESS_TYPE], HV_INTERCEPT_ACCESS_EXECUTE
    je 1f
    jmp vsm_skip_intercepted
1:  mov edi, HV_INPUT_VTL_USE_TARGET | 0
    jmp vsm_emulate_ret

vtl1_echo:
    cmp rbx, CMD_ECHO
    jne 1f
    inc rdx
1:  clc
    ret
.balign 4096

.section .data.vtl1, "aw"
.balign 4096
vtl1_data:
secret:
    .quad 0x5ec2e7
.balign 4096

.data
stub_before: .quad 0
last_access: .quad -1
last_gpa: .quad 0
evil_ran: .quad 0
intercepts: .quad 0
