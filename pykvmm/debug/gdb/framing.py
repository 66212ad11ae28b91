"""GDB remote serial protocol framing: ``$payload#cs`` packets, acks, binary escapes, ^C."""

from __future__ import annotations

import select
import socket

PACKET_SIZE = 0x4000


class Disconnected(Exception):
    """gdb hung up (or the socket failed)."""


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape_binary(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in (0x23, 0x24, 0x7D, 0x2A):   # # $ } *
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape_binary(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append((next(it, 0) ^ 0x20) if b == 0x7D else b)
    return bytes(out)


class PacketConnection:
    """One gdb connection: sends framed packets, buffers and unframes what gdb sends."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.no_ack = False
        self._buf = b""
        sock.setblocking(True)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            raise Disconnected() from None

    def send(self, payload: str | bytes) -> None:
        if isinstance(payload, str):
            payload = payload.encode("latin-1")
        self.send_raw(b"$" + payload + b"#%02x" % checksum(payload))

    def console(self, text: str) -> None:
        """An ``O`` packet: text gdb prints on its console."""
        self.send("O" + text.encode().hex())

    def recv(self, timeout: float) -> bool:
        """Read what gdb sent within ``timeout`` seconds; False if nothing came."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            data = self.sock.recv(65536)
        except OSError:
            raise Disconnected() from None
        if not data:
            raise Disconnected()
        self._buf += data
        return True

    def next_packet(self):
        """A complete packet's payload from the buffer, b"\\x03" for an interrupt, or None."""
        buf = self._buf
        while buf:
            c = buf[0]
            if c == 0x03:
                self._buf = buf[1:]
                return b"\x03"
            if c != 0x24:            # '+', '-' and noise outside packets
                buf = buf[1:]
                continue
            end = buf.find(b"#")
            if end < 0 or len(buf) < end + 3:
                break
            payload = buf[1:end]
            csum = buf[end + 1:end + 3]
            buf = buf[end + 3:]
            self._buf = buf
            try:
                ok = int(csum, 16) == checksum(payload)
            except ValueError:
                ok = False
            if not self.no_ack:
                self.send_raw(b"+" if ok else b"-")
            if ok:
                return payload
            continue
        self._buf = buf
        return None
