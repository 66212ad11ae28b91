"""Issue 10: a halted lower plane always wakes for a higher plane's interrupt.

Planes API (no machine): run() of a halted plane 0 with plane 1 requested ends with a
PlaneEvent for an MSI into plane 1, for a masked one once the mask drops or a higher vector
comes, and kick() ends it; on every backend the host has. Guests (guest/vtl_wake.S): every
source (in-kernel x2APIC IPI, host MSI, SendSyntheticClusterIpi) x receiver state (halted,
spinning, making exits) x what came before (nothing, an interrupt taken while the higher VTL
ran, a masked one), with 2 and 3 VTLs.
"""

from __future__ import annotations

import threading
import time

import pytest

from pykvmm import exits as X
from pykvmm.planes import KVM_PLANE_EVENT_INTERRUPT
from pykvmm.uapi import ffi
from pykvmm.vmm import abi
from pykvmm.vmm.hyperv import tlfs
from pykvmm.vmm.machine import Machine, MachineConfig
from pykvmm.vmm.outcomes import Answer
from pykvmm.x86 import apic

from conftest import assert_done, guest_image
from test_planes import CODE_GPA, PlanesRig, rig  # noqa: F401  (rig: the fixture)

WAIT = 30.0                 # seconds a condition may take on a slow, shared machine
HALT_GPA = CODE_GPA + 0x100
STI_HLT_LOOP = b"\xFB\xF4\xEB\xFD"   # sti; hlt; jmp back to the hlt (real mode)
SYSCALL_IOCTL = 16                   # x86-64


def blocked_in_ioctl(native_tid: int) -> bool:
    """The thread sleeps inside ioctl() (a halted vCPU in KVM_RUN), from /proc."""
    try:
        with open(f"/proc/self/task/{native_tid}/syscall") as f:
            nr = f.read().split()[0]
        with open(f"/proc/self/task/{native_tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return nr == str(SYSCALL_IOCTL) and state == "S"


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


class HaltedRunner:
    """Thread A: run(plane=0, req_exit_planes=req) again after every Interrupted, until any
    other exit, which it keeps. Plane 0 runs `sti; hlt` in a loop."""

    def __init__(self, rig: PlanesRig, req: int, stop_on_interrupted: bool = False):
        self.rig, self.req, self.stop_on_interrupted = rig, req, stop_on_interrupted
        self.exits: list = []
        self.result = None
        self.tid = None
        rig.mem[HALT_GPA:HALT_GPA + len(STI_HLT_LOOP)] = STI_HLT_LOOP
        v0 = rig.planes_vcpu.plane_vcpu(0)
        r = v0.get_regs()
        r.rip = HALT_GPA
        v0.set_regs(r)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        while True:
            ex = self.rig.planes_vcpu.run(plane=0, req_exit_planes=self.req)
            self.exits.append(ex)
            if type(ex) is not X.Interrupted or self.stop_on_interrupted:
                self.result = ex
                return

    def start_and_wait_halted(self) -> None:
        self.thread.start()
        wait_for(lambda: self.tid is not None and blocked_in_ioctl(self.tid), "plane 0 halted in KVM_RUN")

    def wait_halted_again(self, after: int) -> None:
        wait_for(lambda: len(self.exits) > after and blocked_in_ioctl(self.tid), "plane 0 halted again")

    def join(self):
        self.thread.join(WAIT)
        if self.thread.is_alive():
            pytest.fail(f"run() did not return; exits so far: {[type(e).__name__ for e in self.exits[-5:]]}")
        return self.result


def set_tpr(rig: PlanesRig, plane: int, tpr: int) -> None:
    v = rig.planes_vcpu.plane_vcpu(plane)
    lapic = v.get_lapic()
    ffi.cast("uint32_t *", ffi.addressof(lapic, "regs"))[apic.APIC_TPR // 4] = tpr
    v.set_lapic(lapic)


@pytest.fixture
def halted_rig(rig):
    r = rig()
    r.enable_apic(0)
    r.enable_apic(1)
    return r


def assert_event_for_plane1(ex) -> None:
    assert isinstance(ex, X.PlaneEvent), f"expected a plane event, got {ex.describe()}"
    assert ex.cause == KVM_PLANE_EVENT_INTERRUPT and ex.target == 1 << 1


def test_msi_ends_a_halted_run(halted_rig):
    """Repro 3: an MSI into plane 1 while plane 0 is halted in run(req_exit_planes=0b10)."""
    a = HaltedRunner(halted_rig, 0b10)
    a.start_and_wait_halted()
    assert halted_rig.vm.planes[1].signal_msi(*apic.msi_message(0, 0x42)) == 1
    assert_event_for_plane1(a.join())
    assert halted_rig.irr(1) == [0x42]          # still pending: entering plane 1 delivers it


def test_kick_ends_a_halted_run(halted_rig):
    """Repro 3: kick() from another thread ends a halted run (no planes requested)."""
    a = HaltedRunner(halted_rig, 0, stop_on_interrupted=True)
    a.start_and_wait_halted()
    halted_rig.planes_vcpu.kick()
    assert type(a.join()) is X.Interrupted


def test_kick_between_runs_ends_the_next_run_at_once(halted_rig):
    """A kick while no run() is in progress makes the next run() return Interrupted without
    entering the halted plane (which would block)."""
    v0 = halted_rig.planes_vcpu.plane_vcpu(0)
    halted_rig.planes_vcpu.kick()
    a = HaltedRunner(halted_rig, 0, stop_on_interrupted=True)
    runs_before = v0.exit_count
    a.thread.start()
    assert type(a.join()) is X.Interrupted
    assert v0.exit_count == runs_before         # it never entered KVM_RUN


def test_every_kick_ends_a_halted_run(halted_rig):
    """run() leaves without the lock: kicks landing around its return must not be lost. Each
    of many kicks must end the run that is halted at that moment."""
    a = HaltedRunner(halted_rig, 0)
    a.start_and_wait_halted()
    for k in range(100):
        seen = len(a.exits)
        halted_rig.planes_vcpu.kick()
        a.wait_halted_again(seen)       # fails on a lost kick: the run would stay halted
    assert all(type(e) is X.Interrupted for e in a.exits) and len(a.exits) >= 100
    a.stop_on_interrupted = True
    halted_rig.planes_vcpu.kick()
    assert type(a.join()) is X.Interrupted


def test_masked_msi_waits_for_a_deliverable_one(halted_rig):
    """A vector under plane 1's TPR makes no event; a higher one then does (no earlier masked
    one holds it back)."""
    set_tpr(halted_rig, 1, 0x70)
    a = HaltedRunner(halted_rig, 0b10)
    a.start_and_wait_halted()
    seen = len(a.exits)
    halted_rig.vm.planes[1].signal_msi(*apic.msi_message(0, 0x50))
    a.wait_halted_again(seen)                   # the kick came, the scan found it masked
    assert a.result is None and not any(isinstance(e, X.PlaneEvent) for e in a.exits)
    halted_rig.vm.planes[1].signal_msi(*apic.msi_message(0, 0x90))
    assert_event_for_plane1(a.join())
    assert halted_rig.irr(1) == [0x50, 0x90]


@pytest.mark.parametrize("tell", [True, False], ids=["note_pending", "periodic-look"])
def test_masked_msi_events_when_the_mask_drops(halted_rig, tell):
    """A masked vector pending in plane 1 produces the event once plane 1's TPR is lowered
    (set_lapic from another thread while plane 0 stays halted): at once when the program calls
    note_pending() as the API asks, else at the backend's next periodic look."""
    set_tpr(halted_rig, 1, 0x70)
    halted_rig.vm.planes[1].signal_msi(*apic.msi_message(0, 0x50))
    a = HaltedRunner(halted_rig, 0b10)
    a.start_and_wait_halted()
    assert a.result is None
    set_tpr(halted_rig, 1, 0)
    if tell:
        halted_rig.planes_vcpu.note_pending(1)
    assert_event_for_plane1(a.join())


def test_kick_handler_is_the_planes_layers(kvm):
    """The planes VM installs the kick handler itself (this test runs on the main thread)."""
    import signal

    from pykvmm.planes import api, open_planes_vm
    previous = signal.signal(api.KICK_SIGNAL, signal.SIG_DFL)
    try:
        with open_planes_vm(kvm, "auto"):
            assert api.kick_handler_installed()
    finally:
        signal.signal(api.KICK_SIGNAL, previous)


def lapic_regs(irr=(), isr=(), tpr=0) -> bytes:
    regs = bytearray(1024)
    for base, vectors in ((apic.APIC_IRR, irr), (apic.APIC_ISR, isr)):
        for v in vectors:
            off = base + (v // 32) * 0x10
            word = int.from_bytes(regs[off:off + 4], "little") | 1 << (v % 32)
            regs[off:off + 4] = word.to_bytes(4, "little")
    regs[apic.APIC_TPR:apic.APIC_TPR + 4] = tpr.to_bytes(4, "little")
    return bytes(regs)


@pytest.mark.parametrize("irr,isr,tpr,expected", [
    ((), (), 0, None),                       # nothing pending
    ((0x50,), (), 0, 0x50),
    ((0x50,), (), 0x70, None),               # masked by TPR (class 5 <= 7)
    ((0x50, 0x90), (), 0x70, 0x90),          # a higher vector is not held back by the masked one
    ((0x75,), (), 0x70, None),               # same class as TPR: masked
    ((0x80,), (0x85,), 0, None),             # same class as the one in service
    ((0x90,), (0x85,), 0, 0x90),
    ((0x90,), (0x35,), 0xA0, None),          # PPR = the higher of TPR and ISR classes
])
def test_deliverable_irr(irr, isr, tpr, expected):
    assert apic.deliverable_irr(lapic_regs(irr, isr, tpr)) == expected


def test_kick_without_a_handler_says_so(kvm, backend):
    """A planes VM made off the main thread, with no handler for the kick signal: kick() of a
    halted run raises a clear KvmError instead of sending a signal that would kill the process."""
    import signal

    from pykvmm.kvm import KvmError
    from pykvmm.planes import api
    previous = signal.signal(api.KICK_SIGNAL, signal.SIG_DFL)
    made = []
    try:
        t = threading.Thread(target=lambda: made.append(PlanesRig(kvm, backend)))
        t.start()
        t.join()
        r = made[0]
        assert not api.kick_handler_installed()
        r.enable_apic(0)
        a = HaltedRunner(r, 0, stop_on_interrupted=True)
        a.start_and_wait_halted()
        with pytest.raises(KvmError) as e:
            r.planes_vcpu.kick()
        assert "install_kick_handler" in str(e.value)
        assert api.install_kick_handler()      # on the main thread, as the error says
        r.planes_vcpu.kick()
        assert type(a.join()) is X.Interrupted
    finally:
        signal.signal(api.KICK_SIGNAL, previous)
        for r in made:
            r.close()


# ---- guests ------------------------------------------------------------------------------------

WAKE_HOST_MSI = 0x80B1          # guest/vtl_wake.S's host-MSI hypercall
SOURCES = {"x2apic": 0, "msi": 1, "synthetic": 2}
RECEIVERS = {"halted": 0, "spinning": 1, "exits": 2}
BEFORE = {"nothing": 0, "delivered-while-running": 1, "masked": 2}


def register_host_msi(m: Machine) -> None:
    def host_msi(thread, plane, control, regs):
        m.pvm.planes[regs.r8 >> 8 & 0xF].signal_msi(*apic.msi_message(regs.rdx, regs.r8 & 0xFF))
        return Answer(tlfs.SUCCESS)
    m.dispatcher.register(WAKE_HOST_MSI, host_msi)


def run_wake(backend, source, receiver, before, planes=2, target=0, timeout=60):
    arg = SOURCES[source] | RECEIVERS[receiver] << 2 | BEFORE[before] << 4 | target << 6
    with Machine(guest_image("vtl_wake"), MachineConfig(vcpus=2, planes=planes, backend=backend,
                                                        personality="vtl", arg=arg, quiet=True)) as m:
        register_host_msi(m)
        r = m.run(timeout)
    assert_done(r)
    return r


def wake_syncs(r) -> dict:
    return {(u.vcpu, u.args[0]): u.args[1] for u in r.ucalls if u.verb == abi.UCALL_SYNC and u.plane == 0}


def check_woken(r, before: str, vtl: int) -> None:
    s = wake_syncs(r)
    assert s == {(0, 1): 0, (1, 1): 1, (1, 2): abi.VTL_ENTRY_INTERRUPT,
                 (1, 3): int(before == "delivered-while-running"), (1, 4): int(before == "masked"),
                 (1, 5): 0, (1, 6): vtl}
    assert r.stats["events_spurious"] == 0
    assert r.stats["preemptions"] >= 1


@pytest.mark.parametrize("before", list(BEFORE))
@pytest.mark.parametrize("receiver", list(RECEIVERS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_halted_lower_vtl_wakes(backend, source, receiver, before):
    r = run_wake(backend, source, receiver, before)
    check_woken(r, before, 1)
    if before == "masked":
        assert r.stats["interrupts_masked"] >= 1


@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("before", ["delivered-while-running", "masked"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_halted_lower_vtl_wakes_three_vtls(backend, source, before, target):
    r = run_wake(backend, source, "halted", before, planes=3, target=target)
    check_woken(r, before, target or 2)


# ---- randomized stress (guest/vtl_wake_stress.S) ---------------------------------------------

def run_stress(backend, vcpus, rounds, seed, timeout):
    with Machine(guest_image("vtl_wake_stress"),
                 MachineConfig(vcpus=vcpus, planes=2, backend=backend, personality="vtl",
                               arg=rounds | seed << 16, quiet=True)) as m:
        register_host_msi(m)
        r = m.run(timeout)
    assert_done(r)          # a halted VTL0 that never woke ends in TIMEOUT here
    s = wake_syncs(r)
    for v in range(vcpus):
        assert s[(v, 1)] == s[(v, 2)], f"vCPU {v}: deliverable sent {s[(v, 1)]}, taken {s[(v, 2)]} (seed {seed})"
        assert s[(v, 3)] == s[(v, 4)], f"vCPU {v}: masked sent {s[(v, 3)]}, taken {s[(v, 4)]} (seed {seed})"
        assert s[(v, 5)] == 0, f"vCPU {v}: {s[(v, 5)]} sender/receiver pairs differ (seed {seed})"
    assert sum(s[(v, 1)] for v in range(vcpus)) > 0 and sum(s[(v, 3)] for v in range(vcpus)) > 0
    assert sum(s[(v, 6)] for v in range(vcpus)) > 0, "no VTL0 ever halted: the stress did not stress"
    assert r.stats["events_spurious"] == 0
    return r


@pytest.mark.parametrize("vcpus,seed", [(2, 1), (3, 2), (4, 3)])
def test_wake_stress_short(backend, vcpus, seed):
    run_stress(backend, vcpus, rounds=40, seed=seed, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 106))
@pytest.mark.parametrize("vcpus", [2, 3, 4])
def test_wake_stress_long(backend, vcpus, seed):
    run_stress(backend, vcpus, rounds=1000, seed=seed, timeout=600)
