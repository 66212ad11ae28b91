/*
 * runtime_check: a self-test of the runtime (any vCPU count; each vCPU runs it).
 * Checks, with GUEST_ASSERT_EQ (a failure reports UCALL_ASSERT and halts):
 *   - main's arguments and the per-CPU block (gs:[PCPU_*]), stack alignment at main;
 *   - every runtime function and ucall macro keeps the registers it promises to keep
 *     (sentinel values in all GPRs), and the ucall macros keep RFLAGS;
 *   - console_put_hex/put_dec/putc/puts, ucall(), spin_lock, atomic_inc, pause_until_eq,
 *     apic_*, hypercall() (HVCALL_PYKVMM_NOP 5 + 7 = 12), idt_install twice + a custom gate
 *     fired twice by self-IPIs (its handler counts in gs:[PCPU_SCRATCH]).
 * Reports: GUEST_PRINT "runtime_check ucall()" (args 1, 2, via ucall()),
 *          GUEST_SYNC 1, <x2APIC ID>; GUEST_SYNC 2, 0 when everything passed; DONE.
 */
.include "guest.inc"

.set TEST_VECTOR, 0x41

/* Sentinels: SENT_<reg> for every GPR but rsp. */
.set .Ln, 1
.irp r, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
.set SENT_\r, 0x5e00000000000000 + .Ln * 0x0101010101
.set .Ln, .Ln + 1
.endr

.macro SET_SENTINELS
.irp r, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
    mov \r, SENT_\r
.endr
.endm

/* Assert every GPR (but rsp) still holds its sentinel, except up to four named ones. */
.macro CHECK_SENTINELS what:req, skip1=none, skip2=none, skip3=none, skip4=none
.irp r, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
.ifnc \r,\skip1
.ifnc \r,\skip2
.ifnc \r,\skip3
.ifnc \r,\skip4
    GUEST_ASSERT_EQ \r, SENT_\r, "\what clobbered \r"
.endif
.endif
.endif
.endif
.endr
.endm

/* Assert a ucall macro kept RFLAGS: run it between two pushfq with CF and ZF set. */
.macro CHECK_FLAGS_KEPT what:req, macro:req, args:vararg
    stc
    cmp rsp, rsp
    pushfq
    pop qword ptr gs:[PCPU_SCRATCH + 8]
    \macro \args
    pushfq
    pop qword ptr gs:[PCPU_SCRATCH + 16]
    GUEST_ASSERT_EQ "qword ptr gs:[PCPU_SCRATCH + 8]", "qword ptr gs:[PCPU_SCRATCH + 16]", "\what changed RFLAGS"
.endm

.text
.globl main
main:
    /* Arguments, per-CPU block, stack alignment. */
    GUEST_ASSERT_EQ rdi, "qword ptr gs:[PCPU_VCPU]", "gs:[PCPU_VCPU] != rdi"
    GUEST_ASSERT_EQ rsi, "qword ptr gs:[PCPU_PLANE]", "gs:[PCPU_PLANE] != rsi"
    GUEST_ASSERT_EQ rdx, "qword ptr gs:[PCPU_BOOT_INFO]", "gs:[PCPU_BOOT_INFO] != rdx"
    GUEST_ASSERT_EQ rdx, BOOT_INFO_ADDR, "rdx != BOOT_INFO_ADDR"
    mov rbx, gs:[PCPU_SELF]
    GUEST_ASSERT_EQ rbx, "qword ptr [rbx + PCPU_SELF]", "PCPU_SELF"
    imul rax, rdi, MAX_PLANES
    add rax, rsi
    GUEST_ASSERT_EQ rax, "qword ptr gs:[PCPU_INDEX]", "PCPU_INDEX"
    shl rax, 12
    add rax, CONTROL_PAGE_BASE
    GUEST_ASSERT_EQ rax, "qword ptr gs:[PCPU_CONTROL_PAGE]", "PCPU_CONTROL_PAGE"
    lea rax, [rsp + 8]
    and rax, 15
    GUEST_ASSERT_EQ rax, 0, "rsp + 8 not 16-byte aligned at main"
    mov qword ptr gs:[PCPU_SCRATCH], 0

    /* ucall macros keep all GPRs and RFLAGS. */
    SET_SENTINELS
    GUEST_PRINT "runtime_check: sentinels set", rax, r15
    GUEST_ASSERT_EQ rcx, rcx, "never"
    CHECK_SENTINELS GUEST_PRINT/GUEST_ASSERT_EQ
    CHECK_FLAGS_KEPT GUEST_PRINT, GUEST_PRINT, "flags"
    CHECK_FLAGS_KEPT GUEST_ASSERT_EQ, GUEST_ASSERT_EQ, 1, 1, "never"
    CHECK_SENTINELS CHECK_FLAGS_KEPT

    /* ucall(): PRINT with args 1, 2. */
    SET_SENTINELS
    mov edi, UCALL_PRINT
    mov esi, 1
    mov edx, 2
    lea rcx, [rip + msg_ucall]
    call ucall
    GUEST_ASSERT_EQ rdi, UCALL_PRINT, "ucall clobbered rdi"
    GUEST_ASSERT_EQ rsi, 1, "ucall clobbered rsi"
    GUEST_ASSERT_EQ rdx, 2, "ucall clobbered rdx"
    lea rax, [rip + msg_ucall]
    GUEST_ASSERT_EQ rcx, rax, "ucall clobbered rcx"
    mov rax, SENT_rax
    CHECK_SENTINELS ucall, rdi, rsi, rdx, rcx

    /* Console. */
    lea rdi, [rip + console_lock]
    call spin_lock
    CONSOLE_PUTS "runtime_check vCPU "
    SET_SENTINELS
    mov rdi, gs:[PCPU_VCPU]
    call console_put_dec
    GUEST_ASSERT_EQ rdi, "qword ptr gs:[PCPU_VCPU]", "console_put_dec clobbered rdi"
    mov rdi, SENT_rdi
    CHECK_SENTINELS console_put_dec
    mov edi, ':'
    call console_putc
    mov edi, ' '
    call console_putc
    mov rdi, 0xdeadbeef
    call console_put_hex
    CONSOLE_PUTS " "
    xor edi, edi
    call console_put_hex
    CONSOLE_PUTS " "
    mov rdi, -1
    call console_put_dec
    CONSOLE_PUTS " "
    mov rdi, -1
    call console_put_hex
    CONSOLE_PUTS " (expect deadbeef 0 18446744073709551615 ffffffffffffffff)\n"
    SET_SENTINELS
    lea rdi, [rip + msg_ucall]
    call console_puts
    CONSOLE_PUTS "\n"
    lea rax, [rip + msg_ucall]
    GUEST_ASSERT_EQ rdi, rax, "console_puts clobbered rdi"
    mov rdi, SENT_rdi
    mov rax, SENT_rax
    CHECK_SENTINELS console_puts/CONSOLE_PUTS
    lea rdi, [rip + console_lock]
    call spin_unlock

    /* Shared-memory helpers. */
    SET_SENTINELS
    lea rdi, [rip + counter]
    call atomic_inc
    lea rdi, [rip + test_lock]
    call spin_lock
    call spin_unlock
    lea rdi, [rip + flag]
    mov rsi, [rip + flag]
    call pause_until_eq
    mov rdi, SENT_rdi
    mov rsi, SENT_rsi
    CHECK_SENTINELS atomic_inc/spin_lock/pause_until_eq

    /* APIC. */
    SET_SENTINELS
    call apic_enable
    mov edi, 0
    call apic_set_tpr
    call apic_eoi
    mov rdi, SENT_rdi
    CHECK_SENTINELS apic_enable/apic_set_tpr/apic_eoi
    call apic_id
    mov gs:[PCPU_SCRATCH + 24], rax
    SET_SENTINELS
    call apic_id
    call apic_in_service
    CHECK_SENTINELS apic_id/apic_in_service, rax

    /* hypercall(): NOP 5 + 7. */
    SET_SENTINELS
    mov edi, HVCALL_PYKVMM_NOP
    mov esi, 5
    mov edx, 7
    call hypercall
    and eax, 0xffff
    GUEST_ASSERT_EQ rax, HV_STATUS_SUCCESS, "hypercall(NOP) status"
    GUEST_ASSERT_EQ rdx, 12, "hypercall(NOP) rdx"
    mov rdi, SENT_rdi
    mov rsi, SENT_rsi
    CHECK_SENTINELS hypercall, rax, rdx

    /* IDT: install twice (keeps the custom gate), then fire it. */
    SET_SENTINELS
    call idt_install
    SET_HANDLER TEST_VECTOR, test_handler
    call idt_install
    GUEST_ASSERT_EQ rdi, TEST_VECTOR, "idt_set_handler clobbered rdi"
    lea rax, [rip + test_handler]
    GUEST_ASSERT_EQ rsi, rax, "idt_set_handler clobbered rsi"
    mov rdi, SENT_rdi
    mov rsi, SENT_rsi
    mov rax, SENT_rax
    CHECK_SENTINELS idt_install/idt_set_handler
    /* Fire the gate twice with self-IPIs (`int n` is not used: the PVM host fails to emulate
     * it, KVM_EXIT_INTERNAL_ERROR). */
    mov rdi, gs:[PCPU_SCRATCH + 24]     /* our x2APIC ID */
    mov esi, TEST_VECTOR
    call apic_send_ipi
    mov ebx, 1
    call .Lwait_count
    call apic_send_ipi
    mov ebx, 2
    call .Lwait_count
    GUEST_ASSERT_EQ "qword ptr gs:[PCPU_SCRATCH]", 2, "TEST_VECTOR handler count"

    GUEST_SYNC 1, "qword ptr gs:[PCPU_SCRATCH + 24]"
    GUEST_SYNC 2, 0
    GUEST_DONE

/* Wait (cli; check; sti; hlt) until gs:[PCPU_SCRATCH] >= rbx; returns with IF=0. */
.Lwait_count:
    cli
    cmp gs:[PCPU_SCRATCH], rbx
    jae 1f
    sti
    hlt
    jmp .Lwait_count
1:  ret

test_handler:
    inc qword ptr gs:[PCPU_SCRATCH]
    call apic_eoi
    iretq

.section .rodata
msg_ucall: .asciz "runtime_check ucall()"

.bss
.balign 64
counter:   .space 8
flag:      .space 8
test_lock: .space 8
