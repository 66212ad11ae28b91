"""TLFS "Inter-Partition Communication": connections and ports, HvCallPostMessage and
HvCallSignalEvent.

A connection (partition-wide id, 24 bits) leads to a port: a message port (target VP,
VTL and SINT) or an event port (target VP, VTL, SINT and a base flag number, one flag).
Guests cannot create ports (that is the parent's job): QEMU's hyperv-testdev
(``testdev.py``) does it, as the kvm-unit-tests expect.

HvCallPostMessage (0x5C, memory input only: 256 bytes): ConnectionId u32 @0, padding
@4, MessageType u32 @8, PayloadSize u32 @12, Payload @16. PayloadSize > 240, a MessageType
of 0 or with bit 31 (the hypervisor's types) -> INVALID_PARAMETER; ConnectionId bits 31:24
-> INVALID_HYPERCALL_INPUT; no such message connection -> INVALID_CONNECTION_ID. Each
port buffers one message: if the target slot is busy the message waits there (success)
and goes in at the guest's EOM; a second post while one waits -> INSUFFICIENT_BUFFERS.

HvCallSignalEvent (0x5D, fast or memory, 8 bytes): ConnectionId u32, FlagNumber u16,
RsvdZ u16. Reserved bits -> INVALID_HYPERCALL_INPUT; no such event connection ->
INVALID_CONNECTION_ID; FlagNumber beyond the port's flag count -> INVALID_PARAMETER.
The flag is the port's base flag + FlagNumber; only a newly set flag asserts the SINT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import tlfs as T
from .hypercall import CallSpec, HvError

MESSAGE_PORT, EVENT_PORT = "message", "event"


@dataclass
class Port:
    kind: str
    vcpu: int
    plane: int
    sint: int
    flag_base: int = 0
    flag_count: int = 1
    staged: tuple | None = None     # (type, payload) waiting for a free slot


class Messaging:
    def __init__(self, hv):
        self.hv = hv
        self.connections: dict[int, Port] = {}
        self.counts = {"posted": 0, "staged": 0, "signalled": 0}

    def connect(self, conn_id: int, port: Port) -> None:
        self.connections[conn_id & T.CONNECTION_ID_MASK] = port

    def disconnect(self, conn_id: int) -> None:
        self.connections.pop(conn_id & T.CONNECTION_ID_MASK, None)

    def _port(self, conn_id: int, kind: str) -> Port:
        if conn_id & ~T.CONNECTION_ID_MASK:
            raise HvError(T.INVALID_HYPERCALL_INPUT, f"connection id {conn_id:#x} has reserved bits")
        port = self.connections.get(conn_id)
        if port is None or port.kind != kind:
            raise HvError(T.INVALID_CONNECTION_ID, f"no {kind} connection {conn_id:#x}")
        return port

    def post(self, call, header: bytes):
        conn_id, _, msg_type, size = struct.unpack_from("<IIII", header)
        if size > T.MESSAGE_PAYLOAD_MAX:
            raise HvError(T.INVALID_PARAMETER, f"payload size {size} > {T.MESSAGE_PAYLOAD_MAX}")
        if msg_type == T.HVMSG_NONE or msg_type & T.HVMSG_RESERVED_TYPES:
            raise HvError(T.INVALID_PARAMETER, f"message type {msg_type:#x} is reserved")
        port = self._port(conn_id, MESSAGE_PORT)
        if port.staged is not None:
            raise HvError(T.INSUFFICIENT_BUFFERS, f"connection {conn_id:#x} already holds an undelivered message")
        port.staged = (msg_type, header[16:16 + size], conn_id)
        self.counts["posted"] += 1
        self._try(port)
        return None

    def _try(self, port: Port) -> None:
        msg_type, payload, sender = port.staged
        vp = self.hv.vp(port.vcpu, port.plane)
        if self.hv.synic.deliver(vp, port.sint, msg_type, payload, sender):
            port.staged = None
        else:
            self.counts["staged"] += 1

    def retry(self, vp) -> None:
        for port in self.connections.values():
            if port.staged is not None and port.vcpu == vp.index and port.plane == vp.plane:
                self._try(port)

    def signal(self, call, header: bytes):
        conn_id, flag, rsvd = struct.unpack_from("<IHH", header)
        if rsvd:
            raise HvError(T.INVALID_HYPERCALL_INPUT, "SignalEvent RsvdZ bits 63:48 set")
        port = self._port(conn_id, EVENT_PORT)
        if flag >= port.flag_count:
            raise HvError(T.INVALID_PARAMETER, f"flag number {flag} >= the port's {port.flag_count} flags")
        self.counts["signalled"] += 1
        self.hv.synic.signal_event(self.hv.vp(port.vcpu, port.plane), port.sint, port.flag_base + flag)
        return None

    def summary(self) -> dict:
        return dict(self.counts)


def install(hv) -> None:
    m = hv.messaging = Messaging(hv)
    hv.table.add(CallSpec(T.HVCALL_POST_MESSAGE, "HvCallPostMessage", "synic", m.post, header_size=256))
    hv.table.add(CallSpec(T.HVCALL_SIGNAL_EVENT, "HvCallSignalEvent", "synic", m.signal, header_size=8))
