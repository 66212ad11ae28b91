"""Per-plane views of guest memory: which guest-physical pages a plane may read, write and
execute (DESIGN.md "Round 2": memory protections are the planes API's job).

    plane.protect(gpa, size, Access.READ | Access.EXEC)   # page-aligned; raises
                                                          # ProtectionUnsupported if the backend
                                                          # cannot enforce that combination
    plane.view.access(gpa)                                # what the plane may do there now
    plane.cover(gpa, hva)                                 # this plane alone sees the host page
                                                          # at hva at that guest page (None: RAM)

An access the view forbids is never performed: ``vcpu.run(plane=p)`` returns a
``kvm.MemoryFault`` exit (KVM_EXIT_MEMORY_FAULT's shape, with ``flags`` naming the access:
MEMORY_FAULT_READ / WRITE / EXEC) with the vCPU's registers as they were before the
faulting instruction (RIP on it), so whoever handles it may retry, skip or emulate it.

What each backend enforces (anything else is refused with ProtectionUnsupported, never
silently weakened):

| backend | kernel mechanism | access combinations it can enforce |
|---|---|---|
| multivm | each plane is its own VM, so each plane has its own memslot layout: a read-only slot (KVM_MEM_READONLY) for R+X, no slot for no access | RWX, R-X, --- |
| native | per-plane KVM_SET_MEMORY_ATTRIBUTES on the plane fd, when the kernel reports read/write/execute attributes (bits 0-2 of KVM_CAP_MEMORY_ATTRIBUTES: the VSM RFC's layout [U]; mainline has only PRIVATE, bit 3) | RWX only until such a kernel exists |
| apic-groups | all planes share one VM and one memslot layout: per-plane views need the same per-plane memory attributes | RWX only |

Why multivm cannot do more: a memslot is readable and executable, read-only, or absent. So
execute-only (--X), no-execute data (RW-, R--) and write-only combinations cannot be
expressed; neither can a split of kernel and user execute (MBEC).

How multivm reports a violation: a write to a read-only slot and any data access to an
absent range exit with KVM_EXIT_MMIO; an instruction fetch from an absent range ends with
KVM_EXIT_INTERNAL_ERROR (emulation failure) with RIP in that page. Before returning the
MemoryFault the backend completes the pending MMIO (KVM_RUN with immediate_exit, as the KVM
API documents) with the write dropped and zeros read, then restores the registers from before
the instruction. Hosts differ on where RIP is at an MMIO write exit (mainline: on the
instruction; this PVM host: already past it, the instruction retired). Where it is past,
RIP is moved back by the instruction's length (decoded backwards, ``x86.insn``); the other
registers are then those after the instruction, which differs only for instructions that
change registers while writing memory (push, stos, movs, xchg): the bound of that host.
A layout change is delete-then-create of the affected slots; an access that falls into that
window is to a page the plane may use, and is completed from guest memory transparently.

Covers (``Plane.cover``): a plane may see another host page than guest RAM at a guest page (a
per-plane overlay, e.g. a Hyper-V overlay page of one VTL, vmm/vsm/overlay.py). On multivm it
is one more memslot in that plane's VM, still subject to the plane's view; backends whose
planes share one memslot layout refuse it (ProtectionUnsupported).
"""

from __future__ import annotations

import bisect
import enum
import errno

from ..kvm import KvmError

PAGE = 0x1000
KVM_MEM_READONLY = 1 << 1

# KVM_EXIT_MEMORY_FAULT flags for the access kind (the VSM RFC's proposal [U]; mainline
# defines only KVM_MEMORY_EXIT_FLAG_PRIVATE, bit 3).
MEMORY_FAULT_READ = 1 << 0
MEMORY_FAULT_WRITE = 1 << 1
MEMORY_FAULT_EXEC = 1 << 2


class Access(enum.IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    EXEC = 4
    ALL = 7

    def describe(self) -> str:
        return "".join(c if self & f else "-" for c, f in (("r", Access.READ), ("w", Access.WRITE),
                                                           ("x", Access.EXEC)))


FAULT_ACCESS = {MEMORY_FAULT_READ: Access.READ, MEMORY_FAULT_WRITE: Access.WRITE, MEMORY_FAULT_EXEC: Access.EXEC}


class ProtectionUnsupported(KvmError):
    """The backend cannot enforce this access combination (the message says why)."""


def refuse(backend: str, access: Access, why: str) -> ProtectionUnsupported:
    why = f"access {Access(access).describe()} cannot be enforced on {backend}: {why}"
    e = ProtectionUnsupported("protect", f"{backend} planes VM", errno.EOPNOTSUPP, why)
    e.why = why
    return e


def refuse_cover(backend: str) -> ProtectionUnsupported:
    why = (f"a per-plane overlay page cannot be made on {backend}: its planes share one memory layout "
           f"(multivm gives each plane its own memslots)")
    e = ProtectionUnsupported("cover", f"{backend} planes VM", errno.EOPNOTSUPP, why)
    e.why = why
    return e


def check_range(gpa: int, size: int) -> None:
    if gpa < 0 or size <= 0 or gpa % PAGE or size % PAGE:
        raise KvmError("protect", "memory view", errno.EINVAL,
                       f"range {gpa:#x}+{size:#x} is not a non-empty run of whole 4 KiB pages")


class MemoryView:
    """One plane's access to guest memory, page-granular. Pages not listed have Access.ALL.
    Kept as sorted, disjoint, non-adjacent-equal runs [start, end) -> access.
    ``covers``: guest pages where this plane sees another host page than guest RAM (a
    per-plane overlay: Plane.cover), page GPA -> host address."""

    def __init__(self):
        self._starts: list[int] = []
        self._runs: list[tuple[int, int, Access]] = []
        self.covers: dict[int, int] = {}

    @property
    def restricted(self) -> bool:
        return bool(self._runs)

    def access(self, gpa: int) -> Access:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            start, end, acc = self._runs[i]
            if gpa < end:
                return acc
        return Access.ALL

    def allows(self, gpa: int, size: int, need: Access) -> bool:
        page = gpa & ~(PAGE - 1)
        while page < gpa + max(size, 1):
            if need & ~self.access(page):
                return False
            page += PAGE
        return True

    def set(self, gpa: int, size: int, access: Access) -> None:
        check_range(gpa, size)
        end = gpa + size
        runs = []
        for s, e, a in self._runs:
            if e <= gpa or s >= end:
                runs.append((s, e, a))
                continue
            if s < gpa:
                runs.append((s, gpa, a))
            if e > end:
                runs.append((end, e, a))
        if access != Access.ALL:
            runs.append((gpa, end, Access(access)))
        runs.sort()
        merged: list[tuple[int, int, Access]] = []
        for s, e, a in runs:
            if merged and merged[-1][1] == s and merged[-1][2] == a:
                merged[-1] = (merged[-1][0], e, a)
            else:
                merged.append((s, e, a))
        self._runs = merged
        self._starts = [s for s, _, _ in merged]

    def runs(self, start: int, end: int):
        """(start, end, access) covering [start, end) exactly, in order."""
        pos = start
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while pos < end:
            if i < len(self._runs) and self._runs[i][1] <= pos:
                i += 1
                continue
            if i < len(self._runs) and self._runs[i][0] <= pos:
                s, e, a = self._runs[i]
                stop = min(e, end)
                yield pos, stop, a
                i += 1
            else:
                stop = min(self._runs[i][0], end) if i < len(self._runs) else end
                yield pos, stop, Access.ALL
            pos = stop

    def restricted_pages(self) -> int:
        return sum((e - s) // PAGE for s, e, _ in self._runs)


# ---- multivm: one memslot layout per plane VM ------------------------------------------------

MULTIVM_ENFORCEABLE = {Access.ALL, Access.READ | Access.EXEC, Access.NONE}
FIRST_SPLIT_SLOT = 0x1000   # slot ids for the pieces of a split region (user slots go to 32763)


def multivm_check(access: Access) -> None:
    if Access(access) in MULTIVM_ENFORCEABLE:
        return
    if access & Access.EXEC and not access & Access.READ:
        why = "a memslot cannot be executable without being readable (execute-only)"
    elif access & Access.WRITE and not access & Access.READ:
        why = "a memslot cannot be writable without being readable"
    else:
        why = "a memslot cannot forbid execution while allowing reads (no-execute data)"
    raise refuse("multivm", access, why + "; multivm enforces rwx, r-x and ---")


class SlotLayout:
    """The memslots of one plane VM: the machine's regions, split where the plane's view
    restricts them. ``apply(view, start, end)`` re-lays [start, end) (plus the neighbouring
    pieces, so equal pieces merge) with as few KVM_SET_USER_MEMORY_REGION calls as it can."""

    def __init__(self, vm):
        self.vm = vm
        self.base: list[tuple] = []          # (slot, gpa, size, hva, flags) as the machine set them
        self.slots: dict[int, tuple] = {}    # installed: slot -> (gpa, size, hva, flags)
        self._free = FIRST_SPLIT_SLOT
        self._covers: dict[int, int] = {}    # the view's covers as last applied
        self.ioctls = 0

    def add_region(self, slot, gpa, size, hva, flags, view: MemoryView | None) -> None:
        self.base.append((slot, gpa, size, hva, flags))
        if view is None or not (view.restricted or view.covers):
            self._install(slot, gpa, size, hva, flags)
        else:
            self.apply(view, gpa, gpa + size)

    def region_of(self, gpa: int):
        for r in self.base:
            if r[1] <= gpa < r[1] + r[2]:
                return r
        return None

    def mapped(self, gpa: int) -> bool:
        return any(g <= gpa < g + s for g, s, _, _ in self.slots.values())

    def hva_of(self, gpa: int) -> int | None:
        cover = self._covers.get(gpa & ~(PAGE - 1))
        if cover is not None:
            return cover + (gpa & (PAGE - 1))
        r = self.region_of(gpa)
        return None if r is None else r[3] + gpa - r[1]

    def _install(self, slot, gpa, size, hva, flags) -> None:
        self.vm.set_user_memory_region(slot, gpa, size, hva, flags)
        self.slots[slot] = (gpa, size, hva, flags)
        self.ioctls += 1

    def _remove(self, slot) -> None:
        gpa, _, hva, flags = self.slots.pop(slot)
        self.vm.set_user_memory_region(slot, gpa, 0, hva, flags)
        self.ioctls += 1

    def _new_slot(self, reuse: list[int]) -> int:
        if reuse:
            return reuse.pop()
        self._free += 1
        return self._free - 1

    def apply(self, view: MemoryView, start: int, end: int) -> None:
        self._covers = dict(view.covers)
        for slot0, rgpa, rsize, rhva, rflags in self.base:
            lo, hi = max(start, rgpa), min(end, rgpa + rsize)
            if lo >= hi:
                continue
            # Widen to the installed pieces touching [lo, hi), so neighbours can merge.
            old = [s for s, (g, sz, _, _) in self.slots.items()
                   if rgpa <= g < rgpa + rsize and g <= hi and g + sz >= lo]
            for s in old:
                g, sz, _, _ = self.slots[s]
                lo, hi = min(lo, g), max(hi, g + sz)
            # Absent gaps next to [lo, hi) are covered by the view's runs below.
            pieces = []                      # (start, end, flags, hva)
            for s, e, acc in view.runs(lo, hi):
                if acc == Access.NONE:
                    continue
                flags = rflags | (0 if acc & Access.WRITE else KVM_MEM_READONLY)
                for a, b, hva in self._split_at_covers(s, e, rhva + s - rgpa):
                    if pieces and pieces[-1][1] == a and pieces[-1][2] == flags \
                            and pieces[-1][3] + (a - pieces[-1][0]) == hva:
                        pieces[-1] = (pieces[-1][0], b, flags, pieces[-1][3])
                    else:
                        pieces.append((a, b, flags, hva))
            wanted = set(pieces)
            reuse = []
            for s in old:
                g, sz, h, fl = self.slots[s]
                if (g, g + sz, fl, h) in wanted:
                    wanted.discard((g, g + sz, fl, h))
                else:
                    self._remove(s)
                    reuse.append(s)
            for a, b, f, h in pieces:
                if (a, b, f, h) in wanted:
                    self._install(self._new_slot(reuse), a, b - a, h, f)

    def _split_at_covers(self, start: int, end: int, hva: int):
        """[start, end) with RAM at ``hva`` -> (start, end, hva) pieces, covered pages apart."""
        covers = self._covers
        pos = start
        if covers:
            for page in sorted(p for p in covers if start <= p < end):
                if pos < page:
                    yield pos, page, hva + pos - start
                yield page, page + PAGE, covers[page]
                pos = page + PAGE
        if pos < end:
            yield pos, end, hva + pos - start
