"""Chrome trace-event JSON (Perfetto, chrome://tracing) from normalised events (see trace.py),
streamed: time linear and memory constant in the number of events (it grows with the vCPUs
and planes only), so a run's trace of any length converts (``trace.write_trace_from``).

Chrome layout: one process; one track per vCPU (tid = vCPU + 1, named "vCPU n"); every plane
residency is a complete ("X") slice named "VTL1" / "plane 1" with a colour per plane; every
event is also an instant ("i") on its vCPU's track whose args are the normalised event (so a
Chrome file can be read back with trace.load). An event of a plane the vCPU has just left (the
hypercall that caused the switch is recorded after the switch) is drawn at the end of its own
plane's slice; its args keep the real time. Every IPI gets a flow arrow ("s" -> "f", bp "e")
from the sender to where the target vCPU takes it in the target plane: at once when the target
runs that plane at that moment, else at its next entry into that plane, else (never taken) at
the moment it was sent, marked pending.

Two passes over the events of a source (trace.ListSource, trace.JsonlSource): forward for the
slices, the instants and each arrow's start; backward for each arrow's end, since where an
IPI is taken (the target's plane then, its next entry into the target plane) is what the
events after it say, and a backward pass knows that with one value per vCPU and plane.
"""

from __future__ import annotations

import json

from ..vmm import events as ev
from .trace import ListSource, Residency, ipi_targets, label_of

# Chrome's reserved colour names (trace_viewer's base/color_scheme), one per plane.
PLANE_COLOURS = ("thread_state_running", "rail_response", "thread_state_iowait", "rail_animation",
                 "yellow", "olive", "rail_load", "terrible", "good", "bad", "generic_work", "startup",
                 "rail_idle", "thread_state_runnable", "thread_state_unknown", "heap_dump_stack_frame")
# how far before a switch an event of the plane that was left is drawn (µs)
_BEFORE_SWITCH = 0.001
_PID = 1
_MAX_TARGETS = 64            # flow ids: the event's position * 64 + the target's index


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


def _drawn_at(e: dict, lanes: Residency) -> float:
    """Where to draw ``e`` on its vCPU's track: inside the slice of the plane it happened in."""
    ts, v, p = e["ts"], e.get("vcpu"), e.get("plane")
    if e.get("kind") == ev.SWITCH or not isinstance(v, int) or v < 0:
        return ts
    seg, prev = lanes.at(v)
    if seg is None or seg["plane"] == p or prev is None:
        return ts
    if prev["plane"] == p:
        # recorded just after the switch it caused: draw it before the switch
        return max(prev["start"], seg["start"] - _BEFORE_SWITCH)
    return ts


def _slice(seg: dict, label: str) -> dict:
    p = seg["plane"] if isinstance(seg["plane"], int) else 0
    return {"ph": "X", "pid": _PID, "tid": _tid(seg["vcpu"]), "ts": seg["start"],
            "dur": round(max(seg["end"] - seg["start"], 0.0), 3), "name": f"{label}{p}", "cat": "plane",
            "cname": PLANE_COLOURS[p % len(PLANE_COLOURS)], "args": {"plane": p, "entered": seg["why"]}}


def _forward(source, lanes: Residency, label: str):
    """Slices, instants and arrow starts; leaves ``lanes`` at the end of the run."""
    for pos, e in source.forward():
        closed = lanes.feed(e)
        if closed is not None:
            yield _slice(closed, label)
        at = round(_drawn_at(e, lanes), 3)
        scope = "g" if e.get("kind") == ev.LIFECYCLE else "t"
        yield {"ph": "i", "s": scope, "pid": _PID, "tid": _tid(e.get("vcpu")), "ts": at,
               "name": _instant_name(e, label), "cat": f"pykvmm.{e.get('kind')}", "args": e}
        targets, _ = ipi_targets(e)
        for k in range(min(len(targets), _MAX_TARGETS)):
            yield {"ph": "s", "id": pos * _MAX_TARGETS + k + 1, "pid": _PID, "tid": _tid(e.get("vcpu")), "ts": at,
                   "name": "IPI", "cat": "ipi"}
    for seg in lanes.finish():
        yield _slice(seg, label)


def _flow_ends(source, lanes: Residency):
    """(position, target index, IPI event, receiver) for every IPI target, newest first; the
    receiver is ``{"vcpu", "plane", "ts", "how"}`` with how = "running" (the target was in the
    target plane), "entry" (its next entry into it) or "pending" (never taken before the end).
    ``lanes``: a Residency fed with every event (it gives each vCPU's plane at the end)."""
    plane_now = {seg["vcpu"]: seg["plane"] for seg in lanes.current.values()}
    next_entry: dict[tuple[int, int], float] = {}
    for pos, e in source.backward(kinds=(ev.SWITCH, ev.HYPERCALL)):
        targets, plane = ipi_targets(e)
        for k in range(min(len(targets), _MAX_TARGETS) - 1, -1, -1):
            tv = targets[k]
            if tv in plane_now and plane_now[tv] == plane:
                dst = {"vcpu": tv, "plane": plane, "ts": e["ts"], "how": "running"}
            elif (tv, plane) in next_entry:
                dst = {"vcpu": tv, "plane": plane, "ts": next_entry[tv, plane], "how": "entry"}
            else:
                dst = {"vcpu": tv, "plane": plane, "ts": e["ts"], "how": "pending"}
            yield pos, k, e, dst
        v = e.get("vcpu")
        if e.get("kind") == ev.SWITCH and isinstance(v, int) and v >= 0:
            next_entry[v, e.get("to", e.get("plane", 0))] = e["ts"]
            plane_now[v] = e.get("from")          # before this switch, the vCPU was in "from"


def ipi_flows(events: list[dict]) -> list[tuple[dict, dict]]:
    """(sender hypercall event, receiver point) for every target of every IPI, in time order
    (receiver as in _flow_ends)."""
    source = ListSource(events)
    lanes = Residency(source.info)
    for e in events:
        lanes.feed(e)
    flows = sorted(_flow_ends(source, lanes), key=lambda f: (f[0], f[1]))
    return [(src, dst) for _, _, src, dst in flows]


def chrome_events(source):
    """Every Chrome trace event for the events of ``source``, generated in constant memory."""
    info = source.info
    label = label_of(info)
    lanes = Residency(info)
    yield from _forward(source, lanes, label)
    yield {"ph": "M", "pid": _PID, "name": "process_name",
           "args": {"name": "pykvmm guest" + (f" ({info.get('backend')} backend, personality "
                                               f"{info.get('personality')})" if info else "")}}
    for v in lanes.vcpus:
        yield {"ph": "M", "pid": _PID, "tid": _tid(v), "name": "thread_name", "args": {"name": f"vCPU {v}"}}
        yield {"ph": "M", "pid": _PID, "tid": _tid(v), "name": "thread_sort_index", "args": {"sort_index": v}}
    for pos, k, _, dst in _flow_ends(source, lanes):
        yield {"ph": "f", "bp": "e", "id": pos * _MAX_TARGETS + k + 1, "pid": _PID, "tid": _tid(dst["vcpu"]),
               "ts": dst["ts"], "name": "IPI", "cat": "ipi", "args": {"taken": dst["how"], "plane": dst["plane"]}}


def _other_data(info: dict) -> dict:
    return {"generator": "pykvmm", "planes": info.get("planes"), "vcpus": info.get("vcpus")}


def chrome_trace(events: list[dict]) -> dict:
    """The whole Chrome document in memory (for small traces and tests; files use write_chrome_from)."""
    source = ListSource(events)
    return {"traceEvents": list(chrome_events(source)), "displayTimeUnit": "ns", "otherData": _other_data(source.info)}


def write_chrome_from(source, path: str, batch: int = 2048) -> None:
    """Write the Chrome document for ``source`` to ``path`` as it is generated (a batch of
    events per encoder call: one call per event costs a third more)."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with open(path, "w") as f:
        f.write('{"traceEvents":[\n')
        sep = ""
        chunk: list[dict] = []
        for item in chrome_events(source):
            chunk.append(item)
            if len(chunk) >= batch:
                f.write(sep + dumps(chunk)[1:-1])
                sep = ",\n"
                chunk.clear()
        if chunk:
            f.write(sep + dumps(chunk)[1:-1])
        f.write('\n],"displayTimeUnit":"ns","otherData":' + dumps(_other_data(source.info)) + "}\n")
