/*
 * crt.S: the guest entry point. Every plane of every vCPU enters _start (the first byte of
 * the image) with rdi = vCPU index, rsi = plane id, rdx = boot-info address and rsp = the top
 * of its own stack (see README.md for the full entry state).
 */
.include "guest.inc"

.section .text.entry, "ax"
.globl _start
.type _start, @function
_start:
    cld
    /* Check the boot-info block before trusting anything in it (uses only the stack). */
    GUEST_ASSERT_EQ "qword ptr [rdx + BI_MAGIC]", BOOT_MAGIC, "bad boot-info magic"
    cmp rdi, MAX_VCPUS
    jae .Lbad_vcpu
    cmp rsi, MAX_PLANES
    jae .Lbad_plane

    /* rbx = &pcpu_blocks[vcpu * MAX_PLANES + plane] */
    imul rcx, rdi, MAX_PLANES
    add rcx, rsi
    imul rbx, rcx, PCPU_SIZE
    lea rax, [rip + pcpu_blocks]
    add rbx, rax
    mov [rbx + PCPU_SELF], rbx
    mov [rbx + PCPU_VCPU], rdi
    mov [rbx + PCPU_PLANE], rsi
    mov [rbx + PCPU_BOOT_INFO], rdx
    mov [rbx + PCPU_INDEX], rcx
    shl rcx, 12                                 /* 4 KiB control page per (vCPU, plane) */
    add rcx, [rdx + BI_CONTROL_PAGE_BASE]
    mov [rbx + PCPU_CONTROL_PAGE], rcx

    /* GS base = the block, so runtime code can use gs:[PCPU_*]. */
    mov ecx, MSR_GS_BASE
    mov eax, ebx
    mov rdx, rbx
    shr rdx, 32
    wrmsr

    mov rdi, [rbx + PCPU_VCPU]
    mov rsi, [rbx + PCPU_PLANE]
    mov rdx, [rbx + PCPU_BOOT_INFO]
    xor ebp, ebp                                /* end of frame chain for debuggers */
    call main                                   /* rsp was 16-byte aligned before the call */
    GUEST_DONE                                  /* main returned: report DONE and halt */

.Lbad_vcpu:
    GUEST_FAIL "vCPU index out of range (>= MAX_VCPUS)", rdi, MAX_VCPUS
.Lbad_plane:
    GUEST_FAIL "plane id out of range (>= MAX_PLANES)", rsi, MAX_PLANES
.size _start, . - _start

.text
/* halt_forever: never returns; interrupts off, hlt in a loop. */
.globl halt_forever
.type halt_forever, @function
halt_forever:
    cli
1:  hlt
    jmp 1b
.size halt_forever, . - halt_forever

.bss
.balign 64
.globl pcpu_blocks
pcpu_blocks:
    .space MAX_VCPUS * MAX_PLANES * PCPU_SIZE
.size pcpu_blocks, . - pcpu_blocks
