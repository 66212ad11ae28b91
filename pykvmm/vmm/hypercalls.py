"""Hypercalls: the page of stubs the guest calls, and the transport-agnostic dispatcher.

The guest never knows the mechanism: it calls the stub at HYPERCALL_PAGE_ADDR (+0 for
ordinary calls, +0x0F VtlCall, +0x26 VtlReturn, Hyper-V's offsets) with Hyper-V's register
convention (RCX = control word, RDX/R8 = inputs or GPAs; status back in RAX). The default
transport is port I/O, which exits on every KVM including hosts where ``vmcall`` never does.

The dispatcher's one contract: a handler ``handler(thread, plane, control, regs)`` returns an
outcome (:mod:`pykvmm.vmm.outcomes`): ``Answer(status)`` for a call that returns to its caller
(also for every error status), ``Fault(vector, why)`` for one the caller must take as an
exception, ``Switch(...)`` for VtlCall/VtlReturn. Handlers change no vCPU state themselves;
every value the guest passes is untrusted input, answered with a status or a fault.
"""

from __future__ import annotations

import threading

from . import abi
from .hyperv import tlfs
from .outcomes import Answer, Outcome

# ---- control word -------------------------------------------------------------------------
CONTROL_RESERVED_MASK = tlfs.CONTROL_RSVD0 | tlfs.CONTROL_NESTED | tlfs.CONTROL_RSVD1 | tlfs.CONTROL_RSVD2
CONTROL_NOT_SIMPLE = CONTROL_RESERVED_MASK | 0xFFF << 32     # a simple call: no reserved bits, no rep count


class Control(int):
    """The hypercall input control word (TLFS), an int with its fields by name. An int
    subclass rather than a dataclass: made for every hypercall, and building one then costs
    no Python frame."""
    __slots__ = ()

    @property
    def value(self) -> int:
        return int(self)

    @property
    def code(self) -> int:
        return self & 0xFFFF

    @property
    def fast(self) -> bool:
        return bool(self >> 16 & 1)

    @property
    def var_header_size(self) -> int:
        return (self >> 17) & 0x3FF

    @property
    def rep_count(self) -> int:
        return (self >> 32) & 0xFFF

    @property
    def rep_start(self) -> int:
        return (self >> 48) & 0xFFF

    @property
    def reserved_bits(self) -> int:
        return self & CONTROL_RESERVED_MASK

    @staticmethod
    def encode(code: int, fast: bool = False, rep_count: int = 0, rep_start: int = 0,
               var_header_size: int = 0) -> int:
        return (code & 0xFFFF) | int(fast) << 16 | (var_header_size & 0x3FF) << 17 \
            | (rep_count & 0xFFF) << 32 | (rep_start & 0xFFF) << 48


class HvInputVtl(int):
    """HV_INPUT_VTL (TLFS): bits 3:0 the target VTL, bit 4 UseTargetVtl, bits 7:5 reserved.
    An int, as Control (one is made per SendSyntheticClusterIpi)."""
    __slots__ = ()

    @property
    def value(self) -> int:
        return int(self)

    @property
    def reserved(self) -> int:
        return self & tlfs.INPUT_VTL_RESERVED

    def target(self, caller_vtl: int) -> int:
        """The VTL meant: the named one if UseTargetVtl is set, else the caller's own."""
        return self & tlfs.INPUT_VTL_TARGET if self & tlfs.INPUT_VTL_USE_TARGET else caller_vtl


NAMES = {
    tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI: "HvCallSendSyntheticClusterIpi",
    tlfs.HVCALL_VTL_CALL: "HvCallVtlCall",
    tlfs.HVCALL_VTL_RETURN: "HvCallVtlReturn",
    abi.HVCALL_PYKVMM_NOP: "PykvmmNop",
    abi.HVCALL_PYKVMM_SWITCH_PLANE: "PykvmmSwitchPlane",
}


def call_name(code: int) -> str:
    return NAMES.get(code, f"hypercall {code:#06x}")


# ---- the page ------------------------------------------------------------------------------

def _port_stub(code: int | None) -> bytes:
    out = bytes([0xE6, abi.PORT_HYPERCALL])          # out PORT_HYPERCALL, al
    if code is None:
        return out + b"\xC3"                           # ret
    return (b"\x48\x89\xC8"                            # mov rax, rcx  (VTL input -> RAX)
            + b"\xB9" + code.to_bytes(4, "little")    # mov ecx, code
            + out + b"\xC3")


_VTL_STUB_PROLOGUE = 8  # mov rax, rcx; mov ecx, imm32
OUT_SIZE = 2           # out imm8, al

# Where each stub's `out` sits in the page: a #UD for a bad call must point there.
STUB_OUT_OFFSETS = (abi.HCPAGE_HYPERCALL, abi.HCPAGE_VTL_CALL + _VTL_STUB_PROLOGUE,
                    abi.HCPAGE_VTL_RETURN + _VTL_STUB_PROLOGUE)


def hypercall_page(transport: str = "port") -> bytes:
    if transport != "port":
        raise ValueError(f"hypercall transport {transport!r} is not available on this build; use 'port'")
    page = bytearray(b"\xCC" * 4096)  # int3 everywhere else: a stray call traps visibly
    for off, code in ((abi.HCPAGE_HYPERCALL, None), (abi.HCPAGE_VTL_CALL, tlfs.HVCALL_VTL_CALL),
                      (abi.HCPAGE_VTL_RETURN, tlfs.HVCALL_VTL_RETURN)):
        stub = _port_stub(code)
        page[off:off + len(stub)] = stub
    return bytes(page)


# ---- dispatch --------------------------------------------------------------------------------

class Dispatcher:
    """code -> handler(thread, plane, control, regs) returning an outcome (see the module doc)."""

    def __init__(self):
        self.handlers = {}
        # one counter dict per calling thread: vCPU threads call at once, and a shared
        # ``d[k] = d.get(k, 0) + 1`` loses increments between them (7995 of 8000 seen)
        self._local = threading.local()
        self._per_thread: list[dict[int, int]] = []
        self._per_thread_lock = threading.Lock()
        self.register(abi.HVCALL_PYKVMM_NOP, _nop)

    @property
    def counts(self) -> dict[int, int]:
        """Calls per code, over every thread."""
        total: dict[int, int] = {}
        with self._per_thread_lock:
            for counts in self._per_thread:
                for code, n in list(counts.items()):
                    total[code] = total.get(code, 0) + n
        return total

    def _thread_counts(self) -> dict[int, int]:
        counts = self._local.counts = {}
        with self._per_thread_lock:
            self._per_thread.append(counts)
        return counts

    def add_counts(self, code: int, n: int) -> None:
        """``n`` calls of ``code`` answered outside dispatch() (fastexit.FastSwitch), counted
        as this thread's."""
        counts = getattr(self._local, "counts", None)
        if counts is None:
            counts = self._thread_counts()
        counts[code] = counts.get(code, 0) + n

    def register(self, code: int, handler) -> None:
        self.handlers[code] = handler

    def dispatch(self, thread, plane: int, regs) -> tuple[Control, Outcome]:
        control = Control(regs.rcx)
        code = control & 0xFFFF
        try:
            counts = self._local.counts
        except AttributeError:              # this thread's first call
            counts = self._thread_counts()
        counts[code] = counts.get(code, 0) + 1
        handler = self.handlers.get(code)
        if handler is None:
            return control, Answer(tlfs.INVALID_HYPERCALL_CODE)
        return control, handler(thread, plane, control, regs)


def _nop(thread, plane, control, regs) -> Answer:
    if control & CONTROL_NOT_SIMPLE:
        return Answer(tlfs.INVALID_HYPERCALL_INPUT)
    return Answer(tlfs.SUCCESS, (("rdx", (regs.rdx + regs.r8) & 0xFFFFFFFFFFFFFFFF),))
