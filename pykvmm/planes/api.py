"""The one planes API, shaped like the KVM planes RFC of April 2025.

    vm = open_planes_vm(kvm, backend="auto")      # a VM whose plane 0 exists
    vcpu = vm.create_vcpu(0)                       # plane-0 vCPU: the one you run
    p1 = vm.create_plane(1)                        # EEXIST for an existing id (incl. 0), EINVAL >= limit
    v1 = p1.create_vcpu_plane(vcpu)                # plane-1 state of that vCPU (get/set only)
    ex = vcpu.run(plane=1, req_exit_planes=0b01)   # -> kvm.Exit, or PlaneEvent
    p1.signal_msi(address, data)                   # an interrupt for plane 1 only
    vcpu.kick()                                    # from another thread: that run() returns soon

Every backend implements these classes; they differ only in how planes are made and how
a switch happens (see DESIGN.md). Errors are KvmError with the RFC's errno.

Kicks (what an embedding program needs to know)
    A vCPU halted in the guest (``hlt`` with the in-kernel LAPIC) stays inside KVM_RUN until
    an interrupt of the running plane or a signal. ``kick()`` sets ``immediate_exit`` and sends
    KICK_SIGNAL (SIGUSR1) to the thread in ``run()`` (each run() records its thread). A signal
    only ends KVM_RUN if the thread has a handler for it, so the planes layer installs a no-op
    one when a planes VM is created on the main thread (Python lets only the main thread set
    handlers); an existing handler of the program is kept, any handler does. A program that
    creates its planes VM on another thread calls ``install_kick_handler()`` on the main thread
    first, or kick() raises KvmError saying so. The program must not block KICK_SIGNAL in a
    thread that calls run().
"""

from __future__ import annotations

import errno
import signal
import threading
from abc import ABC, abstractmethod

from ..exits import Interrupted
from ..kvm import KvmError, Vcpu
from ..x86.arch import MAX_PLANES
from .memview import PAGE, Access, MemoryView, check_range, refuse, refuse_cover

KVM_PLANE_EVENT_INTERRUPT = 1
KICK_SIGNAL = signal.SIGUSR1


def _kick_noop(signum, frame) -> None:
    """The kick signal only has to end KVM_RUN with EINTR; there is nothing to do."""


def kick_handler_installed() -> bool:
    return callable(signal.getsignal(KICK_SIGNAL))


def install_kick_handler() -> bool:
    """Give KICK_SIGNAL a no-op handler (unless it has a handler already) and make it interrupt
    system calls. Python allows this only on the main thread: elsewhere it changes nothing.
    Returns whether a handler is in place."""
    if threading.current_thread() is threading.main_thread():
        if not kick_handler_installed():
            signal.signal(KICK_SIGNAL, _kick_noop)
        signal.siginterrupt(KICK_SIGNAL, True)
    return kick_handler_installed()


class Plane(ABC):
    """Plane ``id`` of a planes VM (plane 0 is the VM itself)."""

    def __init__(self, vm: "PlanesVm", plane_id: int):
        self.vm, self.id = vm, plane_id
        self.vcpus: dict[int, Vcpu] = {}
        self.view = MemoryView()    # what this plane may do to guest memory (memview.py)

    def protect(self, gpa: int, size: int, access: Access) -> None:
        """This plane may do only ``access`` to the whole pages [gpa, gpa + size) from now on
        (Access.ALL lifts a protection). A violating access ends run() with a MemoryFault exit
        and is not performed. ProtectionUnsupported if the backend cannot enforce ``access``
        (memview.py has the table)."""
        access = Access(access)
        check_range(gpa, size)
        self.vm.check_protection(access)
        self.view.set(gpa, size, access)
        self.vm._apply_view(self, gpa, gpa + size)

    def cover(self, gpa: int, hva: int | None) -> None:
        """This plane alone sees the 4 KiB host page at ``hva`` at guest page ``gpa`` instead
        of guest RAM (None: RAM again): a per-plane overlay page (memview.py); the plane's
        protections still apply to the page. ProtectionUnsupported where the planes share one
        memory layout."""
        check_range(gpa, PAGE)
        if not self.vm.per_plane_layouts:
            raise refuse_cover(self.vm.backend)
        if hva is None:
            self.view.covers.pop(gpa, None)
        else:
            self.view.covers[gpa] = hva
        self.vm._apply_view(self, gpa, gpa + PAGE)

    @abstractmethod
    def create_vcpu_plane(self, vcpu: "PlanesVcpu") -> Vcpu:
        """Make this plane's instance of ``vcpu`` (a plane-0 vCPU). EEXIST if it exists."""

    @abstractmethod
    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI delivered to this plane's LAPICs only."""

    def _check_new_vcpu(self, vcpu: "PlanesVcpu"):
        if self.id == 0:
            raise KvmError("KVM_CREATE_VCPU_PLANE", "plane0", errno.ENOTTY,
                           "plane-0 vCPUs are made with create_vcpu() on the VM")
        if vcpu.id in self.vcpus:
            raise KvmError("KVM_CREATE_VCPU_PLANE", f"plane{self.id}", errno.EEXIST,
                           f"vCPU {vcpu.id} already has a plane-{self.id} instance")


class PlanesVcpu(ABC):
    """A vCPU with one register/LAPIC context per plane; run() runs one plane of it."""

    def __init__(self, vm: "PlanesVm", vcpu_id: int):
        self.vm, self.id = vm, vcpu_id
        self.last_plane = 0
        self.cpuid = None
        self.thread_id: int | None = None   # the thread of the latest run(): where kicks go
        self._lock = threading.Lock()       # guards the fields below (see kick() and run_kvm())
        self._in_run: Vcpu | None = None    # the KVM vCPU inside KVM_RUN, if any
        self._running_req = 0               # req_exit_planes of that run
        self._kicked = False                # a kick not yet seen by a run
        self._hint = 0                      # planes a soft-switching backend must look at before
                                            # an entry that requests them (softswitch.py)
        self._entries_held = False          # no entry at all for now (multivm re-lays memslots)

    @property
    @abstractmethod
    def plane0(self) -> Vcpu:
        ...

    def plane_vcpu(self, plane_id: int) -> Vcpu:
        """This vCPU's state handle in ``plane_id`` (get/set of regs, sregs, lapic, ...)."""
        try:
            return self.vm.planes[plane_id].vcpus[self.id]
        except KeyError:
            raise KvmError("plane_vcpu", f"vcpu{self.id}", errno.ENOENT,
                           f"plane {plane_id} has no instance of vCPU {self.id}") from None

    def set_cpuid2(self, cpuid) -> None:
        """CPUID for this vCPU; plane-N instances copy plane 0's (as the RFC does)."""
        self.cpuid = cpuid
        self.plane0.set_cpuid2(cpuid)

    @property
    def planes(self) -> list[int]:
        return sorted(p for p, plane in self.vm.planes.items() if self.id in plane.vcpus)

    @abstractmethod
    def run(self, plane: int = 0, req_exit_planes: int = 0):
        """Run ``plane`` of this vCPU until an exit. An interrupt pending in a plane of
        ``req_exit_planes`` (other than ``plane``) that its LAPIC would deliver (IRR above
        PPR) ends it with a PlaneEvent, also while ``plane`` is halted; the backend's module
        docstring gives the bound. Backends enter KVM_RUN through run_kvm()."""

    def kick(self) -> None:
        """Make a run() in progress on another thread return soon (Interrupted or PlaneEvent),
        also from a halt; a kick while no run() is in progress makes the next one return at
        once. Taken under the lock run_kvm() holds until it is committed to KVM_RUN, so a kick
        never falls between its check and the ioctl (immediate_exit covers that window)."""
        with self._lock:
            self._kicked = True
            v = self._in_run
            if v is not None:
                v.request_immediate_exit()
                self._signal_thread()

    def note_pending(self, plane_id: int) -> None:
        """Something outside KVM made an interrupt pending for ``plane_id`` of this vCPU, or
        changed what its LAPIC would deliver (e.g. its TPR, with set_lapic)."""

    def needs_scan_kick(self) -> bool:
        """Whether only a kick lets the backend look for interrupts of this vCPU's run."""
        return False

    def hold_entries(self, on: bool) -> None:
        """While held, run() enters no plane (it returns Interrupted); with the lock run_kvm()
        commits under, so once this returns, a vCPU seen outside KVM_RUN stays outside."""
        with self._lock:
            self._entries_held = on

    # -- for the backends' run() -----------------------------------------------------------
    def run_kvm(self, v: Vcpu, req: int, switch=None):
        """KVM_RUN of ``v`` (a plane of this vCPU) as the run of this vCPU, kickable. Returns
        Interrupted without entering, as for a kick, while a plane of ``req`` is in ``_hint`` or
        entries are held (both checked under the lock, where the backends set them).

        One lock pair per run. Entering is committed under the lock: a kick before it makes
        this return Interrupted without entering; a kick after it finds ``_in_run`` and sets
        ``v``'s immediate_exit, so KVM_RUN returns at once even if the signal came before the
        ioctl. Leaving takes no lock: ``_kicked`` is cleared before ``_in_run``, so a kick that
        still finds ``_in_run`` came during this run (which is returning: what it asked for)
        and may at worst make the next run return Interrupted once; a kick that finds it
        cleared is kept for the next run, as a kick between two runs must be.
        ``switch`` (a fastexit.FastSwitch, ``v`` its first plane): the run may switch planes in
        C; ``_in_run`` is then ``switch``, whose request_immediate_exit stops every plane."""
        with self._lock:
            if self._kicked or self._hint & req or self._entries_held:
                self._kicked = False
                return Interrupted()
            self.thread_id = threading.get_ident()
            self._running_req = req
            self._in_run = v if switch is None else switch
        # read after _in_run is published (SoftSwitchVm._tick); only a change from outside,
        # note_pending(), makes a run need kicks later, and it kicks that run itself
        if req and self.vm.ticker_parked and self.needs_scan_kick():
            self.vm.wake_ticker()
        try:
            return v.run() if switch is None else switch.run(v)
        finally:
            self._kicked = False
            self._in_run = None
            self._running_req = 0

    def _signal_thread(self) -> None:
        """KICK_SIGNAL to the thread in run_kvm() (called under the lock, while ``_in_run`` is set)."""
        tid = self.thread_id
        if tid is None or tid == threading.get_ident():
            return      # our own run: immediate_exit is enough
        if not kick_handler_installed():
            raise KvmError("kick", f"vcpu{self.id}", errno.EINVAL,
                           f"signal {KICK_SIGNAL.name} has no handler, so it cannot interrupt KVM_RUN: "
                           f"create the planes VM on the main thread or call "
                           f"pykvmm.planes.install_kick_handler() there first")
        try:
            signal.pthread_kill(tid, KICK_SIGNAL)
        except ProcessLookupError:
            pass        # the thread left run() and ended meanwhile (run_kvm leaves without the lock)


class PlanesVm(ABC):
    backend: str = "?"

    def __init__(self, kvm, max_planes: int):
        self.kvm = kvm
        self.max_planes = max_planes
        self.planes: dict[int, Plane] = {}
        self.vcpus: dict[int, PlanesVcpu] = {}
        self.shared_fpu = False
        self.irqchip = False
        install_kick_handler()

    # Soft-switching backends kick runs with planes requested from a ticker thread, which
    # parks while no run needs it; run_kvm() wakes it. Never set for the others.
    ticker_parked = False

    def wake_ticker(self) -> None:
        """A run that may need kicks started while the ticker was parked."""

    # -- planes -------------------------------------------------------------------------
    def raw_create_plane(self, plane_id: int) -> int:
        """0, or -errno exactly as the RFC's KVM_CREATE_PLANE would answer."""
        if plane_id < 0 or plane_id >= self.max_planes:
            return -errno.EINVAL
        if plane_id in self.planes:
            return -errno.EEXIST
        self._create_plane(plane_id)
        return 0

    def create_plane(self, plane_id: int) -> Plane:
        ret = self.raw_create_plane(plane_id)
        if ret < 0:
            hint = (f"plane ids are 0..{self.max_planes - 1}" if ret == -errno.EINVAL
                    else f"plane {plane_id} already exists (plane 0 always does)")
            raise KvmError("KVM_CREATE_PLANE", self.label, -ret, hint)
        return self.planes[plane_id]

    @abstractmethod
    def _create_plane(self, plane_id: int) -> None:
        ...

    @property
    def label(self) -> str:
        return f"{self.backend} planes VM"

    # -- VM-wide setup -------------------------------------------------------------------
    @abstractmethod
    def create_vcpu(self, vcpu_id: int) -> PlanesVcpu:
        ...

    @abstractmethod
    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        ...

    @abstractmethod
    def create_irqchip(self) -> None:
        """In-kernel LAPICs for every plane. As in the RFC: only before extra planes exist."""

    # -- memory views (memview.py) ---------------------------------------------------------
    per_plane_layouts = False     # each plane its own memslots (Plane.cover): multivm
    protection_limit = ("it has no per-plane memory permissions: per-plane KVM_SET_MEMORY_ATTRIBUTES "
                        "with read/write/execute attributes would be needed")

    def check_protection(self, access: Access) -> None:
        """Raise ProtectionUnsupported unless this backend can enforce ``access``."""
        if access != Access.ALL:
            raise refuse(self.backend, access, self.protection_limit)

    def _apply_view(self, plane: "Plane", start: int, end: int) -> None:
        """Make the kernel enforce ``plane.view`` over [start, end)."""

    def enable_shared_fpu(self, on: bool = True) -> None:
        """KVM_CAP_PLANES_FPU: planes share x87/SSE/AVX state (never PKRU). Before any vCPU."""
        if self.vcpus:
            raise KvmError("KVM_ENABLE_CAP(KVM_CAP_PLANES_FPU)", self.label, errno.EINVAL,
                           "the FPU sharing mode must be chosen before any vCPU exists")
        self.shared_fpu = on

    def signal_msi(self, address: int, data: int) -> int:
        """An MSI on the VM itself goes to plane 0, as in the RFC."""
        return self.planes[0].signal_msi(address, data)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SingleKvmVm:
    """Mixin for backends whose planes all live in one KVM VM (``self.vm0``)."""

    def set_user_memory_region(self, slot, gpa, size, hva, flags=0) -> None:
        self.vm0.set_user_memory_region(slot, gpa, size, hva, flags)

    def create_irqchip(self) -> None:
        self.vm0.create_irqchip()
        self.irqchip = True

    def on_every_plane_vm(self, fn) -> None:
        fn(self.vm0)
