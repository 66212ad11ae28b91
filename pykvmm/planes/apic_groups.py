"""The apic-groups backend: one VM, plane p of vCPU i is KVM vCPU ``(p << shift) | i``
after KVM_SET_APIC_ID_GROUPS, which makes the kernel keep IPIs inside a group.

As in the VSM RFC, the VMM switches by stopping one KVM vCPU and running the other; plane
events are produced by pykvmm exactly as on multivm (see softswitch.py).
The group occupies the top ``n_bits`` of the 32-bit APIC ID ([U]: the reference says "the
top n_bits bits"; the shift is a parameter so a host that differs needs one number changed).
"""

from __future__ import annotations

import errno

from ..kvm import KvmError, Vcpu
from ..uapi import ffi
from ..x86 import apic
from ..x86.xsave import pkru_xsave_offset
from .api import MAX_PLANES, Plane, PlanesVm, SingleKvmVm
from .softswitch import SoftSwitchVcpu, SoftSwitchVm

N_BITS = 4  # 16 planes


class ApicGroupsPlane(Plane):
    def create_vcpu_plane(self, vcpu: SoftSwitchVcpu) -> Vcpu:
        self._check_new_vcpu(vcpu)
        v = self.vm.vm0.create_vcpu(self.vm.kvm_vcpu_id(self.id, vcpu.id))
        v.label = f"vcpu{vcpu.id}/plane{self.id}"
        if vcpu.cpuid is not None:
            v.set_cpuid2(vcpu.cpuid)
        self.vcpus[vcpu.id] = v
        vcpu.add_plane_vcpu(self.id, v)
        return v

    def signal_msi(self, address: int, data: int) -> int:
        dest = apic.msi_destination(address)
        addr, _ = apic.msi_message(self.vm.kvm_vcpu_id(self.id, dest), 0)
        ret = self.vm.vm0.signal_msi(addr, data)
        if dest in self.vm.vcpus:
            self.vm.vcpus[dest].note_pending(self.id)
        return ret


class ApicGroupsPlanesVm(SoftSwitchVm, SingleKvmVm, PlanesVm):
    backend = "apic-groups"

    def __init__(self, kvm, n_bits: int = N_BITS, shift: int | None = None):
        super().__init__(kvm, min(MAX_PLANES, 1 << n_bits))
        self.vm0 = kvm.create_vm()
        self.shift = 32 - n_bits if shift is None else shift
        self.vm0.ioctl("KVM_SET_APIC_ID_GROUPS", ffi.new("struct kvm_apic_id_groups *", {"n_bits": n_bits}))
        self.pkru_offset = pkru_xsave_offset(kvm.supported_cpuid())
        self.planes[0] = ApicGroupsPlane(self, 0)

    def kvm_vcpu_id(self, plane_id: int, vcpu_index: int) -> int:
        return (plane_id << self.shift) | vcpu_index

    def _create_plane(self, plane_id: int) -> None:
        self.planes[plane_id] = ApicGroupsPlane(self, plane_id)

    def create_vcpu(self, vcpu_id: int) -> SoftSwitchVcpu:
        if vcpu_id in self.vcpus:
            raise KvmError("KVM_CREATE_VCPU", self.label, errno.EEXIST)
        v0 = self.vm0.create_vcpu(vcpu_id)
        self.planes[0].vcpus[vcpu_id] = v0
        pv = SoftSwitchVcpu(self, vcpu_id, v0)
        self.vcpus[vcpu_id] = pv
        return pv

    def close(self) -> None:
        self.stop_ticker()
        self.vm0.close()
