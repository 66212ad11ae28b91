"""Conventions of the host's KVM that differ between KVMs, found by running tiny guests.

Our machines' KVM (kvm_pvm) and mainline KVM (kvm_amd, kvm_intel) disagree on things the
uAPI leaves open: where RIP is at a KVM_EXIT_IO for `out`, what a triple fault leaves in the
vCPU, whether guest SSE/x87 runs, what `int3` does. pykvmm never asks which host it is on:
it runs each probe once per KVM device per process (a scratch long-mode VM, a few ms) and
acts on the answer. ``pykvmm caps`` lists them, so a bug report shows them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .. import exits as X, kvm as K
from ..kvm import Kvm, KvmError
from ..uapi import constants as C, ffi
from ..x86 import apic, arch, longmode
from . import abi, bringup
from .memory import GuestMemory

_MEM_SIZE = 4 << 20
_MARK = 0x5EED_F00D
_VECTOR_DB, _VECTOR_BP = 1, 3

# The probe guests (64-bit code at GUEST_LOAD_ADDR, no IDT).
_OUT = b"\xE6\xEB"                                   # out 0xeb, al
_PIO = _OUT + b"\xEB\xFE"                            # out; jmp $
_SHUTDOWN = b"\xBB" + _MARK.to_bytes(4, "little") + b"\x0F\x0B"    # mov ebx, MARK; ud2
_SSE = b"\x0F\x57\xC0\x0F\x58\xC0" + _PIO            # xorps xmm0, xmm0; addps xmm0, xmm0; out
_X87 = b"\xD9\xE8\xDD\xD8" + _PIO                    # fld1; fstp st(0); out
_INT3 = b"\xCC" + _PIO                               # int3; out
_HW_BP = b"\x90\x90" + _PIO                          # nop; nop (DR0 here); out
# Entered on the nop in an STI interrupt shadow with an interrupt pending; the handler reports
# where the interrupt came in with a 4-byte `out` (the nop's own `out` is 1 byte).
_SHADOWED = (b"\x90" + _OUT + _PIO).ljust(0x10, b"\x90")   # nop; out 0xeb, al; out 0xeb, al; jmp $
_SHADOW_HANDLER = b"\x8B\x04\x24\xE7\xEB\xEB\xFE"   # mov eax, [rsp] (the RIP it interrupted); out 0xeb, eax; jmp $
_SHADOW_VECTOR = 0x40
_SHADOW_IDT = abi.GUEST_LOAD_ADDR + 0x1000


@dataclass
class Probe:
    """One convention: a short value to act on and what was seen."""
    value: str
    detail: str

    def as_dict(self) -> dict:
        return {"value": self.value, "detail": self.detail}


class ScratchVm:
    """A one-vCPU long-mode VM with ``code`` at GUEST_LOAD_ADDR and no IDT (``irqchip``: with
    the in-kernel LAPIC)."""

    def __init__(self, kvm: Kvm, code: bytes, irqchip: bool = False):
        self.memory = GuestMemory(_MEM_SIZE)
        self.vm = kvm.create_vm()
        try:
            self.vm.set_user_memory_region(0, 0, _MEM_SIZE, self.memory.hva)
            if irqchip:
                self.vm.create_irqchip()
            bringup.write_long_mode_tables(self.memory, _MEM_SIZE)
            self.memory.write(abi.GUEST_LOAD_ADDR, code)
            self.vcpu = v = self.vm.create_vcpu(0)
            v.set_cpuid2(kvm.supported_cpuid())
            bringup.set_long_mode_sregs(v, osxsave=False)
            r = v.get_regs()
            r.rip, r.rsp, r.rflags = abi.GUEST_LOAD_ADDR, abi.GUEST_LOAD_ADDR, arch.RFLAGS_FIXED
            v.set_regs(r)
        except BaseException:
            self.close()
            raise

    def offset(self) -> int:
        return self.vcpu.get_regs().rip - abi.GUEST_LOAD_ADDR

    def close(self) -> None:
        self.vm.close()
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def looks_reset(regs, sregs) -> bool:
    """The architectural RESET/INIT state: CS 0xf000 with base 0xffff0000, RIP 0xfff0, no PE.

    No guest reaches it by executing code, so it means KVM reset the vCPU behind our back."""
    return (regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000 and sregs.cs.base == 0xFFFF0000
            and not sregs.cr0 & arch.CR0_PE)


def _name(ex) -> str:
    if isinstance(ex, X.InternalError):
        return f"KVM_EXIT_INTERNAL_ERROR ({X.INTERNAL_ERROR_NAMES.get(ex.suberror, ex.suberror)})"
    return type(ex).__name__


def probe_pio_out_rip(kvm: Kvm) -> Probe:
    with ScratchVm(kvm, _PIO) as s:
        ex = s.vcpu.run()
        if not isinstance(ex, X.IoOut):
            return Probe("unknown", f"`out` ended in {_name(ex)}")
        at_exit = s.offset()
        s.vcpu.request_immediate_exit()
        s.vcpu.run()                        # completes the pending I/O, runs no instruction
        after = s.offset()
    where = {0: "on", len(_OUT): "past"}.get(at_exit, f"at +{at_exit}")
    return Probe(where, f"RIP at KVM_EXIT_IO for `out` is {where} the instruction; after the I/O is "
                        f"completed (KVM_RUN with immediate_exit) it is at +{after}")


def probe_shutdown(kvm: Kvm) -> Probe:
    with ScratchVm(kvm, _SHUTDOWN) as s:
        ex = s.vcpu.run()
        if not isinstance(ex, X.Shutdown):
            return Probe("unknown", f"ud2 with no IDT ended in {_name(ex)}, not a triple fault")
        regs, sregs = s.vcpu.get_regs(), s.vcpu.get_sregs()
    if looks_reset(regs, sregs):
        return Probe("reset", "at KVM_EXIT_SHUTDOWN KVM has already reset the vCPU (RIP=fff0, CS=f000): "
                              "pykvmm keeps each vCPU's state at entry and re-creates the crash state")
    if regs.rbx == _MARK:
        return Probe("kept", "at KVM_EXIT_SHUTDOWN the vCPU still holds the guest's registers")
    return Probe("unknown", f"at KVM_EXIT_SHUTDOWN RIP={regs.rip:#x}, RBX={regs.rbx:#x}")


def _runs_to_out(kvm: Kvm, code: bytes, what: str) -> Probe:
    with ScratchVm(kvm, code) as s:
        ex = s.vcpu.run()
    if isinstance(ex, X.IoOut):
        return Probe("yes", f"guest {what} instructions run")
    return Probe("no", f"guest {what} instructions end in {_name(ex)}")


def probe_sse(kvm: Kvm) -> Probe:
    return _runs_to_out(kvm, _SSE, "SSE")


def probe_x87(kvm: Kvm) -> Probe:
    return _runs_to_out(kvm, _X87, "x87")


def probe_int3(kvm: Kvm) -> Probe:
    """What `int3` does under KVM_GUESTDBG_USE_SW_BP (a gdb software breakpoint)."""
    with ScratchVm(kvm, _INT3) as s:
        try:
            s.vcpu.set_guest_debug(C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_SW_BP)
        except KvmError as e:
            return Probe("no", f"KVM_SET_GUEST_DEBUG refused software breakpoints: {e}")
        ex = s.vcpu.run()
    if isinstance(ex, X.Debug) and ex.exception == _VECTOR_BP:
        return Probe("yes", "int3 is reported as KVM_EXIT_DEBUG (exception 3)")
    return Probe("no", f"int3 with KVM_GUESTDBG_USE_SW_BP ends in {_name(ex)}, not KVM_EXIT_DEBUG")


def probe_hw_breakpoint(kvm: Kvm) -> Probe:
    """Whether an execution breakpoint in DR0 (KVM_GUESTDBG_USE_HW_BP) stops the guest."""
    with ScratchVm(kvm, _HW_BP) as s:
        dr7 = 0x400 | 1                     # L0, execute, length 1
        try:
            s.vcpu.set_guest_debug(C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_HW_BP,
                                   [abi.GUEST_LOAD_ADDR + 1, 0, 0, 0, 0, 0, 0, dr7])
        except KvmError as e:
            return Probe("no", f"KVM_SET_GUEST_DEBUG refused hardware breakpoints: {e}")
        ex = s.vcpu.run()
    if isinstance(ex, X.Debug) and ex.exception == _VECTOR_DB:
        return Probe("yes", "an execution breakpoint in DR0 is reported as KVM_EXIT_DEBUG (exception 1)")
    return Probe("no", f"an execution breakpoint in DR0 never fired: the guest ran on to {_name(ex)}")


def sti_shadow_verdict(delivered_at: int | None) -> Probe:
    """What probe_sti_shadow saw: the offset from the shadowed nop at which the pending interrupt
    came in (0: on the nop itself), or None if it never came."""
    if delivered_at is None:
        return Probe("unknown", "the pending interrupt was never delivered")
    if delivered_at == 0:
        return Probe("lost", "an interrupt pending at entry in an STI shadow is delivered before the "
                             "shadowed instruction (the CPU drops the shadow at VM entry, as QEMU's emulated "
                             "SVM does before QEMU 9.1): a guest waiting with `sti; hlt` can take its wake-up "
                             "before the `hlt` and then halt for good")
    return Probe("kept", "an interrupt pending at entry in an STI shadow waits for the shadowed instruction")


def probe_sti_shadow(kvm: Kvm, shadow: int = C.KVM_X86_SHADOW_INT_STI) -> Probe:
    """Whether the STI interrupt shadow a vCPU holds when it is entered is honoured: the state a
    guest is in when a VM exit (a kick, a host interrupt) falls between its `sti` and `hlt`. The
    shadow is set with KVM_SET_VCPU_EVENTS on a nop, an interrupt is made pending, and the guest
    reports the RIP the interrupt came in at (some KVMs deliver it only at the next entry, after
    the nop's `out`). ``shadow=0`` enters without it: what a CPU that drops it does."""
    with ScratchVm(kvm, _SHADOWED + _SHADOW_HANDLER, irqchip=True) as s:
        v = s.vcpu
        s.memory.write(_SHADOW_IDT + 16 * _SHADOW_VECTOR,
                       longmode.interrupt_gate(abi.GUEST_LOAD_ADDR + len(_SHADOWED), abi.SEL_CODE64))
        sregs = v.get_sregs()
        sregs.idt.base, sregs.idt.limit = _SHADOW_IDT, 16 * 256 - 1
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rflags = arch.RFLAGS_FIXED | arch.RFLAGS_IF
        v.set_regs(regs)
        lapic = v.get_lapic()
        ffi.buffer(lapic.regs)[apic.APIC_SPIV:apic.APIC_SPIV + 4] = (0x1FF).to_bytes(4, "little")
        v.set_lapic(lapic)
        events = v.get_vcpu_events()
        events.flags = C.KVM_VCPUEVENT_VALID_SHADOW
        events.interrupt.shadow = shadow
        v.set_vcpu_events(events)
        if s.vm.signal_msi(*apic.msi_message(0, _SHADOW_VECTOR)) <= 0:
            return Probe("unknown", "the probe's interrupt was not accepted by its LAPIC")
        for _ in range(2):                  # the nop's `out`, then the one after it
            ex = v.run()
            if not (isinstance(ex, X.IoOut) and ex.port == 0xEB):
                return Probe("unknown", f"the probe guest ended in {_name(ex)}")
            if ex.size == 4:
                return sti_shadow_verdict(int.from_bytes(ex.data, "little") - abi.GUEST_LOAD_ADDR)
    return sti_shadow_verdict(None)


PROBES = {
    "pio_out_rip": probe_pio_out_rip,
    "shutdown": probe_shutdown,
    "sse": probe_sse,
    "x87": probe_x87,
    "int3": probe_int3,
    "hw_breakpoint": probe_hw_breakpoint,
    "sti_shadow": probe_sti_shadow,
}

_cache: dict[tuple[str, str], Probe] = {}
_lock = threading.Lock()


def convention(kvm: Kvm, name: str) -> Probe:
    """The probed convention ``name`` of this KVM device (probed once per process)."""
    key = (kvm.path, name)
    with _lock:
        found = _cache.get(key)
        if found is None:
            try:
                found = PROBES[name](kvm)
            except KvmError as e:
                found = Probe("unknown", f"the probe failed: {e}")
            _cache[key] = found
    return found


def conventions(kvm: Kvm) -> dict[str, Probe]:
    return {name: convention(kvm, name) for name in PROBES}
