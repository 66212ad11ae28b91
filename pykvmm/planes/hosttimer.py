"""A host timer for the soft-switching backends: calls a function at a time of
``time.monotonic()`` (the clock KVM's LAPIC timers use), on one thread per planes VM.

softswitch.py uses it to make the LAPIC timer expiry of a plane that is not running a plane
event (KVM would only notice the expiry when that plane's vCPU next runs). The thread starts
with the first timer and sleeps until the earliest one; it is woken at once for an earlier
one. A callback must be short: it runs on the timer thread and delays the next.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time


class HostTimer:
    def __init__(self, name: str = "plane-timer"):
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple] = []
        self._seq = itertools.count()    # equal times fire in the order they were set
        self._thread: threading.Thread | None = None
        self._closed = False

    def call_at(self, when: float, fn, *args) -> None:
        """``fn(*args)`` on the timer thread once ``time.monotonic() >= when``."""
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._heap, (when, next(self._seq), fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif self._heap[0][0] == when:
                self._cond.notify()      # a new earliest: the thread sleeps until a later one

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, fn, args = heapq.heappop(self._heap)
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            fn(*args)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
