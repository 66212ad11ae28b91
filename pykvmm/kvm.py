"""Layer 2: typed KVM objects owning their fds: Kvm (/dev/kvm), Vm, Vcpu.

Every ioctl comes in two forms, as in the kernel selftests: ``raw_ioctl`` returns the
result or ``-errno`` (for negative tests), ``ioctl`` raises KvmError naming the ioctl,
the object and the errno with a hint.
"""

from __future__ import annotations

import collections
import contextlib
import errno as _errno
import mmap
import os
import resource
import struct

from .exits import DECODERS, PLANE_EVENT_DECODERS, Exit, Interrupted, IoIn, IoOut, Mmio, Unknown
from .uapi import IOCTLS, Ioctl, PlanesAbi, constants as C, ffi, libc

DEFAULT_KVM_DEVICE = "/dev/kvm"

_HINTS = {
    _errno.EACCES: "run as root or add your user to group 'kvm'",
    _errno.EPERM: "run as root or add your user to group 'kvm'",
    _errno.ENOENT: "KVM is not available: load kvm (modprobe kvm_intel / kvm_amd) or check the device path",
    _errno.ENXIO: "the KVM module is loaded but has no backing hardware support",
    _errno.ENOTTY: "this kernel does not implement this ioctl",
    _errno.E2BIG: "the buffer passed is too small for what KVM wants to return",
    _errno.EEXIST: "the object already exists",
    _errno.ENOMEM: "the host is out of memory (or of memslots)",
}


def open_files_hint() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"this process may open {soft} files (ulimit -n) and every vCPU of every plane is one: "
            "raise the limit or run fewer vCPUs or planes")


class KvmError(OSError):
    """A KVM ioctl (or opening the KVM device) failed."""

    def __init__(self, what: str, obj: str, err: int, hint: str | None = None):
        self.what, self.obj = what, obj
        hint = hint or _HINTS.get(err) or (open_files_hint() if err == _errno.EMFILE else None)
        msg = f"{what} on {obj} failed: {_errno.errorcode.get(err, err)} ({os.strerror(err)})"
        if hint:
            msg += f"; {hint}"
        super().__init__(err, msg)

    def __str__(self):
        return self.args[1]


class NotAKvmDevice(KvmError):
    pass


_ULONG = ffi.typeof("unsigned long")
_VOIDP = ffi.typeof("void *")

# libc's ioctl through a fixed prototype. It is variadic, and cffi rebuilds the call for a
# variadic function on every call: measured 0.4-0.6 us more per ioctl, on a path where
# every ioctl counts (scripts/bench). On x86-64 (and arm64) Linux a call through the
# fixed prototype passes the three arguments exactly as the variadic call does.
_ioctl = ffi.cast("int (*)(int, unsigned long, void *)", ffi.addressof(libc, "ioctl"))


@contextlib.contextmanager
def counting_ioctls(counts: collections.Counter):
    """Count every ioctl made through this module, by request name, while the block runs
    (benchmarks report ioctls per exit with it). It replaces the function every call here
    goes through, so it costs nothing when not in use."""
    global _ioctl, _counting
    names = {e.code: name for name, e in IOCTLS.items()}
    real = _ioctl

    def counted(fd, code, arg):
        counts[names.get(code, hex(code))] += 1
        return real(fd, code, arg)

    _ioctl, _counting = counted, counts
    try:
        yield counts
    finally:
        _ioctl, _counting = real, None


_counting = None        # the Counter of counting_ioctls while it runs: the fast path's KVM_RUNs count too


def count_compiled_ioctls(name: str, n: int) -> None:
    """``n`` ioctls ``name`` made by compiled code (fastexit's loops), for counting_ioctls."""
    if _counting is not None:
        _counting[name] += n


def _arg(arg):
    if isinstance(arg, int):
        return ffi.cast(_VOIDP, arg)
    return arg


class FdObject:
    """Something that owns one KVM fd."""

    kind = "fd"

    def __init__(self, fd: int, label: str):
        self.fd = fd
        self.label = label

    def raw_ioctl(self, req: str | Ioctl, arg=0) -> int:
        """The ioctl's return value, or -errno. Never raises for a kernel error."""
        code = (IOCTLS[req] if isinstance(req, str) else req).code
        ret = _ioctl(self.fd, code, _arg(arg))
        return -ffi.errno if ret < 0 else ret

    def ioctl(self, req: str | Ioctl, arg=0) -> int:
        entry = IOCTLS[req] if isinstance(req, str) else req
        ret = _ioctl(self.fd, entry.code, _arg(arg))
        while ret < 0:
            err = ffi.errno
            # A signal can end a KVM ioctl before it did anything (seen: KVM_CREATE_VM under
            # a profiler's sampling). Ask again; KVM_RUN never comes here: its EINTR is a kick.
            if err != _errno.EINTR:
                raise KvmError(entry.name, self.label, err)
            ret = _ioctl(self.fd, entry.code, _arg(arg))
        return ret

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"<{self.label} fd={self.fd}>"


class Kvm(FdObject):
    """The KVM system fd."""

    def __init__(self, path: str = DEFAULT_KVM_DEVICE):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            hint = {
                _errno.ENOENT: f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, "
                               "or pass --kvm-device)",
                _errno.EACCES: f"no permission to open {path}: run as root or join group 'kvm'",
                _errno.EPERM: f"no permission to open {path}: run as root or join group 'kvm'",
                _errno.EISDIR: f"{path} is a directory, not the KVM device",
            }.get(e.errno)
            raise KvmError("open", path, e.errno, hint) from None
        super().__init__(fd, path)
        self.path = path
        self._supported_cpuid: bytes | None = None
        ret = self.raw_ioctl("KVM_GET_API_VERSION")
        if ret != C.KVM_API_VERSION:
            self.close()
            raise NotAKvmDevice("KVM_GET_API_VERSION", path, _errno.ENOTTY if ret < 0 else _errno.EINVAL,
                                f"{path} is not a KVM device (or speaks API {ret}, not "
                                f"{C.KVM_API_VERSION}); pass the KVM device with --kvm-device")
        self.vcpu_mmap_size = self.ioctl("KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        ret = self.raw_ioctl("KVM_CHECK_EXTENSION", cap)
        return max(ret, 0)

    def create_vm(self, vm_type: int = 0) -> Vm:
        return Vm(self, self.ioctl("KVM_CREATE_VM", vm_type))

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a fresh cdata struct kvm_cpuid2 the caller may change.

        The answer is fixed per host, so it is fetched once (growing the buffer on E2BIG)."""
        if self._supported_cpuid is None:
            n = 64
            while True:
                buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"))
                cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
                cpuid.nent = n
                ret = self.raw_ioctl("KVM_GET_SUPPORTED_CPUID", cpuid)
                if ret == -_errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                if ret < 0:
                    raise KvmError("KVM_GET_SUPPORTED_CPUID", self.label, -ret)
                size = ffi.sizeof("struct kvm_cpuid2") + cpuid.nent * ffi.sizeof("struct kvm_cpuid_entry2")
                self._supported_cpuid = bytes(ffi.buffer(buf, size))
                break
        buf = ffi.new("char[]", self._supported_cpuid)
        return _Owned(ffi.cast("struct kvm_cpuid2 *", buf), keepalive=buf)

    def msr_index_list(self) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *")
        self.raw_ioctl("KVM_GET_MSR_INDEX_LIST", probe)  # E2BIG, with nmsrs filled in
        lst = ffi.cast("struct kvm_msr_list *", ffi.new("char[]", 4 + 4 * probe.nmsrs))
        lst.nmsrs = probe.nmsrs
        self.ioctl("KVM_GET_MSR_INDEX_LIST", lst)
        return [lst.indices[i] for i in range(lst.nmsrs)]


class _Owned:
    """A cdata pointer plus the buffer that keeps it alive."""

    def __init__(self, ptr, keepalive):
        self.ptr, self._keep = ptr, keepalive

    def __getattr__(self, name):
        return getattr(self.ptr, name)


_MSI_P = ffi.typeof("struct kvm_msi *")
_SIGNAL_MSI = IOCTLS["KVM_SIGNAL_MSI"].code


class Vm(FdObject):
    def __init__(self, kvm: Kvm, fd: int, label: str | None = None):
        super().__init__(fd, label or f"vm{fd}")
        self.kvm = kvm
        self.vcpus: list[Vcpu] = []
        self._sync_regs: int | None = None

    def sync_regs_classes(self) -> int:
        """KVM_CAP_SYNC_REGS of this VM (asked once, not per vCPU: every ioctl costs here)."""
        if self._sync_regs is None:
            self._sync_regs = self.check_extension(C.KVM_CAP_SYNC_REGS) & 0x7
        return self._sync_regs

    def check_extension(self, cap: int) -> int:
        ret = self.raw_ioctl("KVM_CHECK_EXTENSION", cap)
        return max(ret, 0)

    def create_vcpu(self, vcpu_id: int, planes_abi: PlanesAbi | None = None) -> Vcpu:
        fd = self.ioctl("KVM_CREATE_VCPU", vcpu_id)
        vcpu = Vcpu(self, fd, vcpu_id, mmap_size=self.kvm.vcpu_mmap_size, planes_abi=planes_abi)
        self.vcpus.append(vcpu)
        return vcpu

    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *",
                         {"slot": slot, "flags": flags, "guest_phys_addr": gpa,
                          "memory_size": size, "userspace_addr": hva})
        self.ioctl("KVM_SET_USER_MEMORY_REGION", region)

    def create_irqchip(self) -> None:
        self.ioctl("KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = C.KVM_PIT_SPEAKER_DUMMY) -> None:
        """The in-kernel i8254 PIT (ports 0x40-0x43, and 0x61 with the dummy speaker)."""
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = flags
        self.ioctl("KVM_CREATE_PIT2", cfg)

    def irq_line(self, irq: int, level: int) -> None:
        """Drive ISA/GSI line ``irq`` of the in-kernel PIC and IOAPIC to ``level``."""
        arg = ffi.new("struct kvm_irq_level *")
        arg.irq, arg.level = irq, level
        self.ioctl("KVM_IRQ_LINE", arg)

    def set_gsi_routing(self, routes: list[tuple[int, int, int]]) -> None:
        """Replace the GSI routing table with irqchip routes (gsi, KVM_IRQCHIP_*, pin)."""
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for e, (gsi, chip, pin) in zip(table.entries, routes):
            e.gsi, e.type = gsi, C.KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
        self.ioctl("KVM_SET_GSI_ROUTING", table)

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool, datamatch: int | None = None,
                  deassign: bool = False) -> None:
        """Let KVM itself signal eventfd ``fd`` on a guest write of ``length`` bytes at ``addr``
        (a port with ``pio``), only of value ``datamatch`` when given; ``deassign`` removes it."""
        flags = ((C.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (C.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
                 | (C.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0))
        arg = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr, "len": length,
                                                 "fd": fd, "flags": flags})
        self.ioctl("KVM_IOEVENTFD", arg)

    def get_irqchip(self, chip_id: int):
        """The in-kernel PIC (KVM_IRQCHIP_PIC_*) or IOAPIC state (struct kvm_irqchip)."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        self.ioctl("KVM_GET_IRQCHIP", chip)
        return chip

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self.ioctl("KVM_ENABLE_CAP", _enable_cap_struct(cap, args, flags))

    def raw_enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        return self.raw_ioctl("KVM_ENABLE_CAP", _enable_cap_struct(cap, args, flags))

    def signal_msi(self, address: int, data: int) -> int:
        """Deliver an MSI; returns >0 if delivered, 0 if blocked by the guest."""
        msi = ffi.new(_MSI_P, (address & 0xFFFFFFFF, address >> 32, data))   # one per call: any thread sends
        ret = _ioctl(self.fd, _SIGNAL_MSI, msi)
        if ret < 0:
            raise KvmError("KVM_SIGNAL_MSI", self.label, ffi.errno)
        return ret

    def set_msr_filter(self, default_deny: bool, ranges: list[tuple[int, int, int, bytes]]) -> None:
        """ranges: (flags, base, nmsrs, bitmap) where a 1 bit allows the access."""
        flt = ffi.new("struct kvm_msr_filter *")
        flt.flags = C.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else C.KVM_MSR_FILTER_DEFAULT_ALLOW
        keep = []
        for i, (fl, base, nmsrs, bitmap) in enumerate(ranges):
            buf = ffi.new("__u8[]", bitmap)
            keep.append(buf)
            flt.ranges[i].flags, flt.ranges[i].base, flt.ranges[i].nmsrs = fl, base, nmsrs
            flt.ranges[i].bitmap = buf
        self.ioctl("KVM_X86_SET_MSR_FILTER", flt)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        super().close()


def _enable_cap_struct(cap, args, flags):
    ec = ffi.new("struct kvm_enable_cap *")
    ec.cap, ec.flags = cap, flags
    for i, a in enumerate(args):
        ec.args[i] = a
    return ec


# ---- vcpu ------------------------------------------------------------------------------

_STATE = {
    # name: (get ioctl, set ioctl, C type)
    "regs": ("KVM_GET_REGS", "KVM_SET_REGS", "struct kvm_regs"),
    "sregs": ("KVM_GET_SREGS", "KVM_SET_SREGS", "struct kvm_sregs"),
    "fpu": ("KVM_GET_FPU", "KVM_SET_FPU", "struct kvm_fpu"),
    "xsave": ("KVM_GET_XSAVE", "KVM_SET_XSAVE", "struct kvm_xsave"),
    "xcrs": ("KVM_GET_XCRS", "KVM_SET_XCRS", "struct kvm_xcrs"),
    "debugregs": ("KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "struct kvm_debugregs"),
    "lapic": ("KVM_GET_LAPIC", "KVM_SET_LAPIC", "struct kvm_lapic_state"),
    "vcpu_events": ("KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events"),
    "mp_state": ("KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "struct kvm_mp_state"),
}

# name: (get Ioctl, set Ioctl, pointer ctype), resolved once (a string type costs a lookup per use)
_STATE_IOCTLS = {name: (IOCTLS[g], IOCTLS[s], ffi.typeof(ctype + " *")) for name, (g, s, ctype) in _STATE.items()}
_SYNC_BITS = {"regs": C.KVM_SYNC_X86_REGS, "sregs": C.KVM_SYNC_X86_SREGS, "vcpu_events": C.KVM_SYNC_X86_EVENTS}
_SYNC_REGS, _SYNC_SREGS = C.KVM_SYNC_X86_REGS, C.KVM_SYNC_X86_SREGS
_KVM_RUN = IOCTLS["KVM_RUN"].code
_MAP_FAILED = ffi.cast("void *", -1)
_ZERO = ffi.NULL
_SYNC_SIZE = ffi.sizeof("struct kvm_sync_regs")


def _exit_header() -> struct.Struct:
    """What Vcpu.run reads of kvm_run after every KVM_RUN, in one unpack: exit_reason, if_flag,
    the io member (direction, size, port, count, data_offset) and kvm_valid_regs. One C call
    instead of a cffi attribute lookup per field (each builds a cdata for the nested struct)."""
    reason, if_flag, io, valid = (ffi.offsetof("struct kvm_run", f)
                                  for f in ("exit_reason", "if_flag", "io", "kvm_valid_regs"))
    io_size = struct.calcsize("<BBHIQ")
    assert reason + 4 <= if_flag < io and io + io_size <= valid
    return struct.Struct(f"<{reason}xI{if_flag - reason - 4}xB{io - if_flag - 1}xBBHIQ{valid - io - io_size}xQ")


_EXIT_HEADER = _exit_header()
_EXIT_IO, _EXIT_MMIO, _EXIT_INTR, _IO_OUT = C.KVM_EXIT_IO, C.KVM_EXIT_MMIO, C.KVM_EXIT_INTR, C.KVM_EXIT_IO_OUT


def _mmio_layout() -> tuple[struct.Struct, int, int]:
    """kvm_run's mmio member (phys_addr, data, len, is_write) as one unpack at its offset, and
    the offset of its data: the other userspace exit, read and answered without cffi field
    lookups."""
    base = ffi.offsetof("struct kvm_run", "mmio")
    data = ffi.offsetof("struct kvm_run", "mmio", "data")
    length = ffi.offsetof("struct kvm_run", "mmio", "len")
    is_write = ffi.offsetof("struct kvm_run", "mmio", "is_write")
    assert (data - base, length - base, is_write - base) == (8, 16, 20)
    return struct.Struct("<Q8sIB"), base, data


_MMIO, _MMIO_OFFSET, _MMIO_DATA = _mmio_layout()


def _accessors(name: str):
    """(get_X, set_X) for state class ``name`` of _STATE: one Python frame each (a switch of
    the vtl personality makes several). A GET of a sync-register class first pushes a pending
    sync-area write (it would be lost); a SET of one makes the sync-area copy stale.
    ``_ioctl`` is looked up at each call (counting_ioctls replaces it)."""
    get, put, ptype = _STATE_IOCTLS[name]
    bit = _SYNC_BITS.get(name, 0)
    get_code, get_name, set_code, set_name = get.code, get.name, put.code, put.name

    def getter(self, into=None):
        run = self.run_struct
        if bit and run is not None and run.kvm_dirty_regs & bit:
            self._flush(name)
        obj = ffi.new(ptype) if into is None else into
        if _ioctl(self.fd, get_code, obj) < 0:
            raise KvmError(get_name, self.label, ffi.errno)
        return obj

    def setter(self, obj):
        if _ioctl(self.fd, set_code, obj) < 0:
            raise KvmError(set_name, self.label, ffi.errno)
        if bit and self.run_struct is not None:
            self.run_struct.kvm_dirty_regs &= ~bit
            self._valid &= ~bit

    getter.__name__, setter.__name__ = f"get_{name}", f"set_{name}"
    getter.__qualname__, setter.__qualname__ = f"Vcpu.get_{name}", f"Vcpu.set_{name}"
    _ACCESSORS[name] = getter, setter
    return getter, setter


_ACCESSORS: dict = {}


class Vcpu(FdObject):
    """A KVM vCPU. ``run_struct`` is its mmapped kvm_run (None where KVM forbids mmap).

    Registers: ``get_X()``/``set_X()`` are the plain ioctls. ``regs``/``sregs`` give the
    live copy kept in kvm_run's sync area (KVM_CAP_SYNC_REGS): free to read after an exit,
    and written back on the next KVM_RUN after ``mark_dirty``; they fall back to ioctls
    where the host lacks sync regs.
    """

    def __init__(self, vm: Vm, fd: int, vcpu_id: int, mmap_size: int | None,
                 planes_abi: PlanesAbi | None = None, label: str | None = None):
        super().__init__(fd, label or f"vcpu{vcpu_id}")
        self.vm = vm
        self.id = vcpu_id
        self.planes_abi = planes_abi
        self.run_mmap = None
        self.run_struct = None
        self._sync_supported = 0
        self._valid = 0       # sync-area classes currently holding this vCPU's state
        self._detached = {}   # without a kvm_run: name -> the live copy last read, for mark_dirty
        self._area_buffers = {}   # name -> ffi.buffer over its sync area (live_buffer)
        self._mapped = None
        if mmap_size:
            # libc's mmap, not Python's: mmap.mmap keeps a dup of the fd, one more open file
            # per vCPU (EMFILE at half the vCPUs the limit allows)
            addr = libc.mmap(ffi.NULL, mmap_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
            if addr == _MAP_FAILED:
                err = ffi.errno
                os.close(fd)
                self.fd = -1
                raise KvmError("mmap of kvm_run", self.label, err)
            self._mapped = (addr, mmap_size)
            self.run_mmap = ffi.buffer(addr, mmap_size)
            self.run_struct = ffi.cast("struct kvm_run *", addr)
            self._sync_supported = vm.sync_regs_classes()
            areas = self.run_struct.s.regs
            self._areas = {"regs": areas.regs, "sregs": areas.sregs, "vcpu_events": areas.events}
            self._regs_area, self._sregs_area = areas.regs, areas.sregs
        self.if_flag = 0            # RFLAGS.IF at the guest's last exit (0 after a kick: unknown)
        self._entry_state = None    # see keep_entry_state
        self.entry_state_exit = -1
        self._decoders = dict(DECODERS)
        if planes_abi is not None:
            self._decoders[planes_abi.exit_plane_event] = PLANE_EVENT_DECODERS[planes_abi.event_struct]
        self.exit_count = 0         # exits of this vCPU, those the fast path answered included
        self.fast_exits = 0         # of them, answered by the fast path (see use_fast_path)
        self._fast_run = None       # the fast path's loop and its arguments, or None
        self._fast_table = None
        self._fast_args = ()
        self._fast_handled = None

    # -- running ----------------------------------------------------------------------
    def enable_sync_regs(self, classes: int = C.KVM_SYNC_X86_REGS) -> int:
        """Ask KVM to fill the sync area with these classes on every exit. Returns what's on."""
        on = classes & self._sync_supported
        self.run_struct.kvm_valid_regs = on
        return on

    def keep_entry_state(self, on: bool = True) -> None:
        """Copy the registers and special registers the guest is entered with at every KVM_RUN.

        For hosts that reset the vCPU on a triple fault (kvm_amd): the copy is the last state
        known before the crash. Needs sync regs for regs and sregs; costs one memmove per run."""
        self._entry_state = ffi.new("struct kvm_sync_regs *") if on else None
        self.entry_state_exit = -1
        if self._fast_run is not None:
            self.use_fast_path(self._fast_table)

    def use_fast_path(self, table) -> None:
        """Run with the fast path (pykvmm.fastexit.FastTable ``table``; None: plain KVM_RUN):
        run() then returns only the exits the table does not answer, and counts the ones it
        answered in ``exit_count`` and ``fast_exits``. Its caller decides when nothing must
        see every exit (vmm/vcpu_thread.py)."""
        self._fast_table = table
        if table is None or self.run_struct is None:
            self._fast_run, self._fast_args = None, ()
            return
        fffi = table.ffi
        self._fast_handled = fffi.new("uint64_t *")
        entry = fffi.NULL if self._entry_state is None else \
            fffi.cast("void *", int(ffi.cast("uintptr_t", self._entry_state)))
        self._fast_args = (self.fd, fffi.cast("void *", int(ffi.cast("uintptr_t", self._mapped[0]))),
                           table.table, self._fast_handled, entry)
        run = table.lib.fastexit_run
        if _counting is not None:       # (counting_ioctls: its loop makes one KVM_RUN per exit)
            counts, handled, loop = _counting, self._fast_handled, run

            def run(*args):
                ret = loop(*args)
                counts["KVM_RUN"] += handled[0] + 1
                return ret
        self._fast_run = run

    @property
    def keeps_entry_state(self) -> bool:
        return self._entry_state is not None

    def entry_state_address(self) -> int:
        """Where keep_entry_state's copy is (for a C loop that enters this vCPU itself)."""
        return int(ffi.cast("uintptr_t", self._entry_state))

    def refresh_entry_sources(self) -> None:
        """Before a C loop that keeps the entry state may enter this vCPU: its sync area must
        hold its registers (a SET ioctl since its last exit left it stale)."""
        self._live("regs")
        self._live("sregs")

    def count_fast_exits(self, n: int, last_entry: bool = True) -> None:
        """``n`` exits of this vCPU were answered in C (the fast path's loops). ``last_entry``:
        its latest entry has not exited to Python yet (run() decodes that exit); otherwise the
        latest of the ``n`` was its last exit, whose header and sync classes are read here."""
        self.exit_count += n
        self.fast_exits += n
        if not last_entry:
            _, self.if_flag, _, _, _, _, _, self._valid = _EXIT_HEADER.unpack_from(self.run_mmap)
        if self._entry_state is not None:       # the loop copied it at its latest entry
            self.entry_state_exit = self.exit_count if last_entry else self.exit_count - 1

    def entry_state(self):
        """(a copy of the struct kvm_sync_regs kept at the last KVM_RUN, the exit count then) or None."""
        if self._entry_state is None or self.entry_state_exit < 0:
            return None
        copy = ffi.new("struct kvm_sync_regs *")
        ffi.memmove(copy, self._entry_state, _SYNC_SIZE)
        return copy, self.entry_state_exit

    def _keep_entry_state(self) -> None:
        self._live("regs")
        self._live("sregs")
        ffi.memmove(self._entry_state, ffi.addressof(self.run_struct.s.regs), _SYNC_SIZE)
        self.entry_state_exit = self.exit_count

    def raw_run(self) -> int:
        ret = _ioctl(self.fd, _KVM_RUN, _ZERO)
        if ret < 0:
            return -ffi.errno
        return ret

    def run(self, ran: int | None = None) -> Exit:
        """KVM_RUN once and decode the exit. EINTR (a kick) comes back as ``Interrupted``.
        ``ran``: the KVM_RUN was made already, returning this (0 or -errno; fastexit.FastSwitch,
        whose loop entered this vCPU last): only decode its exit."""
        if ran is None:
            if self._entry_state is not None:
                self._keep_entry_state()
            fast = self._fast_run
            if fast is None:
                ret = _ioctl(self.fd, _KVM_RUN, _ZERO)
                if ret < 0:
                    ret = -ffi.errno
            else:
                ret = fast(*self._fast_args)        # 0 or -errno, after the exits it answered
                answered = self._fast_handled[0]
                if answered:
                    self.count_fast_exits(answered)
        else:
            ret = ran
        self.exit_count += 1
        reason, self.if_flag, direction, size, port, count, data_offset, self._valid = \
            _EXIT_HEADER.unpack_from(self.run_mmap)
        if ret < 0:
            err = -ret
            if err == _errno.EINTR or err == _errno.EAGAIN:
                self.run_struct.immediate_exit = 0
                self.if_flag = 0        # not the guest's own exit: its IF is not known
                return Interrupted()
            raise KvmError("KVM_RUN", self.label, err)
        if reason == _EXIT_IO:          # the common userspace exit: decoded here, without a call
            if direction == _IO_OUT:
                return IoOut(port, size, count, self.run_mmap[data_offset:data_offset + size * count])
            return IoIn(port, size, count, data_offset)
        if reason == _EXIT_MMIO:
            phys_addr, data, length, is_write = _MMIO.unpack_from(self.run_mmap, _MMIO_OFFSET)
            return Mmio(phys_addr, length, bool(is_write), data[:length])
        decode = self._decoders.get(reason)
        if decode is None:
            return Unknown(reason, self.run_struct.hw.hardware_exit_reason)
        return decode(self, self.run_struct)

    def complete_msr(self, error: bool, data: int = 0) -> None:
        """Answer a KVM_EXIT_X86_RDMSR/WRMSR (applied on the next KVM_RUN): ``error`` makes the
        guest's instruction take #GP; ``data`` is what an RDMSR reads."""
        m = self.run_struct.msr
        m.error = 1 if error else 0
        m.data = data & 0xFFFFFFFFFFFFFFFF

    def get_tsc_khz(self) -> int:
        return self.ioctl("KVM_GET_TSC_KHZ")

    def complete_io_in(self, exit_: IoIn, data: bytes) -> None:
        """Provide the bytes an IN instruction reads (applied on the next KVM_RUN)."""
        need = exit_.size * exit_.count
        if len(data) != need:
            data = bytes(data[:need]).ljust(need, b"\0")
        off = exit_.data_offset
        self.run_mmap[off:off + need] = data

    def complete_mmio_read(self, data: bytes) -> None:
        """Provide the bytes an MMIO read gets (applied on the next KVM_RUN)."""
        length = self.run_struct.mmio.len
        self.run_mmap[_MMIO_DATA:_MMIO_DATA + length] = bytes(data[:length]).ljust(length, b"\0")

    def request_immediate_exit(self, on: bool = True) -> None:
        self.run_struct.immediate_exit = 1 if on else 0

    def complete_pending_io(self) -> None:
        """Finish the I/O of the last exit without running the guest (KVM_RUN with
        immediate_exit, as the KVM API documents). Afterwards RIP is past the instruction on
        every host, whether KVM reported it on the instruction (mainline) or past it."""
        self.request_immediate_exit()
        ex = self.run()
        if not isinstance(ex, Interrupted):
            raise KvmError("KVM_RUN", self.label, _errno.EINVAL,
                           f"completing the pending I/O produced another exit: {ex.describe()}")

    # -- state: plain ioctls ------------------------------------------------------------
    # get_X(into=None) / set_X(struct): see _accessors()
    def _get(self, name, into=None):
        """GET ``name`` into a new struct, or into ``into`` (a struct of that type, reused)."""
        return _ACCESSORS[name][0](self, into)

    def _set(self, name, obj):
        _ACCESSORS[name][1](self, obj)

    get_regs, set_regs = _accessors("regs")
    get_sregs, set_sregs = _accessors("sregs")
    get_fpu, set_fpu = _accessors("fpu")
    get_xsave, set_xsave = _accessors("xsave")
    get_xcrs, set_xcrs = _accessors("xcrs")
    get_debugregs, set_debugregs = _accessors("debugregs")
    get_lapic, set_lapic = _accessors("lapic")
    get_vcpu_events, set_vcpu_events = _accessors("vcpu_events")
    _accessors("mp_state")

    def get_mp_state(self) -> int:
        return self._get("mp_state").mp_state

    def set_mp_state(self, state: int) -> None:
        self._set("mp_state", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = _msrs_struct([(i, 0) for i in indices])
        n = self.ioctl("KVM_GET_MSRS", msrs.ptr)
        return {msrs.ptr.entries[k].index: msrs.ptr.entries[k].data for k in range(n)}

    def set_msrs(self, values: dict[int, int] | list[tuple[int, int]]) -> None:
        """Write MSRs with one ioctl; a list may name an MSR twice (KVM writes in order)."""
        pairs = list(values.items()) if isinstance(values, dict) else list(values)
        msrs = _msrs_struct(pairs)
        n = self.ioctl("KVM_SET_MSRS", msrs.ptr)
        if n != len(pairs):
            bad = pairs[n][0]
            raise KvmError("KVM_SET_MSRS", self.label, _errno.EINVAL, f"KVM refused MSR {bad:#x}")

    def _tsc_offset_attr(self, value):
        return ffi.new("struct kvm_device_attr *", {
            "group": C.KVM_VCPU_TSC_CTRL, "attr": C.KVM_VCPU_TSC_OFFSET,
            "addr": int(ffi.cast("uintptr_t", value))})

    def get_tsc_offset(self) -> int | None:
        """The guest TSC's offset from the host TSC (KVM_VCPU_TSC_OFFSET, Linux 5.16 on), or
        None where KVM has no such attribute."""
        value = ffi.new("uint64_t *")
        ret = self.raw_ioctl("KVM_GET_DEVICE_ATTR", self._tsc_offset_attr(value))
        if ret == -_errno.ENXIO or ret == -_errno.ENOTTY or ret == -_errno.EINVAL:
            return None
        if ret < 0:
            raise KvmError("KVM_GET_DEVICE_ATTR", self.label, -ret, "reading KVM_VCPU_TSC_OFFSET")
        return value[0]

    def set_tsc_offset(self, offset: int) -> None:
        value = ffi.new("uint64_t *", offset)
        self.ioctl("KVM_SET_DEVICE_ATTR", self._tsc_offset_attr(value))

    def set_cpuid2(self, cpuid) -> None:
        self.ioctl("KVM_SET_CPUID2", cpuid.ptr if isinstance(cpuid, _Owned) else cpuid)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        for i, v in enumerate(debugreg or []):
            dbg.arch.debugreg[i] = v
        self.ioctl("KVM_SET_GUEST_DEBUG", dbg)

    def translate(self, gva: int) -> int | None:
        """Guest-virtual to guest-physical through this vCPU's page tables (None if unmapped)."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": gva})
        self.ioctl("KVM_TRANSLATE", tr)
        return tr.physical_address if tr.valid else None

    def interrupt(self, vector: int) -> None:
        self.ioctl("KVM_INTERRUPT", ffi.new("struct kvm_interrupt *", {"irq": vector}))

    # -- state: the live copy in the sync area -------------------------------------------
    def _live(self, name):
        run = self.run_struct
        if run is None:
            # No kvm_run (a native plane-N vCPU): the live copy is a fresh GET, kept so that
            # mark_dirty() can SET it.
            obj = self._detached[name] = self._get(name)
            return obj
        bit = _SYNC_BITS[name]
        target = self._areas[name]
        if not self._valid & bit:
            self.ioctl(_STATE[name][0], ffi.addressof(target))
            self._valid |= bit
        return target

    @property
    def regs(self):
        if self._valid & _SYNC_REGS:        # after an exit with sync regs: no call, no ioctl
            return self._regs_area
        return self._live("regs")

    @property
    def sregs(self):
        if self._valid & _SYNC_SREGS:
            return self._sregs_area
        return self._live("sregs")

    def mark_dirty(self, name: str = "regs") -> None:
        """The live copy of ``name`` was changed: hand it to KVM (on the next KVM_RUN if it can)."""
        run = self.run_struct
        if run is None:
            self._set(name, self._detached.pop(name))
            return
        bit = _SYNC_BITS[name]
        if self._sync_supported & bit:
            run.kvm_dirty_regs |= bit
        else:
            self.ioctl(_STATE[name][1], ffi.addressof(self._areas[name]))

    def live_buffer(self, name: str):
        """The bytes of the live copy of ``name`` (as ``regs``/``sregs``), writable; call
        mark_dirty after writing. For copying ranges of registers without a field access each."""
        buf = self._area_buffers.get(name)
        if buf is not None and self._valid & _SYNC_BITS[name]:     # after an exit: no call
            return buf
        obj = self._live(name)
        if self.run_struct is None:
            return ffi.buffer(obj)
        if buf is None:
            buf = self._area_buffers[name] = ffi.buffer(ffi.addressof(obj))
        return buf

    def copy_live(self, source: "Vcpu", runs) -> None:
        """Copy byte ranges of ``source``'s live copies into this vCPU's and mark the classes
        that changed dirty. ``runs``: ((name, ((start, end), ...)), ...) with name ``regs`` or
        ``sregs`` and offsets in its struct (e.g. the registers VTLs share). One call on a plane
        switch for what live_buffer and mark_dirty would make six."""
        for name, ranges in runs:
            bit = _SYNC_BITS[name]
            # live_buffer()'s own shortcut: a vCPU that exited with sync regs needs no call
            src = source._area_buffers.get(name) if source._valid & bit else None
            if src is None:
                src = source.live_buffer(name)
            dst = self._area_buffers.get(name) if self._valid & bit else None
            if dst is None:
                dst = self.live_buffer(name)
            changed = False
            for start, end in ranges:
                if dst[start:end] != src[start:end]:
                    dst[start:end] = src[start:end]
                    changed = True
            if changed:
                run = self.run_struct
                if run is not None and self._sync_supported & bit:
                    run.kvm_dirty_regs |= bit       # mark_dirty()'s common case, without its frame
                else:
                    self.mark_dirty(name)

    def _flush(self, name):
        """Before a plain GET ioctl: push a pending sync-area write so it is not lost."""
        bit = _SYNC_BITS.get(name)
        if not bit:
            return
        run = self.run_struct
        if run is not None and run.kvm_dirty_regs & bit:
            self.ioctl(_STATE[name][1], ffi.addressof(self._areas[name]))
            run.kvm_dirty_regs &= ~bit

    def flush_sync_regs(self) -> None:
        """Push every pending write of the live copies to KVM now (SET ioctls), so that the
        sync area can be handed to another user (the native backend's other planes share it)."""
        for name in _SYNC_BITS:
            self._flush(name)

    def forget_sync_regs(self) -> None:
        """The sync area no longer holds this vCPU's state (another plane ran on it): the next
        read of a live copy GETs it."""
        self._valid = 0

    def close(self) -> None:
        if self._mapped is not None:
            self.run_struct = self.run_mmap = None
            libc.munmap(*self._mapped)
            self._mapped = None
        super().close()


def _msrs_struct(pairs):
    size = ffi.sizeof("struct kvm_msrs") + len(pairs) * ffi.sizeof("struct kvm_msr_entry")
    buf = ffi.new("char[]", size)
    msrs = ffi.cast("struct kvm_msrs *", buf)
    msrs.nmsrs = len(pairs)
    for k, (index, data) in enumerate(pairs):
        msrs.entries[k].index = index
        msrs.entries[k].data = data
    return _Owned(msrs, keepalive=buf)
