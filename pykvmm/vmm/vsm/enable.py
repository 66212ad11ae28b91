"""TLFS "Virtual Secure Mode" > "Enabling VTLs" and the VSM registers: how VTLs come to life
and what a guest learns about them.

Boot modes (``MachineConfig.vtl_boot``, ``pykvmm run --vtl-boot``):
  ``pykvmm``  every VTL of every vCPU is enabled from reset and starts at the guest entry on its
              first entry (rdi/rsi/rdx = vCPU, plane, boot info): pykvmm's own VTL guests.
  ``tlfs``    as on Hyper-V: only VTL0 runs at reset. VTL n > 0 exists for the partition after
              HvCallEnablePartitionVtl and on a VP after HvCallEnableVpVtl, which gives its
              initial register state; a VtlCall, an interrupt or an intercept enters only
              enabled VTLs (a VtlCall with none above -> #UD).

HvCallEnablePartitionVtl (0x000D): PartitionId u64 @0, TargetVtl u8 @8, Flags u8 @9 (bit 0
EnableMbec; the rest reserved), 6 reserved bytes. Answers: INVALID_PARTITION_ID (another
partition), INVALID_PARAMETER (reserved flags, MBEC: pykvmm has none, a VTL beyond the
partition's maximum), ACCESS_DENIED (the caller's VTL is not below the target), INVALID_VTL_STATE
(already enabled, or not the next VTL: VTLs are enabled in order).

HvCallEnableVpVtl (0x000F): PartitionId @0, VpIndex u32 @8, TargetVtl u8 @12, 3 reserved bytes,
HV_INITIAL_VP_CONTEXT @16 (224 bytes: Rip, Rsp, Rflags, then CS DS ES FS GS SS TR LDTR as
HV_X64_SEGMENT_REGISTER, IDTR and GDTR as HV_X64_TABLE_REGISTER, Efer, Cr0, Cr3, Cr4,
MsrCrPat). Answers: INVALID_PARTITION_ID; INVALID_VP_INDEX; ACCESS_DENIED (caller above the
target: a VTL enables itself on other VPs, or a higher VTL, never a lower one);
INVALID_VTL_STATE (not enabled for the partition, or already on that VP); INVALID_PARAMETER
(real mode, CR0.PE or PG clear, which VTLs above 0 may not use, or a state KVM refuses).
The other registers of the new VTL are zero (RAX..R15 are the VP's shared ones anyway).

VSM registers (through HvCallGet/SetVpRegisters):
  VsmCodePageOffsets (0xD0002, read-only): VtlCall offset 11:0, VtlReturn offset 23:12.
  VsmVpStatus (0xD0003, read-only): ActiveVtl 3:0, ActiveMbecEnabled 4, EnabledVtlSet 23:8.
  VsmPartitionStatus (0xD0004, read-only): EnabledVtlSet 15:0, MaximumVtl 19:16,
      MbecEnabledVtlSet 35:20.
  VsmCapabilities (0xD0006, read-only): 0 (DR6 not shared, no MBEC, no deny-lower-VTL-startup).
  VsmPartitionConfig (0xD0007, one per VTL > 0, that VTL's own): EnableVtlProtection 0,
      DefaultVtlProtectionMask 4:1, ZeroMemoryOnReset 5, DenyLowerVtlStartup 6; other bits
      INVALID_PARAMETER. EnableVtlProtection is write-once: once set it cannot be cleared and
      the default mask cannot change (INVALID_PARAMETER); setting it applies the default mask
      to every page of every lower VTL this VTL has not named.
  VsmVpSecureVtlConfig (0xD0010 + n, the target VTL's instance for a VTL n below it, per VP):
      MbecEnabled 0 (refused: no MBEC), TlbLocked 1 (locks VTL n's TLB on the VP: vsm/tlb.py);
      other bits INVALID_PARAMETER. A VtlReturn from the VTL clears its TlbLocked bits.
  VsmVina (0xD0005, the VTL's own, per VP): Vector 7:0, Enabled 8, AutoReset 9, AutoEoi 10
      (other bits, or an enabled vector below 16 -> INVALID_PARAMETER). With Enabled, an
      interrupt that becomes deliverable in a lower VTL of the VP while this VTL runs latches
      VinaAsserted (VP_VTL_CONTROL byte 0x0C, bit 0) and sends this VTL the vector, once,
      until the guest clears VinaAsserted or, with AutoReset, the VTL returns; AutoEoi delivers
      it with auto-EOI (Hyper-V layer).
  VpAssistPage (0x90013): the target VTL's HV_X64_MSR_VP_ASSIST_PAGE (a page outside guest
      memory -> INVALID_PARAMETER).
"""

from __future__ import annotations

import struct

from ...kvm import KvmError
from ...x86 import arch
from .. import abi
from ..hyperv.hypercall import CallSpec, HvError
from ..hyperv.tlfs import (ENABLE_VP_VTL_CONTEXT, ENABLE_VTL_MBEC, SECURE_CONFIG_MBEC,
                           SECURE_CONFIG_TLB_LOCKED, VINA_AUTO_EOI, VINA_AUTO_RESET, VINA_ENABLED,
                           VP_CONTEXT_CS, VP_CONTEXT_EFER, VP_CONTEXT_GDTR, VP_CONTEXT_IDTR, VP_CONTEXT_RIP,
                           VP_CONTEXT_SIZE, VSM_CONFIG_DEFAULT_MASK_SHIFT, VSM_CONFIG_ENABLE_PROTECTION,
                           VSM_CONFIG_KNOWN)
from . import hvdef as H
from .protections import check_partition, check_mask
from .registers import (REG_VP_ASSIST_PAGE, REG_VSM_VINA, REG_VSM_CAPABILITIES, REG_VSM_CODE_PAGE_OFFSETS,
                        REG_VSM_PARTITION_CONFIG, REG_VSM_PARTITION_STATUS, REG_VSM_VP_SECURE_CONFIG_VTL0,
                        REG_VSM_VP_STATUS, set_seg, set_table)

CONTEXT_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")   # HV_INITIAL_VP_CONTEXT's order


class VtlEnables:
    """Which VTLs exist for the partition and each VP, and the VSM registers that say so."""

    def __init__(self, vsm):
        self.vsm = vsm
        m = vsm.machine
        self.machine = m
        self.plane_count = m.plane_count
        self.tlfs = m.config.vtl_boot == "tlfs"
        self.partition = 1 if self.tlfs else (1 << self.plane_count) - 1
        self.config = [0] * self.plane_count                        # VsmPartitionConfig per VTL
        self.secure_config: dict[tuple[int, int, int], int] = {}    # (vp, VTL, lower VTL) -> value
        self.vina: dict[tuple[int, int], int] = {}                  # (vp, VTL) -> HvRegisterVsmVina
        self.vina_enabled: set[tuple[int, int]] = set()
        policy = vsm.policy
        if m.config.vtl_boot not in ("pykvmm", "tlfs"):
            raise ValueError(f"--vtl-boot must be pykvmm or tlfs, not {m.config.vtl_boot!r}")
        if self.tlfs and not (m.config.hyperv is not None and m.config.hyperv.has("vsm")):
            raise ValueError("--vtl-boot tlfs needs --hyperv (hv_vsm): VTLs above 0 are enabled with "
                             "HvCallEnablePartitionVtl and HvCallEnableVpVtl")
        if self.tlfs:
            if not hasattr(policy, "enabled"):
                raise ValueError("--vtl-boot tlfs needs the vtl personality")
            policy.enabled[:] = [1] * m.config.vcpus

    def vp_enabled(self, vp: int) -> int:
        enabled = getattr(self.vsm.policy, "enabled", None)
        return enabled[vp] if enabled is not None else 1

    # -- the calls -------------------------------------------------------------------------
    def install(self, table) -> None:
        table.add(CallSpec(H.HVCALL_ENABLE_PARTITION_VTL, "HvCallEnablePartitionVtl", "vsm",
                           self._enable_partition, header_size=16))
        table.add(CallSpec(H.HVCALL_ENABLE_VP_VTL, "HvCallEnableVpVtl", "vsm", self._enable_vp,
                           header_size=ENABLE_VP_VTL_CONTEXT + VP_CONTEXT_SIZE))

    def _enable_partition(self, call, header):
        check_partition(header)
        target, flags = header[8], header[9]
        if flags & ~ENABLE_VTL_MBEC or any(header[10:16]):
            raise HvError(H.INVALID_PARAMETER, f"EnablePartitionVtl flags {flags:#x} or reserved bytes set")
        if flags & ENABLE_VTL_MBEC:
            raise HvError(H.INVALID_PARAMETER, "MBEC is not available (VsmCapabilities.MbecVtlMask = 0)")
        if target >= self.plane_count:
            raise HvError(H.INVALID_PARAMETER, f"VTL{target} is beyond the maximum VTL{self.plane_count - 1}")
        if target <= call.plane:
            raise HvError(H.ACCESS_DENIED, f"VTL{call.plane} cannot enable VTL{target} (only a higher one)")
        if self.partition >> target & 1:
            raise HvError(H.INVALID_VTL_STATE, f"VTL{target} is already enabled for the partition")
        if self.partition != (1 << target) - 1:
            raise HvError(H.INVALID_VTL_STATE, f"VTL{target} is not the next VTL to enable")
        self.partition |= 1 << target
        return None

    def _enable_vp(self, call, header):
        check_partition(header)
        vp = int.from_bytes(header[8:12], "little")
        target = header[12]
        if any(header[13:16]):
            raise HvError(H.INVALID_PARAMETER, "EnableVpVtl reserved bytes set")
        if vp >= self.machine.config.vcpus:
            raise HvError(H.INVALID_VP_INDEX, f"VP {vp} does not exist")
        if target >= self.plane_count:
            raise HvError(H.INVALID_PARAMETER, f"VTL{target} is beyond the maximum VTL{self.plane_count - 1}")
        if call.plane > target:
            raise HvError(H.ACCESS_DENIED, f"VTL{call.plane} cannot enable the lower VTL{target}")
        if not self.partition >> target & 1:
            raise HvError(H.INVALID_VTL_STATE, f"VTL{target} is not enabled for the partition")
        if self.vp_enabled(vp) >> target & 1:
            raise HvError(H.INVALID_VTL_STATE, f"VTL{target} is already enabled on VP {vp}")
        t = self.machine.threads[vp]
        v = t.plane_vcpu(target)
        apply_initial_context(v, header[ENABLE_VP_VTL_CONTEXT:ENABLE_VP_VTL_CONTEXT + VP_CONTEXT_SIZE])
        self.vsm.forget(vp, target)
        t.started_planes.add(target)          # its first entry takes this state, not the guest entry
        self.vsm.policy.enabled[vp] |= 1 << target
        return None

    def release_tlb_locks(self, vp: int, vtl: int) -> None:
        """VP ``vp`` returned from ``vtl``: the TLB locks it held there are released."""
        for lower in self.vsm.tlb.released_by_return(vp, vtl):
            self.secure_config[(vp, vtl, lower)] &= ~SECURE_CONFIG_TLB_LOCKED

    def vina_config(self, vp: int, vtl: int) -> int:
        """HvRegisterVsmVina of (vp, vtl) if VINA is enabled there, else 0."""
        return self.vina.get((vp, vtl), 0) if (vp, vtl) in self.vina_enabled else 0

    # -- VSM registers ------------------------------------------------------------------------
    def get(self, cpu, caller: int, target: int, name: int) -> int | None:
        if name == REG_VSM_CODE_PAGE_OFFSETS:
            return abi.HCPAGE_VTL_CALL | abi.HCPAGE_VTL_RETURN << 12
        if name == REG_VSM_VP_STATUS:       # the VP's, shared by its VTLs: ActiveVtl is the one running
            return (cpu.plane & 0xF) | self.vp_enabled(cpu.index) << 8
        if name == REG_VSM_PARTITION_STATUS:
            return self.partition | (self.plane_count - 1) << 16
        if name == REG_VSM_CAPABILITIES:
            return 0
        if name == REG_VSM_PARTITION_CONFIG:
            return self.config[target] if target else None
        if name == REG_VP_ASSIST_PAGE:
            hv = self.machine.hyperv
            return hv.vp(cpu.index, target).vp_assist if hv is not None else None
        if name == REG_VSM_VINA:
            return self.vina.get((cpu.index, target), 0)
        lower = name - REG_VSM_VP_SECURE_CONFIG_VTL0
        if 0 <= lower < 16 and lower < target:
            return self.secure_config.get((cpu.index, target, lower), 0)
        return None

    def set(self, cpu, caller: int, target: int, name: int, value: int) -> bool:
        if name == REG_VSM_PARTITION_CONFIG and target:
            self._set_partition_config(target, value)
            return True
        if name == REG_VSM_VINA:
            if value & ~(0xFF | VINA_ENABLED | VINA_AUTO_RESET | VINA_AUTO_EOI):
                raise HvError(H.INVALID_PARAMETER, f"VsmVina {value:#x} has reserved bits")
            if value & VINA_ENABLED and (value & 0xFF) < 0x10:
                raise HvError(H.INVALID_PARAMETER, f"VsmVina vector {value & 0xFF:#x} is below 16")
            self.vina[(cpu.index, target)] = value
            if value & VINA_ENABLED:
                self.vina_enabled.add((cpu.index, target))
            else:
                self.vina_enabled.discard((cpu.index, target))
            return True
        if name == REG_VP_ASSIST_PAGE and self.machine.hyperv is not None:
            if value & 1 and (value & ~0xFFF) + 0x1000 > self.machine.memory.size:
                raise HvError(H.INVALID_PARAMETER, f"VP assist page {value & ~0xFFF:#x} is outside guest memory")
            vp = self.machine.hyperv.vp(cpu.index, target)
            self.machine.hyperv.place_overlay("vp_assist", cpu.index, target, vp.vp_assist, value)
            vp.vp_assist = value
            return True
        lower = name - REG_VSM_VP_SECURE_CONFIG_VTL0
        if 0 <= lower < 16 and lower < target:
            if value & ~(SECURE_CONFIG_MBEC | SECURE_CONFIG_TLB_LOCKED):
                raise HvError(H.INVALID_PARAMETER, f"VsmVpSecureVtlConfig {value:#x} has reserved bits")
            if value & SECURE_CONFIG_MBEC:
                raise HvError(H.INVALID_PARAMETER, "MBEC is not available")
            self.secure_config[(cpu.index, target, lower)] = value
            self.vsm.tlb.set(cpu.index, target, lower, bool(value & SECURE_CONFIG_TLB_LOCKED))
            return True
        return False

    def _set_partition_config(self, vtl: int, value: int) -> None:
        old = self.config[vtl]
        if value & ~VSM_CONFIG_KNOWN:
            raise HvError(H.INVALID_PARAMETER, f"VsmPartitionConfig {value:#x} has bits pykvmm does not know")
        mask = value >> VSM_CONFIG_DEFAULT_MASK_SHIFT & H.MAP_GPA_MASK
        if old & VSM_CONFIG_ENABLE_PROTECTION:
            old_mask = old >> VSM_CONFIG_DEFAULT_MASK_SHIFT & H.MAP_GPA_MASK
            if not value & VSM_CONFIG_ENABLE_PROTECTION or mask != old_mask:
                raise HvError(H.INVALID_PARAMETER, "EnableVtlProtection and DefaultVtlProtectionMask are "
                                                   "write-once")
        elif value & VSM_CONFIG_ENABLE_PROTECTION:
            check_mask(mask)
            try:
                self.vsm.protections.set_default(vtl, mask)
            except KvmError as e:
                self.vsm.protections.default_mask.pop(vtl, None)
                raise HvError(H.INVALID_PARAMETER, f"default protection mask {mask:#x}: {e}") from None
        self.config[vtl] = value


def apply_initial_context(v, ctx: bytes) -> None:
    """HV_INITIAL_VP_CONTEXT -> the vCPU's registers (KVM refusing the state -> INVALID_PARAMETER)."""
    rip, rsp, rflags = struct.unpack_from("<QQQ", ctx, VP_CONTEXT_RIP)
    efer, cr0, cr3, cr4, pat = struct.unpack_from("<QQQQQ", ctx, VP_CONTEXT_EFER)
    if not cr0 & arch.CR0_PE or not cr0 & arch.CR0_PG:
        raise HvError(H.INVALID_PARAMETER, f"initial CR0 {cr0:#x}: VTLs above 0 cannot run in real mode "
                                           f"or without paging")
    try:
        s = v.get_sregs()
        for i, name in enumerate(CONTEXT_SEGMENTS):
            off = VP_CONTEXT_CS + 16 * i
            set_seg(getattr(s, name), ctx[off:off + 16])
        set_table(s.idt, ctx[VP_CONTEXT_IDTR:VP_CONTEXT_IDTR + 16])
        set_table(s.gdt, ctx[VP_CONTEXT_GDTR:VP_CONTEXT_GDTR + 16])
        s.efer, s.cr0, s.cr3, s.cr4, s.cr2, s.cr8 = efer, cr0, cr3, cr4, 0, 0
        v.set_sregs(s)
        r = v.get_regs()
        for field in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
                      "r13", "r14", "r15"):
            setattr(r, field, 0)
        r.rip, r.rsp, r.rflags = rip, rsp, rflags | arch.RFLAGS_FIXED
        v.set_regs(r)
        v.set_msrs({arch.MSR_IA32_CR_PAT: pat})
    except KvmError as e:
        raise HvError(H.INVALID_PARAMETER, f"initial VP context refused by KVM: {e}") from None
