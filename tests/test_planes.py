"""The planes API, checked the way the RFC's plane_test.c files check KVM planes, on every
backend this host has (native and apic-groups skip here with the probe's reason)."""

from __future__ import annotations

import errno
import mmap

import pytest

from pykvmm import exits as X
from pykvmm.kvm import KvmError
from pykvmm.planes import KVM_PLANE_EVENT_INTERRUPT, open_planes_vm
from pykvmm.uapi import ffi
from pykvmm.x86 import apic

from conftest import assert_done

CODE_GPA = 0x1000
# real mode: out 0xEB, al ; jmp back
OUT_LOOP = b"\xE6\xEB\xEB\xFC"


class PlanesRig:
    """A planes VM with 64 KiB of memory, one vCPU in ``planes`` planes, all at CODE_GPA."""

    def __init__(self, kvm, backend, planes=2, shared_fpu=False, irqchip=True):
        self.vm = open_planes_vm(kvm, backend)
        self.mem = mmap.mmap(-1, 0x10000)
        self._buf = ffi.from_buffer(self.mem)
        self.vm.set_user_memory_region(0, 0, 0x10000, int(ffi.cast("uintptr_t", self._buf)))
        self.mem[CODE_GPA:CODE_GPA + len(OUT_LOOP)] = OUT_LOOP
        if irqchip:
            self.vm.create_irqchip()
        if shared_fpu:
            self.vm.enable_shared_fpu(True)
        self.planes_vcpu = self.vm.create_vcpu(0)
        for p in range(1, planes):
            self.vm.create_plane(p).create_vcpu_plane(self.planes_vcpu)
        for p in range(planes):
            v = self.planes_vcpu.plane_vcpu(p)
            s = v.get_sregs()
            s.cs.base, s.cs.selector = 0, 0
            v.set_sregs(s)
            r = v.get_regs()
            r.rip, r.rflags = CODE_GPA, 2
            v.set_regs(r)

    def enable_apic(self, plane):
        v = self.planes_vcpu.plane_vcpu(plane)
        lapic = v.get_lapic()
        regs = ffi.cast("uint32_t *", ffi.addressof(lapic, "regs"))
        regs[apic.APIC_SPIV // 4] = 0x1FF
        v.set_lapic(lapic)

    def irr(self, plane):
        return apic.irr_vectors(bytes(ffi.buffer(self.planes_vcpu.plane_vcpu(plane).get_lapic().regs)))

    def close(self):
        self.vm.close()
        self._buf = None


@pytest.fixture
def rig(kvm, backend):
    rigs = []

    def make(**kw):
        r = PlanesRig(kvm, backend, **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def test_create_plane_errors(kvm, backend):
    with open_planes_vm(kvm, backend) as vm:
        assert vm.raw_create_plane(0) == -errno.EEXIST
        assert vm.raw_create_plane(vm.max_planes) == -errno.EINVAL
        with pytest.raises(KvmError) as e:
            vm.create_plane(vm.max_planes)
        assert e.value.errno == errno.EINVAL and "KVM_CREATE_PLANE" in str(e.value)
        cpu = vm.create_vcpu(0)
        with pytest.raises(KvmError) as e:
            vm.planes[0].create_vcpu_plane(cpu)
        assert e.value.errno == errno.ENOTTY
        p1 = vm.create_plane(1)
        assert vm.raw_create_plane(1) == -errno.EEXIST
        p1.create_vcpu_plane(cpu)
        with pytest.raises(KvmError) as e:
            p1.create_vcpu_plane(cpu)
        assert e.value.errno == errno.EEXIST


def test_irqchip_only_before_extra_planes(kvm, backend):
    with open_planes_vm(kvm, backend) as vm:
        vm.create_plane(1)
        with pytest.raises(KvmError) as e:
            vm.create_irqchip()
        assert e.value.errno == errno.EINVAL


def test_regs_are_per_plane(rig):
    r = rig()
    for p, value in ((0, 0xAAAA), (1, 0xBBBB)):
        v = r.planes_vcpu.plane_vcpu(p)
        regs = v.get_regs()
        regs.rax = value
        v.set_regs(regs)
    assert r.planes_vcpu.plane_vcpu(0).get_regs().rax == 0xAAAA
    assert r.planes_vcpu.plane_vcpu(1).get_regs().rax == 0xBBBB


def _set_xmm0(v, byte):
    """Through KVM_SET_XSAVE with x87/SSE marked present, so the value survives KVM_RUN."""
    from pykvmm.x86.xsave import fpu_image
    image = fpu_image(v)
    raw = ffi.cast("uint8_t *", image.region)
    for i in range(16):
        raw[160 + i] = byte
    v.set_xsave(image)


def _xmm0(v):
    return bytes(ffi.buffer(ffi.cast("uint8_t *", v.get_xsave().region) + 160, 16))


def test_fpu_not_shared_by_default(rig):
    r = rig()
    assert not r.vm.shared_fpu
    _set_xmm0(r.planes_vcpu.plane_vcpu(0), 0x11)
    _set_xmm0(r.planes_vcpu.plane_vcpu(1), 0x22)
    assert isinstance(r.planes_vcpu.run(plane=0), X.IoOut)
    assert isinstance(r.planes_vcpu.run(plane=1), X.IoOut)
    assert _xmm0(r.planes_vcpu.plane_vcpu(0)) == b"\x11" * 16
    assert _xmm0(r.planes_vcpu.plane_vcpu(1)) == b"\x22" * 16


def test_fpu_shared_when_enabled(rig, backend):
    r = rig(shared_fpu=True)
    assert r.vm.shared_fpu
    _set_xmm0(r.planes_vcpu.plane_vcpu(0), 0x33)
    assert isinstance(r.planes_vcpu.run(plane=0), X.IoOut)
    assert isinstance(r.planes_vcpu.run(plane=1), X.IoOut)    # multivm shares at the switch
    assert _xmm0(r.planes_vcpu.plane_vcpu(1)) == b"\x33" * 16


def test_shared_fpu_must_be_chosen_before_vcpus(kvm, backend):
    with open_planes_vm(kvm, backend) as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as e:
            vm.enable_shared_fpu(True)
        assert e.value.errno == errno.EINVAL


def test_pkru_per_plane_with_shared_fpu(kvm, rig):
    from conftest import require
    from pykvmm.x86.xsave import pkru_xsave_offset
    offset = pkru_xsave_offset(kvm.supported_cpuid())
    require("pku", offset is not None, "host CPUID has no PKU (CPUID.7.0:ECX[3]): PKRU cannot be set")
    r = rig(shared_fpu=True)

    def set_pkru(v, value):
        x = v.get_xsave()
        raw = ffi.cast("uint8_t *", x.region)
        ffi.cast("uint32_t *", raw + offset)[0] = value
        ffi.cast("uint64_t *", raw + 512)[0] |= 1 << 9
        v.set_xsave(x)

    def pkru(v):
        return ffi.cast("uint32_t *", ffi.cast("uint8_t *", v.get_xsave().region) + offset)[0]

    set_pkru(r.planes_vcpu.plane_vcpu(0), 0x55555554)
    set_pkru(r.planes_vcpu.plane_vcpu(1), 0x0000000C)
    r.planes_vcpu.run(plane=0)
    r.planes_vcpu.run(plane=1)
    assert pkru(r.planes_vcpu.plane_vcpu(1)) == 0x0000000C
    assert pkru(r.planes_vcpu.plane_vcpu(0)) == 0x55555554


def test_msi_to_one_plane_and_plane_event(rig):
    r = rig()
    r.enable_apic(0)
    r.enable_apic(1)
    addr, data = apic.msi_message(0, 0x42)
    assert r.vm.planes[1].signal_msi(addr, data) == 1
    assert r.irr(1) == [0x42] and r.irr(0) == []
    ex = r.planes_vcpu.run(plane=0, req_exit_planes=1 << 1)
    assert isinstance(ex, X.PlaneEvent)
    assert ex.cause == KVM_PLANE_EVENT_INTERRUPT
    assert ex.pending_event_planes == 1 << 1 and ex.target == 1 << 1
    # an MSI on the VM itself goes to plane 0
    addr, data = apic.msi_message(0, 0x43)
    assert r.vm.signal_msi(addr, data) == 1
    assert r.irr(0) == [0x43]
    # running plane 1: its own bit is cleared on entry and ignored in req_exit_planes
    ex = r.planes_vcpu.run(plane=1, req_exit_planes=0b11)
    assert isinstance(ex, X.PlaneEvent)
    assert ex.pending_event_planes == 1 << 0 and ex.target == 1 << 0


def test_no_plane_event_when_not_requested(rig):
    r = rig()
    r.enable_apic(1)
    addr, data = apic.msi_message(0, 0x42)
    r.vm.planes[1].signal_msi(addr, data)
    ex = r.planes_vcpu.run(plane=0, req_exit_planes=0)
    assert isinstance(ex, X.IoOut) and ex.port == 0xEB
    assert r.irr(1) == [0x42]            # still pending in plane 1 until it runs


def test_req_exit_planes_ignores_current_plane(rig):
    r = rig()
    r.enable_apic(0)
    addr, data = apic.msi_message(0, 0x50)
    r.vm.planes[0].signal_msi(addr, data)
    ex = r.planes_vcpu.run(plane=0, req_exit_planes=1 << 0)
    assert isinstance(ex, X.IoOut) and ex.port == 0xEB   # plane 0 ran its loop; no event for itself


# ---- guest level -----------------------------------------------------------------------------

def test_guest_switches_planes_by_hypercall(run_guest, backend):
    r = run_guest("planes_switch", planes=2, backend=backend, personality="none")
    assert_done(r)
    assert r.syncs(plane=1) == [(1, 1), (1, 2), (1, 3)]     # plane 1 entered three times
    assert r.syncs(plane=0) == [(2, 0x5EED), (3, 3)]         # plane 0's registers intact, 3 round trips
    assert r.switches == {(0, 1): 3, (1, 0): 3}


def test_msi_to_inactive_plane_switches_only_when_requested(kvm_available, backend):
    """Plane 0 spins; the host sends an MSI to plane 1: the bare policy requests every higher
    plane, so plane 1 is entered (reason interrupt) and its handler runs."""
    from conftest import LAST_RESORT, guest_image
    from pykvmm.vmm.machine import Machine, MachineConfig
    import threading

    with Machine(guest_image("planes_msi"), MachineConfig(planes=2, backend=backend, personality="none",
                                                         quiet=True)) as m:
        def send():
            # wait until plane 1 is ready (its LAPIC on, reported by its first SYNC) and has
            # handed the vCPU back to plane 0, then interrupt it. Sent any earlier, the MSI is
            # dropped by its disabled LAPIC, or taken by plane 1 itself before it switches away
            # (interrupts are on by then), after which nothing brings plane 1 back to report:
            # both happened under nested KVM, where start-up and exits are slower.
            import time
            deadline = time.monotonic() + LAST_RESORT
            t = m.threads[0]
            while not (any(u.plane == 1 for u in m.ucalls) and t.switches.get((1, 0), 0) >= 1):
                if time.monotonic() > deadline or m.stopping:
                    return
                time.sleep(0.001)
            m.pvm.planes[1].signal_msi(*apic.msi_message(0, 0x61))
        threading.Thread(target=send, daemon=True).start()
        r = m.run(LAST_RESORT)
    assert_done(r)
    assert (2, 0x61) in r.syncs(plane=1)
    assert r.entry_reasons.get("interrupt", 0) >= 1


# ---- the soft-switch ticker ------------------------------------------------------------------

# real mode at CODE_GPA: hlt ; jmp back (in-kernel halt with IF=0: only a kick ends the run);
# at CODE_GPA + 0x10 the OUT_LOOP
HALT_LOOP = b"\xF4\xEB\xFD"


def _sleeping_in_kernel(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


@pytest.mark.parametrize("soft_backend", ["apic-groups", "multivm"])
def test_ticker_parks_while_no_run_needs_it_and_wakes_for_one(kvm_available, soft_backend):
    """The ticker kicks runs with planes requested so their LAPICs get read; with nothing to
    kick it parks (a poll every millisecond halved every exit's speed on nested mainline KVM),
    and a run that needs kicks wakes it: that run still ends within a kick interval."""
    from conftest import LAST_RESORT, backend_probe, require, wait_for
    import threading
    from pykvmm.kvm import Kvm

    probe = backend_probe(soft_backend)
    require(soft_backend, probe is not None and probe.available, probe.reason if probe else "backend probe failed")
    r = PlanesRig(Kvm(), soft_backend)
    try:
        r.mem[CODE_GPA:CODE_GPA + len(HALT_LOOP)] = HALT_LOOP
        r.mem[CODE_GPA + 0x10:CODE_GPA + 0x10 + len(OUT_LOOP)] = OUT_LOOP
        v1 = r.planes_vcpu.plane_vcpu(1)
        regs = v1.get_regs()
        regs.rip = CODE_GPA + 0x10
        v1.set_regs(regs)
        runs = []

        def halted_run():
            runs.append(r.planes_vcpu.run(plane=0, req_exit_planes=1 << 1))

        # 1. plane 0 halts requesting plane 1: the look on entry finds plane 1's LAPIC
        # software-disabled (nothing can become deliverable there until it runs), so no kick
        # can find anything: the ticker parks while the run goes on
        t = threading.Thread(target=halted_run, daemon=True)
        t.start()
        wait_for(lambda: r.vm.ticker_parked, "the ticker to park")
        assert t.is_alive() and not runs
        r.planes_vcpu.kick()                # (what note_pending would do: not the ticker's kick)
        t.join(LAST_RESORT)
        assert len(runs) == 1 and isinstance(runs[0], X.Interrupted)
        # the same run again does not need kicks either: it leaves the ticker parked (a ticker
        # woken for nothing would now sit out the long interval unparked)
        r.vm.kick_interval = LAST_RESORT
        t = threading.Thread(target=halted_run, daemon=True)
        t.start()
        wait_for(lambda: t.native_id and _sleeping_in_kernel(t.native_id), "the run to halt in KVM_RUN")
        assert r.vm.ticker_parked
        r.planes_vcpu.kick()
        t.join(LAST_RESORT)
        assert len(runs) == 2
        r.vm.kick_interval = 1e-3
        # 2. plane 1 runs with its LAPIC enabled, then plane 0 halts requesting it: an
        # interrupt for plane 1 could now arrive in the kernel unseen, so that run needs
        # kicks: it wakes the parked ticker and is ended by its kick
        r.enable_apic(1)
        assert isinstance(r.planes_vcpu.run(plane=1), X.IoOut)
        assert r.vm.ticker_parked
        t = threading.Thread(target=halted_run)
        t.start()
        t.join(LAST_RESORT)
        assert len(runs) == 3 and isinstance(runs[2], X.Interrupted)
    finally:
        r.close()       # stops a parked ticker too (a hang here is a lost wake-up at stop)


def _tsc(vcpu, plane):
    from pykvmm.x86 import arch
    return vcpu.plane_vcpu(plane).get_msrs([arch.MSR_IA32_TSC])[arch.MSR_IA32_TSC]


def test_planes_of_a_vcpu_read_one_tsc(kvm, backend):
    """One vCPU has one TSC whichever plane runs (on multivm each plane is its own KVM VM,
    whose TSC would start on its own: at 0 when it is created, on mainline KVM)."""
    vm = open_planes_vm(kvm, backend)
    try:
        vcpu = vm.create_vcpu(0)
        vm.create_plane(1).create_vcpu_plane(vcpu)
        t0, t1, t2 = _tsc(vcpu, 0), _tsc(vcpu, 1), _tsc(vcpu, 0)
        assert t0 <= t1 <= t2, (t0, t1, t2)
    finally:
        vm.close()


def test_plane_instances_take_plane0s_tsc_offset(kvm, backend):
    """Exactly: a plane's instance gets plane 0's TSC offset (KVM_VCPU_TSC_OFFSET), not a copy
    of its value that is already late by the time between two ioctls."""
    from conftest import require
    vm = open_planes_vm(kvm, backend)
    try:
        vcpu = vm.create_vcpu(0)
        offset = vcpu.plane0.get_tsc_offset()
        require("KVM_VCPU_TSC_OFFSET", offset is not None, "KVM has no KVM_VCPU_TSC_OFFSET vCPU attribute (Linux 5.16+)")
        moved = (offset + (1 << 40)) & (1 << 64) - 1     # far from where any new VM's TSC starts
        vcpu.plane0.set_tsc_offset(moved)
        require("a TSC offset", vcpu.plane0.get_tsc_offset() == moved,
                "this KVM keeps every guest TSC at the host's (a TSC offset set reads back as "
                f"{vcpu.plane0.get_tsc_offset():#x})")
        vm.create_plane(1).create_vcpu_plane(vcpu)
        assert vcpu.plane_vcpu(1).get_tsc_offset() == moved
        t0, t1, t2 = _tsc(vcpu, 0), _tsc(vcpu, 1), _tsc(vcpu, 0)
        assert t0 <= t1 <= t2, (t0, t1, t2)
    finally:
        vm.close()
