"""All-stop run control: which vCPUs may run, the one recorded stop, and guest-debug state.

The machine calls ``debugger.before_run(cpu_thread)`` before every KVM_RUN (one test in the hot
loop), ``debugger.on_debug(cpu_thread, exit)`` on KVM_EXIT_DEBUG and ``debugger.on_crash(cpu_thread,
reason)`` before it ends the run for a crash. A vCPU may run only while it has ``go``; the first
vCPU to stop (breakpoint, watchpoint, finished step, plane switch with ``stop_on_switch``, crash,
Ctrl-C) records the stop, and every other vCPU is kicked out of KVM_RUN and parks in
``before_run``. The gdb session answers once every vCPU is parked. At start every vCPU parks
before its first instruction until gdb resumes it.

Single-step uses KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ so a step never enters an
interrupt handler. Guest debug is set on every plane's KVM vCPU.
"""

from __future__ import annotations

import threading
import time

from ...kvm import KvmError
from ...uapi import constants as C
from ...x86.arch import MAX_PLANES
from .memory import MemoryAndBreakpoints

SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11


def tid_of(vcpu: int, plane: int) -> int:
    """gdb's thread id of one plane of one vCPU."""
    return vcpu * MAX_PLANES + plane + 1


def split_tid(tid: int) -> tuple[int, int]:
    return divmod(tid - 1, MAX_PLANES)


class AllStopControl:
    """The machine's ``debugger``: lives as long as the machine, across gdb sessions."""

    def __init__(self, machine, caps, label: str = "plane", stop_on_switch: bool = False, log=None):
        self.m = machine
        self.caps = caps
        self.label = label
        self.log = log or (lambda msg: None)
        self.bps = MemoryAndBreakpoints(machine.memory, caps)
        self.cv = threading.Condition()
        n = len(machine.threads)
        self.go = [False] * n
        self.parked = [False] * n
        self.last_plane = [0] * n
        self.actions: dict[int, str] = {}      # vCPU index -> "c" or "s"
        self.step_planes: dict[int, int] = {}  # vCPU index -> the plane a "s" steps
        self.step_switch_reported: dict[int, bool] = {}   # a step's switch told, the switch stop not yet
        self.running = False           # gdb is waiting for a stop reply
        self.stop = None               # (signal, reason, tid, message) of the recorded stop
        self.pending_steps: dict[int, tuple] = {}
        self.stop_on_switch = stop_on_switch
        self._applied: dict[int, tuple] = {}   # id(kvm vcpu) -> (control, debugregs)
        self.detached = False
        self.killed = False
        self.ended = None                      # RunResult once the machine finished

    # -- hooks called by vCPU threads ---------------------------------------------------------
    def before_run(self, t) -> bool:
        i = t.index
        if self.go[i] and t.plane == self.last_plane[i]:
            return True
        return self._before_run_slow(t)

    def _before_run_slow(self, t) -> bool:
        i = t.index
        with self.cv:
            if t.plane != self.last_plane[i]:
                self._on_switch(t)
            if not self._park(i):
                return False
            if t.plane != self.last_plane[i]:     # a switch kept for the resume (stop_on_switch)
                self._on_switch(t)
                return self._park(i)
            return True

    def _on_switch(self, t) -> None:
        """vCPU ``t`` switched planes since it last ran (under cv): stop there if gdb wants to."""
        i, src, dst = t.index, self.last_plane[t.index], t.plane
        stepped = not self.detached and self.actions.get(i) == "s" and self.step_planes.get(i) == src
        message = (f"the step switched vCPU {i} from {self.pl(src)} to {self.pl(dst)}; "
                   f"{self.pl(dst)} (thread {tid_of(i, dst)}) has not run yet")
        if self.detached or not (self.go[i] and self.may_stop()):
            if stepped:            # reported when gdb resumes this step (another stop came first)
                self.pending_steps[i] = (SIGTRAP, "", tid_of(i, src), message)
            if self.detached or stepped or not self.stop_on_switch:
                self.last_plane[i] = dst
            return                 # with stop_on_switch, reported when gdb next resumes the vCPU
        step_reported = self.step_switch_reported.pop(i, False)
        if stepped and not step_reported:
            # the stepped instruction switched planes: the step ends on the stepped thread (gdb
            # asserts that a step-over stops there) before the other plane's next instruction runs
            if self.stop_on_switch:
                self.step_switch_reported[i] = True    # the switch stop comes when gdb continues
            else:
                self.last_plane[i] = dst
            self.record_stop(t, SIGTRAP, "", message, plane=src)
            return
        self.last_plane[i] = dst
        if self.stop_on_switch and self.actions.get(i) != "s":     # a step stops on its own thread only
            self.record_stop(t, 0, "", f"plane switch on vCPU {i}: {self.pl(src)} -> {self.pl(dst)}")

    def _park(self, i: int) -> bool:
        """Wait (under cv) until vCPU ``i`` may run; False if the run is ending."""
        while not self.go[i]:
            if self.m.stopping or self.killed:
                self.parked[i] = False
                return False
            if not self.parked[i]:
                self.parked[i] = True
                self.cv.notify_all()     # once: parked vCPUs notifying each other would spin
            self.cv.wait(0.1)
        self.parked[i] = False
        return True

    def on_debug(self, t, ex) -> None:
        """KVM_EXIT_DEBUG on vCPU thread ``t``: a breakpoint, watchpoint or finished step."""
        if self.detached or self.killed or self.ended is not None:
            return
        sig, reason, is_step = SIGTRAP, "", False
        if ex.exception == 3:
            reason = "swbreak:;"
            v = t.plane_vcpu()
            rip = v.regs.rip
            if rip not in self.bps.sw_bps and rip - 1 in self.bps.sw_bps:   # report the int3's own address
                v.regs.rip = rip - 1
                v.mark_dirty("regs")
        elif ex.exception == 1:
            hit = self.bps.hw_slot_hit(ex.dr6)
            if hit is not None:
                kind, addr, _ = hit
                reason = {"exec": "hwbreak:;", "swexec": "swbreak:;", "write": f"watch:{addr:x};",
                          "access": f"awatch:{addr:x};"}[kind]
            elif ex.dr6 & 0x4000:
                is_step = True
        i = t.index
        with self.cv:
            if is_step and (self.actions.get(i) != "s" or self.step_planes.get(i) != t.plane):
                return     # a stale single-step trap (the step was given up): ignore
            if self.go[i] and self.may_stop():
                self.record_stop(t, sig, reason, None)
            elif is_step:
                self.pending_steps[i] = (sig, reason, tid_of(i, t.plane), None)
            # a breakpoint hit that loses the race to another stop is hit again on resume

    def on_crash(self, t, reason: str) -> None:
        """The machine is about to end the run for a crash on ``t``'s thread: stop there so gdb can look."""
        if self.detached or self.ended is not None or t.thread is not threading.current_thread():
            return
        with self.cv:
            if not self.may_stop():
                return
            self.record_stop(t, SIGSEGV, "", f"guest crashed on vCPU {t.index} {self.pl(t.plane)}: "
                                             f"{reason}; continuing ends the run")
            self._park(t.index)

    # -- stop bookkeeping (under cv) --------------------------------------------------------
    def pl(self, plane: int) -> str:
        return f"VTL{plane}" if self.label == "VTL" else f"plane {plane}"

    def may_stop(self) -> bool:
        return self.running and self.stop is None and not self.detached

    def record_stop(self, t, sig, reason, message, plane: int | None = None) -> None:
        """Stop every vCPU; gdb hears of it on thread (t's vCPU, ``plane`` or the running plane)."""
        self.stop = (sig, reason, tid_of(t.index, t.plane if plane is None else plane), message)
        self.halt_all(exclude=t.index)

    def halt_all(self, exclude: int | None = None) -> None:
        for k in range(len(self.go)):
            self.go[k] = False
        for t in self.m.threads:
            if t.index != exclude:
                t.planes_vcpu.kick()
        self.cv.notify_all()

    def all_parked(self) -> bool:
        for t in self.m.threads:
            th = t.thread
            if th is not None and th.is_alive() and not self.parked[t.index]:
                return False
        return True

    def wait_parked(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not self.all_parked() and time.monotonic() < deadline:
                self.cv.wait(0.05)

    def poll_stop(self):
        """While gdb waits: "exit" once the run ended, the stop once every vCPU parked, else None."""
        with self.cv:
            if self.ended is not None:
                return "exit"
            stop = self.stop
            if stop is None and not self.m.stopping:
                resumed = [t for t in self.m.threads if self.go[t.index]]
                if resumed and not any(t.thread is None or t.thread.is_alive() for t in resumed) \
                        and not all(t.done for t in self.m.threads):
                    # every resumed vCPU finished and the others are parked: that is a stop
                    t = resumed[0]
                    self.stop = stop = (SIGTRAP, "", tid_of(t.index, t.plane), f"vCPU {t.index} finished")
                    self.halt_all()
            if stop is not None and self.all_parked():
                self.running = False
                return stop
            return None

    def interrupt(self) -> None:
        """gdb's ^C: stop every vCPU."""
        with self.cv:
            if not self.may_stop():
                return
            t = next((t for t in self.m.threads if not t.done), self.m.threads[0])
            self.stop = (SIGINT, "", tid_of(t.index, t.plane), None)
            self.halt_all()

    def set_stop_on_switch(self, on: bool) -> None:
        with self.cv:
            self.stop_on_switch = on
            for t in self.m.threads:
                self.last_plane[t.index] = t.plane

    def finished(self, result) -> bool:
        """The machine finished; True if gdb was waiting for a stop (and so hears of it at once)."""
        with self.cv:
            self.ended = result
            self.cv.notify_all()
            return self.running

    # -- guest debug state --------------------------------------------------------------------------
    def apply_debug(self) -> None:
        """Program KVM_SET_GUEST_DEBUG on every plane's KVM vCPU (all vCPU threads are parked)."""
        dr7, dregs = self.bps.debugregs()
        base = 0
        if not self.detached:
            if self.bps.sw_bps:
                base |= C.KVM_GUESTDBG_USE_SW_BP
            if dr7:
                base |= C.KVM_GUESTDBG_USE_HW_BP
        step = C.KVM_GUESTDBG_SINGLESTEP | (C.KVM_GUESTDBG_BLOCKIRQ if self.caps.blockirq else 0)
        for t in self.m.threads:
            stepping = not self.detached and self.actions.get(t.index) == "s"
            for p in t.planes_vcpu.planes:
                # only the stepped plane single-steps: the others run until it gets the vCPU back
                control = base | (step if stepping and self.step_planes.get(t.index) == p else 0)
                if control:
                    control |= C.KVM_GUESTDBG_ENABLE
                state = (control, tuple(dregs) if control & C.KVM_GUESTDBG_USE_HW_BP else ())
                v = t.planes_vcpu.plane_vcpu(p)
                if self._applied.get(id(v), (0, ())) == state:
                    continue
                v.set_guest_debug(control, dregs if control & C.KVM_GUESTDBG_USE_HW_BP else None)
                self._applied[id(v)] = state

    # -- resuming and ending -----------------------------------------------------------------------------
    def resume(self, actions: dict[int, str], step_planes: dict[int, int] | None = None) -> None:
        """Let the vCPUs in ``actions`` run: "c" continue, "s" one instruction of the plane
        ``step_planes[vcpu]`` (default: the running plane; a suspended plane steps once it runs again)."""
        step_planes = dict(step_planes or {})
        for i, a in actions.items():
            if a == "s":
                step_planes.setdefault(i, self.m.threads[i].plane)
        with self.cv:
            pending = [self.pending_steps[i] for i, a in actions.items() if a == "s" and i in self.pending_steps]
            self.pending_steps.clear()
            if pending:            # that step already happened while another vCPU's stop was reported
                self.stop = pending[0]
                self.running = True
                return
            self.actions = dict(actions)
            self.step_planes = step_planes
            self.apply_debug()
            self.stop = None
            self.running = True
            for t in self.m.threads:
                self.go[t.index] = t.index in actions
            self.cv.notify_all()

    def attach(self) -> None:
        """A new gdb session after a detach: stop every vCPU where it is, as a stop gdb asks for with '?'."""
        with self.cv:
            self.detached = False
            self.actions = {}
            self.pending_steps.clear()
            self.step_switch_reported.clear()
            for t in self.m.threads:
                self.last_plane[t.index] = t.plane
            t = next((t for t in self.m.threads if not t.done), self.m.threads[0])
            self.stop = (SIGTRAP, "", tid_of(t.index, t.plane), None)
            self.running = False
            self.halt_all()

    def detach(self) -> None:
        with self.cv:
            self.bps.remove_all()
            self.detached = True
            self.stop_on_switch = False
            self.actions = {}
            try:
                self.apply_debug()
            except KvmError as e:
                self.log(f"gdb stub: could not clear guest debug: {e}")
            self.running = False
            for k in range(len(self.go)):
                self.go[k] = True
            self.cv.notify_all()
        self.log("gdb stub: gdb detached; the guest runs on")

    def kill(self) -> None:
        with self.cv:
            self.killed = True
            self.bps.remove_all()
            self.cv.notify_all()
        self.log("gdb stub: killed from gdb; stopping the run")
        self.m.finish_now()
