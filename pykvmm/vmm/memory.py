"""Guest memory: one anonymous host mapping, registered in every plane's VM.

Every guest-supplied address goes through the bounds checks here, so a hostile guest gets
a GuestMemoryError (turned into an error status or a fault), never a host crash.

Some planes may see another page than the RAM at a GPA: a VTL's overlay page (VSM,
vmm/vsm/overlay.py) is the RAM for that VTL, while every other VTL sees the RAM's former
content, kept in a page of its own (``covers``). What the VMM reads or writes on a plane's
behalf (its hypercall input and output, its page-table walks, the code at its RIP) goes
through ``seen_by(plane)``, so the VMM never hands a VTL another VTL's overlay.
"""

from __future__ import annotations

import mmap
import struct

from ..uapi import ffi


class GuestMemoryError(ValueError):
    pass


def host_memory_available() -> int | None:
    """Bytes the host can give now (MemAvailable + SwapFree), or None if it does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) << 10 for k, _, v in (line.partition(":") for line in f)
                    if k in ("MemAvailable", "SwapFree")}
    except (OSError, ValueError):
        return None
    return sum(info.values()) if "MemAvailable" in info else None


class GuestMemory:
    def __init__(self, size: int):
        if size <= 0 or size % (2 << 20):
            raise ValueError("guest memory size must be a positive multiple of 2 MiB")
        available = host_memory_available()
        if available is not None and size > available:
            raise ValueError(f"guest memory of {size >> 20} MiB is more than this host can give now "
                             f"({available >> 20} MiB available, RAM and swap)")
        self.size = size
        try:
            self.map = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise ValueError(f"cannot map {size >> 20} MiB of guest memory: {e.strerror}") from None
        self._cbuf = ffi.from_buffer(self.map)
        self.hva = int(ffi.cast("uintptr_t", self._cbuf))
        # page GPA -> its cover: an object with ``map`` (the page those planes see there) and
        # ``planes`` (the set of planes that see it); kept by vsm/overlay.py
        self.covers: dict[int, object] = {}

    def seen_by(self, plane: int) -> "GuestMemory":
        """This memory as ``plane`` sees it (module docstring): the same object when no page
        is covered, which is the common case and costs nothing."""
        if not self.covers:
            return self
        return PlaneMemory(self, plane)

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest memory "
                                   f"(0..{self.size:#x})")

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return self.map[gpa:gpa + length]

    def write(self, gpa: int, data: bytes) -> None:
        self.check(gpa, len(data))
        self.map[gpa:gpa + len(data)] = data

    def u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        return struct.unpack_from("<I", self.map, gpa)[0]

    def u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        return struct.unpack_from("<Q", self.map, gpa)[0]

    def write_u32(self, gpa: int, value: int) -> None:
        if gpa < 0 or gpa + 4 > self.size:      # (check() inline: every VTL entry writes one)
            self.check(gpa, 4)
        struct.pack_into("<I", self.map, gpa, value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        self.check(gpa, 8)
        struct.pack_into("<Q", self.map, gpa, value & 0xFFFFFFFFFFFFFFFF)

    def cstring(self, gpa: int, limit: int) -> str:
        """A NUL-terminated string the guest points at (at most ``limit`` bytes, decoded leniently)."""
        if gpa == 0:
            return ""
        self.check(gpa, 1)
        end = min(self.size, gpa + limit)
        raw = self.read(gpa, end - gpa)         # (a PlaneMemory reads its covers)
        nul = raw.find(b"\0")
        return (raw if nul < 0 else raw[:nul]).decode("utf-8", "replace")

    def close(self) -> None:
        self._cbuf = None
        try:
            self.map.close()
        except BufferError:
            pass


class PlaneMemory(GuestMemory):
    """Guest memory as one plane sees it: the RAM, except the pages ``covers`` gives that
    plane (the same interface as GuestMemory; accesses may span covered and plain pages)."""

    def __init__(self, memory: GuestMemory, plane: int):      # shares the RAM: no mapping of its own
        self.size, self.map, self.hva = memory.size, memory.map, memory.hva
        self.covers, self.plane = memory.covers, plane

    def seen_by(self, plane: int) -> GuestMemory:
        return PlaneMemory(self, plane) if plane != self.plane else self

    def _pieces(self, gpa: int, length: int):
        """(buffer, offset, count) runs of [gpa, gpa + length) as this plane sees them."""
        self.check(gpa, length)
        end = gpa + length
        while gpa < end:
            page = gpa & ~0xFFF
            n = min(end, page + 0x1000) - gpa
            cover = self.covers.get(page)
            if cover is not None and self.plane in cover.planes:
                yield cover.map, gpa - page, n
            else:
                yield self.map, gpa, n
            gpa += n

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(buf[off:off + n] for buf, off, n in self._pieces(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        done = 0
        for buf, off, n in self._pieces(gpa, len(data)):
            buf[off:off + n] = data[done:done + n]
            done += n

    def u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def close(self) -> None:
        """The RAM belongs to the GuestMemory this view was made from."""
