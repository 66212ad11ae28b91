/*
 * hv_synic_vtl (--hyperv, 1 vCPU, --planes 2, personality vtl): one SynIC and one set of
 * synthetic timers per VTL. Each VTL enables its own hypercall page, SIMP, SIEFP and SINT2
 * (VTL0 vector 0x50, VTL1 0x51) and a hyperv-testdev message connection to its own SINT2
 * (VTL0: 0x20, VTL1: 0x21); VTL1 also has an event connection 0x23 on SINT3 (0x53, auto-EOI).
 * VTL0 reports:
 *   SYNC 1, status of a PostMessage to VTL1's connection (0)
 *   SYNC 2, MessageType in VTL0's own SINT2 slot afterwards (0: nothing landed there)
 *   SYNC 3, messages VTL1's handler received (1, preempting VTL0)
 *   SYNC 4, messages VTL0's handler received after posting to its own connection (1)
 *   SYNC 5, VTL0's SIEF page, first qword of SINT3 (0)
 *   SYNC 6, VTL1's SINT3 event flag 0x23 after SignalEvent, as VTL1's handler read it in its
 *   SIEF page (an overlay VTL0 does not see) (1), and VTL1's SINT3 count (1)
 *   SYNC 7/8, timer expirations each VTL handled (>= 20: VTL0 STIMER0 and VTL1 STIMER1
 *   periodic, 1 ms, at the same time); SYNC 9, expirations with the wrong timer index (0)
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"

.set V0, 0x50
.set V1, 0x51
.set V1_EVT, 0x53
.set CONN0, 0x20
.set CONN1, 0x21
.set CONN1_EVT, 0x23
.set MSG_TYPE, 0x77
.set TICKS, 20
.set PERIOD, 10000                      /* 1 ms in 100 ns */
.set SLOT2, 2 * HV_MESSAGE_SIZE

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    call vtl_call                       /* VTL1 sets itself up and returns */
    call idt_install
    call hv_safe_install
    SET_HANDLER V0, vtl0_sint
    call apic_enable
    lea rdi, [rip + hcpage0]
    call hv_enable
    lea rax, [rip + simp0]
    or rax, 1
    WRMSR_OK HV_MSR_SIMP, rax
    lea rax, [rip + siefp0]
    or rax, 1
    WRMSR_OK HV_MSR_SIEFP, rax
    WRMSR_OK HV_MSR_SCONTROL, 1
    WRMSR_OK HV_MSR_SINT0 + 2, V0
    TESTDEV HV_TESTDEV_MSG_CONN_CREATE, 0, 2, CONN0

    /* Post to VTL1's connection: lands in VTL1's page only, VTL1 is interrupted (preempts). */
    lea rbx, [rip + post]
    mov dword ptr [rbx], CONN1
    mov dword ptr [rbx + 8], MSG_TYPE
    mov dword ptr [rbx + 12], 8
    mov qword ptr [rbx + 16], 0x1111
    mov rdi, HVCALL_POST_MESSAGE
    mov rsi, rbx
    xor edx, edx
    call hv_call
    GUEST_SYNC 1, rax
    WAIT_EQ vtl1_msgs, 1
    lea rax, [rip + simp0]
    mov eax, [rax + SLOT2]
    GUEST_SYNC 2, rax
    GUEST_SYNC 3, [rip + vtl1_msgs]

    /* Post to our own connection. */
    mov dword ptr [rbx], CONN0
    mov rdi, HVCALL_POST_MESSAGE
    mov rsi, rbx
    xor edx, edx
    call hv_call
    GUEST_ASSERT_EQ rax, 0, "PostMessage to VTL0's own connection"
1:  cmp qword ptr [rip + vtl0_msgs], 0
    jne 2f
    sti
    hlt
    cli
    jmp 1b
2:  GUEST_SYNC 4, [rip + vtl0_msgs]

    /* SignalEvent to VTL1's event port. */
    mov rdi, HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST
    mov esi, CONN1_EVT
    xor edx, edx
    call hv_call
    GUEST_ASSERT_EQ rax, 0, "SignalEvent to VTL1"
    WAIT_EQ vtl1_evts, 1
    lea rax, [rip + siefp0]
    GUEST_SYNC 5, "qword ptr [rax + 3 * 256]"
    mov rax, [rip + vtl1_flag]          /* VTL1's SIEF page is its overlay: VTL1 read it */
    shl rax, 4
    or rax, [rip + vtl1_evts]
    GUEST_SYNC 6, rax

    /* Timers in both VTLs at once. */
    WRMSR_OK HV_MSR_STIMER0_COUNT, PERIOD
    WRMSR_OK HV_MSR_STIMER0_CONFIG, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | (2 << 16)
    mov qword ptr [rip + vtl1_arm], 1
    call vtl_call                       /* VTL1 arms its STIMER1 */
    sti                                 /* no hlt: VTL1's progress does not wake VTL0 */
3:  cmp qword ptr [rip + vtl0_ticks], TICKS
    jb 4f
    cmp qword ptr [rip + vtl1_ticks], TICKS
    jae 5f
4:  pause
    jmp 3b
5:  cli
    WRMSR_OK HV_MSR_STIMER0_CONFIG, 0
    GUEST_SYNC 7, [rip + vtl0_ticks]
    GUEST_SYNC 8, [rip + vtl1_ticks]
    GUEST_SYNC 9, [rip + wrong_index]
.Ldone:
    GUEST_DONE

/* SINT handler body: \page's SINT2 slot; \timer = the index this VTL's timer has. */
.macro HANDLE page:req, msgs:req, ticks:req, timer:req
    push rax
    push rdx
    push rdi
    push rsi
    lea rdx, [rip + \page]
    add rdx, SLOT2
    mov eax, [rdx]
    cmp eax, MSG_TYPE
    jne 1f
    lock inc qword ptr [rip + \msgs]
    jmp 3f
1:  cmp eax, HVMSG_TIMER_EXPIRED
    jne 4f
    cmp dword ptr [rdx + HV_MSG_PAYLOAD], \timer
    je 2f
    lock inc qword ptr [rip + wrong_index]
2:  lock inc qword ptr [rip + \ticks]
3:  xor eax, eax
    xchg [rdx], eax                     /* free the slot (a full barrier, as the TLFS asks) ... */
    test byte ptr [rdx + HV_MSG_HEADER_FLAGS], HV_MSG_FLAG_PENDING
    jz 4f
    mov edi, HV_MSR_EOM                 /* ... and ask for the next one */
    xor esi, esi
    call wrmsr_safe
4:  cmp qword ptr [rip + \ticks], TICKS
    jb 5f
    mov edi, HV_MSR_STIMER0_CONFIG + 2 * \timer
    xor esi, esi
    call wrmsr_safe
5:  call apic_eoi
    pop rsi
    pop rdi
    pop rdx
    pop rax
    iretq
.endm

vtl0_sint:
    HANDLE simp0, vtl0_msgs, vtl0_ticks, 0
vtl1_sint:
    HANDLE simp1, vtl1_msgs, vtl1_ticks, 1
vtl1_evt:                               /* auto-EOI: no EOI here */
    push rax
    lea rax, [rip + siefp1]
    mov rax, [rax + 3 * 256]
    shr rax, CONN1_EVT
    and eax, 1
    mov [rip + vtl1_flag], rax
    pop rax
    lock inc qword ptr [rip + vtl1_evts]
    iretq

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    call idt_install
    call hv_safe_install
    SET_HANDLER V1, vtl1_sint
    SET_HANDLER V1_EVT, vtl1_evt
    call apic_enable
    lea rdi, [rip + hcpage1]
    call hv_enable
    lea rax, [rip + simp1]
    or rax, 1
    WRMSR_OK HV_MSR_SIMP, rax
    lea rax, [rip + siefp1]
    or rax, 1
    WRMSR_OK HV_MSR_SIEFP, rax
    WRMSR_OK HV_MSR_SCONTROL, 1
    WRMSR_OK HV_MSR_SINT0 + 2, V1
    WRMSR_OK HV_MSR_SINT0 + 3, V1_EVT | HV_SINT_AUTO_EOI
    TESTDEV HV_TESTDEV_MSG_CONN_CREATE, 0, 2, CONN1
    TESTDEV HV_TESTDEV_EVT_CONN_CREATE, 0, 3, CONN1_EVT
    sti
    lea rdi, [rip + vtl1_call]
    call vtl_serve                      /* never returns */

/* VtlCall handler: arm STIMER1 when VTL0 asks (CF clear: fast return). */
vtl1_call:
    cmp qword ptr [rip + vtl1_arm], 1
    jne 1f
    mov qword ptr [rip + vtl1_arm], 2
    WRMSR_OK HV_MSR_STIMER0_COUNT + 2, PERIOD
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 2, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | (2 << 16)
1:  clc
    ret

.bss
.balign 4096
hcpage0: .space 4096
hcpage1: .space 4096
simp0: .space 4096
simp1: .space 4096
siefp0: .space 4096
siefp1: .space 4096
post: .space 4096
vtl0_msgs: .space 8
vtl1_msgs: .space 8
vtl1_evts: .space 8
vtl1_flag: .space 8
vtl0_ticks: .space 8
vtl1_ticks: .space 8
wrong_index: .space 8
vtl1_arm: .space 8
