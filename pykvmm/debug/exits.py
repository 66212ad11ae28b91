"""Exits made readable. :class:`ExitAnnotator` (a trace sink placed before the recorder) gives
every EXIT event the RIP KVM reported, its ``symbol+offset`` and the exit's decoded data;
:class:`ExitPrinter` (``--trace-exits``) prints each exit live with a timestamp, the port's
meaning, the data in hex and the instruction, then what the exit caused (the hypercall, the
plane switch, the ucall or the fault) on the lines after it.

RIP at a port I/O exit is where KVM left it. At an ``in`` exit it is on the ``in`` on every KVM;
at an ``out`` exit it is past the ``out`` on kvm_pvm and on it on mainline KVM (``pykvmm caps``:
pio_out_rip), so for ``out`` the printed instruction is the one just before RIP when that is the
port instruction (a ``rep outs`` still in progress leaves RIP on itself).
"""

from __future__ import annotations

import threading

from ..vmm import abi
from ..vmm import events as ev
from .trace import exit_reason

# What a write to a port means: pykvmm's own ports, then the PC's well-known ones.
PORT_MEANINGS = {abi.PORT_UCALL: "pykvmm ucall", abi.PORT_CONSOLE: "pykvmm debug console",
                 abi.PORT_HYPERCALL: "pykvmm hypercall", abi.PORT_NULL: "pykvmm null port",
                 0x20: "PIC1 command", 0x21: "PIC1 data", 0xA0: "PIC2 command", 0xA1: "PIC2 data",
                 0x40: "PIT counter 0", 0x41: "PIT counter 1", 0x42: "PIT counter 2", 0x43: "PIT mode",
                 0x61: "PC speaker / PIT gate", 0x70: "CMOS/RTC index", 0x71: "CMOS/RTC data",
                 0x80: "POST code", 0xF4: "isa-debug-exit", 0x510: "fw_cfg selector", 0x511: "fw_cfg data",
                 0xCF8: "PCI config address", 0xCFC: "PCI config data"}
PORT_MEANINGS.update({0x3F8 + k: f"COM1 UART {name}" for k, name in
                      enumerate(("THR/RBR", "IER", "IIR/FCR", "LCR", "MCR", "LSR", "MSR", "SCR"))})

def port_meaning(port: int) -> str | None:
    return PORT_MEANINGS.get(port)


class ExitAnnotator:
    """Adds ``rip``, ``symbol``, ``data`` (hex) and ``port_meaning`` to every EXIT event, on the
    vCPU thread while the registers are live (sync regs: no ioctl where the host has them)."""

    def __init__(self, machine, symbols):
        self.machine = machine
        self.symbols = symbols

    def __call__(self, event) -> None:
        if event.kind != ev.EXIT:
            return
        d = event.details
        try:
            rip = self.machine.threads[event.vcpu].planes_vcpu.plane_vcpu(event.plane).regs.rip
        except Exception:        # a torn-down vCPU: the event stays as it is
            return
        d["rip"] = rip
        name = self.symbols.name(rip)
        if name:
            d["symbol"] = name
        data = d.get("data")
        if isinstance(data, (bytes, bytearray)):
            d["data"] = bytes(data).hex(" ")
        port = d.get("port")
        if port is not None and port_meaning(port):
            d["port_meaning"] = port_meaning(port)


class ExitPrinter:
    """A trace sink printing, live, one line per exit and a ``->`` line for what it caused.
    Put it after an :class:`ExitAnnotator`."""

    def __init__(self, machine, out, label: str = "plane"):
        from .disasm import around
        self._around = around
        self.machine = machine
        self.out = out
        self.label = label
        self.t0 = None
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        if self.t0 is None or (event.kind == ev.LIFECYCLE and event.details.get("what") == "start"):
            self.t0 = event.t
        if event.kind == ev.EXIT:
            line = self.format(event)
        elif event.kind in (ev.HYPERCALL, ev.SWITCH, ev.UCALL, ev.FAULT, ev.PLANE_EVENT) and event.vcpu >= 0:
            plane = event.details.get("from", event.plane) if event.kind == ev.SWITCH else event.plane
            line = f"{self._stamp(event)} {self._where(event.vcpu, plane)}   -> {self._caused(event)}"
        else:
            return
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _stamp(self, event) -> str:
        return f"[{(event.t - self.t0) * 1e6:12.1f} us]"

    def _where(self, vcpu: int, plane: int) -> str:
        return f"vcpu{vcpu}/{self.label}{plane}"

    def _caused(self, event) -> str:
        d = event.details
        if event.kind == ev.HYPERCALL:
            st = d.get("status")
            return f"hypercall {d.get('name')}" + ("" if st is None else f" status {st:#x}")
        if event.kind == ev.SWITCH:
            return f"switch {self.label}{d.get('from')} -> {self.label}{d.get('to')} ({d.get('why', '')})"
        if event.kind == ev.UCALL:
            return f"ucall {d.get('verb', '')}"
        if event.kind == ev.PLANE_EVENT:
            return f"plane event (pending {d.get('pending')}, target {d.get('target')})"
        return "crash: " + str(d["crash"]) if "crash" in d else f"fault vector {d.get('vector')}: {d.get('why', '')}"

    def format(self, event) -> str:
        d = event.details
        head = f"{self._stamp(event)} {self._where(event.vcpu, event.plane)} {exit_reason(d)}"
        port = d.get("port")
        if port is not None and port_meaning(port):
            head += f" [{port_meaning(port)}]"
        data = d.get("data")
        if data:
            head += f" data={bytes(data).hex(' ') if isinstance(data, (bytes, bytearray)) else data}"
        try:
            v = self.machine.threads[event.vcpu].planes_vcpu.plane_vcpu(event.plane)
            rip = d["rip"] if "rip" in d else v.regs.rip
            code, addr = self.machine.read_code(v, rip, before=16, after=16, plane=event.plane)
        except Exception as e:       # a dead or torn-down vCPU: say so, never break the run
            return f"{head}  (state unavailable: {e})"
        insn = None
        if d.get("exit") == "IoOut":
            prev = self._around(code, addr, rip, before=1, after=0)
            if prev and prev[0].address + prev[0].size == rip and _is_port_insn(prev[0].text):
                insn = prev[0]
        if insn is None:
            at = self._around(code, addr, rip, before=0, after=1)
            insn = at[0] if at else None
        text = f"{insn.address:#x}: {insn.text}" if insn else "(code not mapped)"
        where = f"rip={rip:#x}" + (f" <{d['symbol']}>" if d.get("symbol") else "")
        return f"{head}  {where}  {text}"


def _is_port_insn(text: str) -> bool:
    words = text.split()
    if words and words[0] in ("rep", "repe", "repne"):
        words = words[1:]
    return bool(words) and (words[0] in ("in", "out") or words[0].startswith(("ins", "outs")))
