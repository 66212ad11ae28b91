"""The Hyper-V personality: the TLFS enlightenments a real Hyper-V guest discovers through
CPUID, synthetic MSRs and hypercalls, emulated in userspace on any KVM (this host's KVM has
no Hyper-V support at all: KVM_CAP_HYPERV is 0). Enabled by ``--hyperv`` or hv_* flags in
``--cpu``; usable with one plane, and with the VTL personality on several.

Modules, by TLFS chapter:

| module | TLFS chapter |
|---|---|
| ``tlfs`` | data types: MSR indices, CPUID bits, call and status codes |
| ``features`` | the hv_* flags (QEMU spellings) |
| ``discovery`` | Feature and Interface Discovery (CPUID 0x40000000-0x4000000A) |
| ``hypercall`` | Hypercall Interface (page, input value, memory/fast/XMM I/O, rep continuation) |
| ``partition`` | the partition: state ownership, the synthetic-MSR path, interrupt injection |
| ``vp`` | Partition/VP properties (GUEST_OS_ID, HYPERCALL, VP_INDEX, VP_RUNTIME, reset, crash, VP assist) |
| ``timers`` | Timers (reference counter, reference TSC page, frequencies, STIMER0-3) |
| ``synic`` | Synthetic Interrupt Controller (SIMP, SIEFP, SINTs, EOM, delivery) |
| ``messaging`` | Inter-Partition Communication (connections, PostMessage, SignalEvent) |
| ``vapic`` | Virtual Interrupt Controller (EOI/ICR/TPR MSRs, SendSyntheticClusterIpi/Ex) |
| ``vmmu`` | Virtual MMU (FlushVirtualAddressSpace/List and Ex) |
| ``testdev`` | QEMU's hyperv-testdev (port 0x3000), the tests' port factory |

Where state lives (TLFS "Virtual Processor State Isolation": per-VTL state is private to
a VTL, so it lives with the plane; the rest is the partition's, so it lives with the machine):

| state | scope | pykvmm object |
|---|---|---|
| GUEST_OS_ID, HYPERCALL MSR and page | per partition, per VTL | ``PlaneHv`` (one per plane) |
| REFERENCE_TSC MSR and page | per partition, per VTL (the time it shows is the partition's) | ``PlaneHv`` |
| SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0-15 | per VP, per VTL | ``VpHv.synic`` |
| STIMER0-3 CONFIG/COUNT | per VP, per VTL | ``VpHv.stimers`` |
| VP_ASSIST_PAGE | per VP, per VTL | ``VpHv.vp_assist`` |
| EOI, ICR, TPR (the LAPIC) | per VP, per VTL | the plane's own x2APIC (KVM) |
| auto-EOI bookkeeping | per VP, per VTL | ``VpHv.auto_eoi`` |
| VP_INDEX, VP_RUNTIME | per VP, shared by its VTLs | the vCPU index / thread |
| TIME_REF_COUNT, TSC_FREQUENCY, APIC_FREQUENCY | per partition | ``timers.ReferenceClock`` |
| RESET, CRASH_P0-4, CRASH_CTL | per partition | ``vp.install`` |
| connections and ports (each port targets one VP and VTL) | per partition | ``messaging.Messaging`` |
| the CPUID leaves | per partition | ``discovery`` |
"""

__all__ = ["FLAGS", "HvConfig", "HvFlagError", "HyperV", "parse_flags"]


def __getattr__(name):
    # Lazy, so that ``python -m pykvmm.vmm.hyperv.tlfs`` (the guest build) needs no cffi.
    if name == "HyperV":
        from .partition import HyperV
        return HyperV
    if name in ("FLAGS", "HvConfig", "HvFlagError", "parse_flags"):
        from . import features
        return getattr(features, name)
    raise AttributeError(name)
