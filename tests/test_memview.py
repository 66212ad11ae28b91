"""Per-plane memory views (planes/memview.py): the view's logic, and on every backend this host
has, a long-mode guest whose protected accesses come back as MemoryFault exits, not performed,
with the registers from before the instruction."""

from __future__ import annotations

import mmap

import pytest

from pykvmm import exits as K
from pykvmm.kvm import KvmError
from pykvmm.planes import open_planes_vm
from pykvmm.planes.memview import (KVM_MEM_READONLY, MEMORY_FAULT_EXEC, MEMORY_FAULT_READ, MEMORY_FAULT_WRITE,
                                   Access, MemoryView, ProtectionUnsupported, SlotLayout)
from pykvmm.uapi import ffi
from pykvmm.x86 import longmode

MEM = 4 << 20
CODE = 0x100000
PROT = 0x200000       # protected page (data)
PROT_CODE = 0x201000  # protected page (code)
GDT, TSS, PT = 0x1000, 0x2000, 0x10000
MAGIC = 0x1122334455667788


def test_view_runs_merge_and_split():
    v = MemoryView()
    v.set(0x3000, 0x3000, Access.READ | Access.EXEC)
    v.set(0x4000, 0x1000, Access.NONE)
    assert [(s, e, a) for s, e, a in v.runs(0x2000, 0x7000)] == [
        (0x2000, 0x3000, Access.ALL), (0x3000, 0x4000, Access.READ | Access.EXEC),
        (0x4000, 0x5000, Access.NONE), (0x5000, 0x6000, Access.READ | Access.EXEC), (0x6000, 0x7000, Access.ALL)]
    assert not v.allows(0x3ff8, 16, Access.WRITE) and v.allows(0x3000, 8, Access.READ)
    v.set(0x4000, 0x1000, Access.READ | Access.EXEC)
    assert list(v.runs(0x3000, 0x6000)) == [(0x3000, 0x6000, Access.READ | Access.EXEC)]
    v.set(0x0, 0x10000, Access.ALL)
    assert not v.restricted and v.access(0x4000) == Access.ALL


def test_view_rejects_partial_pages(kvm):
    with open_planes_vm(kvm, "multivm") as vm:
        with pytest.raises(KvmError, match="whole 4 KiB pages"):
            vm.planes[0].protect(0x1800, 0x1000, Access.NONE)


@pytest.mark.parametrize("access", [Access.READ, Access.READ | Access.WRITE, Access.EXEC, Access.WRITE,
                                    Access.WRITE | Access.EXEC])
def test_multivm_refuses_what_memslots_cannot_express(kvm, access):
    with open_planes_vm(kvm, "multivm") as vm:
        with pytest.raises(ProtectionUnsupported, match="cannot be enforced") as e:
            vm.planes[0].protect(0x1000, 0x1000, access)
        assert "rwx, r-x and ---" in str(e.value)
        assert not vm.planes[0].view.restricted


def test_slot_layout_splits_and_merges(kvm):
    mem = mmap.mmap(-1, 1 << 20)
    buf = ffi.from_buffer(mem)
    hva = int(ffi.cast("uintptr_t", buf))
    vm = kvm.create_vm()
    try:
        layout, view = SlotLayout(vm), MemoryView()
        layout.add_region(0, 0, 1 << 20, hva, 0, view)
        view.set(0x10000, 0x2000, Access.READ | Access.EXEC)
        layout.apply(view, 0x10000, 0x12000)
        view.set(0x11000, 0x1000, Access.NONE)
        layout.apply(view, 0x11000, 0x12000)
        pieces = sorted((g, s, f) for g, s, _, f in layout.slots.values())
        assert pieces == [(0, 0x10000, 0), (0x10000, 0x1000, KVM_MEM_READONLY), (0x12000, 0xEE000, 0)]
        assert not layout.mapped(0x11000) and layout.mapped(0x10000)
        view.set(0x10000, 0x2000, Access.ALL)
        layout.apply(view, 0x10000, 0x12000)
        assert [(g, s, f) for g, s, _, f in layout.slots.values()] == [(0, 1 << 20, 0)]
    finally:
        vm.close()
        del buf


# Hand-encoded long-mode guest at CODE: each step ends in `out 0xE9, al` so the test sees it.
GUEST = bytes.fromhex(
    "48b8" + MAGIC.to_bytes(8, "little").hex() +     # mov rax, MAGIC
    "48a3" + PROT.to_bytes(8, "little").hex() +      # mov [PROT], rax         (write: faults)
    "e6e9"                                            # out 0xe9, al            (after the skip)
    "48bb" + (PROT + 8).to_bytes(8, "little").hex() +  # mov rbx, PROT + 8
    "488b0b"                                          # mov rcx, [rbx]          (read: faults if ---)
    "e6e9"                                            # out 0xe9, al
    "48b8" + PROT_CODE.to_bytes(8, "little").hex() +  # mov rax, PROT_CODE
    "ffd0"                                            # call rax                (fetch: faults if ---)
    "e6e9"                                            # out 0xe9, al
    "f4")
PROT_CODE_BYTES = bytes.fromhex("b0 5a e6 e9 c3")     # mov al, 0x5a; out 0xe9, al; ret


class LongModeRig:
    def __init__(self, kvm, backend):
        self.vm = open_planes_vm(kvm, backend)
        self.mem = mmap.mmap(-1, MEM)
        self._buf = ffi.from_buffer(self.mem)
        self.vm.set_user_memory_region(0, 0, MEM, int(ffi.cast("uintptr_t", self._buf)))
        gdt = longmode.gdt_bytes(TSS)
        self.mem[GDT:GDT + len(gdt)] = gdt
        pt = longmode.identity_page_tables(PT, MEM)
        self.mem[PT:PT + len(pt)] = pt
        self.mem[CODE:CODE + len(GUEST)] = GUEST
        self.mem[PROT:PROT + 16] = bytes(range(16))
        self.mem[PROT_CODE:PROT_CODE + len(PROT_CODE_BYTES)] = PROT_CODE_BYTES
        self.cpu = self.vm.create_vcpu(0)
        self.cpu.set_cpuid2(kvm.supported_cpuid())
        v = self.v = self.cpu.plane_vcpu(0)
        s = v.get_sregs()
        longmode.setup_sregs(s, gdt_addr=GDT, tss_addr=TSS, cr3=PT, sel_code=8, sel_data=0x10, sel_tss=0x18,
                             osxsave=False)
        v.set_sregs(s)
        r = v.get_regs()
        r.rip, r.rsp, r.rflags = CODE, 0x80000, 2
        v.set_regs(r)

    def run(self):
        while True:
            ex = self.cpu.run(plane=0)
            if type(ex) is not K.Interrupted:
                return ex

    def skip(self, length):
        r = self.v.get_regs()
        r.rip += length
        self.v.set_regs(r)

    def close(self):
        self.vm.close()
        self._buf = None


@pytest.fixture
def lm_rig(kvm, backend):
    r = LongModeRig(kvm, backend)
    yield r
    r.close()


def test_protected_accesses_fault_and_are_not_performed(lm_rig, backend):
    rig = lm_rig
    plane = rig.vm.planes[0]
    try:
        plane.protect(PROT, 0x1000, Access.READ | Access.EXEC)
    except ProtectionUnsupported as e:
        pytest.skip(f"{backend} cannot enforce r-x: {e}")
    write_at = CODE + 10
    # 1. the write to a read-only page: MemoryFault(write), memory unchanged, RIP on the store
    ex = rig.run()
    assert type(ex) is K.MemoryFault and ex.flags == MEMORY_FAULT_WRITE and ex.gpa == PROT, ex
    r = rig.v.get_regs()
    assert r.rip == write_at and r.rax == MAGIC
    assert rig.mem[PROT:PROT + 8] == bytes(range(8))
    # the fault repeats while the page stays read-only (the instruction was not performed)
    ex = rig.run()
    assert type(ex) is K.MemoryFault and rig.v.get_regs().rip == write_at
    rig.skip(10)
    assert type(rig.run()) is K.IoOut
    # 2. reads of an r-x page are allowed
    ex = rig.run()
    assert type(ex) is K.IoOut and rig.v.get_regs().rcx == int.from_bytes(bytes(range(8, 16)), "little")
    # 3. executing an r-x page is allowed
    ex = rig.run()
    assert type(ex) is K.IoOut and ex.data == b"\x5a"


def test_no_access_page_faults_reads_and_fetches(lm_rig, backend):
    rig = lm_rig
    plane = rig.vm.planes[0]
    try:
        plane.protect(PROT, 0x2000, Access.NONE)
    except ProtectionUnsupported as e:
        pytest.skip(f"{backend} cannot enforce ---: {e}")
    ex = rig.run()
    assert type(ex) is K.MemoryFault and ex.flags == MEMORY_FAULT_WRITE
    rig.skip(10)
    assert type(rig.run()) is K.IoOut
    rig.v.complete_pending_io()     # RIP past the `out` on every KVM (mainline leaves it on it)
    read_at = rig.v.get_regs().rip + 10
    r = rig.v.get_regs()
    r.rcx = 0x77
    rig.v.set_regs(r)
    ex = rig.run()
    assert type(ex) is K.MemoryFault and ex.flags == MEMORY_FAULT_READ and ex.gpa == PROT + 8, ex
    r = rig.v.get_regs()
    assert r.rip == read_at and r.rcx == 0x77          # the plane never saw the data
    # lift the protection: the same instruction now reads the page
    plane.protect(PROT, 0x2000, Access.ALL)
    assert type(rig.run()) is K.IoOut and rig.v.get_regs().rcx == int.from_bytes(bytes(range(8, 16)), "little")
    plane.protect(PROT_CODE, 0x1000, Access.NONE)
    ex = rig.run()
    assert type(ex) is K.MemoryFault and ex.flags == MEMORY_FAULT_EXEC and ex.gpa == PROT_CODE, ex
    assert rig.v.get_regs().rip == PROT_CODE
