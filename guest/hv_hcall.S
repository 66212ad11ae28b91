/*
 * hv_hcall (--hyperv, 1 vCPU): the hypercall interface and its error statuses.
 *   #UD before the page is enabled; unknown code; reserved input-value bits; rep count on a
 *   simple call; variable header where none is taken; memory input misaligned, crossing a
 *   page, outside memory; PostMessage/SignalEvent/SendIpi/SendIpiEx/Flush* input errors;
 *   NotifyLongSpinWait; GetPartitionId memory and fast output; PykvmmEcho (rep) in memory form over 40 reps
 *   (continued by the VMM every 16 reps: the host interrupts it with vector 0x41 at the
 *   first continuation; SYNC 3, the rep index the handler saw written last), fast with XMM
 *   input and output; SendIpiEx to itself with its VP set in XMM0 (vector 0x40 arrives).
 * SYNC 1, <the number of checks>; DONE.
 */
.include "guest.inc"
.include "hv.inc"

.set VEC_IPI, 0x40
.set VEC_CONT, 0x41
.set REPS, 40

/* CHECK control, rdx, r8, status: the call's status (bits 15:0) must be `status`. */
.macro CHECK control:req, in1:req, in2:req, status:req, msg:req
    mov rdi, \control
    mov rsi, \in1
    mov rdx, \in2
    call hv_call
    and eax, 0xFFFF
    GUEST_ASSERT_EQ rax, \status, "\msg"
    inc r12
.endm

.text
.globl main
main:
    call idt_install
    call hv_safe_install
    SET_HANDLER VEC_IPI, ipi_handler
    SET_HANDLER VEC_CONT, cont_handler
    call apic_enable
    xor r12d, r12d

    /* #UD: page enabled, then GUEST_OS_ID = 0 disables it. The page is an overlay: its RAM
     * is back, so the call goes through a copy of its stub (as a guest that kept one). */
    lea rdi, [rip + hcpage]
    call hv_enable
    lea rsi, [rip + hcpage]
    lea rdi, [rip + stub_copy]
    mov ecx, 16
    rep movsb
    mov edi, HV_MSR_GUEST_OS_ID
    xor esi, esi
    call wrmsr_safe
    lea rax, [rip + stub_copy]
    mov [rip + hv_page_of], rax         /* this plane (0) calls the copy */
    mov rdi, HVCALL_PYKVMM_ECHO
    call hv_call_safe
    GUEST_ASSERT_EQ rcx, 6, "hypercall with the page disabled: #UD"
    lea rdi, [rip + hcpage]
    call hv_enable

    CHECK 0x7777, 0, 0, HV_STATUS_INVALID_HYPERCALL_CODE, "unknown call code"
    CHECK HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST | (1 << 27), 0, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "RsvdZ bit 27"
    CHECK HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST | (1 << 31), 0, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "nested bit"
    CHECK HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST | (1 << 32), 0, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "rep count on a simple call"
    CHECK HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST | (1 << 17), 0, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "variable header"
    CHECK HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST, 0x1234, 0, HV_STATUS_INVALID_CONNECTION_ID, "SignalEvent: no connection"
    CHECK HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST, (1 << 48), 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "SignalEvent RsvdZ"
    CHECK HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST, (1 << 24), 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "connection id bits 31:24"

    /* PostMessage input block errors. */
    lea rbx, [rip + postbuf]
    mov dword ptr [rbx + 0], 0x4321         /* no such connection */
    mov dword ptr [rbx + 8], 0x1234
    mov dword ptr [rbx + 12], 8
    CHECK HVCALL_POST_MESSAGE, rbx, 0, HV_STATUS_INVALID_CONNECTION_ID, "PostMessage: no connection"
    lea rax, [rbx + 4]
    CHECK HVCALL_POST_MESSAGE, rax, 0, HV_STATUS_INVALID_ALIGNMENT, "PostMessage: input not 8-byte aligned"
    lea rax, [rbx + 4096 - 8]
    CHECK HVCALL_POST_MESSAGE, rax, 0, HV_STATUS_INVALID_ALIGNMENT, "PostMessage: input crosses a page"
    CHECK HVCALL_POST_MESSAGE, 0x7FFFFFF000, 0, HV_STATUS_INVALID_PARAMETER, "PostMessage: input outside memory"
    CHECK HVCALL_POST_MESSAGE | HV_CONTROL_FAST, 0, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "PostMessage fast: 256 bytes do not fit"
    mov dword ptr [rbx + 12], 241
    CHECK HVCALL_POST_MESSAGE, rbx, 0, HV_STATUS_INVALID_PARAMETER, "PostMessage: payload > 240"
    mov dword ptr [rbx + 12], 8
    mov dword ptr [rbx + 8], 0x80000001
    CHECK HVCALL_POST_MESSAGE, rbx, 0, HV_STATUS_INVALID_PARAMETER, "PostMessage: hypervisor message type"

    /* SendIpi (= SendSyntheticClusterIpi) and the Ex form. */
    CHECK HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST, 0x0F, 1, HV_STATUS_INVALID_PARAMETER, "SendIpi: vector < 0x10"
    CHECK HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST, VEC_IPI, 2, HV_STATUS_INVALID_PARAMETER, "SendIpi: VP 1 does not exist"
    CHECK HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST, VEC_IPI | (0x20 << 32), 1, HV_STATUS_INVALID_PARAMETER, "SendIpi: HV_INPUT_VTL reserved bits"
    CHECK HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST, VEC_IPI | (0x11 << 32), 1, HV_STATUS_INVALID_PARAMETER, "SendIpi: VTL 1 does not exist"
    lea rbx, [rip + ipibuf]
    mov qword ptr [rbx + 0], VEC_IPI
    mov qword ptr [rbx + 8], HV_GENERIC_SET_SPARSE_4K
    mov qword ptr [rbx + 16], 1             /* bank 0 valid ... */
    CHECK HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX, rbx, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "SendIpiEx: 1 bank but no variable header"
    mov qword ptr [rbx + 8], 2
    CHECK HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX, rbx, 0, HV_STATUS_INVALID_PARAMETER, "SendIpiEx: unknown VP set format"

    CHECK HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_FAST, 0x1000, 0, HV_STATUS_SUCCESS, "NotifyLongSpinWait"
    CHECK HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_FAST, 1 << 32, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "NotifyLongSpinWait RsvdZ"

    /* Flushes. */
    lea rbx, [rip + flushbuf]
    mov qword ptr [rbx + 8], 1 << 4         /* reserved flag */
    mov qword ptr [rbx + 16], 1
    CHECK HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, rbx, 0, HV_STATUS_INVALID_PARAMETER, "Flush: reserved flags"
    mov qword ptr [rbx + 8], 0
    CHECK HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, rbx, 0, HV_STATUS_SUCCESS, "FlushVirtualAddressSpace"
    CHECK HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | (2 << 32) | (2 << 48), rbx, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, "FlushList: rep start >= rep count"
    mov rdi, HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | (3 << 32)
    mov rsi, rbx
    xor edx, edx
    call hv_call
    mov rcx, 3 << 32
    GUEST_ASSERT_EQ rax, rcx, "FlushVirtualAddressList x3: success, 3 reps completed"

    /* GetPartitionId: memory output, then fast output (RDX). */
    lea rbx, [rip + outbuf]
    CHECK HVCALL_GET_PARTITION_ID, 0, rbx, HV_STATUS_SUCCESS, "GetPartitionId"
    GUEST_ASSERT_EQ "qword ptr [rbx]", 1, "partition id (memory output)"
    mov rdi, HVCALL_GET_PARTITION_ID | HV_CONTROL_FAST
    xor esi, esi
    xor edx, edx
    call hv_call
    GUEST_ASSERT_EQ rax, 0, "GetPartitionId fast"
    GUEST_ASSERT_EQ rdx, 1, "partition id (fast output in RDX)"

    /* PykvmmEcho over REPS reps in memory, interrupted by the host at the first continuation. */
    lea rsi, [rip + echo_in]
    mov qword ptr [rsi], 1000               /* header: the addend */
    xor ecx, ecx
1:  lea rax, [rcx + 1]
    mov [rsi + 8 + rcx * 8], rax            /* in[i] = i + 1 */
    inc ecx
    cmp ecx, REPS
    jb 1b
    mov rdi, HVCALL_PYKVMM_ECHO | (REPS << 32)
    lea rdx, [rip + echo_out]
    sti
    call hv_call
    cli
    mov rcx, REPS << 32
    GUEST_ASSERT_EQ rax, rcx, "PykvmmEcho: success, all reps completed"
    lea rsi, [rip + echo_out]
    xor ecx, ecx
2:  lea rax, [rcx + 1001]
    GUEST_ASSERT_EQ "qword ptr [rsi + rcx * 8]", rax, "PykvmmEcho: out[i] = in[i] + 1000"
    inc ecx
    cmp ecx, REPS
    jb 2b
    GUEST_ASSERT_EQ "qword ptr [rip + cont_seen]", 1, "the interrupt came once, between reps"
    GUEST_SYNC 3, "qword ptr [rip + cont_progress]"

    /* PykvmmEcho fast: header and in[0] in RDX/R8, in[1..2] in XMM0; out[0..2] in XMM1/XMM2. */
    lea rbx, [rip + fxbuf]
    fxsave [rbx]
    mov qword ptr [rbx + 160], 7            /* XMM0 = in[1], in[2] */
    mov qword ptr [rbx + 168], 8
    fxrstor [rbx]
    mov rdi, HVCALL_PYKVMM_ECHO | HV_CONTROL_FAST | (3 << 32)
    mov esi, 100                            /* header */
    mov edx, 6                              /* in[0] */
    call hv_call
    mov rcx, 3 << 32
    GUEST_ASSERT_EQ rax, rcx, "PykvmmEcho fast: 3 reps"
    fxsave [rbx]
    GUEST_ASSERT_EQ "qword ptr [rbx + 160]", 7, "XMM0 (input) kept"
    GUEST_ASSERT_EQ "qword ptr [rbx + 176]", 106, "XMM1 low = out[0]"
    GUEST_ASSERT_EQ "qword ptr [rbx + 184]", 107, "XMM1 high = out[1]"
    GUEST_ASSERT_EQ "qword ptr [rbx + 192]", 108, "XMM2 low = out[2]"

    /* SendIpiEx fast, to this VP, the VP set's bank in XMM0 (RDX: vector, R8: format). */
    lea rbx, [rip + fxbuf]
    mov qword ptr [rbx + 160], 1            /* ValidBankMask = bank 0 */
    mov qword ptr [rbx + 168], 1            /* bank 0 = VP 0 */
    fxrstor [rbx]
    mov rdi, HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX | HV_CONTROL_FAST | (1 << 17)
    mov esi, VEC_IPI
    mov edx, HV_GENERIC_SET_SPARSE_4K
    call hv_call
    GUEST_ASSERT_EQ rax, 0, "SendIpiEx fast with XMM input"
3:  cmp qword ptr [rip + ipi_count], 0
    jne 4f
    sti
    hlt
    cli
    jmp 3b
4:  GUEST_ASSERT_EQ "qword ptr [rip + ipi_count]", 1, "the SendIpiEx vector arrived once"

    GUEST_SYNC 1, r12
    GUEST_DONE

ipi_handler:
    lock inc qword ptr [rip + ipi_count]
    call apic_eoi
    iretq

/* The host's interrupt at the first continuation: which reps were written by then? */
cont_handler:
    push rax
    push rcx
    lock inc qword ptr [rip + cont_seen]
    lea rax, [rip + echo_out]
    xor ecx, ecx
1:  cmp qword ptr [rax + rcx * 8], 0
    je 2f
    inc ecx
    cmp ecx, REPS
    jb 1b
2:  mov [rip + cont_progress], rcx
    pop rcx
    pop rax
    call apic_eoi
    iretq

.bss
.balign 4096
hcpage: .space 4096
postbuf: .space 4096
ipibuf: .space 4096
flushbuf: .space 4096
outbuf: .space 4096
echo_in: .space 4096
echo_out: .space 4096
.balign 16
fxbuf: .space 512
ipi_count: .space 8
cont_seen: .space 8
cont_progress: .space 8
stub_copy: .space 16
