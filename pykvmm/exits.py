"""Layer 2: KVM_RUN exits, one type per exit reason (as rust-vmm's VcpuExit), decoded from kvm_run.

Each exit is a slotted dataclass carrying exactly that exit's data; ``fields(ex)`` gives
them as a dict (traces record exits that way, never as text to parse back). A dataclass
costs nothing per exit over a hand-written class: its ``__init__`` is the same one
assignment per field. The alternative measured, a NamedTuple built with ``tuple.__new__``
(no Python frame), saved about 0.1 us per exit but made every field read slower (an indexed
property instead of a slot), and the handlers read several fields per exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .uapi import constants as C


class Exit:
    """A decoded KVM_RUN exit."""

    __slots__ = ()
    reason: ClassVar[int] = -1

    def describe(self) -> str:
        """``IoOut(port=0xe9, ...)``: for messages to people."""
        return describe_fields(fields(self))

    def __repr__(self) -> str:
        return self.describe()


def _fmt(v):
    return hex(v) if isinstance(v, int) and not isinstance(v, bool) else repr(v)


def fields(ex: Exit) -> dict:
    """``{"exit": "IoOut", "port": 0xe9, ...}``: the exit as a trace records it."""
    out = {"exit": type(ex).__name__}
    for name in ex.__slots__:           # a slotted dataclass's slots are its fields, in order
        out[name] = getattr(ex, name)
    return out


def describe_fields(d: dict) -> str:
    """``IoOut(port=0xe9, ...)`` from :func:`fields` (or a trace event holding them)."""
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in d.items() if k != "exit")
    return f"{d.get('exit', '?')}({text})"


def _exit(reason: int):
    def make(cls):
        cls = dataclass(slots=True, repr=False, eq=False)(cls)
        cls.reason = reason
        return cls
    return make


@_exit(C.KVM_EXIT_IO)
class IoOut(Exit):
    port: int
    size: int
    count: int
    data: bytes


@_exit(C.KVM_EXIT_IO)
class IoIn(Exit):
    port: int
    size: int
    count: int
    data_offset: int


@_exit(C.KVM_EXIT_MMIO)
class Mmio(Exit):
    phys_addr: int
    length: int
    is_write: bool
    data: bytes


@_exit(C.KVM_EXIT_HLT)
class Hlt(Exit):
    pass


@_exit(C.KVM_EXIT_SHUTDOWN)
class Shutdown(Exit):
    pass


@_exit(C.KVM_EXIT_DEBUG)
class Debug(Exit):
    exception: int
    pc: int
    dr6: int
    dr7: int


@_exit(C.KVM_EXIT_FAIL_ENTRY)
class FailEntry(Exit):
    hardware_entry_failure_reason: int
    cpu: int


@_exit(C.KVM_EXIT_INTERNAL_ERROR)
class InternalError(Exit):
    suberror: int
    data: list


@_exit(C.KVM_EXIT_SYSTEM_EVENT)
class SystemEvent(Exit):
    type: int
    data: list


@_exit(C.KVM_EXIT_X86_RDMSR)
class X86Rdmsr(Exit):
    index: int
    msr_reason: int


@_exit(C.KVM_EXIT_X86_WRMSR)
class X86Wrmsr(Exit):
    index: int
    data: int
    msr_reason: int


@_exit(C.KVM_EXIT_HYPERCALL)
class Hypercall(Exit):
    nr: int
    args: list
    longmode: int


@_exit(C.KVM_EXIT_MEMORY_FAULT)
class MemoryFault(Exit):
    flags: int
    gpa: int
    size: int


@_exit(-1)
class PlaneEvent(Exit):
    """The planes RFC's KVM_EXIT_PLANE_EVENT (or one a software backend produced)."""
    cause: int
    pending_event_planes: int
    target: int
    flags: int
    extra: list


@_exit(C.KVM_EXIT_INTR)
class Interrupted(Exit):
    """KVM_RUN returned EINTR/EAGAIN: a kick."""


@_exit(-1)
class Unknown(Exit):
    exit_reason: int
    hardware_exit_reason: int


INTERNAL_ERROR_NAMES = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}


def exit_reason_name(reason: int, planes_abi=None) -> str:
    if planes_abi is not None and reason == planes_abi.exit_plane_event:
        return "PLANE_EVENT"
    return C.EXIT_REASON_NAMES.get(reason, f"UNKNOWN_{reason}")


# ---- decoding kvm_run ------------------------------------------------------------------------
# decoder(vcpu, run) -> Exit, keyed by run->exit_reason; ``vcpu`` is the kvm.Vcpu (its
# run_mmap holds PIO data). KVM_EXIT_IO and KVM_EXIT_MMIO, the userspace exits of device
# accesses, are decoded by kvm.Vcpu.run itself, each with one struct unpack of kvm_run.

def _decode_internal(vcpu, run):
    i = run.internal
    return InternalError(i.suberror, [i.data[k] for k in range(min(i.ndata, 16))])


def _decode_system_event(vcpu, run):
    e = run.system_event
    return SystemEvent(e.type, [e.data[k] for k in range(min(e.ndata, 16))])


DECODERS = {
    C.KVM_EXIT_HLT: lambda v, r: Hlt(),
    C.KVM_EXIT_SHUTDOWN: lambda v, r: Shutdown(),
    C.KVM_EXIT_DEBUG: lambda v, r: Debug(r.debug.arch.exception, r.debug.arch.pc, r.debug.arch.dr6, r.debug.arch.dr7),
    C.KVM_EXIT_FAIL_ENTRY: lambda v, r: FailEntry(r.fail_entry.hardware_entry_failure_reason, r.fail_entry.cpu),
    C.KVM_EXIT_INTERNAL_ERROR: _decode_internal,
    C.KVM_EXIT_SYSTEM_EVENT: _decode_system_event,
    C.KVM_EXIT_X86_RDMSR: lambda v, r: X86Rdmsr(r.msr.index, r.msr.reason),
    C.KVM_EXIT_X86_WRMSR: lambda v, r: X86Wrmsr(r.msr.index, r.msr.data, r.msr.reason),
    C.KVM_EXIT_HYPERCALL: lambda v, r: Hypercall(r.hypercall.nr, list(r.hypercall.args), r.hypercall.longmode),
    C.KVM_EXIT_MEMORY_FAULT: lambda v, r: MemoryFault(r.memory_fault.flags, r.memory_fault.gpa, r.memory_fault.size),
    C.KVM_EXIT_INTR: lambda v, r: Interrupted(),
}


def _decode_plane_event(vcpu, run):
    e = run.plane_event
    return PlaneEvent(e.cause, e.pending_event_planes, e.target, e.flags, list(e.extra))


def _decode_plane_event_v1(vcpu, run):
    e = run.plane_event_v1
    return PlaneEvent(e.cause, 1 << e.plane, 1 << e.plane, 0, list(e.extra))


# keyed by PlanesAbi.event_struct: the kvm_run union member of that planes uAPI variant
PLANE_EVENT_DECODERS = {"plane_event": _decode_plane_event, "plane_event_v1": _decode_plane_event_v1}
