/*
 * hv_stimer (--hyperv, 1 vCPU): synthetic timer modes the kvm-unit-tests leave out.
 *   SYNC 1, STIMER0_CONFIG Enable bit after a direct-mode one-shot fired (0: one-shot
 *           timers disable themselves); SYNC 2, direct-mode periodic expirations seen (>= 6);
 *   SYNC 3, ExpirationTime of a message-mode one-shot armed in the past (1: it fired at once
 *           with the COUNT it had); SYNC 4, its DeliveryTime >= ExpirationTime (1);
 *   SYNC 5, Enable after COUNT = 0 (0); SYNC 6, Enable after CONFIG with SINTx = 0 (0);
 *   SYNC 7, messages from an AutoEnable one-shot (COUNT written after CONFIG) (1);
 *   SYNC 8, messages taken from an auto-EOI SINT when two one-shots expire into it together (2):
 *           the second waits for the handler's EOM, which re-asserts the vector while the
 *           first is still in service (no exit in between): the VMM must EOI the one in
 *           service although the same vector is pending again.
 *   A periodic 10 ms timer the guest falls 10 periods behind on (interrupts off): not lazy,
 *   SYNC 9, ExpirationTimes skipped among the first 15 messages (0: it catches up),
 *   SYNC 10, the shortest time between two DeliveryTimes (>= half a period: never back to
 *   back); lazy, SYNC 11, skips among the first 4 (>= 1), SYNC 12, ExpirationTimes off the
 *   timer's grid of periods (0).
 */
.include "guest.inc"
.include "hv.inc"

.set VDIRECT, 0x60
.set VSINT, 0x61
.set SINT, 1
.set SLOT, SINT * HV_MESSAGE_SIZE
.set VAUTO, 0x62
.set SINT_AUTO, 2
.set SLOT_AUTO, SINT_AUTO * HV_MESSAGE_SIZE
.set VPACED, 0x63
.set SINT_PACED, 3
.set SLOT_PACED, SINT_PACED * HV_MESSAGE_SIZE
.set PACED_PERIOD, 100000           /* 10 ms */

.macro WAIT_FOR var:req, n:req
1:  cmp qword ptr [rip + \var], \n
    jae 2f
    sti
    hlt
    cli
    jmp 1b
2:
.endm

/* EOM when another message waits for the slot at \slot (clobbers eax, ecx, edx) */
.macro EOM_IF_PENDING slot:req
    test byte ptr [\slot + HV_MSG_HEADER_FLAGS], HV_MSG_FLAG_PENDING
    jz .Lno_eom\@
    mov ecx, HV_MSR_EOM
    xor eax, eax
    xor edx, edx
    wrmsr
.Lno_eom\@:
.endm

/* rax = HV_MSR_TIME_REF_COUNT + \delta */
.macro NOW_PLUS delta:req
    mov edi, HV_MSR_TIME_REF_COUNT
    call rdmsr_safe
    lea rax, [rdx + \delta]
.endm

.macro READ_ENABLE msr:req
    mov edi, \msr
    call rdmsr_safe
    mov rax, rdx
    and eax, HV_STIMER_ENABLE
.endm

/* STIMER1, periodic PACED_PERIOD into SINT_PACED with \flags; the guest stalls with interrupts
 * off for 10 periods, then takes \messages messages and stops the timer. */
.macro FALL_BEHIND flags:req, messages:req
    mov qword ptr [rip + paced_count], 0
    mov qword ptr [rip + paced_exp], 0
    mov qword ptr [rip + paced_skips], 0
    mov qword ptr [rip + paced_off_grid], 0
    mov qword ptr [rip + paced_min_gap], -1
    WRMSR_OK HV_MSR_STIMER0_COUNT + 2, PACED_PERIOD
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 2, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | \flags | (SINT_PACED << 16)
    NOW_PLUS 10*PACED_PERIOD
    mov rsi, rax
1:  mov edi, HV_MSR_TIME_REF_COUNT
    call rdmsr_safe
    cmp rdx, rsi
    jb 1b
    WAIT_FOR paced_count, \messages
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 2, 0
.endm

.text
.globl main
main:
    call idt_install
    call hv_safe_install
    SET_HANDLER VDIRECT, direct_handler
    SET_HANDLER VSINT, sint_handler
    SET_HANDLER VAUTO, auto_eoi_handler
    call apic_enable
    lea rax, [rip + simp]
    or rax, 1
    WRMSR_OK HV_MSR_SIMP, rax
    WRMSR_OK HV_MSR_SCONTROL, 1
    WRMSR_OK HV_MSR_SINT0 + SINT, VSINT
    WRMSR_OK HV_MSR_SINT0 + SINT_AUTO, VAUTO | HV_SINT_AUTO_EOI
    SET_HANDLER VPACED, paced_handler
    WRMSR_OK HV_MSR_SINT0 + SINT_PACED, VPACED

    /* direct one-shot, 100 us from now */
    NOW_PLUS 1000
    WRMSR_OK HV_MSR_STIMER0_COUNT, rax
    WRMSR_OK HV_MSR_STIMER0_CONFIG, HV_STIMER_ENABLE | HV_STIMER_DIRECT_MODE | (VDIRECT << 4)
    WAIT_FOR direct_count, 1
    READ_ENABLE HV_MSR_STIMER0_CONFIG
    GUEST_SYNC 1, rax

    /* direct periodic, 1 ms */
    WRMSR_OK HV_MSR_STIMER0_COUNT, 10000
    WRMSR_OK HV_MSR_STIMER0_CONFIG, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_DIRECT_MODE | (VDIRECT << 4)
    WAIT_FOR direct_count, 7
    WRMSR_OK HV_MSR_STIMER0_CONFIG, 0
    mov rax, [rip + direct_count]
    dec rax
    GUEST_SYNC 2, rax

    /* message one-shot armed in the past: fires at once */
    WRMSR_OK HV_MSR_STIMER0_COUNT + 2, 1
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 2, HV_STIMER_ENABLE | (SINT << 16)
    WAIT_FOR msg_count, 1
    GUEST_SYNC 3, [rip + msg_expiration]
    mov rax, [rip + msg_delivery]
    cmp rax, [rip + msg_expiration]
    setae al
    movzx eax, al
    GUEST_SYNC 4, rax

    /* COUNT = 0 disables a running timer */
    WRMSR_OK HV_MSR_STIMER0_COUNT + 4, 10000
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 4, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | (SINT << 16)
    WRMSR_OK HV_MSR_STIMER0_COUNT + 4, 0
    READ_ENABLE HV_MSR_STIMER0_CONFIG + 4
    GUEST_SYNC 5, rax

    /* SINTx = 0 outside direct mode: not enabled */
    WRMSR_OK HV_MSR_STIMER0_COUNT + 6, 10000
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 6, HV_STIMER_ENABLE | HV_STIMER_PERIODIC
    READ_ENABLE HV_MSR_STIMER0_CONFIG + 6
    GUEST_SYNC 6, rax

    /* AutoEnable: CONFIG first (not enabled), then COUNT enables it */
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 6, HV_STIMER_AUTO_ENABLE | (SINT << 16)
    NOW_PLUS 1000
    WRMSR_OK HV_MSR_STIMER0_COUNT + 6, rax
    WAIT_FOR msg_count, 2
    mov rax, [rip + msg_count]
    dec rax
    GUEST_SYNC 7, rax

    /* two one-shots into the auto-EOI SINT, both due at once (armed in the past) */
    WRMSR_OK HV_MSR_STIMER0_COUNT + 2, 1
    WRMSR_OK HV_MSR_STIMER0_COUNT + 4, 1
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 2, HV_STIMER_ENABLE | (SINT_AUTO << 16)
    WRMSR_OK HV_MSR_STIMER0_CONFIG + 4, HV_STIMER_ENABLE | (SINT_AUTO << 16)
    WAIT_FOR auto_count, 2
    GUEST_SYNC 8, [rip + auto_count]

    FALL_BEHIND 0, 15
    GUEST_SYNC 9, [rip + paced_skips]
    GUEST_SYNC 10, [rip + paced_min_gap]
    FALL_BEHIND HV_STIMER_LAZY, 4
    GUEST_SYNC 11, [rip + paced_skips]
    GUEST_SYNC 12, [rip + paced_off_grid]
    GUEST_DONE

direct_handler:
    lock inc qword ptr [rip + direct_count]
    call apic_eoi
    iretq

sint_handler:
    push rax
    push rdx
    lea rdx, [rip + simp]
    add rdx, SLOT
    cmp dword ptr [rdx], HVMSG_TIMER_EXPIRED
    jne 1f
    mov rax, [rdx + HV_MSG_PAYLOAD + 8]
    mov [rip + msg_expiration], rax
    mov rax, [rdx + HV_MSG_PAYLOAD + 16]
    mov [rip + msg_delivery], rax
    lock inc qword ptr [rip + msg_count]
    xor eax, eax
    xchg [rdx], eax
1:  call apic_eoi
    pop rdx
    pop rax
    iretq

/* Auto-EOI: no EOI write. The EOM comes first thing, so the exit it makes is the first since
 * this interrupt was taken. */
auto_eoi_handler:
    push rax
    push rcx
    push rdx
    lea rdx, [rip + simp]
    add rdx, SLOT_AUTO
    xor eax, eax
    xchg [rdx], eax
    cmp eax, HVMSG_TIMER_EXPIRED
    jne 1f
    lock inc qword ptr [rip + auto_count]
    EOM_IF_PENDING rdx
1:  pop rdx
    pop rcx
    pop rax
    iretq

/* Gaps between a message's ExpirationTime and DeliveryTime and the previous message's; EOM
 * when another expiration waits for the slot. */
paced_handler:
    push rax
    push rcx
    push rdx
    push rsi
    lea rsi, [rip + simp + SLOT_PACED]
    cmp dword ptr [rsi], HVMSG_TIMER_EXPIRED
    jne 3f
    mov rax, [rsi + HV_MSG_PAYLOAD + 8]
    mov rcx, [rip + paced_exp]
    mov [rip + paced_exp], rax
    test rcx, rcx
    jz 2f                               /* the first message */
    sub rax, rcx
    cmp rax, PACED_PERIOD
    jbe 1f
    inc qword ptr [rip + paced_skips]
1:  xor edx, edx
    mov ecx, PACED_PERIOD
    div rcx
    test rdx, rdx
    jz 1f
    inc qword ptr [rip + paced_off_grid]
1:  mov rax, [rsi + HV_MSG_PAYLOAD + 16]
    sub rax, [rip + paced_deliv]
    cmp rax, [rip + paced_min_gap]
    jae 2f
    mov [rip + paced_min_gap], rax
2:  mov rax, [rsi + HV_MSG_PAYLOAD + 16]
    mov [rip + paced_deliv], rax
    lock inc qword ptr [rip + paced_count]
    xor eax, eax
    xchg [rsi], eax
    EOM_IF_PENDING rsi
3:  call apic_eoi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    iretq

.bss
.balign 4096
simp: .space 4096
direct_count: .space 8
msg_count: .space 8
msg_expiration: .space 8
msg_delivery: .space 8
auto_count: .space 8
paced_count: .space 8
paced_exp: .space 8
paced_deliv: .space 8
paced_skips: .space 8
paced_off_grid: .space 8
paced_min_gap: .space 8
