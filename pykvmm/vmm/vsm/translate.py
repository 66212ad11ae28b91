"""TLFS "Virtual MMU" > HvCallTranslateVirtualAddress (0x0052): a higher VTL walks a VTL's page
tables (its own or a lower one's) as that VTL's MMU would.

Input (32 bytes): PartitionId u64 @0, VpIndex u32 @8, reserved u32 @12, ControlFlags u64 @16
(ValidateRead 0, ValidateWrite 1, ValidateExecute 2, PrivilegeExempt 3, SetPageTableBits 4,
TlbFlushInhibit 5; bits 55:6 reserved; InputVtl = HV_INPUT_VTL in bits 63:56), GvaPage u64 @24.
Output (16 bytes): TranslationResult (ResultCode u32, CacheType u8 at bit 32), GpaPage u64.

Result codes: Success 0, PageNotPresent 1, PrivilegeViolation 2 (a user-mode VTL state without
the U bit on every level, unless PrivilegeExempt; a write to a read-only page from user mode or
with CR0.WP; an execute of an NX page with EFER.NXE), InvalidPageTableFlags 3 (reserved
address bits set), GpaUnmapped 4 (the GPA is not guest RAM), GpaNoReadAccess 5 and
GpaNoWriteAccess 6 (a higher VTL's protection forbids the validated access to that VTL),
Intercept 8 (pykvmm's answer for a validated execute that a higher VTL's protection forbids [U]).
SetPageTableBits sets Accessed on every level walked, and Dirty on the leaf for a validated write,
after a successful translation. TlbFlushInhibit is accepted (pykvmm keeps no TLB of its own).
Statuses: INVALID_PARTITION_ID, INVALID_VP_INDEX, INVALID_VP_STATE (another VP that runs the
VTL asked for: remote.py), INVALID_PARAMETER (reserved control bits or HV_INPUT_VTL bits),
ACCESS_DENIED (a higher VTL), INVALID_VTL_STATE (a VTL not enabled on that VP).
"""

from __future__ import annotations

import struct

from ...planes.memview import Access
from ...x86 import arch, paging
from ..hyperv.hypercall import CallSpec, HvError, target_vtl
from ..hyperv.tlfs import (CACHE_TYPE_WRITE_BACK as CACHE_WRITE_BACK,  # the TLFS numbers, named for this module
                           TRANSLATE_CONTROL_MASK as CONTROL_MASK, TRANSLATE_INPUT_VTL_SHIFT as INPUT_VTL_SHIFT,
                           TRANSLATE_PRIVILEGE_EXEMPT as PRIVILEGE_EXEMPT,
                           TRANSLATE_RESULT_BAD_FLAGS as RESULT_BAD_FLAGS,
                           TRANSLATE_RESULT_GPA_UNMAPPED as RESULT_GPA_UNMAPPED,
                           TRANSLATE_RESULT_INTERCEPT as RESULT_INTERCEPT, TRANSLATE_RESULT_NO_READ as RESULT_NO_READ,
                           TRANSLATE_RESULT_NO_WRITE as RESULT_NO_WRITE,
                           TRANSLATE_RESULT_NOT_PRESENT as RESULT_NOT_PRESENT,
                           TRANSLATE_RESULT_PRIVILEGE as RESULT_PRIVILEGE, TRANSLATE_RESULT_SUCCESS as RESULT_SUCCESS,
                           TRANSLATE_SET_PAGE_TABLE_BITS as SET_PAGE_TABLE_BITS,
                           TRANSLATE_TLB_FLUSH_INHIBIT as TLB_FLUSH_INHIBIT, TRANSLATE_VALIDATE_EXECUTE as VALIDATE_EXECUTE,
                           TRANSLATE_VALIDATE_READ as VALIDATE_READ, TRANSLATE_VALIDATE_WRITE as VALIDATE_WRITE)
from ..memory import GuestMemoryError
from . import hvdef as H
from .protections import check_partition
from .remote import check_idle, vp_thread



def install(vsm, table) -> None:
    def translate(call, header):
        return translate_gva(vsm, call.thread, call.plane, header)
    table.add(CallSpec(H.HVCALL_TRANSLATE_VIRTUAL_ADDRESS, "HvCallTranslateVirtualAddress", "vsm", translate,
                       header_size=32, out_size=16))


def translate_gva(vsm, caller_cpu, caller: int, header: bytes) -> bytes:
    check_partition(header)
    cpu = vp_thread(vsm, caller_cpu, int.from_bytes(header[8:12], "little"))
    flags, gva_page = struct.unpack_from("<QQ", header, 16)
    if flags & ~CONTROL_MASK & ((1 << INPUT_VTL_SHIFT) - 1):
        raise HvError(H.INVALID_PARAMETER, f"TranslateVirtualAddress control flags {flags:#x} have reserved bits")
    target = target_vtl(flags >> INPUT_VTL_SHIFT, caller, vsm.machine.plane_count)
    if target > caller:
        raise HvError(H.ACCESS_DENIED, f"VTL{caller} cannot translate for the higher VTL{target}")
    vsm.check_vtl_enabled(cpu, target)

    def walk(thread):
        if thread is not caller_cpu:
            check_idle(thread, target, False, "translating with")
        return _translate(vsm, thread.plane_vcpu(target), target, flags, gva_page << 12)
    code, gpa = vsm.remote.run(caller_cpu, cpu, walk)
    result = code | (CACHE_WRITE_BACK << 32 if code == RESULT_SUCCESS else 0)
    return struct.pack("<QQ", result, gpa >> 12 if gpa is not None else 0)


def _translate(vsm, v, vtl: int, flags: int, gva: int):
    mem = vsm.machine.memory.seen_by(vtl)      # the walk reads and sets bits in vtl's view
    s = v.sregs

    def read_u64(gpa):
        try:
            return mem.u64(gpa)
        except GuestMemoryError:
            return None
    w = paging.walk(read_u64, s.cr3, gva)
    if w.bad_entry:
        return RESULT_BAD_FLAGS, None
    if w.gpa is None:
        return RESULT_NOT_PRESENT, None
    user_mode = s.cs.dpl == 3
    if user_mode and not flags & PRIVILEGE_EXEMPT and not w.user:
        return RESULT_PRIVILEGE, None
    if flags & VALIDATE_WRITE and not w.writable and (user_mode or s.cr0 & arch.CR0_WP):
        return RESULT_PRIVILEGE, None
    if flags & VALIDATE_EXECUTE and w.nx and s.efer & arch.EFER_NXE:
        return RESULT_PRIVILEGE, None
    if w.gpa >= mem.size:
        return RESULT_GPA_UNMAPPED, None
    view = vsm.machine.pvm.planes[vtl].view
    if flags & VALIDATE_READ and not view.allows(w.gpa, 1, Access.READ):
        return RESULT_NO_READ, None
    if flags & VALIDATE_WRITE and not view.allows(w.gpa, 1, Access.WRITE):
        return RESULT_NO_WRITE, None
    if flags & VALIDATE_EXECUTE and not view.allows(w.gpa, 1, Access.EXEC):
        return RESULT_INTERCEPT, None
    if flags & SET_PAGE_TABLE_BITS:
        for i, at in enumerate(w.entries):
            bits = paging.A | (paging.D if flags & VALIDATE_WRITE and i == len(w.entries) - 1 else 0)
            mem.write_u64(at, mem.u64(at) | bits)
    return RESULT_SUCCESS, w.gpa
