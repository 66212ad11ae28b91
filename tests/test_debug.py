"""Observability: traces (JSON lines and Chrome), `trace summary`, --trace-exits, --dump-on-exit.

The 2-plane guest is guest/dbg_planes.S (bare policy: plane 0 switches to plane 1 and back
--arg times with PykvmmSwitchPlane); the IPI flow test uses the VTL demo when it is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pykvmm import exits as X
from pykvmm.debug import summary as sm
from pykvmm.debug import trace as tr
from pykvmm.vmm import events as ev
from pykvmm.vmm import loader
from pykvmm.vmm.machine import Machine, MachineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 4


def pykvmm(*args, timeout=60):
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
        if config.get("personality") == "vtl":
            m.trace = tr.Fanout(tr.IpiAnnotator(m), rec)
        result = m.run(20)
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
    assert starts and starts.keys() == ends.keys()
    for i, s in starts.items():
        f = ends[i]
        assert f["bp"] == "e" and f["ts"] >= s["ts"]
        assert s["tid"] == 1 and f["tid"] == 2       # vCPU 0's VTL0 asks VTL1 on vCPU 1
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
    assert tr.chrome_trace(events)["traceEvents"]        # exports unknown kinds as instants


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
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("vcpu0/") and "Interrupted" not in ln]
    assert len(lines) == 4      # 2 hypercalls, SYNC, DONE (and maybe kicks: Interrupted)
    assert lines[0].startswith("vcpu0/plane0 IoOut(port=0xea")
    assert lines[1].startswith("vcpu0/plane1 IoOut(port=0xea")
    assert all("rip=0x" in ln for ln in lines)
    assert "out 0xea, al" in lines[0] and "out 0xe8, eax" in lines[-1]


def test_cli_dump_on_exit_every_vcpu_every_plane(kvm_available):
    res = pykvmm("run", str(guest("dbg_planes")), "--vcpus", "2", "--planes", "2", "--personality", "none",
                 "--dump-on-exit")
    assert res.returncode == 0, res.stderr
    err = res.stderr
    for phrase in ("vCPU 0: running plane 0", "vCPU 1: running plane 0", "  plane 1", "RIP=", "CR3=",
                   "pending events: none", "=> "):
        assert phrase in err, phrase
    assert err.count("  plane 1") == 2


def test_tracing_off_installs_nothing(kvm_available):
    with Machine(loader.load_image(guest("hello")), MachineConfig(quiet=True)) as m:
        assert m.trace is None and m.debugger is None
        assert m.run(10).ok
