"""One gdb session: the packet handlers (queries, threads, registers, memory, breakpoints, run
control, monitor commands) over one connection, on the machine's all-stop control.

Every (vCPU, plane) is a gdb thread: thread id ``vcpu * 16 + plane + 1``, named ``vcpu1/vtl1``
(``vcpu1/plane1`` outside the VTL personality). Registers are read and written on the selected
thread's own KVM vCPU (its plane), memory is addressed by guest-virtual address translated with
that plane's page tables (KVM_TRANSLATE).
"""

from __future__ import annotations

import time

from ...kvm import KvmError
from ...x86.sysstate import read_system_state
from ..dump import format_cpu_report, format_lapic
from ..symbols import Symbols
from .control import SIGTRAP, split_tid, tid_of
from .framing import PACKET_SIZE, Disconnected, escape_binary
from .registers import REGISTERS, read_registers, target_xml, write_registers


class GdbSession:
    def __init__(self, control, conn=None, symbols=None):
        self.ctl = control
        self.symbols = symbols or Symbols()
        self.m = control.m
        self.conn = conn
        self.over = False              # the session ended (detach, kill, exit)
        self._g_tid = 0
        self._last_tid = tid_of(0, 0)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        self.ctl.wait_parked()
        conn = self.conn
        while True:
            if self.ctl.running:
                self._wait_for_stop()
                if self.over:
                    return
                continue
            pkt = conn.next_packet()
            if pkt is None:
                conn.recv(0.5)
                continue
            if pkt == b"\x03":
                continue
            reply = self.handle(pkt)
            if reply is not None:
                conn.send(reply)
            if self.over:
                return

    def _wait_for_stop(self) -> None:
        conn = self.conn
        while True:
            pkt = conn.next_packet()
            if pkt == b"\x03":
                self.ctl.interrupt()
            elif pkt is not None:
                # all-stop: gdb sends nothing but ^C while the target runs; answer anyway
                conn.send("E16")
            send = self.ctl.poll_stop()
            if send == "exit":
                self._send_exit()
                return
            if send is not None:
                self._send_stop(send)
                return
            conn.recv(0.02)

    def _stop_reply(self, stop) -> str:
        sig, reason, tid, _ = stop
        self._last_tid = tid
        self._g_tid = tid
        return f"T{sig:02x}{reason}thread:{tid:x};"

    def _send_stop(self, stop) -> None:
        if stop[3]:
            self.conn.console(stop[3] + "\n")
        self.conn.send(self._stop_reply(stop))

    def _send_exit(self) -> None:
        res = self.ctl.ended
        self.ctl.running = False
        status = int(getattr(res, "status", 0))
        note = f"guest run ended: {getattr(res.status, 'name', status)}"
        if getattr(res, "crash", None) is not None:
            note += f" ({res.crash.reason.splitlines()[0]})"
        self.conn.console(note + "\n")
        self.conn.send(f"W{status & 0xFF:02x}")
        self.over = True
        # give gdb a moment to read the reply and hang up first
        deadline = time.monotonic() + 1.0
        try:
            while time.monotonic() < deadline:
                self.conn.recv(0.1)
        except Disconnected:
            pass

    # -- packets ------------------------------------------------------------------------------------
    def handle(self, pkt: bytes):
        """The reply to one packet, or None when the reply comes later (resume) or was sent."""
        text = pkt.decode("latin-1")
        c = text[:1]
        try:
            if c == "q" or c == "Q":
                return self._query(text)
            if c == "v":
                return self._v(text)
            if c == "?":
                with self.ctl.cv:
                    stop = self.ctl.stop or (SIGTRAP, "", self._current_tid(), None)
                return self._stop_reply(stop)
            if c == "H":
                return self._set_thread(text)
            if c == "T":
                return "OK" if self._valid_tid(int(text[1:], 16)) else "E01"
            if c == "g":
                return b"".join(read_registers(self._sel_vcpu())).hex()
            if c == "G":
                return self._write_all_regs(bytes.fromhex(text[1:]))
            if c == "p":
                n = int(text[1:], 16)
                if not 0 <= n < len(REGISTERS):
                    return "E45"
                return read_registers(self._sel_vcpu())[n].hex()
            if c == "P":
                n, _, val = text[1:].partition("=")
                n, data = int(n, 16), bytes.fromhex(val)
                if not 0 <= n < len(REGISTERS) or len(data) != REGISTERS[n][1] // 8:
                    return "E45"
                write_registers(self._sel_vcpu(), {n: data})
                return "OK"
            if c == "m":
                a, _, n = text[1:].partition(",")
                length = min(int(n, 16), PACKET_SIZE // 2 - 16)
                data = self.ctl.bps.read(self._sel_vcpu(), int(a, 16), length, self._sel_plane())
                return "E14" if not data and length else data.hex()
            if c == "M":
                head, _, data = text[1:].partition(":")
                a, _, n = head.partition(",")
                ok = self.ctl.bps.write(self._sel_vcpu(), int(a, 16), bytes.fromhex(data)[:int(n, 16)],
                                        self._sel_plane())
                return "OK" if ok else "E14"
            if c == "X":
                return ""            # gdb falls back to M
            if c in ("Z", "z"):
                reply = self.ctl.bps.change(c == "Z", text[1:], self._sel_vcpu())
                if reply.startswith("E."):
                    # gdb 13 prints this reason only for hbreak (Z1); say it where the user sees it
                    self.ctl.log(f"gdb stub: {text.split(';')[0]} refused: {reply.split('.', 2)[2]}")
                return reply
            if c == "c" or c == "C":
                self._resume({t.index: "c" for t in self.m.threads})
                return None
            if c == "s" or c == "S":
                v, p = split_tid(self._current_tid())
                self._resume({v: "s"}, {v: p})
                return None
            if c == "D":
                self.ctl.detach()
                self.over = True
                return "OK"
            if c == "k":
                self.over = True
                self.ctl.kill()
                return None
            return ""
        except Disconnected:
            raise
        except KvmError as e:
            self.ctl.log(f"gdb stub: {text[:40]}: {e}")
            return "E05"
        except (ValueError, IndexError, KeyError):
            return "E16"

    def _resume(self, actions: dict[int, str], step_planes: dict[int, int] | None = None) -> None:
        if self.ctl.ended is not None:
            self._send_exit()
            return
        self.ctl.resume(actions, step_planes)

    def _write_all_regs(self, data: bytes) -> str:
        values, off = {}, 0
        for i, (_, bits, *_) in enumerate(REGISTERS):
            size = bits // 8
            if off + size > len(data):
                break
            values[i] = data[off:off + size]
            off += size
        write_registers(self._sel_vcpu(), values)
        return "OK"

    def _query(self, text: str):
        if text.startswith("qSupported"):
            return (f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;qXfer:features:read+;qXfer:threads:read+;"
                    "swbreak+;hwbreak+;vContSupported+")
        if text == "QStartNoAckMode":
            self.conn.send("OK")
            self.conn.no_ack = True
            return None
        if text.startswith("qXfer:features:read:"):
            annex, _, rng = text[len("qXfer:features:read:"):].partition(":")
            if annex != "target.xml":
                return "E00"
            return self._xfer(target_xml().encode(), rng)
        if text.startswith("qXfer:threads:read::"):
            return self._xfer(self._threads_xml().encode(), text[len("qXfer:threads:read::"):])
        if text == "qfThreadInfo":
            return "m" + ",".join(f"{tid:x}" for tid in self._tids())
        if text == "qsThreadInfo":
            return "l"
        if text == "qC":
            return f"QC{self._current_tid():x}"
        if text.startswith("qThreadExtraInfo,"):
            tid = self._parse_tid(text.split(",", 1)[1])
            return self._extra_info(tid).encode().hex()
        if text.startswith("qAttached"):
            return "1"
        if text.startswith("qSymbol"):
            return "OK"
        if text.startswith("qRcmd,"):
            return self._monitor(bytes.fromhex(text[6:]).decode(errors="replace").strip())
        return ""

    def _v(self, text: str):
        if text == "vCont?":
            return "vCont;c;C;s;S"
        if text.startswith("vCont;"):
            actions, step_planes = {}, {}
            for part in text[6:].split(";"):
                act, _, th = part.partition(":")
                kind = act[:1].lower()
                if kind not in ("c", "s"):
                    return "E16"
                tid = self._parse_tid(th) if th and th not in ("-1", "p-1.-1") else -1
                if tid > 0:
                    if not self._valid_tid(tid):
                        return "E01"
                    v, p = split_tid(tid)
                    targets = [v]
                    if kind == "s":
                        step_planes.setdefault(v, p)     # step that thread's plane, not the vCPU's
                else:
                    targets = [t.index for t in self.m.threads]
                for i in targets:
                    actions.setdefault(i, kind)       # the leftmost action for a vCPU wins
            self._resume(actions, {i: p for i, p in step_planes.items() if actions[i] == "s"})
            return None
        if text.startswith("vKill"):
            self.over = True
            self.ctl.kill()
            return "OK"
        return ""

    def _xfer(self, data: bytes, rng: str) -> bytes:
        off, _, length = rng.partition(",")
        off, length = int(off, 16), int(length, 16)
        chunk = data[off:off + length]
        return (b"l" if off + length >= len(data) else b"m") + escape_binary(chunk)

    # -- threads --------------------------------------------------------------------------------------
    def _tids(self) -> list[int]:
        return [tid_of(t.index, p) for t in self.m.threads for p in t.planes_vcpu.planes]

    def _valid_tid(self, tid: int) -> bool:
        return tid in self._tids()

    def _parse_tid(self, s: str) -> int:
        if s.startswith("p"):
            s = s.split(".", 1)[1] if "." in s else "-1"
        return int(s, 16)

    def _current_tid(self) -> int:
        if self.ctl.stop is not None:
            return self.ctl.stop[2]
        if self._last_tid in self._tids():
            return self._last_tid
        t = self.m.threads[0]
        return tid_of(t.index, t.plane)

    def _sel_tid(self) -> int:
        tid = self._g_tid
        if tid <= 0 or not self._valid_tid(tid):
            return self._current_tid()
        return tid

    def _sel_plane(self) -> int:
        return split_tid(self._sel_tid())[1]

    def _sel_vcpu(self):
        """The KVM vCPU of the thread gdb selected with Hg (one plane of one vCPU)."""
        v, p = split_tid(self._sel_tid())
        return self.m.threads[v].planes_vcpu.plane_vcpu(p)

    def _set_thread(self, text: str) -> str:
        op, tid = text[1], self._parse_tid(text[2:])
        if tid > 0 and not self._valid_tid(tid):
            return "E01"
        if op == "g":
            self._g_tid = tid
        return "OK"

    def _thread_name(self, tid: int) -> str:
        v, p = split_tid(tid)
        return f"vcpu{v}/{self.ctl.label.strip().lower()}{p}"

    def _extra_info(self, tid: int) -> str:
        v, p = split_tid(tid)
        if not self._valid_tid(tid):
            return "no such thread"
        t = self.m.threads[v]
        if t.done:
            state = "vCPU finished"
        elif t.plane == p:
            state = "running plane"
        elif p in t.suspended:
            state = "suspended"
        elif p not in t.started_planes:
            state = "never entered"
        else:
            state = "inactive"
        return f"{self._thread_name(tid)}: {state}"

    def _threads_xml(self) -> str:
        out = ['<?xml version="1.0"?>', "<threads>"]
        for tid in self._tids():
            v, _ = split_tid(tid)
            info = self._extra_info(tid).split(": ", 1)[1]
            out.append(f'<thread id="{tid:x}" core="{v}" name="{self._thread_name(tid)}">{info}</thread>')
        out.append("</threads>")
        return "\n".join(out)

    # -- monitor commands --------------------------------------------------------------------------------
    def _monitor(self, cmd: str) -> str:
        words = cmd.split()
        ctl, caps = self.ctl, self.ctl.caps
        if not words or words[0] == "help":
            out = ("pykvmm monitor commands:\n"
                   "  planes                  every vCPU's running plane and suspended planes\n"
                   "  stop-on-switch on|off   stop whenever a vCPU switches planes\n"
                   "  caps                    what this host's KVM can do for the debugger\n"
                   "  state                   the selected vCPU's every plane: registers, segment bases,\n"
                   "                          debug registers, syscall MSRs, LAPIC, code at RIP\n"
                   "  lapic                   every plane's LAPIC of every vCPU (IRR, ISR, TPR, PPR, timer)\n"
                   "  phys ADDR [LEN]         guest-physical memory (hex dump, LEN default 64)\n"
                   "  phys-write ADDR HEX     write bytes to guest-physical memory\n")
        elif words[0] == "planes":
            lines = []
            for t in self.m.threads:
                lines.append(f"vCPU {t.index}: running {ctl.pl(t.plane)}"
                             + (", suspended " + ", ".join(ctl.pl(p) for p in t.suspended) if t.suspended else "")
                             + (" (finished)" if t.done else ""))
            out = "\n".join(lines) + "\n"
        elif words[0] == "stop-on-switch" and len(words) == 2 and words[1] in ("on", "off"):
            ctl.set_stop_on_switch(words[1] == "on")
            out = f"stop on plane switch: {words[1]}\n"
        elif words[0] == "caps":
            out = (f"software breakpoints (int3): {'yes' if caps.sw_bp else 'no (Z0 uses debug registers)'}\n"
                   f"data watchpoints: {'yes' if caps.watch else 'no'}\n"
                   f"single-step without interrupts (BLOCKIRQ): {'yes' if caps.blockirq else 'no'}\n"
                   + (f"{caps.detail}\n" if caps.detail else ""))
        elif words[0] == "state" and len(words) == 1:
            t = self.m.threads[split_tid(self._sel_tid())[0]]
            out = format_cpu_report(self.m.capture(t), "VTL" if ctl.label == "VTL" else "plane", self.symbols) + "\n"
        elif words[0] == "lapic" and len(words) == 1:
            out = "".join(f"vCPU {t.index} {ctl.pl(p)}: {self._lapic_line(t.planes_vcpu.plane_vcpu(p))}\n"
                          for t in self.m.threads for p in t.planes_vcpu.planes)
        elif words[0] == "phys" and len(words) in (2, 3):
            out = self._phys_read(words[1], words[2] if len(words) == 3 else "64")
        elif words[0] == "phys-write" and len(words) == 3:
            out = self._phys_write(words[1], words[2])
        else:
            out = f"unknown monitor command {cmd!r}; try 'monitor help'\n"
        self.conn.console(out)
        return "OK"

    @staticmethod
    def _lapic_line(v) -> str:
        lapic = read_system_state(v)["lapic"]
        return "unavailable: " + lapic["error"] if "error" in lapic else format_lapic(lapic)

    def _phys_range(self, addr: str, length: int) -> int:
        """A guest-physical address from a monitor argument, checked against guest RAM."""
        a = int(addr, 0)
        if a < 0 or length < 0 or a + length > self.m.memory.size:
            raise ValueError(f"{a:#x}+{length:#x} is outside guest RAM (0-{self.m.memory.size:#x})")
        return a

    def _phys_read(self, addr: str, length: str) -> str:
        try:
            n = min(int(length, 0), 4096)
            a = self._phys_range(addr, n)
        except ValueError as e:
            return f"phys: {e}\n"
        data = self.m.memory.read(a, n)
        return "".join(f"{a + k:#018x}: {data[k:k + 16].hex(' ')}\n" for k in range(0, len(data), 16))

    def _phys_write(self, addr: str, hexbytes: str) -> str:
        try:
            data = bytes.fromhex(hexbytes)
            a = self._phys_range(addr, len(data))
        except ValueError as e:
            return f"phys-write: {e}\n"
        self.m.memory.write(a, data)
        return f"wrote {len(data)} bytes at guest-physical {a:#x}\n"
