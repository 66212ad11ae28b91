"""The run loop of one vCPU, and the one place where what a handler decided is applied.

Three vCPU types, one name each, used everywhere:
    ``kvm.Vcpu``            one KVM vCPU fd (a plane's registers, LAPIC, ...): ``vcpu``
    ``planes.PlanesVcpu``   a vCPU with one ``kvm.Vcpu`` per plane; ``run(plane=)``: ``planes_vcpu``
    ``VcpuThread``          this module: the thread that runs a PlanesVcpu: ``thread``

One thread per vCPU owns every plane of that vCPU, so two planes of one vCPU never run at
once. Each KVM_RUN exit goes to a handler (a table keyed by exit type; port writes through a
table keyed by port); a handler returns an outcome (:mod:`pykvmm.vmm.outcomes`) and
:meth:`VcpuThread.apply` carries it out. A whole plane switch, read top to bottom, is
:meth:`VcpuThread.switch`.
"""

from __future__ import annotations

import signal
import threading
import traceback

from .. import exits as X
from ..kvm import KvmError, Vcpu
from ..planes.api import KICK_SIGNAL
from ..uapi import constants as C, ffi
from ..x86 import apic, arch
from . import abi, events as ev
from .crash_state import recover_after_shutdown
from .devices import BadUcall, decode_ucall
from .devices.bus import ABSENT_READ, ABSENT_WRITE
from .hypercalls import OUT_SIZE, STUB_OUT_OFFSETS, call_name
from .hyperv import tlfs
from .memory import GuestMemoryError
from .outcomes import Answer, Fault, Outcome, Stop, StopKind, Switch, SwitchReason


_DEVICE_PORT = object()      # port_handlers has no entry: the port bus's devices answer


def lapic_bytes(vcpu: Vcpu) -> bytes:
    return bytes(ffi.buffer(vcpu.get_lapic().regs))


def _name_os_thread(name: str) -> None:
    """Name this thread for the OS (top -H, /proc/PID/task/*/comm): which thread is which vCPU."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


class VcpuThread:
    """Which plane of one vCPU runs, the suspended-plane stack, the exit and port handlers."""

    def __init__(self, machine, index: int, planes_vcpu):
        self.machine = machine
        self.index = index
        self.planes_vcpu = planes_vcpu
        self.plane = 0                              # the plane that runs (or last ran)
        self.vcpu = planes_vcpu.plane0              # its KVM vCPU: set together with self.plane
        self.suspended: list[int] = []              # planes waiting in a VtlCall or preempted
        self._plane_vcpus: dict[int, Vcpu] = {}     # plane -> its KVM vCPU, for switch(): a lookup
                                                    # here costs no Python frame (they never change)
        self.started_planes = {0}
        self.done = False
        self.thread: threading.Thread | None = None
        self.exits = 0
        self.switches: dict[tuple[int, int], int] = {}
        self.entry_reasons: dict[SwitchReason, int] = {}   # (the machine's result names them)
        self.kicks = 0                  # exits that were kicks (not the guest's doing)
        self.halt_probe_seen = 0        # Machine.halt_probe this thread last answered
        self.halted_for_good = False    # its answer
        # port -> handler(IoOut exit) returning an outcome; None ignores the write. Public:
        # devices and tests add ports with set_port_handler().
        self.port_handlers = {
            abi.PORT_UCALL: self._on_ucall,
            abi.PORT_CONSOLE: self._on_console,
            abi.PORT_HYPERCALL: self._on_hypercall,
            abi.PORT_NULL: None,
        }
        self._exit_handlers = {
            X.IoOut: self._on_io_out,
            X.IoIn: self._on_io_in,
            X.Mmio: self._on_mmio,
            X.Interrupted: self._on_interrupted,
            X.PlaneEvent: self._on_plane_event,
            X.Shutdown: self._on_shutdown,
            X.FailEntry: lambda ex: self._crashed(
                f"KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason "
                f"{ex.hardware_entry_failure_reason:#x}): the vCPU state is invalid"),
            X.InternalError: lambda ex: self._crashed(
                f"KVM internal error {X.INTERNAL_ERROR_NAMES.get(ex.suberror, str(ex.suberror))} "
                f"(KVM_EXIT_INTERNAL_ERROR, data {' '.join(hex(d) for d in ex.data)})"),
            X.SystemEvent: lambda ex: self._crashed(f"guest requested system event {ex.type} (KVM_EXIT_SYSTEM_EVENT)"),
            X.Hlt: lambda ex: self._crashed("guest halted with no in-kernel irqchip to wake it (KVM_EXIT_HLT)"),
            X.Debug: self._on_debug,
            X.MemoryFault: self._on_memory_fault,
        }
        self._apply = {Answer: self._answer, Fault: self._fault, Switch: self.switch, Stop: self._stop}
        self._unknown_ports: set[tuple[str, int]] = set()   # unhandled accesses already warned about
        self._ports = machine.ports
        self._port_owner = machine.ports.owner       # port -> device (PortBus)
        self.outside_ram = [0, 0, None]      # reads, writes, first GPA (summed by the machine)
        self._fast_switch = None             # fastexit.FastSwitch while main() runs with one

    def plane_vcpu(self, plane: int | None = None) -> Vcpu:
        """The KVM vCPU of ``plane`` (default: the running plane, also ``self.vcpu``)."""
        return self.vcpu if plane is None else self.planes_vcpu.plane_vcpu(plane)

    def set_port_handler(self, port: int, handler) -> None:
        """Writes to ``port`` go to ``handler(exit)``, which returns an outcome (or None)."""
        self.port_handlers[port] = handler
        self._ports.unmark_absent(port, ABSENT_WRITE)    # the fast path must not drop them

    @property
    def fast_exits(self) -> int:
        """Exits of this vCPU the fast path answered (``exits`` counts the others)."""
        return sum(self.planes_vcpu.plane_vcpu(p).fast_exits for p in self.planes_vcpu.planes)

    def set_exit_handler(self, exit_type: type, handler):
        """Exits of ``exit_type`` (an exits.Exit class) go to ``handler(exit)``, which returns
        an outcome (or None); e.g. a personality's MSR exits. Returns the handler it replaces
        (None if none), for a handler that adds to it."""
        previous = self._exit_handlers.get(exit_type)
        self._exit_handlers[exit_type] = handler
        return previous

    # -- the loop ------------------------------------------------------------------------
    def main(self) -> None:
        m = self.machine
        _name_os_thread(f"vcpu{self.index}")
        # SIGINT/SIGTERM go to the main thread, which waits for them (Machine.run)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        handlers = self._exit_handlers
        apply = self._apply
        policy = m.policy
        planes_vcpu = self.planes_vcpu
        sink = m.trace
        dbg = m.debugger
        # The exit fast path answers some exits in C (Machine._attach_fast_path): not while a
        # trace sink or the gdb stub (breakpoints, single-step) must see every exit.
        if m.fast_table is not None and not sink and not dbg:
            self.vcpu.use_fast_path(m.fast_table)
        # The policy's switches in C (Machine.fast_switch_for) while no plane is requested.
        fast_switch = None
        if not sink and not dbg and self.port_handlers.get(abi.PORT_HYPERCALL) == self._on_hypercall:
            fast_switch = self._fast_switch = m.fast_switch_for(self)
        try:
            while not self.done and not m.stopping:
                if dbg and not dbg.before_run(self):   # a gdb stub holds this vCPU (all-stop)
                    continue
                plane = self.plane
                req = policy.req_exit_planes(self)
                if fast_switch is not None and not req:
                    ex = planes_vcpu.run_switching(plane, fast_switch)
                    if fast_switch.switched:
                        self._took_fast_switches(fast_switch)
                        plane = self.plane
                else:
                    ex = planes_vcpu.run(plane, req)
                self.exits += 1
                if sink:
                    sink(ev.TraceEvent(ev.EXIT, self.index, plane, X.fields(ex)))
                try:
                    handler = handlers[type(ex)]
                except KeyError:
                    outcome = self._crashed(f"unexpected exit {ex.describe()}")
                else:
                    outcome = handler(ex) if handler is not None else None
                if outcome is not None:
                    apply[type(outcome)](outcome)
        except GuestMemoryError as e:
            self._stop(self._crashed(f"guest passed a bad address: {e}"))
        except KvmError as e:
            self._stop(self._crashed(f"KVM error: {e}"))
        except Exception:
            self._stop(self._crashed("pykvmm internal error in the vCPU thread (please report):\n"
                                     + traceback.format_exc()))
        finally:
            m.thread_finished(self)

    def _took_fast_switches(self, fast_switch) -> None:
        """The C loop made switches (fastexit.FastSwitch): what switch() would have recorded."""
        calls, returns, pairs = fast_switch.take_switches()
        dst = fast_switch.plane
        self.plane, self.vcpu = dst, fast_switch.vcpus[dst]
        self.suspended[:] = fast_switch.stack()
        entered = fast_switch.entered
        self.started_planes.update(p for p in fast_switch.vcpus if entered >> p & 1)
        for src, to, n in pairs:
            self.switches[(src, to)] = self.switches.get((src, to), 0) + n
        dispatcher = self.machine.dispatcher
        for reason, code, n in ((SwitchReason.CALL, tlfs.HVCALL_VTL_CALL, calls),
                                (SwitchReason.RETURN, tlfs.HVCALL_VTL_RETURN, returns)):
            if n:
                self.entry_reasons[reason] = self.entry_reasons.get(reason, 0) + n
                dispatcher.add_counts(code, n)

    def apply(self, outcome: Outcome) -> None:
        """Carry out what a handler decided (the loop does this for every handler)."""
        if outcome is not None:
            self._apply[type(outcome)](outcome)

    # -- the outcomes ----------------------------------------------------------------------
    def _answer(self, answer: Answer) -> None:
        vcpu = self.vcpu
        regs = vcpu.regs
        regs.rax = answer.status
        for name, value in answer.outputs:
            setattr(regs, name, value)
        vcpu.mark_dirty("regs")

    def _fault(self, fault: Fault) -> None:
        m, plane = self.machine, self.plane
        self.inject_exception(plane, fault.vector, at_hypercall=fault.at_hypercall)
        if m.trace:
            m.trace(ev.TraceEvent(ev.FAULT, self.index, plane, {"vector": fault.vector, "why": fault.why}))
        m.record_fault(self.index, plane, fault)

    def switch(self, switch: Switch) -> None:
        """Leave the running plane for ``switch.target``: the whole of a plane switch."""
        policy = self.machine.policy
        src = self.plane
        if switch.status is not None:       # the caller's answer stays with it (as _answer does)
            regs = self.vcpu.regs
            regs.rax = switch.status
            self.vcpu.mark_dirty("regs")
        dst = self.suspended.pop() if switch.target is None else switch.target
        first = dst not in self.started_planes
        if first:
            self.started_planes.add(dst)
        vcpu = self._plane_vcpus.get(dst)
        if vcpu is None:
            vcpu = self._plane_vcpus[dst] = self.planes_vcpu.plane_vcpu(dst)
        policy.transfer(self, src, dst, vcpu, switch.reason, first)   # the shared state, once
        if switch.suspend:
            self.suspended.append(src)
        if switch.load_return_regs is not None:             # after the shared RAX/RCX arrived
            regs = vcpu.regs
            regs.rax, regs.rcx = switch.load_return_regs
            vcpu.mark_dirty("regs")
        self.plane, self.vcpu = dst, vcpu
        if self._fast_switch is not None:
            self._fast_switch.set_stack(self.suspended)
        self.switches[(src, dst)] = self.switches.get((src, dst), 0) + 1
        reason = switch.reason
        self.entry_reasons[reason] = self.entry_reasons.get(reason, 0) + 1
        sink = self.machine.trace
        if sink:
            sink(ev.TraceEvent(ev.SWITCH, self.index, dst, {"from": src, "to": dst, "why": reason.value}))

    def _stop(self, stop: Stop) -> None:
        m = self.machine
        if stop.kind is StopKind.DONE:
            self.done = True
        elif stop.kind is StopKind.ASSERT:
            m.fail(stop.ucall)                              # stops every vCPU
        else:
            m.crash(self, stop.detail, stop.state)
            self.done = True

    def _crashed(self, reason: str) -> Stop:
        return Stop(StopKind.CRASH, reason)

    # -- exits -----------------------------------------------------------------------------
    def _on_io_out(self, ex) -> Outcome:
        # .get with a default, not try/except: a device port is the common case and a
        # raised KeyError costs about a microsecond
        handler = self.port_handlers.get(ex.port, _DEVICE_PORT)
        if handler is _DEVICE_PORT:
            return self._on_device_out(ex)
        return handler(ex) if handler is not None else None

    def _on_device_out(self, ex) -> None:
        port, size, data = ex.port, ex.size, ex.data
        dev = self._port_owner(port)
        if dev is None:
            self._unknown_access("write to unhandled port {:#x} ignored", port)
            # the next ones: the fast path's (the mark is the machine's: not while another
            # vCPU thread has a handler for the port)
            if not any(port in t.port_handlers for t in self.machine.threads):
                self._ports.mark_absent(port, ABSENT_WRITE)
            return
        for i in range(0, size * ex.count, size):   # `rep outs` brings several values at once
            dev.io_write(port, size, int.from_bytes(data[i:i + size], "little"))

    def _on_io_in(self, ex) -> None:
        port, size = ex.port, ex.size
        dev = self._port_owner(port)
        if dev is None:                       # as a PC's open bus
            self._unknown_access("read of unhandled port {:#x} returned all ones", port)
            self._ports.mark_absent(port, ABSENT_READ)      # the next ones: the fast path's
            data = b"\xFF" * (size * ex.count)
        elif ex.count == 1:                   # the common case, kept short: it is a userspace exit
            data = dev.io_read(port, size).to_bytes(size, "little")
        else:                                 # `rep ins`
            data = b"".join(dev.io_read(port, size).to_bytes(size, "little") for _ in range(ex.count))
        self.vcpu.complete_io_in(ex, data)

    def _on_mmio(self, ex) -> None:
        bus = self.machine.mmio
        if ex.is_write:
            if bus.write(ex.phys_addr, ex.length, int.from_bytes(ex.data, "little")):
                return
        else:
            value = bus.read(ex.phys_addr, ex.length)
            if value is not None:
                self.vcpu.complete_mmio_read(value.to_bytes(ex.length, "little"))
                return
        # Nothing answers there (no RAM, no device): as on a PC's open bus, reads return all
        # ones and writes are dropped. Counted here, reported once in the summary.
        seen = self.outside_ram
        if seen[2] is None:
            seen[2] = ex.phys_addr
        if ex.is_write:
            seen[1] += 1
        else:
            seen[0] += 1
            self.vcpu.complete_mmio_read(b"\xFF" * ex.length)

    def _unknown_access(self, what: str, port: int) -> None:
        """Warn once per (what, port); a guest polling an absent port costs a set lookup."""
        key = (what, port)
        if key not in self._unknown_ports:
            self._unknown_ports.add(key)
            self.machine.warn(f"vcpu{self.index}/plane{self.plane}: {what.format(port)}", kind="unhandled port")

    def _on_interrupted(self, ex) -> None:
        # a kick: the loop re-checks stop/done and runs again; first answer a halt probe
        self.kicks += 1
        probe = self.machine.halt_probe
        if probe != self.halt_probe_seen:
            self.halted_for_good = self._halted_for_good()
            self.halt_probe_seen = probe

    def _halted_for_good(self) -> bool:
        """Halted with interrupts off, and nothing that could wake it: no NMI pending or
        possible from its LAPIC, no interrupt pending or armed in a plane that would preempt."""
        vcpu = self.plane_vcpu()
        if vcpu.get_mp_state() != C.KVM_MP_STATE_HALTED or vcpu.regs.rflags & arch.RFLAGS_IF:
            return False
        if vcpu.get_vcpu_events().nmi.pending or apic.could_interrupt(lapic_bytes(vcpu), nmi_only=True):
            return False
        req = self.machine.policy.req_exit_planes(self)
        return not any(apic.could_interrupt(lapic_bytes(self.plane_vcpu(p)))
                       for p in self.planes_vcpu.planes if req >> p & 1)

    def _on_plane_event(self, ex) -> Outcome:
        sink = self.machine.trace
        if sink:
            sink(ev.TraceEvent(ev.PLANE_EVENT, self.index, self.plane,
                               {"pending": ex.pending_event_planes, "target": ex.target}))
        return self.machine.policy.on_plane_event(self, ex)

    def _on_memory_fault(self, ex) -> Outcome:
        """The running plane's memory view forbade an access (planes/memview.py): the policy
        decides (the VTL personality makes it a secure intercept of the protecting VTL)."""
        sink = self.machine.trace
        if sink:
            sink(ev.TraceEvent(ev.FAULT, self.index, self.plane, {"memory_fault": ex.describe()}))
        return self.machine.policy.on_memory_fault(self, ex)

    def _on_shutdown(self, ex) -> Stop:
        vcpu = self.plane_vcpu()
        tid = threading.get_ident()

        def kick():                        # ends a re-execution that does not fault again
            vcpu.request_immediate_exit()
            signal.pthread_kill(tid, KICK_SIGNAL)
        return Stop(StopKind.CRASH, "triple fault (KVM_EXIT_SHUTDOWN)", state=recover_after_shutdown(vcpu, kick))

    def _on_debug(self, ex) -> Outcome:
        dbg = self.machine.debugger
        if dbg is None:
            return self._crashed(f"unexpected debug exit (exception {ex.exception}, pc {ex.pc:#x})")
        return dbg.on_debug(self, ex)

    # -- ports -----------------------------------------------------------------------------
    def _on_console(self, ex) -> None:
        self.machine.console.write(self.index, self.plane, ex.data)

    def _on_ucall(self, ex) -> Outcome:
        m = self.machine
        gpa = int.from_bytes(ex.data[:4], "little")
        try:
            uc = decode_ucall(m.memory, gpa, self.index, self.plane)
        except BadUcall as e:
            return self._crashed(f"malformed ucall: {e}")
        m.record_ucall(uc)
        if uc.verb == abi.UCALL_DONE:
            return Stop(StopKind.DONE, ucall=uc)
        if uc.verb == abi.UCALL_ASSERT:
            return Stop(StopKind.ASSERT, ucall=uc)
        return None

    def _on_hypercall(self, ex) -> Outcome:
        m = self.machine
        plane = self.plane
        regs = self.vcpu.regs
        control, outcome = m.dispatcher.dispatch(self, plane, regs)
        if m.trace and type(outcome) is not Fault:
            m.trace(ev.TraceEvent(ev.HYPERCALL, self.index, plane,
                                  {"name": call_name(control.code), "code": control.code,
                                   "rdx": regs.rdx, "r8": regs.r8,
                                   "status": outcome.status if type(outcome) is Answer else None}))
        return outcome

    # -- state changes other layers ask for ------------------------------------------------
    def inject_exception(self, plane: int, vector: int, at_hypercall: bool = False) -> None:
        """Make ``plane`` of this vCPU take exception ``vector`` on its next entry.
        ``at_hypercall``: the fault is the hypercall stub's `out`; some hosts (this PVM one)
        report RIP already past it at the exit, mainline KVM reports the `out` itself."""
        vcpu = self.planes_vcpu.plane_vcpu(plane)
        if at_hypercall:
            # Mainline KVM reports RIP on the `out` and skips it at the next KVM_RUN even if the
            # same RIP is written back; kvm_pvm reports it past. Completing the I/O first leaves
            # RIP past it on both.
            vcpu.complete_pending_io()
            regs = vcpu.regs
            if regs.rip - abi.HYPERCALL_PAGE_ADDR - OUT_SIZE in STUB_OUT_OFFSETS:
                regs.rip -= OUT_SIZE
                vcpu.mark_dirty("regs")
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 1 if vector in arch.EXCEPTIONS_WITH_ERROR_CODE else 0
        events.exception.error_code = 0
        events.flags = 0
        vcpu.set_vcpu_events(events)
