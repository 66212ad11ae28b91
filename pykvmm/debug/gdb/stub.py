"""The gdb server: listens on TCP or a unix socket and serves gdb sessions on the machine's
all-stop control (see control.py), one connection at a time."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
import traceback

from .control import AllStopControl
from .framing import Disconnected, PacketConnection
from .handlers import GdbSession
from .hostcaps import HostDebugCaps, probe_host


class GdbStub:
    def __init__(self, machine, address: str, stop_on_switch: bool = False, label: str = "plane",
                 log=None, caps: HostDebugCaps | None = None, symbols=None):
        self.m = machine
        self.symbols = symbols
        self.address = address
        self.log = log or (lambda msg: None)
        caps = caps if caps is not None else probe_host(machine.pvm.backend, machine.config.kvm_device)
        if caps.detail:
            self.log(f"gdb stub: {caps.detail}")
        self.control = AllStopControl(machine, caps, label=label, stop_on_switch=stop_on_switch, log=self.log)
        self.session: GdbSession | None = None
        self.connected = False
        self.listen_address = None
        self._listener = None
        self._thread = None
        self._closing = False
        self._socket_inode = None

    @property
    def killed(self) -> bool:
        return self.control.killed

    # -- lifecycle (main thread) ------------------------------------------------------------
    def start(self) -> str:
        """Listen, start the stub thread; returns a printable address."""
        addr = self.address
        if "/" in addr:
            _remove_stale_socket(addr)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(_bind_path(addr))
            self.listen_address = addr
            self._socket_inode = os.stat(addr).st_ino
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
        self.m.debugger = self.control
        self.m.crash_hooks.append(lambda crash: self.control.on_crash(self.m.threads[crash.vcpu], crash.reason))
        self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._thread.start()
        return self.listen_address

    def finish(self, result, wait: float | None = None) -> None:
        """The machine finished: tell gdb (W packet) and wait for the session to end."""
        waiting = self.control.finished(result)
        session = self.session
        if self.connected and session is not None and not session.over and not waiting:
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
        session = self.session
        if session is not None and session.conn is not None:
            session.conn.close()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        if self.listen_address and "/" in self.listen_address:
            try:
                if os.stat(self.listen_address).st_ino == self._socket_inode:   # still ours
                    os.unlink(self.listen_address)
            except OSError:
                pass
        self._listener = None

    # -- the connection -----------------------------------------------------------------------------
    def _accept(self):
        while not self._closing and self.control.ended is None:
            try:
                sock, _ = self._listener.accept()
                return sock
            except socket.timeout:
                continue
            except OSError:
                return None
        return None

    def _serve(self) -> None:
        """Serve gdb sessions one after another until the run ends or gdb kills it: after a
        detach (or a gdb that went away) the next ``target remote`` attaches again, as with QEMU."""
        while True:
            sock = self._accept()
            if sock is None:
                return
            conn = PacketConnection(sock)
            self.session = session = GdbSession(self.control, conn, self.symbols)
            if self.connected:
                self.control.attach()
                self.log("gdb stub: gdb connected again; every vCPU stops")
            else:
                self.log("gdb stub: gdb connected")
            self.connected = True
            try:
                session.run()
            except Disconnected:
                if not session.over and not self.control.killed:
                    self.log("gdb stub: gdb went away without detaching; the guest runs on")
                    self.control.detach()
            except Exception:       # never leave the vCPUs parked behind a dead stub
                self.log("gdb stub: internal error, detaching:\n" + traceback.format_exc())
                self.control.detach()
            finally:
                session.over = True
                conn.close()
            if self.control.killed or self.control.ended is not None:
                return


def _remove_stale_socket(path: str) -> None:
    """Unlink a unix socket left by a run that is gone; refuse one a live program listens on
    (another pykvmm given the same --gdb path) and anything that is not a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{path} exists and is not a unix socket")
    if _listening(path):
        raise ValueError(f"{path} is in use: another program (another pykvmm?) listens on it")
    os.unlink(path)               # nobody listens: a leftover


def _bind_path(path: str) -> str:
    """The absolute path when it fits sun_path, so that /proc/net/unix names it exactly."""
    full = os.path.abspath(path)
    return full if len(full.encode()) < 108 else path


def _listening(path: str) -> bool:
    """Whether a socket listens on ``path``, from /proc/net/unix: connecting to find out would
    look like a gdb connection to the stub listening there."""
    want = {path, _bind_path(path)}
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                cols = line.split(None, 7)      # Num RefCount Protocol Flags Type St Inode Path
                if len(cols) == 8 and cols[7].rstrip("\n") in want and int(cols[3], 16) & 0x10000:
                    return True              # __SO_ACCEPTCON: listening
    except (OSError, StopIteration, ValueError):
        return True                          # cannot tell: never take it
    return False
