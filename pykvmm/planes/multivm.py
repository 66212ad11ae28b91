"""The multivm backend: one KVM VM per plane over the same host memory. Runs on any KVM.

Each plane VM's in-kernel LAPICs are that plane's APIC namespace, so IPIs stay inside a
plane as with KVM planes. KVM knows nothing of planes here, so pykvmm produces the plane
events itself (softswitch.py says when, the bound, and every pending bit it keeps):

* at once for interrupts pykvmm delivers (``Plane.signal_msi``): the target vCPU is told
  (``note_pending``) and its thread kicked if its run requested that plane;
* for in-kernel IPIs between vCPUs of a plane that is not running, by reading that plane's
  LAPIC (KVM_GET_LAPIC) on entry to run(), after exits of the running plane and on every
  kick; the VM's ticker kicks every vCPU whose run has requested planes (halted or not)
  every ``kick_interval``. The worst-case delay is one kick interval plus one scan
  (scripts/bench: "in-kernel IPI to an inactive plane" and the halted wake-up rows).
"""

from __future__ import annotations

import errno
import threading
import time

from .. import exits as X
from ..kvm import KvmError, Vcpu, Vm
from ..uapi import ffi
from ..x86 import apic, arch, insn
from ..x86.xsave import pkru_xsave_offset
from .api import MAX_PLANES, Plane, PlanesVm
from .memview import (MEMORY_FAULT_EXEC, MEMORY_FAULT_READ, MEMORY_FAULT_WRITE, Access,
                      SlotLayout, multivm_check)
from .softswitch import SoftSwitchVcpu, SoftSwitchVm

KVM_INTERNAL_ERROR_EMULATION = 1


class MultiVmPlane(Plane):
    def __init__(self, vm: "MultiVmPlanesVm", plane_id: int, kvm_vm: Vm):
        super().__init__(vm, plane_id)
        self.kvm_vm = kvm_vm
        self.layout = SlotLayout(kvm_vm)    # this plane's memslots (memview.py)

    def create_vcpu_plane(self, vcpu: "SoftSwitchVcpu") -> Vcpu:
        self._check_new_vcpu(vcpu)
        v = self.kvm_vm.create_vcpu(vcpu.id)
        v.label = f"vcpu{vcpu.id}/plane{self.id}"
        if vcpu.cpuid is not None:
            v.set_cpuid2(vcpu.cpuid)  # the RFC copies plane 0's CPUID into plane-N vCPUs
        # One vCPU has one TSC: each KVM VM starts its own, so rdtsc would jump at every
        # switch. Plane 0's offset from the host TSC makes them equal; where KVM has no such
        # attribute, plane 0's value written here agrees to within the time between the two
        # ioctls (about 1 us here, hundreds nested under emulation, where rdtsc went back
        # across a VtlCall); the reference clock measures what remains (hyperv/timers.py).
        offset = vcpu.plane0.get_tsc_offset()
        if offset is not None:
            v.set_tsc_offset(offset)
        else:
            tsc = vcpu.plane0.get_msrs([arch.MSR_IA32_TSC])[arch.MSR_IA32_TSC]
            v.set_msrs({arch.MSR_IA32_TSC: tsc})
        self.vcpus[vcpu.id] = v
        vcpu.add_plane_vcpu(self.id, v)
        return v

    def signal_msi(self, address: int, data: int) -> int:
        ret = self.kvm_vm.signal_msi(address, data)
        dest = apic.msi_destination(address)
        if dest in apic.MSI_BROADCAST:
            for pv in self.vm.vcpus.values():
                pv.note_pending(self.id)
        elif dest in self.vm.vcpus:
            self.vm.vcpus[dest].note_pending(self.id)
        return ret


class MultiVmVcpu(SoftSwitchVcpu):
    """A soft-switched vCPU whose planes have their own memslot layouts: exits caused by a
    plane's memory view become MemoryFault (memview.py says how)."""

    protection_faults = 0
    checked_exits = frozenset((X.Mmio, X.InternalError))

    def wait_out_of(self, plane_id: int) -> None:
        """Return once this vCPU is not in KVM_RUN of ``plane_id`` (kicking it out)."""
        v = self._vcpu_of.get(plane_id)
        # (``_in_run`` may be a fastexit.FastSwitch, in KVM_RUN of any of its planes)
        while v is not None and (self._in_run is v or v in getattr(self._in_run, "vcpus", {}).values()):
            self.kick()
            time.sleep(20e-6)

    def check_exit(self, v: Vcpu, ex):
        """An MMIO exit or emulation failure may be the running plane's memory view at work."""
        if type(ex) is X.Mmio:
            return self._on_mmio(v, ex)
        if ex.suberror == KVM_INTERNAL_ERROR_EMULATION:
            return self._on_fetch_failure(v, ex)
        return ex

    def _on_mmio(self, v: Vcpu, ex):
        plane = self.vm.planes[self.last_plane]
        layout = plane.layout
        gpa = ex.phys_addr
        if layout.region_of(gpa) is None:
            return ex                          # real MMIO, not guest RAM
        with self.vm.layout_lock:
            need = Access.WRITE if ex.is_write else Access.READ
            if plane.view.allows(gpa, ex.length, need):
                # The layout was being changed around this page: do the access from guest memory.
                hva = ffi.cast("char *", layout.hva_of(gpa))
                if ex.is_write:
                    ffi.memmove(hva, ex.data, ex.length)
                else:
                    ffi.memmove(v.run_struct.mmio.data, hva, ex.length)
                return X.Interrupted()
        flag = MEMORY_FAULT_WRITE if ex.is_write else MEMORY_FAULT_READ
        if not ex.is_write:
            ffi.memmove(v.run_struct.mmio.data, bytes(8), 8)   # the plane never sees the data
        self._undo_instruction(v, plane, gpa)
        self.protection_faults += 1
        return X.MemoryFault(flag, gpa, ex.length)

    def _on_fetch_failure(self, v: Vcpu, ex):
        plane = self.vm.planes[self.last_plane]
        rip = v.get_regs().rip
        try:
            gpa = v.translate(rip)
        except KvmError:
            return ex
        layout = plane.layout
        if gpa is None or layout.region_of(gpa) is None:
            return ex
        with self.vm.layout_lock:
            if not plane.view.allows(gpa, 1, Access.EXEC):
                self.protection_faults += 1
                return X.MemoryFault(MEMORY_FAULT_EXEC, gpa, 1)
            if not layout.mapped(gpa):
                return X.Interrupted()         # fetched while the layout was being changed
        return ex

    def _undo_instruction(self, v: Vcpu, plane, gpa: int) -> None:
        """Complete the pending MMIO (dropped write, zeros read) and put the registers back to
        before the instruction (see memview.py for hosts that retire it before the exit)."""
        before = ffi.new("struct kvm_regs *")
        ffi.memmove(before, ffi.addressof(v.regs), ffi.sizeof("struct kvm_regs"))
        v.request_immediate_exit(True)
        try:
            v.raw_run()                        # -EINTR once the MMIO is complete
        finally:
            v.request_immediate_exit(False)
        after = v.get_regs()
        if after.rip != before.rip:
            v.set_regs(before)
            return
        window = after.rip - insn.MAX_INSN
        code = self._fetch(v, plane, window, insn.MAX_INSN) or b""   # one translation, not 15
        start = insn.start_before(lambda a, n: code[a - window:a - window + n] if code else None, after.rip,
                                  lambda i: self._writes_page(v, i, after, gpa))
        if start is not None:
            after.rip = start
            v.set_regs(after)

    @staticmethod
    def _fetch(v: Vcpu, plane, gva: int, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            addr = gva + len(out)
            gpa = v.translate(addr)
            hva = None if gpa is None else plane.layout.hva_of(gpa)
            if hva is None:
                return None
            take = min(n - len(out), 0x1000 - (addr & 0xFFF))
            out += bytes(ffi.buffer(ffi.cast("char *", hva), take))
        return out

    @staticmethod
    def _writes_page(v: Vcpu, i, regs, gpa: int) -> bool:
        for op in insn.memory_write_operands(i):
            ea = insn.effective_address(i, op, lambda name: getattr(regs, name, None))
            if ea is not None:
                try:
                    target = v.translate(ea)
                except KvmError:
                    continue
                if target is not None and target >> 12 == gpa >> 12:
                    return True
        return False


class MultiVmPlanesVm(SoftSwitchVm, PlanesVm):
    backend = "multivm"

    def __init__(self, kvm, max_planes: int = MAX_PLANES):
        super().__init__(kvm, max_planes)
        self._regions: list[tuple] = []
        self._vm_setup = []         # callables applied to every plane VM (MSR filter, caps)
        self.layout_lock = threading.Lock()   # memory views and slot layouts
        self.pkru_offset = pkru_xsave_offset(kvm.supported_cpuid())
        self.planes[0] = MultiVmPlane(self, 0, kvm.create_vm())

    def _new_kvm_vm(self, plane_id: int) -> Vm:
        vm = self.kvm.create_vm()
        vm.label = f"vm(plane{plane_id})"
        if self.irqchip:
            vm.create_irqchip()
        for fn in self._vm_setup:
            fn(vm)
        return vm

    def _create_plane(self, plane_id: int) -> None:
        plane = self.planes[plane_id] = MultiVmPlane(self, plane_id, self._new_kvm_vm(plane_id))
        for region in self._regions:
            plane.layout.add_region(*region, None)

    def kvm_vms(self) -> list[Vm]:
        return [p.kvm_vm for _, p in sorted(self.planes.items())]

    def on_every_plane_vm(self, fn) -> None:
        """Apply ``fn(kvm.Vm)`` to every plane VM now and to those created later."""
        self._vm_setup.append(fn)
        for vm in self.kvm_vms():
            fn(vm)

    def create_vcpu(self, vcpu_id: int) -> SoftSwitchVcpu:
        if vcpu_id in self.vcpus:
            raise KvmError("KVM_CREATE_VCPU", self.label, errno.EEXIST)
        v0 = self.planes[0].kvm_vm.create_vcpu(vcpu_id)
        pv = MultiVmVcpu(self, vcpu_id, v0)
        self.planes[0].vcpus[vcpu_id] = v0
        self.vcpus[vcpu_id] = pv
        return pv

    def set_user_memory_region(self, slot, gpa, size, hva, flags=0) -> None:
        self._regions.append((slot, gpa, size, hva, flags))
        with self.layout_lock:
            for plane in self.planes.values():
                plane.layout.add_region(slot, gpa, size, hva, flags, plane.view)

    # -- memory views: one memslot layout per plane VM (memview.py) -------------------------
    per_plane_layouts = True
    protection_limit = "multivm enforces rwx, r-x and ---"

    def check_protection(self, access: Access) -> None:
        multivm_check(access)

    def _apply_view(self, plane: MultiVmPlane, start: int, end: int) -> None:
        """Re-lay the plane's memslots with none of its vCPUs inside KVM_RUN: a slot being
        replaced is absent for a moment, and a page-table walk or fetch that falls into that
        moment would fault in the guest (seen as a triple fault on this host)."""
        with self.layout_lock:
            cpus = list(self.vcpus.values())
            try:
                for cpu in cpus:
                    cpu.hold_entries(True)      # rare (protection changes): every plane waits
                    cpu.wait_out_of(plane.id)
                plane.layout.apply(plane.view, start, end)
            finally:
                for cpu in cpus:
                    cpu.hold_entries(False)

    def create_irqchip(self) -> None:
        if len(self.planes) > 1:
            raise KvmError("KVM_CREATE_IRQCHIP", self.label, errno.EINVAL,
                           "the interrupt controller must be created before any extra plane")
        self.planes[0].kvm_vm.create_irqchip()
        self.irqchip = True

    def close(self) -> None:
        self.stop_ticker()
        for vm in self.kvm_vms():
            vm.close()
