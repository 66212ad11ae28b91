/*
 * vsm_stress (1-4 vCPUs, 2 VTLs, personality vtl; --arg = number of accesses per vCPU, 0 for
 * 300): random VTL0 accesses to pages VTL1 protected, each intercepted exactly once, VTL0
 * never seeing the data and never changing it.
 * VTL1 of vCPU0 fills STRESS_PAGES pages with a pattern (qword = PATTERN | page) and protects
 * them for VTL0: even pages ---, odd pages r-x. Its intercept handler counts per vCPU, records
 * the access type and GPA, and makes VTL0 skip the instruction (emulates `ret` for a fetch).
 * Each VTL0 (after initialising its VTL1 with a VtlCall) does, per access, from a seeded LCG:
 * a page, a qword in it and an operation: read (rbx preset to a sentinel), write, or a call
 * into the page (even pages only: an r-x page would run the pattern). Expected: an intercept
 * for every access to an even page and every write to an odd page; a read of an odd page
 * sees the pattern. After each access it checks its intercept count went up by exactly what
 * was expected, and for an intercept the type and GPA; a read that was intercepted must leave
 * the sentinel. At the end VTL1 checks every qword of every page still holds the pattern.
 * Reports per vCPU: SYNC 1 = accesses, SYNC 2 = intercepts expected (= counted: asserted),
 * SYNC 3 = pattern qwords found changed (0, vCPU0 only). DONE.
 */
.include "guest.inc"
.include "vtl.inc"
.include "hv.inc"
.include "vsm.inc"

.set STRESS_PAGES, 8
.set PATTERN, 0xA5A5000000000000
.set SENTINEL, 0x5e471e1
.set CMD_CHECK, 0xc4ec
.set DEFAULT_COUNT, 300

.text
.globl main
main:
    VTL_MAIN_DISPATCH 4
    VSM_VTL_INIT
    call vtl_call                       /* initialise this vCPU's VTL1 (vCPU0: the protections) */
    lea rdi, [rip + setup_done]
    mov esi, 1
    call pause_until_eq
    mov r12, gs:[PCPU_BOOT_INFO]
    mov r12, [r12 + BI_ARG]             /* r12 = accesses left */
    test r12, r12
    jnz 1f
    mov r12d, DEFAULT_COUNT
1:  mov r13, gs:[PCPU_VCPU]
    lea r13, [r13 * 8 + 0x1234567]      /* r13 = LCG state */
    xor r14d, r14d                      /* r14 = accesses done */
    xor r15d, r15d                      /* r15 = intercepts expected */
.Lloop:
    cmp r14, r12
    jae .Lend
    inc r14
    mov rax, 6364136223846793005
    imul r13, rax
    mov rax, 1442695040888963407
    add r13, rax
    mov rax, r13
    shr rax, 40
    mov ebx, eax
    and ebx, STRESS_PAGES - 1           /* rbx = page */
    mov ecx, eax
    shr ecx, 3
    and ecx, 511                        /* rcx = qword index */
    mov edx, eax
    shr edx, 12
    and edx, 3                          /* rdx = op: 0 read, 1 write, 2/3 call (even pages) */
    test ebx, 1
    jz 2f
    cmp edx, 2
    jb 2f
    xor edx, edx                        /* odd (r-x) page: a read instead of a call */
2:  mov rdi, rbx
    shl rdi, 12
    lea rdi, [rdi + rcx * 8]
    lea rax, [rip + stress_pages]
    add rdi, rax                        /* rdi = the address */
    /* expected intercept: even page, or a write */
    xor esi, esi
    test ebx, 1
    jz 3f
    cmp edx, 1
    jne 4f
3:  mov esi, 1
4:  add r15, rsi
    mov r8, gs:[PCPU_VCPU]
    lea r9, [rip + intercepts]
    mov r10, [r9 + r8 * 8]              /* r10 = count before */
    cmp edx, 1
    jb .Lread
    je .Lwrite
    lea rax, [rip + .Lafter]
    push rax
    jmp rdi                             /* a fetch from a --- page */
.Lread:
    mov rax, rbx                        /* keep the page in rax: rbx gets the data */
    mov rbx, SENTINEL
    mov rbx, [rdi]
    xchg rax, rbx                       /* rbx = page, rax = what the read gave */
    test esi, esi
    jnz 5f
    mov rcx, PATTERN
    or rcx, rbx
    GUEST_ASSERT_EQ rax, rcx, "a read of an r-x page sees the pattern"
    jmp .Lafter
5:  GUEST_ASSERT_EQ rax, SENTINEL, "an intercepted read left the register alone"
    jmp .Lafter
.Lwrite:
    mov qword ptr [rdi], 0xbad
.Lafter:
    mov r8, gs:[PCPU_VCPU]
    lea r9, [rip + intercepts]
    mov rax, [r9 + r8 * 8]
    sub rax, r10
    GUEST_ASSERT_EQ rax, rsi, "intercepts for this access (exactly once)"
    test esi, esi
    jz .Lloop
    lea r9, [rip + last_gpa]
    mov rax, [r9 + r8 * 8]
    mov rcx, rdi
    cmp edx, 2
    jb 6f
    and rcx, -0x1000                    /* a call's fetch is at the start of the page... */
    and rax, -0x1000                    /* ...of the qword it jumped to: compare pages */
6:  GUEST_ASSERT_EQ rax, rcx, "intercept GPA"
    lea r9, [rip + last_access]
    mov rax, [r9 + r8 * 8]
    cmp edx, 2
    jb 7f
    mov edx, HV_INTERCEPT_ACCESS_EXECUTE
7:  GUEST_ASSERT_EQ rax, rdx, "intercept access type"
    jmp .Lloop
.Lend:
    GUEST_SYNC 1, r14
    GUEST_SYNC 2, r15
    mov rax, gs:[PCPU_VCPU]
    test rax, rax
    jnz .Ldone
    /* wait for the other vCPUs, then VTL1 checks the pages */
    lea rdi, [rip + finished]
    call atomic_inc
    mov rax, gs:[PCPU_BOOT_INFO]
    mov esi, [rax + BI_VCPU_COUNT]
    cmp esi, 4
    jbe 8f
    mov esi, 4
8:  call pause_until_eq
    mov rbx, CMD_CHECK
    call vtl_call
    GUEST_SYNC 3, rdx
.Ldone:
    mov rax, gs:[PCPU_VCPU]
    test rax, rax
    jz 9f
    lea rdi, [rip + finished]
    call atomic_inc
9:  GUEST_DONE

.section .text.vtl1, "ax"
.balign 4096
vtl1_main:
    VSM_VTL_INIT
    mov rax, gs:[PCPU_VCPU]
    test rax, rax
    jnz .Lvtl1_serve
    /* fill, then protect: even pages ---, odd pages r-x */
    lea rdi, [rip + stress_pages]
    xor ecx, ecx
1:  mov rax, rcx
    shr rax, 9
    mov rdx, PATTERN
    or rax, rdx
    mov [rdi + rcx * 8], rax
    inc rcx
    cmp rcx, STRESS_PAGES * 512
    jb 1b
    xor ebx, ebx
2:  lea rdi, [rip + stress_pages]
    mov rax, rbx
    shl rax, 12
    add rdi, rax
    mov esi, 1
    xor edx, edx
    test ebx, 1
    jz 3f
    mov edx, HV_MAP_GPA_RX
3:  mov ecx, HV_INPUT_VTL_USE_TARGET | 0
    call vsm_protect
    GUEST_ASSERT_EQ rax, 1 << 32, "ModifyVtlProtectionMask"
    inc ebx
    cmp ebx, STRESS_PAGES
    jb 2b
    mov qword ptr [rip + setup_done], 1
.Lvtl1_serve:
    lea rdi, [rip + vtl1_intercept]
    lea rsi, [rip + vtl1_check]
    jmp vsm_serve

vtl1_intercept:
    mov r8, gs:[PCPU_VCPU]
    lea r9, [rip + intercepts]
    inc qword ptr [r9 + r8 * 8]
    movzx eax, byte ptr [rdi + HV_MSG_PAYLOAD + HV_IH_ACCESS_TYPE]
    lea r9, [rip + last_access]
    mov [r9 + r8 * 8], rax
    mov rax, [rdi + HV_MSG_PAYLOAD + HV_MI_GPA]
    lea r9, [rip + last_gpa]
    mov [r9 + r8 * 8], rax
    mov eax, [rdi + HV_MSG_PAYLOAD + HV_IH_VP_INDEX]
    GUEST_ASSERT_EQ rax, r8, "message VpIndex"
    cmp byte ptr [rdi + HV_MSG_PAYLOAD + HV_IH_ACCESS_TYPE], HV_INTERCEPT_ACCESS_EXECUTE
    je 1f
    jmp vsm_skip_intercepted
1:  mov edi, HV_INPUT_VTL_USE_TARGET | 0
    jmp vsm_emulate_ret

/* CMD_CHECK: rdx = pattern qwords found changed */
vtl1_check:
    xor edx, edx
    cmp rbx, CMD_CHECK
    jne 2f
    lea rdi, [rip + stress_pages]
    xor ecx, ecx
1:  mov rax, rcx
    shr rax, 9
    mov rsi, PATTERN
    or rax, rsi
    cmp [rdi + rcx * 8], rax
    je 3f
    inc rdx
3:  inc rcx
    cmp rcx, STRESS_PAGES * 512
    jb 1b
2:  clc
    ret
.balign 4096

.section .data.vtl1, "aw"
.balign 4096
stress_pages:
    .skip STRESS_PAGES * 4096

.data
setup_done: .quad 0
finished: .quad 0
intercepts: .skip 8 * 4
last_access: .skip 8 * 4
last_gpa: .skip 8 * 4
