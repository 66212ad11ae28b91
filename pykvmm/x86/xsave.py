"""The XSAVE image layout (standard format) and the FPU-state helpers built on it.

Planes share x87/SSE/AVX state but never PKRU (the KVM planes RFC's shared-FPU mode, and the
TLFS's VTL rules), so both the planes backends and the VTL personality move XSAVE images
with the destination's PKRU kept.
"""

from __future__ import annotations

from ..kvm import Vcpu
from ..uapi import ffi

XSTATE_BV_OFFSET = 512          # XSTATE_BV in the XSAVE header
XSTATE_X87_SSE = 0b11
XFEATURE_PKRU = 9
_FXSAVE_ST = 32                 # ST0-7 in the legacy (FXSAVE) area
_FXSAVE_XMM = 160               # XMM0-15


def pkru_xsave_offset(cpuid) -> int | None:
    """Byte offset of PKRU in the standard-format XSAVE image (CPUID 0xD.9 EBX), or None
    when ``cpuid`` (a struct kvm_cpuid2) offers no PKU."""
    pku = off = None
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 7 and e.index == 0:
            pku = bool(e.ecx & (1 << 3))
        elif e.function == 0xD and e.index == 9 and e.eax >= 4:
            off = e.ebx
    return off if pku else None


def fpu_image(v: Vcpu):
    """The vCPU's XSAVE image with the legacy x87/SSE area taken from KVM_GET_FPU and marked
    present in XSTATE_BV: state written with KVM_SET_FPU is not marked there, so KVM_GET_XSAVE
    (and the next XRSTOR) would treat it as init state and lose it."""
    image = v.get_xsave()
    legacy = v.get_fpu()
    raw = ffi.cast("uint8_t *", image.region)
    ffi.cast("uint16_t *", raw)[0] = legacy.fcw
    ffi.cast("uint16_t *", raw + 2)[0] = legacy.fsw
    raw[4] = legacy.ftwx
    ffi.cast("uint16_t *", raw + 6)[0] = legacy.last_opcode
    ffi.cast("uint64_t *", raw + 8)[0] = legacy.last_ip
    ffi.cast("uint64_t *", raw + 16)[0] = legacy.last_dp
    ffi.cast("uint32_t *", raw + 24)[0] = legacy.mxcsr
    ffi.memmove(raw + _FXSAVE_ST, legacy.fpr, 128)
    ffi.memmove(raw + _FXSAVE_XMM, legacy.xmm, 256)
    ffi.cast("uint64_t *", raw + XSTATE_BV_OFFSET)[0] |= XSTATE_X87_SSE
    return image


def merge_pkru(image, mine: bytes, offset: int) -> None:
    """Give the XSAVE ``image`` (struct kvm_xsave) the PKRU of ``mine`` (the destination's
    image, as bytes): the 4 PKRU bytes at ``offset`` and XSTATE_BV bit 9."""
    region = ffi.cast("uint8_t *", image.region)
    ffi.memmove(region + offset, mine[offset:offset + 4], 4)
    bv = ffi.cast("uint64_t *", region + XSTATE_BV_OFFSET)
    mine_bv = int.from_bytes(mine[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8], "little")
    bv[0] = (bv[0] & ~(1 << XFEATURE_PKRU)) | (mine_bv & (1 << XFEATURE_PKRU))


def copy_fpu_state(src: Vcpu, dst: Vcpu, pkru_offset: int | None) -> None:
    """Shared-FPU emulation: dst takes src's x87/SSE/AVX state but keeps its own PKRU."""
    image = fpu_image(src)
    if pkru_offset is not None:
        merge_pkru(image, bytes(ffi.buffer(dst.get_xsave().region)), pkru_offset)
    dst.set_xsave(image)
