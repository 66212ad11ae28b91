"""Local APIC register layout (as KVM_GET_LAPIC returns it), ICR and MSI encodings."""

import struct
from dataclasses import dataclass

from .arch import LVT_MASKED, LVT_TIMER_TSC_DEADLINE

# byte offsets in struct kvm_lapic_state.regs (xAPIC MMIO layout)
APIC_ID = 0x20
APIC_TPR = 0x80
APIC_PPR = 0xA0
APIC_SPIV = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ICR_LO = 0x300
APIC_ICR_HI = 0x310
APIC_LVT_TIMER = 0x320
APIC_LVT_ERROR = 0x370        # the six LVT entries: timer, thermal, perf, LINT0, LINT1, error
APIC_TIMER_INITIAL = 0x380
APIC_TIMER_CURRENT = 0x390
APIC_TIMER_DIVIDE = 0x3E0
LVT_TIMER_MODE = 3 << 17
# KVM's LAPIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS_DEFAULT) unless the VMM changes it with
# KVM_CAP_X86_APIC_BUS_CYCLES_NS, which pykvmm does not.
APIC_BUS_CYCLE_NS = 1

DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_NMI = 4
DM_INIT = 5
DM_STARTUP = 6
DELIVERY_MODE_NAMES = {0: "fixed", 1: "lowest", 2: "smi", 4: "nmi", 5: "init", 6: "startup", 7: "extint"}

SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = 0, 1, 2, 3


@dataclass(frozen=True)
class Icr:
    """An x2APIC ICR value (MSR 0x830): 32-bit destination in the high half."""
    vector: int
    delivery_mode: int = DM_FIXED
    logical: bool = False
    level: bool = True
    trigger_level: bool = False
    shorthand: int = SH_NONE
    destination: int = 0

    def encode(self) -> int:
        lo = (self.vector & 0xFF) | (self.delivery_mode & 7) << 8 | int(self.logical) << 11 \
            | int(self.level) << 14 | int(self.trigger_level) << 15 | (self.shorthand & 3) << 18
        return (self.destination & 0xFFFFFFFF) << 32 | lo

    @classmethod
    def decode(cls, value: int) -> "Icr":
        lo = value & 0xFFFFFFFF
        return cls(vector=lo & 0xFF, delivery_mode=(lo >> 8) & 7, logical=bool(lo >> 11 & 1),
                   level=bool(lo >> 14 & 1), trigger_level=bool(lo >> 15 & 1),
                   shorthand=(lo >> 18) & 3, destination=value >> 32)


def msi_message(dest_apic_id: int, vector: int, delivery_mode: int = DM_FIXED) -> tuple[int, int]:
    """(address, data) of an MSI to one APIC ID, physical destination, edge.

    IDs above 255 put their high 24 bits in address_hi, as KVM reads them with
    KVM_X2APIC_API_USE_32BIT_IDS (address_lo[19:12] | address_hi[31:8])."""
    address = 0xFEE00000 | (dest_apic_id & 0xFF) << 12 | (dest_apic_id & 0xFFFFFF00) << 32
    data = (vector & 0xFF) | (delivery_mode & 7) << 8
    return address, data


MSI_BROADCAST = (0xFF, 0xFFFFFFFF)     # xAPIC and x2APIC broadcast destinations


def msi_destination(address: int) -> int:
    """The destination APIC ID of an MSI address, as msi_message() encodes it and KVM reads
    it with KVM_X2APIC_API_USE_32BIT_IDS: address_lo[19:12] | address_hi[31:8] << 8 (the
    high byte of a 64-bit ``address`` is address_hi)."""
    return (address >> 12) & 0xFF | (address >> 32) & 0xFFFFFF00


_EIGHT_WORDS = struct.Struct("<" + "I12x" * 7 + "I")     # IRR/ISR/TMR: 32 bits every 16 bytes


def _bits(regs: bytes, base: int) -> list[int]:
    out = []
    for word, val in enumerate(_EIGHT_WORDS.unpack_from(regs, base)):
        while val:
            low = val & -val
            out.append(word * 32 + low.bit_length() - 1)
            val ^= low
    return out


def irr_vectors(regs: bytes) -> list[int]:
    return _bits(regs, APIC_IRR)


def isr_vectors(regs: bytes) -> list[int]:
    return _bits(regs, APIC_ISR)


def irr_pending(regs: bytes) -> bool:
    return any(regs[APIC_IRR + w * 0x10:APIC_IRR + w * 0x10 + 4] != b"\0\0\0\0" for w in range(8))


def reg32(regs: bytes, offset: int) -> int:
    return int.from_bytes(regs[offset:offset + 4], "little")


def could_interrupt(regs: bytes, nmi_only: bool = False) -> bool:
    """Whether this LAPIC has or may raise an interrupt by itself: a vector in IRR or an armed
    timer (``nmi_only``: only what is delivered as an NMI, for a CPU with interrupts off)."""
    if not software_enabled(regs):
        return False                          # every LVT entry is masked, fixed IPIs dropped
    lvts = [reg32(regs, off) for off in range(APIC_LVT_TIMER, APIC_LVT_ERROR + 0x10, 0x10)]
    if nmi_only:
        return any(not lvt & LVT_MASKED and (lvt >> 8) & 7 == DM_NMI for lvt in lvts)
    timer = lvts[0]
    return irr_pending(regs) or (not timer & LVT_MASKED and reg32(regs, APIC_TIMER_INITIAL) != 0)


def software_enabled(regs: bytes) -> bool:
    """SVR bit 8: a software-disabled LAPIC accepts no fixed interrupts (SDM 10.4.7.2)."""
    return bool(reg32(regs, APIC_SPIV) & 0x100)


def _highest(words) -> int | None:
    """The highest vector set in eight IRR/ISR words (word 0 first), None if none is."""
    for i in range(7, -1, -1):
        if words[i]:
            return i * 32 + words[i].bit_length() - 1
    return None


def highest_irr(regs: bytes) -> int | None:
    return _highest(_EIGHT_WORDS.unpack_from(regs, APIC_IRR))


def _ppr_class(tpr: int, isr_words) -> int:
    highest = _highest(isr_words)
    return max((tpr >> 4) & 0xF, 0 if highest is None else highest >> 4)


def priority_class(regs: bytes) -> int:
    """The processor-priority class (PPR[7:4]): the higher of TPR's class and the class of the
    highest vector in service. A fixed interrupt is delivered only when its class is above it."""
    return _ppr_class(reg32(regs, APIC_TPR), _EIGHT_WORDS.unpack_from(regs, APIC_ISR))


def deliverable_irr(regs: bytes, also: int | None = None) -> int | None:
    """The highest pending vector if the LAPIC would deliver it now (class above PPR), else None.
    ``also``: a vector pending besides the IRR (a timer expiry KVM has not put there yet)."""
    vector = highest_irr(regs)
    if also is not None and (vector is None or also > vector):
        vector = also
    return vector if vector is not None and vector >> 4 > priority_class(regs) else None


def timer_armed_lvt(regs: bytes) -> int | None:
    """The LVT timer entry if it is unmasked (the LAPIC software-enabled), else None: only then
    can this LAPIC's timer raise an interrupt."""
    seen = pending(regs)
    return None if seen is None else seen[2]


# TPR, SVR, ISR and IRR (8 words each, 16 bytes apart), LVT timer: what pending() reads
_PENDING = struct.Struct("<" + f"{APIC_TPR}xI{APIC_SPIV - APIC_TPR - 4}xI{APIC_ISR - APIC_SPIV - 4}x"
                         + "I12x" * 7 + f"I{APIC_IRR - APIC_ISR - 0x74}x" + "I12x" * 7
                         + f"I{APIC_LVT_TIMER - APIC_IRR - 0x74}xI")


def pending(regs: bytes) -> tuple[int | None, int, int | None] | None:
    """What a look for interrupts needs of a LAPIC (planes/softswitch.py scans after every
    plane switch), from one unpack: None if it is software-disabled (it drops fixed interrupts
    and every LVT entry is masked), else (the highest IRR vector or None, the PPR class as
    priority_class(), the LVT timer entry if unmasked or None, as timer_armed_lvt())."""
    tpr, svr, *words, lvt = _PENDING.unpack_from(regs)
    if not svr & 0x100:
        return None
    return _highest(words[8:]), _ppr_class(tpr, words), None if lvt & LVT_MASKED else lvt


def timer_remaining_ns(regs: bytes) -> int | None:
    """Nanoseconds to the next expiry of a one-shot or periodic timer from the current count
    (TMCCT, which KVM_GET_LAPIC computes at the read) and the divide configuration; None when
    it does not count (a one-shot that expired, TMICT 0) or is in TSC-deadline mode."""
    if reg32(regs, APIC_LVT_TIMER) & LVT_TIMER_MODE == LVT_TIMER_TSC_DEADLINE:
        return None
    count = reg32(regs, APIC_TIMER_CURRENT)
    if not count:
        return None
    dcr = reg32(regs, APIC_TIMER_DIVIDE)
    divide = 1 << ((((dcr & 3) | (dcr & 8) >> 1) + 1) & 7)     # SDM 11.5.4: 0b1011 is 1
    return count * divide * APIC_BUS_CYCLE_NS
