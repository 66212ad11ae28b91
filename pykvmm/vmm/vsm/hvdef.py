"""TLFS numbers of the Virtual Secure Mode chapter (and the data types it uses): call codes,
register names, map flags, message layouts. Values as in the TLFS and Linux's
include/hyperv/hvgdk*.h / hvhdk*.h. No behaviour here."""

from ..abi import VTL_ENTRY_INTERCEPT, VTL_ENTRY_INTERRUPT, VTL_ENTRY_VTL_CALL  # noqa: F401 (the guest ABI owns these)
from ..hyperv.tlfs import (HVCALL_ENABLE_PARTITION_VTL, HVCALL_ENABLE_VP_VTL,  # noqa: F401 (one source: hyperv/tlfs.py)
                           HVCALL_GET_VP_REGISTERS, HVCALL_MODIFY_VTL_PROTECTION_MASK, HVCALL_SET_VP_REGISTERS,
                           HVCALL_TRANSLATE_VIRTUAL_ADDRESS)

HV_PARTITION_ID_SELF = 0xFFFFFFFFFFFFFFFF
HV_VP_INDEX_SELF = 0xFFFFFFFE

# ---- statuses: the Hyper-V layer's (hyperv/tlfs.py) ------------------------------------------
from ..hyperv.tlfs import (ACCESS_DENIED, INVALID_HYPERCALL_INPUT, INVALID_PARAMETER,  # noqa: E402,F401
                           INVALID_PARTITION_ID, INVALID_PARTITION_STATE, INVALID_VP_INDEX, INVALID_VP_STATE,
                           INVALID_VTL_STATE, SUCCESS)

# ---- HV_MAP_GPA_FLAGS (the protection mask) ---------------------------------------------------
MAP_GPA_READABLE = 1 << 0
MAP_GPA_WRITABLE = 1 << 1
MAP_GPA_KERNEL_EXECUTABLE = 1 << 2
MAP_GPA_USER_EXECUTABLE = 1 << 3
MAP_GPA_MASK = 0xF

# ---- messages ---------------------------------------------------------------------------------------
from ..hyperv.tlfs import (HVMSG_GPA_INTERCEPT, HVMSG_UNMAPPED_GPA, MESSAGE_SIZE,  # noqa: E402,F401
                           MSG_HEADER_FLAGS as MSG_FLAGS, MSG_HEADER_PAYLOAD_SIZE as MSG_PAYLOAD_SIZE,
                           MSG_HEADER_SENDER as MSG_SENDER, MSG_HEADER_TYPE as MSG_TYPE, MSG_PAYLOAD)
# HV_X64_INTERCEPT_MESSAGE_HEADER (0x28 bytes)
IH_VP_INDEX = 0x00         # u32
IH_INSN_LENGTH_CR8 = 0x04  # u8: InstructionLength 3:0, Cr8 7:4
IH_ACCESS_TYPE = 0x05      # u8: HV_INTERCEPT_ACCESS_TYPE
IH_EXECUTION_STATE = 0x06  # u16: Cpl 1:0, Cr0Pe 2, Cr0Am 3, EferLma 4, DebugActive 5,
                           #      InterruptionPending 6, Vtl 10:7, EnclaveMode 11, InterruptShadow 12
IH_CS = 0x08               # HV_X64_SEGMENT_REGISTER (16 bytes)
IH_RIP = 0x18
IH_RFLAGS = 0x20
INTERCEPT_HEADER_SIZE = 0x28
# HV_X64_MEMORY_INTERCEPT_MESSAGE
MI_CACHE_TYPE = 0x28       # u32
MI_INSN_BYTE_COUNT = 0x2C  # u8
MI_ACCESS_INFO = 0x2D      # u8: GvaValid 0, GvaGpaValid 1, HypercallOutputPending 2, TlbLockedNoOverlay 3
MI_TPR_PRIORITY = 0x2E
MI_GVA = 0x30
MI_GPA = 0x38
MI_INSN_BYTES = 0x40       # 16 bytes
MEMORY_INTERCEPT_SIZE = 0x50
ACCESS_INFO_GVA_VALID = 1 << 0
INTERCEPT_ACCESS_READ = 0
INTERCEPT_ACCESS_WRITE = 1
INTERCEPT_ACCESS_EXECUTE = 2
CACHE_TYPE_WRITE_BACK = 6
