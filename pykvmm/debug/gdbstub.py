"""A plane-aware gdb stub: the GDB remote serial protocol over TCP or a unix socket.

Every (vCPU, plane) is a gdb thread: thread id ``vcpu * 16 + plane + 1``, named
``vcpu1/vtl1`` (``vcpu1/plane1`` outside the VTL personality). Registers are read and written
on the selected thread's own KVM vCPU (its plane), memory is addressed by guest-virtual
address translated with that plane's page tables (KVM_TRANSLATE).

All-stop model. The stub runs in its own thread. The machine calls
``debugger.before_run(cpu_thread)`` before every KVM_RUN (one test in the hot loop) and
``debugger.on_debug(cpu_thread, exit)`` on KVM_EXIT_DEBUG. A vCPU may run only while the stub
lets it (``_go``); the first vCPU to stop (breakpoint, watchpoint, finished step, plane
switch with ``stop_on_switch``, crash, Ctrl-C) records the stop, and every other vCPU is kicked
out of KVM_RUN and parks in ``before_run``. The stub answers gdb once every vCPU is parked.
At start every vCPU parks before its first instruction until gdb resumes it.

Breakpoints: Z0 writes int3 and sets KVM_GUESTDBG_USE_SW_BP where the host reports int3 as
KVM_EXIT_DEBUG (probed on a scratch VM at start); elsewhere (e.g. kvm_pvm) a Z0 takes a
hardware slot. Z1 is a hardware breakpoint; Z2 (write) and Z4 (access) watchpoints use the
debug registers where the host honours data breakpoints (probed; else they are refused and
gdb can fall back to software watchpoints: ``set can-use-hw-watchpoints 0``). Z3 (read-only)
does not exist on x86. Single-step uses KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ so a
step never enters an interrupt handler. Guest debug is set on every plane's KVM vCPU.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time

from ..kvm import KvmError
from ..uapi import constants as C
from ..x86 import arch

SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11
PACKET_SIZE = 0x4000

DR7_LEN = {1: 0, 2: 1, 8: 2, 4: 3}
DR7_RW = {"exec": 0, "swexec": 0, "write": 1, "access": 3}


def tid_of(vcpu: int, plane: int) -> int:
    return vcpu * arch.MAX_PLANES + plane + 1


def split_tid(tid: int) -> tuple[int, int]:
    return divmod(tid - 1, arch.MAX_PLANES)


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


# ---- registers and the target description -----------------------------------------------------

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
FPU_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYSREGS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

# (name, bits, xml type, group, feature)
REGISTERS: list[tuple[str, int, str, str, str]] = (
    [(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", "", "core") for n in GPRS]
    + [("rip", 64, "code_ptr", "", "core"), ("eflags", 32, "i386_eflags", "", "core")]
    + [(n, 32, "int32", "", "core") for n in SEGS]
    + [(f"st{i}", 80, "i387_ext", "", "core") for i in range(8)]
    + [(n, 32, "int", "float", "core") for n in FPU_CTRL]
    + [(f"xmm{i}", 128, "vec128", "", "sse") for i in range(16)]
    + [("mxcsr", 32, "i386_mxcsr", "vector", "sse")]
    + [("fs_base", 64, "int", "", "segments"), ("gs_base", 64, "int", "", "segments")]
    + [(n, 64, "int", "system", "sys") for n in SYSREGS]
)
REG_INDEX = {r[0]: i for i, r in enumerate(REGISTERS)}

_EFLAGS = [(0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
           (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"),
           (20, "VIP"), (21, "ID")]
_MXCSR = ["IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM", "FZ"]
_FEATURES = {"core": "org.gnu.gdb.i386.core", "sse": "org.gnu.gdb.i386.sse",
             "segments": "org.gnu.gdb.i386.segments", "sys": "org.pykvmm.x86.system"}


def target_xml() -> str:
    out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
           "<architecture>i386:x86-64</architecture>"]
    for key, fname in _FEATURES.items():
        out.append(f'<feature name="{fname}">')
        if key == "core":
            out.append('<flags id="i386_eflags" size="4">')
            out += [f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in _EFLAGS]
            out.append("</flags>")
        if key == "sse":
            out += ['<vector id="v4f" type="ieee_single" count="4"/>',
                    '<vector id="v2d" type="ieee_double" count="2"/>',
                    '<vector id="v16i8" type="int8" count="16"/>',
                    '<vector id="v8i16" type="int16" count="8"/>',
                    '<vector id="v4i32" type="int32" count="4"/>',
                    '<vector id="v2i64" type="int64" count="2"/>',
                    '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
                    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
                    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
                    '<field name="uint128" type="uint128"/></union>',
                    '<flags id="i386_mxcsr" size="4">']
            out += [f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in enumerate(_MXCSR)]
            out.append("</flags>")
        for i, (name, bits, typ, group, feat) in enumerate(REGISTERS):
            if feat == key:
                g = f' group="{group}"' if group else ""
                out.append(f'<reg name="{name}" bitsize="{bits}" type="{typ}" regnum="{i}"{g}/>')
        out.append("</feature>")
    out.append("</target>")
    return "\n".join(out) + "\n"


def _ftag_full(fpu) -> int:
    """The i387 tag word from FXSAVE's abridged one (per physical register)."""
    top = (fpu.fsw >> 11) & 7
    tag = 0
    for phys in range(8):
        if not fpu.ftwx >> phys & 1:
            t = 3
        else:
            st = (phys - top) & 7
            raw = bytes(fpu.fpr[st])[:10]
            mant = int.from_bytes(raw[:8], "little")
            exp = int.from_bytes(raw[8:10], "little") & 0x7FFF
            if exp == 0x7FFF:
                t = 2
            elif exp == 0:
                t = 1 if mant == 0 else 2
            else:
                t = 0 if mant >> 63 else 2
        tag |= t << (2 * phys)
    return tag


def _ftwx_abridged(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)


# ---- host probing ------------------------------------------------------------------------------

class HostDebugCaps:
    """What this host's KVM does with guest debugging (probed on a scratch VM)."""

    def __init__(self, sw_bp: bool = True, watch: bool = True, blockirq: bool = True, detail: str = ""):
        self.sw_bp, self.watch, self.blockirq, self.detail = sw_bp, watch, blockirq, detail

    def __repr__(self):
        return f"HostDebugCaps(sw_bp={self.sw_bp}, watch={self.watch}, blockirq={self.blockirq})"


_PROBE_SW = b"\xCC\xE6\xEB\xEB\xFE"                                    # int3; out 0xeb, al; jmp $
_PROBE_WATCH = b"\xC6\x04\x25\x00\x00\x20\x00\x01\xE6\xEB\xEB\xFE"      # mov byte [0x200000], 1; out; jmp $


def probe_host(backend: str, kvm_device: str) -> HostDebugCaps:
    from .. import exits as X
    from ..vmm.machine import Machine, MachineConfig

    def run_probe(image, control, dregs):
        with Machine(image, MachineConfig(quiet=True, backend=backend, personality="none",
                                          kvm_device=kvm_device, mem_size=32 << 20)) as m:
            v = m.threads[0].plane_vcpu()
            v.set_guest_debug(control, dregs)
            return m.threads[0].planes_vcpu.run(plane=0)

    caps = HostDebugCaps()
    notes = []
    try:
        ex = run_probe(_PROBE_SW, C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_SW_BP, None)
        caps.sw_bp = isinstance(ex, X.Debug) and ex.exception == 3
        if not caps.sw_bp:
            notes.append(f"int3 with KVM_GUESTDBG_USE_SW_BP ends in {type(ex).__name__}, not KVM_EXIT_DEBUG, "
                         "on this host: breakpoints use the 4 debug registers")
    except KvmError as e:
        caps.sw_bp = False
        notes.append(f"software breakpoints unavailable: {e}")
    try:
        dr7 = 0x400 | 0x300 | 1 | (1 << 16)
        ex = run_probe(_PROBE_WATCH, C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_HW_BP,
                       [0x200000, 0, 0, 0, 0, 0, 0, dr7])
        caps.watch = isinstance(ex, X.Debug) and ex.exception == 1 and bool(ex.dr6 & 1)
        if not caps.watch:
            notes.append("the host ignores data breakpoints (a watched store ran on): hardware "
                         "watchpoints are refused; use 'set can-use-hw-watchpoints 0' in gdb")
    except KvmError as e:
        caps.watch = False
        notes.append(f"hardware watchpoints unavailable: {e}")
    try:
        run_probe(b"\x90\xE6\xEB", C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP | C.KVM_GUESTDBG_BLOCKIRQ, None)
    except KvmError:
        caps.blockirq = False
        notes.append("no KVM_GUESTDBG_BLOCKIRQ: a step may enter an interrupt handler")
    caps.detail = "; ".join(notes)
    return caps


# ---- the stub ---------------------------------------------------------------------------------

class _Disconnected(Exception):
    pass


class GdbStub:
    def __init__(self, machine, address: str, stop_on_switch: bool = False, label: str = "plane",
                 log=None, caps: HostDebugCaps | None = None):
        self.m = machine
        self.address = address
        self.label = label
        self.log = log or (lambda msg: None)
        self.caps = caps if caps is not None else probe_host(machine.pvm.backend, machine.config.kvm_device)
        if self.caps.detail:
            self.log(f"gdb stub: {self.caps.detail}")
        self.cv = threading.Condition()
        n = len(machine.threads)
        self._go = [False] * n
        self._parked = [False] * n
        self._last_plane = [0] * n
        self._actions: dict[int, str] = {}
        self._running = False          # gdb is waiting for a stop reply
        self._stop = None              # (signal, reason, tid, message) of the recorded stop
        self._pending_steps: dict[int, tuple] = {}
        self._stop_on_switch = stop_on_switch
        self._sw_bps: dict[int, list] = {}     # gva -> [gpa, original byte, refs]
        self._hw: list = [None] * 4            # slot -> (kind, addr, length)
        self._applied: dict[int, tuple] = {}   # id(kvm vcpu) -> (control, debugregs)
        self.detached = False
        self.killed = False
        self.connected = False
        self.session_over = False
        self.ended = None                      # RunResult once the machine finished
        self._g_tid = 0
        self._last_tid = tid_of(0, 0)
        self._no_ack = False
        self._conn = None
        self._listener = None
        self._buf = b""
        self._thread = None
        self._closing = False
        self.listen_address = None

    # -- lifecycle (main thread) ------------------------------------------------------------
    def start(self) -> str:
        """Listen, start the stub thread; returns a printable address."""
        addr = self.address
        if "/" in addr:
            try:
                if stat.S_ISSOCK(os.stat(addr).st_mode):
                    os.unlink(addr)
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(addr)
            self.listen_address = addr
        else:
            host, _, port = addr.rpartition(":")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host or "127.0.0.1", int(port)))
            h, p = s.getsockname()
            self.listen_address = f"{h}:{p}"
        s.listen(1)
        s.settimeout(0.1)
        self._listener = s
        self.m.debugger = self
        self.m.crash_hooks.append(self._on_crash)
        self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._thread.start()
        return self.listen_address

    def finish(self, result, wait: float | None = None) -> None:
        """The machine finished: tell gdb (W packet) and wait for the session to end."""
        with self.cv:
            self.ended = result
            waiting = self._running
            self.cv.notify_all()
        if self.connected and not self.session_over and not waiting:
            self.log(f"gdb stub: the guest run ended ({getattr(result.status, 'name', result.status)}) while gdb "
                     "holds it stopped; continue, detach or kill in gdb to finish")
        if self.connected and self._thread is not None:
            deadline = None if wait is None else time.monotonic() + wait
            try:
                while self._thread.is_alive() and (deadline is None or time.monotonic() < deadline):
                    self._thread.join(0.2)
            except KeyboardInterrupt:
                self.log("gdb stub: interrupted; closing the gdb connection")
        self.close()

    def close(self) -> None:
        self._closing = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        for s in (self._conn, self._listener):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        if self.listen_address and "/" in self.listen_address:
            try:
                os.unlink(self.listen_address)
            except OSError:
                pass
        self._listener = None

    # -- hooks called by vCPU threads ---------------------------------------------------------
    def before_run(self, t) -> bool:
        i = t.index
        if self._go[i] and (not self._stop_on_switch or t.plane == self._last_plane[i]):
            return True
        return self._before_run_slow(t)

    def _before_run_slow(self, t) -> bool:
        i = t.index
        m = self.m
        with self.cv:
            if t.plane != self._last_plane[i]:
                if self._stop_on_switch and self._go[i] and self._may_stop():
                    src = self._last_plane[i]
                    self._last_plane[i] = t.plane
                    self._record_stop(t, 0, "", f"plane switch on vCPU {i}: {self._pl(src)} -> {self._pl(t.plane)}")
                elif not self._stop_on_switch or self.detached:
                    self._last_plane[i] = t.plane
            while not self._go[i]:
                if m.stopping or self.killed:
                    self._parked[i] = False
                    return False
                self._parked[i] = True
                self.cv.notify_all()
                self.cv.wait(0.1)
            self._parked[i] = False
        return True

    def on_debug(self, t, ex) -> None:
        """KVM_EXIT_DEBUG on vCPU thread ``t``: a breakpoint, watchpoint or finished step."""
        if self.detached or self.session_over:
            return
        sig, reason, is_step = SIGTRAP, "", False
        if ex.exception == 3:
            reason = "swbreak:;"
            v = t.plane_vcpu()
            rip = v.regs.rip
            if rip not in self._sw_bps and rip - 1 in self._sw_bps:   # report the int3's own address
                v.regs.rip = rip - 1
                v.mark_dirty("regs")
        elif ex.exception == 1:
            slots = [s for s in range(4) if ex.dr6 >> s & 1 and self._hw[s] is not None]
            if slots:
                kind, addr, _ = self._hw[slots[0]]
                reason = {"exec": "hwbreak:;", "swexec": "swbreak:;", "write": f"watch:{addr:x};",
                          "access": f"awatch:{addr:x};"}[kind]
            elif ex.dr6 & 0x4000:
                is_step = True
        i = t.index
        with self.cv:
            if is_step and self._actions.get(i) != "s":
                return     # a stale single-step trap (the step was given up): ignore
            if self._go[i] and self._may_stop():
                self._record_stop(t, sig, reason, None)
            elif is_step:
                self._pending_steps[i] = (sig, reason, tid_of(i, t.plane), None)
            # a breakpoint hit that loses the race to another stop is hit again on resume

    def _on_crash(self, crash) -> None:
        """The machine is about to end the run for a crash: stop there so gdb can look."""
        if self.detached or self.session_over or not self.connected:
            return
        i = crash.vcpu
        t = self.m.threads[i] if 0 <= i < len(self.m.threads) else None
        if t is None or t.thread is not threading.current_thread():
            return
        with self.cv:
            if not self._may_stop():
                return
            self._record_stop(t, SIGSEGV, "", f"guest crashed on vCPU {i} {self._pl(t.plane)}: "
                                               f"{crash.reason}; continuing ends the run")
            while not self._go[i] and not self.m.stopping and not self.killed:
                self._parked[i] = True
                self.cv.notify_all()
                self.cv.wait(0.1)
            self._parked[i] = False

    # -- stop bookkeeping (under self.cv) --------------------------------------------------------
    def _pl(self, plane: int) -> str:
        return f"VTL{plane}" if self.label == "VTL" else f"plane {plane}"

    def _may_stop(self) -> bool:
        return self._running and self._stop is None and not self.detached

    def _record_stop(self, t, sig, reason, message) -> None:
        tid = tid_of(t.index, t.plane)
        self._stop = (sig, reason, tid, message)
        self._halt_all(exclude=t.index)

    def _halt_all(self, exclude: int | None = None) -> None:
        for k in range(len(self._go)):
            self._go[k] = False
        for t in self.m.threads:
            if t.index != exclude:
                t.planes_vcpu.kick()
        self.cv.notify_all()

    def _all_parked(self) -> bool:
        for t in self.m.threads:
            th = t.thread
            if th is not None and th.is_alive() and not self._parked[t.index]:
                return False
        return True

    def _wait_parked(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not self._all_parked() and time.monotonic() < deadline:
                self.cv.wait(0.05)

    # -- guest debug state --------------------------------------------------------------------------
    def _debugregs(self) -> tuple[int, list[int]]:
        dr = [0] * 8
        dr7 = 0
        for slot, hw in enumerate(self._hw):
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

    def _apply_debug(self) -> None:
        """Program KVM_SET_GUEST_DEBUG on every plane's KVM vCPU (all vCPU threads are parked)."""
        dr7, dregs = self._debugregs()
        base = 0
        if not self.detached:
            if self._sw_bps:
                base |= C.KVM_GUESTDBG_USE_SW_BP
            if dr7:
                base |= C.KVM_GUESTDBG_USE_HW_BP
        for t in self.m.threads:
            control = base
            if not self.detached and self._actions.get(t.index) == "s":
                control |= C.KVM_GUESTDBG_SINGLESTEP | (C.KVM_GUESTDBG_BLOCKIRQ if self.caps.blockirq else 0)
            if control:
                control |= C.KVM_GUESTDBG_ENABLE
            state = (control, tuple(dregs) if control & C.KVM_GUESTDBG_USE_HW_BP else ())
            for p in t.planes_vcpu.planes:
                v = t.planes_vcpu.plane_vcpu(p)
                if self._applied.get(id(v), (0, ())) == state:
                    continue
                v.set_guest_debug(control, dregs if control & C.KVM_GUESTDBG_USE_HW_BP else None)
                self._applied[id(v)] = state

    # -- resuming -------------------------------------------------------------------------------------
    def _resume(self, actions: dict[int, str]) -> None:
        with self.cv:
            pending = [self._pending_steps[i] for i, a in actions.items() if a == "s" and i in self._pending_steps]
            self._pending_steps.clear()
            if pending:            # that step already happened while another vCPU's stop was reported
                self._stop = pending[0]
                self._running = True
                return
            self._actions = dict(actions)
            self._apply_debug()
            self._stop = None
            self._running = True
            for t in self.m.threads:
                self._go[t.index] = t.index in actions
            self.cv.notify_all()

    # -- the connection -----------------------------------------------------------------------------
    def _serve(self) -> None:
        conn = None
        while not self._closing and conn is None:
            with self.cv:
                if self.ended is not None:
                    break
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
        if conn is None:
            return
        try:
            self._listener.close()
        except OSError:
            pass
        self._conn = conn
        conn.setblocking(True)
        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connected = True
        self.log("gdb stub: gdb connected")
        try:
            self._session()
        except _Disconnected:
            if not self.session_over and not self.killed:
                self.log("gdb stub: gdb went away without detaching; the guest runs on")
                self._detach()
        except Exception as e:       # never leave the vCPUs parked behind a dead stub
            import traceback
            self.log("gdb stub: internal error, detaching:\n" + traceback.format_exc())
            self._detach()
        finally:
            self.session_over = True
            try:
                conn.close()
            except OSError:
                pass

    def _send_raw(self, data: bytes) -> None:
        try:
            self._conn.sendall(data)
        except OSError:
            raise _Disconnected() from None

    def _send(self, payload: str | bytes) -> None:
        if isinstance(payload, str):
            payload = payload.encode("latin-1")
        self._send_raw(b"$" + payload + b"#%02x" % checksum(payload))

    def _recv(self, timeout: float) -> bool:
        r, _, _ = select.select([self._conn], [], [], timeout)
        if not r:
            return False
        try:
            data = self._conn.recv(65536)
        except OSError:
            raise _Disconnected() from None
        if not data:
            raise _Disconnected()
        self._buf += data
        return True

    def _next_packet(self):
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
            if not self._no_ack:
                self._send_raw(b"+" if ok else b"-")
            if ok:
                return payload
            continue
        self._buf = buf
        return None

    def _session(self) -> None:
        self._wait_parked()
        while True:
            if self._running:
                self._wait_for_stop()
                if self.session_over:
                    return
                continue
            pkt = self._next_packet()
            if pkt is None:
                self._recv(0.5)
                continue
            if pkt == b"\x03":
                continue
            reply = self._handle(pkt)
            if reply is not None:
                self._send(reply)
            if self.session_over:
                return

    def _wait_for_stop(self) -> None:
        while True:
            pkt = self._next_packet()
            if pkt == b"\x03":
                self._interrupt()
            elif pkt is not None:
                # all-stop: gdb sends nothing but ^C while the target runs; answer anyway
                self._send("E16")
            send = None
            with self.cv:
                if self.ended is not None:
                    send = "exit"
                else:
                    stop = self._stop
                    if stop is None and not self.m.stopping:
                        resumed = [t for t in self.m.threads if self._go[t.index]]
                        if resumed and not any(t.thread is None or t.thread.is_alive() for t in resumed) \
                                and not all(t.done for t in self.m.threads):
                            # every resumed vCPU finished and the others are parked: that is a stop
                            t = resumed[0]
                            self._stop = stop = (SIGTRAP, "", tid_of(t.index, t.plane), f"vCPU {t.index} finished")
                            self._halt_all()
                    if stop is not None and self._all_parked():
                        self._running = False
                        send = stop
            if send == "exit":
                self._send_exit()
                return
            if send is not None:
                self._send_stop(send)
                return
            self._recv(0.02)

    def _interrupt(self) -> None:
        with self.cv:
            if not self._may_stop():
                return
            t = next((t for t in self.m.threads if not t.done), self.m.threads[0])
            self._stop = (SIGINT, "", tid_of(t.index, t.plane), None)
            self._halt_all()

    def _stop_reply(self, stop) -> str:
        sig, reason, tid, _ = stop
        self._last_tid = tid
        self._g_tid = tid
        return f"T{sig:02x}{reason}thread:{tid:x};"

    def _send_stop(self, stop) -> None:
        if stop[3]:
            self._console(stop[3] + "\n")
        self._send(self._stop_reply(stop))

    def _console(self, text: str) -> None:
        self._send("O" + text.encode().hex())

    def _send_exit(self) -> None:
        res = self.ended
        self._running = False
        status = int(getattr(res, "status", 0))
        note = f"guest run ended: {getattr(res.status, 'name', status)}"
        if getattr(res, "crash", None) is not None:
            note += f" ({res.crash.reason.splitlines()[0]})"
        self._console(note + "\n")
        self._send(f"W{status & 0xFF:02x}")
        self.session_over = True
        # give gdb a moment to read the reply and hang up first
        deadline = time.monotonic() + 1.0
        try:
            while time.monotonic() < deadline:
                self._recv(0.1)
        except _Disconnected:
            pass

    # -- packets ------------------------------------------------------------------------------------
    def _handle(self, pkt: bytes):
        text = pkt.decode("latin-1")
        c = text[:1]
        try:
            if c == "q" or c == "Q":
                return self._query(text)
            if c == "v":
                return self._v(text)
            if c == "?":
                with self.cv:
                    stop = self._stop or (SIGTRAP, "", self._current_tid(), None)
                return self._stop_reply(stop)
            if c == "H":
                return self._set_thread(text)
            if c == "T":
                return "OK" if self._valid_tid(int(text[1:], 16)) else "E01"
            if c == "g":
                return self._read_all_regs(self._sel_tid())
            if c == "G":
                return self._write_all_regs(self._sel_tid(), bytes.fromhex(text[1:]))
            if c == "p":
                n = int(text[1:], 16)
                return self._read_reg(self._sel_tid(), n)
            if c == "P":
                n, _, val = text[1:].partition("=")
                return self._write_reg(self._sel_tid(), int(n, 16), bytes.fromhex(val))
            if c == "m":
                a, _, n = text[1:].partition(",")
                return self._read_mem(int(a, 16), min(int(n, 16), PACKET_SIZE // 2 - 16))
            if c == "M":
                head, _, data = text[1:].partition(":")
                a, _, n = head.partition(",")
                return self._write_mem(int(a, 16), bytes.fromhex(data)[:int(n, 16)])
            if c == "X":
                return ""            # gdb falls back to M
            if c in ("Z", "z"):
                return self._breakpoint(c == "Z", text[1:])
            if c == "c" or c == "C":
                self._resume_all("c")
                return None
            if c == "s" or c == "S":
                self._resume_step_current()
                return None
            if c == "D":
                self._detach()
                self.session_over = True
                return "OK"
            if c == "k":
                self._kill()
                return None
            return ""
        except _Disconnected:
            raise
        except KvmError as e:
            self.log(f"gdb stub: {text[:40]}: {e}")
            return "E05"
        except (ValueError, IndexError, KeyError):
            return "E16"

    def _query(self, text: str):
        if text.startswith("qSupported"):
            return (f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;qXfer:features:read+;qXfer:threads:read+;"
                    "swbreak+;hwbreak+;vContSupported+")
        if text == "QStartNoAckMode":
            self._send("OK")
            self._no_ack = True
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
            actions = {}
            for part in text[6:].split(";"):
                act, _, th = part.partition(":")
                kind = act[:1].lower()
                if kind not in ("c", "s"):
                    return "E16"
                if th and th not in ("-1", "p-1.-1"):
                    tid = self._parse_tid(th)
                    if tid <= 0:
                        targets = [t.index for t in self.m.threads]
                    else:
                        targets = [split_tid(tid)[0]]
                else:
                    targets = [t.index for t in self.m.threads]
                for i in targets:
                    actions.setdefault(i, kind)       # the leftmost action for a vCPU wins
            if self.ended is not None:
                self._send_exit()
                return None
            self._resume(actions)
            return None
        if text.startswith("vKill"):
            self._kill()
            return "OK"
        if text == "vMustReplyEmpty":
            return ""
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
        if self._stop is not None:
            return self._stop[2]
        if self._last_tid in self._tids():
            return self._last_tid
        t = self.m.threads[0]
        return tid_of(t.index, t.plane)

    def _sel_tid(self) -> int:
        tid = self._g_tid
        if tid <= 0 or not self._valid_tid(tid):
            return self._current_tid()
        return tid

    def _set_thread(self, text: str) -> str:
        op, tid = text[1], self._parse_tid(text[2:])
        if tid > 0 and not self._valid_tid(tid):
            return "E01"
        if op == "g":
            self._g_tid = tid
        return "OK"

    def _thread_name(self, tid: int) -> str:
        v, p = split_tid(tid)
        return f"vcpu{v}/{self.label.strip().lower()}{p}"

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

    def _vcpu_of(self, tid: int):
        v, p = split_tid(tid)
        t = self.m.threads[v]
        return t, t.planes_vcpu.plane_vcpu(p)

    # -- registers -----------------------------------------------------------------------------------
    def _reg_values(self, tid: int) -> list[bytes]:
        _, v = self._vcpu_of(tid)
        r, s, f = v.get_regs(), v.get_sregs(), v.get_fpu()
        vals = {n: getattr(r, n) for n in GPRS}
        vals["rip"], vals["eflags"] = r.rip, r.rflags
        for n in SEGS:
            vals[n] = getattr(s, n).selector
        vals.update(fctrl=f.fcw, fstat=f.fsw, ftag=_ftag_full(f), fiseg=(f.last_ip >> 32) & 0xFFFF,
                    fioff=f.last_ip & 0xFFFFFFFF, foseg=(f.last_dp >> 32) & 0xFFFF,
                    fooff=f.last_dp & 0xFFFFFFFF, fop=f.last_opcode & 0x7FF, mxcsr=f.mxcsr,
                    fs_base=s.fs.base, gs_base=s.gs.base, cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4,
                    cr8=s.cr8, efer=s.efer)
        out = []
        for name, bits, *_ in REGISTERS:
            if name.startswith("st") and name[2:].isdigit():
                out.append(bytes(f.fpr[int(name[2:])])[:10])
            elif name.startswith("xmm"):
                out.append(bytes(f.xmm[int(name[3:])]))
            else:
                out.append((vals[name] & ((1 << bits) - 1)).to_bytes(bits // 8, "little"))
        return out

    def _read_all_regs(self, tid: int) -> str:
        return b"".join(self._reg_values(tid)).hex()

    def _read_reg(self, tid: int, n: int) -> str:
        if not 0 <= n < len(REGISTERS):
            return "E45"
        return self._reg_values(tid)[n].hex()

    def _write_all_regs(self, tid: int, data: bytes) -> str:
        values, off = {}, 0
        for i, (name, bits, *_) in enumerate(REGISTERS):
            size = bits // 8
            if off + size > len(data):
                break
            values[i] = data[off:off + size]
            off += size
        return self._write_regs(tid, values)

    def _write_reg(self, tid: int, n: int, data: bytes) -> str:
        if not 0 <= n < len(REGISTERS) or len(data) != REGISTERS[n][1] // 8:
            return "E45"
        return self._write_regs(tid, {n: data})

    def _write_regs(self, tid: int, values: dict[int, bytes]) -> str:
        current = self._reg_values(tid)
        changed = {REGISTERS[i][0]: d for i, d in values.items() if d != current[i]}
        if not changed:
            return "OK"
        _, v = self._vcpu_of(tid)
        as_int = {n: int.from_bytes(d, "little") for n, d in changed.items()}
        if any(n in GPRS or n in ("rip", "eflags") for n in changed):
            r = v.get_regs()
            for n in GPRS:
                if n in as_int:
                    setattr(r, n, as_int[n])
            if "rip" in as_int:
                r.rip = as_int["rip"]
            if "eflags" in as_int:
                r.rflags = as_int["eflags"] | 0x2
            v.set_regs(r)
        if any(n in SEGS or n in SYSREGS or n in ("fs_base", "gs_base") for n in changed):
            s = v.get_sregs()
            for n in SEGS:
                if n in as_int:
                    getattr(s, n).selector = as_int[n]
            for n in SYSREGS:
                if n in as_int:
                    setattr(s, n, as_int[n])
            if "fs_base" in as_int:
                s.fs.base = as_int["fs_base"]
            if "gs_base" in as_int:
                s.gs.base = as_int["gs_base"]
            v.set_sregs(s)
        fpu_names = set(FPU_CTRL) | {"mxcsr"} | {f"st{i}" for i in range(8)} | {f"xmm{i}" for i in range(16)}
        if any(n in fpu_names for n in changed):
            f = v.get_fpu()
            for n, d in changed.items():
                if n.startswith("st") and n[2:].isdigit():
                    buf = bytearray(bytes(f.fpr[int(n[2:])]))
                    buf[:10] = d
                    for k in range(16):
                        f.fpr[int(n[2:])][k] = buf[k]
                elif n.startswith("xmm"):
                    for k in range(16):
                        f.xmm[int(n[3:])][k] = d[k]
            x = as_int
            if "fctrl" in x:
                f.fcw = x["fctrl"] & 0xFFFF
            if "fstat" in x:
                f.fsw = x["fstat"] & 0xFFFF
            if "ftag" in x:
                f.ftwx = _ftwx_abridged(x["ftag"])
            if "fop" in x:
                f.last_opcode = x["fop"] & 0x7FF
            if "fioff" in x or "fiseg" in x:
                f.last_ip = (x.get("fiseg", f.last_ip >> 32) << 32) | x.get("fioff", f.last_ip & 0xFFFFFFFF)
            if "fooff" in x or "foseg" in x:
                f.last_dp = (x.get("foseg", f.last_dp >> 32) << 32) | x.get("fooff", f.last_dp & 0xFFFFFFFF)
            if "mxcsr" in x:
                f.mxcsr = x["mxcsr"]
            v.set_fpu(f)
        return "OK"

    # -- memory -----------------------------------------------------------------------------------------
    def _translate(self, addr: int, tid: int | None = None) -> int | None:
        _, v = self._vcpu_of(tid or self._sel_tid())
        gpa = v.translate(addr)
        if gpa is None or gpa >= self.m.memory.size:
            return None
        return gpa

    def _read_mem(self, addr: int, length: int) -> str:
        out = bytearray()
        a = addr
        while len(out) < length:
            chunk = min(length - len(out), 0x1000 - (a & 0xFFF))
            gpa = self._translate(a)
            if gpa is None or gpa + chunk > self.m.memory.size:
                break
            out += self.m.memory.read(gpa, chunk)
            a += chunk
        if not out and length:
            return "E14"
        for gva, (_, orig, _) in self._sw_bps.items():     # show the original bytes, not our int3
            if addr <= gva < addr + len(out):
                out[gva - addr] = orig
        return out.hex()

    def _write_mem(self, addr: int, data: bytes) -> str:
        spans = []
        a, off = addr, 0
        while off < len(data):
            chunk = min(len(data) - off, 0x1000 - (a & 0xFFF))
            gpa = self._translate(a)
            if gpa is None or gpa + chunk > self.m.memory.size:
                return "E14"
            spans.append((gpa, a, data[off:off + chunk]))
            a += chunk
            off += chunk
        for gpa, gva, chunk in spans:
            buf = bytearray(chunk)
            for bp, entry in self._sw_bps.items():
                if gva <= bp < gva + len(buf):
                    entry[1] = buf[bp - gva]          # the new original byte; keep our int3
                    buf[bp - gva] = 0xCC
            self.m.memory.write(gpa, bytes(buf))
        return "OK"

    # -- breakpoints and watchpoints ------------------------------------------------------------------------
    def _breakpoint(self, insert: bool, args: str) -> str:
        parts = args.split(";")[0].split(",")
        kind, addr, length = int(parts[0]), int(parts[1], 16), int(parts[2], 16)
        if kind == 0:
            if self.caps.sw_bp:
                return self._sw_break(insert, addr)
            return self._hw_slot(insert, "swexec", addr, 1)
        if kind == 1:
            return self._hw_slot(insert, "exec", addr, 1)
        if kind in (2, 4):
            if not self.caps.watch:
                return ""
            wkind = "write" if kind == 2 else "access"
            pieces = []
            a, n = addr, length
            while n > 0:
                size = next(s for s in (8, 4, 2, 1) if a % s == 0 and s <= n)
                pieces.append((a, size))
                a, n = a + size, n - size
            if insert:
                if sum(1 for h in self._hw if h is None) < len(pieces):
                    return "E28"
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
            if entry in self._hw:
                return "OK"
            try:
                slot = self._hw.index(None)
            except ValueError:
                return "E28"        # ENOSPC: 4 debug registers
            self._hw[slot] = entry
            return "OK"
        if entry in self._hw:
            self._hw[self._hw.index(entry)] = None
        return "OK"

    def _sw_break(self, insert: bool, addr: int) -> str:
        if insert:
            if addr in self._sw_bps:
                self._sw_bps[addr][2] += 1
                return "OK"
            gpa = self._translate(addr)
            if gpa is None:
                return "E14"
            orig = self.m.memory.read(gpa, 1)[0]
            self.m.memory.write(gpa, b"\xCC")
            self._sw_bps[addr] = [gpa, orig, 1]
            return "OK"
        entry = self._sw_bps.get(addr)
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                self.m.memory.write(entry[0], bytes([entry[1]]))
                del self._sw_bps[addr]
        return "OK"

    def _remove_all_breakpoints(self) -> None:
        for gva, (gpa, orig, _) in list(self._sw_bps.items()):
            self.m.memory.write(gpa, bytes([orig]))
        self._sw_bps.clear()
        self._hw = [None] * 4

    # -- run control -------------------------------------------------------------------------------------
    def _resume_all(self, kind: str) -> None:
        if self.ended is not None:
            self._send_exit()
            return
        self._resume({t.index: kind for t in self.m.threads})

    def _resume_step_current(self) -> None:
        if self.ended is not None:
            self._send_exit()
            return
        v, _ = split_tid(self._current_tid())
        self._resume({v: "s"})

    def _detach(self) -> None:
        with self.cv:
            self._remove_all_breakpoints()
            self.detached = True
            self._stop_on_switch = False
            self._actions = {}
            try:
                self._apply_debug()
            except KvmError as e:
                self.log(f"gdb stub: could not clear guest debug: {e}")
            self._running = False
            for k in range(len(self._go)):
                self._go[k] = True
            self.cv.notify_all()
        self.log("gdb stub: gdb detached; the guest runs on")

    def _kill(self) -> None:
        with self.cv:
            self.killed = True
            self.session_over = True
            self._remove_all_breakpoints()
            self.cv.notify_all()
        self.log("gdb stub: killed from gdb; stopping the run")
        self.m.finish_now()

    # -- monitor commands --------------------------------------------------------------------------------
    def _monitor(self, cmd: str) -> str:
        words = cmd.split()
        if not words or words[0] == "help":
            out = ("pykvmm monitor commands:\n"
                   "  planes                  every vCPU's running plane and suspended planes\n"
                   "  stop-on-switch on|off   stop whenever a vCPU switches planes\n"
                   "  caps                    what this host's KVM can do for the debugger\n")
        elif words[0] == "planes":
            lines = []
            for t in self.m.threads:
                lines.append(f"vCPU {t.index}: running {self._pl(t.plane)}"
                             + (", suspended " + ", ".join(self._pl(p) for p in t.suspended) if t.suspended else "")
                             + (" (finished)" if t.done else ""))
            out = "\n".join(lines) + "\n"
        elif words[0] == "stop-on-switch" and len(words) == 2 and words[1] in ("on", "off"):
            with self.cv:
                self._stop_on_switch = words[1] == "on"
                for t in self.m.threads:
                    self._last_plane[t.index] = t.plane
            out = f"stop on plane switch: {words[1]}\n"
        elif words[0] == "caps":
            out = (f"software breakpoints (int3): {'yes' if self.caps.sw_bp else 'no (Z0 uses debug registers)'}\n"
                   f"data watchpoints: {'yes' if self.caps.watch else 'no'}\n"
                   f"single-step without interrupts (BLOCKIRQ): {'yes' if self.caps.blockirq else 'no'}\n"
                   + (f"{self.caps.detail}\n" if self.caps.detail else ""))
        else:
            out = f"unknown monitor command {cmd!r}; try 'monitor help'\n"
        self._console(out)
        return "OK"
