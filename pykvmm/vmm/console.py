"""The guest console (PORT_CONSOLE and ucall PRINTs): what the guest writes, shown safely.

Rules (README "Guest console"):

* Bounded host memory: a line is cut at CONSOLE_LINE_MAX bytes; the result keeps the last
  CONSOLE_HISTORY_LINES lines (``lines``) and counts the rest (``line_count``).
* Nothing the guest writes reaches the terminal as a control: C0/C1 controls, DEL and the
  Unicode bidi overrides are shown escaped (``\\x1b``, ``\\u202e``), bytes that are not UTF-8
  as ``\\xff``, and the text is encoded for the output with backslash escapes, so any byte
  prints under any PYTHONIOENCODING. ``raw=True`` (``--raw-console``) passes bytes unchanged.
* The guest never waits for the terminal: output to a file descriptor is written by one
  writer thread from a backlog of at most CONSOLE_BACKLOG_MAX bytes (BoundedWriter); what does
  not fit while the output is blocked is dropped and counted (``dropped``), so a timeout or a
  signal still ends the run on time. A closed output (EPIPE) calls ``on_closed`` once and
  output stops.
* pykvmm's own output during ``pykvmm run`` (``--trace-exits``, dumps, the final report)
  goes the same way: StdStreams puts both sys.stdout and sys.stderr on BoundedWriters.
"""

from __future__ import annotations

import errno
import io
import os
import select
import sys
import threading
import time
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
    """Bytes the guest writes, line-buffered per (vCPU, plane).

    A device that is one stream for the whole machine (the UART) writes as vCPU
    ``DEVICE_STREAM``: its lines carry no vCPU/plane prefix, as on a real serial port.
    """

    DEVICE_STREAM = -1

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
        if vcpu == self.DEVICE_STREAM:
            return ""
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
    writer = getattr(out, "bounded_writer", None)      # pykvmm run's own stdout (StdStreams)
    if writer is not None:
        writer.on_close(on_closed)
        return writer
    try:
        fd = out.fileno()
        out.flush()
    except (AttributeError, OSError, ValueError):
        return _StreamOutput(out, on_closed)
    return BoundedWriter(fd, getattr(out, "encoding", None) or "utf-8", on_closed)


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


class BoundedWriter:
    """A file descriptor written by one daemon thread from a backlog of at most
    CONSOLE_BACKLOG_MAX bytes: ``put_bytes`` never waits for the reader. A write that does
    not fit while the reader is not reading is dropped whole and counted (``dropped``). A
    closed reader (EPIPE, EBADF, EIO) calls the ``on_close`` callbacks once; everything after
    that is dropped and counted too."""

    def __init__(self, fd: int, encoding: str = "utf-8", on_closed=None):
        self.fd, self.encoding = fd, encoding
        self.dropped = 0
        self.written = 0
        self.closed = False
        self._on_closed = [on_closed] if on_closed else []
        self._chunks: list[bytes] = []
        self._size = 0
        self._busy = False
        self._in_flight = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def on_close(self, callback) -> None:
        """Call ``callback()`` when the reader goes away (at once if it already has)."""
        if callback is None:
            return
        with self._cond:
            self._on_closed.append(callback)
            already = self.closed
        if already:
            callback()

    def put_text(self, text: str, always: bool = False) -> None:
        self.put_bytes(text.encode(self.encoding, "backslashreplace"), always)

    def put_bytes(self, data: bytes, always: bool = False) -> None:
        """Queue ``data``; ``always``: even past the backlog limit (a run's last words, once)."""
        with self._cond:
            if self.closed or (self._size + len(data) > CONSOLE_BACKLOG_MAX and not always):
                self.dropped += len(data)
                return
            self._chunks.append(data)
            self._size += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"writer-fd{self.fd}", daemon=True)
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
                self._in_flight = len(data)
            view = memoryview(data)
            try:
                while view:
                    try:
                        n = os.write(self.fd, view)
                    except BlockingIOError:          # someone made the fd non-blocking
                        select.select([], [self.fd], [], 1.0)
                        continue
                    view = view[n:]
                    with self._cond:
                        self.written += n
                        self._in_flight = len(view)
                        self._cond.notify_all()
            except OSError as e:
                with self._cond:
                    self.closed = True
                    self.dropped += len(view) + self._size
                    self._chunks.clear()
                    self._size = 0
                    self._busy = False
                    self._cond.notify_all()
                    callbacks = list(self._on_closed) if e.errno in (errno.EPIPE, errno.EBADF, errno.EIO) else []
                for callback in callbacks:
                    callback()
                return

    def idle(self) -> bool:
        return self.closed or not (self._chunks or self._busy)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the reader to take everything. False: it did not."""
        with self._cond:
            return self._cond.wait_for(self.idle, timeout)

    def unwritten(self) -> int:
        """Bytes the reader never took: dropped, or still queued or being written."""
        with self._cond:
            return self.dropped + (0 if self.idle() else self._size + self._in_flight)


def finish_writers(writers, deadline: float, stall: float, poll: float = 0.05) -> list[int]:
    """Wait for the readers of ``writers`` while they take output: until every writer is idle,
    ``deadline`` (time.monotonic) passes, or none made progress for ``stall`` s. Returns each
    writer's unwritten bytes."""
    last, progress = None, time.monotonic()
    while True:
        now = time.monotonic()
        if all(w.idle() for w in writers) or now >= deadline:
            break
        written = [w.written for w in writers]
        if written != last:
            last, progress = written, now
        elif now - progress >= stall:
            break
        time.sleep(poll)
    return [w.unwritten() for w in writers]


class _WriterRaw(io.RawIOBase):
    """The raw layer under a text stream whose bytes go to a BoundedWriter."""

    def __init__(self, writer: BoundedWriter):
        super().__init__()
        self.writer = writer

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writer.put_bytes(bytes(data))
        return len(data)

    def fileno(self) -> int:
        return self.writer.fd

    def isatty(self) -> bool:
        try:
            return os.isatty(self.writer.fd)
        except OSError:
            return False


def bounded_text_stream(writer: BoundedWriter, like) -> io.TextIOWrapper:
    """A text stream like ``like`` (its encoding and errors) whose writes never wait."""
    stream = io.TextIOWrapper(_WriterRaw(writer), encoding=getattr(like, "encoding", None) or "utf-8",
                              errors=getattr(like, "errors", None) or "backslashreplace", write_through=True)
    stream.bounded_writer = writer
    return stream


def write_if_ready(fd: int, data: bytes) -> bool:
    """Write a short message (under PIPE_BUF) now if ``fd`` takes it without waiting (for a
    signal handler); False: it would have waited, nothing was written."""
    try:
        if not select.select([], [fd], [], 0)[1]:
            return False
        os.write(fd, data[:select.PIPE_BUF])
        return True
    except OSError:
        return False


class StdStreams:
    """``pykvmm run``'s stdout and stderr: nothing pykvmm prints can hold the run's timeout or
    its signal handling, whatever the terminal does (README "What a guest cannot do").

    ``install()`` replaces sys.stdout and sys.stderr with text streams over a BoundedWriter
    each (fd 1, fd 2): every print, click.echo, traceback, ``--trace-exits`` line and the
    final report is queued (up to CONSOLE_BACKLOG_MAX bytes per stream; beyond that a write
    is dropped whole and counted; ``last_words`` always goes in). ``finish()`` waits for the readers while they take output,
    at most FINAL_DRAIN_LIMIT s in all and FINAL_DRAIN_STALL s without progress, then puts the
    original streams back; what a reader never took is lost (and counted in ``dropped``)."""

    FINAL_DRAIN_LIMIT = 5.0
    FINAL_DRAIN_STALL = 2.0

    def __init__(self):
        self._saved = (sys.stdout, sys.stderr)
        self.out = BoundedWriter(1, getattr(sys.stdout, "encoding", None) or "utf-8")
        self.err = BoundedWriter(2, getattr(sys.stderr, "encoding", None) or "utf-8")

    @classmethod
    def install(cls) -> "StdStreams":
        self = cls()
        for stream in self._saved:
            try:
                stream.flush()                 # what the interpreter had buffered goes first
            except (OSError, ValueError):
                pass
        sys.stdout = bounded_text_stream(self.out, self._saved[0])
        sys.stderr = bounded_text_stream(self.err, self._saved[1])
        return self

    def last_words(self, text: str) -> None:
        """``text`` on stderr after everything written so far, past the backlog limit if need
        be (the run's summary: a reader that comes back gets it)."""
        sys.stderr.flush()
        self.err.put_text(text, always=True)

    def finish(self) -> tuple[int, int]:
        """(stdout, stderr) bytes the readers never took. Restores the original streams."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        lost = finish_writers((self.out, self.err), time.monotonic() + self.FINAL_DRAIN_LIMIT, self.FINAL_DRAIN_STALL)
        sys.stdout, sys.stderr = self._saved
        return lost[0], lost[1]
