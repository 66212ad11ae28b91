"""Wiring of ``pykvmm run``'s debugging options onto a Machine (keeps the CLI thin).

    session = DebugSession(trace="t.json", trace_exits=True, dump_on_exit=True, gdb="1234")
    session.attach(machine, label)      # before machine.run()
    result = machine.run(timeout)
    session.after_run(result)           # before the machine is closed
"""

from __future__ import annotations

import sys

from . import trace as tr
from .exits import ExitAnnotator, ExitPrinter
from .stream import TraceStream, TraceWriteError
from .symbols import Symbols


def gdb_address(value: str) -> str:
    """--gdb VALUE: a unix socket path (contains '/'), HOST:PORT, or a TCP port on 127.0.0.1."""
    if "/" in value:
        return value
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--gdb takes a TCP port, HOST:PORT or a unix socket path, not {value!r}")
    return f"{host or '127.0.0.1'}:{int(port)}"


class DebugSession:
    def __init__(self, trace: str | None = None, trace_format: str | None = None, trace_exits: bool = False,
                 dump_on_exit: bool = False, gdb: str | None = None, gdb_stop_on_switch: bool = False,
                 symbols=None, err=None):
        self.trace_path = trace
        self.trace_format = tr.format_for(trace, trace_format) if trace else None
        self.trace_exits = trace_exits
        self.dump_on_exit = dump_on_exit
        self.gdb = gdb
        self.gdb_stop_on_switch = gdb_stop_on_switch
        self.symbols = symbols if symbols is not None else Symbols()
        self.err = err or sys.stderr
        self.trace_stream = None
        self.stub = None
        self.machine = None
        self.label = "plane"

    @property
    def active(self) -> bool:
        return bool(self.trace_path or self.trace_exits or self.dump_on_exit or self.gdb)

    def _say(self, msg: str) -> None:
        self.err.write(f"pykvmm: {msg}\n")
        self.err.flush()

    def attach(self, machine, label: str = "plane") -> None:
        self.machine = machine
        self.label = label
        address = gdb_address(self.gdb) if self.gdb else None
        sinks = [machine.trace] if machine.trace else []
        if self.trace_path or self.trace_exits:
            sinks.append(ExitAnnotator(machine, self.symbols))
        if self.trace_path:
            self.trace_stream = TraceStream(self.trace_path, self.trace_format)   # fails now (exit 2)
            sinks += [tr.IpiAnnotator(machine), self.trace_stream]
        if self.trace_exits:
            sinks.append(ExitPrinter(machine, self.err, "vtl" if label == "VTL" else "plane"))
        if sinks:
            machine.trace = sinks[0] if len(sinks) == 1 else tr.Fanout(*sinks)
        if address:
            from .gdb import GdbStub
            self.stub = GdbStub(machine, address, stop_on_switch=self.gdb_stop_on_switch,
                                label="VTL" if label == "VTL" else "plane", log=self._say, symbols=self.symbols)
            where = self.stub.start()
            target = where if "/" in where else f":{where.rpartition(':')[2]}"
            self._say(f"gdb stub listening on {where}; waiting for gdb (target remote {target})")

    def after_run(self, result) -> None:
        """Finish the gdb session, write the trace, print --dump-on-exit (machine still open)."""
        m = self.machine
        if self.stub is not None:
            self.stub.finish(result)
            if self.stub.killed:
                from ..vmm.machine import ExitStatus
                result.status = ExitStatus.INTERRUPTED
                result.message = "killed from gdb"
                if m is not None and not result.timeout_reports:
                    result.timeout_reports = [m.capture(t) for t in m.threads if not t.done]
        if self.trace_stream is not None:
            try:
                fmt = self.trace_stream.close()
                self._say(f"trace: {len(self.trace_stream)} events written to {self.trace_path} ({fmt})")
            except TraceWriteError as e:
                from ..vmm.machine import ExitStatus
                self._say(str(e))
                if result.status == ExitStatus.DONE:     # the guest's own failure stays the status
                    result.status = ExitStatus.OUTPUT_FAILED
        if self.dump_on_exit and m is not None:
            from .dump import format_cpu_report
            for t in m.threads:
                self.err.write(format_cpu_report(m.capture(t), self.label, self.symbols) + "\n")
            self.err.flush()
