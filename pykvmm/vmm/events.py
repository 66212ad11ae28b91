"""Trace events the machine emits. Exporters live in pykvmm.debug; the machine only calls
``sink(event)`` when a sink is set, so tracing off costs one attribute test per site."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

EXIT = "exit"
HYPERCALL = "hypercall"
SWITCH = "switch"
PLANE_EVENT = "plane_event"
INTERRUPT = "interrupt"
FAULT = "fault"
UCALL = "ucall"
CONSOLE = "console"
LIFECYCLE = "lifecycle"


@dataclass
class TraceEvent:
    kind: str
    vcpu: int
    plane: int
    details: dict = field(default_factory=dict)
    t: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"t": self.t, "kind": self.kind, "vcpu": self.vcpu, "plane": self.plane, **self.details}
