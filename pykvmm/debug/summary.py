"""``pykvmm trace summary``: counts and timings from a recorded trace (either format).

Definitions (all times from the trace's own timestamps, in microseconds):

* **exits**: EXIT events by reason (``IoOut:0xea(hypercall)``, ``Interrupted``, ...). Their
  total equals ``RunResult.exits``.
* **hypercalls**: HYPERCALL events by call name (and by returned status). Calls the VMM
  answered with an injected fault appear under **faults**, not here.
* **residency**: per vCPU, the time spent in each plane: a vCPU is in plane 0 from the run's
  start; a switch event moves it; it ends at its DONE ucall (or at the end of the run).
* **switch handling**: for each switch, the time from the exit that caused it (the vCPU's
  last exit before the switch event) to the switch event: the VMM's decision and state
  transfer, without the re-entry.
* **exit to target exit**: for each switch, the time from that causing exit to the vCPU's
  next exit, which is the first exit of the target plane: handling + entry into the target
  plane + the target plane's run until it exits (an upper bound of the switch cost; for a
  guest that exits at once in the new plane, close to the full switch round trip).

Percentiles are nearest-rank.
"""

from __future__ import annotations

import math

from ..vmm import events as ev
from . import trace as tr
from .query import TraceFilter


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, math.ceil(p / 100.0 * len(s)) - 1)
    return s[min(k, len(s) - 1)]


def _stats(values: list[float]) -> dict:
    return {"count": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else None,
            "mean": (sum(values) / len(values)) if values else None}


def _inc(d: dict, key, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


def summarize(events: list[dict], flt: TraceFilter | None = None) -> dict:
    """The summary of the events ``flt`` selects (residency: clipped to its window, vCPUs, planes)."""
    flt = flt or TraceFilter()
    info = tr.run_info(events)
    label = tr.plane_label(events)
    exits: dict[str, int] = {}
    hypercalls: dict[str, int] = {}
    hc_status: dict[str, dict[str, int]] = {}
    switches: dict[str, int] = {}
    ucalls: dict[str, int] = {}
    kinds: dict[str, int] = {}
    faults: list[dict] = []
    plane_events = 0
    last_exit: dict[int, float] = {}
    pending_switch: dict[int, float] = {}     # vcpu -> ts of the exit that caused a switch
    handling: list[float] = []
    exit_to_target: list[float] = []
    selected = flt.apply(events)
    for e in selected:
        k = e.get("kind")
        v = e.get("vcpu")
        _inc(kinds, str(k))
        if k == ev.EXIT:
            _inc(exits, e.get("reason") or tr.exit_reason(e))
            if v in pending_switch:
                exit_to_target.append(e["ts"] - pending_switch.pop(v))
            last_exit[v] = e["ts"]
        elif k == ev.HYPERCALL:
            name = str(e.get("name", e.get("code", "?")))
            _inc(hypercalls, name)
            st = e.get("status")
            _inc(hc_status.setdefault(name, {}), "none" if st is None else f"{st:#x}" if isinstance(st, int) else str(st))
        elif k == ev.SWITCH:
            _inc(switches, f"{label}{e.get('from')}->{label}{e.get('to')} ({e.get('why', '')})")
            if v in last_exit:
                handling.append(e["ts"] - last_exit[v])
                pending_switch[v] = last_exit[v]
        elif k == ev.UCALL:
            _inc(ucalls, str(e.get("verb", "?")))
        elif k == ev.PLANE_EVENT:
            plane_events += 1
        elif k == ev.FAULT:
            faults.append({x: e[x] for x in ("ts", "vcpu", "plane", "vector", "why", "crash") if x in e})
    res = {}
    for v, segs in flt.clip(tr.residency(events)).items():
        total = sum(s["end"] - s["start"] for s in segs)
        per: dict[int, float] = {}
        for s in segs:
            per[s["plane"]] = per.get(s["plane"], 0.0) + (s["end"] - s["start"])
        res[str(v)] = {"total_us": round(total, 3),
                       "planes": {str(p): {"us": round(t, 3), "pct": round(100.0 * t / total, 2) if total else 0.0}
                                  for p, t in sorted(per.items())},
                       "entries": len(segs)}
    ts = [e["ts"] for e in selected]
    return {
        "run": {k: info[k] for k in ("vcpus", "planes", "backend", "personality") if k in info},
        "events": len(selected), "kinds": kinds,
        "duration_us": round(max(ts) - min(ts), 3) if ts else 0.0,
        "exits": sum(exits.values()), "exit_reasons": dict(sorted(exits.items(), key=lambda x: -x[1])),
        "hypercalls": dict(sorted(hypercalls.items())), "hypercall_status": hc_status,
        "switches": dict(sorted(switches.items())), "switch_count": sum(switches.values()),
        "plane_events": plane_events, "ucalls": ucalls, "faults": faults,
        "residency": res,
        "switch_handling_us": _stats(handling),
        "switch_exit_to_target_exit_us": _stats(exit_to_target),
    }


def _us(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_summary(s: dict) -> str:
    label = "VTL" if s["run"].get("personality") == "vtl" else "plane "
    run = s["run"]
    lines = [f"trace: {s['events']} events over {s['duration_us'] / 1000:.3f} ms"
             + (f"; {run.get('vcpus')} vCPUs x {run.get('planes')} planes, {run.get('backend')} backend, "
                f"personality {run.get('personality')}" if run else "")]
    lines.append(f"exits: {s['exits']}")
    for name, n in s["exit_reasons"].items():
        lines.append(f"  {name:<32} {n:>8}")
    lines.append(f"hypercalls: {sum(s['hypercalls'].values())}")
    for name, n in s["hypercalls"].items():
        st = ", ".join(f"{k} {v}" for k, v in sorted(s["hypercall_status"].get(name, {}).items()))
        lines.append(f"  {name:<32} {n:>8}   status: {st}")
    if s["switches"]:
        lines.append(f"plane switches: {s['switch_count']}")
        for name, n in s["switches"].items():
            lines.append(f"  {name:<32} {n:>8}")
    if s["plane_events"]:
        lines.append(f"plane events: {s['plane_events']}")
    if s["ucalls"]:
        lines.append("ucalls: " + ", ".join(f"{k} {v}" for k, v in sorted(s["ucalls"].items())))
    for f in s["faults"]:
        lines.append(f"fault: vCPU {f.get('vcpu')} {label}{f.get('plane')}: "
                     + str(f.get("crash") or f"vector {f.get('vector')} ({f.get('why', '')})"))
    if s["residency"]:
        lines.append("plane residency (time, % of the vCPU's run):")
        for v, r in s["residency"].items():
            parts = [f"{label}{p} {d['us'] / 1000:.3f} ms {d['pct']:.1f}%" for p, d in r["planes"].items()]
            lines.append(f"  vCPU {v}: " + ", ".join(parts) + f"  ({r['entries']} residencies)")
    for key, title in (("switch_handling_us", "switch handling (causing exit -> switch)"),
                       ("switch_exit_to_target_exit_us", "causing exit -> first exit in target plane")):
        st = s[key]
        if st["count"]:
            lines.append(f"{title}, us: p50 {_us(st['p50'])}  p90 {_us(st['p90'])}  p99 {_us(st['p99'])}  "
                         f"max {_us(st['max'])}  (n={st['count']})")
    return "\n".join(lines)
