"""Trace recording and export: JSON lines, and Chrome trace-event JSON (Perfetto, chrome://tracing).

The machine calls ``machine.trace(event)`` (a :class:`pykvmm.vmm.events.TraceEvent`) at every
exit, hypercall, plane switch, plane event, injected fault, ucall and lifecycle step, and
only when a sink is set. :class:`TraceRecorder` is such a sink: it appends the event object
to a list (atomic under the GIL, so vCPU threads need no lock) and converts nothing until
the run is over. Any ``kind`` is accepted; kinds this module does not know are exported as
plain instant events.

Normalised events (what both files hold, and what :func:`load` gives back) are dicts:
``{"ts": microseconds since the start, "kind", "vcpu", "plane", ...details}``; an exit also
gets ``"reason"`` (``IoOut:0xea`` ...), see :func:`exit_reason`.

The Chrome trace-event export (layout, IPI flows) is export.py; queries query.py; plots plot.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..vmm import abi
from ..vmm import events as ev
from ..vmm.hyperv import tlfs
from ..vmm.hypercalls import HvInputVtl

JSONL, CHROME = "jsonl", "chrome"
FORMATS = (JSONL, CHROME)

PORT_NAMES = {abi.PORT_UCALL: "ucall", abi.PORT_CONSOLE: "console", abi.PORT_HYPERCALL: "hypercall",
              abi.PORT_NULL: "null"}
IPI_CODES = {tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX}


def format_for(path: str, flag: str | None = None) -> str:
    """The export format: an explicit flag wins; else .jsonl/.json-lines/.ndjson -> jsonl,
    .json -> chrome; anything else jsonl."""
    if flag:
        if flag not in FORMATS:
            raise ValueError(f"unknown trace format {flag!r} (choose {', '.join(FORMATS)})")
        return flag
    name = str(path).lower()
    if name.endswith((".jsonl", ".json-lines", ".ndjson")):
        return JSONL
    if name.endswith(".json"):
        return CHROME
    return JSONL


class TraceRecorder:
    """A trace sink: ``machine.trace = TraceRecorder()``. Cheap: one list append per event."""

    def __init__(self):
        self.events: list = []
        self.t0 = time.monotonic()
        self.append = self.events.append

    def __call__(self, event) -> None:
        self.append(event)

    def __len__(self):
        return len(self.events)

    def __bool__(self):          # the machine tests ``if sink:``: an empty recorder is still on
        return True

    def normalised(self) -> list[dict]:
        return normalise(self.events, self.t0)

    def export(self, path: str, fmt: str | None = None) -> str:
        return write_trace(self.normalised(), path, fmt)


class Fanout:
    """Call several sinks with every event (e.g. the recorder and the live exit printer)."""

    def __init__(self, *sinks):
        self.sinks = [s for s in sinks if s]

    def __call__(self, event) -> None:
        for s in self.sinks:
            s(event)

    def __bool__(self):
        return bool(self.sinks)


class IpiAnnotator:
    """A trace sink that decodes IPI hypercalls where they happen (on the vCPU thread, with the
    caller's registers and the input page still live) and adds ``vector``, ``target_plane`` and
    ``targets`` to the event: the memory form keeps its input in guest memory, which the
    exporter could no longer trust at the end of the run. Put it before the recorder."""

    def __init__(self, machine):
        self.machine = machine

    def __call__(self, event) -> None:
        d = event.details
        if event.kind != ev.HYPERCALL or d.get("code") not in IPI_CODES or "targets" in d:
            return
        if d.get("code") != tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI:
            return
        try:
            v = self.machine.threads[event.vcpu].planes_vcpu.plane_vcpu(event.plane)
            fast = v.regs.rcx >> 16 & 1
            if fast:
                head, mask = d.get("rdx", 0), d.get("r8", 0)
            else:
                raw = self.machine.memory.read(d.get("rdx", 0), 16)
                head, mask = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        except Exception:        # a bad GPA: the call failed anyway; leave the event as it is
            return
        vtl = (head >> 32) & 0xFF
        d["vector"] = head & 0xFFFFFFFF
        d["target_plane"] = HvInputVtl(vtl).target(event.plane)
        d["targets"] = [i for i in range(64) if mask >> i & 1]


# ---- normalisation ------------------------------------------------------------------------

def exit_reason(event: dict) -> str:
    """An exit event's fields (``{"exit": "IoOut", "port": 0xea, ...}``, as
    :func:`pykvmm.exits.fields` gives them) -> ``IoOut:0xea(hypercall)``; others: the exit's name."""
    name = str(event.get("exit", "exit"))
    port = event.get("port")
    if name in ("IoOut", "IoIn") and isinstance(port, int):
        label = PORT_NAMES.get(port)
        return f"{name}:{port:#x}" + (f"({label})" if label else "")
    return name


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    return str(v)


def normalise(events, t0: float | None = None) -> list[dict]:
    """TraceEvents (or dicts with a ``t`` in seconds) -> normalised dicts, time-ordered."""
    raw = []
    for e in events:
        if isinstance(e, dict):
            d = dict(e)
        else:
            d = {"t": e.t, "kind": e.kind, "vcpu": e.vcpu, "plane": e.plane, **(e.details or {})}
        raw.append(d)
    if not raw:
        return []
    start = [d["t"] for d in raw if d.get("kind") == ev.LIFECYCLE and d.get("what") == "start"]
    base = start[0] if start else (t0 if t0 is not None else min(d["t"] for d in raw))
    out = []
    for d in raw:
        t = d.pop("t")
        n = {"ts": round((t - base) * 1e6, 3)}
        n.update({k: _jsonable(v) for k, v in d.items()})
        if n.get("kind") == ev.EXIT and "reason" not in n:
            n["reason"] = exit_reason(n)
        out.append(n)
    out.sort(key=lambda d: d["ts"])   # stable: one thread's events keep their order
    return out


def jsonl_line(event: dict) -> str:
    return json.dumps(event, separators=(",", ":")) + "\n"


def write_jsonl(events: list[dict], f) -> None:
    for e in events:
        f.write(jsonl_line(e))


def write_trace(events: list[dict], path: str, fmt: str | None = None) -> str:
    """Write normalised events as JSON lines or Chrome JSON (format_for); returns the format."""
    fmt = format_for(path, fmt)
    if fmt == JSONL:
        with open(path, "w") as f:
            write_jsonl(events, f)
    else:
        write_chrome(events, path)
    return fmt


def write_chrome(events: list[dict], path: str) -> None:
    from .export import chrome_trace     # export.py builds on this module

    text = json.dumps(chrome_trace(events), separators=(",", ":"))   # one shot: 3x json.dump's speed
    with open(path, "w") as f:
        f.write(text)
        f.write("\n")


# ---- reading back -----------------------------------------------------------------------------

class TraceFormatError(ValueError):
    pass


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise TraceFormatError(f"{where}: JSON nested too deeply to be a trace") from None


def _checked(d, where: str) -> dict:
    """A pykvmm trace event, or TraceFormatError saying what is wrong with it."""
    if not isinstance(d, dict) or "kind" not in d or "ts" not in d:
        raise TraceFormatError(f"{where}: not a pykvmm trace event (needs 'ts' and 'kind')")
    ts = d["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts != ts or ts in (float("inf"), float("-inf")):
        raise TraceFormatError(f"{where}: 'ts' must be a finite number of microseconds, not {ts!r:.40}")
    if not isinstance(d["kind"], str):
        raise TraceFormatError(f"{where}: 'kind' must be a string, not {d['kind']!r:.40}")
    for key in ("vcpu", "plane", "from", "to"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TraceFormatError(f"{where}: {key!r} must be an integer, not {v!r:.40}")
    return d


def load(path: str) -> list[dict]:
    """Normalised events from a JSON-lines or a Chrome trace file written by pykvmm.

    A JSON-lines trace whose last line is cut short (the run was killed between flushes)
    loads without that line."""
    text = Path(path).read_text()
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "{":
        try:
            doc = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            doc = None
        if isinstance(doc, dict) and "traceEvents" in doc:
            return from_chrome(doc, path)
    if stripped[0] == "[":
        return from_chrome({"traceEvents": _json(stripped, path)}, path)
    out = []
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            d = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if n == len(lines) and not text.endswith("\n"):
                break                   # the line being written when the run was killed
            raise TraceFormatError(f"{path}:{n}: not a JSON line: {e}") from None
        out.append(_checked(d, f"{path}:{n}"))
    out.sort(key=lambda d: d["ts"])   # vCPU threads write concurrently; stable per thread
    return out


def from_chrome(doc: dict, where: str = "trace") -> list[dict]:
    events = doc.get("traceEvents")
    if not isinstance(events, list):
        raise TraceFormatError(f"{where}: 'traceEvents' must be a list of events")
    out = [_checked(e["args"], f"{where}: event {n}") for n, e in enumerate(events)
           if isinstance(e, dict) and e.get("ph") in ("i", "I") and str(e.get("cat", "")).startswith("pykvmm")
           and isinstance(e.get("args"), dict) and "kind" in e["args"]]
    if not out and events:
        raise TraceFormatError(f"{where}: a Chrome trace, but not one written by pykvmm (no pykvmm events)")
    out.sort(key=lambda d: d["ts"])
    return out


# ---- derived views (shared with the summary) ---------------------------------------------------

def run_info(events: list[dict]) -> dict:
    for e in events:
        if e.get("kind") == ev.LIFECYCLE and e.get("what") == "start":
            return e
    return {}


def vcpu_ids(events: list[dict]) -> list[int]:
    n = run_info(events).get("vcpus")
    ids = {e["vcpu"] for e in events if isinstance(e.get("vcpu"), int) and e["vcpu"] >= 0}
    if isinstance(n, int):
        ids |= set(range(n))
    return sorted(ids)


def plane_label(events: list[dict]) -> str:
    return "VTL" if run_info(events).get("personality") == "vtl" else "plane "


def residency(events: list[dict]) -> dict[int, list[dict]]:
    """Per vCPU, the plane it was in over time: [{"plane", "start", "end", "why"}] (µs).

    Every vCPU starts in plane 0 at the run's start; a switch event ends one residency and
    begins the next; the last ends at the vCPU's DONE ucall if it has one, else at the end of
    the run (the lifecycle end, or the last event)."""
    if not events:
        return {}
    info = run_info(events)
    t_start = info.get("ts", events[0]["ts"])
    ends = [e["ts"] for e in events if e.get("kind") == ev.LIFECYCLE and e.get("what") == "end"]
    t_end = ends[-1] if ends else events[-1]["ts"]
    out: dict[int, list[dict]] = {}
    for v in vcpu_ids(events):
        out[v] = [{"plane": 0, "start": t_start, "end": None, "why": "start"}]
    done: dict[int, float] = {}
    for e in events:
        v = e.get("vcpu")
        if not isinstance(v, int) or v < 0:
            continue
        if v not in out:
            out[v] = [{"plane": 0, "start": t_start, "end": None, "why": "start"}]
        k = e.get("kind")
        if k == ev.SWITCH:
            cur = out[v][-1]
            cur["end"] = e["ts"]
            out[v].append({"plane": e.get("to", e.get("plane", 0)), "start": e["ts"], "end": None,
                           "why": e.get("why", "")})
        elif k == ev.UCALL and e.get("verb") in ("DONE", "done") and v not in done:
            done[v] = e["ts"]
    for v, segs in out.items():
        last = done.get(v, t_end)
        segs[-1]["end"] = max(last, segs[-1]["start"])
    return out


def ipi_targets(e: dict) -> tuple[list[int], int | None]:
    """(target vCPUs, target plane) of an IPI hypercall event, or ([], None)."""
    if e.get("kind") != ev.HYPERCALL:
        return [], None
    name = str(e.get("name", ""))
    if e.get("code") not in IPI_CODES and "ipi" not in name.lower():
        return [], None
    status = e.get("status")
    if status not in (None, 0):
        return [], None
    targets = e.get("targets", e.get("target_vcpus"))
    if targets is None:
        mask = e.get("mask", e.get("processor_mask", e.get("r8")))
        targets = [i for i in range(64) if isinstance(mask, int) and mask >> i & 1]
    plane = e.get("target_plane", e.get("target_vtl", e.get("vtl")))
    if plane is None:
        rdx = e.get("rdx")
        if isinstance(rdx, int):
            vtl = (rdx >> 32) & 0xFF           # HV_INPUT_VTL: bits 3:0 VTL, bit 4 use it
            plane = HvInputVtl(vtl).target(e.get("plane"))
        else:
            plane = e.get("plane")
    return [t for t in targets if isinstance(t, int)], plane
