"""The machine: guest memory and image, the planes VM, one thread per vCPU, and the run's
lifecycle (start, stop, crash, result).

Where the rest lives: the run loop of one vCPU and the applying of handler outcomes in
``vcpu_thread.py``; the flat-binary boot set-up in ``bringup.py``; what a run returns in
``results.py``; crash-state capture in ``capture.py``; the personalities in ``personalities.py``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from .. import fastexit
from ..kvm import Kvm, Vcpu
from ..planes import open_planes_vm
from ..planes.api import install_kick_handler
from ..uapi import constants as C
from ..x86 import apic, arch, cpu_model, longmode
from .hyperv import features as hv_features   # registers the hv_* flags of --cpu
from .hyperv import tlfs
from . import abi, bringup, capture as _capture, events as ev
from .boot import FlatBinary
from .console import Console
from .devices import MmioBus, PortBus, Ucall
from .devices.pc import attach_pc_devices
from .host import convention
from .hypercalls import Dispatcher, call_name
from .memory import GuestMemory
from .outcomes import Fault
from .personalities import make_policy
from .results import CpuReport, Crash, ExitStatus, RunResult
from .vcpu_thread import VcpuThread, lapic_bytes

__all__ = ["Machine", "MachineConfig", "ExitStatus", "RunResult", "Crash", "CpuReport", "run_image"]

# What a run keeps of what a guest can repeat without end (README "Bounded host memory"):
# the newest entries are kept, the older ones only counted.
UCALL_HISTORY = 10_000         # ucalls in RunResult.ucalls (every verb counted in ucall_counts)
FAULT_HISTORY = 100            # injected faults in Machine.faults (all counted in faults_injected)
WARNING_EXAMPLES = 5           # warnings of one kind shown word for word; the rest "and N more like it"
WARNING_KINDS = 100            # kinds of warning kept; further kinds are only counted


# CPython hands the GIL to a waiting thread only when the holder blocks or after the switch
# interval (5 ms by default). A vCPU thread making exits in a row gives the GIL up only inside
# each short KVM_RUN and takes it back before a thread woken by a kick (a cross-plane IPI, the
# plane ticker's look) gets to run, so that thread waited up to 5 ms. While vCPU threads run,
# the interval is this instead (bench row 3, cross-VTL IPI at load 5: p50 734 -> 405 us,
# p90 4039 -> 680 us); it is restored when the last running machine stops.
VCPU_SWITCH_INTERVAL = 2e-4
_switch_lock = threading.Lock()
_switch_users = [0, None]           # machines running, the interval before the first


@contextlib.contextmanager
def short_gil_turns():
    with _switch_lock:
        if _switch_users[0] == 0:
            _switch_users[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_users[1], VCPU_SWITCH_INTERVAL))
        _switch_users[0] += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users[0] -= 1
            if _switch_users[0] == 0:
                sys.setswitchinterval(_switch_users[1])


@dataclass
class MachineConfig:
    vcpus: int = 1
    planes: int = 1
    mem_size: int = abi.DEFAULT_MEM_SIZE
    backend: str = "auto"
    personality: str = "auto"      # "auto": vtl when planes > 1, else none
    kvm_device: str = "/dev/kvm"
    arg: int = 0
    console_out: object = None     # a text stream; None = sys.stdout
    quiet: bool = False            # no console echo (tests read result.console)
    raw_console: bool = False      # pass guest console bytes unescaped (control characters too)
    kick_interval: float = 1e-3    # multivm/apic-groups ticker: in-kernel IPIs to inactive planes
    shared_fpu: bool = False
    trace: object = None           # callable(TraceEvent) or None
    hyperv: object = None          # hyperv.HvConfig: the Hyper-V enlightenments, or None
    cpu: str | None = None         # QEMU -cpu syntax (x86/cpu_model.py); None: all KVM supports
    pit: bool = True               # the in-kernel i8254 (KVM_CREATE_PIT2)
    vtl_boot: str = "pykvmm"       # "pykvmm": every VTL starts at the guest entry; "tlfs": only
                                   # VTL0 runs at reset (needs hv_vsm; see vmm/vsm/enable.py)
    fast_path: bool = True         # the compiled exit fast path where it applies (Machine._attach_fast_path)


class Machine:
    """A guest image on a planes VM. Public hooks for the debug layer: ``trace`` (a sink
    called with every TraceEvent, or None), ``debugger`` (the gdb stub's all-stop control),
    ``crash_hooks`` (callables(Crash) run when a vCPU crashes, before the machine stops)."""

    POLL_INTERVAL = 0.05     # how often run() looks at signals and the deadline
    HANG_CHECK_INTERVAL = 0.5  # how often it looks for vCPUs that made no exit (see _hung)

    def __init__(self, image, config: MachineConfig | None = None):
        self.config = cfg = config or MachineConfig()
        if not 1 <= cfg.vcpus <= abi.MAX_VCPUS:
            raise ValueError(f"--vcpus must be 1..{abi.MAX_VCPUS}, not {cfg.vcpus}")
        # The boot hook: a protocol object from boot/ (bytes are a flat pykvmm guest).
        self.boot = FlatBinary(image) if isinstance(image, (bytes, bytearray)) else image
        self.trace = cfg.trace
        self.debugger = None
        self.crash_hooks: list = []
        self.console = Console(out=None if cfg.quiet else (cfg.console_out or sys.stdout),
                               prefix_vcpus=cfg.vcpus > 1, prefix_planes=cfg.planes > 1,
                               raw=cfg.raw_console, on_closed=self._output_closed)
        self._warnings: dict[str, list] = {}     # kind -> [examples, count beyond them]
        self._warning_kinds_dropped = 0
        self.dispatcher = Dispatcher()
        self.faults: deque[tuple[int, int, int, str]] = deque(maxlen=FAULT_HISTORY)
        self.faults_injected = 0
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self.stopping = False
        self._stdout_closed = False
        self._console_blocked = False
        self._interrupted = False
        self.halt_probe = 0             # bumped to ask every vCPU thread whether it is halted for good
        self._progress = -1
        self._ucalls: deque[Ucall] = deque(maxlen=UCALL_HISTORY)
        self._ucall_counts: dict[str, int] = {}
        self._failure: Ucall | None = None
        self._crash_info: Crash | None = None
        self._exit_code: int | None = None
        self.ports, self.mmio = PortBus(), MmioBus()
        self.memory = None
        self.pvm = None
        self.hyperv = None
        self.kvm = Kvm(cfg.kvm_device)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction ----------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        max_vcpus = self.kvm.check_extension(C.KVM_CAP_MAX_VCPUS) or self.kvm.check_extension(C.KVM_CAP_NR_VCPUS)
        if max_vcpus and cfg.vcpus > max_vcpus:
            raise ValueError(f"--vcpus {cfg.vcpus} is more than this host's KVM allows ({max_vcpus})")
        self.pvm = pvm = open_planes_vm(self.kvm, cfg.backend)
        if hasattr(pvm, "kick_interval"):
            pvm.kick_interval = cfg.kick_interval
        if not 1 <= cfg.planes <= pvm.max_planes:
            raise ValueError(f"--planes must be 1..{pvm.max_planes} on the {pvm.backend} backend, not {cfg.planes}")
        self.plane_count = cfg.planes
        self.policy = make_policy(cfg.personality, cfg.planes)

        self.platform = attach_pc_devices(self)
        self.fast_table, self.fast_path_off = self._attach_fast_path()
        self.boot.check(cfg)
        self.memory = mem = GuestMemory(cfg.mem_size)
        pvm.set_user_memory_region(0, 0, cfg.mem_size, mem.hva)
        pvm.create_irqchip()
        self.platform.create_kvm_devices(pvm)
        if cfg.shared_fpu:
            pvm.enable_shared_fpu(True)
        for p in range(1, cfg.planes):
            pvm.create_plane(p)

        self.boot.write_memory(self)
        self.platform.write_memory(self)
        cpuid = self.kvm.supported_cpuid()
        if self.kvm.check_extension(C.KVM_CAP_TSC_DEADLINE_TIMER) > 0:
            longmode.offer_tsc_deadline(cpuid)      # (as QEMU does)
        self.cpu_model = None
        if cfg.cpu is not None:
            self.cpu_model = cpu_model.resolve(cfg.cpu, cpuid)
            for w in self.cpu_model.warnings:
                self.warn(w)
        self.osxsave = self.boot.long_mode and longmode.supports_xsave(cpuid)
        # A host that resets the vCPU on a triple fault: keep what each KVM_RUN enters with.
        self.shutdown_resets = convention(self.kvm, "shutdown").value == "reset"
        self.policy.attach(self)
        hv_config = cfg.hyperv
        if self.cpu_model is not None and self.cpu_model.spec.extension_flags("hyperv"):
            hv_config = hv_features.from_cpu_flags(self.cpu_model.spec.extension_flags("hyperv"), hv_config)
        if hv_config is not None:
            from .hyperv import HyperV
            self.hyperv = HyperV(self, hv_config)
            self.hyperv.attach()
            cpuid = self.hyperv.cpuid(cpuid)
        self.threads: list[VcpuThread] = []
        for i in range(cfg.vcpus):
            planes_vcpu = pvm.create_vcpu(i)
            longmode.adjust_cpuid_for_vcpu(cpuid, i, self.osxsave, add_flags=self.cpu_model is None)
            planes_vcpu.set_cpuid2(cpuid)
            for p in range(1, cfg.planes):
                pvm.planes[p].create_vcpu_plane(planes_vcpu)
            for p in range(cfg.planes):
                # (Hyper-V: the CPL check of every hypercall reads CS.DPL from the sync area.)
                sync = self.policy.sync_classes | (C.KVM_SYNC_X86_SREGS if self.hyperv else 0)
                v = planes_vcpu.plane_vcpu(p)
                self.boot.init_vcpu(self, v, i, p)
                bringup.enable_sync_regs(v, sync, self.shutdown_resets)
            self.threads.append(VcpuThread(self, i, planes_vcpu))
            if self.hyperv:
                self.hyperv.attach_thread(self.threads[-1])

    def _attach_fast_path(self):
        """(the exit fast path's table, None) or (None, why it is off).

        The table exists for the whole run; each vCPU thread decides at its start whether it
        runs with it (not while a trace sink or the gdb stub must see every exit). Off on
        machines with more than one plane: there the soft-switch backends look for other
        planes' interrupts after exits of the running plane (planes/softswitch.py: every
        scan_gap), a VTL may intercept port and MMIO accesses of a lower one (vmm/vsm), and the
        multivm backend checks MMIO exits against plane memory views; exits answered in C would
        skip all three (in-kernel IPIs into a waiting plane would wait for the 1 ms ticker
        instead of 50 us)."""
        if not self.config.fast_path:
            return None, "turned off in the machine's configuration"
        if self.plane_count > 1:
            return None, "off with more than one plane"
        on, why = fastexit.status()
        if not on:
            return None, why
        table = fastexit.FastTable(fastexit.load())
        self.ports.absent = memoryview(table.absent)
        self.platform.attach_fast_path(table)
        return table, None

    def fast_switch_for(self, thread: VcpuThread):
        """A fastexit.FastSwitch for ``thread`` when its policy lets a C loop make its switches
        (PlanePolicy.fast_switches) and nothing else must see them: the exit fast path is on,
        a soft-switching backend without a shared FPU, the VtlCall/VtlReturn codes still go
        to the policy. None otherwise (the caller checks the rest: no trace sink, no gdb stub,
        its hypercall port its own)."""
        if not self.config.fast_path or self.plane_count < 2 or self.pvm.shared_fpu:
            return None
        planes_vcpu = thread.planes_vcpu
        if not hasattr(planes_vcpu, "run_switching"):
            return None
        spec = self.policy.fast_switches(thread)
        policy, handlers = self.policy, self.dispatcher.handlers
        if spec is None or handlers.get(tlfs.HVCALL_VTL_CALL) != policy.vtl_call \
                or handlers.get(tlfs.HVCALL_VTL_RETURN) != policy.vtl_return:
            return None
        module = fastexit.load()
        if module is None:
            return None
        vcpus = {p: planes_vcpu.plane_vcpu(p) for p in spec}
        if any(v.run_struct is None for v in vcpus.values()):
            return None
        return fastexit.FastSwitch(module, vcpus, abi.PORT_HYPERCALL,
                                   {p: above for p, (above, _) in spec.items()},
                                   {p: self.memory.hva + gpa for p, (_, gpa) in spec.items()})

    # -- running ---------------------------------------------------------------------------
    def kick_all(self) -> None:
        for t in self.threads:
            t.planes_vcpu.kick()

    def run(self, timeout: float | None = None) -> RunResult:
        with short_gil_turns():
            return self._run(timeout)

    def _run(self, timeout: float | None) -> RunResult:
        install_kick_handler()
        start = time.monotonic()
        if self.trace:
            self.trace(ev.TraceEvent(ev.LIFECYCLE, -1, 0, {"what": "start", "vcpus": self.config.vcpus,
                                                         "planes": self.plane_count,
                                                         "backend": self.pvm.backend,
                                                         "personality": self.policy.name}))
        if self.hyperv:
            self.hyperv.start()
        status = None
        deadline = None if timeout is None else start + timeout
        hang_check = start + self.HANG_CHECK_INTERVAL
        hang = None
        try:    # from the first thread's start on: an interrupt must stop the threads started
            for t in self.threads:
                t.thread = threading.Thread(target=t.main, name=f"vcpu{t.index}", daemon=True)
                t.thread.start()
            while not self._finished.wait(self.POLL_INTERVAL):
                if self._interrupted:
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    status = ExitStatus.TIMEOUT
                    break
                if now >= hang_check:
                    hang_check = now + self.HANG_CHECK_INTERVAL
                    hang = self._hung()
                    if hang:
                        status = ExitStatus.TIMEOUT
                        break
        except KeyboardInterrupt:
            self._interrupted = True
        if self._interrupted:
            status = ExitStatus.INTERRUPTED
        self.stop()
        elapsed = time.monotonic() - start
        result = self._result(status, elapsed)
        if hang and result.status == ExitStatus.TIMEOUT:
            result.message = hang
        elif result.status == ExitStatus.TIMEOUT:
            result.message = self._idle_without_shadow()
        if self.trace:
            self.trace(ev.TraceEvent(ev.LIFECYCLE, -1, 0, {"what": "end", "status": result.status.name}))
        return result

    def _idle_without_shadow(self) -> str:
        """After a timeout (the vCPU threads have stopped): on a host whose CPU drops the STI
        shadow at VM entry (host convention sti_shadow), a vCPU halted with interrupts on and
        nothing pending may have taken its wake-up before its `hlt`. Say so, or "". While
        other vCPUs still ran, the halted one may just have finished its part (kvm-unit-tests'
        APs halt when done), so the message only says what it might mean."""
        if convention(self.kvm, "sti_shadow").value != "lost":
            return ""
        live = [t for t in self.threads if not t.done]
        idle = [t for t in live if halted_idle(t.plane_vcpu())]
        if not idle:
            return ""
        names = ", ".join(f"vcpu{t.index}" for t in idle)
        shadow = ("the STI interrupt shadow at VM entry (host convention sti_shadow: lost): a `sti; hlt` wait "
                  "there can take its wake-up before the `hlt` and then wait for good")
        if len(idle) == len(live):
            return f"{names} halted with interrupts on and nothing pending, on a host whose CPU drops {shadow}"
        running = ", ".join(f"vcpu{t.index}" for t in live if t not in idle)
        return (f"{running} still running; {names} halted with interrupts on and nothing pending (finished, or, if "
                f"{running} waits for it, a lost wake-up: this host's CPU drops {shadow})")

    def _hung(self) -> str | None:
        """A hang nobody would see: every unfinished vCPU halted with interrupts off and nothing
        that could wake it. Asked only after a HANG_CHECK_INTERVAL without a guest exit: the
        vCPU threads are kicked and answer from their own thread (halt_probe); the next check
        without an exit reads the answers. Not while a debugger holds the vCPUs."""
        live = [t for t in self.threads if not t.done]
        progress = sum(t.exits + t.fast_exits - t.kicks for t in self.threads)
        if self.debugger is not None or not live or progress != self._progress:
            self._progress = progress
            return None
        if all(t.halt_probe_seen == self.halt_probe and t.halted_for_good for t in live) and self.halt_probe:
            return "all vCPUs halted with interrupts disabled"
        self.halt_probe += 1
        for t in live:
            t.planes_vcpu.kick()
        return None

    def interrupt(self) -> None:
        """Stop the run with status INTERRUPTED (safe in a signal handler: only sets a flag)."""
        self._interrupted = True

    def stop(self) -> None:
        """Stop every vCPU thread and wait for them."""
        self.stopping = True
        deadline = time.monotonic() + 5.0
        for t in self.threads:
            while t.thread is not None and t.thread.is_alive() and time.monotonic() < deadline:
                t.planes_vcpu.kick()
                t.thread.join(0.01)
        if self.hyperv:
            self.hyperv.stop()
        self._console_blocked = not self.console.flush()

    def thread_finished(self, t: VcpuThread) -> None:
        """A vCPU thread left its loop (done, stopped or crashed)."""
        with self._lock:
            if self._failure or self._crash_info or all(x.done for x in self.threads):
                self._finished.set()

    @property
    def ucalls(self) -> list[Ucall]:
        """The guest's reports so far (a copy; safe while the vCPU threads run)."""
        with self._lock:
            return list(self._ucalls)

    def record_ucall(self, uc: Ucall) -> None:
        with self._lock:
            self._ucalls.append(uc)
            self._ucall_counts[uc.name] = self._ucall_counts.get(uc.name, 0) + 1
        if uc.verb == abi.UCALL_PRINT and self.console.out is not None:
            self.console.write(uc.vcpu, uc.plane, (uc.message + "\n").encode())
        if self.trace:
            self.trace(ev.TraceEvent(ev.UCALL, uc.vcpu, uc.plane, {"verb": uc.name, "args": list(uc.args),
                                                                  "message": uc.message}))

    def fail(self, uc: Ucall) -> None:
        """A guest assertion failed: the run ends with ASSERT_FAILED."""
        with self._lock:
            if self._failure is None:
                self._failure = uc
        self.finish_now()

    def crash(self, thread: VcpuThread, reason: str, state: str = "") -> None:
        """``thread``'s vCPU crashed (call on that thread): its state is captured, the crash
        hooks run, and the run ends with CRASHED. ``state``: what the registers captured are,
        when not the state at the crash."""
        crash = Crash(thread.index, thread.plane, reason, self.capture(thread), state=state)
        with self._lock:
            if self._crash_info is None:
                self._crash_info = crash
        if self.trace:
            self.trace(ev.TraceEvent(ev.FAULT, crash.vcpu, crash.plane, {"crash": crash.reason}))
        for hook in self.crash_hooks:
            hook(crash)
        self.finish_now()

    def finish_now(self) -> None:
        """End the run now: every vCPU thread is kicked out of KVM_RUN and stops."""
        self.stopping = True
        self._finished.set()
        for t in self.threads:
            if t.thread is not threading.current_thread():
                t.planes_vcpu.kick()

    def current_vcpu_thread(self) -> "VcpuThread | None":
        me = threading.current_thread()
        return next((t for t in self.threads if t.thread is me), None)

    def sleep(self, seconds: float | None) -> bool:
        """Wait (a device holding its vCPU, e.g. in S3); False when the machine is stopping."""
        self._finished.wait(seconds)
        return not self.stopping and not self._finished.is_set()

    def request_exit(self, code: int) -> None:
        """The guest asked to end the machine (isa-debug-exit) with ``code``."""
        with self._lock:
            if self._exit_code is None:
                self._exit_code = code
        self.finish_now()

    def _output_closed(self) -> None:
        """The console's reader went away (EPIPE): end the run quietly."""
        self._stdout_closed = True
        self.finish_now()

    def warn(self, text: str, kind: str | None = None) -> None:
        """Note something for the summary, in O(1): the first WARNING_EXAMPLES warnings of a
        ``kind`` (default: the text itself) word for word, the rest counted."""
        kind = kind or text
        with self._lock:
            entry = self._warnings.get(kind)
            if entry is None:
                if len(self._warnings) >= WARNING_KINDS:
                    self._warning_kinds_dropped += 1
                    return
                entry = self._warnings[kind] = [[], 0]
            if len(entry[0]) < WARNING_EXAMPLES:
                if text not in entry[0]:
                    entry[0].append(text)
            else:
                entry[1] += 1

    @property
    def warnings(self) -> list[str]:
        out = []
        with self._lock:
            for examples, more in self._warnings.values():
                out += examples
                if more:
                    out.append(f"... and {more:,} more like it")
            if self._warning_kinds_dropped:
                out.append(f"... and {self._warning_kinds_dropped:,} warnings of other kinds")
        return out

    def record_fault(self, vcpu: int, plane: int, fault: Fault) -> None:
        with self._lock:
            self.faults.append((vcpu, plane, fault.vector, fault.why))
            self.faults_injected += 1

    # -- state capture ------------------------------------------------------------------------
    def capture(self, thread: VcpuThread) -> CpuReport:
        """Every plane's state of one vCPU (call on its own thread, or after it stopped)."""
        return _capture.capture(self.memory, thread)

    def read_code(self, vcpu: Vcpu, rip: int, before: int = 32, after: int = 48,
                  plane: int = 0) -> tuple[bytes, int]:
        """Guest bytes around ``rip`` (virtual), translated through the page tables of ``vcpu``,
        plane ``plane`` of its vCPU, as that plane sees memory."""
        return _capture.read_code(self.memory.seen_by(plane), vcpu, rip, before, after)

    def _result(self, status: ExitStatus | None, elapsed: float) -> RunResult:
        crash, failure = self._crash_info, self._failure
        if crash is not None:
            status = ExitStatus.CRASHED
        elif failure is not None:
            status = ExitStatus.ASSERT_FAILED
        elif self._exit_code is not None:
            status = ExitStatus.DONE if self._exit_code == 0 else ExitStatus.ASSERT_FAILED
        elif self._stdout_closed:
            status = ExitStatus.STDOUT_CLOSED
        elif status is None:
            status = ExitStatus.DONE
        res = RunResult(status=status, ucalls=list(self._ucalls), console=list(self.console.lines),
                        ucall_counts=dict(self._ucall_counts), failure=failure, crash=crash, elapsed=elapsed,
                        exit_code=self._exit_code)
        if status in (ExitStatus.TIMEOUT, ExitStatus.INTERRUPTED):
            res.timeout_reports = [self.capture(t) for t in self.threads if not t.done]
        res.exits = sum(t.exits + t.fast_exits for t in self.threads)
        res.hypercalls = {call_name(c): n for c, n in self.dispatcher.counts.items()}
        for t in self.threads:
            for k, n in t.switches.items():
                res.switches[k] = res.switches.get(k, 0) + n
            for reason, n in t.entry_reasons.items():
                res.entry_reasons[reason.value] = res.entry_reasons.get(reason.value, 0) + n
        res.stats = {"backend": self.pvm.backend, "personality": self.policy.name,
                     "faults_injected": self.faults_injected, "warnings": self.warnings,
                     "fast_exits": sum(t.fast_exits for t in self.threads)}
        if self.console.line_count > len(self.console.lines):
            res.stats["console_lines"] = self.console.line_count
        if self.console.dropped or self._console_blocked:
            res.stats["console_not_shown"] = (f"{self.console.dropped} bytes dropped while the output was blocked"
                                              + (", still blocked at the end" if self._console_blocked else ""))
        outside = [t.outside_ram for t in self.threads if t.outside_ram[2] is not None]
        if outside:
            reads, writes = sum(o[0] for o in outside), sum(o[1] for o in outside)
            res.stats["outside_ram"] = (f"{reads} reads (all ones), {writes} writes (dropped), "
                                        f"first at {outside[0][2]:#x}")
        res.stats.update(self.policy.summary())
        if self.hyperv:
            res.stats.update(self.hyperv.summary())
        return res

    def close(self) -> None:
        # vCPU threads must be out of KVM_RUN before their fds and the guest memory go away.
        if any(t.thread is not None and t.thread.is_alive() for t in getattr(self, "threads", [])):
            self.stop()
        if getattr(self, "platform", None) is not None:
            self.platform.close()                 # its ioeventfds, before the VM goes
        if self.pvm is not None:
            self.pvm.close()
            self.pvm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.kvm is not None:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def halted_idle(vcpu: Vcpu) -> bool:
    """Halted in KVM with interrupts on and no interrupt in its LAPIC's IRR."""
    return (vcpu.get_mp_state() == C.KVM_MP_STATE_HALTED and bool(vcpu.regs.rflags & arch.RFLAGS_IF)
            and not apic.irr_pending(lapic_bytes(vcpu)))


def run_image(image: bytes, timeout: float | None = 30.0, **config) -> RunResult:
    """Build a machine for ``image``, run it to completion, tear it down."""
    with Machine(image, MachineConfig(**config)) as m:
        return m.run(timeout)
