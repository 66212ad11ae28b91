"""What pykvmm finds on this host: capabilities, planes backends, hypercall transports.

Everything RFC-related is probed by calling the ioctl (capability numbers collide); the
hypercall transports are probed by running a three-instruction real-mode guest.
"""

from __future__ import annotations

import mmap
import signal
import threading

from . import exits as X, fastexit, kvm as K
from .planes import choose_backend
from .uapi import constants as C, ffi
from .vmm.host import conventions

CAPS = [
    ("KVM_CAP_IRQCHIP", C.KVM_CAP_IRQCHIP, "in-kernel LAPIC/IOAPIC (each plane's APIC namespace)"),
    ("KVM_CAP_MAX_VCPUS", C.KVM_CAP_MAX_VCPUS, "most vCPUs per VM"),
    ("KVM_CAP_SYNC_REGS", C.KVM_CAP_SYNC_REGS, "registers through kvm_run (bits: 1 regs, 2 sregs, 4 events)"),
    ("KVM_CAP_IMMEDIATE_EXIT", C.KVM_CAP_IMMEDIATE_EXIT, "race-free vCPU kicks"),
    ("KVM_CAP_SIGNAL_MSI", C.KVM_CAP_SIGNAL_MSI, "MSIs to one plane"),
    ("KVM_CAP_X2APIC_API", C.KVM_CAP_X2APIC_API, "32-bit x2APIC IDs"),
    ("KVM_CAP_SPLIT_IRQCHIP", C.KVM_CAP_SPLIT_IRQCHIP, "userspace IOAPIC"),
    ("KVM_CAP_X86_USER_SPACE_MSR", C.KVM_CAP_X86_USER_SPACE_MSR, "MSR exits to userspace (msr transport)"),
    ("KVM_CAP_X86_MSR_FILTER", C.KVM_CAP_X86_MSR_FILTER, "MSR filters (msr transport)"),
    ("KVM_CAP_SET_GUEST_DEBUG", C.KVM_CAP_SET_GUEST_DEBUG, "single-step and breakpoints (gdb stub)"),
    ("KVM_CAP_XSAVE", C.KVM_CAP_XSAVE, "XSAVE state (shared FPU across planes)"),
    ("KVM_CAP_XCRS", C.KVM_CAP_XCRS, "XCR0 (shared across VTLs)"),
    ("KVM_CAP_DEBUGREGS", C.KVM_CAP_DEBUGREGS, "DR0-DR3 (shared across VTLs)"),
    ("KVM_CAP_HYPERV", C.KVM_CAP_HYPERV, "in-kernel Hyper-V emulation (pykvmm does not need it)"),
    ("KVM_CAP_EXIT_HYPERCALL", C.KVM_CAP_EXIT_HYPERCALL, "vmcall exits to userspace (vmcall transport)"),
]


def _probe_guest(kvm, code: bytes, setup=None, kick_after: float = 0.2):
    """Run ``code`` in real mode at 0x1000; returns the first exit (or Interrupted)."""
    with kvm.create_vm() as vm:
        mem = mmap.mmap(-1, 0x10000)
        buf = ffi.from_buffer(mem)
        try:
            vm.set_user_memory_region(0, 0, 0x10000, int(ffi.cast("uintptr_t", buf)))
            mem[0x1000:0x1000 + len(code)] = code
            if setup:
                setup(vm)
            v = vm.create_vcpu(0)
            s = v.get_sregs()
            s.cs.base, s.cs.selector = 0, 0
            v.set_sregs(s)
            r = v.get_regs()
            r.rip, r.rflags = 0x1000, 2
            v.set_regs(r)
            return _run_with_deadline(v, kick_after)
        finally:
            del buf
            vm.close()
            try:
                mem.close()
            except BufferError:
                pass


def _run_with_deadline(v, seconds: float):
    main = threading.main_thread() is threading.current_thread()
    if not main:
        return None
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.siginterrupt(signal.SIGUSR1, True)
    me = threading.get_ident()
    done = threading.Event()

    def kicker():
        if not done.wait(seconds):
            v.request_immediate_exit()
            signal.pthread_kill(me, signal.SIGUSR1)

    t = threading.Thread(target=kicker, daemon=True)
    t.start()
    try:
        return v.run()
    finally:
        done.set()
        t.join()
        signal.signal(signal.SIGUSR1, old)


def probe_transports(kvm) -> list[dict]:
    out = [{"name": "port", "works": False, "detail": ""}]
    ex = _probe_guest(kvm, b"\xE6\xEA\xF4")  # out 0xEA, al; hlt
    out[0]["works"] = isinstance(ex, X.IoOut) and ex.port == 0xEA
    out[0]["detail"] = "out to the hypercall port exits (KVM_EXIT_IO)" if out[0]["works"] else f"saw {ex!r}"

    def allow_msr(vm):
        vm.enable_cap(C.KVM_CAP_X86_USER_SPACE_MSR, C.KVM_MSR_EXIT_REASON_FILTER)
        vm.set_msr_filter(False, [(C.KVM_MSR_FILTER_WRITE, 0x4000_0100, 1, b"\x00")])

    try:
        # mov ecx, 0x40000100 ; wrmsr
        ex = _probe_guest(kvm, b"\x66\xB9\x00\x01\x00\x40\x0F\x30\xF4", setup=allow_msr)
        ok = isinstance(ex, X.X86Wrmsr)
        out.append({"name": "msr", "works": ok,
                    "detail": "a filtered WRMSR exits (KVM_EXIT_X86_WRMSR); pykvmm's page uses the port transport"
                    if ok else f"saw {ex!r}"})
    except K.KvmError as e:
        out.append({"name": "msr", "works": False, "detail": str(e)})

    # vmcall ; out 0xEA, al
    ex = _probe_guest(kvm, b"\x0F\x01\xC1\xE6\xEA\xF4")
    if isinstance(ex, X.Interrupted):
        handling, detail, ok = "never-returns", "KVM_RUN never returns on vmcall here (kicked after 0.2 s): unusable", False
    elif isinstance(ex, X.Hypercall):
        handling, detail, ok = "exits", "vmcall exits (KVM_EXIT_HYPERCALL)", True
    elif isinstance(ex, X.IoOut):
        handling, detail, ok = ("in-kernel", "KVM handles vmcall itself and resumes the guest (no exit to userspace)",
                                False)
    else:
        handling, detail, ok = "unknown", f"saw {ex!r}", False
    out.append({"name": "vmcall", "works": ok, "detail": detail, "handling": handling})
    return out


def host_conventions(kvm, transports: list[dict]) -> dict:
    """The conventions pykvmm probes at start-up, plus how vmcall is handled."""
    found = {name: p.as_dict() for name, p in conventions(kvm).items()}
    vmcall = next(t for t in transports if t["name"] == "vmcall")
    found["vmcall"] = {"value": vmcall["handling"], "detail": vmcall["detail"]}
    return found


def gather(kvm) -> dict:
    chosen, probes = choose_backend(kvm, "auto")
    transports = probe_transports(kvm)
    return {
        "device": kvm.path,
        "api_version": kvm.raw_ioctl("KVM_GET_API_VERSION"),
        "capabilities": [{"name": n, "number": num, "value": kvm.check_extension(num), "meaning": m}
                         for n, num, m in CAPS],
        "backends": [p.as_dict() for p in probes.values()],
        "auto": chosen.as_dict(),
        "transports": transports,
        "host": host_conventions(kvm, transports),
        "fast_path": dict(zip(("on", "detail"), fastexit.status())),
    }
