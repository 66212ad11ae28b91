"""The debug console: bytes the guest writes to PORT_CONSOLE (and the UART), line-buffered."""

from __future__ import annotations

import sys
import threading


class Console:
    """Bytes the guest writes to PORT_CONSOLE, line-buffered per (vCPU, plane).

    A device that is one stream for the whole machine (the UART) writes as vCPU
    ``DEVICE_STREAM``: its lines carry no vCPU/plane prefix, as on a real serial port.
    """

    DEVICE_STREAM = -1

    def __init__(self, out=sys.stdout, prefix_vcpus: bool = False, prefix_planes: bool = False):
        self.out = out  # None: keep lines only (tests read them from the result)
        self.prefix_vcpus, self.prefix_planes = prefix_vcpus, prefix_planes
        self._buffers: dict[tuple[int, int], bytearray] = {}
        self._lock = threading.Lock()
        self.lines: list[tuple[int, int, str]] = []

    def write(self, vcpu: int, plane: int, data: bytes) -> None:
        buf = self._buffers.setdefault((vcpu, plane), bytearray())
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            self._emit(vcpu, plane, bytes(buf[:nl]))
            del buf[:nl + 1]
        if len(buf) > 4096:
            self._emit(vcpu, plane, bytes(buf))
            buf.clear()

    def _emit(self, vcpu: int, plane: int, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        prefix = ""
        if vcpu != self.DEVICE_STREAM and (self.prefix_vcpus or self.prefix_planes):
            parts = []
            if self.prefix_vcpus:
                parts.append(f"vcpu{vcpu}")
            if self.prefix_planes:
                parts.append(f"plane{plane}")
            prefix = "[" + "/".join(parts) + "] "
        with self._lock:
            self.lines.append((vcpu, plane, text))
            if self.out is not None:
                self.out.write(prefix + text + "\n")
                self.out.flush()

    def flush(self) -> None:
        for (vcpu, plane), buf in list(self._buffers.items()):
            if buf:
                self._emit(vcpu, plane, bytes(buf))
                buf.clear()
