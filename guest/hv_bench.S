/*
 * hv_bench (--hyperv, 1 vCPU, 1 plane): N Hyper-V operations for `make bench` (row 9).
 * --arg = N | mode << 32 (N = 0 means 10000), mode:
 *   1  hypercall round trip: HvCallGetPartitionId (memory output) through the page HV_X64_MSR_HYPERCALL names
 *   2  synthetic MSR read: rdmsr HV_X64_MSR_VP_INDEX (an MSR-filter exit to pykvmm)
 *   3  SynIC message: HvCallPostMessage to a hyperv-testdev connection on this VP's SINT2, then
 *      wait for the SINT handler to take it from the message page (free the slot, EOM if
 *      pending, EOI): delivery latency and its handshake
 *   4  the reference in the same guest: a bare PIO exit (`out PORT_NULL`, which pykvmm ignores)
 * Reports: SYNC 1, N after the loop; DONE. The guest checks each status and value itself.
 */
.include "guest.inc"
.include "hv.inc"

.set DEFAULT_N, 10000
.set V_SINT, 0x50
.set CONN, 0x20
.set MSG_TYPE, 0x77
.set SLOT2, 2 * HV_MESSAGE_SIZE
.set MODE_HYPERCALL, 1
.set MODE_MSR, 2
.set MODE_MESSAGE, 3
.set MODE_PIO, 4

.text
.globl main
main:
    test rdi, rdi
    jnz .Ldone
    BENCH_ARGS DEFAULT_N
    mov r12, rcx                        /* the mode */
    call idt_install
    lea rdi, [rip + hcpage]
    call hv_enable
    cmp r12, MODE_HYPERCALL
    je hypercalls
    cmp r12, MODE_MSR
    je msrs
    cmp r12, MODE_MESSAGE
    je messages
    cmp r12, MODE_PIO
    je pio
    GUEST_ASSERT_EQ r12, MODE_PIO, "unknown mode (byte 4 of --arg)"

/* The loops run as few instructions besides the exit as the PIO loop (guest instructions are
 * not free on every host): results are ORed into r14 and checked once at the end. */
hypercalls:
    mov rbx, [rip + rounds]
    lea r13, [rip + post]
    lea r15, [rip + hcpage]
    xor r14d, r14d
1:  mov ecx, HVCALL_GET_PARTITION_ID
    xor edx, edx
    mov r8, r13                         /* output GPA */
    call r15
    or r14, rax
    dec rbx
    jnz 1b
    GUEST_ASSERT_EQ r14, HV_STATUS_SUCCESS, "HvCallGetPartitionId status"
    jmp .Lreport

msrs:
    mov rbx, [rip + rounds]
    xor r14d, r14d
1:  mov ecx, HV_MSR_VP_INDEX
    rdmsr
    or r14, rax
    dec rbx
    jnz 1b
    GUEST_ASSERT_EQ r14, 0, "VP_INDEX of vCPU0"
    jmp .Lreport

messages:
    SET_HANDLER V_SINT, sint2
    call apic_enable
    lea rax, [rip + simp]
    or rax, HV_PAGE_ENABLE
    mov edx, eax
    shr rax, 32
    xchg rax, rdx
    mov ecx, HV_MSR_SIMP
    wrmsr
    mov eax, HV_SCONTROL_ENABLE
    xor edx, edx
    mov ecx, HV_MSR_SCONTROL
    wrmsr
    mov eax, V_SINT
    mov ecx, HV_MSR_SINT0 + 2
    wrmsr
    TESTDEV HV_TESTDEV_MSG_CONN_CREATE, 0, 2, CONN
    lea rbx, [rip + post]
    mov dword ptr [rbx], CONN           /* HV_POST_MESSAGE_INPUT: ConnectionId, */
    mov dword ptr [rbx + 8], MSG_TYPE   /* MessageType, */
    mov dword ptr [rbx + 12], 8         /* PayloadSize, */
    mov qword ptr [rbx + 16], 0x1111    /* Payload */
    lea r15, [rip + hcpage]
    xor r14d, r14d
    sti
    xor r13d, r13d
1:  inc r13
    mov ecx, HVCALL_POST_MESSAGE
    mov rdx, rbx
    xor r8d, r8d
    call r15
    or r14, rax
2:  cmp [rip + received], r13
    je 3f
    pause
    jmp 2b
3:  cmp r13, [rip + rounds]
    jb 1b
    cli
    GUEST_ASSERT_EQ r14, HV_STATUS_SUCCESS, "HvCallPostMessage status"
    jmp .Lreport

pio:
    mov rbx, [rip + rounds]
1:  out PORT_NULL, al
    dec rbx
    jnz 1b

.Lreport:
    GUEST_SYNC 1, [rip + rounds]
.Ldone:
    GUEST_DONE

/* SINT2: the message must be ours; free the slot (a full barrier, as the TLFS asks), EOM when
 * another one is pending, EOI. */
sint2:
    push rax
    push rcx
    push rdx
    lea rdx, [rip + simp]
    add rdx, SLOT2
    mov eax, [rdx]
    GUEST_ASSERT_EQ rax, MSG_TYPE, "message type in SINT2's slot"
    xor eax, eax
    xchg [rdx], eax
    test byte ptr [rdx + HV_MSG_HEADER_FLAGS], HV_MSG_FLAG_PENDING
    jz 1f
    mov ecx, HV_MSR_EOM
    xor edx, edx
    wrmsr
1:  inc qword ptr [rip + received]
    call apic_eoi
    pop rdx
    pop rcx
    pop rax
    iretq

.bss
.balign 4096
hcpage: .space 4096
simp:   .space 4096
post:   .space 256
.balign 8
rounds:   .space 8
received: .space 8
