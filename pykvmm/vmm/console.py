"""The guest console (PORT_CONSOLE and ucall PRINTs): what the guest writes, shown safely.

Rules (README "Guest console"):

* Bounded host memory: a line is cut at CONSOLE_LINE_MAX bytes; the result keeps the last
  CONSOLE_HISTORY_LINES lines (``lines``) and counts the rest (``line_count``).
* Nothing the guest writes reaches the terminal as a control: C0/C1 controls, DEL and the
  Unicode bidi overrides are shown escaped (``\\x1b``, ``\\u202e``), bytes that are not UTF-8
  as ``\\xff``, and the text is encoded for the output with backslash escapes, so any byte
  prints under any PYTHONIOENCODING. ``raw=True`` (``--raw-console``) passes bytes unchanged.
* The guest never waits for the terminal: output to a file descriptor is written by one
  writer thread from a backlog of at most CONSOLE_BACKLOG_MAX bytes; what does not fit while
  the output is blocked is dropped and counted (``dropped``), so a timeout or a signal still
  ends the run on time. A closed output (EPIPE) calls ``on_closed`` once and output stops.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import threading
from collections import deque

CONSOLE_HISTORY_LINES = 1000
CONSOLE_LINE_MAX = 4096
CONSOLE_BACKLOG_MAX = 1 << 20

_CONTROLS = [c for c in range(0x20) if c != 0x09] + list(range(0x7F, 0xA0)) \
    + list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A))
_ESCAPE_TABLE = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}


def escape_controls(text: str) -> str:
    return text.translate(_ESCAPE_TABLE)


def safe_text(raw: bytes) -> str:
    """Guest bytes as printable text: not-UTF-8 bytes and control characters escaped."""
    return escape_controls(raw.decode("utf-8", "backslashreplace"))


class Console:
    """Bytes the guest writes, line-buffered per (vCPU, plane)."""

    def __init__(self, out=sys.stdout, prefix_vcpus: bool = False, prefix_planes: bool = False,
                 raw: bool = False, on_closed=None):
        self.prefix_vcpus, self.prefix_planes, self.raw = prefix_vcpus, prefix_planes, raw
        self._buffers: dict[tuple[int, int], bytearray] = {}
        self._lock = threading.Lock()
        self.lines: deque[tuple[int, int, str]] = deque(maxlen=CONSOLE_HISTORY_LINES)
        self.line_count = 0
        self.out = out           # None: keep lines only (tests read them from the result)
        self._sink = _output_for(out, on_closed) if out is not None else None

    @property
    def dropped(self) -> int:
        """Bytes not shown because the output was blocked or closed."""
        return self._sink.dropped if self._sink is not None else 0

    def write(self, vcpu: int, plane: int, data: bytes) -> None:
        buf = self._buffers.setdefault((vcpu, plane), bytearray())
        start = len(buf)
        buf += data
        if data.find(b"\n") >= 0:          # only the new bytes can hold a newline: O(len(data))
            nl = buf.find(b"\n", start)
            while nl >= 0:
                self._emit(vcpu, plane, bytes(buf[:nl]))
                del buf[:nl + 1]
                nl = buf.find(b"\n")
        while len(buf) >= CONSOLE_LINE_MAX:
            self._emit(vcpu, plane, bytes(buf[:CONSOLE_LINE_MAX]))
            del buf[:CONSOLE_LINE_MAX]

    def _prefix(self, vcpu: int, plane: int) -> str:
        parts = []
        if self.prefix_vcpus:
            parts.append(f"vcpu{vcpu}")
        if self.prefix_planes:
            parts.append(f"plane{plane}")
        return "[" + "/".join(parts) + "] " if parts else ""

    def _emit(self, vcpu: int, plane: int, raw: bytes) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        text = raw.decode("utf-8", "replace") if self.raw else safe_text(raw)
        with self._lock:
            self.lines.append((vcpu, plane, text))
            self.line_count += 1
            if self._sink is not None:
                prefix = self._prefix(vcpu, plane)
                if self.raw:
                    self._sink.put_bytes(prefix.encode() + raw + b"\n")
                else:
                    self._sink.put_text(prefix + text + "\n")

    def flush(self, timeout: float = 1.0) -> bool:
        """Emit partial lines; wait up to ``timeout`` s for the output. False: still blocked."""
        for (vcpu, plane), buf in list(self._buffers.items()):
            if buf:
                self._emit(vcpu, plane, bytes(buf))
                buf.clear()
        return self._sink.drain(timeout) if self._sink is not None else True


def _output_for(out, on_closed):
    try:
        fd = out.fileno()
        out.flush()
    except (AttributeError, OSError, ValueError):
        return _StreamOutput(out, on_closed)
    return _FdOutput(fd, getattr(out, "encoding", None) or "utf-8", on_closed)


class _StreamOutput:
    """A text stream without a file descriptor (a test's StringIO): written at once."""

    def __init__(self, out, on_closed):
        self.out, self.on_closed = out, on_closed
        self.encoding = getattr(out, "encoding", None)
        self.dropped = 0
        self.closed = False

    def put_text(self, text: str) -> None:
        if self.encoding:
            text = text.encode(self.encoding, "backslashreplace").decode(self.encoding)
        self._write(text)

    def put_bytes(self, data: bytes) -> None:
        self._write(data.decode("utf-8", "backslashreplace"))

    def _write(self, text: str) -> None:
        if self.closed:
            self.dropped += len(text)
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (BrokenPipeError, ValueError):        # closed pipe / closed file object
            self.closed = True
            self.dropped += len(text)
            if self.on_closed:
                self.on_closed()

    def drain(self, timeout: float) -> bool:
        return True


class _FdOutput:
    """A file descriptor written by one daemon thread from a bounded backlog."""

    def __init__(self, fd: int, encoding: str, on_closed):
        self.fd, self.encoding, self.on_closed = fd, encoding, on_closed
        self.dropped = 0
        self.closed = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put_text(self, text: str) -> None:
        self.put_bytes(text.encode(self.encoding, "backslashreplace"))

    def put_bytes(self, data: bytes) -> None:
        with self._cond:
            if self.closed or self._size + len(data) > CONSOLE_BACKLOG_MAX:
                self.dropped += len(data)
                return
            self._chunks.append(data)
            self._size += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="console-writer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._size = 0
                self._busy = True
            view = memoryview(data)
            try:
                while view:
                    try:
                        view = view[os.write(self.fd, view):]
                    except BlockingIOError:          # someone made the fd non-blocking
                        select.select([], [self.fd], [], 1.0)
            except OSError as e:
                with self._cond:
                    self.closed = True
                    self.dropped += len(view) + self._size
                    self._chunks.clear()
                    self._busy = False
                    self._cond.notify_all()
                if e.errno in (errno.EPIPE, errno.EBADF, errno.EIO) and self.on_closed:
                    self.on_closed()
                return

    def drain(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.closed or not (self._chunks or self._busy), timeout)
