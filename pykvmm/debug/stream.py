"""The trace sink of ``pykvmm run --trace FILE``: every event goes to FILE when it happens.

Host memory stays flat however long the run: each event is normalised (trace.normalise)
and written as one JSON line at once; the file is flushed at least every FLUSH_INTERVAL
seconds of events, so a run killed with SIGKILL leaves its trace up to the last flush.
A Chrome trace (``.json``) is written as JSON lines during the run and converted in place
at the end, streamed from the file (trace.JsonlSource): memory stays flat there too.

A write that fails (ENOSPC, EFBIG, EIO...) stops the recording; ``close()`` then says so and
an incomplete regular file is renamed to FILE.incomplete, so nothing mistakes it for a
whole trace (the CLI exits with its own status, README's table).
"""

from __future__ import annotations

import os
import stat
import threading
import time

from ..vmm import events as ev
from . import trace as tr

FLUSH_INTERVAL = 0.2      # seconds of trace events between flushes


class TraceWriteError(Exception):
    pass


class TraceStream:
    def __init__(self, path: str, fmt: str | None = None):
        self.path = path
        self.format = tr.format_for(path, fmt)
        self.f = open(path, "w", encoding="utf-8")
        self.t0 = time.monotonic()
        self.count = 0
        self.error: OSError | None = None
        self._lock = threading.Lock()
        self._last_flush = self.t0

    def __bool__(self):          # the machine tests ``if sink:``
        return True

    def __len__(self):
        return self.count

    def __call__(self, event) -> None:
        if self.error is not None:
            return
        if self.count == 0 and event.kind == ev.LIFECYCLE and event.details.get("what") == "start":
            self.t0 = event.t       # times are from the run's start, as in a recorded trace
        line = tr.jsonl_line(tr.normalise([event], self.t0)[0])
        with self._lock:
            if self.error is not None:
                return
            try:
                self.f.write(line)
                self.count += 1
                if event.t - self._last_flush >= FLUSH_INTERVAL:
                    self.f.flush()
                    self._last_flush = event.t
            except OSError as e:
                self.error = e

    def close(self) -> str:
        """Finish the file; returns the format written. Raises TraceWriteError if the trace
        is not whole (the message says what was done with the file)."""
        with self._lock:
            try:
                self.f.close()
            except OSError as e:
                self.error = self.error or e
            if self.error is None and self.format == tr.CHROME:
                try:
                    self._to_chrome()
                except (OSError, tr.TraceFormatError) as e:     # the latter: a line not as written
                    self.error = e
        if self.error is not None:
            raise TraceWriteError(f"could not write the trace to {self.path}: "
                                  f"{getattr(self.error, 'strerror', None) or self.error}; {self._set_aside()}")
        return self.format

    def _to_chrome(self) -> None:
        tmp = f"{self.path}.tmp"
        try:
            tr.write_trace_from(tr.JsonlSource(self.path), tmp, tr.CHROME)
            os.replace(tmp, self.path)
        except (OSError, tr.TraceFormatError):
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _set_aside(self) -> str:
        try:
            regular = stat.S_ISREG(os.stat(self.path).st_mode)
        except OSError:
            return "the file is gone"
        if not regular:
            return "nothing was recorded after that"
        target = f"{self.path}.incomplete"
        try:
            os.replace(self.path, target)
            return f"what was written before that is in {target}"
        except OSError:
            try:
                os.unlink(self.path)
                return "the incomplete file was removed"
            except OSError:
                return "the file is incomplete"
