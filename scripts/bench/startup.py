"""Row 4, start-up: ``python -m pykvmm run`` (the demo) from process start to the guest's first
exit, to DONE and to exit, and Machine(...) construction alone. Target: < 0.5 s to the first
instruction."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from pykvmm.vmm import loader
from pykvmm.vmm.machine import Machine, MachineConfig

from .common import env, fmt, image, log, median

KEYS = ("4_startup",)
TARGET_FIRST_INSTRUCTION_S = 0.5
TARGET_WIDE_HELLO_S = 5.0           # `pykvmm run hello --vcpus 64 --planes 16`, process start to exit


STARTUP_PROBE = r"""
import json, os, sys, time
t_main = time.monotonic()
import pykvmm.cli as cli
t_import = time.monotonic()
marks = {}
def sink(e):
    if e.kind not in marks:
        marks[e.kind] = e.t
    if e.kind == "lifecycle":
        marks["lifecycle_" + e.details.get("what", "")] = e.t
real = cli.MachineConfig
cli.MachineConfig = lambda **kw: real(trace=sink, **kw)
import atexit
atexit.register(lambda: os.write(2, ("BENCH-STARTUP " + json.dumps(
    {"main": t_main, "imported": t_import, "marks": marks, "end": time.monotonic()}) + "\n").encode()))
sys.argv = ["pykvmm"] + sys.argv[1:]
cli.main()
"""


def run(ctx) -> dict:
    P = ctx.P
    log("row 4: start-up")
    demo = (loader.GUEST_DIR / f"{loader.DEMO_GUEST}.S").exists()
    args = ["run", "--quiet"] if demo else ["run", "hello", "--vcpus", "2", "--planes", "2", "--quiet"]
    label = "demo (2 vCPUs x 2 planes)" if demo else "hello --vcpus 2 --planes 2 (no demo guest yet)"
    loader.bundled_guest(loader.DEMO_GUEST if demo else "hello")      # built before timing
    probe, cli_runs = [], []
    for _ in range(P["startup_runs"]):
        t_spawn = time.monotonic()
        res = subprocess.run([sys.executable, "-c", STARTUP_PROBE, *args], capture_output=True, text=True,
                             env=env(), timeout=60)
        t_exit = time.monotonic()
        line = next((ln for ln in res.stderr.splitlines() if ln.startswith("BENCH-STARTUP ")), None)
        if res.returncode != 0 or line is None:
            raise RuntimeError(f"start-up probe failed ({res.returncode}): {res.stderr[-800:]}")
        d = json.loads(line.split(" ", 1)[1])
        mk = d["marks"]
        probe.append({"interpreter_s": d["main"] - t_spawn, "imports_s": d["imported"] - d["main"],
                      "machine_built_s": mk.get("lifecycle_start", 0) - t_spawn,
                      "first_exit_s": mk.get("exit", 0) - t_spawn,
                      "done_s": mk.get("lifecycle_end", 0) - t_spawn, "process_exit_s": t_exit - t_spawn})
        # the same run through the unmodified entry point
        t_spawn = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "pykvmm", *args], capture_output=True, text=True,
                             env=env(), timeout=60)
        cli_runs.append({"process_exit_s": time.monotonic() - t_spawn, "status": res.returncode})
    t_py = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], env=env(), check=True)
    bare_python = time.monotonic() - t_py

    builds = {}
    img = image("hello")
    for vcpus, planes in ((1, 1), (2, 2)):
        ts = []
        for _ in range(P["build_runs"]):
            t0 = time.perf_counter()
            m = Machine(img, MachineConfig(vcpus=vcpus, planes=planes, quiet=True))
            ts.append(time.perf_counter() - t0)
            m.close()
        builds[f"{vcpus}x{planes}"] = median(ts) * 1e3
    wide = {}
    for planes in (2, 16):          # 64 vCPUs x 16 planes against x 2 planes, interleaved
        wide[planes] = []
    for _ in range(P["wide_runs"]):
        for planes in wide:
            t_spawn = time.monotonic()
            res = subprocess.run([sys.executable, "-m", "pykvmm", "run", "hello", "--vcpus", str(P["wide_vcpus"]),
                                  "--planes", str(planes), "--quiet"], capture_output=True, text=True,
                                 env=env(), timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"wide hello failed ({res.returncode}): {res.stderr[-800:]}")
            wide[planes].append(time.monotonic() - t_spawn)
    keys = probe[0].keys()
    med = {k: median([p[k] for p in probe]) for k in keys}
    return {"4_startup": {"command": "python -m pykvmm " + " ".join(args), "guest": label,
            "probe_median_s": med, "probe_runs": probe,
            "cli_process_exit_median_s": median([c["process_exit_s"] for c in cli_runs]),
            "cli_statuses": [c["status"] for c in cli_runs], "bare_python_start_s": bare_python,
            "machine_build_ms": builds,
            "wide_hello": {"vcpus": P["wide_vcpus"], "process_exit_s": {str(p): median(ts) for p, ts in wide.items()},
                           "ratio_16_over_2": median(wide[16]) / median(wide[2])},
            "method": "parent time.monotonic() before spawning vs the child's TraceEvent times (same clock): "
                      "the child is `python -c <probe>` that imports pykvmm.cli, installs a trace sink and calls "
                      "the CLI's main with the same arguments; 'first_exit' is the guest's first exit (its "
                      "first instruction ran just before)"}}


def verdicts(rows: dict, add) -> None:
    r4 = rows.get("4_startup")
    if r4:
        add(4, "process start to first guest exit", r4["probe_median_s"]["first_exit_s"],
            TARGET_FIRST_INSTRUCTION_S, "s")
        w = r4["wide_hello"]
        add(4, f"hello {w['vcpus']} vCPUs x 16 planes, process start to exit", w["process_exit_s"]["16"],
            TARGET_WIDE_HELLO_S, "s")


def table(rows: dict, L) -> None:
    r4 = rows.get("4_startup")
    if r4:
        m = r4["probe_median_s"]
        L("4", f"start-up {r4['guest']}: to first guest exit", f"{fmt(m['first_exit_s'], 3)} s",
          f"interpreter {fmt(m['interpreter_s'], 3)} + imports {fmt(m['imports_s'], 3)}; machine built at "
          f"{fmt(m['machine_built_s'], 3)} s")
        L("4", "start-up: to DONE / process exit", f"{fmt(m['done_s'], 3)} s",
          f"exit {fmt(m['process_exit_s'], 3)} s; plain `python -m pykvmm` exit "
          f"{fmt(r4['cli_process_exit_median_s'], 3)} s; bare python {fmt(r4['bare_python_start_s'], 3)} s")
        L("4", "Machine(...) construction", ", ".join(f"{k} {fmt(v)} ms" for k, v in r4["machine_build_ms"].items()), "")
        w = r4["wide_hello"]
        L("4", f"hello {w['vcpus']} vCPUs x 16 planes, process exit", f"{fmt(w['process_exit_s']['16'], 2)} s",
          f"x 2 planes {fmt(w['process_exit_s']['2'], 2)} s: ratio {fmt(w['ratio_16_over_2'], 2)}x")
