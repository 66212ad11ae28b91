/*
 * hv_msrs (--hyperv, 1 vCPU): the synthetic MSRs as a table of (op, MSR, value, expected
 * vector, expected read value) rows, run in order; every #GP the TLFS asks for, every value.
 * Then the CPUID leaves (SYNC 0x10+n, value) for the host to compare with what it built,
 * the reference TSC page against TIME_REF_COUNT (SYNC 0x20, |page - msr| in 100 ns), and
 * SYNC 0x30, the number of rows; then a self-IPI (0x42) sent through HV_X64_MSR_ICR and
 * ended through HV_X64_MSR_EOI: SYNC 0x40, the vector read back from HV_X64_MSR_ICR;
 * SYNC 0x41, interrupts taken (1).
 */
.include "guest.inc"
.include "hv.inc"

.set OP_READ, 0
.set OP_WRITE, 1
.set ANY, 0xFFFFFFFFFFFFFFFF        /* a read whose value is not checked */
.set GP, 13

.macro ROW op, msr, value, vec, expect=ANY
    .quad \op, \msr, \value, \vec, \expect
.endm
.macro RD msr, expect=ANY
    ROW OP_READ, \msr, 0, 0, \expect
.endm
.macro RD_GP msr
    ROW OP_READ, \msr, 0, GP
.endm
.macro WR msr, value
    ROW OP_WRITE, \msr, \value, 0
.endm
.macro WR_GP msr, value
    ROW OP_WRITE, \msr, \value, GP
.endm

.section .rodata
.balign 8
rows:
    RD HV_MSR_GUEST_OS_ID, 0
    RD HV_MSR_HYPERCALL, 0
    WR_GP HV_MSR_HYPERCALL, hcpage + 1                   /* enable before GUEST_OS_ID */
    WR_GP HV_MSR_VP_INDEX, 5                             /* read-only */
    RD HV_MSR_VP_INDEX, 0
    WR_GP HV_MSR_VP_RUNTIME, 1
    RD HV_MSR_SVERSION, 1
    WR_GP HV_MSR_SVERSION, 2
    RD HV_MSR_EOM, 0
    RD HV_MSR_SCONTROL, 0
    RD HV_MSR_SINT0, HV_SINT_MASKED
    WR_GP HV_MSR_SINT0, 0x05                             /* unmasked vector < 16 */
    WR HV_MSR_SINT0, HV_SINT_MASKED | 0x05
    WR HV_MSR_SINT0 + 15, 0x30 | HV_SINT_AUTO_EOI
    RD HV_MSR_SINT0 + 15, 0x30 | HV_SINT_AUTO_EOI
    WR HV_MSR_SIMP, 0xF00                                /* RsvdP bits: kept, no #GP */
    RD HV_MSR_SIMP, 0xF00
    WR_GP HV_MSR_SIMP, 0x7FFFFFF000 | 1                  /* page outside guest memory */
    WR HV_MSR_SIMP, 0
    WR_GP HV_MSR_STIMER0_CONFIG, 1 << 13                 /* RsvdZ 15:13 */
    WR_GP HV_MSR_STIMER0_CONFIG + 2, 1 << 20             /* RsvdZ 63:20 */
    WR_GP HV_MSR_STIMER0_CONFIG + 4, HV_STIMER_DIRECT_MODE | HV_STIMER_ENABLE | (5 << 4)  /* vector < 16 */
    WR HV_MSR_STIMER0_CONFIG + 6, HV_STIMER_PERIODIC | (2 << 16)
    RD HV_MSR_STIMER0_CONFIG + 6, HV_STIMER_PERIODIC | (2 << 16)
    WR HV_MSR_STIMER0_COUNT + 6, 12345
    RD HV_MSR_STIMER0_COUNT + 6, 12345
    WR HV_MSR_STIMER0_CONFIG + 6, 0
    WR_GP HV_MSR_RESET, 2                                /* RsvdZ 63:1 */
    RD HV_MSR_RESET, 0
    WR_GP HV_MSR_CRASH_CTL, 1                            /* RsvdZ 61:0 */
    RD HV_MSR_CRASH_CTL, HV_CRASH_CTL_NOTIFY
    WR HV_MSR_CRASH_P0 + 4, 0x4444
    RD HV_MSR_CRASH_P0 + 4, 0x4444
    WR_GP HV_MSR_TIME_REF_COUNT, 0
    RD HV_MSR_TIME_REF_COUNT
    WR_GP HV_MSR_TSC_FREQUENCY, 0
    RD HV_MSR_APIC_FREQUENCY, 1000000000
    RD_GP HV_MSR_EOI                                     /* write-only */
    WR HV_MSR_TPR, 0x20
    RD HV_MSR_TPR, 0x20
    WR HV_MSR_TPR, 0
    WR_GP HV_MSR_TPR, 0x100                              /* the x2APIC refuses TPR bits 63:8 */
    WR HV_MSR_VP_ASSIST_PAGE, 0
    RD_GP 0x400000FF                                     /* not a synthetic MSR */
    WR_GP 0x40000199, 0
    WR HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_VALUE
    WR HV_MSR_HYPERCALL, hcpage + 1
    RD HV_MSR_HYPERCALL, hcpage + 1
    WR HV_MSR_HYPERCALL, hcpage + 3                      /* lock it */
    WR_GP HV_MSR_HYPERCALL, hcpage + 0x1000 + 1          /* locked */
    WR HV_MSR_GUEST_OS_ID, 0                             /* disables the page ... */
    RD HV_MSR_HYPERCALL, hcpage + 2                      /* ... keeping the lock */
rows_end:

.text
.globl main
main:
    call idt_install
    call hv_safe_install
    lea rbx, [rip + rows]
    xor r12d, r12d                      /* row index */
.Lrow:
    lea rax, [rip + rows_end]
    cmp rbx, rax
    jae .Lrows_done
    mov rdi, [rbx + 8]
    cmp qword ptr [rbx], OP_WRITE
    jne .Lread
    mov rsi, [rbx + 16]
    call wrmsr_safe
    jmp .Lcheck
.Lread:
    call rdmsr_safe
.Lcheck:
    mov r13, r12
    shl r13, 8
    mov r14, r13
    or r13, rax                         /* row << 8 | vector taken */
    or r14, [rbx + 24]                  /* row << 8 | vector expected */
    GUEST_ASSERT_EQ r13, r14, "MSR row: vector taken (row << 8 | vector)"
    mov rax, [rbx + 32]
    cmp rax, ANY
    je .Lnext
    GUEST_ASSERT_EQ rdx, rax, "MSR row: value read"
.Lnext:
    add rbx, 40
    inc r12
    jmp .Lrow
.Lrows_done:
    /* CPUID leaves for the host to compare. */
    mov r15d, 0x40000000
    xor r14d, r14d
.Lleaf:
    mov eax, r15d
    xor ecx, ecx
    cpuid
    mov r13, 0x10
    add r13, r14
    GUEST_SYNC r13, rax
    GUEST_SYNC r13, rbx
    GUEST_SYNC r13, rcx
    GUEST_SYNC r13, rdx
    inc r14
    inc r15d
    cmp r15d, 0x4000000B
    jb .Lleaf
    /* Reference TSC page against TIME_REF_COUNT. */
    mov edi, HV_MSR_REFERENCE_TSC
    lea rsi, [rip + tscpage]
    or rsi, 1
    call wrmsr_safe
    GUEST_ASSERT_EQ rax, 0, "REFERENCE_TSC write"
    lea rbx, [rip + tscpage]
    mov eax, [rbx + HV_TSC_PAGE_SEQUENCE]
    test eax, eax
    jnz 1f
    GUEST_FAIL "TSC page sequence is 0"
1:  rdtsc
    shl rdx, 32
    or rax, rdx
    mul qword ptr [rbx + HV_TSC_PAGE_SCALE]
    add rdx, [rbx + HV_TSC_PAGE_OFFSET]
    mov r13, rdx                        /* reference time from the page */
    mov edi, HV_MSR_TIME_REF_COUNT
    call rdmsr_safe
    sub rdx, r13                        /* msr - page: small and not negative */
    GUEST_SYNC 0x20, rdx
    GUEST_SYNC 0x30, r12

    /* hv_vapic: a self-IPI through HV_X64_MSR_ICR, ended through HV_X64_MSR_EOI. */
    SET_HANDLER 0x42, vapic_handler
    call apic_enable
    mov edi, HV_MSR_ICR
    mov rsi, 0x42 | APIC_ICR_LEVEL_ASSERT   /* fixed, physical, destination APIC ID 0 */
    call wrmsr_safe
    GUEST_ASSERT_EQ rax, 0, "HV ICR write"
1:  cmp qword ptr [rip + vapic_count], 0
    jne 2f
    sti
    hlt
    cli
    jmp 1b
2:  mov edi, HV_MSR_ICR
    call rdmsr_safe
    and edx, 0xFF
    GUEST_SYNC 0x40, rdx                /* the ICR reads back through HV_X64_MSR_ICR */
    GUEST_SYNC 0x41, [rip + vapic_count]
    GUEST_DONE

vapic_handler:
    push rax
    push rdx
    push rdi
    push rsi
    lock inc qword ptr [rip + vapic_count]
    mov edi, HV_MSR_EOI
    xor esi, esi
    call wrmsr_safe
    pop rsi
    pop rdi
    pop rdx
    pop rax
    iretq

.bss
.balign 4096
hcpage: .space 4096
tscpage: .space 4096
vapic_count: .space 8
