"""Row 5, scaling: plane switches per second for 1/2/4/8 vCPUs x 2/4/8 planes
(guest/bench_switch), ioctls per round trip by plane count; memory per added plane (fresh
processes: VmRSS, and the kernel's share from /proc/meminfo).
Target (issue 11): the 8-plane switch rate (1 vCPU) at least half the 2-plane rate."""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from pykvmm.vmm.machine import Machine, MachineConfig

from .common import env, fmt, image, log, per, run_machine

KEYS = ("5_scaling",)
TARGET_8_OVER_2_PLANES = 0.5


def vm_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def meminfo_kb() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


KERNEL_KEYS = ("Slab", "VmallocUsed", "KernelStack", "PageTables")


def rss_probe(planes: int, vcpus: int, copies: int) -> None:
    """Run in a fresh process: RSS (and the system's kernel memory) before and after building
    and running ``copies`` machines; per machine."""
    name = "bench_switch" if planes > 1 else "pio_loop"
    img = image(name)
    Machine(image("pio_loop"), MachineConfig(quiet=True)).close()    # warm imports/caches
    before, k0 = vm_rss_kb(), meminfo_kb()
    ms = [Machine(img, MachineConfig(vcpus=vcpus, planes=planes, personality="none", arg=100, quiet=True))
          for _ in range(copies)]
    built = vm_rss_kb()
    ok = all(m.run(60).ok for m in ms)
    ran, k1 = vm_rss_kb(), meminfo_kb()
    for m in ms:
        m.close()
    print(json.dumps({"planes": planes, "vcpus": vcpus, "copies": copies,
                      "built_kb": (built - before) / copies, "ran_kb": (ran - before) / copies,
                      "kernel_kb": sum(k1[k] - k0[k] for k in KERNEL_KEYS if k in k0) / copies,
                      "mem_available_drop_kb": (k0["MemAvailable"] - k1["MemAvailable"]) / copies, "ok": ok}))


def _slope(xs, ys):
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def run(ctx) -> dict:
    P = ctx.P
    log("row 5: scaling and memory per plane")
    img = image("bench_switch")
    grid = {}
    for planes in P["scale_planes"]:
        for vcpus in P["scale_vcpus"]:
            n = P["scale_n"]
            dt, r, _ = run_machine(img, vcpus=vcpus, planes=planes, personality="none", arg=n)
            sw = sum(r.switches.values())
            grid[f"{vcpus}x{planes}"] = {"vcpus": vcpus, "planes": planes, "switches": sw,
                                         "switches_per_s": sw / dt, "per_vcpu_switches_per_s": sw / dt / vcpus,
                                         "elapsed_s": dt}
        counts, n = collections.Counter(), max(10, P["scale_n"] // 5)
        run_machine(img, vcpus=1, planes=planes, personality="none", arg=n, counts=counts)
        grid[f"1x{planes}"]["ioctls_per_round_trip"] = per(counts, n)
    mem = []
    for planes in P["rss_planes"]:
        for vcpus in (1, 2):
            res = subprocess.run([sys.executable, str(Path(__file__).resolve().parent), "--_rss-probe", str(planes), str(vcpus),
                                  str(P["rss_copies"])], capture_output=True, text=True, env=env(), timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"rss probe failed: {res.stderr[-800:]}")
            mem.append(json.loads(res.stdout.strip().splitlines()[-1]))
    per_plane = {}
    for vcpus in (1, 2):
        pts = [m for m in mem if m["vcpus"] == vcpus]
        xs = [m["planes"] for m in pts]
        per_plane[f"{vcpus}_vcpu"] = {key + "_per_plane": _slope(xs, [m[key] for m in pts])
                                     for key in ("built_kb", "ran_kb", "kernel_kb", "mem_available_drop_kb")}
    return {"5_scaling": {"switch_rate": grid, "round_trips_per_vcpu": P["scale_n"], "host_cpus": os.cpu_count(),
            "rss": mem, "rss_per_plane": per_plane,
            "rss_note": "ran_kb/built_kb: VmRSS of the pykvmm process (user space). kernel_kb: system-wide "
                        "/proc/meminfo delta of " + "+".join(KERNEL_KEYS) + " (KVM's allocations; approximate: "
                        "the machine is shared), mem_available_drop_kb likewise; all per machine, slope over planes"}}


def verdicts(rows: dict, add) -> None:
    r5 = rows.get("5_scaling")
    if r5:
        g = r5["switch_rate"]
        two, eight = g.get("1x2"), g.get("1x8")
        ratio = eight["switches_per_s"] / two["switches_per_s"] if two and eight else None
        add(5, "switch rate 8 planes / 2 planes (1 vCPU)", ratio, TARGET_8_OVER_2_PLANES, "x", lower_is_better=False)


def table(rows: dict, L) -> None:
    r5 = rows.get("5_scaling")
    if r5:
        g = r5["switch_rate"]
        for planes in sorted({d["planes"] for d in g.values()}):
            cells = [f"{d['vcpus']}v {d['switches_per_s'] / 1000:.1f}k" for d in g.values() if d["planes"] == planes]
            io = next((d.get("ioctls_per_round_trip") for d in g.values() if d["planes"] == planes and d["vcpus"] == 1), {})
            L("5", f"switches/s, {planes} planes", ", ".join(cells),
              "1 vCPU, per round trip: " + ", ".join(f"{k} {v}" for k, v in (io or {}).items()))
        pp = r5["rss_per_plane"]
        L("5", "memory per added plane: pykvmm RSS", ", ".join(f"{k.replace('_', ' ')} {fmt(v['ran_kb_per_plane'])} KiB"
                                                        for k, v in pp.items()), "VmRSS slope, after a run")
        L("5", "memory per added plane: kernel (approx.)", ", ".join(f"{k.replace('_', ' ')} {fmt(v['kernel_kb_per_plane'])} KiB"
                                                           for k, v in pp.items()),
          "Slab+Vmalloc+KernelStack+PageTables; MemAvailable drop " + ", ".join(
              f"{fmt(v['mem_available_drop_kb_per_plane'])}" for v in pp.values()) + " KiB")
