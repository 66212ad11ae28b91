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

from ..kvm import KvmError, Vcpu, Vm
from ..x86.xsave import pkru_xsave_offset
from .api import MAX_PLANES, Plane, PlanesVm
from .softswitch import SoftSwitchVcpu, SoftSwitchVm


class MultiVmPlane(Plane):
    def __init__(self, vm: "MultiVmPlanesVm", plane_id: int, kvm_vm: Vm):
        super().__init__(vm, plane_id)
        self.kvm_vm = kvm_vm

    def create_vcpu_plane(self, vcpu: "SoftSwitchVcpu") -> Vcpu:
        self._check_new_vcpu(vcpu)
        v = self.kvm_vm.create_vcpu(vcpu.id)
        v.label = f"vcpu{vcpu.id}/plane{self.id}"
        if vcpu.cpuid is not None:
            v.set_cpuid2(vcpu.cpuid)  # the RFC copies plane 0's CPUID into plane-N vCPUs
        self.vcpus[vcpu.id] = v
        return v

    def signal_msi(self, address: int, data: int) -> int:
        ret = self.kvm_vm.signal_msi(address, data)
        dest = (address >> 12) & 0xFF | ((address >> 5) & 0x7F) << 8
        for vid, pv in self.vm.vcpus.items():
            if vid == dest or dest == 0xFF:
                pv.note_pending(self.id)
        return ret


class MultiVmPlanesVm(SoftSwitchVm, PlanesVm):
    backend = "multivm"

    def __init__(self, kvm, max_planes: int = MAX_PLANES):
        super().__init__(kvm, max_planes)
        self._regions: list[tuple] = []
        self._vm_setup = []         # callables applied to every plane VM (MSR filter, caps)
        self.pkru_offset = pkru_xsave_offset(kvm.supported_cpuid())
        self.planes[0] = MultiVmPlane(self, 0, kvm.create_vm())

    def _new_kvm_vm(self, plane_id: int) -> Vm:
        vm = self.kvm.create_vm()
        vm.label = f"vm(plane{plane_id})"
        for region in self._regions:
            vm.set_user_memory_region(*region)
        if self.irqchip:
            vm.create_irqchip()
        for fn in self._vm_setup:
            fn(vm)
        return vm

    def _create_plane(self, plane_id: int) -> None:
        self.planes[plane_id] = MultiVmPlane(self, plane_id, self._new_kvm_vm(plane_id))

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
        pv = SoftSwitchVcpu(self, vcpu_id, v0)
        self.planes[0].vcpus[vcpu_id] = v0
        self.vcpus[vcpu_id] = pv
        return pv

    def set_user_memory_region(self, slot, gpa, size, hva, flags=0) -> None:
        self._regions.append((slot, gpa, size, hva, flags))
        for vm in self.kvm_vms():
            vm.set_user_memory_region(slot, gpa, size, hva, flags)

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
