"""TLFS "Virtual MMU" TLB flushes: HvCallFlushVirtualAddressSpace (0x02), ...List (0x03, rep
of GVA ranges), and the Ex forms (0x13, 0x14) that name VPs by an HV_VP_SET.

Inputs: AddressSpace u64, Flags u64 (bit 0 AllProcessors, 1 AllVirtualAddressSpaces,
2 NonGlobalMappingsOnly, 3 UseExtendedRangeFormat; other bits -> INVALID_PARAMETER; bit 3
needs hv_tlbflush_ext), then ProcessorMask u64 (or Format + ValidBankMask + banks for Ex).
The list calls take one u64 per rep: a page number with the count of additional pages in
its low 12 bits (or the extended format). Flushing more than asked is allowed, so every
form flushes the whole TLB of each target VP in the caller's VTL.

How a TLB is flushed from userspace: KVM_SET_SREGS with CR4.PGE toggled and restored, which
makes KVM reset the vCPU's MMU context and flush. The caller's VP flushes at once; another VP
is kicked and flushes at its next exit, before it runs more guest code in that VTL; the call
returns when every target running that VTL has done so (a target in another VTL flushes when
it next runs this one). With VSM, a target whose TLB in the caller's VTL a higher VTL locked
holds the call back (vsm/tlb.py).
"""

from __future__ import annotations

import struct
import threading
import time

from ...x86 import arch
from . import tlfs as T
from .hypercall import CallSpec, HvError, processor_mask, vp_set

WAIT_LIMIT = 5.0


def flush_tlb(v) -> None:
    s = v.get_sregs()
    cr4 = s.cr4
    s.cr4 = cr4 ^ arch.CR4_PGE
    v.set_sregs(s)
    s.cr4 = cr4
    v.set_sregs(s)


class Flusher:
    def __init__(self, hv):
        self.hv = hv
        self.pending: set[tuple[int, int]] = set()
        self.done = threading.Condition(hv.lock)
        self.counts = {"tlb_flushes": 0, "remote_tlb_flushes": 0}

    def service(self, t) -> None:
        key = (t.index, t.plane)
        if key in self.pending:
            flush_tlb(t.plane_vcpu())
            self.pending.discard(key)
            self.counts["tlb_flushes"] += 1
            self.done.notify_all()

    def flush(self, call, vps: list[int]) -> None:
        hv = self.hv
        plane = call.plane
        if hv.tlb_flush_gate is not None:     # a higher VTL may have locked a target's TLB (VSM)
            hv.tlb_flush_gate(call, vps)
        wait = []
        for i in vps:
            if i == call.thread.index:
                flush_tlb(call.vcpu)
                self.counts["tlb_flushes"] += 1
                continue
            self.pending.add((i, plane))
            self.counts["remote_tlb_flushes"] += 1
            t = hv.machine.threads[i]
            if t.plane == plane and not t.done:
                t.planes_vcpu.kick()
                wait.append(t)
        deadline = time.monotonic() + WAIT_LIMIT
        while wait:
            self.service(call.thread)      # a target may be flushing us at the same time
            wait = [t for t in wait if (t.index, plane) in self.pending and t.plane == plane and not t.done]
            left = deadline - time.monotonic()
            if not wait or left <= 0 or hv.machine.stopping:
                break
            self.done.wait(min(left, 0.01))

    def summary(self) -> dict:
        return dict(self.counts)


def _check_flags(hv, flags: int) -> None:
    if flags & ~T.FLUSH_FLAGS_VALID:
        raise HvError(T.INVALID_PARAMETER, f"flush flags {flags:#x} have reserved bits")
    if flags & T.FLUSH_USE_EXTENDED_RANGE_FORMAT and not hv.config.has("tlbflush_ext"):
        raise HvError(T.INVALID_PARAMETER, "extended range format needs hv_tlbflush_ext")


def install(hv) -> None:
    f = hv.flusher = Flusher(hv)
    n = hv.machine.config.vcpus

    def targets(call, flags, mask):
        _check_flags(hv, flags)
        return list(range(n)) if flags & T.FLUSH_ALL_PROCESSORS else processor_mask(mask, n)

    def targets_ex(call, flags, fmt, banks):
        _check_flags(hv, flags)
        return list(range(n)) if flags & T.FLUSH_ALL_PROCESSORS else vp_set(fmt, banks, call.var_header, n)

    def space(call, header):
        _, flags, mask = struct.unpack("<QQQ", header)
        f.flush(call, targets(call, flags, mask))

    def space_ex(call, header):
        _, flags, fmt, banks = struct.unpack("<QQQQ", header)
        f.flush(call, targets_ex(call, flags, fmt, banks))

    # The rep forms flush everything once, at the first rep this entry processes.
    def listed(call, header, index, element):
        if index == call.rep_start:
            _, flags, mask = struct.unpack("<QQQ", header)
            f.flush(call, targets(call, flags, mask))

    def listed_ex(call, header, index, element):
        if index == call.rep_start:
            _, flags, fmt, banks = struct.unpack("<QQQQ", header)
            f.flush(call, targets_ex(call, flags, fmt, banks))

    add = hv.table.add
    add(CallSpec(T.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, "HvCallFlushVirtualAddressSpace", "tlbflush", space,
                 header_size=24))
    add(CallSpec(T.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST, "HvCallFlushVirtualAddressList", "tlbflush", listed,
                 header_size=24, rep_size=8))
    add(CallSpec(T.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX, "HvCallFlushVirtualAddressSpaceEx", "tlbflush",
                 space_ex, header_size=32, var_header=True))
    add(CallSpec(T.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX, "HvCallFlushVirtualAddressListEx", "tlbflush",
                 listed_ex, header_size=32, var_header=True, rep_size=8))
