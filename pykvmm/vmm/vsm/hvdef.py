"""TLFS numbers of the Virtual Secure Mode chapter (and the data types it uses): call codes,
map flags, message layouts, as vsm/ names them. Their one source is hyperv/tlfs.py (which the
guests' hvtlfs.inc is generated from); this module only gathers them. No behaviour here."""

from ..abi import VTL_ENTRY_INTERCEPT, VTL_ENTRY_INTERRUPT, VTL_ENTRY_VTL_CALL  # noqa: F401 (the guest ABI owns these)
from ..hyperv.tlfs import (HVCALL_ENABLE_PARTITION_VTL, HVCALL_ENABLE_VP_VTL,  # noqa: F401 (one source: hyperv/tlfs.py)
                           HVCALL_GET_VP_REGISTERS, HVCALL_MODIFY_VTL_PROTECTION_MASK, HVCALL_SET_VP_REGISTERS,
                           HVCALL_TRANSLATE_VIRTUAL_ADDRESS)

from ..hyperv.tlfs import (PARTITION_ID_SELF as HV_PARTITION_ID_SELF,  # noqa: E402,F401
                           VP_INDEX_SELF as HV_VP_INDEX_SELF)

# ---- statuses: the Hyper-V layer's (hyperv/tlfs.py) ------------------------------------------
from ..hyperv.tlfs import (ACCESS_DENIED, INVALID_HYPERCALL_INPUT, INVALID_PARAMETER,  # noqa: E402,F401
                           INVALID_PARTITION_ID, INVALID_PARTITION_STATE, INVALID_VP_INDEX, INVALID_VP_STATE,
                           INVALID_VTL_STATE, SUCCESS)

# ---- HV_MAP_GPA_FLAGS (the protection mask) ---------------------------------------------------
from ..hyperv.tlfs import (MAP_GPA_KERNEL_EXECUTABLE, MAP_GPA_MASK, MAP_GPA_READABLE,  # noqa: E402,F401
                           MAP_GPA_USER_EXECUTABLE, MAP_GPA_WRITABLE)

# ---- messages ---------------------------------------------------------------------------------------
from ..hyperv.tlfs import (HVMSG_GPA_INTERCEPT, HVMSG_UNMAPPED_GPA, MESSAGE_SIZE,  # noqa: E402,F401
                           MSG_HEADER_FLAGS as MSG_FLAGS, MSG_HEADER_PAYLOAD_SIZE as MSG_PAYLOAD_SIZE,
                           MSG_HEADER_SENDER as MSG_SENDER, MSG_HEADER_TYPE as MSG_TYPE, MSG_PAYLOAD)
# HV_X64_INTERCEPT_MESSAGE_HEADER, HV_X64_MEMORY_INTERCEPT_MESSAGE
from ..hyperv.tlfs import (ACCESS_INFO_GVA_VALID, CACHE_TYPE_WRITE_BACK, IH_ACCESS_TYPE,  # noqa: E402,F401
                           IH_CS, IH_EXECUTION_STATE, IH_INSN_LENGTH_CR8, IH_RFLAGS, IH_RIP, IH_VP_INDEX,
                           INTERCEPT_ACCESS_EXECUTE, INTERCEPT_ACCESS_READ, INTERCEPT_ACCESS_WRITE,
                           INTERCEPT_HEADER_SIZE, MEMORY_INTERCEPT_SIZE, MI_ACCESS_INFO, MI_CACHE_TYPE, MI_GPA,
                           MI_GVA, MI_INSN_BYTE_COUNT, MI_INSN_BYTES, MI_TPR_PRIORITY)
