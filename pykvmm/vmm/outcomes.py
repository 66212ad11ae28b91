"""What happens next: the values hypercall, port and exit handlers return.

A handler never changes which plane runs, never injects, never stops the machine itself: it
returns one of these and the vCPU thread applies it in one place
(:meth:`pykvmm.vmm.vcpu_thread.VcpuThread.apply`). ``None`` means "nothing to do, run on".

    Answer(status, outputs)   the call returns: RAX = status, plus output registers
    Fault(vector, why)        the caller takes an exception (e.g. #UD for a malformed VtlCall)
    Switch(target, reason)    another plane of this vCPU runs next
    Stop(kind, detail)        this vCPU stops: it is done, a guest assertion failed, or it crashed
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Outcomes are slotted but not frozen: a frozen dataclass's __init__ sets every field through
# object.__setattr__ (a Switch took 2.7 us to build instead of 0.9 us here), and one is built
# for every hypercall. Nothing changes an outcome after its handler returns it.


class SwitchReason(enum.Enum):
    """Why a plane is entered; the VTL personality reports CALL, INTERRUPT and INTERCEPT to the guest."""
    CALL = "call"               # VtlCall (or the bare policy's switch hypercall)
    RETURN = "return"           # VtlReturn: back to the plane that called or was preempted
    INTERRUPT = "interrupt"     # an interrupt for a higher plane preempted the running one
    INTERCEPT = "intercept"     # a secure intercept: a lower plane broke this plane's protection (vsm)

    # Members are singletons compared by identity: hash them so too (Enum's own __hash__ is a
    # Python-level hash of the name, paid at every dict lookup on the switch path).
    __hash__ = object.__hash__


class StopKind(enum.Enum):
    DONE = "done"               # the guest reported DONE
    ASSERT = "assert"           # a guest assertion failed (the ucall carries the details)
    CRASH = "crash"             # triple fault, bad exit, KVM error, pykvmm bug


@dataclass(slots=True)
class Answer:
    """The hypercall returns to its caller with ``status`` in RAX and ``outputs`` (register
    name, value) pairs written too (e.g. PykvmmNop's RDX)."""
    status: int
    outputs: tuple[tuple[str, int], ...] = ()


@dataclass(slots=True)
class Fault:
    """The running plane takes exception ``vector``; ``why`` goes to the trace and the result.
    ``at_hypercall``: RIP is moved back onto the hypercall stub's instruction first (on hosts
    that report it already past it), as the fault is the instruction's."""
    vector: int
    why: str
    at_hypercall: bool = True


@dataclass(slots=True)
class Switch:
    """Plane ``target`` of this vCPU runs next (None: the plane on top of the suspended stack).

    suspend            push the running plane on the suspended stack (VtlCall, preemption)
    status             RAX of the *running* plane before it leaves (the bare policy's switch
                       hypercall answers its caller SUCCESS); None: RAX is not an answer
    load_return_regs   (RAX, RCX) the target gets after the shared state arrived (a non-fast
                       VtlReturn's VtlReturnX64Rax/Rcx); None: nothing more
    """
    target: int | None
    reason: SwitchReason
    suspend: bool = False
    status: int | None = None
    load_return_regs: tuple[int, int] | None = None


@dataclass(slots=True)
class Stop:
    """This vCPU stops running. ``ucall``: the guest's DONE or failed-assertion report;
    ``state``: for a crash, what the captured registers are when not the state at the crash."""
    kind: StopKind
    detail: str = ""
    ucall: object = None
    state: str = ""


Outcome = Answer | Fault | Switch | Stop | None
