"""Observability: traces (JSON lines and Chrome), `trace summary`, --trace-exits, --dump-on-exit.

The 2-plane guest is guest/dbg_planes.S (bare policy: plane 0 switches to plane 1 and back
--arg times with PykvmmSwitchPlane); the IPI flow test uses the VTL demo when it is built.
"""

from __future__ import annotations

import json
import os
import re
import time
import subprocess
import sys

import pytest

from conftest import LAST_RESORT
from pykvmm import exits as X
from pykvmm.debug import export, summary as sm
from pykvmm.debug import trace as tr
from pykvmm.debug.exits import ExitAnnotator
from pykvmm.debug.symbols import Symbols
from pykvmm.vmm import events as ev
from pykvmm.vmm import loader
from pykvmm.vmm.machine import Machine, MachineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 4


def pykvmm(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pykvmm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def guest(name):
    p = loader.bundled_guest(name)
    if not p.exists():
        pytest.skip(f"guest {name} is not built (make -C guest)")
    return p


def traced_run(name="dbg_planes", **config):
    rec = tr.TraceRecorder()
    config.setdefault("quiet", True)
    with Machine(loader.load_image(guest(name)), MachineConfig(trace=rec, **config)) as m:
        m.trace = tr.Fanout(ExitAnnotator(m, Symbols.for_image(guest(name))), tr.IpiAnnotator(m), rec)
        result = m.run(LAST_RESORT)
    assert result.ok, (result.status, result.crash, result.failure)
    return result, rec


@pytest.fixture(scope="module")
def two_by_two(kvm_available):
    return traced_run(vcpus=2, planes=2, personality="none", arg=ROUNDS)


def test_chrome_trace_two_vcpus_two_planes(two_by_two, tmp_path):
    result, rec = two_by_two
    path = tmp_path / "t.json"
    assert rec.export(str(path)) == "chrome"
    doc = json.loads(path.read_text())          # valid JSON, object form
    events = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names.values()) == ["vCPU 0", "vCPU 1"] and len(names) == 2   # one track per vCPU
    slices = [e for e in events if e["ph"] == "X"]
    for tid in names:
        mine = sorted((e for e in slices if e["tid"] == tid), key=lambda e: e["ts"])
        assert [e["name"] for e in mine] == ["plane 0", "plane 1"] * ROUNDS + ["plane 0"]
        for a, b in zip(mine, mine[1:]):      # residencies tile the lane
            assert abs(a["ts"] + a["dur"] - b["ts"]) < 0.01
        assert all(e["dur"] >= 0 for e in mine)
    colours = {e["name"]: e["cname"] for e in slices}
    assert len(colours) == 2 and colours["plane 0"] != colours["plane 1"]
    instants = [e for e in events if e["ph"] == "i"]
    assert sum(e["args"]["kind"] == ev.HYPERCALL for e in instants) == sum(result.hypercalls.values())
    assert sum(e["args"]["kind"] == ev.UCALL for e in instants) == len(result.ucalls)
    assert all(e["ts"] >= 0 for e in events if "ts" in e)


def test_summary_counts_equal_the_run(two_by_two, tmp_path):
    result, rec = two_by_two
    for name in ("t.jsonl", "t.json"):
        path = tmp_path / name
        rec.export(str(path))
        s = sm.summarize(tr.load(str(path)))
        assert s["exits"] == result.exits
        assert s["hypercalls"] == result.hypercalls == {"PykvmmSwitchPlane": 2 * 2 * ROUNDS}
        assert s["switch_count"] == sum(result.switches.values()) == 2 * 2 * ROUNDS
        assert s["switches"] == {"plane 0->plane 1 (call)": 2 * ROUNDS, "plane 1->plane 0 (return)": 2 * ROUNDS}
        assert s["ucalls"] == {"SYNC": 2, "DONE": 2}
        for v in ("0", "1"):
            r = s["residency"][v]
            assert r["entries"] == 2 * ROUNDS + 1
            assert abs(sum(p["pct"] for p in r["planes"].values()) - 100.0) < 0.1
        h = s["switch_handling_us"]
        assert h["count"] == 2 * 2 * ROUNDS and 0 <= h["p50"] <= h["p90"] <= h["p99"] <= h["max"]
    assert tr.load(str(tmp_path / "t.jsonl")) == tr.load(str(tmp_path / "t.json"))


def test_ipi_flow_from_sender_to_receiver(kvm_available, tmp_path):
    result, rec = traced_run("demo", vcpus=2, planes=2, personality="vtl")
    rec.export(str(tmp_path / "demo.json"))
    events = json.loads((tmp_path / "demo.json").read_text())["traceEvents"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    ipis = [e["args"] for e in events if e["ph"] == "i" and "Ipi" in e["args"].get("name", "")]
    assert starts and starts.keys() == ends.keys() and len(starts) == sum(len(e["targets"]) for e in ipis)
    pairs = sorted((starts[i]["tid"], ends[i]["tid"]) for i in starts)
    assert pairs == sorted((e["vcpu"] + 1, t + 1) for e in ipis for t in e["targets"])   # sender -> target
    for i, s in starts.items():
        assert ends[i]["bp"] == "e" and ends[i]["ts"] >= s["ts"]
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert names == {"VTL0", "VTL1"}


def test_summary_definitions_on_a_synthetic_trace():
    E = lambda ts, kind, **kw: {"ts": ts, "kind": kind, "vcpu": kw.pop("vcpu", 0), "plane": kw.pop("plane", 0), **kw}
    events = [
        E(0, ev.LIFECYCLE, vcpu=-1, what="start", vcpus=1, planes=2, personality="vtl"),
        E(10, ev.EXIT, **X.fields(X.IoOut(0xEA, 1, 1, b"@"))),
        E(13, ev.SWITCH, plane=1, **{"from": 0, "to": 1, "why": "call"}),
        E(14, ev.HYPERCALL, name="HvCallVtlCall", code=0x11, status=None),
        E(40, ev.EXIT, plane=1, **X.fields(X.IoOut(0xEA, 1, 1, b"@"))),
        E(45, ev.SWITCH, **{"from": 1, "to": 0, "why": "return"}),
        E(60, ev.EXIT, **X.fields(X.Interrupted())),
        E(100, ev.UCALL, verb="DONE"),
        E(120, "something_new", detail=1),        # unknown kinds are kept, never break anything
    ]
    s = sm.summarize(events)
    assert s["exit_reasons"] == {"IoOut:0xea(hypercall)": 2, "Interrupted": 1}
    assert s["switch_handling_us"]["count"] == 2
    assert s["switch_handling_us"]["p50"] == 3 and s["switch_handling_us"]["max"] == 5
    x = s["switch_exit_to_target_exit_us"]      # 40 - 10 and 60 - 40
    assert (x["count"], x["p50"], x["max"]) == (2, 20, 30)
    # plane 0: 0..13 and 45..100 (its DONE); plane 1: 13..45
    assert s["residency"]["0"]["planes"] == {"0": {"us": 68.0, "pct": 68.0}, "1": {"us": 32.0, "pct": 32.0}}
    assert s["kinds"]["something_new"] == 1
    text = sm.format_summary(s)
    assert "VTL0->VTL1 (call)" in text and "p50 3.0" in text
    assert export.chrome_trace(events)["traceEvents"]        # exports unknown kinds as instants


@pytest.mark.parametrize("name, flag, expected", [
    ("t.json", None, "chrome"), ("t.jsonl", None, "jsonl"), ("t.json-lines", None, "jsonl"),
    ("t.trace", None, "jsonl"), ("t.trace", "chrome", "chrome"), ("t.json", "jsonl", "jsonl")])
def test_format_by_extension_or_flag(name, flag, expected):
    assert tr.format_for(name, flag) == expected


def test_exit_reason_names():
    assert tr.exit_reason(X.fields(X.IoOut(0xE8, 4, 1, b"p"))) == "IoOut:0xe8(ucall)"
    assert tr.exit_reason(X.fields(X.PlaneEvent(1, 2, 2, 0, []))) == "PlaneEvent"
    assert tr.exit_reason(X.fields(X.Interrupted())) == "Interrupted"


def test_cli_trace_then_summary(kvm_available, tmp_path):
    path = tmp_path / "run.json"
    res = pykvmm("run", str(guest("dbg_planes")), "--vcpus", "2", "--planes", "2", "--personality", "none",
                 "--arg", "3", "--trace", str(path))
    assert res.returncode == 0, res.stderr
    assert f"written to {path} (chrome)" in res.stderr
    res = pykvmm("trace", "summary", str(path), "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["hypercalls"] == {"PykvmmSwitchPlane": 12} and s["switch_count"] == 12
    assert s["ucalls"] == {"SYNC": 2, "DONE": 2}
    text = pykvmm("trace", "summary", str(path)).stdout
    for phrase in ("exits:", "PykvmmSwitchPlane", "plane residency", "vCPU 1:", "p50", "p99"):
        assert phrase in text


def test_cli_summary_rejects_a_non_trace(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"traceEvents": [{"ph": "X", "name": "other"}]}')
    res = pykvmm("trace", "summary", str(bad))
    assert res.returncode == 2 and "not one written by pykvmm" in res.stderr and "Traceback" not in res.stderr


def test_cli_trace_exits_shows_the_instruction(kvm_available):
    res = pykvmm("run", str(guest("dbg_planes")), "--planes", "2", "--personality", "none", "--trace-exits")
    assert res.returncode == 0, res.stderr
    stamped = re.compile(r"^\[ *(\d+\.\d) us\] (vcpu0/plane\d) (.*)$")
    lines = [m.groups() for m in map(stamped.match, res.stderr.splitlines()) if m and "Interrupted" not in m[3]]
    exits = [ln for ln in lines if not ln[2].startswith(" ")]
    assert len(exits) == 4      # 2 hypercalls, SYNC, DONE (and maybe kicks: Interrupted)
    assert [float(ln[0]) for ln in lines] == sorted(float(ln[0]) for ln in lines)   # timestamps
    hcall = exits[0][2]
    assert exits[0][1] == "vcpu0/plane0" and hcall.startswith("IoOut:0xea(hypercall) [pykvmm hypercall] data=")
    assert re.search(r"rip=0x400[02] <hypercall_stub\+0x2>  0x4000: out 0xea, al", hcall) or \
        re.search(r"rip=0x4000 <hypercall_stub>  0x4000: out 0xea, al", hcall), hcall
    assert exits[1][1] == "vcpu0/plane1" and "out 0xea, al" in exits[1][2]
    assert "[pykvmm ucall] data=" in exits[-1][2] and "<__ucall_frame+" in exits[-1][2] and "out 0xe8, eax" in exits[-1][2]
    # what each hypercall exit caused, on the lines after it
    after_first = [ln[2].strip() for ln in lines[lines.index(exits[0]) + 1:lines.index(exits[1])]]
    assert "-> switch plane0 -> plane1 (call)" in after_first and "-> hypercall PykvmmSwitchPlane" in after_first


def test_cli_dump_on_exit_every_vcpu_every_plane(kvm_available):
    res = pykvmm("run", str(guest("dbg_planes")), "--vcpus", "2", "--planes", "2", "--personality", "none",
                 "--dump-on-exit")
    assert res.returncode == 0, res.stderr
    err = res.stderr
    for phrase in ("vCPU 0: running plane 0", "vCPU 1: running plane 0", "  plane 1", "RIP=", "CR3=",
                   "pending events: none", "=> "):
        assert phrase in err, phrase
    assert err.count("  plane 1") == 2
    for phrase in ("bases: CS=0", "DR7=", "LSTAR=", "KERNEL_GS_BASE=", "LAPIC id=1 TPR=0x0"):
        assert phrase in err, phrase


def test_cli_dump_on_exit_shows_each_planes_own_system_state(kvm_available):
    res = pykvmm("run", str(guest("vtl_call")), "--planes", "2", "--personality", "vtl", "--dump-on-exit")
    assert res.returncode == 0, res.stderr
    vtl0, vtl1 = res.stderr.split("  VTL 1\n")
    assert "LSTAR=ffffffff8a000000" in vtl0 and "DR0=da0000" in vtl0      # set by VTL0 (guest/vtl_call.S)
    assert "LSTAR=ffffffff8b000000" in vtl1                                # VTL1's own
    assert "DR1=db1000" in vtl0 and "DR1=db1000" in vtl1                   # DR0-DR3 are shared state


def test_tracing_off_installs_nothing(kvm_available):
    with Machine(loader.load_image(guest("hello")), MachineConfig(quiet=True)) as m:
        assert m.trace is None and m.debugger is None
        assert m.run(LAST_RESORT).ok


def test_dumps_and_crash_reasons_use_symbols(kvm_available, tmp_path):
    res = pykvmm("run", str(guest("fault")))
    assert res.returncode == 3, res.stderr
    assert "guest crashed on vCPU 0 plane 0: #UD (ud2) at fault_ud2, IDT limit 0: triple fault" in res.stderr
    assert re.search(r"RIP=[0-9a-f]{16} <fault_ud2>", res.stderr), res.stderr
    assert "<fault_ud2>:" in res.stderr                        # the code listing labels the symbol
    bad = tmp_path / "not.elf"
    bad.write_text("no")
    res = pykvmm("run", str(guest("fault")), "--symbols", str(bad))
    assert res.returncode == 2 and "--symbols:" in res.stderr and "not a little-endian ELF64" in res.stderr
    assert "Traceback" not in res.stderr


def test_elf_symbols_match_nm():
    from pykvmm.debug.symbols import Symbols, read_elf_symbols
    elf = guest("dbg_planes").with_suffix(".elf")
    nm = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    expected = {n: int(a, 16) for a, t, n in (ln.split() for ln in nm.splitlines() if len(ln.split()) == 3)
                if t in "tTdDbBrR"}
    got = read_elf_symbols(elf)
    assert expected and all(got.get(n) == a for n, a in expected.items()), set(expected.items()) - set(got.items())
    sym = Symbols(got)
    a = got["plane1_work"]
    assert sym.name(a) == "plane1_work" and sym.name(a + 4) == "plane1_work+0x4"
    assert sym.describe(0x4017) == "0x4017 <VtlCall_stub+0x8>" and sym.name(0x4026) == "VtlReturn_stub"


# ---- traces: export, flows, queries, plots --------------------------------------------------------

def synthetic(n):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench.trace_export import synthetic_trace
    return synthetic_trace(n)


def test_every_ipi_gets_a_flow_and_events_sit_in_their_own_planes_slice():
    events = synthetic(4000)
    doc = export.chrome_trace(events)["traceEvents"]
    ipis = [e for e in events if e["kind"] == ev.HYPERCALL]
    starts = [e for e in doc if e["ph"] == "s"]
    ends = {e["id"]: e for e in doc if e["ph"] == "f"}
    assert len(starts) == len(ends) == sum(len(e["targets"]) for e in ipis) == len(ipis)
    taken = {e["args"]["taken"] for e in ends.values()}
    assert taken == {"running", "entry"}           # half to the running plane, half to the other one
    for s in starts:
        assert ends[s["id"]]["tid"] != s["tid"] and ends[s["id"]]["ts"] >= s["ts"]
    slices = {}
    for x in (e for e in doc if e["ph"] == "X"):
        slices.setdefault(x["tid"], []).append(x)
    for i in (e for e in doc if e["ph"] == "i" and e["args"]["kind"] in (ev.HYPERCALL, ev.EXIT)):
        lane = slices[i["tid"]]
        inside = [x for x in lane if x["ts"] <= i["ts"] <= x["ts"] + x["dur"]]
        assert any(x["args"]["plane"] == i["args"]["plane"] for x in inside), i


def test_the_hypercall_that_switched_is_drawn_in_the_source_planes_slice(kvm_available, tmp_path):
    result, rec = traced_run("vtl_call", planes=2, personality="vtl")
    path = tmp_path / "t.json"
    rec.export(str(path))
    doc = json.loads(path.read_text())["traceEvents"]
    lane = sorted((e for e in doc if e["ph"] == "X"), key=lambda e: e["ts"])
    calls = [e for e in doc if e["ph"] == "i" and e["args"]["kind"] == ev.HYPERCALL]
    assert len(calls) == 6
    for c in calls:
        slice_ = [x for x in lane if x["ts"] <= c["ts"] < x["ts"] + x["dur"]]
        assert slice_ and slice_[-1]["name"] == f"VTL{c['args']['plane']}", (c, slice_)
        assert c["args"]["ts"] >= c["ts"]                  # the real time stays in the args
    exits = [e["args"] for e in doc if e["ph"] == "i" and e["args"]["kind"] == ev.EXIT]
    assert all(isinstance(e["rip"], int) for e in exits)   # every exit carries RIP ...
    assert {e["symbol"] for e in exits if e["reason"].startswith("IoOut:0xea")} <= {
        "VtlCall_stub+0xa", "VtlReturn_stub+0xa", "VtlCall_stub+0x8", "VtlReturn_stub+0x8"}   # ... and its symbol


@pytest.mark.slow
def test_chrome_export_of_100k_events_is_linear():
    def cpu_seconds(events):        # CPU time: the machine is shared, the figure is the work
        best = None
        for _ in range(2):
            t0 = time.process_time()
            json.dumps(export.chrome_trace(events), separators=(",", ":"))
            t = time.process_time() - t0
            best = t if best is None else min(best, t)
        return best
    small, full = cpu_seconds(synthetic(25_000)), cpu_seconds(synthetic(100_000))
    assert full < 5.0, f"100k events took {full:.1f} s"
    assert full / small < 8, f"4x the events took {full / small:.1f}x the time: not linear"


def test_jsonl_source_sorts_a_nearly_ordered_file_both_ways(tmp_path):
    """The file a run streams is written by several threads (nearly in time order) and may end
    in a line cut short by SIGKILL: both passes give the events in time order (and reversed),
    whatever the block boundaries of the backward reader."""
    import random
    events = synthetic(3000)
    lines = [tr.jsonl_line(e) for e in events]
    rng = random.Random(1)
    for k in range(1, len(lines) - 1, 3):          # neighbours written in the other order
        if rng.random() < 0.5:
            lines[k], lines[k + 1] = lines[k + 1], lines[k]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(lines) + '{"ts": 99999, "ki')
    for block in (7, 100, 1 << 16):
        source = tr.JsonlSource(str(path))
        source.BLOCK = block
        assert [e for _, e in source.forward()] == events and source.read == source.kept == len(events)
        assert [e for _, e in source.backward()] == events[::-1]
    assert tr.JsonlSource(str(path)).info == events[0]


def test_chrome_conversion_memory_does_not_grow_with_the_trace(tmp_path):
    """`pykvmm trace export` (and the end of `pykvmm run --trace t.json`, the same code) read the
    JSON lines twice as a stream: the peak RSS for 10x the events stays where it was (it read
    every event into memory before: +100 MB for these 45,000 more)."""
    def peak_rss_mib(n: int) -> float:
        path, out, hwm = tmp_path / f"t{n}.jsonl", tmp_path / f"t{n}.json", tmp_path / f"hwm{n}"
        tr.write_trace(synthetic(n), str(path), "jsonl")
        # VmHWM of the process's own memory after exec (a wait4 ru_maxrss would count the
        # forking parent's memory too); written at exit, after click's sys.exit
        run = ("import atexit, sys\n"
               "def hwm(path=sys.argv[1]):\n"
               "    with open('/proc/self/status') as f, open(path, 'w') as out:\n"
               "        out.write(next(x.split()[1] for x in f if x.startswith('VmHWM:')))\n"
               "atexit.register(hwm)\n"
               "sys.argv = ['pykvmm', *sys.argv[2:]]\n"
               "from pykvmm.cli import main\n"
               "main()\n")
        res = subprocess.run([sys.executable, "-c", run, str(hwm), "trace", "export", str(path), "-o", str(out)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr
        assert f"{n} of {n} events written" in res.stderr
        assert len(tr.load(str(out))) == n
        return int(hwm.read_text()) / 1024
    small, big = peak_rss_mib(5_000), peak_rss_mib(50_000)
    print(f"trace export peak RSS: 5k events {small:.1f} MiB, 50k events {big:.1f} MiB")
    assert big - small < 8, (small, big)


@pytest.fixture(scope="module")
def streamed(kvm_available, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "run.jsonl"
    res = pykvmm("run", "--trace", str(path), "--quiet")          # the demo: 2 vCPUs x 2 VTLs, IPIs
    assert res.returncode == 0, res.stderr
    return path


def test_cli_trace_show_and_summary_filters(streamed):
    events = tr.load(str(streamed))
    res = pykvmm("trace", "show", str(streamed), "--vcpu", "1", "--plane", "1", "--kind", "exit,switch")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    expected = [e for e in events if e["vcpu"] == 1 and e["plane"] == 1 and e["kind"] in ("exit", "switch")]
    assert len(lines) == len(expected) > 0
    assert all(re.match(r"^ *\d+\.\d{3} us  vcpu1/vtl1 +(exit|switch) ", ln) for ln in lines), lines
    mid = events[len(events) // 2]["ts"]
    res = pykvmm("trace", "summary", str(streamed), "--json", "--from", "0", "--to", str(mid), "--kind", "exit")
    s = json.loads(res.stdout)
    assert s["events"] == s["exits"] == sum(1 for e in events if e["kind"] == "exit" and e["ts"] <= mid)
    assert all(r["total_us"] <= mid + 0.001 for r in s["residency"].values())
    for bad, msg in ((["--vcpu", "x"], "--vcpu takes numbers"), (["--kind", "exits"], "--kind: unknown exits"),
                     (["--from", "5", "--to", "1"], "is before --from")):
        res = pykvmm("trace", "show", str(streamed), *bad)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_cli_trace_export_turns_a_stream_into_chrome(streamed, tmp_path):
    out = tmp_path / "run.json"
    res = pykvmm("trace", "export", str(streamed), "-o", str(out))
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert {e["name"] for e in doc["traceEvents"] if e["ph"] == "X"} == {"VTL0", "VTL1"}
    assert tr.load(str(out)) == tr.load(str(streamed))
    ipis = [e for e in tr.load(str(streamed)) if e["kind"] == "hypercall" and "Ipi" in e.get("name", "")]
    assert sum(e["ph"] == "s" for e in doc["traceEvents"]) == sum(len(e["targets"]) for e in ipis) > 0


def test_cli_trace_plot_draws_a_lane_per_vcpu(streamed, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'pykvmm[plot]')")
    from matplotlib import image

    from pykvmm.debug.plot import PLANE_RGB
    out = tmp_path / "timeline.png"
    res = pykvmm("trace", "plot", str(streamed), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "2 vCPU lanes" in res.stderr
    px = (image.imread(str(out))[:, :, :3] * 255).round().astype(int)
    height, width, _ = px.shape
    assert height > 100 and width > 400 and (px != 255).any()          # something is drawn
    plot_area = px[:, : int(width * 0.7)]                              # the legend is on the right

    def bands(rgb):
        rows = (plot_area == rgb).all(axis=2).sum(axis=1) > width * 0.02
        return sum(1 for y in range(1, height) if rows[y] and not rows[y - 1])
    assert bands(PLANE_RGB[0]) == 2                                     # VTL0 in both vCPU lanes
    assert 1 <= bands(PLANE_RGB[1]) <= 2                                # VTL1 where it ran
