"""TLFS "Partition and Virtual Processor" state reached through MSRs: guest OS identity,
the hypercall page MSR, VP index and runtime, the reset and crash MSRs, the VP assist page;
plus HvCallGetPartitionId and HvCallNotifyLongSpinWait.

Reserved bits: HYPERCALL 11:2, REFERENCE_TSC and VP_ASSIST_PAGE 11:1 are RsvdP (kept as
written, ignored); RESET 63:1 and CRASH_CTL 61:0 are RsvdZ (#GP). Read-only MSRs
(VP_INDEX, VP_RUNTIME) #GP on write. Enabling the hypercall page before a non-zero
GUEST_OS_ID, or changing a locked HYPERCALL MSR, #GPs; writing GUEST_OS_ID = 0 disables
the page again.
"""

from __future__ import annotations

import os
import time

from . import tlfs as T
from .hypercall import CallSpec, page_bytes
from .partition import MsrFault

PARTITION_ID = 1


def install(hv) -> None:
    page = page_bytes()

    def read_os_id(vp):
        return hv.planes[vp.plane].guest_os_id

    def write_os_id(vp, value):
        ps = hv.planes[vp.plane]
        ps.guest_os_id = value
        if value == 0:
            hv.place_overlay("hypercall", None, vp.plane, ps.hypercall, ps.hypercall & ~T.HYPERCALL_ENABLE)
            ps.hypercall &= ~T.HYPERCALL_ENABLE

    def read_hypercall(vp):
        return hv.planes[vp.plane].hypercall

    def write_hypercall(vp, value):
        ps = hv.planes[vp.plane]
        if ps.hypercall & T.HYPERCALL_LOCKED and value != ps.hypercall:
            raise MsrFault("HV_X64_MSR_HYPERCALL is locked")
        if value & T.HYPERCALL_ENABLE:
            if not ps.guest_os_id:
                raise MsrFault("hypercall page enabled before HV_X64_MSR_GUEST_OS_ID was set")
            gpa = value & ~0xFFF
            if gpa + 0x1000 > hv.memory.size:
                raise MsrFault(f"hypercall page GPA {gpa:#x} is outside guest memory")
        hv.place_overlay("hypercall", None, vp.plane, ps.hypercall, value)
        if value & T.HYPERCALL_ENABLE:
            hv.memory.write(value & ~0xFFF, page)
        ps.hypercall = value

    hv.add_msr(T.MSR_GUEST_OS_ID, "HV_X64_MSR_GUEST_OS_ID", read_os_id, write_os_id)
    hv.add_msr(T.MSR_HYPERCALL, "HV_X64_MSR_HYPERCALL", read_hypercall, write_hypercall)
    hv.add_msr(T.MSR_VP_INDEX, "HV_X64_MSR_VP_INDEX", lambda vp: vp.index, None, feature="vpindex")
    # VP_RUNTIME: the vCPU thread's CPU time (KVM_RUN included), read on that thread.
    hv.add_msr(T.MSR_VP_RUNTIME, "HV_X64_MSR_VP_RUNTIME", lambda vp: time.thread_time_ns() // 100, None,
               feature="runtime")

    def write_reset(vp, value):
        if value & ~1:
            raise MsrFault("HV_X64_MSR_RESET bits 63:1 are RsvdZ")
        if value & 1:
            t = hv.machine.threads[vp.index]
            hv.stop_machine(t, f"vcpu{vp.index}/vtl{vp.plane} requested a reset through HV_X64_MSR_RESET "
                               f"(pykvmm does not reboot a guest)")
    hv.add_msr(T.MSR_RESET, "HV_X64_MSR_RESET", lambda vp: 0, write_reset, feature="reset")

    crash = [0] * T.CRASH_PARAMS
    for i in range(T.CRASH_PARAMS):
        def rd(vp, i=i):
            return crash[i]

        def wr(vp, value, i=i):
            crash[i] = value
        hv.add_msr(T.MSR_CRASH_P0 + i, f"HV_X64_MSR_CRASH_P{i}", rd, wr, feature="crash")

    def write_crash_ctl(vp, value):
        if value & ~(T.CRASH_CTL_NOTIFY | T.CRASH_CTL_MESSAGE):
            raise MsrFault("HV_X64_MSR_CRASH_CTL bits 61:0 are RsvdZ")
        if value & T.CRASH_CTL_NOTIFY:
            t = hv.machine.threads[vp.index]
            hv.stop_machine(t, f"guest crash notification from vcpu{vp.index}/vtl{vp.plane} (HV_X64_MSR_CRASH_CTL): "
                               + " ".join(f"P{i}={v:#x}" for i, v in enumerate(crash)))
    hv.add_msr(T.MSR_CRASH_CTL, "HV_X64_MSR_CRASH_CTL", lambda vp: T.CRASH_CTL_NOTIFY, write_crash_ctl,
               feature="crash")

    def write_assist(vp, value):
        if value & T.PAGE_ENABLE and (value & ~0xFFF) + 0x1000 > hv.memory.size:
            raise MsrFault(f"VP assist page {value & ~0xFFF:#x} is outside guest memory")
        hv.place_overlay("vp_assist", vp.index, vp.plane, vp.vp_assist, value)
        vp.vp_assist = value
    hv.add_msr(T.MSR_VP_ASSIST_PAGE, "HV_X64_MSR_VP_ASSIST_PAGE", lambda vp: vp.vp_assist, write_assist,
               feature="vapic")

    def get_partition_id(call, header):
        return PARTITION_ID.to_bytes(8, "little")
    hv.table.add(CallSpec(T.HVCALL_GET_PARTITION_ID, "HvCallGetPartitionId", None, get_partition_id, out_size=8))

    def notify_long_spin_wait(call, header):
        # Input: SpinCount u32, then RsvdZ u32. The caller spins on a lock a preempted vCPU
        # holds: give the host CPU away once.
        if int.from_bytes(header[4:8], "little"):
            from .hypercall import HvError
            raise HvError(T.INVALID_HYPERCALL_INPUT, "NotifyLongSpinWait reserved bits set")
        os.sched_yield()
        hv.stats["long_spin_waits"] = hv.stats.get("long_spin_waits", 0) + 1
        return None
    hv.table.add(CallSpec(T.HVCALL_NOTIFY_LONG_SPIN_WAIT, "HvCallNotifyLongSpinWait", None,
                          notify_long_spin_wait, header_size=8))
