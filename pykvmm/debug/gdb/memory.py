"""Guest memory as gdb sees it (guest-virtual addresses through one plane's page tables) and the
breakpoints and watchpoints that live in it: int3 bytes for software breakpoints, the four debug
registers for hardware breakpoints and watchpoints."""

from __future__ import annotations

DR7_LEN = {1: 0, 2: 1, 8: 2, 4: 3}
DR7_RW = {"exec": 0, "swexec": 0, "write": 1, "access": 3}
HW_SLOTS = 4
# "E.<errno>.<text>": gdb prints the text ("Remote failure reply: ...") where it reads it (hbreak)
NO_FREE_SLOT = "E.28.all 4 debug registers (DR0-DR3) are in use by other breakpoints or watchpoints"


class MemoryAndBreakpoints:
    def __init__(self, memory, caps):
        self.memory = memory
        self.caps = caps
        self.sw_bps: dict[int, list] = {}       # gva -> [gpa, original byte, refs]
        self.hw: list = [None] * HW_SLOTS       # slot -> (kind, addr, length)

    # -- memory ----------------------------------------------------------------------------
    def translate(self, v, addr: int) -> int | None:
        """The guest-physical address of ``addr`` in KVM vCPU ``v``'s page tables, if in RAM."""
        gpa = v.translate(addr)
        if gpa is None or gpa >= self.memory.size:
            return None
        return gpa

    def read(self, v, addr: int, length: int, plane: int = 0) -> bytes:
        """Up to ``length`` bytes at guest-virtual ``addr`` (fewer where the mapping ends), as
        ``plane`` (whose KVM vCPU ``v`` is) sees guest memory."""
        memory = self.memory.seen_by(plane)
        out = bytearray()
        a = addr
        while len(out) < length:
            chunk = min(length - len(out), 0x1000 - (a & 0xFFF))
            gpa = self.translate(v, a)
            if gpa is None or gpa + chunk > self.memory.size:
                break
            out += memory.read(gpa, chunk)
            a += chunk
        for gva, (_, orig, _) in self.sw_bps.items():     # show the original bytes, not our int3
            if addr <= gva < addr + len(out):
                out[gva - addr] = orig
        return bytes(out)

    def write(self, v, addr: int, data: bytes, plane: int = 0) -> bool:
        """Write ``data`` at guest-virtual ``addr``: all of it, or nothing if a page is unmapped."""
        memory = self.memory.seen_by(plane)
        spans = []
        a, off = addr, 0
        while off < len(data):
            chunk = min(len(data) - off, 0x1000 - (a & 0xFFF))
            gpa = self.translate(v, a)
            if gpa is None or gpa + chunk > self.memory.size:
                return False
            spans.append((gpa, a, data[off:off + chunk]))
            a += chunk
            off += chunk
        for gpa, gva, chunk in spans:
            buf = bytearray(chunk)
            for bp, entry in self.sw_bps.items():
                if gva <= bp < gva + len(buf):
                    entry[1] = buf[bp - gva]          # the new original byte; keep our int3
                    buf[bp - gva] = 0xCC
            memory.write(gpa, bytes(buf))
        return True

    # -- breakpoints and watchpoints ---------------------------------------------------------
    def change(self, insert: bool, args: str, v) -> str:
        """A Z/z packet's reply; ``args`` is what follows the letter, ``v`` the selected vCPU."""
        parts = args.split(";")[0].split(",")
        kind, addr, length = int(parts[0]), int(parts[1], 16), int(parts[2], 16)
        if kind == 0 and self.caps.sw_bp:
            return self._sw_break(insert, addr, v)
        if kind in (0, 1) and insert and not self.caps.exec_bp:
            return ("E.01.this host's KVM never reports execution breakpoints (probed at start: neither "
                    "int3 nor a debug register stopped the guest); use stepi or Ctrl-C")
        if kind == 0:
            return self._hw_slot(insert, "swexec", addr, 1)
        if kind == 1:
            return self._hw_slot(insert, "exec", addr, 1)
        if kind in (2, 4):
            if not self.caps.watch:
                return ("E.01.this host's KVM ignores data breakpoints (probed at start: a watched store "
                        "ran on); for software watchpoints: set can-use-hw-watchpoints 0")
            wkind = "write" if kind == 2 else "access"
            pieces = []
            a, n = addr, length
            while n > 0:
                size = next(s for s in (8, 4, 2, 1) if a % s == 0 and s <= n)
                pieces.append((a, size))
                a, n = a + size, n - size
            if insert:
                if sum(1 for h in self.hw if h is None) < len(pieces):
                    return NO_FREE_SLOT
                for a, size in pieces:
                    self._hw_slot(True, wkind, a, size)
                return "OK"
            for a, size in pieces:
                self._hw_slot(False, wkind, a, size)
            return "OK"
        return ""        # Z3: x86 has no read-only data breakpoint

    def _hw_slot(self, insert: bool, kind: str, addr: int, length: int) -> str:
        entry = (kind, addr, length)
        if insert:
            if entry in self.hw:
                return "OK"
            try:
                slot = self.hw.index(None)
            except ValueError:
                return NO_FREE_SLOT
            self.hw[slot] = entry
            return "OK"
        if entry in self.hw:
            self.hw[self.hw.index(entry)] = None
        return "OK"

    def _sw_break(self, insert: bool, addr: int, v) -> str:
        if insert:
            if addr in self.sw_bps:
                self.sw_bps[addr][2] += 1
                return "OK"
            gpa = self.translate(v, addr)
            if gpa is None:
                return "E14"
            orig = self.memory.read(gpa, 1)[0]
            self.memory.write(gpa, b"\xCC")
            self.sw_bps[addr] = [gpa, orig, 1]
            return "OK"
        entry = self.sw_bps.get(addr)
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                self.memory.write(entry[0], bytes([entry[1]]))
                del self.sw_bps[addr]
        return "OK"

    def remove_all(self) -> None:
        for gpa, orig, _ in self.sw_bps.values():
            self.memory.write(gpa, bytes([orig]))
        self.sw_bps.clear()
        self.hw = [None] * HW_SLOTS

    def debugregs(self) -> tuple[int, list[int]]:
        """DR7 and DR0-DR7 for KVM_SET_GUEST_DEBUG from the hardware slots."""
        dr = [0] * 8
        dr7 = 0
        for slot, hw in enumerate(self.hw):
            if hw is None:
                continue
            kind, addr, length = hw
            dr[slot] = addr
            dr7 |= 1 << (2 * slot)
            dr7 |= DR7_RW[kind] << (16 + 4 * slot)
            dr7 |= (DR7_LEN[length] if kind in ("write", "access") else 0) << (18 + 4 * slot)
        if dr7:
            dr7 |= 0x400 | 0x300
        dr[7] = dr7
        return dr7, dr

    def hw_slot_hit(self, dr6: int):
        """The (kind, addr, length) of the first hardware slot DR6 says fired, or None."""
        for s in range(HW_SLOTS):
            if dr6 >> s & 1 and self.hw[s] is not None:
                return self.hw[s]
        return None
