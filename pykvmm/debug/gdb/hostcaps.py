"""What this host's KVM does with guest debugging, probed once on a scratch VM: int3 as a debug
exit (software breakpoints), data breakpoints (hardware watchpoints), KVM_GUESTDBG_BLOCKIRQ."""

from __future__ import annotations

from ...kvm import Kvm, KvmError
from ...uapi import constants as C
from ...vmm.host import convention


class HostDebugCaps:
    """What this host's KVM does with guest debugging (probed on a scratch VM)."""

    def __init__(self, sw_bp: bool = True, watch: bool = True, blockirq: bool = True, detail: str = "",
                 exec_bp: bool = True):
        self.sw_bp, self.watch, self.blockirq, self.detail = sw_bp, watch, blockirq, detail
        self.exec_bp = exec_bp        # an execution breakpoint in a debug register stops the guest

    def __repr__(self):
        return f"HostDebugCaps(sw_bp={self.sw_bp}, watch={self.watch}, blockirq={self.blockirq})"


_PROBE_SW = b"\xCC\xE6\xEB\xEB\xFE"                                    # int3; out 0xeb, al; jmp $
_PROBE_WATCH = b"\xC6\x04\x25\x00\x00\x20\x00\x01\xE6\xEB\xEB\xFE"      # mov byte [0x200000], 1; out; jmp $


def probe_host(backend: str, kvm_device: str) -> HostDebugCaps:
    from ... import exits as X
    from ...vmm.machine import Machine, MachineConfig

    def run_probe(image, control, dregs):
        with Machine(image, MachineConfig(quiet=True, backend=backend, personality="none",
                                          kvm_device=kvm_device, mem_size=32 << 20)) as m:
            v = m.threads[0].plane_vcpu()
            v.set_guest_debug(control, dregs)
            return m.threads[0].planes_vcpu.run(plane=0)

    caps = HostDebugCaps()
    notes = []
    try:
        ex = run_probe(_PROBE_SW, C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_SW_BP, None)
        caps.sw_bp = isinstance(ex, X.Debug) and ex.exception == 3
        if not caps.sw_bp:
            notes.append(f"int3 with KVM_GUESTDBG_USE_SW_BP ends in {type(ex).__name__}, not KVM_EXIT_DEBUG, "
                         "on this host: breakpoints use the 4 debug registers")
    except KvmError as e:
        caps.sw_bp = False
        notes.append(f"software breakpoints unavailable: {e}")
    try:
        dr7 = 0x400 | 0x300 | 1 | (1 << 16)
        ex = run_probe(_PROBE_WATCH, C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_HW_BP,
                       [0x200000, 0, 0, 0, 0, 0, 0, dr7])
        caps.watch = isinstance(ex, X.Debug) and ex.exception == 1 and bool(ex.dr6 & 1)
        if not caps.watch:
            notes.append("the host ignores data breakpoints (a watched store ran on): hardware "
                         "watchpoints are refused; use 'set can-use-hw-watchpoints 0' in gdb")
    except KvmError as e:
        caps.watch = False
        notes.append(f"hardware watchpoints unavailable: {e}")
    try:
        run_probe(b"\x90\xE6\xEB", C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP | C.KVM_GUESTDBG_BLOCKIRQ, None)
    except KvmError:
        caps.blockirq = False
        notes.append("no KVM_GUESTDBG_BLOCKIRQ: a step may enter an interrupt handler")
    # QEMU's emulated SVM (pykvmm under nested KVM in TCG) reports neither int3 nor DR0.
    with Kvm(kvm_device) as kvm:
        hw = convention(kvm, "hw_breakpoint")
    caps.exec_bp = hw.value == "yes"
    if not caps.exec_bp:
        notes.append(f"{hw.detail}: hardware breakpoints are refused")
    caps.detail = "; ".join(notes)
    return caps
