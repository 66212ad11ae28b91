"""TLFS "Virtual Secure Mode" > "VTL Memory Protections": what each higher VTL lets each lower
VTL do to each guest page, and HvCallModifyVtlProtectionMask.

A higher VTL q sets, per page, a mask of HV_MAP_GPA_* bits (Read 0, Write 1, KernelExecute 2,
UserExecute 3) for a lower VTL p (q never restricts itself or a higher VTL). A page a VTL has
not named has that VTL's default mask (VsmPartitionConfig.DefaultVtlProtectionMask; all
access until VSM protections are configured). What VTL p may do is the intersection of the
masks of every VTL above it, and that is handed to the planes API as plane p's memory view
(``Plane.protect``): the backend enforces it or refuses (planes/memview.py). Without MBEC
(pykvmm offers none) KernelExecute governs all execution and UserExecute is ignored, as the
TLFS says.

HvCallModifyVtlProtectionMask (0x000C, rep): PartitionId u64 @0 (HV_PARTITION_ID_SELF or the
partition's id), MapFlags u32 @8, TargetVtl HV_INPUT_VTL @12, 3 reserved bytes; each rep
element is a GPA page number (u64). Answers: INVALID_PARTITION_ID for another partition;
INVALID_PARAMETER for reserved MapFlags bits, write without read, reserved HV_INPUT_VTL bits,
a page outside guest RAM, or a mask the backend cannot enforce (pykvmm warns once, naming
the backend's limit); ACCESS_DENIED for a target VTL not below the caller. The reps completed
before an error stay done (the TLFS rep rule).
"""

from __future__ import annotations

from ...planes.memview import PAGE, Access, ProtectionUnsupported
from ..hyperv.hypercall import HvError as VsmError, target_vtl
from ..hyperv.vp import PARTITION_ID
from . import hvdef as H


def access_of_mask(mask: int) -> Access:
    """HV_MAP_GPA_* -> planes Access (no MBEC: KernelExecute governs all execution)."""
    acc = Access.NONE
    if mask & H.MAP_GPA_READABLE:
        acc |= Access.READ
    if mask & H.MAP_GPA_WRITABLE:
        acc |= Access.WRITE
    if mask & H.MAP_GPA_KERNEL_EXECUTABLE:
        acc |= Access.EXEC
    return acc


def check_mask(mask: int) -> None:
    if mask & ~H.MAP_GPA_MASK:
        raise VsmError(H.INVALID_PARAMETER, f"MapFlags {mask:#x} has bits other than Read/Write/KX/UX")
    if mask & H.MAP_GPA_WRITABLE and not mask & H.MAP_GPA_READABLE:
        raise VsmError(H.INVALID_PARAMETER, f"MapFlags {mask:#x} allows writes but not reads")


class VtlProtections:
    """Per (setting VTL, target VTL): page -> HV_MAP_GPA mask, and the plane views they make."""

    def __init__(self, machine):
        self.machine = machine
        self.pvm = machine.pvm
        self.ram = machine.memory.size
        self.plane_count = machine.plane_count
        self._masks: dict[tuple[int, int], dict[int, int]] = {}
        self.default_mask: dict[int, int | None] = {}   # VTL -> its default mask once configured
        self.changes = 0
        self.refused = 0

    # -- what applies ---------------------------------------------------------------------
    def mask(self, setter: int, target: int, page: int) -> int:
        m = self._masks.get((setter, target), {}).get(page)
        if m is None:
            d = self.default_mask.get(setter)
            return H.MAP_GPA_MASK if d is None else d
        return m

    def effective(self, target: int, page: int) -> Access:
        acc = Access.ALL
        for q in range(target + 1, self.plane_count):
            acc &= access_of_mask(self.mask(q, target, page))
        return acc

    def denier(self, target: int, gpa: int, need: Access) -> int | None:
        """The highest VTL whose protection denies ``need`` to ``target`` at ``gpa``."""
        page = gpa // PAGE
        for q in range(self.plane_count - 1, target, -1):
            if need & ~access_of_mask(self.mask(q, target, page)):
                return q
        return None

    # -- changing them -----------------------------------------------------------------------
    def set_masks(self, setter: int, target: int, pages: list[int], mask: int) -> None:
        """Apply ``mask`` to ``pages`` of ``target`` as set by ``setter`` (already checked),
        one planes-API call per run of contiguous pages with the same effect."""
        table = self._masks.setdefault((setter, target), {})
        plane = self.pvm.planes[target]
        old = {p: table.get(p) for p in pages}
        for p in pages:
            table[p] = mask
        try:
            for start, count, acc in _runs(sorted(set(pages)), lambda p: self.effective(target, p)):
                plane.protect(start * PAGE, count * PAGE, acc)
        except ProtectionUnsupported as e:
            for p, m in old.items():
                if m is None:
                    table.pop(p, None)
                else:
                    table[p] = m
            self.refused += 1
            self.machine.warn(f"HvCallModifyVtlProtectionMask {mask:#x} refused: {e.why}",
                              kind="vsm-mask-refused")
            raise VsmError(H.INVALID_PARAMETER, str(e)) from None
        self.changes += len(pages)

    def set_default(self, setter: int, mask: int) -> None:
        """VsmPartitionConfig of ``setter`` enabled protections with this default mask: it now
        applies to every page of every lower VTL that ``setter`` has not named."""
        self.default_mask[setter] = mask
        for target in range(setter):
            named = self._masks.get((setter, target), {})
            pages = [p for p in range(self.ram // PAGE) if p not in named]
            for start, count, acc in _runs(pages, lambda p: self.effective(target, p)):
                self.pvm.planes[target].protect(start * PAGE, count * PAGE, acc)

    # -- the call ------------------------------------------------------------------------------
    def modify_element(self, caller: int, header: bytes, element: bytes) -> None:
        """One rep of HvCallModifyVtlProtectionMask (the header as the guest passed it)."""
        target = self.check_header(caller, header)
        mask = int.from_bytes(header[8:12], "little")
        page = int.from_bytes(element, "little")
        if page >= self.ram // PAGE:
            raise VsmError(H.INVALID_PARAMETER, f"GPA page {page:#x} is not guest RAM")
        self.set_masks(caller, target, [page], mask)

    def check_header(self, caller: int, header: bytes) -> int:
        check_partition(header)
        check_mask(int.from_bytes(header[8:12], "little"))
        target = target_vtl(header[12], caller, self.plane_count)
        if target >= caller:
            raise VsmError(H.ACCESS_DENIED, f"VTL{caller} cannot set protections of VTL{target} "
                                            f"(only of lower VTLs)")
        return target

    def summary(self) -> dict:
        return {"pages_changed": self.changes, "masks_refused": self.refused}


def check_partition(header: bytes) -> None:
    pid = int.from_bytes(header[0:8], "little")
    if pid not in (H.HV_PARTITION_ID_SELF, PARTITION_ID):
        raise VsmError(H.INVALID_PARTITION_ID, f"partition id {pid:#x} is not this partition")


def _runs(pages: list[int], key):
    """(first page, count, key) for runs of consecutive pages with the same key."""
    start = prev = None
    cur = None
    for p in pages:
        k = key(p)
        if start is not None and p == prev + 1 and k == cur:
            prev = p
            continue
        if start is not None:
            yield start, prev - start + 1, cur
        start = prev = p
        cur = k
    if start is not None:
        yield start, prev - start + 1, cur
