"""The plane-policy contract, and the bare RFC policy ("none").

A policy decides when a vCPU switches planes and what state moves across. The vCPU thread
(:mod:`pykvmm.vmm.vcpu_thread`) asks it, and applies what it answers:

    attach(machine)                      register the policy's hypercalls with the dispatcher
    req_exit_planes(thread) -> int       the planes whose interrupts end the next run
    on_plane_event(thread, event)        -> Switch or None
    on_memory_fault(thread, fault)       -> an outcome for a MemoryFault exit (planes/memview.py)
    transfer(thread, src, dst, dest, reason, first)
                                         the state move of a switch, called once by the thread
                                         (``thread.vcpu`` is still plane ``src``'s KVM vCPU,
                                         ``dest`` is plane ``dst``'s; ``first``: ``dst`` has
                                         never run, it starts at the guest entry)
    fast_switches(thread) -> dict | None the switches a C loop may make for this thread
                                         (fastexit.FastSwitch: well-formed VtlCall/VtlReturn
                                         only): plane -> (planes a VtlCall from it may enter,
                                         GPA of its VtlCall EntryReason or None); None: none

Hypercall handlers return outcomes (:mod:`pykvmm.vmm.outcomes`) like every handler. The
registry of policies by name is :mod:`pykvmm.vmm.personalities`.
"""

from __future__ import annotations

from . import abi
from .hypercalls import CONTROL_NOT_SIMPLE
from .hyperv import tlfs
from .outcomes import Answer, Outcome, Stop, StopKind, Switch, SwitchReason

RESUME_SUSPENDED = 0xFFFFFFFFFFFFFFFF


def higher_planes(plane: int, plane_count: int) -> int:
    return ((1 << plane_count) - 1) & ~((1 << (plane + 1)) - 1)


class PlanePolicy:
    """The bare RFC policy ("none"): nothing shared; switch only when a hypercall asks or
    when an interrupt for a higher plane arrives (req_exit_planes = every higher plane)."""

    name = "none"
    sync_classes = 0  # extra KVM_SYNC_X86_* classes the policy reads on every exit

    def attach(self, machine) -> None:
        self.machine = machine
        self._higher = [higher_planes(p, machine.plane_count) for p in range(machine.plane_count)]
        machine.dispatcher.register(abi.HVCALL_PYKVMM_SWITCH_PLANE, self.switch_plane)
        # the switches switch_plane answers, made once (outcomes are not changed once returned)
        self._switch_to = [Switch(t, SwitchReason.CALL, suspend=True, status=tlfs.SUCCESS)
                           for t in range(machine.plane_count)]
        self._resume = Switch(None, SwitchReason.RETURN, status=tlfs.SUCCESS)

    def req_exit_planes(self, thread) -> int:
        return self._higher[thread.plane]      # asked after every exit: one lookup

    def on_plane_event(self, thread, event) -> Switch | None:
        target = event.target.bit_length() - 1  # the highest requested plane wins
        if target < 0 or target == thread.plane:
            return None
        return Switch(target, SwitchReason.INTERRUPT, suspend=True)

    def on_memory_fault(self, thread, fault) -> Outcome:
        """The running plane broke its memory view (planes/memview.py). Bare policy: nobody
        set a view on purpose here, so the run stops and says where."""
        from ..planes.memview import FAULT_ACCESS
        kind = FAULT_ACCESS.get(fault.flags)
        return Stop(StopKind.CRASH, f"{kind.name.lower() if kind else hex(fault.flags)} access to GPA "
                                    f"{fault.gpa:#x} forbidden by plane {thread.plane}'s memory view")

    def transfer(self, thread, src: int, dst: int, dest, reason: SwitchReason, first: bool) -> None:
        """Move shared state from plane ``src`` to ``dst`` of ``thread`` (bare: nothing)."""

    def fast_switches(self, thread) -> dict | None:
        """Bare: none (its switches answer a status, and it looks at higher planes' LAPICs)."""
        return None

    def summary(self) -> dict:
        """The policy's counters, merged into RunResult.stats (bare: none)."""
        return {}

    def switch_plane(self, thread, plane, control, regs) -> Outcome:
        """PykvmmSwitchPlane: RDX = target plane, or all-ones to resume the suspended plane.
        The caller's RAX is SUCCESS when it runs again."""
        if control & CONTROL_NOT_SIMPLE:
            return Answer(tlfs.INVALID_HYPERCALL_INPUT)
        target = regs.rdx
        if target == RESUME_SUSPENDED:
            if not thread.suspended:
                return Answer(tlfs.INVALID_VTL_STATE)      # no suspended plane to resume
            return self._resume
        if target >= self.machine.plane_count or target == plane:
            return Answer(tlfs.INVALID_PARAMETER)
        return self._switch_to[target]
