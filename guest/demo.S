/*
 * demo (what `pykvmm run` runs with no argument; best with 2 vCPUs and 2 planes, personality
 * vtl): a cross-VTL IPI story told through GUEST_PRINT.
 *   Each vCPU's VTL0 starts its VTL1 with a VtlCall (first entry, reason VtlCall).
 *   vCPU1's VTL0 then works (spins). vCPU0's VTL0 asks for help with a VtlCall (a lower VTL
 *   cannot interrupt a higher one); its VTL1 passes the request on to VTL1 on vCPU1 with
 *   HvCallSendSyntheticClusterIpi (vector 0x50, target VTL1) and returns: VTL1 preempts
 *   vCPU1's VTL0 (entry reason Interrupt), answers VTL0 on vCPU0 with vector 0x51 and
 *   VtlReturns; vCPU1's VTL0 resumes where it was; vCPU0's VTL0 takes the answer.
 * With 1 vCPU, VTL1 of vCPU0 sends 0x50 to itself with interrupts off: its return to VTL0
 * bounces straight back (entry reason Interrupt) and it answers. With 1 plane it says it
 * needs two.
 * Reports: the PRINTs; SYNC 1, 0x51 (the answer vCPU0's VTL0 took); DONE on every vCPU.
 */
.include "guest.inc"
.include "vtl.inc"

.set V_HELP, 0x50
.set V_ANSWER, 0x51
.set CMD_HELP, 0x4e1f

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
1:  SAY "VTL0: asking VTL1 for help with a VtlCall"
    mov rbx, CMD_HELP
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

/* ---- VTL1 (both vCPUs) ---- */
vtl1_main:
    SAY "VTL1: secure kernel up (entered by VtlCall, entry reason 1); VtlReturn to VTL0"
    call idt_install
    SET_HANDLER V_HELP, help_handler
    VTL1_SERVE ask_helper

/* VtlCall CMD_HELP (vCPU0's VTL1): pass the request to the helper vCPU's VTL1, with interrupts
 * off, so that with one vCPU 0x50 waits for the return to VTL0 and preempts it at once. */
ask_helper:
    cmp qword ptr [rip + helper_vcpu], 0
    je 1f
    SAY "VTL1: passing it to VTL1 on vCPU1: SendSyntheticClusterIpi(vector 0x50, VTL1)"
    jmp 2f
1:  SAY "VTL1: sending it to myself: SendSyntheticClusterIpi(vector 0x50, VTL1)"
2:  cli
    mov edi, V_HELP
    xor esi, esi                        /* its own VTL */
    mov ecx, [rip + helper_vcpu]
    mov edx, 1
    shl edx, cl
    call vtl_send_ipi
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "SendSyntheticClusterIpi failed"
    mov ecx, HV_VTL_RETURN_FAST
    call HYPERCALL_PAGE_ADDR + HCPAGE_VTL_RETURN
    sti                                 /* back (one vCPU: by 0x50, at once): take it */
    WAIT_EQ helped, 1
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
1:  SAY "VTL1: answering VTL0 on vCPU0 with interrupt 0x51, then VtlReturn"
    mov edi, V_ANSWER
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    mov edx, 1
    call vtl_send_ipi
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
.balign 64
helper_vcpu:   .space 8
vcpu0_started: .space 8
vcpu1_working: .space 8
helped:        .space 8
answer:        .space 8
finished:      .space 8
