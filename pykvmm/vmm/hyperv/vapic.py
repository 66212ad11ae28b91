"""TLFS "Virtual Interrupt Controller": the APIC-access MSRs of hv_vapic (EOI, ICR, TPR,
mapped onto the VTL's x2APIC registers 0x80B, 0x830, 0x808 through KVM, which #GPs what the
x2APIC would refuse; EOI is write-only) and the synthetic IPIs.

HvCallSendSyntheticClusterIpi = HvCallSendIpi (0x0B; fast or 16 bytes of memory input):
Vector u32 @0 (0x10..0xFF), TargetVtl HV_INPUT_VTL @4, 3 RsvdZ bytes, ProcessorMask u64
@8. HvCallSendSyntheticClusterIpiEx = HvCallSendIpiEx (0x15): Vector, TargetVtl, then an
HV_VP_SET (Format, ValidBankMask; its banks are the variable header). Errors: vector out
of range, reserved VTL bits, a VTL or VP that does not exist -> INVALID_PARAMETER; a bank
count that does not match the variable header -> INVALID_HYPERCALL_INPUT. Delivery is an
MSI to each target VP's LAPIC in the target VTL. Under the ``vtl`` personality 0x0B stays
that personality's (same layout, plus its masked-plane bookkeeping).
"""

from __future__ import annotations

import struct

from ...kvm import KvmError
from ...x86 import apic, arch
from . import tlfs as T
from .hypercall import CallSpec, HvError, processor_mask, target_vtl, vp_set
from .partition import MsrFault

X2APIC_ICR_RESERVED = (0xFFF << 20) | (0x3 << 16) | (1 << 13)   # as the SDM's x2APIC ICR


def install(hv) -> None:
    def vcpu_of(vp):
        return hv.machine.threads[vp.index].planes_vcpu.plane_vcpu(vp.plane)

    def x2apic(index, name, reserved=0):
        def read(vp):
            try:
                return vcpu_of(vp).get_msrs([index])[index]
            except (KvmError, KeyError):
                raise MsrFault(f"the x2APIC refused a read of {index:#x}") from None

        def write(vp, value):
            if value & reserved:
                # KVM checks these only for the guest's own WRMSR, not for ours.
                raise MsrFault(f"{value:#x} sets bits the x2APIC {name} reserves")
            try:
                vcpu_of(vp).set_msrs({index: value})
            except KvmError:
                raise MsrFault(f"the x2APIC refused {value:#x} in {index:#x}") from None
        return read, write

    _, eoi_write = x2apic(arch.X2APIC_EOI, "EOI")
    hv.add_msr(T.MSR_EOI, "HV_X64_MSR_EOI", None, eoi_write, feature="vapic")
    hv.add_msr(T.MSR_ICR, "HV_X64_MSR_ICR", *x2apic(arch.X2APIC_ICR, "ICR", X2APIC_ICR_RESERVED), feature="vapic")
    hv.add_msr(T.MSR_TPR, "HV_X64_MSR_TPR", *x2apic(arch.X2APIC_TPR, "TPR", ~0xFF), feature="vapic")

    def send(call, vector: int, vtl_byte: int, rsvd: int, vps: list[int]):
        if not 0x10 <= vector <= 0xFF:
            raise HvError(T.INVALID_PARAMETER, f"vector {vector:#x} is not in 0x10..0xff")
        if rsvd:
            raise HvError(T.INVALID_PARAMETER, "SendIpi RsvdZ bytes 7:5 set")
        target = target_vtl(vtl_byte, call.plane, hv.machine.plane_count)
        vsm = getattr(hv.machine.policy, "vsm", None)
        refused = vsm.interrupt_refusal(call.plane, target) if vsm is not None else None
        if refused:
            raise HvError(*refused)
        plane = hv.machine.pvm.planes[target]
        for v in vps:
            plane.signal_msi(*apic.msi_message(v, vector))
        hv.stats["ipis"] = hv.stats.get("ipis", 0) + len(vps)
        return None

    def send_ipi(call, header):
        vector, vtl_byte, r0, r1, mask = struct.unpack("<IBBHQ", header)
        return send(call, vector, vtl_byte, r0 | r1, processor_mask(mask, hv.machine.config.vcpus))

    def send_ipi_ex(call, header):
        vector, vtl_byte, r0, r1, fmt, banks = struct.unpack("<IBBHQQ", header)
        return send(call, vector, vtl_byte, r0 | r1, vp_set(fmt, banks, call.var_header, hv.machine.config.vcpus))

    hv.table.add(CallSpec(T.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, "HvCallSendSyntheticClusterIpi", "ipi", send_ipi, header_size=16),
                 replace=False)
    hv.table.add(CallSpec(T.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX, "HvCallSendSyntheticClusterIpiEx", "ipi", send_ipi_ex,
                          header_size=24, var_header=True))
