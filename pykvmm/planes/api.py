"""The one planes API, shaped like the KVM planes RFC of April 2025.

    vm = open_planes_vm(kvm, backend="auto")      # a VM whose plane 0 exists
    vcpu = vm.create_vcpu(0)                       # plane-0 vCPU: the one you run
    p1 = vm.create_plane(1)                        # EEXIST for an existing id (incl. 0), EINVAL >= limit
    v1 = p1.create_vcpu_plane(vcpu)                # plane-1 state of that vCPU (get/set only)
    ex = vcpu.run(plane=1, req_exit_planes=0b01)   # -> kvm.Exit, or PlaneEvent
    p1.signal_msi(address, data)                   # an interrupt for plane 1 only

Every backend implements these classes; they differ only in how planes are made and how
a switch happens (see DESIGN.md). Errors are KvmError with the RFC's errno.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod

from ..kvm import KvmError, Vcpu
from ..x86.arch import MAX_PLANES

KVM_PLANE_EVENT_INTERRUPT = 1


class Plane(ABC):
    """Plane ``id`` of a planes VM (plane 0 is the VM itself)."""

    def __init__(self, vm: "PlanesVm", plane_id: int):
        self.vm, self.id = vm, plane_id
        self.vcpus: dict[int, Vcpu] = {}

    @abstractmethod
    def create_vcpu_plane(self, vcpu: "PlanesVcpu") -> Vcpu:
        """Make this plane's instance of ``vcpu`` (a plane-0 vCPU). EEXIST if it exists."""

    @abstractmethod
    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI delivered to this plane's LAPICs only."""

    def _check_new_vcpu(self, vcpu: "PlanesVcpu"):
        if self.id == 0:
            raise KvmError("KVM_CREATE_VCPU_PLANE", "plane0", errno.ENOTTY,
                           "plane-0 vCPUs are made with create_vcpu() on the VM")
        if vcpu.id in self.vcpus:
            raise KvmError("KVM_CREATE_VCPU_PLANE", f"plane{self.id}", errno.EEXIST,
                           f"vCPU {vcpu.id} already has a plane-{self.id} instance")


class PlanesVcpu(ABC):
    """A vCPU with one register/LAPIC context per plane; run() runs one plane of it.

    What the user of the API (the machine) sets: ``thread_id``, the thread that calls run(),
    which ``kick()`` signals through the VM's ``kicker``."""

    def __init__(self, vm: "PlanesVm", vcpu_id: int):
        self.vm, self.id = vm, vcpu_id
        self.last_plane = 0
        self.cpuid = None
        self.thread_id: int | None = None

    @property
    @abstractmethod
    def plane0(self) -> Vcpu:
        ...

    def plane_vcpu(self, plane_id: int) -> Vcpu:
        """This vCPU's state handle in ``plane_id`` (get/set of regs, sregs, lapic, ...)."""
        try:
            return self.vm.planes[plane_id].vcpus[self.id]
        except KeyError:
            raise KvmError("plane_vcpu", f"vcpu{self.id}", errno.ENOENT,
                           f"plane {plane_id} has no instance of vCPU {self.id}") from None

    def set_cpuid2(self, cpuid) -> None:
        """CPUID for this vCPU; plane-N instances copy plane 0's (as the RFC does)."""
        self.cpuid = cpuid
        self.plane0.set_cpuid2(cpuid)

    @property
    def planes(self) -> list[int]:
        return sorted(p for p, plane in self.vm.planes.items() if self.id in plane.vcpus)

    @abstractmethod
    def run(self, plane: int = 0, req_exit_planes: int = 0):
        """Run ``plane`` of this vCPU until an exit; a pending interrupt for a plane in
        ``req_exit_planes`` (other than ``plane``) ends it with a PlaneEvent."""

    @abstractmethod
    def kick(self) -> None:
        """Make a run() in progress on another thread return soon (Interrupted or PlaneEvent)."""

    def note_pending(self, plane_id: int) -> None:
        """Something outside KVM made an interrupt pending for ``plane_id`` of this vCPU."""

    def needs_scan_kick(self) -> bool:
        """True while a run() is in KVM_RUN and only a kick lets it notice interrupts for the
        requested planes (backends that find them by looking, not told by the kernel). The
        machine kicks such vCPUs every ``kick_interval``."""
        return False


class PlanesVm(ABC):
    """What the user of the API (the machine) sets: ``kicker``, a callable(thread_id) that
    makes a thread blocked in KVM_RUN return (the machine sends it a signal); None: kicks only
    set immediate_exit."""

    backend: str = "?"

    def __init__(self, kvm, max_planes: int):
        self.kvm = kvm
        self.kicker = None
        self.max_planes = max_planes
        self.planes: dict[int, Plane] = {}
        self.vcpus: dict[int, PlanesVcpu] = {}
        self.shared_fpu = False
        self.irqchip = False

    # -- planes -------------------------------------------------------------------------
    def raw_create_plane(self, plane_id: int) -> int:
        """0, or -errno exactly as the RFC's KVM_CREATE_PLANE would answer."""
        if plane_id < 0 or plane_id >= self.max_planes:
            return -errno.EINVAL
        if plane_id in self.planes:
            return -errno.EEXIST
        self._create_plane(plane_id)
        return 0

    def create_plane(self, plane_id: int) -> Plane:
        ret = self.raw_create_plane(plane_id)
        if ret < 0:
            hint = (f"plane ids are 0..{self.max_planes - 1}" if ret == -errno.EINVAL
                    else f"plane {plane_id} already exists (plane 0 always does)")
            raise KvmError("KVM_CREATE_PLANE", self.label, -ret, hint)
        return self.planes[plane_id]

    @abstractmethod
    def _create_plane(self, plane_id: int) -> None:
        ...

    @property
    def label(self) -> str:
        return f"{self.backend} planes VM"

    # -- VM-wide setup -------------------------------------------------------------------
    @abstractmethod
    def create_vcpu(self, vcpu_id: int) -> PlanesVcpu:
        ...

    @abstractmethod
    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        ...

    @abstractmethod
    def create_irqchip(self) -> None:
        """In-kernel LAPICs for every plane. As in the RFC: only before extra planes exist."""

    def enable_shared_fpu(self, on: bool = True) -> None:
        """KVM_CAP_PLANES_FPU: planes share x87/SSE/AVX state (never PKRU). Before any vCPU."""
        if self.vcpus:
            raise KvmError("KVM_ENABLE_CAP(KVM_CAP_PLANES_FPU)", self.label, errno.EINVAL,
                           "the FPU sharing mode must be chosen before any vCPU exists")
        self.shared_fpu = on

    def signal_msi(self, address: int, data: int) -> int:
        """An MSI on the VM itself goes to plane 0, as in the RFC."""
        return self.planes[0].signal_msi(address, data)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SingleKvmVm:
    """Mixin for backends whose planes all live in one KVM VM (``self.vm0``)."""

    def set_user_memory_region(self, slot, gpa, size, hva, flags=0) -> None:
        self.vm0.set_user_memory_region(slot, gpa, size, hva, flags)

    def create_irqchip(self) -> None:
        self.vm0.create_irqchip()
        self.irqchip = True

    def on_every_plane_vm(self, fn) -> None:
        fn(self.vm0)
