"""TLFS "Virtual Secure Mode" > "Secure Intercepts": a lower VTL's access that a higher VTL's
protection forbids is not performed; the higher VTL is entered with EntryReason Intercept (3)
and an HvMessage of type HvMessageTypeGpaIntercept (0x80000001) carrying
HV_X64_MEMORY_INTERCEPT_MESSAGE:

    header (HV_X64_INTERCEPT_MESSAGE_HEADER): VpIndex, InstructionLength (3:0) | Cr8 (7:4),
    InterceptAccessType (0 read, 1 write, 2 execute), ExecutionState (Cpl, Cr0Pe, Cr0Am,
    EferLma, DebugActive, InterruptionPending, Vtl, InterruptShadow), CS (base, limit,
    selector, attributes), RIP (the faulting instruction), RFLAGS;
    CacheType (write-back), InstructionByteCount, MemoryAccessInfo (GvaValid), TprPriority,
    GuestVirtualAddress (valid for an execute access: RIP; a data access's GVA is not known to
    a backend that learns only the GPA, so GvaValid is clear), GuestPhysicalAddress,
    InstructionBytes (16 bytes at RIP).

Where the message goes: into SINT0's slot of the higher VTL's SynIC message page, when the
Hyper-V layer is on and that VTL enabled its SynIC and SIMP; otherwise into the (vCPU, VTL)
control page at VTL_INTERCEPT_MESSAGE (pykvmm's ABI for guests without a SynIC). The lower VTL
stays suspended with RIP on the faulting instruction until the higher VTL returns; the higher
VTL decides (skip it with HvCallSetVpRegisters, change the protection and let it retry, ...).
"""

from __future__ import annotations

import struct

from ...planes.memview import MEMORY_FAULT_EXEC, MEMORY_FAULT_READ, MEMORY_FAULT_WRITE
from ...x86 import arch, insn
from .. import abi
from . import hvdef as H

ACCESS_TYPES = {MEMORY_FAULT_READ: H.INTERCEPT_ACCESS_READ, MEMORY_FAULT_WRITE: H.INTERCEPT_ACCESS_WRITE,
                MEMORY_FAULT_EXEC: H.INTERCEPT_ACCESS_EXECUTE}


def segment_attributes(seg) -> int:
    """kvm_segment -> HV_X64_SEGMENT_REGISTER.Attributes (type 3:0, S 4, DPL 6:5, P 7,
    AVL 12, L 13, D/B 14, G 15)."""
    return (seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7 \
        | (seg.avl & 1) << 12 | (seg.l & 1) << 13 | (seg.db & 1) << 14 | (seg.g & 1) << 15


def segment_bytes(seg) -> bytes:
    return struct.pack("<QIHH", seg.base, seg.limit, seg.selector, segment_attributes(seg))


def execution_state(sregs, events, vtl: int) -> int:
    state = sregs.cs.dpl & 3
    state |= bool(sregs.cr0 & arch.CR0_PE) << 2
    state |= bool(sregs.cr0 & arch.CR0_AM) << 3
    state |= bool(sregs.efer & arch.EFER_LMA) << 4
    state |= bool(events.exception.injected or events.interrupt.injected) << 6
    state |= (vtl & 0xF) << 7
    state |= bool(events.interrupt.shadow) << 12
    return state


def memory_intercept_message(vp_index: int, vtl: int, regs, sregs, events, fault, code: bytes) -> bytes:
    """The 256-byte HvMessage for a MemoryFault of VTL ``vtl`` (registers before the access)."""
    access = ACCESS_TYPES[fault.flags]
    length = insn.length(code) if code else 0
    payload = bytearray(H.MEMORY_INTERCEPT_SIZE)
    struct.pack_into("<IBBH", payload, H.IH_VP_INDEX, vp_index, (length & 0xF) | (sregs.cr8 & 0xF) << 4,
                     access, execution_state(sregs, events, vtl))
    payload[H.IH_CS:H.IH_CS + 16] = segment_bytes(sregs.cs)
    struct.pack_into("<QQ", payload, H.IH_RIP, regs.rip, regs.rflags)
    gva_valid = fault.flags == MEMORY_FAULT_EXEC
    struct.pack_into("<IBBBB", payload, H.MI_CACHE_TYPE, H.CACHE_TYPE_WRITE_BACK, len(code),
                     H.ACCESS_INFO_GVA_VALID if gva_valid else 0, sregs.cr8 & 0xF, 0)
    struct.pack_into("<QQ", payload, H.MI_GVA, regs.rip if gva_valid else 0, fault.gpa)
    payload[H.MI_INSN_BYTES:H.MI_INSN_BYTES + len(code)] = code
    msg = bytearray(H.MESSAGE_SIZE)
    struct.pack_into("<IBBHQ", msg, H.MSG_TYPE, H.HVMSG_GPA_INTERCEPT, len(payload), 0, 0, 0)
    msg[H.MSG_PAYLOAD:H.MSG_PAYLOAD + len(payload)] = payload
    return bytes(msg)


def deliver(machine, vcpu: int, vtl: int, message: bytes) -> str:
    """Put ``message`` where VTL ``vtl`` of ``vcpu`` looks (see the module docstring); says where."""
    hv = getattr(machine, "hyperv", None)
    if hv is not None:
        vp = hv.vp(vcpu, vtl)
        synic = getattr(vp, "synic", None)
        if synic is not None and synic.enabled and synic.simp & 1:
            msg_type = int.from_bytes(message[0:4], "little")
            size = message[H.MSG_PAYLOAD_SIZE]
            with hv.lock:
                if hv.synic.deliver(vp, 0, msg_type, message[H.MSG_PAYLOAD:H.MSG_PAYLOAD + size]):
                    return "synic"
            return "synic-busy"
    machine.memory.write(abi.control_page(vcpu, vtl) + abi.VTL_INTERCEPT_MESSAGE, message)
    return "control-page"
