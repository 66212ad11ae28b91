"""The planes uAPI variants, as data. See shared reference planes-uapi.md.

Three incompatible variants exist; pykvmm speaks A (default) and B, and knows C's numbers
so that probing can recognise it. A profile is never chosen by capability number, which
collides with mainline numbers: the native backend probes KVM_CREATE_PLANE on a scratch VM.
"""

from dataclasses import dataclass

from .ioctls import KVMIO, Ioctl, _IO


@dataclass(frozen=True)
class PlanesAbi:
    name: str
    description: str
    cap_planes: int
    cap_planes_fpu: int | None
    exit_plane_event: int
    create_plane: Ioctl
    create_vcpu_plane: Ioctl | None      # None: KVM_CREATE_VCPU on the plane fd (variant C)
    event_struct: str                    # kvm_run union member carrying the event
    userspace_schedules: bool            # kvm_run.plane / req_exit_planes exist
    plane_event_interrupt: int | None


RFC_2025_04 = PlanesAbi(
    name="rfc-2025-04",
    description="Bonzini 'KVM: VM planes' RFC, April 2025 (kvm.git planes-20250401)",
    cap_planes=239,
    cap_planes_fpu=240,
    exit_plane_event=40,
    create_plane=Ioctl("KVM_CREATE_PLANE", _IO(KVMIO, 0xD6), "vm", None, mainline=False),
    create_vcpu_plane=Ioctl("KVM_CREATE_VCPU_PLANE", _IO(KVMIO, 0xD7), "plane", None, mainline=False),
    event_struct="plane_event",
    userspace_schedules=True,
    plane_event_interrupt=1,
)

SVSM_6_17 = PlanesAbi(
    name="svsm-6.17",
    description="COCONUT svsm-planes-v6.17 branch, October 2025",
    cap_planes=244,
    cap_planes_fpu=245,
    exit_plane_event=41,
    create_plane=Ioctl("KVM_CREATE_PLANE", _IO(KVMIO, 0xD6), "vm", None, mainline=False),
    create_vcpu_plane=Ioctl("KVM_CREATE_VCPU_PLANE", _IO(KVMIO, 0xD7), "plane", None, mainline=False),
    event_struct="plane_event",
    userspace_schedules=True,
    plane_event_interrupt=1,
)

# Known so probing can name it; pykvmm cannot drive it: the kernel schedules planes itself
# and offers none on plain (non-SNP) x86 VMs.
V1_2026_06 = PlanesAbi(
    name="v1-2026-06",
    description="Roedel/Bonzini 'KVM Planes + SEV-SNP' v1, June 2026",
    cap_planes=249,
    cap_planes_fpu=None,
    exit_plane_event=44,
    create_plane=Ioctl("KVM_CREATE_PLANE", _IO(KVMIO, 0xE4), "vm", None, mainline=False),
    create_vcpu_plane=None,
    event_struct="plane_event_v1",
    userspace_schedules=False,
    plane_event_interrupt=None,
)

PROFILES = {p.name: p for p in (RFC_2025_04, SVSM_6_17, V1_2026_06)}
DEFAULT_PROFILE = RFC_2025_04
