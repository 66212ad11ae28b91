"""Trace queries: select normalised events (see trace.py) by vCPU, plane, time window and kind,
and print them as a readable timeline (``pykvmm trace show``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..vmm import events as ev
from . import trace as tr

KINDS = (ev.EXIT, ev.HYPERCALL, ev.SWITCH, ev.PLANE_EVENT, ev.INTERRUPT, ev.FAULT, ev.UCALL, ev.CONSOLE,
         ev.LIFECYCLE)


def parse_ids(text: str | None, what: str) -> frozenset[int] | None:
    """``"0,2-3"`` -> {0, 2, 3}; None stays None (no filter)."""
    if text is None:
        return None
    out = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo, 0), int(hi, 0) if sep else int(lo, 0)
        except ValueError:
            raise ValueError(f"--{what} takes numbers and ranges like 0,2-3, not {text!r}") from None
        if a < 0 or b < a:
            raise ValueError(f"--{what}: bad range {part!r}")
        out.update(range(a, b + 1))
    return frozenset(out)


def parse_kinds(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise ValueError(f"--kind: unknown {', '.join(unknown)} (choose from {', '.join(KINDS)})")
    return kinds


@dataclass(frozen=True)
class TraceFilter:
    """Which events to keep; None in a field means "all". Times are µs since the run's start."""
    vcpus: frozenset[int] | None = None
    planes: frozenset[int] | None = None
    start: float | None = None
    end: float | None = None
    kinds: frozenset[str] | None = None

    def __post_init__(self):
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"--to ({self.end}) is before --from ({self.start})")

    def in_window(self, ts: float) -> bool:
        return (self.start is None or ts >= self.start) and (self.end is None or ts <= self.end)

    def __call__(self, e: dict) -> bool:
        if not self.in_window(e["ts"]):
            return False
        if self.kinds is not None and e.get("kind") not in self.kinds:
            return False
        v = e.get("vcpu")
        if self.vcpus is not None and isinstance(v, int) and v >= 0 and v not in self.vcpus:
            return False
        if self.planes is not None and e.get("kind") != ev.LIFECYCLE and e.get("plane") not in self.planes:
            return False
        return True

    def apply(self, events: list[dict]) -> list[dict]:
        return [e for e in events if self(e)]

    def clip(self, residency: dict[int, list[dict]]) -> dict[int, list[dict]]:
        """Residency segments inside the window, of the selected vCPUs and planes."""
        out = {}
        for v, segs in residency.items():
            if self.vcpus is not None and v not in self.vcpus:
                continue
            kept = []
            for s in segs:
                start = s["start"] if self.start is None else max(s["start"], self.start)
                end = s["end"] if self.end is None else min(s["end"], self.end)
                if end < start or (self.planes is not None and s["plane"] not in self.planes):
                    continue
                kept.append(dict(s, start=start, end=end))
            out[v] = kept
        return out


_SKIP = {"ts", "kind", "vcpu", "plane", "reason", "exit", "t"}


def describe(e: dict, label: str) -> str:
    """One event's readable text (without time and place)."""
    k = e.get("kind")
    if k == ev.EXIT:
        text = e.get("reason") or tr.exit_reason(e)
        if isinstance(e.get("rip"), int):
            text += f" rip={e['rip']:#x}" + (f" <{e['symbol']}>" if e.get("symbol") else "")
        if e.get("data"):
            text += f" data={e['data']}"
        return text
    if k == ev.HYPERCALL:
        st = e.get("status")
        return f"{e.get('name', e.get('code'))}" + ("" if st is None else f" -> status {st:#x}" if isinstance(st, int) else f" -> {st}")
    if k == ev.SWITCH:
        return f"{label}{e.get('from')} -> {label}{e.get('to')} ({e.get('why', '')})"
    if k == ev.UCALL:
        rest = " ".join(f"{x}={e[x]}" for x in e if x not in _SKIP | {"verb"})
        return f"{e.get('verb', '')} {rest}".strip()
    return " ".join(f"{x}={e[x]}" for x in e if x not in _SKIP)


def timeline(events: list[dict], flt: TraceFilter | None = None) -> list[str]:
    """The selected events, one line each: time (µs), where, kind, what."""
    label = tr.plane_label(events)
    flt = flt or TraceFilter()
    lines = []
    for e in events:
        if not flt(e):
            continue
        v, p = e.get("vcpu"), e.get("plane")
        where = "machine" if not isinstance(v, int) or v < 0 else f"vcpu{v}/{label.strip().lower()}{p}"
        lines.append(f"{e['ts']:>14.3f} us  {where:<14} {str(e.get('kind')):<11} {describe(e, label)}")
    return lines
