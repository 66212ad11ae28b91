"""The machine: guest memory and image, vCPU threads, the run loop, and the result.

One thread per vCPU owns every plane of that vCPU, so two planes of one vCPU never run at
once. Exits dispatch through a table keyed by exit type; port writes through a table keyed
by port. Kicks are a signal plus ``immediate_exit``.
"""

from __future__ import annotations

import enum
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from .. import kvm as K
from ..kvm import Kvm, KvmError
from ..planes import open_planes_vm
from ..planes.api import KICK_SIGNAL, install_kick_handler
from ..uapi import constants as C
from ..x86 import apic, arch, longmode
from ..x86.sysstate import read_system_state
from . import abi, events as ev
from .console import Console
from .crash_state import recover_after_shutdown
from .devices import BadUcall, Ucall, decode_ucall
from .host import convention
from .hypercalls import OUT_SIZE, STUB_OUT_OFFSETS, Dispatcher, InjectFault, call_name, hypercall_page
from .memory import GuestMemory, GuestMemoryError
from .policy import make_policy

# What a run keeps of what a guest can repeat without end (README "Bounded host memory"):
# the newest entries are kept, the older ones only counted.
UCALL_HISTORY = 10_000         # ucalls in RunResult.ucalls (every verb counted in ucall_counts)
FAULT_HISTORY = 100            # injected faults in Machine.faults (all counted in faults_injected)
WARNING_EXAMPLES = 5           # warnings of one kind shown word for word; the rest "and N more like it"
WARNING_KINDS = 100            # kinds of warning kept; further kinds are only counted


class ExitStatus(enum.IntEnum):
    """pykvmm run's exit status (documented in the README)."""
    DONE = 0
    ASSERT_FAILED = 1
    USAGE = 2
    CRASHED = 3
    TIMEOUT = 4
    HOST = 5
    OUTPUT_FAILED = 6              # the trace could not be written fully
    INTERRUPTED = 130
    STDOUT_CLOSED = 141            # 128 + SIGPIPE, as a shell reports a writer whose reader left


@dataclass
class MachineConfig:
    vcpus: int = 1
    planes: int = 1
    mem_size: int = abi.DEFAULT_MEM_SIZE
    backend: str = "auto"
    personality: str = "auto"      # "auto": vtl when planes > 1 (if available), else none
    kvm_device: str = "/dev/kvm"
    arg: int = 0
    console_out: object = None     # a text stream; None = sys.stdout
    quiet: bool = False            # no console echo (tests read result.console)
    raw_console: bool = False      # pass guest console bytes unescaped (control characters too)
    kick_interval: float = 1e-3    # multivm/apic-groups ticker: in-kernel IPIs to inactive planes
    shared_fpu: bool = False
    trace: object = None           # callable(TraceEvent) or None
    hyperv: object = None          # hyperv.HvConfig: the Hyper-V enlightenments, or None


@dataclass
class PlaneState:
    """One plane of one vCPU, captured for a crash or state dump."""
    plane: int
    regs: dict
    sregs: dict
    events: dict
    code: bytes = b""
    code_addr: int = 0
    started: bool = True
    system: dict = field(default_factory=dict)   # x86.sysstate.read_system_state: DRs, MSRs, LAPIC


@dataclass
class CpuReport:
    vcpu: int
    plane: int                     # the plane that was running
    suspended: list
    planes: dict                   # plane -> PlaneState


@dataclass
class Crash:
    vcpu: int
    plane: int
    reason: str
    report: CpuReport | None = None
    detail: str = ""
    state: str = ""                # what the registers shown are, when not the state at the crash


@dataclass
class RunResult:
    status: ExitStatus
    ucalls: list = field(default_factory=list)        # the newest UCALL_HISTORY
    console: list = field(default_factory=list)       # the newest CONSOLE_HISTORY_LINES lines
    ucall_counts: dict = field(default_factory=dict)  # verb name -> count, all of them
    failure: Ucall | None = None
    crash: Crash | None = None
    timeout_reports: list = field(default_factory=list)
    elapsed: float = 0.0
    exits: int = 0
    hypercalls: dict = field(default_factory=dict)
    switches: dict = field(default_factory=dict)      # (from, to) -> count
    entry_reasons: dict = field(default_factory=dict)  # reason -> count
    stats: dict = field(default_factory=dict)
    message: str = ""

    def syncs(self, vcpu: int | None = None, plane: int | None = None) -> list[tuple[int, int]]:
        return [(u.args[0], u.args[1]) for u in self.ucalls
                if u.verb == abi.UCALL_SYNC and (vcpu is None or u.vcpu == vcpu)
                and (plane is None or u.plane == plane)]

    def prints(self) -> list[str]:
        return [u.message for u in self.ucalls if u.verb == abi.UCALL_PRINT]

    @property
    def ok(self) -> bool:
        return self.status == ExitStatus.DONE


class _Stop(Exception):
    pass


def _regs_dict(r) -> dict:
    return {n: getattr(r, n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                                        "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")}


def _seg(s) -> dict:
    return {"selector": s.selector, "base": s.base, "limit": s.limit, "type": s.type, "dpl": s.dpl,
            "present": s.present, "l": s.l, "db": s.db}


def _sregs_dict(s) -> dict:
    d = {n: getattr(s, n) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")}
    for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        d[n] = _seg(getattr(s, n))
    d["gdt"] = {"base": s.gdt.base, "limit": s.gdt.limit}
    d["idt"] = {"base": s.idt.base, "limit": s.idt.limit}
    return d


def _events_dict(e) -> dict:
    return {"exception": {"injected": e.exception.injected, "nr": e.exception.nr,
                          "pending": e.exception.pending, "has_error_code": e.exception.has_error_code,
                          "error_code": e.exception.error_code},
            "interrupt": {"injected": e.interrupt.injected, "nr": e.interrupt.nr, "shadow": e.interrupt.shadow},
            "nmi": {"injected": e.nmi.injected, "pending": e.nmi.pending, "masked": e.nmi.masked},
            "triple_fault_pending": e.triple_fault.pending}


def _name_os_thread(name: str) -> None:
    """Name this thread for the OS (top -H, /proc/PID/task/*/comm): which thread is which vCPU."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


class VcpuThread:
    """The run loop of one vCPU: which plane runs, the suspended-plane stack, the handlers."""

    def __init__(self, machine: "Machine", index: int, cpu):
        self.machine = machine
        self.index = index
        self.cpu = cpu                  # planes.PlanesVcpu
        self.plane = 0
        self.suspended: list[int] = []
        self.started_planes = {0}
        self.done = False
        self.thread: threading.Thread | None = None
        self.exits = 0
        self.switches: dict[tuple[int, int], int] = {}
        self.entry_reasons: dict[str, int] = {}
        self.halted_in_kernel = False
        self.kicks = 0                  # exits that were kicks (not the guest's doing)
        self.halt_probe_seen = 0        # Machine.halt_probe this thread last answered
        self.halted_for_good = False    # its answer
        self._port_handlers = {
            abi.PORT_UCALL: self._on_ucall,
            abi.PORT_CONSOLE: self._on_console,
            abi.PORT_HYPERCALL: self._on_hypercall,
            abi.PORT_NULL: None,
        }
        self._exit_handlers = {
            K.IoOut: self._on_io_out,
            K.IoIn: self._on_io_in,
            K.Mmio: self._on_mmio,
            K.Interrupted: self._on_interrupted,
            K.PlaneEvent: self._on_plane_event,
            K.Shutdown: self._on_shutdown,
            K.FailEntry: self._on_fail_entry,
            K.InternalError: self._on_internal_error,
            K.SystemEvent: self._on_system_event,
            K.Hlt: self._on_hlt,
            K.Debug: self._on_debug,
        }
        self._unknown_ports: set[int] = set()
        self.outside_ram = [0, 0, None]      # reads, writes, first GPA (summed by the machine)

    # -- plane switching -----------------------------------------------------------------
    def vcpu(self, plane: int | None = None) -> K.Vcpu:
        return self.cpu.plane_vcpu(self.plane if plane is None else plane)

    def switch_to(self, target: int, reason: str, suspend: bool) -> None:
        src = self.plane
        policy = self.machine.policy
        if target not in self.started_planes:
            self.started_planes.add(target)
            policy.on_first_entry(self, target, reason)
        else:
            policy.transfer(self, src, target, reason)
        if suspend:
            self.suspended.append(src)
        self.plane = target
        self.switches[(src, target)] = self.switches.get((src, target), 0) + 1
        self.entry_reasons[reason] = self.entry_reasons.get(reason, 0) + 1
        sink = self.machine.trace
        if sink:
            sink(ev.TraceEvent(ev.SWITCH, self.index, target, {"from": src, "to": target, "why": reason}))

    def resume_suspended(self, reason: str) -> int:
        target = self.suspended.pop()
        self.switch_to(target, reason=reason, suspend=False)
        return target

    # -- the loop ------------------------------------------------------------------------
    def main(self) -> None:
        m = self.machine
        _name_os_thread(f"vcpu{self.index}")
        # SIGINT/SIGTERM go to the main thread, which waits for them (Machine.run)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        handlers = self._exit_handlers
        policy = m.policy
        cpu = self.cpu
        sink = m.trace
        dbg = m.debugger
        try:
            while not self.done and not m.stopping:
                if dbg and not dbg.before_run(self):   # a gdb stub holds this vCPU (all-stop)
                    continue
                plane = self.plane
                ex = cpu.run(plane=plane, req_exit_planes=policy.req_exit_planes(self))
                self.exits += 1
                if sink:
                    sink(ev.TraceEvent(ev.EXIT, self.index, plane, {"exit": ex.describe()}))
                handler = handlers.get(type(ex))
                if handler is None:
                    self._crash(f"unexpected exit {ex.describe()}")
                    return
                handler(ex)
        except _Stop:
            pass
        except GuestMemoryError as e:
            self._crash(f"guest passed a bad address: {e}")
        except KvmError as e:
            self._crash(f"KVM error: {e}")
        except Exception:
            self._crash("pykvmm internal error in the vCPU thread (please report):\n" + traceback.format_exc())
        finally:
            m._thread_finished(self)

    # -- exits -----------------------------------------------------------------------------
    def _on_io_out(self, ex) -> None:
        handler = self._port_handlers.get(ex.port, self._on_unknown_port)
        if handler is not None:
            handler(ex)

    def _on_io_in(self, ex) -> None:
        self.vcpu().complete_io_in(ex, b"\xFF" * (ex.size * ex.count))

    def _on_mmio(self, ex) -> None:
        # Nothing answers there (no RAM, no device): as on a PC's open bus, reads return all
        # ones and writes are dropped. Counted here, reported once in the summary.
        seen = self.outside_ram
        if seen[2] is None:
            seen[2] = ex.phys_addr
        if ex.is_write:
            seen[1] += 1
        else:
            seen[0] += 1
            self.vcpu().complete_mmio_read(b"\xFF" * ex.length)

    def _on_unknown_port(self, ex) -> None:
        if ex.port not in self._unknown_ports:
            self._unknown_ports.add(ex.port)
            self.machine.warn(f"vcpu{self.index}/plane{self.plane}: write to unhandled port {ex.port:#x} ignored",
                              kind="unhandled port")

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
        v = self.vcpu()
        if v.get_mp_state() != C.KVM_MP_STATE_HALTED or v.regs.rflags & arch.RFLAGS_IF:
            return False
        if v.get_vcpu_events().nmi.pending or apic.could_interrupt(lapic_bytes(v), nmi_only=True):
            return False
        req = self.machine.policy.req_exit_planes(self)
        return not any(apic.could_interrupt(lapic_bytes(self.cpu.plane_vcpu(p)))
                       for p in self.cpu.planes if req >> p & 1)

    def _on_plane_event(self, ex) -> None:
        sink = self.machine.trace
        if sink:
            sink(ev.TraceEvent(ev.PLANE_EVENT, self.index, self.plane,
                               {"pending": ex.pending_event_planes, "target": ex.target}))
        self.machine.policy.on_plane_event(self, ex)

    def _on_shutdown(self, ex) -> None:
        v = self.vcpu()
        tid = threading.get_ident()

        def kick():                        # ends a re-execution that does not fault again
            v.request_immediate_exit()
            signal.pthread_kill(tid, KICK_SIGNAL)
        self._crash("triple fault (KVM_EXIT_SHUTDOWN)", state=recover_after_shutdown(v, kick))

    def _on_fail_entry(self, ex) -> None:
        self._crash(f"KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason "
                    f"{ex.hardware_entry_failure_reason:#x}): the vCPU state is invalid")

    def _on_internal_error(self, ex) -> None:
        name = K.INTERNAL_ERROR_NAMES.get(ex.suberror, str(ex.suberror))
        self._crash(f"KVM internal error {name} (KVM_EXIT_INTERNAL_ERROR, data "
                    f"{' '.join(hex(d) for d in ex.data)})")

    def _on_system_event(self, ex) -> None:
        self._crash(f"guest requested system event {ex.type} (KVM_EXIT_SYSTEM_EVENT)")

    def _on_hlt(self, ex) -> None:
        self._crash("guest halted with no in-kernel irqchip to wake it (KVM_EXIT_HLT)")

    def _on_debug(self, ex) -> None:
        dbg = self.machine.debugger
        if dbg is None:
            self._crash(f"unexpected debug exit (exception {ex.exception}, pc {ex.pc:#x})")
        else:
            dbg.on_debug(self, ex)

    # -- ports -----------------------------------------------------------------------------
    def _on_console(self, ex) -> None:
        self.machine.console.write(self.index, self.plane, ex.data)

    def _on_ucall(self, ex) -> None:
        m = self.machine
        gpa = int.from_bytes(ex.data[:4], "little")
        try:
            uc = decode_ucall(m.memory, gpa, self.index, self.plane)
        except BadUcall as e:
            self._crash(f"malformed ucall: {e}")
            raise _Stop()
        m._record_ucall(uc)
        if uc.verb == abi.UCALL_DONE:
            self.done = True
        elif uc.verb == abi.UCALL_ASSERT:
            m._fail(uc)
            raise _Stop()

    def _on_hypercall(self, ex) -> None:
        m = self.machine
        plane = self.plane
        v = self.cpu.plane_vcpu(plane)
        regs = v.regs
        try:
            control, status = m.dispatcher.dispatch(self, plane, regs)
        except InjectFault as fault:
            self.inject_exception(plane, fault.vector, hypercall_rewind=True)
            if m.trace:
                m.trace(ev.TraceEvent(ev.FAULT, self.index, plane, {"vector": fault.vector, "why": str(fault)}))
            m.record_fault(self.index, plane, fault)
            return
        if status is not None:
            regs.rax = status
        v.mark_dirty("regs")
        if m.trace:
            m.trace(ev.TraceEvent(ev.HYPERCALL, self.index, plane,
                                  {"name": call_name(control.code), "code": control.code,
                                   "rdx": regs.rdx, "r8": regs.r8, "status": status}))

    def inject_exception(self, plane: int, vector: int, hypercall_rewind: bool = False) -> None:
        """Make ``plane`` of this vCPU take exception ``vector`` (e.g. #UD for a bad VtlCall)."""
        v = self.cpu.plane_vcpu(plane)
        if hypercall_rewind:
            # The fault must point at the stub's `out`. Mainline KVM reports RIP on the `out`
            # and skips it at the next KVM_RUN even if the same RIP is written back; kvm_pvm
            # reports it past. Completing the I/O first leaves RIP past it on both.
            v.complete_pending_io()
            regs = v.regs
            if regs.rip - abi.HYPERCALL_PAGE_ADDR - OUT_SIZE in STUB_OUT_OFFSETS:
                regs.rip -= OUT_SIZE
                v.mark_dirty("regs")
        events = v.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 1 if vector in arch.EXCEPTIONS_WITH_ERROR_CODE else 0
        events.exception.error_code = 0
        events.flags = 0
        v.set_vcpu_events(events)

    def _crash(self, reason: str, state: str = "") -> None:
        m = self.machine
        report = m.capture(self)
        m._crash(Crash(self.index, self.plane, reason, report, state=state))
        self.done = True


def lapic_bytes(v: K.Vcpu) -> bytes:
    return bytes(K.ffi.buffer(v.get_lapic().regs))


class Machine:
    POLL_INTERVAL = 0.05     # how often run() looks at signals and the deadline
    HANG_CHECK_INTERVAL = 0.5  # how often it looks for vCPUs that made no exit (see _hung)

    def __init__(self, image: bytes, config: MachineConfig | None = None):
        self.config = cfg = config or MachineConfig()
        if not 1 <= cfg.vcpus <= abi.MAX_VCPUS:
            raise ValueError(f"--vcpus must be 1..{abi.MAX_VCPUS}, not {cfg.vcpus}")
        if len(image) > abi.GUEST_MAX_SIZE or not image:
            raise ValueError(f"guest image must be 1..{abi.GUEST_MAX_SIZE} bytes")
        self.trace = cfg.trace
        self.debugger = None
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
        self.memory = None
        self.pvm = None
        self.hyperv = None
        self.kvm = Kvm(cfg.kvm_device)
        try:
            self._build(image)
        except BaseException:
            self.close()
            raise

    # -- construction ----------------------------------------------------------------------
    def _build(self, image: bytes) -> None:
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
        personality = cfg.personality
        if personality == "auto":
            from .policy import POLICIES
            personality = "vtl" if cfg.planes > 1 and "vtl" in POLICIES else "none"
        self.policy = make_policy(personality)

        needed = abi.free_memory_start(cfg.vcpus)
        if cfg.mem_size < needed:
            raise ValueError(f"guest memory of {cfg.mem_size >> 20} MiB is too small; {cfg.vcpus} vCPUs need "
                             f"at least {(needed + (1 << 20) - 1) >> 20} MiB")
        self.memory = mem = GuestMemory(cfg.mem_size)
        pvm.set_user_memory_region(0, 0, cfg.mem_size, mem.hva)
        pvm.create_irqchip()
        if cfg.shared_fpu:
            pvm.enable_shared_fpu(True)
        for p in range(1, cfg.planes):
            pvm.create_plane(p)

        self._write_memory(image)
        cpuid = self.kvm.supported_cpuid()
        self.osxsave = longmode.supports_xsave(cpuid)
        # A host that resets the vCPU on a triple fault: keep what each KVM_RUN enters with.
        self.shutdown_resets = convention(self.kvm, "shutdown").value == "reset"
        self.policy.attach(self)
        if cfg.hyperv is not None:
            from .hyperv import HyperV
            self.hyperv = HyperV(self, cfg.hyperv)
            self.hyperv.attach()
            cpuid = self.hyperv.cpuid(cpuid)
        self.threads: list[VcpuThread] = []
        for i in range(cfg.vcpus):
            cpu = pvm.create_vcpu(i)
            longmode.adjust_cpuid_for_vcpu(cpuid, i, self.osxsave)
            cpu.set_cpuid2(cpuid)
            for p in range(1, cfg.planes):
                pvm.planes[p].create_vcpu_plane(cpu)
            for p in range(cfg.planes):
                self._init_plane_vcpu(cpu.plane_vcpu(p), i, p)
            self.threads.append(VcpuThread(self, i, cpu))
            if self.hyperv:
                self.hyperv.attach_thread(self.threads[-1])

    def _write_memory(self, image: bytes) -> None:
        mem, cfg = self.memory, self.config
        mem.write(abi.GDT_ADDR, longmode.gdt_bytes(abi.TSS_ADDR))
        mem.write(abi.PAGE_TABLE_ADDR, longmode.identity_page_tables(abi.PAGE_TABLE_ADDR, cfg.mem_size))
        if cfg.hyperv is not None:
            from .hyperv.hypercall import page_bytes
            mem.write(abi.HYPERCALL_PAGE_ADDR, page_bytes())   # the same stubs, plus rep continuation
        else:
            mem.write(abi.HYPERCALL_PAGE_ADDR, hypercall_page("port"))
        mem.write(abi.GUEST_LOAD_ADDR, image)
        bi = abi.BOOT_INFO_ADDR
        mem.write_u64(bi + abi.BI_MAGIC, abi.BOOT_MAGIC)
        mem.write_u32(bi + abi.BI_VCPU_COUNT, cfg.vcpus)
        mem.write_u32(bi + abi.BI_PLANE_COUNT, cfg.planes)
        mem.write_u64(bi + abi.BI_HYPERCALL_PAGE, abi.HYPERCALL_PAGE_ADDR)
        mem.write_u64(bi + abi.BI_CONTROL_PAGE_BASE, abi.CONTROL_PAGE_BASE)
        mem.write_u64(bi + abi.BI_MEM_SIZE, cfg.mem_size)
        mem.write_u64(bi + abi.BI_FREE_START, abi.free_memory_start(cfg.vcpus))
        mem.write_u64(bi + abi.BI_FREE_END, cfg.mem_size)
        mem.write_u64(bi + abi.BI_ARG, cfg.arg)

    def _init_plane_vcpu(self, v: K.Vcpu, index: int, plane: int) -> None:
        sregs = v.get_sregs()
        longmode.setup_sregs(sregs, gdt_addr=abi.GDT_ADDR, tss_addr=abi.TSS_ADDR, cr3=abi.PAGE_TABLE_ADDR,
                             sel_code=abi.SEL_CODE64, sel_data=abi.SEL_DATA, sel_tss=abi.SEL_TSS,
                             osxsave=self.osxsave)
        v.set_sregs(sregs)
        regs = v.get_regs()
        regs.rip = abi.GUEST_LOAD_ADDR
        regs.rsp = abi.stack_top(index, plane)
        regs.rflags = arch.RFLAGS_FIXED
        regs.rdi, regs.rsi, regs.rdx = index, plane, abi.BOOT_INFO_ADDR
        v.set_regs(regs)
        base = arch.APIC_DEFAULT_BASE | arch.APICBASE_ENABLE | (arch.APICBASE_BSP if index == 0 else 0)
        # x2APIC is entered from xAPIC mode only: both writes, in order, in one ioctl
        v.set_msrs([(arch.MSR_IA32_APICBASE, base), (arch.MSR_IA32_APICBASE, base | arch.APICBASE_X2APIC)])
        v.set_mp_state(C.KVM_MP_STATE_RUNNABLE)
        if v.run_struct is not None:
            classes = C.KVM_SYNC_X86_REGS | self.policy.sync_classes
            if self.shutdown_resets:
                classes |= C.KVM_SYNC_X86_SREGS
            if v.enable_sync_regs(classes) & C.KVM_SYNC_X86_SREGS and self.shutdown_resets:
                v.keep_entry_state()

    # -- running ---------------------------------------------------------------------------
    def kick_all(self) -> None:
        for t in self.threads:
            t.cpu.kick()

    def run(self, timeout: float | None = None) -> RunResult:
        install_kick_handler()
        start = time.monotonic()
        if self.trace:
            self.trace(ev.TraceEvent(ev.LIFECYCLE, -1, 0, {"what": "start", "vcpus": self.config.vcpus,
                                                         "planes": self.plane_count,
                                                         "backend": self.pvm.backend,
                                                         "personality": self.policy.name}))
        if self.hyperv:
            self.hyperv.start()
        for t in self.threads:
            t.thread = threading.Thread(target=t.main, name=f"vcpu{t.index}", daemon=True)
            t.thread.start()
        status = None
        deadline = None if timeout is None else start + timeout
        hang_check = start + self.HANG_CHECK_INTERVAL
        hang = None
        try:
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
        if self.trace:
            self.trace(ev.TraceEvent(ev.LIFECYCLE, -1, 0, {"what": "end", "status": result.status.name}))
        return result

    def _hung(self) -> str | None:
        """A hang nobody would see: every unfinished vCPU halted with interrupts off and nothing
        that could wake it. Asked only after a HANG_CHECK_INTERVAL without a guest exit: the
        vCPU threads are kicked and answer from their own thread (halt_probe); the next check
        without an exit reads the answers. Not while a debugger holds the vCPUs."""
        live = [t for t in self.threads if not t.done]
        progress = sum(t.exits - t.kicks for t in self.threads)
        if self.debugger is not None or not live or progress != self._progress:
            self._progress = progress
            return None
        if all(t.halt_probe_seen == self.halt_probe and t.halted_for_good for t in live) and self.halt_probe:
            return "all vCPUs halted with interrupts disabled"
        self.halt_probe += 1
        for t in live:
            t.cpu.kick()
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
                t.cpu.kick()
                t.thread.join(0.01)
        if self.hyperv:
            self.hyperv.stop()
        self._console_blocked = not self.console.flush()

    def _thread_finished(self, t: VcpuThread) -> None:
        with self._lock:
            if self._failure or self._crash_info or all(x.done for x in self.threads):
                self._finished.set()

    def _record_ucall(self, uc: Ucall) -> None:
        with self._lock:
            self._ucalls.append(uc)
            self._ucall_counts[uc.name] = self._ucall_counts.get(uc.name, 0) + 1
        if uc.verb == abi.UCALL_PRINT and self.console.out is not None:
            self.console.write(uc.vcpu, uc.plane, (uc.message + "\n").encode())
        if self.trace:
            self.trace(ev.TraceEvent(ev.UCALL, uc.vcpu, uc.plane, {"verb": uc.name, "args": list(uc.args),
                                                                  "message": uc.message}))

    def _fail(self, uc: Ucall) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = uc
        self._finish_now()

    def _crash(self, crash: Crash) -> None:
        with self._lock:
            if self._crash_info is None:
                self._crash_info = crash
        if self.trace:
            self.trace(ev.TraceEvent(ev.FAULT, crash.vcpu, crash.plane, {"crash": crash.reason}))
        self._finish_now()

    def _finish_now(self) -> None:
        self.stopping = True
        self._finished.set()
        for t in self.threads:
            if t.thread is not threading.current_thread():
                t.cpu.kick()

    def _output_closed(self) -> None:
        """The console's reader went away (EPIPE): end the run quietly."""
        self._stdout_closed = True
        self._finish_now()

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

    def record_fault(self, vcpu: int, plane: int, fault: InjectFault) -> None:
        with self._lock:
            self.faults.append((vcpu, plane, fault.vector, str(fault)))
            self.faults_injected += 1

    # -- state capture ------------------------------------------------------------------------
    def capture(self, t: VcpuThread) -> CpuReport:
        """Every plane's state of one vCPU (call on its own thread, or after it stopped)."""
        planes = {}
        for p in t.cpu.planes:
            v = t.cpu.plane_vcpu(p)
            try:
                regs, sregs, events = v.get_regs(), v.get_sregs(), v.get_vcpu_events()
            except KvmError as e:
                planes[p] = PlaneState(p, {}, {}, {"error": str(e)}, started=p in t.started_planes)
                continue
            code, addr = self.read_code(v, regs.rip)
            planes[p] = PlaneState(p, _regs_dict(regs), _sregs_dict(sregs), _events_dict(events), code, addr,
                                   started=p in t.started_planes, system=read_system_state(v))
        return CpuReport(t.index, t.plane, list(t.suspended), planes)

    def read_code(self, v: K.Vcpu, rip: int, before: int = 32, after: int = 48) -> tuple[bytes, int]:
        """Guest bytes around ``rip`` (virtual), translated through the vCPU's page tables."""
        start = max(0, rip - before)
        out = bytearray()
        addr = start
        while addr < rip + after:
            try:
                gpa = v.translate(addr)
            except KvmError:
                gpa = None
            if gpa is None or gpa >= self.memory.size:
                if addr < rip:
                    start, out = addr + 1, bytearray()
                    addr += 1
                    continue
                break
            chunk = min(rip + after - addr, 4096 - (addr & 0xFFF), self.memory.size - gpa)
            out += self.memory.read(gpa, chunk)
            addr += chunk
        return bytes(out), start

    def _result(self, status: ExitStatus | None, elapsed: float) -> RunResult:
        crash, failure = self._crash_info, self._failure
        if crash is not None:
            status = ExitStatus.CRASHED
        elif failure is not None:
            status = ExitStatus.ASSERT_FAILED
        elif self._stdout_closed:
            status = ExitStatus.STDOUT_CLOSED
        elif status is None:
            status = ExitStatus.DONE
        res = RunResult(status=status, ucalls=list(self._ucalls), console=list(self.console.lines),
                        ucall_counts=dict(self._ucall_counts), failure=failure, crash=crash, elapsed=elapsed)
        if status in (ExitStatus.TIMEOUT, ExitStatus.INTERRUPTED):
            res.timeout_reports = [self.capture(t) for t in self.threads if not t.done]
        res.exits = sum(t.exits for t in self.threads)
        res.hypercalls = {call_name(c): n for c, n in self.dispatcher.counts.items()}
        for t in self.threads:
            for k, n in t.switches.items():
                res.switches[k] = res.switches.get(k, 0) + n
            for k, n in t.entry_reasons.items():
                res.entry_reasons[k] = res.entry_reasons.get(k, 0) + n
        res.stats = {"backend": self.pvm.backend, "personality": self.policy.name,
                     "faults_injected": self.faults_injected, "warnings": self.warnings}
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
        res.stats.update(getattr(self.policy, "summary", dict)())  # the personality's counters
        if self.hyperv:
            res.stats.update(self.hyperv.summary())
        return res

    def close(self) -> None:
        # vCPU threads must be out of KVM_RUN before their fds and the guest memory go away.
        if any(t.thread is not None and t.thread.is_alive() for t in getattr(self, "threads", [])):
            self.stop()
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


def run_image(image: bytes, timeout: float | None = 30.0, **config) -> RunResult:
    """Build a machine for ``image``, run it to completion, tear it down."""
    with Machine(image, MachineConfig(**config)) as m:
        return m.run(timeout)
