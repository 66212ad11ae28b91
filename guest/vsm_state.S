/*
 * vsm_state (1 vCPU, 2 VTLs, --hyperv, pykvmm boot): per-VTL state of the TLFS "Virtual
 * Processor State Isolation" list that the other VSM guests do not look at, and the
 * reference TSC page seen the same from each VTL.
 * Each VTL sets its own TPR (CR8: VTL0 3, VTL1 9), FS.base, VP assist page and reference TSC
 * page (at a page of its own). VTL0 then:
 *   reads the reference time from its TSC page (t0), VtlCalls VTL1 (CMD_CHECK), reads it again
 *   (t2). VTL1 reports: 0x11 its CR8 (9), 0x12 its FS.base (FS1), 0x13 the EntryReason in its
 *     own VP assist page (1), 0x14 HvRegisterVpAssistPage of VTL0 (its page | 1, read with
 *     GetVpRegisters), and reads the time from its own TSC page (t1).
 *   0x01 its CR8 (3), 0x02 its FS.base (FS0), 0x03 the EntryReason in its own VP assist page
 *   (0: VTL0 is never entered by a call or an interrupt), 0x04 1 if t0 <= t1 <= t2, 0x05
 *   t2 - t0 (100 ns units; the test bounds it by the run's wall time), 0x09 1 if the TSC
 *   read at t0 <= that at t1 <= that at t2 (one vCPU has one TSC, whichever VTL reads it).
 *   LAPIC timers: VTL0 arms its timer (vector V0T, 1 ms) with interrupts off and VtlCalls VTL1 (CMD_TIMERS),
 *   which arms its own (V1T, 1 ms) and waits (interrupts on, making exits) until it fired,
 *   then makes exits for 4 ms more of reference time: 0x15 V1T count (1), 0x16 V0T
 *   count while VTL1 ran (0: a lower VTL's interrupt waits); back in VTL0: 0x06 V0T count
 *   once VTL0 ran (1).
 *   HvCallSendSyntheticClusterIpiEx (HV_VP_SET "all"): 0x17 from VTL1 to VTL0, vector V0X
 *   (SUCCESS), 0x07 V0X count once VTL0 ran (1); 0x08 from VTL0 to VTL1 (ACCESS_DENIED).
 * DONE.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set CMD_CHECK, 0x5101
.set CMD_TIMERS, 0x5102
.set FS0, 0x10000F00
.set FS1, 0x20000F00
.set V0T, 0x61                         /* above VTL0's TPR (class 3) */
.set V0X, 0x71
.set V1T, 0xA2                         /* above VTL1's TPR (class 9) */
.set TIMER_NS, 1000000                  /* 1 ms in LAPIC bus clocks (KVM: 1 GHz), divide by 1 */

/* SETUP fs, assist, tsc: this VTL's CR8 (argument), FS.base, VP assist page, TSC page */
.macro SETUP tpr:req, fs:req, assist:req, tsc:req
    mov eax, \tpr
    mov cr8, rax
    mov ecx, MSR_FS_BASE
    mov eax, \fs
    xor edx, edx
    wrmsr
    lea rsi, [rip + \assist]
    or rsi, 1
    WRMSR_OK HV_MSR_VP_ASSIST_PAGE, rsi
    lea rsi, [rip + \tsc]
    or rsi, 1
    WRMSR_OK HV_MSR_REFERENCE_TSC, rsi
.endm

.text
.globl main
main:
    VTL_MAIN_DISPATCH 1
    VSM_VTL_INIT
    call vtl_call                       /* VTL1 sets itself up */
    SETUP 3, FS0, assist0, tsc0
    lea rdi, [rip + tsc0]
    call ref_time
    mov r12, rax                        /* t0 */
    mov [rip + raw0], r8
    mov rbx, CMD_CHECK
    call vtl_call
    lea rdi, [rip + tsc0]
    call ref_time
    mov r13, rax                        /* t2 */
    mov [rip + raw2], r8
    mov rax, cr8
    GUEST_SYNC 0x01, rax
    mov ecx, MSR_FS_BASE
    rdmsr
    GUEST_SYNC 0x02, rax
    lea rax, [rip + assist0]
    mov eax, [rax + VTL_ENTRY_REASON]
    GUEST_SYNC 0x03, rax
    xor eax, eax
    cmp r12, [rip + t1]
    ja 1f
    cmp r13, [rip + t1]
    jb 1f
    inc eax
1:  GUEST_SYNC 0x04, rax
    mov rax, r13
    sub rax, r12
    GUEST_SYNC 0x05, rax
    xor eax, eax
    mov rcx, [rip + raw1]
    cmp [rip + raw0], rcx
    ja 1f
    cmp [rip + raw2], rcx
    jb 1f
    inc eax
1:  GUEST_SYNC 0x09, rax

    call idt_install
    SET_HANDLER V0T, v0t_handler
    SET_HANDLER V0X, v0x_handler
    call apic_enable
    mov edi, V0T
    call timer_oneshot                  /* with interrupts off: on a slow host (nested KVM under */
    mov rbx, CMD_TIMERS                 /* TCG) 1 ms can pass before the VtlCall, and VTL0 */
    call vtl_call                       /* would take V0T itself before VTL1 looks */
    sti
    WAIT_EQ v0t_count, 1
    GUEST_SYNC 0x06, [rip + v0t_count]
    WAIT_EQ v0x_count, 1
    GUEST_SYNC 0x07, [rip + v0x_count]
    mov edi, V0X
    mov esi, HV_INPUT_VTL_USE_TARGET | 1
    call send_ipi_ex_all
    GUEST_SYNC 0x08, rax
.Ldone:
    GUEST_DONE

v0t_handler:
    inc qword ptr [rip + v0t_count]
    call apic_eoi
    iretq

v0x_handler:
    inc qword ptr [rip + v0x_count]
    call apic_eoi
    iretq

/* send_ipi_ex_all(rdi = vector, rsi = HV_INPUT_VTL) -> rax = status of a memory-form
 * HvCallSendSyntheticClusterIpiEx to every VP (HV_VP_SET format "all"). */
send_ipi_ex_all:
    push rdx
    push rdi
    push rsi
    mov rdx, rsi
    call vsm_buffer
    mov [rax], edi
    mov dword ptr [rax + 4], 0
    mov [rax + 4], dl
    mov qword ptr [rax + 8], HV_GENERIC_SET_ALL
    mov qword ptr [rax + 16], 0
    mov rsi, rax
    mov edi, HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX
    xor edx, edx
    call hv_call
    pop rsi
    pop rdi
    pop rdx
    ret

/* timer_oneshot(rdi = vector): this VTL's LAPIC timer fires `vector` once, TIMER_NS from now. */
timer_oneshot:
    push rax
    push rcx
    push rdx
    xor edx, edx
    mov ecx, X2APIC_TIMER_DIVIDE
    mov eax, 0xB                        /* divide by 1 */
    wrmsr
    mov ecx, X2APIC_LVT_TIMER
    mov eax, edi                        /* one-shot, unmasked */
    wrmsr
    mov ecx, X2APIC_TIMER_INITIAL
    mov eax, TIMER_NS
    wrmsr
    pop rdx
    pop rcx
    pop rax
    ret

/* ref_time(rdi = reference TSC page) -> rax = ((TSC * TscScale) >> 64) + TscOffset (the page
 * must be valid: TscSequence != 0), r8 = the TSC it read. Clobbers rcx, rdx. */
ref_time:
    mov ecx, [rdi + HV_TSC_PAGE_SEQUENCE]
    GUEST_ASSERT_NE rcx, 0, "reference TSC page not valid"
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mul qword ptr [rdi + HV_TSC_PAGE_SCALE]
    mov rax, rdx
    add rax, [rdi + HV_TSC_PAGE_OFFSET]
    ret

/* ---- VTL1 ------------------------------------------------------------------------------ */
vtl1_main:
    VSM_VTL_INIT
    SETUP 9, FS1, assist1, tsc1
    call idt_install
    SET_HANDLER V1T, v1t_handler
    call apic_enable
    sti
    lea rdi, [rip + vtl1_call]
    jmp vtl_serve

vtl1_call:
    cmp rbx, CMD_TIMERS
    je vtl1_timers
    lea rdi, [rip + tsc1]
    call ref_time
    mov [rip + t1], rax
    mov [rip + raw1], r8
    mov rax, cr8
    GUEST_SYNC 0x11, rax
    mov ecx, MSR_FS_BASE
    rdmsr
    GUEST_SYNC 0x12, rax
    lea rax, [rip + assist1]
    mov eax, [rax + VTL_ENTRY_REASON]
    GUEST_SYNC 0x13, rax
    mov edi, HV_REG_VP_ASSIST_PAGE
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    call vsm_get_register
    lea rax, [rip + assist0]
    sub rdx, rax
    GUEST_SYNC 0x14, rdx
    clc
    ret

vtl1_timers:
    mov edi, V1T
    call timer_oneshot
1:  out PORT_NULL, al                   /* exits: the host injects at entries */
    cmp qword ptr [rip + v1t_count], 0
    je 1b
    lea rdi, [rip + tsc1]
    call ref_time
    lea rbx, [rax + 4 * TIMER_NS / 100] /* VTL0's timer is long due by then */
2:  out PORT_NULL, al
    lea rdi, [rip + tsc1]
    call ref_time
    cmp rax, rbx
    jb 2b
    GUEST_SYNC 0x15, [rip + v1t_count]
    GUEST_SYNC 0x16, [rip + v0t_count]
    mov edi, V0X
    mov esi, HV_INPUT_VTL_USE_TARGET | 0
    call send_ipi_ex_all
    GUEST_SYNC 0x17, rax
    clc
    ret

v1t_handler:
    inc qword ptr [rip + v1t_count]
    call apic_eoi
    iretq

.data
t1: .quad 0
raw0: .quad 0                           /* TSC values read at t0, t1, t2 */
raw1: .quad 0
raw2: .quad 0
v0t_count: .quad 0
v1t_count: .quad 0
v0x_count: .quad 0

.bss
.balign 4096
assist0: .skip 4096
assist1: .skip 4096
tsc0: .skip 4096
tsc1: .skip 4096
