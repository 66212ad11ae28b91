"""Chrome trace-event JSON (Perfetto, chrome://tracing) from normalised events (see trace.py;
trace.write_chrome writes it), in time linear in the number of events (plus a log factor for
the IPI matching and for placing events in their plane's slice).

Chrome layout: one process; one track per vCPU (tid = vCPU + 1, named "vCPU n"); every plane
residency is a complete ("X") slice named "VTL1" / "plane 1" with a colour per plane; every
event is also an instant ("i") on its vCPU's track whose args are the normalised event (so a
Chrome file can be read back with trace.load). An event of a plane the vCPU has just left (the
hypercall that caused the switch is recorded after the switch) is drawn at the end of its own
plane's slice; its args keep the real time. Every IPI gets a flow arrow ("s" -> "f", bp "e")
from the sender to where the target vCPU takes it in the target plane: at once when the target
runs that plane at that moment, else at its next entry into that plane, else (never taken) at
the moment it was sent, marked pending.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from ..vmm import events as ev
from .trace import ipi_targets, plane_label, residency, run_info, vcpu_ids

# Chrome's reserved colour names (trace_viewer's base/color_scheme), one per plane.
PLANE_COLOURS = ("thread_state_running", "rail_response", "thread_state_iowait", "rail_animation",
                 "yellow", "olive", "rail_load", "terrible", "good", "bad", "generic_work", "startup",
                 "rail_idle", "thread_state_runnable", "thread_state_unknown", "heap_dump_stack_frame")
# how far before a switch an event of the plane that was left is drawn (µs)
_BEFORE_SWITCH = 0.001


class _Lanes:
    """Per vCPU, its plane residencies indexed by start time, for O(log n) lookups."""

    def __init__(self, events: list[dict]):
        self.segs = residency(events)
        self.starts = {v: [s["start"] for s in segs] for v, segs in self.segs.items()}
        self.entries: dict[tuple[int, int], list[float]] = {}    # (vcpu, plane) -> entry times
        for v, segs in self.segs.items():
            for s in segs[1:]:
                self.entries.setdefault((v, s["plane"]), []).append(s["start"])

    def at(self, vcpu: int, ts: float):
        """(index, segment) of ``vcpu``'s residency at ``ts``, or (-1, None)."""
        starts = self.starts.get(vcpu)
        if not starts:
            return -1, None
        k = bisect_right(starts, ts) - 1
        return (k, self.segs[vcpu][k]) if k >= 0 else (-1, None)

    def next_entry(self, vcpu: int, plane, ts: float):
        times = self.entries.get((vcpu, plane), ())
        k = bisect_left(times, ts)
        return times[k] if k < len(times) else None


def ipi_flows(events: list[dict], lanes: _Lanes | None = None) -> list[tuple[dict, dict]]:
    """(sender hypercall event, receiver point) for every target of every IPI; the receiver is
    ``{"vcpu", "plane", "ts", "how"}`` with how = "running" (the target was in the target plane),
    "entry" (its next entry into it) or "pending" (never taken before the trace ends)."""
    lanes = lanes or _Lanes(events)
    flows = []
    for e in events:
        targets, plane = ipi_targets(e)
        for tv in targets:
            _, seg = lanes.at(tv, e["ts"])
            if seg is not None and seg["plane"] == plane:
                dst = {"vcpu": tv, "plane": plane, "ts": e["ts"], "how": "running"}
            else:
                t = lanes.next_entry(tv, plane, e["ts"])
                dst = ({"vcpu": tv, "plane": plane, "ts": t, "how": "entry"} if t is not None else
                       {"vcpu": tv, "plane": plane, "ts": e["ts"], "how": "pending"})
            flows.append((e, dst))
    return flows


def _tid(vcpu) -> int:
    return vcpu + 1 if isinstance(vcpu, int) and vcpu >= 0 else 1


def _instant_name(e: dict, label: str) -> str:
    k = e.get("kind")
    if k == ev.EXIT:
        name = e.get("reason") or "exit"
        return f"{name} @{e['symbol']}" if e.get("symbol") else name
    if k == ev.HYPERCALL:
        return str(e.get("name", "hypercall"))
    if k == ev.SWITCH:
        return f"switch {label}{e.get('from')}->{label}{e.get('to')} ({e.get('why', '')})".replace("  ", " ")
    if k == ev.UCALL:
        return f"ucall {e.get('verb', '')}".strip()
    if k == ev.PLANE_EVENT:
        return "plane event"
    if k == ev.LIFECYCLE:
        return f"run {e.get('what', '')}".strip()
    if k == ev.FAULT:
        return "crash" if "crash" in e else f"fault {e.get('vector', '')}".strip()
    return str(k)


def _drawn_at(e: dict, lanes: _Lanes) -> float:
    """Where to draw ``e`` on its vCPU's track: inside the slice of the plane it happened in."""
    ts, v, p = e["ts"], e.get("vcpu"), e.get("plane")
    if e.get("kind") == ev.SWITCH or not isinstance(v, int) or v < 0:
        return ts
    k, seg = lanes.at(v, ts)
    if seg is None or seg["plane"] == p or k == 0:
        return ts
    prev = lanes.segs[v][k - 1]
    if prev["plane"] == p:
        # recorded just after the switch it caused: draw it before the switch
        return max(prev["start"], seg["start"] - _BEFORE_SWITCH)
    return ts


def chrome_trace(events: list[dict]) -> dict:
    info = run_info(events)
    label = plane_label(events)
    lanes = _Lanes(events)
    pid = 1
    out = [{"ph": "M", "pid": pid, "name": "process_name",
            "args": {"name": "pykvmm guest" + (f" ({info.get('backend')} backend, personality "
                                                f"{info.get('personality')})" if info else "")}}]
    for v in vcpu_ids(events):
        out.append({"ph": "M", "pid": pid, "tid": _tid(v), "name": "thread_name", "args": {"name": f"vCPU {v}"}})
        out.append({"ph": "M", "pid": pid, "tid": _tid(v), "name": "thread_sort_index", "args": {"sort_index": v}})
    for v, segs in lanes.segs.items():
        for s in segs:
            p = s["plane"] if isinstance(s["plane"], int) else 0
            out.append({"ph": "X", "pid": pid, "tid": _tid(v), "ts": s["start"],
                        "dur": round(max(s["end"] - s["start"], 0.0), 3),
                        "name": f"{label}{p}", "cat": "plane", "cname": PLANE_COLOURS[p % len(PLANE_COLOURS)],
                        "args": {"plane": p, "entered": s["why"]}})
    for e in events:
        scope = "g" if e.get("kind") == ev.LIFECYCLE else "t"
        out.append({"ph": "i", "s": scope, "pid": pid, "tid": _tid(e.get("vcpu")), "ts": round(_drawn_at(e, lanes), 3),
                    "name": _instant_name(e, label), "cat": f"pykvmm.{e.get('kind')}", "args": e})
    for n, (src, dst) in enumerate(ipi_flows(events, lanes), 1):
        out.append({"ph": "s", "id": n, "pid": pid, "tid": _tid(src["vcpu"]), "ts": round(_drawn_at(src, lanes), 3),
                    "name": "IPI", "cat": "ipi"})
        out.append({"ph": "f", "bp": "e", "id": n, "pid": pid, "tid": _tid(dst["vcpu"]), "ts": dst["ts"],
                    "name": "IPI", "cat": "ipi", "args": {"taken": dst["how"], "plane": dst["plane"]}})
    return {"traceEvents": out, "displayTimeUnit": "ns",
            "otherData": {"generator": "pykvmm", "planes": info.get("planes"), "vcpus": info.get("vcpus")}}
