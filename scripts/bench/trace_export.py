"""Row 7, trace export (issue 16): Chrome export of a synthetic
trace of N events (2 vCPUs x 2 planes, a plane switch every 8 events, an IPI every 16, half of
them to the other vCPU's running plane) against writing the same events as JSON lines (the
linear floor) in the same run; and the growth from N/4 to N events (linear: 4x).
Target: 100k events < 5 s (CPU time)."""

from __future__ import annotations

import os
import tempfile
import time

from pykvmm.debug.trace import write_chrome, write_jsonl
from pykvmm.vmm import abi
from pykvmm.vmm.hyperv import tlfs

from .common import fmt, log

KEYS = ("7_trace_export",)
TARGET_EXPORT_100K_S = 5.0          # Chrome export of 100k trace events (CPU s)


def synthetic_trace(n: int, vcpus: int = 2) -> list[dict]:
    """``n`` normalised events of a 2-plane VTL run, time-ordered, 1 µs apart."""
    events = [{"ts": 0.0, "kind": "lifecycle", "vcpu": -1, "plane": -1, "what": "start", "vcpus": vcpus,
               "planes": 2, "backend": "multivm", "personality": "vtl"}]
    plane = [0] * vcpus
    for k in range(1, n):
        v = k % vcpus
        ts = float(k)
        if k % 8 == 0:
            src, plane[v] = plane[v], 1 - plane[v]
            events.append({"ts": ts, "kind": "switch", "vcpu": v, "plane": plane[v], "from": src,
                           "to": plane[v], "why": "interrupt" if k % 16 == 0 else "call"})
        elif k % 16 == 1:
            target = (v + 1) % vcpus
            events.append({"ts": ts, "kind": "hypercall", "vcpu": v, "plane": plane[v],
                           "name": "HvCallSendSyntheticClusterIpi", "code": tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI,
                           "status": 0, "vector": 0x30, "targets": [target],
                           "target_plane": plane[target] if k % 32 == 1 else 1 - plane[target]})
        else:
            events.append({"ts": ts, "kind": "exit", "vcpu": v, "plane": plane[v], "reason": "IoOut:0xea(hypercall)",
                           "exit": "IoOut", "port": 0xEA, "size": 1, "count": 1, "rip": 0x4019})
    return events


def export_seconds(events: list[dict]) -> tuple[float, float]:
    """(Chrome file, JSON lines file) CPU seconds for ``events``, written by pykvmm's own writers
    (one thread, CPU-bound: CPU time is the work, whatever else the shared machine runs)."""
    with tempfile.TemporaryDirectory(prefix="pykvmm-bench-trace-") as tmp:
        t0 = time.process_time()
        write_chrome(events, os.path.join(tmp, "t.json"))
        t1 = time.process_time()
        with open(os.path.join(tmp, "t.jsonl"), "w") as f:
            write_jsonl(events, f)
        t2 = time.process_time()
    return t1 - t0, t2 - t1


def bench_trace_export(n: int = 100_000, repeats: int = 3) -> dict:
    small, full = synthetic_trace(n // 4), synthetic_trace(n)
    runs = []
    for _ in range(repeats):
        c_small, _ = export_seconds(small)
        c_full, j_full = export_seconds(full)
        runs.append((c_full, j_full, c_full / j_full, c_full / c_small))
    med = [sorted(r[i] for r in runs)[len(runs) // 2] for i in range(4)]
    return {"events": n, "chrome_s": med[0], "jsonl_s": med[1], "chrome_vs_jsonl": med[2],
            "growth_n_over_n4": med[3]}


def run(ctx) -> dict:
    log("row 7: trace export")
    return {"7_trace_export": bench_trace_export(ctx.P["trace_events"], repeats=1 if ctx.P["repeats"] < 3 else 3)}


def verdicts(rows: dict, add) -> None:
    r7 = rows.get("7_trace_export")
    if r7:
        add(7, f"Chrome export of {r7['events']} events", r7["chrome_s"], TARGET_EXPORT_100K_S, "s")


def table(rows: dict, L) -> None:
    r7 = rows.get("7_trace_export")
    if r7:
        L("7", f"trace export, {r7['events']} events: Chrome / JSON lines",
          f"{fmt(r7['chrome_s'], 2)} / {fmt(r7['jsonl_s'], 2)} s",
          f"{fmt(r7['chrome_vs_jsonl'], 1)}x JSON lines; {r7['events'] // 4} -> {r7['events']} events "
          f"{fmt(r7['growth_n_over_n4'], 1)}x time (linear 4x); CPU time")
