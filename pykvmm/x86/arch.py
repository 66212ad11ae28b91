"""Architectural constants: control-register bits, MSR numbers, x2APIC registers.

Importable without cffi or KVM: the guest build generates an assembler include from it."""

# Planes per vCPU on x86: the KVM planes RFC's limit (Hyper-V's VTLs, SEV-SNP's VMPLs fit).
MAX_PLANES = 16

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31

CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_OSXSAVE = 1 << 18

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

RFLAGS_FIXED = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9

# General-purpose registers in the order x86-64 debuggers list them (gdb's amd64 layout).
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# Shared between VTLs (TLFS "Virtual Processor State Isolation"): all of them but RSP.
SHARED_GPRS = tuple(r for r in GPRS if r != "rsp")

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_IA32_APICBASE = 0x1B
APICBASE_BSP = 1 << 8
APICBASE_X2APIC = 1 << 10
APICBASE_ENABLE = 1 << 11
APIC_DEFAULT_BASE = 0xFEE00000

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103

X2APIC_MSR_BASE = 0x800
X2APIC_ID = 0x802
X2APIC_TPR = 0x808
X2APIC_EOI = 0x80B
X2APIC_SVR = 0x80F
X2APIC_ISR0 = 0x810         # ISR bits 0-31; 0x811 bits 32-63; ... 0x817
X2APIC_ICR = 0x830
X2APIC_LVT_TIMER = 0x832
X2APIC_TIMER_INITIAL = 0x838  # TMICT
X2APIC_TIMER_CURRENT = 0x839  # TMCCT
X2APIC_TIMER_DIVIDE = 0x83E   # DCR

# LVT entries (SDM 11.5.1): the mask bit, and the timer's mode (bits 18:17)
LVT_MASKED = 1 << 16
LVT_TIMER_ONESHOT = 0 << 17
LVT_TIMER_PERIODIC = 1 << 17
LVT_TIMER_TSC_DEADLINE = 2 << 17

# exception vectors
VEC_DE, VEC_DB, VEC_NMI, VEC_BP, VEC_OF, VEC_BR, VEC_UD, VEC_NM, VEC_DF = range(9)
VEC_TS, VEC_NP, VEC_SS, VEC_GP, VEC_PF = 10, 11, 12, 13, 14
EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                   8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                   17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}
EXCEPTIONS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


if __name__ == "__main__":      # the guests' arch.inc
    from ..asminc import asm_include
    print(asm_include("pykvmm/x86/arch.py", globals()), end="")
