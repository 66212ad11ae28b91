"""The native backend: the kernel's planes uAPI (April 2025 RFC or the svsm-6.17 branch).

Userspace always runs the plane-0 vCPU fd with ``run->plane`` set; plane-N vCPU fds only
get/set state. The kvm_run page (and so its sync-register area) is shared by all planes
of a vCPU, so the live register copy is used only for plane 0 and flushed before another
plane runs.
"""

from __future__ import annotations

import errno

from ..kvm import FdObject, KvmError, Vcpu
from ..uapi import PlanesAbi, ffi
from .api import Plane, PlanesVcpu, PlanesVm, SingleKvmVm


class NativePlane(Plane):
    def __init__(self, vm: "NativePlanesVm", plane_id: int, fd_object: FdObject):
        super().__init__(vm, plane_id)
        self.fd_object = fd_object

    def create_vcpu_plane(self, vcpu: "NativeVcpu") -> Vcpu:
        abi = self.vm.abi
        if abi.create_vcpu_plane is None:
            fd = self.fd_object.ioctl("KVM_CREATE_VCPU", vcpu.id)
        else:
            fd = self.fd_object.ioctl(abi.create_vcpu_plane, vcpu.plane0.fd)
        v = Vcpu(self.vm.vm0, fd, vcpu.id, mmap_size=None, label=f"vcpu{vcpu.id}/plane{self.id}")
        self.vcpus[vcpu.id] = v
        return v

    def signal_msi(self, address: int, data: int) -> int:
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF,
                                           "address_hi": address >> 32, "data": data})
        return self.fd_object.ioctl("KVM_SIGNAL_MSI", msi)


class NativeVcpu(PlanesVcpu):
    def __init__(self, vm: "NativePlanesVm", vcpu_id: int, v0: Vcpu):
        super().__init__(vm, vcpu_id)
        self._v0 = v0

    @property
    def plane0(self) -> Vcpu:
        return self._v0

    def run(self, plane: int = 0, req_exit_planes: int = 0):
        v0 = self._v0
        run = v0.run_struct
        if plane != 0:
            v0.flush_sync_regs()   # the shared sync area must not carry plane 0's writes
            run.kvm_valid_regs = 0
        run.plane = plane
        run.req_exit_planes = req_exit_planes
        self.last_plane = plane
        ex = self.run_kvm(v0, req_exit_planes)
        if plane != 0:
            v0.forget_sync_regs()
        return ex


class NativePlanesVm(SingleKvmVm, PlanesVm):
    backend = "native"

    def __init__(self, kvm, abi: PlanesAbi):
        vm0 = kvm.create_vm()
        limit = vm0.check_extension(abi.cap_planes) or 1   # meaningful once probing found the uAPI
        super().__init__(kvm, limit)
        self.abi = abi
        self.vm0 = vm0
        self.planes[0] = NativePlane(self, 0, vm0)

    def raw_create_plane(self, plane_id: int) -> int:
        ret = self.vm0.raw_ioctl(self.abi.create_plane, plane_id)
        if ret >= 0:
            self.planes[plane_id] = NativePlane(self, plane_id, FdObject(ret, f"plane{plane_id}"))
            return 0
        return ret

    def _create_plane(self, plane_id: int) -> None:  # raw_create_plane does the work
        raise AssertionError("unreachable")

    def create_vcpu(self, vcpu_id: int) -> NativeVcpu:
        v0 = self.vm0.create_vcpu(vcpu_id, planes_abi=self.abi)
        self.planes[0].vcpus[vcpu_id] = v0
        pv = NativeVcpu(self, vcpu_id, v0)
        self.vcpus[vcpu_id] = pv
        return pv

    def enable_shared_fpu(self, on: bool = True) -> None:
        if self.abi.cap_planes_fpu is None:
            raise KvmError("KVM_ENABLE_CAP", self.label, errno.EINVAL, f"{self.abi.name} has no shared-FPU mode")
        self.vm0.enable_cap(self.abi.cap_planes_fpu, int(on))
        self.shared_fpu = on

    def close(self) -> None:
        for p in self.planes.values():
            if p.id:
                for v in p.vcpus.values():
                    v.close()
                p.fd_object.close()
        self.vm0.close()
