"""The guest ABI: every address, port, layout and code a guest under guest/ relies on.

This module is the single source of these numbers. The guest build turns it into an
assembler include (``python3 -m pykvmm.vmm.abi > abi.inc``), so guests and the VMM
cannot drift apart. It must stay importable without cffi or KVM.
"""

from ..x86.arch import MAX_PLANES  # the layout holds a control page and a stack per plane

# ---- guest-physical memory map --------------------------------------------------------
GDT_ADDR = 0x1000            # flat GDT: null, code64, data, 64-bit TSS (16 bytes)
TSS_ADDR = 0x2000
BOOT_INFO_ADDR = 0x3000      # the boot-info block below; rdx points here at entry
HYPERCALL_PAGE_ADDR = 0x4000 # stubs written by the VMM for the host's transport
PAGE_TABLE_ADDR = 0x10000    # PML4, PDPT, then page directories (2 MiB identity pages)
GUEST_LOAD_ADDR = 0x100000   # flat binary is loaded and entered here
GUEST_MAX_SIZE = 0xF00000    # the image must end below CONTROL_PAGE_BASE
CONTROL_PAGE_BASE = 0x1000000  # per (vCPU, plane) 4 KiB control page
MAX_VCPUS = 64
STACK_BASE = CONTROL_PAGE_BASE + MAX_VCPUS * MAX_PLANES * 0x1000  # 0x1400000
STACK_SIZE = 0x4000          # per (vCPU, plane); stacks grow down from the top of their slot
DEFAULT_MEM_SIZE = 64 << 20

SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_TSS = 0x18


def control_page(vcpu: int, plane: int) -> int:
    return CONTROL_PAGE_BASE + (vcpu * MAX_PLANES + plane) * 0x1000


def stack_top(vcpu: int, plane: int) -> int:
    return STACK_BASE + (vcpu * MAX_PLANES + plane + 1) * STACK_SIZE


def free_memory_start(vcpus: int) -> int:
    return STACK_BASE + vcpus * MAX_PLANES * STACK_SIZE


# ---- boot-info block (at BOOT_INFO_ADDR) ----------------------------------------------
BOOT_MAGIC = 0x31304D4D564B5950  # "PYKVMM01" little-endian
BI_MAGIC = 0x00          # u64
BI_VCPU_COUNT = 0x08     # u32
BI_PLANE_COUNT = 0x0C    # u32
BI_HYPERCALL_PAGE = 0x10 # u64
BI_CONTROL_PAGE_BASE = 0x18  # u64: control page of (v, p) = base + (v*MAX_PLANES + p)*4096
BI_MEM_SIZE = 0x20       # u64
BI_FREE_START = 0x28     # u64: first byte the guest may use freely
BI_FREE_END = 0x30       # u64
BI_ARG = 0x38            # u64: the user's --arg value (e.g. pingpong round count)
BI_SIZE = 0x40

# ---- I/O ports ---------------------------------------------------------------------
PORT_UCALL = 0xE8        # out 32-bit GPA of a ucall block
PORT_CONSOLE = 0xE9      # out bytes (single or rep outsb)
PORT_HYPERCALL = 0xEA    # hypercall transport: registers carry the call, the data byte is ignored
PORT_NULL = 0xEB         # writes are ignored: the cheapest possible exit, for benchmarks

# ---- ucall block (the kernel selftests' guest-to-host channel) --------------------------
UCALL_SYNC = 1           # args[0] = stage, args[1] = value
UCALL_ASSERT = 2         # args[0], args[1] = the compared values, file/line/msg say where
UCALL_PRINT = 3          # msg = string
UCALL_DONE = 4
UC_VERB = 0x00           # u32
UC_LINE = 0x04           # u32
UC_ARGS = 0x08           # u64[4]
UC_FILE = 0x28           # u64 GPA of NUL-terminated string, or 0
UC_MSG = 0x30            # u64 GPA of NUL-terminated string, or 0
UC_SIZE = 0x38
UCALL_STRING_MAX = 1024

# ---- hypercall page (Hyper-V offsets) ---------------------------------------------------
HCPAGE_HYPERCALL = 0x00  # call with RCX = control word, RDX/R8 = inputs; RAX = status on return
HCPAGE_VTL_CALL = 0x0F
HCPAGE_VTL_RETURN = 0x26

# ---- hypercall codes: pykvmm's own, outside Hyper-V's range (the TLFS codes and statuses
# are in hyperv/tlfs.py, and in guest/build/hvtlfs.inc for the guests) -------------------------
HVCALL_PYKVMM_NOP = 0x8001       # returns RDX + R8 in RDX, status success
HVCALL_PYKVMM_SWITCH_PLANE = 0x8002  # bare policy: RDX = target plane
HVCALL_PYKVMM_ECHO = 0x8003          # --hyperv: rep call, out[i] = in[i] + header; exercises rep/fast/XMM I/O

# ---- VTL control page (VP-assist layout, at the (vCPU, plane) control page) ---------------
VTL_ENTRY_REASON = 0x08          # u32
VTL_VINA_STATUS = 0x0C           # u8
VTL_RETURN_RAX = 0x10            # u64
VTL_RETURN_RCX = 0x18            # u64
VTL_ENTRY_RESERVED = 0
VTL_ENTRY_VTL_CALL = 1
VTL_ENTRY_INTERRUPT = 2
VTL_ENTRY_INTERCEPT = 3
VTL_INTERCEPT_MESSAGE = 0x100    # HvMessage (256 B) of the latest secure intercept, when the VTL
                                 # has no SynIC message page (pykvmm ABI; vmm/vsm/intercept.py)

if __name__ == "__main__":
    from ..asminc import asm_include
    print(asm_include("pykvmm/vmm/abi.py", globals()), end="")
