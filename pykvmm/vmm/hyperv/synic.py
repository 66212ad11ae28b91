"""TLFS "Synthetic Interrupt Controller (SynIC)": SCONTROL, SVERSION, SIEFP, SIMP, EOM and
SINT0-15 of every VP and VTL, message and event-flag delivery into the guest's pages, and
SINT interrupts through the LAPIC of the VTL that owns the SynIC.

MSRs. SCONTROL (Enable 0; 63:1 RsvdP), SIEFP/SIMP (Enable 0; 11:1 RsvdP; GPA 63:12),
SINTx (Vector 7:0; Masked 16; AutoEOI 17; Polling 18; 15:8 and 63:19 RsvdP; reset value
Masked): RsvdP bits are kept as written. An unmasked SINT with a vector below 16 #GPs, so
does a page outside guest memory. SVERSION reads 1 and is read-only; EOM reads 0 and any
write acknowledges the end of a message.

Messages. A message is written into the SINT's 256-byte slot of the SIMP page only when
that slot's MessageType is HVMSG_NONE: payload and header first, the type last. A busy
slot gets MessagePending (header byte 5, bit 0) and the sender keeps its message until the
guest writes EOM. Event flags: SignalEvent sets bit ``flag`` of the SINT's 256-byte slot
of the SIEF page; only a 0 -> 1 change interrupts. Nothing is delivered while SCONTROL or
the page is disabled. The SINT interrupt is an edge MSI of the SINT's vector to the VP's
LAPIC in that VTL; not sent while the SINT is masked or polled. AutoEOI: see
``HyperV.service``.
"""

from __future__ import annotations

import struct
import threading

from . import tlfs as T
from .partition import MsrFault


_BARRIER = threading.Lock()


def _full_barrier() -> None:
    """A full memory barrier from Python: taking a lock is a LOCKed read-modify-write."""
    with _BARRIER:
        pass


class SynIc:
    __slots__ = ("scontrol", "siefp", "simp", "sints")

    def __init__(self):
        self.scontrol = 0
        self.siefp = 0
        self.simp = 0
        self.sints = [T.SINT_MASKED] * T.SINT_COUNT

    @property
    def enabled(self) -> bool:
        return bool(self.scontrol & T.SCONTROL_ENABLE)


class SynIcUnit:
    """Delivery into the SynICs of one machine (the caller holds hv.lock)."""

    def __init__(self, hv):
        self.hv = hv
        self.counts = {"messages": 0, "messages_busy": 0, "events": 0, "sints": 0}

    def _page(self, reg: int) -> int | None:
        return reg & ~0xFFF if reg & T.PAGE_ENABLE else None

    def deliver(self, vp, sint: int, msg_type: int, payload: bytes, sender: int = 0) -> bool:
        s = vp.synic
        page = self._page(s.simp)
        if not s.enabled or page is None:
            return False
        mem = self.hv.memory
        slot = page + sint * T.MESSAGE_SIZE
        if mem.u32(slot + T.MSG_HEADER_TYPE) != T.HVMSG_NONE:
            flags = mem.read(slot + T.MSG_HEADER_FLAGS, 1)[0]
            mem.write(slot + T.MSG_HEADER_FLAGS, bytes([flags | T.MSG_FLAG_PENDING]))
            # The guest frees a slot by storing HVMSG_NONE, then (after a barrier) reading
            # MessagePending. Mirror it: our store of the flag must be visible before we look
            # at the type again, or both sides miss each other and the message waits forever.
            _full_barrier()
            if mem.u32(slot + T.MSG_HEADER_TYPE) != T.HVMSG_NONE:
                self.counts["messages_busy"] += 1
                return False
        mem.write(slot + T.MSG_PAYLOAD, payload.ljust(T.MESSAGE_PAYLOAD_MAX, b"\0"))
        mem.write(slot + T.MSG_HEADER_PAYLOAD_SIZE, struct.pack("<BBHQ", len(payload), 0, 0, sender))
        mem.write_u32(slot + T.MSG_HEADER_TYPE, msg_type)
        self.counts["messages"] += 1
        self.assert_sint(vp, sint)
        return True

    def signal_event(self, vp, sint: int, flag: int) -> bool:
        """Set event flag ``flag`` of ``sint``; True if it was clear (and the SINT fired)."""
        s = vp.synic
        page = self._page(s.siefp)
        if not s.enabled or page is None:
            return False
        mem = self.hv.memory
        addr = page + sint * (T.EVENT_FLAGS_PER_SINT // 8) + flag // 8
        old = mem.read(addr, 1)[0]
        bit = 1 << (flag % 8)
        if old & bit:
            return False
        mem.write(addr, bytes([old | bit]))
        self.counts["events"] += 1
        self.assert_sint(vp, sint)
        return True

    def assert_sint(self, vp, sint: int) -> bool:
        s = vp.synic
        reg = s.sints[sint]
        if not s.enabled or reg & (T.SINT_MASKED | T.SINT_POLLING):
            return False
        self.counts["sints"] += 1
        return self.hv.assert_vector(vp.index, vp.plane, reg & 0xFF, auto_eoi=bool(reg & T.SINT_AUTO_EOI))

    def retry(self, vp) -> None:
        """Something may have freed a slot or enabled delivery: let the senders try again."""
        self.hv.messaging.retry(vp)
        self.hv.timers.retry(vp)

    def summary(self) -> dict:
        return dict(self.counts)


def install(hv) -> None:
    unit = hv.synic = SynIcUnit(hv)
    for vp in hv.vps.values():
        vp.synic = SynIc()
    mem_size = hv.memory.size

    def check_page(name, value):
        if value & T.PAGE_ENABLE and (value & ~0xFFF) + 0x1000 > mem_size:
            raise MsrFault(f"{name} page {value & ~0xFFF:#x} is outside guest memory")

    def field_msr(index, name, attr):
        def read(vp):
            return getattr(vp.synic, attr)

        def write(vp, value):
            if attr != "scontrol":
                check_page(name, value)
                hv.place_overlay(attr, vp.index, vp.plane, getattr(vp.synic, attr), value)
            setattr(vp.synic, attr, value)
            unit.retry(vp)
        hv.add_msr(index, name, read, write, feature="synic")

    field_msr(T.MSR_SCONTROL, "HV_X64_MSR_SCONTROL", "scontrol")
    field_msr(T.MSR_SIEFP, "HV_X64_MSR_SIEFP", "siefp")
    field_msr(T.MSR_SIMP, "HV_X64_MSR_SIMP", "simp")
    hv.add_msr(T.MSR_SVERSION, "HV_X64_MSR_SVERSION", lambda vp: T.SVERSION, None, feature="synic")

    def write_eom(vp, value):
        unit.retry(vp)
    hv.add_msr(T.MSR_EOM, "HV_X64_MSR_EOM", lambda vp: 0, write_eom, feature="synic")

    for i in range(T.SINT_COUNT):
        def read_sint(vp, i=i):
            return vp.synic.sints[i]

        def write_sint(vp, value, i=i):
            if not value & T.SINT_MASKED and (value & 0xFF) < 0x10:
                raise MsrFault(f"SINT{i} vector {value & 0xFF:#x} is below 16 and not masked")
            vp.synic.sints[i] = value
            unit.retry(vp)
        hv.add_msr(T.MSR_SINT0 + i, f"HV_X64_MSR_SINT{i}", read_sint, write_sint, feature="synic")
