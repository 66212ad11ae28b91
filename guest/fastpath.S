/*
 * fastpath: the exits pykvmm's exit fast path answers (pykvmm/fastexit.py), each N times
 * (BI_ARG's low 32 bits, 0 means 1000); byte 4 of BI_ARG selects the mode.
 *
 * Mode 0, a fixed number of exits (the same with the fast path on and off):
 *   1. N+1 reads of the ACPI PM timer, each no earlier than the one before (24-bit wrap);
 *   2. N reads of an absent port, each all ones, and N writes to it;
 *   3. pci-testdev's portio-no-eventfd test through its I/O BAR: N writes of the test's
 *      value and N of another value; the test's count must read N;
 *   4. its mmio-no-eventfd test through the memory BAR, moved (PCI config) to MMIO_BAR,
 *      mapped here: N writes of the value; the count must read N.
 *   GUEST_SYNC 1, <the PM timer's last value>, then DONE.
 * Mode 1, the PM timer's rate: read it, `out PORT_NULL, eax` (the host test times that exit
 *   with its own port handler), read it until RATE_TICKS have passed (each read no earlier
 *   than the one before), `out PORT_NULL, eax` with the last value, DONE.
 *
 * The ports and registers below are QEMU's pc machine's device interface (PIIX4 PM at 0x600,
 * PCI configuration mechanism #1, pci-testdev's register file), which pykvmm models in
 * pykvmm/vmm/devices/ and kvm-unit-tests uses as well; not pykvmm's guest ABI.
 */
.include "guest.inc"

.set PM_TIMER_PORT, 0x608           /* acpi_pm.py: PM_BASE + PM_TMR */
.set PM_TIMER_MASK, 0xFFFFFF
.set ABSENT_PORT, 0x1234            /* nobody's (kvm-unit-tests' inl_from_qemu reads it too) */
.set PCI_CONFIG_ADDRESS, 0xCF8
.set PCI_CONFIG_DATA, 0xCFC
.set TESTDEV_CONFIG, 0x80000000 | (2 << 11)     /* 00:02.0, enabled */
.set BAR0, 0x10
.set BAR1, 0x14
.set HDR_OFFSET, 4                  /* pci-testdev: u32 where the test's writes go */
.set HDR_DATA, 8                    /* u8 the value a write must carry */
.set HDR_COUNT, 12                  /* u32 writes counted */
.set MMIO_BAR, 0x3FF00000           /* above the guest's RAM, below 1 GiB: the first page directory */
.set RATE_TICKS, 1789772            /* 0.5 s of a 3.579545 MHz timer */

.text
.globl main
main:
    mov rax, [rdx + BI_ARG]
    mov r15d, eax                       /* N */
    test r15d, r15d
    jnz 1f
    mov r15d, 1000
1:  shr rax, 32
    test al, al
    jnz rate

    /* 1. the PM timer */
    mov dx, PM_TIMER_PORT
    in eax, dx
    mov r8d, eax
    mov ecx, r15d
2:  in eax, dx
    mov r9d, eax
    sub r9d, r8d
    and r9d, PM_TIMER_MASK
    GUEST_ASSERT_LT r9, 0x800000, "the PM timer went backwards"
    mov r8d, eax
    dec ecx
    jnz 2b
    mov r14, r8                         /* for the SYNC below */

    /* 2. the absent port */
    mov dx, ABSENT_PORT
    mov ecx, r15d
3:  in eax, dx
    GUEST_ASSERT_EQ rax, 0xFFFFFFFF, "an absent port did not read all ones"
    out dx, al
    dec ecx
    jnz 3b

    /* 3. pci-testdev through its I/O BAR */
    mov eax, TESTDEV_CONFIG | BAR1
    mov dx, PCI_CONFIG_ADDRESS
    out dx, eax
    mov dx, PCI_CONFIG_DATA
    in eax, dx
    and eax, 0xFFFC
    mov ebx, eax                        /* the I/O window */
    mov dx, bx
    xor eax, eax
    out dx, al                          /* test 0 of the window: portio-no-eventfd */
    lea edx, [ebx + HDR_OFFSET]
    in eax, dx
    lea r12d, [ebx + eax]               /* the test's port */
    lea edx, [ebx + HDR_DATA]
    in al, dx
    movzx r13d, al                      /* its value */
    mov dx, r12w
    mov ecx, r15d
4:  mov eax, r13d
    out dx, al
    not eax                             /* another value: not counted */
    out dx, al
    dec ecx
    jnz 4b
    lea edx, [ebx + HDR_COUNT]
    in eax, dx
    GUEST_ASSERT_EQ rax, r15, "pci-testdev's portio-no-eventfd count"

    /* 4. pci-testdev through its memory BAR, moved where this guest can map it */
    lea rdi, [PAGE_TABLE_ADDR + 0x2000 + 8 * (MMIO_BAR >> 21)]
    mov qword ptr [rdi], (MMIO_BAR & ~0x1FFFFF) | 0x83      /* present, writable, 2 MiB */
    invlpg [MMIO_BAR]
    mov eax, TESTDEV_CONFIG | BAR0
    mov dx, PCI_CONFIG_ADDRESS
    out dx, eax
    mov eax, MMIO_BAR
    mov dx, PCI_CONFIG_DATA
    out dx, eax
    mov rbx, MMIO_BAR
    mov byte ptr [rbx], 0               /* test 0 of the window: mmio-no-eventfd */
    mov eax, [rbx + HDR_OFFSET]
    lea r12, [rbx + rax]
    movzx r13d, byte ptr [rbx + HDR_DATA]
    mov ecx, r15d
5:  mov [r12], r13b
    dec ecx
    jnz 5b
    mov eax, [rbx + HDR_COUNT]
    GUEST_ASSERT_EQ rax, r15, "pci-testdev's mmio-no-eventfd count"

    GUEST_SYNC 1, r14
    GUEST_DONE

rate:
    mov dx, PM_TIMER_PORT
    in eax, dx
    mov r8d, eax                        /* the first value */
    mov r10d, eax                       /* the one before */
    out PORT_NULL, eax
1:  in eax, dx
    mov r9d, eax
    sub r9d, r10d
    and r9d, PM_TIMER_MASK
    GUEST_ASSERT_LT r9, 0x800000, "the PM timer went backwards"
    mov r10d, eax
    mov r9d, eax
    sub r9d, r8d
    and r9d, PM_TIMER_MASK
    cmp r9d, RATE_TICKS
    jb 1b
    out PORT_NULL, eax
    GUEST_DONE
