"""TLFS "Feature and Interface Discovery": the hypervisor CPUID leaves 0x40000000-0x4000000A,
built from the enabled flags only (a guest that sees a bit may use the feature; every bit
we set is implemented). KVM's own leaves move to 0x40000100, as QEMU does with Hyper-V on."""

from __future__ import annotations

from ...kvm import _Owned
from ...uapi import ffi
from . import tlfs as T
from .features import HvConfig

BUILD_NUMBER = 0x3839          # what QEMU reports (Windows Server 2016 build 14393)
VERSION_MAJOR_MINOR = 0x000A0000  # 10.0


def _regs_of(text: str) -> tuple[int, int, int]:
    raw = text.encode().ljust(12, b"\0")[:12]
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))


def leaves(cfg: HvConfig, vcpus: int) -> dict[int, tuple[int, int, int, int]]:
    """leaf -> (eax, ebx, ecx, edx) for 0x40000000..0x4000000A."""
    has = cfg.has
    ebx, ecx, edx = _regs_of(cfg.vendor_id)
    out = {T.CPUID_VENDOR: (T.CPUID_LAST, ebx, ecx, edx),
           T.CPUID_INTERFACE: (T.INTERFACE_HV1, 0, 0, 0),
           T.CPUID_VERSION: (BUILD_NUMBER, VERSION_MAJOR_MINOR, 0, 0)}
    a = T.ACCESS_HYPERCALL_MSRS
    b = T.ACCESS_PARTITION_ID
    d = 0
    for flag, bits in (("runtime", T.ACCESS_VP_RUNTIME),
                       ("time", T.ACCESS_PARTITION_REFERENCE_COUNTER | T.ACCESS_PARTITION_REFERENCE_TSC),
                       ("synic", T.ACCESS_SYNIC_REGS), ("stimer", T.ACCESS_SYNTHETIC_TIMER_REGS),
                       ("vapic", T.ACCESS_INTR_CTRL_REGS), ("vpindex", T.ACCESS_VP_INDEX),
                       ("reset", T.ACCESS_RESET_REG), ("frequencies", T.ACCESS_FREQUENCY_REGS)):
        if has(flag):
            a |= bits
    if has("synic"):
        b |= T.POST_MESSAGES | T.SIGNAL_EVENTS
    if has("vsm"):
        b |= T.ACCESS_VSM | T.ACCESS_VP_REGISTERS
    for flag, bits in (("xmm_input", T.XMM_INPUT_AVAILABLE), ("xmm_output", T.XMM_OUTPUT_AVAILABLE),
                       ("frequencies", T.FREQUENCY_MSRS_AVAILABLE), ("crash", T.GUEST_CRASH_MSRS_AVAILABLE),
                       ("tlbflush_ext", T.EXT_GVA_RANGES_FLUSH),
                       ("stimer_direct", T.STIMER_DIRECT_MODE_AVAILABLE)):
        if has(flag):
            d |= bits
    out[T.CPUID_FEATURES] = (a, b, 0, d)
    rec = 0
    for flag, bits in (("tlbflush", T.LOCAL_TLB_FLUSH_RECOMMENDED | T.REMOTE_TLB_FLUSH_RECOMMENDED),
                       ("vapic", T.APIC_ACCESS_RECOMMENDED), ("reset", T.SYSTEM_RESET_RECOMMENDED),
                       ("relaxed", T.RELAXED_TIMING_RECOMMENDED), ("avic", T.DEPRECATING_AEOI_RECOMMENDED),
                       ("ipi", T.CLUSTER_IPI_RECOMMENDED | T.EX_PROCESSOR_MASKS_RECOMMENDED)):
        if has(flag):
            rec |= bits
    out[T.CPUID_ENLIGHTENMENT_INFO] = (rec, cfg.spinlocks, 0, 0)
    out[T.CPUID_IMPLEMENT_LIMITS] = (vcpus, vcpus, 0, 0)
    for leaf in range(T.CPUID_HARDWARE_FEATURES, T.CPUID_LAST + 1):
        out[leaf] = (0, 0, 0, 0)   # no hardware features, no root/nested/SVM enlightenments
    return out


def with_hyperv_leaves(cpuid, cfg: HvConfig, vcpus: int):
    """A copy of ``cpuid`` (struct kvm_cpuid2) with the Hyper-V leaves at 0x40000000 and
    KVM's leaves relocated to 0x40000100 (their max-leaf value follows)."""
    keep, kvm = [], []
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if 0x40000000 <= e.function < 0x40000100:
            kvm.append(e)
        elif not 0x40000100 <= e.function < 0x40000200:
            keep.append(e)
    hv = leaves(cfg, vcpus)
    n = len(keep) + len(kvm) + len(hv)
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
    out = ffi.cast("struct kvm_cpuid2 *", buf)
    out.nent = n
    k = 0
    for e in keep:
        out.entries[k] = e
        k += 1
    delta = T.CPUID_KVM_RELOCATED - 0x40000000
    for e in kvm:
        out.entries[k] = e
        out.entries[k].function = e.function + delta
        if e.function == 0x40000000:
            out.entries[k].eax = e.eax + delta if e.eax >= 0x40000000 else e.eax
        k += 1
    for leaf, (a, b, c, d) in sorted(hv.items()):
        ent = out.entries[k]
        ent.function, ent.index, ent.flags = leaf, 0, 0
        ent.eax, ent.ebx, ent.ecx, ent.edx = a, b, c, d
        k += 1
    return _Owned(out, keepalive=buf)
