"""KVM ioctl request codes, computed with the kernel's _IOC rules from struct sizes.

Each entry records which fd it is issued on, so error messages can name the object.
"""

from dataclasses import dataclass

from .ffi import ffi

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit _IOC's size field")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _size(ctype: str) -> int:
    return ffi.sizeof(ctype)


def _IO(type_, nr):
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_, nr, ctype):
    return _IOC(_IOC_READ, type_, nr, _size(ctype))


def _IOW(type_, nr, ctype):
    return _IOC(_IOC_WRITE, type_, nr, _size(ctype))


def _IOWR(type_, nr, ctype):
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(ctype))


@dataclass(frozen=True)
class Ioctl:
    name: str
    code: int
    on: str          # "system", "vm", "vcpu", "plane" (a non-default plane's VM fd)
    arg: str | None  # C type of the argument struct, None for an integer argument
    mainline: bool = True


def _table(*entries: Ioctl) -> dict[str, Ioctl]:
    return {e.name: e for e in entries}


_S, _V, _C, _P = "system", "vm", "vcpu", "plane"

IOCTLS = _table(
    # system fd
    Ioctl("KVM_GET_API_VERSION", _IO(KVMIO, 0x00), _S, None),
    Ioctl("KVM_CREATE_VM", _IO(KVMIO, 0x01), _S, None),
    Ioctl("KVM_GET_MSR_INDEX_LIST", _IOWR(KVMIO, 0x02, "struct kvm_msr_list"), _S, "struct kvm_msr_list"),
    Ioctl("KVM_CHECK_EXTENSION", _IO(KVMIO, 0x03), _S, None),
    Ioctl("KVM_GET_VCPU_MMAP_SIZE", _IO(KVMIO, 0x04), _S, None),
    Ioctl("KVM_GET_SUPPORTED_CPUID", _IOWR(KVMIO, 0x05, "struct kvm_cpuid2"), _S, "struct kvm_cpuid2"),
    # vm fd
    Ioctl("KVM_CREATE_VCPU", _IO(KVMIO, 0x41), _V, None),
    Ioctl("KVM_SET_USER_MEMORY_REGION", _IOW(KVMIO, 0x46, "struct kvm_userspace_memory_region"), _V,
          "struct kvm_userspace_memory_region"),
    Ioctl("KVM_SET_TSS_ADDR", _IO(KVMIO, 0x47), _V, None),
    Ioctl("KVM_CREATE_IRQCHIP", _IO(KVMIO, 0x60), _V, None),
    Ioctl("KVM_IRQ_LINE", _IOW(KVMIO, 0x61, "struct kvm_irq_level"), _V, "struct kvm_irq_level"),
    Ioctl("KVM_IOEVENTFD", _IOW(KVMIO, 0x79, "struct kvm_ioeventfd"), _V, "struct kvm_ioeventfd"),
    Ioctl("KVM_GET_IRQCHIP", _IOWR(KVMIO, 0x62, "struct kvm_irqchip"), _V, "struct kvm_irqchip"),
    Ioctl("KVM_CREATE_PIT2", _IOW(KVMIO, 0x77, "struct kvm_pit_config"), _V, "struct kvm_pit_config"),
    Ioctl("KVM_SET_GSI_ROUTING", _IOW(KVMIO, 0x6a, "struct kvm_irq_routing"), _V, "struct kvm_irq_routing"),
    Ioctl("KVM_SIGNAL_MSI", _IOW(KVMIO, 0xa5, "struct kvm_msi"), _V, "struct kvm_msi"),
    Ioctl("KVM_ENABLE_CAP", _IOW(KVMIO, 0xa3, "struct kvm_enable_cap"), _V, "struct kvm_enable_cap"),
    Ioctl("KVM_X86_SET_MSR_FILTER", _IOW(KVMIO, 0xc6, "struct kvm_msr_filter"), _V, "struct kvm_msr_filter"),
    # vcpu fd
    Ioctl("KVM_RUN", _IO(KVMIO, 0x80), _C, None),
    Ioctl("KVM_GET_REGS", _IOR(KVMIO, 0x81, "struct kvm_regs"), _C, "struct kvm_regs"),
    Ioctl("KVM_SET_REGS", _IOW(KVMIO, 0x82, "struct kvm_regs"), _C, "struct kvm_regs"),
    Ioctl("KVM_GET_SREGS", _IOR(KVMIO, 0x83, "struct kvm_sregs"), _C, "struct kvm_sregs"),
    Ioctl("KVM_SET_SREGS", _IOW(KVMIO, 0x84, "struct kvm_sregs"), _C, "struct kvm_sregs"),
    Ioctl("KVM_TRANSLATE", _IOWR(KVMIO, 0x85, "struct kvm_translation"), _C, "struct kvm_translation"),
    Ioctl("KVM_INTERRUPT", _IOW(KVMIO, 0x86, "struct kvm_interrupt"), _C, "struct kvm_interrupt"),
    Ioctl("KVM_GET_MSRS", _IOWR(KVMIO, 0x88, "struct kvm_msrs"), _C, "struct kvm_msrs"),
    Ioctl("KVM_SET_MSRS", _IOW(KVMIO, 0x89, "struct kvm_msrs"), _C, "struct kvm_msrs"),
    Ioctl("KVM_GET_FPU", _IOR(KVMIO, 0x8c, "struct kvm_fpu"), _C, "struct kvm_fpu"),
    Ioctl("KVM_SET_FPU", _IOW(KVMIO, 0x8d, "struct kvm_fpu"), _C, "struct kvm_fpu"),
    Ioctl("KVM_GET_LAPIC", _IOR(KVMIO, 0x8e, "struct kvm_lapic_state"), _C, "struct kvm_lapic_state"),
    Ioctl("KVM_SET_LAPIC", _IOW(KVMIO, 0x8f, "struct kvm_lapic_state"), _C, "struct kvm_lapic_state"),
    Ioctl("KVM_SET_CPUID2", _IOW(KVMIO, 0x90, "struct kvm_cpuid2"), _C, "struct kvm_cpuid2"),
    Ioctl("KVM_GET_CPUID2", _IOWR(KVMIO, 0x91, "struct kvm_cpuid2"), _C, "struct kvm_cpuid2"),
    Ioctl("KVM_GET_MP_STATE", _IOR(KVMIO, 0x98, "struct kvm_mp_state"), _C, "struct kvm_mp_state"),
    Ioctl("KVM_SET_MP_STATE", _IOW(KVMIO, 0x99, "struct kvm_mp_state"), _C, "struct kvm_mp_state"),
    Ioctl("KVM_NMI", _IO(KVMIO, 0x9a), _C, None),
    Ioctl("KVM_SET_GUEST_DEBUG", _IOW(KVMIO, 0x9b, "struct kvm_guest_debug"), _C, "struct kvm_guest_debug"),
    Ioctl("KVM_GET_VCPU_EVENTS", _IOR(KVMIO, 0x9f, "struct kvm_vcpu_events"), _C, "struct kvm_vcpu_events"),
    Ioctl("KVM_SET_VCPU_EVENTS", _IOW(KVMIO, 0xa0, "struct kvm_vcpu_events"), _C, "struct kvm_vcpu_events"),
    Ioctl("KVM_GET_DEBUGREGS", _IOR(KVMIO, 0xa1, "struct kvm_debugregs"), _C, "struct kvm_debugregs"),
    Ioctl("KVM_SET_DEBUGREGS", _IOW(KVMIO, 0xa2, "struct kvm_debugregs"), _C, "struct kvm_debugregs"),
    Ioctl("KVM_GET_XSAVE", _IOR(KVMIO, 0xa4, "struct kvm_xsave"), _C, "struct kvm_xsave"),
    Ioctl("KVM_SET_XSAVE", _IOW(KVMIO, 0xa5, "struct kvm_xsave"), _C, "struct kvm_xsave"),
    Ioctl("KVM_GET_TSC_KHZ", _IO(KVMIO, 0xa3), _C, None),
    Ioctl("KVM_GET_XCRS", _IOR(KVMIO, 0xa6, "struct kvm_xcrs"), _C, "struct kvm_xcrs"),
    Ioctl("KVM_SET_XCRS", _IOW(KVMIO, 0xa7, "struct kvm_xcrs"), _C, "struct kvm_xcrs"),
    Ioctl("KVM_GET_SREGS2", _IOR(KVMIO, 0xcc, "struct kvm_sregs2"), _C, "struct kvm_sregs2"),
    Ioctl("KVM_SET_SREGS2", _IOW(KVMIO, 0xcd, "struct kvm_sregs2"), _C, "struct kvm_sregs2"),
    Ioctl("KVM_GET_XSAVE2", _IOR(KVMIO, 0xcf, "struct kvm_xsave"), _C, "struct kvm_xsave"),
    Ioctl("KVM_SET_DEVICE_ATTR", _IOW(KVMIO, 0xe1, "struct kvm_device_attr"), _C, "struct kvm_device_attr"),
    Ioctl("KVM_GET_DEVICE_ATTR", _IOW(KVMIO, 0xe2, "struct kvm_device_attr"), _C, "struct kvm_device_attr"),
    # RFCs (not in mainline; see profiles.py for which numbers each planes variant uses)
    Ioctl("KVM_SET_APIC_ID_GROUPS", _IOW(KVMIO, 0xd7, "struct kvm_apic_id_groups"), _V,
          "struct kvm_apic_id_groups", mainline=False),
)


def ioctl(name: str) -> Ioctl:
    return IOCTLS[name]
