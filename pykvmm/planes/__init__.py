"""Layer 4: the planes API and its three backends (native, apic-groups, multivm)."""

from ..kvm import KvmError
from .api import KICK_SIGNAL, KVM_PLANE_EVENT_INTERRUPT, MAX_PLANES, Plane, PlanesVcpu, PlanesVm, install_kick_handler
from .probe import BACKENDS, Probe, choose_backend, probe_all


class BackendUnavailable(KvmError):
    pass


def open_planes_vm(kvm, backend: str = "auto") -> PlanesVm:
    """A planes VM on ``backend`` ("auto" picks native > apic-groups > multivm)."""
    import errno

    probe, _ = choose_backend(kvm, backend)
    if not probe.available:
        raise BackendUnavailable(f"the {backend} planes backend", kvm.path, errno.ENOTSUP,
                                 f"{probe.reason}; use --backend auto (it picks what the host has) or multivm")
    if probe.backend == "native":
        from .native import NativePlanesVm
        return NativePlanesVm(kvm, probe.abi)
    if probe.backend == "apic-groups":
        from .apic_groups import ApicGroupsPlanesVm
        return ApicGroupsPlanesVm(kvm)
    from .multivm import MultiVmPlanesVm
    return MultiVmPlanesVm(kvm)


__all__ = ["open_planes_vm", "choose_backend", "probe_all", "BACKENDS", "Probe", "PlanesVm", "PlanesVcpu",
           "Plane", "KVM_PLANE_EVENT_INTERRUPT", "MAX_PLANES", "BackendUnavailable", "KICK_SIGNAL",
           "install_kick_handler"]
