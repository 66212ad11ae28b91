"""TLFS overlay pages, per VTL: the hypercall page ("Establishing the Hypercall Interface"),
the SynIC message and event-flag pages (SIMP, SIEFP), the VP assist page and the reference
TSC page appear "as an overlay to the GPA space; they cover whatever else is mapped" there,
and VSM keeps them per VTL "such that higher VTLs have reliable access".

How pykvmm does it: the guest page at the overlay's GPA becomes the overlay of the VTL that
placed it, a fresh zeroed page (the VMM writes hypercall stubs, messages, entry reasons...
there, as before), after its RAM content is saved in a page of its own, the *beneath* copy.
Every other VTL sees the beneath copy at that GPA instead (Plane.cover: its own memslot on
multivm), so it keeps seeing and changing the RAM that was there, and never sees or changes
the overlay; so does the VMM on that VTL's behalf (its hypercall input and output, its page
walks: GuestMemory.seen_by, through ``memory.covers``). When the last
overlay at the GPA goes (disabled, moved, GUEST_OS_ID cleared) the beneath copy is put back:
the RAM reappears as the VTLs left it.

Several overlays at one GPA: any number of VPs and VTLs may put their hypercall pages there
(they are the same read-only code); a VTL may put several of its own overlays there (the guest
gets what it asked for, one page); an overlay of another kind over a GPA another VTL's overlay
covers is refused (the MSR write #GPs, saying so): one guest page cannot hold two VTLs'
different overlays. Bounds: overlays are per VTL, not per VP (two VPs of one VTL at one GPA
share the page); the hypercall page stays writable; on backends
whose planes share one memory layout the overlay is not hidden from the other VTLs (the
RAM is still restored), and pykvmm warns once.
"""

from __future__ import annotations

import mmap

from ...planes.memview import PAGE, ProtectionUnsupported
from ...uapi import ffi
from ..hyperv.partition import MsrFault

SHAREABLE = {"hypercall"}


class _Beneath:
    """The RAM content of one overlaid guest page while it is covered."""

    def __init__(self, content: bytes):
        self.map = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        self.map[:] = content
        self._buf = ffi.from_buffer(self.map)
        self.hva = int(ffi.cast("uintptr_t", self._buf))
        self.planes: set[int] = set()     # the planes that see it

    def close(self) -> None:
        self._buf = None
        self.map.close()


class Overlays:
    """The overlay pages of every VP and VTL (the caller holds hv.lock)."""

    def __init__(self, hv):
        self.hv = hv
        self.machine = hv.machine
        self.owners: dict[int, set[tuple]] = {}      # page GPA -> {(kind, vp, vtl)}
        self.beneath: dict[int, _Beneath] = {}
        self.placed = 0
        self.restored = 0
        self._warned = False

    def place(self, kind: str, vp, vtl: int, old: int, new: int) -> None:
        """The MSR of overlay ``kind`` of (``vp``, ``vtl``) goes from ``old`` to ``new`` (Enable
        bit 0, GPA 63:12). MsrFault if the new page cannot be placed."""
        before = old & ~(PAGE - 1) if old & 1 else None
        after = new & ~(PAGE - 1) if new & 1 else None
        if before == after:
            return
        key = (kind, vp, vtl)
        if after is not None:
            self._check(kind, vtl, after)
        if before is not None:
            self._release(key, before)
        if after is not None:
            self._acquire(key, after)

    def _check(self, kind: str, vtl: int, gpa: int) -> None:
        for k, _, owner in self.owners.get(gpa, ()):
            if owner != vtl and not (k in SHAREABLE and kind in SHAREABLE):
                raise MsrFault(f"GPA {gpa:#x} already holds VTL{owner}'s {k} overlay page: pykvmm cannot "
                               f"overlay one guest page with two VTLs' different pages")

    def _acquire(self, key: tuple, gpa: int) -> None:
        vtl = key[2]
        owners = self.owners.get(gpa)
        if owners is None:
            memory = self.machine.memory
            b = self.beneath[gpa] = memory.covers[gpa] = _Beneath(memory.read(gpa, PAGE))
            memory.write(gpa, bytes(PAGE))
            owners = self.owners[gpa] = set()
            for plane in range(self.machine.plane_count):
                if plane != vtl:
                    self._cover(plane, gpa, b)
            self.placed += 1
        elif vtl in self.beneath[gpa].planes:
            self._uncover(vtl, gpa)
        owners.add(key)

    def _release(self, key: tuple, gpa: int) -> None:
        owners = self.owners[gpa]
        owners.discard(key)
        b = self.beneath[gpa]
        if not owners:
            for plane in sorted(b.planes):
                self._uncover(plane, gpa)
            self.machine.memory.write(gpa, bytes(b.map))
            del self.owners[gpa], self.beneath[gpa], self.machine.memory.covers[gpa]
            b.close()
            self.restored += 1
        elif not any(owner == key[2] for _, _, owner in owners):
            self._cover(key[2], gpa, b)

    def _cover(self, plane: int, gpa: int, b: _Beneath) -> None:
        try:
            self.machine.pvm.planes[plane].cover(gpa, b.hva)
        except ProtectionUnsupported as e:
            if not self._warned:
                self._warned = True
                self.machine.warn(f"overlay pages are not hidden from other VTLs: {e.why}", kind="vsm-overlay")
            return
        b.planes.add(plane)

    def _uncover(self, plane: int, gpa: int) -> None:
        self.machine.pvm.planes[plane].cover(gpa, None)
        self.beneath[gpa].planes.discard(plane)

    def summary(self) -> dict:
        return {"overlays_placed": self.placed, "overlays_restored": self.restored}
