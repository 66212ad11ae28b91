"""Plane policies: who decides when a vCPU switches planes, and what state moves across.

The machine's run loop asks the policy for ``req_exit_planes`` before each run, hands it
plane events, and lets it register hypercalls. A switch itself is ``cpu.switch_to()``,
which calls ``policy.transfer()`` to move whatever state the policy shares.
"""

from __future__ import annotations

from . import abi
from .hypercalls import HypercallError

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
        machine.dispatcher.register(abi.HVCALL_PYKVMM_SWITCH_PLANE, self._switch_plane)

    def req_exit_planes(self, cpu) -> int:
        return higher_planes(cpu.plane, self.machine.plane_count)

    def on_plane_event(self, cpu, event) -> None:
        target = event.target.bit_length() - 1  # the highest requested plane wins
        if target < 0 or target == cpu.plane:
            return
        cpu.switch_to(target, reason="interrupt", suspend=True)

    def on_memory_fault(self, cpu, fault) -> None:
        """The running plane broke its memory view (planes/memview.py). Bare policy: nobody
        set a view on purpose here, so the run stops and says where."""
        from ..planes.memview import FAULT_ACCESS
        kind = FAULT_ACCESS.get(fault.flags)
        cpu._crash(f"{kind.name.lower() if kind else hex(fault.flags)} access to GPA {fault.gpa:#x} "
                   f"forbidden by plane {cpu.plane}'s memory view")

    def transfer(self, cpu, src: int, dst: int, reason: str) -> None:
        """Move shared state from plane ``src`` to ``dst`` of ``cpu`` (bare: nothing)."""

    def on_first_entry(self, cpu, plane: int, reason: str) -> None:
        """``plane`` of ``cpu`` runs for the first time: it starts at the guest entry."""

    def _switch_plane(self, cpu, plane, control, regs):
        """PykvmmSwitchPlane: RDX = target plane, or all-ones to resume the suspended plane."""
        if control.reserved_bits or control.rep_count:
            raise HypercallError(abi.HV_STATUS_INVALID_HYPERCALL_INPUT)
        target = regs.rdx
        if target == RESUME_SUSPENDED:
            if not cpu.suspended:
                raise HypercallError(abi.HV_STATUS_INVALID_VTL_STATE, "no suspended plane to resume")
            regs.rax = abi.HV_STATUS_SUCCESS
            cpu.resume_suspended(reason="return")
            return None
        if target >= self.machine.plane_count or target == plane:
            raise HypercallError(abi.HV_STATUS_INVALID_PARAMETER, f"bad target plane {target}")
        regs.rax = abi.HV_STATUS_SUCCESS
        cpu.switch_to(target, reason="call", suspend=True)
        return None


POLICIES = {"none": PlanePolicy}


def make_policy(name: str) -> PlanePolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown personality {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None


# The VTL and VMPL personalities register themselves in POLICIES. Imported last: vtl.py
# imports PlanePolicy and POLICIES from this module, which are defined by now.
from . import vtl as _vtl  # noqa: E402,F401
