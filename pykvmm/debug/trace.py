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

import heapq
import json
import os
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
    return write_trace_from(ListSource(events), path, fmt)


def write_trace_from(source, path: str, fmt: str | None = None) -> str:
    """Write the events of ``source`` (a ListSource or JsonlSource) to ``path``, streamed:
    memory does not grow with the number of events. Returns the format written."""
    fmt = format_for(path, fmt)
    if fmt == JSONL:
        with open(path, "w") as f:
            for _, e in source.forward():
                f.write(jsonl_line(e))
    else:
        from .export import write_chrome_from     # export.py builds on this module
        write_chrome_from(source, path)
    return fmt


def write_chrome(events: list[dict], path: str) -> None:
    from .export import write_chrome_from

    write_chrome_from(ListSource(events), path)


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


class ListSource:
    """Normalised, time-ordered events in memory, as an event source for the streamed writers:
    ``forward()`` and ``backward()`` give (position, event) in time order and in reverse."""

    def __init__(self, events: list[dict]):
        self.events = events
        self.info = run_info(events)

    def forward(self):
        return enumerate(self.events)

    def backward(self, kinds=None):
        events = self.events
        return ((k, events[k]) for k in range(len(events) - 1, -1, -1)
                if not kinds or events[k].get("kind") in kinds)


class JsonlSource:
    """A JSON-lines trace file as an event source, read in constant memory: every pass reads
    the file again (forward from the start, backward from the end, a block at a time). The
    position of an event is its line's byte offset. Lines are written by several vCPU threads,
    so the file is only nearly in time order: each pass sorts through a window of
    REORDER_WINDOW events (one thread's events are in order in the file, whatever the window).
    ``keep``: a predicate selecting events (e.g. a query.TraceFilter); ``read`` and ``kept``
    count the events of the last forward pass. A last line cut short (a killed run) is skipped."""

    REORDER_WINDOW = 4096
    BLOCK = 1 << 16

    def __init__(self, path: str, keep=None):
        self.path = path
        self.keep = keep
        self.read = self.kept = 0
        self._info = None

    @property
    def info(self) -> dict:
        """The run's start event (normally the first line), {} if there is none."""
        if self._info is None:
            self._info = next((e for _, e in self._lines_forward(select=False)
                               if e.get("kind") == ev.LIFECYCLE and e.get("what") == "start"), {})
        return self._info

    def _event(self, offset: int, line: bytes, last: bool):
        """The checked event of one line, None for a blank line or a cut-short last line."""
        if not line.strip():
            return None
        try:
            d = json.loads(line)
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError) as e:
            if last and not line.endswith(b"\n"):
                return None              # the line being written when the run was killed
            raise TraceFormatError(f"{self.path}: the line at byte {offset} is not a JSON line: {e}") from None
        return _checked(d, f"{self.path}: byte {offset}")

    def _lines_forward(self, select: bool):
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            for line in f:
                e = self._event(offset, line, offset + len(line) >= size)
                start, offset = offset, offset + len(line)
                if e is not None and (not select or self.keep is None or self.keep(e)):
                    yield start, e

    def _lines_backward(self, kinds):
        marks = tuple(json.dumps(k).encode() for k in kinds) if kinds else ()    # "switch", quoted
        with open(self.path, "rb") as f:
            pos = size = os.fstat(f.fileno()).st_size
            tail = b""
            while pos > 0:
                step = min(self.BLOCK, pos)
                pos -= step
                f.seek(pos)
                block = f.read(step) + tail
                lines = block.split(b"\n")
                end = pos + len(block)
                for k in range(len(lines) - 1, 0, -1):
                    line = lines[k]
                    start = end - len(line)
                    end = start - 1
                    if marks and not any(m in line for m in marks):
                        continue                 # cannot be of those kinds: not even parsed
                    full = line + b"\n" if start + len(line) < size else line
                    e = self._event(start, full, start + len(full) >= size)
                    if e is not None and (not kinds or e.get("kind") in kinds) and (self.keep is None or self.keep(e)):
                        yield start, e
                tail = lines[0]
            if tail and (not marks or any(m in tail for m in marks)):
                e = self._event(0, tail + (b"\n" if len(tail) < size else b""), len(tail) >= size)
                if e is not None and (not kinds or e.get("kind") in kinds) and (self.keep is None or self.keep(e)):
                    yield 0, e

    def forward(self):
        self.read = self.kept = 0
        heap: list = []
        for offset, e in self._lines_forward(select=False):
            self.read += 1
            if self.keep is not None and not self.keep(e):
                continue
            self.kept += 1
            heapq.heappush(heap, (e["ts"], offset, e))
            if len(heap) > self.REORDER_WINDOW:
                ts, offset, e = heapq.heappop(heap)
                yield offset, e
        while heap:
            ts, offset, e = heapq.heappop(heap)
            yield offset, e

    def backward(self, kinds=None):
        """(offset, event) newest first; ``kinds``: only events of these kinds are needed (the
        others are skipped unparsed where the line cannot be one of them)."""
        heap: list = []
        for offset, e in self._lines_backward(kinds):
            heapq.heappush(heap, (-e["ts"], -offset, e))
            if len(heap) > self.REORDER_WINDOW:
                _, offset, e = heapq.heappop(heap)
                yield -offset, e
        while heap:
            _, offset, e = heapq.heappop(heap)
            yield -offset, e


def is_jsonl(path: str) -> bool:
    """Whether ``path`` starts with a pykvmm JSON-lines event (a Chrome trace does not)."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    d = json.loads(line)
                except (json.JSONDecodeError, RecursionError, UnicodeDecodeError):
                    return False
                return isinstance(d, dict) and "kind" in d and "ts" in d
    return False


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
    return label_of(run_info(events))


def label_of(info: dict) -> str:
    """How planes are named, from the run's start event: "VTL1" under the vtl personality."""
    return "VTL" if info.get("personality") == "vtl" else "plane "


class Residency:
    """Plane residencies built event by event, in time order, in memory that grows with the
    vCPUs, not the events: ``feed(e)`` returns the residency a switch closed (or None),
    ``finish()`` the last one of every vCPU. Each is ``{"vcpu", "plane", "start", "end", "why"}`` (µs).

    Every vCPU starts in plane 0 at the run's start; a switch event ends one residency and
    begins the next; the last ends at the vCPU's DONE ucall if it has one, else at the end of
    the run (the lifecycle end, or the last event)."""

    def __init__(self, info: dict):
        self.info = info
        self.t_start = info.get("ts")
        self.current: dict[int, dict] = {}      # vCPU -> its open residency
        self.previous: dict[int, dict] = {}     # vCPU -> the one before it
        self.done: dict[int, float] = {}
        self.t_end = self.t_last = None
        self._started = False
        n = info.get("vcpus")
        self._declared = range(n) if isinstance(n, int) and not isinstance(n, bool) else range(0)

    def _open(self, v: int) -> dict:
        seg = self.current[v] = {"vcpu": v, "plane": 0, "start": self.t_start, "end": None, "why": "start"}
        return seg

    def feed(self, e: dict) -> dict | None:
        if self.t_start is None:
            self.t_start = e["ts"]
        if not self._started:
            self._started = True
            for v in self._declared:
                self._open(v)
        self.t_last = e["ts"]
        k = e.get("kind")
        if k == ev.LIFECYCLE and e.get("what") == "end":
            self.t_end = e["ts"]
        v = e.get("vcpu")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return None
        cur = self.current.get(v) or self._open(v)
        if k == ev.SWITCH:
            cur["end"] = e["ts"]
            self.previous[v] = cur
            self.current[v] = {"vcpu": v, "plane": e.get("to", e.get("plane", 0)), "start": e["ts"], "end": None,
                               "why": e.get("why", "")}
            return cur
        if k == ev.UCALL and e.get("verb") in ("DONE", "done") and v not in self.done:
            self.done[v] = e["ts"]
        return None

    def at(self, v) -> tuple[dict | None, dict | None]:
        """(the open residency of vCPU ``v``, the one before it) at this point of the feed."""
        return self.current.get(v), self.previous.get(v)

    @property
    def vcpus(self) -> list[int]:
        return sorted(set(self.current) | set(self._declared))

    def finish(self) -> list[dict]:
        if self.t_start is None:
            return []
        for v in self._declared:
            if v not in self.current:
                self._open(v)
        end = self.t_end if self.t_end is not None else self.t_last
        out = []
        for v in sorted(self.current):
            seg = self.current[v]
            seg["end"] = max(self.done.get(v, end), seg["start"])
            out.append(seg)
        return out


_SEGMENT_KEYS = ("plane", "start", "end", "why")


def residency(events: list[dict]) -> dict[int, list[dict]]:
    """Per vCPU, the plane it was in over time: [{"plane", "start", "end", "why"}] (see Residency)."""
    if not events:
        return {}
    lanes = Residency(run_info(events))
    out: dict[int, list[dict]] = {}
    for e in events:
        closed = lanes.feed(e)
        if closed is not None:
            out.setdefault(closed["vcpu"], []).append({k: closed[k] for k in _SEGMENT_KEYS})
    for seg in lanes.finish():
        out.setdefault(seg["vcpu"], []).append({k: seg[k] for k in _SEGMENT_KEYS})
    return dict(sorted(out.items()))


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
