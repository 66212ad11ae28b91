"""Which planes backends this host has, found by calling the ioctls on a scratch VM.

Capability numbers of the RFCs collide with mainline ones (235 answers 1 here because
mainline gives it to KVM_CAP_VM_TYPES), so a capability number alone never decides.
ENOTTY or EINVAL from the ioctl means "absent".
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ..uapi import PROFILES, ffi

BACKENDS = ("native", "apic-groups", "multivm")


@dataclass
class Probe:
    backend: str
    available: bool
    reason: str
    abi: object = None

    def as_dict(self):
        return {"backend": self.backend, "available": self.available, "reason": self.reason,
                "abi": getattr(self.abi, "name", None)}


def probe_native(kvm) -> Probe:
    with kvm.create_vm() as vm:
        tried, seen = [], set()
        for abi in PROFILES.values():
            if abi.create_plane.code in seen:
                continue
            seen.add(abi.create_plane.code)
            ret = vm.raw_ioctl(abi.create_plane, 1)
            if ret >= 0:
                import os
                os.close(ret)
                if not abi.userspace_schedules:
                    return Probe("native", False, f"host speaks planes uAPI {abi.name}, where the kernel "
                                 "schedules planes itself; pykvmm needs run->plane (rfc-2025-04 or svsm-6.17)", abi)
                # A and B share the ioctl numbers: the capability tells them apart once the
                # ioctl is known to exist.
                if abi.name == "rfc-2025-04" and vm.check_extension(abi.cap_planes) <= 1 \
                        and vm.check_extension(PROFILES["svsm-6.17"].cap_planes) > 1:
                    abi = PROFILES["svsm-6.17"]
                return Probe("native", True, f"KVM_CREATE_PLANE ({abi.create_plane.code:#x}) works: "
                             f"planes uAPI {abi.name}", abi)
            tried.append(f"{abi.create_plane.code:#x}: {errno.errorcode.get(-ret, ret)}")
    return Probe("native", False, "host has no planes uAPI (KVM_CREATE_PLANE " + ", ".join(tried) + ")")


def probe_apic_groups(kvm) -> Probe:
    with kvm.create_vm() as vm:
        ret = vm.raw_ioctl("KVM_SET_APIC_ID_GROUPS", ffi.new("struct kvm_apic_id_groups *", {"n_bits": 1}))
    if ret >= 0:
        return Probe("apic-groups", True, "KVM_SET_APIC_ID_GROUPS works")
    return Probe("apic-groups", False, "host has no APIC-ID-groups uAPI (KVM_SET_APIC_ID_GROUPS: "
                 f"{errno.errorcode.get(-ret, ret)})")


def probe_multivm(kvm) -> Probe:
    return Probe("multivm", True, "one VM per plane works on any KVM")


def probe_all(kvm) -> dict[str, Probe]:
    return {"native": probe_native(kvm), "apic-groups": probe_apic_groups(kvm), "multivm": probe_multivm(kvm)}


def choose_backend(kvm, requested: str = "auto") -> tuple[Probe, dict[str, Probe]]:
    """The backend to use, and every probe (so callers can say why)."""
    probes = probe_all(kvm)
    if requested == "auto":
        for name in BACKENDS:
            if probes[name].available:
                return probes[name], probes
    if requested not in probes:
        raise ValueError(f"unknown backend {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
    return probes[requested], probes
