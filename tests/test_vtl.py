"""The VTL personality (pykvmm/vmm/vtl.py) on every planes backend, through the vtl_* guests.

Every value checked comes from the guest's own reports (GUEST_SYNC) or from the run result;
see each guest's header comment for what it reports.
"""

from __future__ import annotations

import pytest

from pykvmm.uapi import ffi
from pykvmm.vmm import abi, host, vtl
from pykvmm.vmm.hyperv import tlfs
from pykvmm.vmm.machine import ExitStatus, Machine, MachineConfig
from pykvmm.vmm.outcomes import Fault, Switch, SwitchReason
from pykvmm.vmm.personalities import POLICIES, make_policy
from pykvmm.x86 import arch
from pykvmm.x86.xsave import merge_pkru

from conftest import LAST_RESORT, assert_done, backend_probe, guest_image, require

UD = arch.VEC_UD


def syncs(r) -> dict:
    """{(vcpu, plane, stage): value}, and no stage reported twice by one (vCPU, plane)."""
    out = {}
    for u in r.ucalls:
        if u.verb == abi.UCALL_SYNC:
            key = (u.vcpu, u.plane, u.args[0])
            assert key not in out, f"stage reported twice: {key}"
            out[key] = u.args[1]
    return out


def run_vtl(run_guest, name, backend, vcpus=1, personality="vtl", **kw):
    r = run_guest(name, vcpus=vcpus, planes=2, backend=backend, personality=personality, **kw)
    assert_done(r)
    assert r.stats["personality"] == personality
    return r


# ---- registry -----------------------------------------------------------------------------

def test_personalities_registered_and_default(kvm_available):
    assert {"none", "vtl", "vmpl"} <= set(POLICIES)
    assert make_policy("vtl").name == "vtl" and make_policy("vmpl").name == "vmpl"
    with Machine(guest_image("vtl_call"), MachineConfig(planes=2, quiet=True)) as m:
        assert m.policy.name == "vtl"
    with Machine(guest_image("hello"), MachineConfig(planes=1, quiet=True)) as m:
        assert m.policy.name == "none"


# ---- 1. VtlCall / VtlReturn and the shared / private state ---------------------------------

def test_vtl_call_shared_and_private_state(run_guest, backend):
    """The guest checks the TLFS shared/private split itself (see vtl_call.S)."""
    r = run_vtl(run_guest, "vtl_call", backend)
    assert syncs(r) == {}
    assert r.switches == {(0, 1): 3, (1, 0): 3}
    assert r.entry_reasons == {"call": 3, "return": 3}
    assert r.hypercalls == {"HvCallVtlCall": 3, "HvCallVtlReturn": 3}
    assert r.stats["ud_injected"] == 0 and r.stats["faults_injected"] == 0
    assert r.stats["shared_state_copies"] == 5      # every switch but the first entry


def test_vtl_call_same_without_set_elision(run_guest, backend, monkeypatch):
    """Leaving out SETs the destination does not need changes nothing the guest can see."""
    monkeypatch.setattr(vtl.VtlPolicy, "elide_sets", False)
    run_vtl(run_guest, "vtl_call", backend)


# ---- 2.-5. interrupts -----------------------------------------------------------------------

def test_vtl_ipi_within_vtl1_preempts_vtl0(run_guest, backend):
    """The guest checks what VTL1's handler saw and VTL0's state itself (see vtl_ipi_within.S)."""
    r = run_vtl(run_guest, "vtl_ipi_within", backend, vcpus=2)
    assert syncs(r) == {}
    assert r.switches == {(0, 1): 4, (1, 0): 4}
    assert r.entry_reasons == {"call": 3, "interrupt": 1, "return": 4}
    assert r.stats["preemptions"] == 1


def test_vtl_ipi_across_synthetic_cluster_ipi(run_guest, backend):
    """The guest checks each status and what each handler saw itself (see vtl_ipi_across.S)."""
    r = run_vtl(run_guest, "vtl_ipi_across", backend, vcpus=2)
    assert syncs(r) == {}
    assert r.switches == {(0, 1): 6, (1, 0): 6}
    assert r.entry_reasons == {"call": 4, "interrupt": 2, "return": 6}
    assert r.stats["ipis"] == {"synthetic_same_vtl": 3, "synthetic_cross_vtl": 0}
    assert r.stats["ipis_dropped"] == 0
    assert r.hypercalls["HvCallSendSyntheticClusterIpi"] == 14


def test_vtl_isolation_icr_ipis_stay_in_their_vtl(run_guest, backend):
    """The guest checks the per-VTL counts itself (see vtl_isolation.S)."""
    r = run_vtl(run_guest, "vtl_isolation", backend, vcpus=2)
    assert syncs(r) == {}
    # preemptions: 0x45 (VTL1's own ICR) and the synthetic control; never the VTL0 ICR IPI
    assert r.entry_reasons == {"call": 4, "interrupt": 2, "return": 6}
    assert r.stats["ipis"] == {"synthetic_same_vtl": 1, "synthetic_cross_vtl": 0}


def test_vtl_lower_pending_until_vtl_return(run_guest, backend):
    """The guest checks when and in which order VTL0 takes them itself (see vtl_lower_pending.S)."""
    r = run_vtl(run_guest, "vtl_lower_pending", backend, vcpus=2)
    assert syncs(r) == {}
    assert r.entry_reasons == {"call": 3, "return": 3}        # no preemption of VTL1
    assert r.switches == {(0, 1): 3, (1, 0): 3}
    assert r.stats["preemptions"] == 0


def test_vtl_tpr_masks_preemption(run_guest, backend):
    """The guest checks each step itself (see vtl_tpr.S)."""
    r = run_vtl(run_guest, "vtl_tpr", backend)
    assert syncs(r) == {}
    assert r.entry_reasons == {"call": 4, "interrupt": 1, "return": 5}
    assert r.stats["preemptions"] == 1
    assert r.stats["interrupts_masked"] >= 1


# ---- 5b. a VTL's LAPIC timer while that VTL does not run (guest/vtl_timer) ----------------------

TIMER_MODES = {"one-shot": 0, "periodic": 1, "tsc-deadline": 2}
TIMER_MASKED, TIMER_LOWER, TIMER_TPR_MASKED = 3, 4, 5
TIMER_EXPIRIES = 4                  # guest/vtl_timer's N_EXPIRIES, one every 25 ms
TIMER_LATE_BOUND = 0.25             # s: far below VTL0's 8 s guard and the 1 s kick interval here
TIMER_KICK_INTERVAL = 1.0           # so only the planes layer's host timer can make the event on time


def guest_tsc_khz(kvm) -> int:
    """The guest TSC's frequency (KVM_GET_TSC_KHZ): vtl_timer's unit of time."""
    vm = kvm.create_vm()
    try:
        return vm.create_vcpu(0).get_tsc_khz()
    finally:
        vm.close()


def run_vtl_timer(run_guest, kvm, backend, mode, halt=False, vtl1_if=False, round_trips=False, **kw):
    arg = guest_tsc_khz(kvm) | mode << 32 | int(halt) << 40 | int(vtl1_if) << 41 | int(round_trips) << 42
    r = run_vtl(run_guest, "vtl_timer", backend, arg=arg, **kw)
    s = {stage: value for (_, _, stage), value in syncs(r).items()}
    return r, s, arg & 0xFFFFFFFF


@pytest.mark.parametrize("vtl1_if", [False, True], ids=["vtl1-if-off", "vtl1-if-on"])
@pytest.mark.parametrize("vtl0", ["spins", "halts"])
@pytest.mark.parametrize("mode", list(TIMER_MODES))
def test_vtl1_lapic_timer_preempts_vtl0(run_guest, kvm, backend, mode, vtl0, vtl1_if):
    """TLFS: a higher VTL's interrupts preempt a lower VTL, its LAPIC timer's too. VTL1 arms its
    timer and returns to a VTL0 that spins without exits or halts; every expiry is taken by
    VTL1's handler within the bound (its lateness measured in the guest's TSC), long before
    VTL0's guard and the ticker's next kick. Each VTL1 entry for an interrupt is a preemption
    (one per expiry here; a loaded host may deliver an expiry while VTL1 still runs)."""
    r, s, khz = run_vtl_timer(run_guest, kvm, backend, TIMER_MODES[mode], halt=vtl0 == "halts",
                              vtl1_if=vtl1_if, kick_interval=TIMER_KICK_INTERVAL)
    if mode == "tsc-deadline":
        require("tsc-deadline", s[0x14] == 1, "KVM emulates no TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER): the guest CPUID has none")
    late = [((s[0x100 + k] + (1 << 63)) % (1 << 64) - (1 << 63)) / (khz * 1e3) for k in range(s[0x10])]
    assert s[0x12] == 0, f"VTL0's guard fired: {s[0x10]} of {TIMER_EXPIRIES} expiries taken, late by {late} s"
    assert s[0x10] == TIMER_EXPIRIES
    assert all(-1e-4 <= t <= TIMER_LATE_BOUND for t in late), f"lateness per expiry (s): {late}"
    entries = s[0x11]
    assert 1 <= entries <= TIMER_EXPIRIES
    assert r.stats["preemptions"] == entries and r.entry_reasons.get("interrupt") == entries
    if backend != "native":                                # the planes layer made the events
        assert 1 <= r.stats["lapic_timer_events"] <= entries


@pytest.mark.parametrize("vtl0", ["spins", "halts"])
def test_vtl1_masked_lapic_timer_does_not_preempt(run_guest, kvm, backend, vtl0):
    """VTL1's timer with its LVT entry masked expires without a preemption (VTL0 runs to its
    own 100 ms guard; VTL1's current count is 0 afterwards)."""
    r, s, _ = run_vtl_timer(run_guest, kvm, backend, TIMER_MASKED, halt=vtl0 == "halts")
    assert s[0x12] == 1 and s[0x13] == 0
    assert s[0x10] == 0 and s[0x11] == 0
    assert r.stats["preemptions"] == 0 and r.stats.get("lapic_timer_events", 0) == 0


def test_vtl1_lapic_timer_masked_by_its_tpr_waits(run_guest, kvm, backend):
    """VTL1's TPR (0xF0) masks its timer's vector (0xB1): the expiry makes no preemption; it is
    held, and VTL1 takes it once it lowers its TPR."""
    r, s, _ = run_vtl_timer(run_guest, kvm, backend, TIMER_TPR_MASKED)
    assert s[0x12] == 1 and s[0x11] == 0 and r.stats["preemptions"] == 0
    assert s[0x10] == 1                                    # taken after the TPR was lowered
    if backend != "native":
        assert r.stats["interrupts_masked"] >= 1


def test_vtl0_lapic_timer_waits_until_vtl0_runs(run_guest, kvm, backend):
    """A lower VTL's timer expiring while VTL1 runs (making exits, then spinning) is not taken
    until VTL0 runs again."""
    r, s, _ = run_vtl_timer(run_guest, kvm, backend, TIMER_LOWER)
    assert s[0x30] == 0 and s[0x31] == 1
    assert r.stats["preemptions"] == 0


@pytest.mark.parametrize("timer", ["masked", "one-shot", "tsc-deadline"])
@pytest.mark.parametrize("vtl1_if", [False, True], ids=["vtl1-if-off", "vtl1-if-on"])
def test_lapic_timer_costs_a_read_per_switch_only_when_armed(kvm, timer, vtl1_if):
    """What watching VTL1's timer costs a VtlCall+VtlReturn on multivm: VTL1's LAPIC is read
    when it returns with interrupts off anyway (for its IRR); with them on only when its LVT
    timer is unmasked (one KVM_GET_LAPIC); a TSC-deadline timer adds one KVM_GET_MSRS. No
    kicks and no rate-limited scans in this run (kick interval and scan gap 10 s)."""
    import collections

    from pykvmm import kvm as K
    require("multivm", backend_probe("multivm").available, "multivm backend unavailable")
    mode = {"masked": TIMER_MASKED, "one-shot": TIMER_MODES["one-shot"], "tsc-deadline": TIMER_MODES["tsc-deadline"]}[timer]
    arg = guest_tsc_khz(kvm) | mode << 32 | int(vtl1_if) << 41 | 1 << 42
    counts = collections.Counter()
    with Machine(guest_image("vtl_timer"), MachineConfig(planes=2, backend="multivm", arg=arg, quiet=True,
                                                         kick_interval=10.0)) as m:
        for t in m.threads:
            t.planes_vcpu.scan_gap = 10.0
        with K.counting_ioctls(counts):
            r = m.run(LAST_RESORT)
    assert_done(r)
    s = {stage: value for (_, _, stage), value in syncs(r).items()}
    if timer == "tsc-deadline":
        require("tsc-deadline", s[0x14] == 1, "KVM emulates no TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER): the guest CPUID has none")
    rounds = s[0x20] + 2                   # and the two VtlCalls around them (arm, stop)
    lapic = round(counts["KVM_GET_LAPIC"] / rounds, 1)
    msrs = round(counts["KVM_GET_MSRS"] / rounds, 1)
    assert lapic == (0.0 if vtl1_if and timer == "masked" else 1.0), counts
    assert msrs == (1.0 if timer == "tsc-deadline" else 0.0), counts


# ---- 6. ping-pong -----------------------------------------------------------------------------

def assert_pingpong_checked(r, kvm, vcpus: int, n: int) -> None:
    """Each VTL0 checked its own n round trips (SYNC 1), and no pong came in on its wait's `hlt`
    (SYNC 2) unless the host's CPU drops the STI shadow at VM entry (host convention sti_shadow:
    QEMU's emulated SVM before 9.1), where the guest resumes after the `hlt` and counts it."""
    s = syncs(r)
    assert {k: x for k, x in s.items() if k[2] == 1} == {(v, 0, 1): n for v in range(vcpus)}
    misses = sum(s[(v, 0, 2)] for v in range(vcpus))
    if host.convention(kvm, "sti_shadow").value != "lost":
        assert misses == 0, f"{misses} pongs were delivered inside sti's interrupt shadow, on the hlt"


def test_vtl_pingpong_counts_every_ipi(run_guest, backend, kvm):
    n = 2000
    r = run_vtl(run_guest, "vtl_pingpong", backend, vcpus=2, arg=n)
    assert_pingpong_checked(r, kvm, 2, n)
    # n pings (VTL1 to VTL1, asked for by a VtlCall) + n pongs (VTL1 to VTL0) from each vCPU
    assert r.stats["ipis"] == {"synthetic_same_vtl": 2 * n, "synthetic_cross_vtl": 2 * n}
    assert r.stats["ipis_dropped"] == 0
    assert r.hypercalls["HvCallSendSyntheticClusterIpi"] == 4 * n
    # a ping either preempts VTL0 or reaches a VTL1 that is already running
    preempt = r.entry_reasons["interrupt"]
    assert 0 < preempt <= 2 * n and r.stats["preemptions"] == preempt
    assert r.entry_reasons["call"] == 2 + 2 * n
    assert r.switches == {(0, 1): 2 + 2 * n + preempt, (1, 0): 2 + 2 * n + preempt}
    assert r.entry_reasons["return"] == 2 + 2 * n + preempt


@pytest.mark.parametrize("vcpus, n", [(4, 500), pytest.param(8, 100_000 // 8, marks=pytest.mark.slow)])
def test_vtl_pingpong_pairs_none_lost(run_guest, backend, kvm, vcpus, n):
    """vCPU pairs ping-pong at once; the slow case is the 8 vCPUs x 2 planes soak
    (100k cross-VTL IPIs: 8 vCPUs x n pings + n pongs)."""
    r = run_vtl(run_guest, "vtl_pingpong", backend, vcpus=vcpus, arg=n, timeout=1800)
    assert_pingpong_checked(r, kvm, vcpus, n)
    assert r.stats["ipis"] == {"synthetic_same_vtl": vcpus * n, "synthetic_cross_vtl": vcpus * n}
    assert r.stats["ipis_dropped"] == 0


# ---- 7. the demo --------------------------------------------------------------------------------

def test_demo_story(run_guest, backend):
    """VTL0 never interrupts VTL1 (TLFS): it VtlCalls its own VTL1, which interrupts VTL1 of
    the other vCPU; that VTL1 preempts its VTL0 and answers vCPU0's VTL0 downwards."""
    r = run_vtl(run_guest, "demo", backend, vcpus=2)
    by_vcpu = {v: [u.message for u in r.ucalls if u.verb == abi.UCALL_PRINT and u.vcpu == v] for v in (0, 1)}
    assert by_vcpu[0] == [
        "vCPU0/VTL0: hello! starting the secure kernel in VTL1 with a VtlCall",
        "vCPU0/VTL1: secure kernel up (entered by VtlCall, entry reason 1); VtlReturn to VTL0",
        "vCPU0/VTL0: I may not interrupt VTL1, so I ask my own VTL1 for help with a VtlCall",
        "vCPU0/VTL1: VTL0 asked (entry reason 1: VtlCall): SendSyntheticClusterIpi(0x50) to VTL1 on vCPU1",
        "vCPU0/VTL0: VTL1 answered with interrupt 0x51. The end.",
    ]
    assert by_vcpu[1] == [
        "vCPU1/VTL0: hello! starting the secure kernel in VTL1 with a VtlCall",
        "vCPU1/VTL1: secure kernel up (entered by VtlCall, entry reason 1); VtlReturn to VTL0",
        "vCPU1/VTL0: working in VTL0 (spinning)",
        "vCPU1/VTL1: interrupt 0x50 preempted VTL0 (entry reason 2: Interrupt)",
        "vCPU1/VTL1: answering VTL0 on vCPU0 with interrupt 0x51, then VtlReturn",
        "vCPU1/VTL0: ...resumed right where VTL1 preempted me",
    ]
    assert syncs(r) == {(0, 0, 1): 0x51}
    assert r.entry_reasons == {"call": 3, "interrupt": 1, "return": 4}
    # one IPI inside VTL1 (vCPU0 -> vCPU1), one down to VTL0: none from VTL0 upwards
    assert r.stats["ipis"] == {"synthetic_same_vtl": 1, "synthetic_cross_vtl": 1}


def test_demo_on_a_vsm_partition(run_guest):
    """With --hyperv (hv_vsm) and TLFS boot the demo first brings VTL1 up as a VSM guest does
    (CPUID, HV_X64_MSR_HYPERCALL, VsmCodePageOffsets, EnablePartitionVtl, EnableVpVtl; entry
    reasons from VTL1's own VP assist page), then tells the same story."""
    from pykvmm.vmm.hyperv import HvConfig
    r = run_guest("demo", vcpus=2, planes=2, personality="vtl", hyperv=HvConfig.everything(), vtl_boot="tlfs")
    assert_done(r)
    prints = r.prints()
    assert prints[:2] == ["vCPU0/VTL0: Hyper-V with VSM (CPUID AccessVsm): HvCallEnablePartitionVtl(VTL1)",
                          "vCPU0/VTL0: HvCallEnableVpVtl(VTL1) with my own registers as its initial context"]
    assert prints.count("vCPU1/VTL0: HvCallEnableVpVtl(VTL1) with my own registers as its initial context") == 1
    assert "vCPU1/VTL1: interrupt 0x50 preempted VTL0 (entry reason 2: Interrupt)" in prints
    assert prints.index("vCPU1/VTL0: HvCallEnableVpVtl(VTL1) with my own registers as its initial context") \
        < prints.index("vCPU1/VTL1: secure kernel up (entered by VtlCall, entry reason 1); VtlReturn to VTL0")
    assert syncs(r) == {(0, 0, 1): 0x51}
    assert r.hypercalls["HvCallEnablePartitionVtl"] == 1 and r.hypercalls["HvCallEnableVpVtl"] == 2
    assert r.entry_reasons == {"call": 3, "interrupt": 1, "return": 4}


def test_demo_calls_the_stubs_vsm_code_page_offsets_names(run_guest, monkeypatch):
    """A VSM guest finds VtlCall/VtlReturn through HvRegisterVsmCodePageOffsets: with the
    stubs moved in the page (the old offsets are int3 now), the demo still runs."""
    from pykvmm.vmm.hyperv import HvConfig
    monkeypatch.setattr(abi, "HCPAGE_VTL_CALL", 0x40)
    monkeypatch.setattr(abi, "HCPAGE_VTL_RETURN", 0x80)
    r = run_guest("demo", vcpus=2, planes=2, personality="vtl", hyperv=HvConfig.everything(), vtl_boot="tlfs")
    assert_done(r)
    assert r.entry_reasons == {"call": 3, "interrupt": 1, "return": 4}


def test_demo_one_vcpu_and_one_plane(run_guest):
    r = run_guest("demo", vcpus=1, planes=2)
    assert_done(r)
    assert syncs(r) == {(0, 0, 1): 0x51}
    assert r.prints()[3:6] == ["vCPU0/VTL1: VTL0 asked (entry reason 1: VtlCall): SendSyntheticClusterIpi(0x50) to myself",
                               "vCPU0/VTL1: interrupt 0x50 arrived while VTL1 ran",
                               "vCPU0/VTL1: answering VTL0 on vCPU0 with interrupt 0x51, then VtlReturn"]
    r = run_guest("demo", vcpus=1, planes=1)
    assert_done(r)
    assert r.prints() == ["demo: this story needs two planes (run with --planes 2)"]


# ---- 8. malformed calls --------------------------------------------------------------------------

def test_vtl_bad_calls_get_ud_and_the_vmm_carries_on(run_guest, backend):
    """The guest checks each #UD itself: exactly one per case, at a RIP inside the stub it
    called (see vtl_bad.S)."""
    r = run_vtl(run_guest, "vtl_bad", backend)
    assert syncs(r) == {}
    assert r.status == ExitStatus.DONE
    assert r.stats["faults_injected"] == 8 and r.stats["ud_injected"] == 8
    assert r.stats["ud_reasons"] == {"call-control": 2, "call-input": 1, "return-from-vtl0": 1,
                                     "return-control": 1, "call-from-top": 1, "return-input": 2}
    assert r.hypercalls == {"HvCallVtlCall": 7, "HvCallVtlReturn": 7}
    assert r.switches == {(0, 1): 3, (1, 0): 3}


def test_vtl_return_with_nothing_suspended_is_ud(kvm_available):
    """Not reachable from a guest (a higher VTL is only ever entered from a lower one)."""
    with Machine(guest_image("vtl_call"), MachineConfig(planes=2, quiet=True)) as m:
        t = m.threads[0]
        t.plane, t.vcpu, t.started_planes = 1, t.plane_vcpu(1), {0, 1}
        regs = t.plane_vcpu(1).regs
        regs.rax, regs.rcx = 0, tlfs.HVCALL_VTL_RETURN
        _, outcome = m.dispatcher.dispatch(t, 1, regs)
        assert type(outcome) is Fault and outcome.vector == UD
        assert m.policy.summary()["ud_reasons"] == {"return-nothing-suspended": 1}


def test_vtl_hypercalls_above_cpl0_are_ud(kvm_available):
    with Machine(guest_image("vtl_call"), MachineConfig(planes=2, quiet=True)) as m:
        t, pol = m.threads[0], m.policy
        v = t.plane_vcpu(0)
        v.sregs.cs.dpl = 3
        regs = v.regs
        regs.rax = 0
        for code in (tlfs.HVCALL_VTL_CALL, tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI):
            regs.rcx = code
            _, outcome = m.dispatcher.dispatch(t, 0, regs)
            assert type(outcome) is Fault and outcome.vector == UD and "CPL 3" in outcome.why
        assert t.plane == 0 and not t.suspended
        assert pol.summary()["ud_reasons"] == {"cpl": 2}


# ---- vmpl -------------------------------------------------------------------------------------------

def test_vmpl_shares_nothing_and_never_preempts(run_guest, backend):
    """The guest checks what it sees itself (see vtl_vmpl.S)."""
    r = run_vtl(run_guest, "vtl_vmpl", backend, personality="vmpl")
    assert syncs(r) == {}
    assert r.entry_reasons == {"call": 4, "return": 4}
    assert r.stats["shared_state_copies"] == 0 and r.stats["preemptions"] == 0


# ---- the state transfer, checked from the host --------------------------------------------------

XSAVE_XMM0 = 160          # legacy FXSAVE area: XMM0 at byte 160, MXCSR at 24
XSAVE_MXCSR = 24
XSAVE_BV = 512            # XSTATE_BV, low byte


def _xsave_bytes(v) -> bytearray:
    return bytearray(ffi.buffer(v.get_xsave().region))


def _set_xsave_bytes(v, data: bytes) -> None:
    x = v.get_xsave()
    ffi.memmove(x.region, bytes(data), len(data))
    v.set_xsave(x)


def test_transfer_copies_fpu_debug_and_cr2_keeps_private(kvm_available, backend):
    """x87/SSE state cannot be exercised by guests on the kvm_pvm host (FPU data instructions
    end in an emulation failure there), so the XSAVE copy is checked from the host."""
    with Machine(guest_image("vtl_call"), MachineConfig(planes=2, quiet=True, backend=backend)) as m:
        t, pol = m.threads[0], m.policy
        v0, v1 = t.plane_vcpu(0), t.plane_vcpu(1)
        t.started_planes.add(1)                    # both planes have run: a real transfer
        x = _xsave_bytes(v0)
        x[XSAVE_XMM0:XSAVE_XMM0 + 16] = bytes(range(1, 17))
        x[XSAVE_MXCSR:XSAVE_MXCSR + 4] = (0x1F80 | 0x6000).to_bytes(4, "little")
        x[XSAVE_BV] |= 0b11                         # x87 and SSE state present in the image
        _set_xsave_bytes(v0, x)
        d = v0.get_debugregs()
        d.db[2] = 0xD2D2000
        v0.set_debugregs(d)
        own_dr7 = v1.get_debugregs().dr7
        r0 = v0.regs
        r0.rbx, r0.r15, r0.rsp = 0x1111, 0x1515, 0x5000
        v0.mark_dirty("regs")
        s0 = v0.sregs
        s0.cr2 = 0xC2C2
        v0.mark_dirty("sregs")
        rsp1 = v1.regs.rsp

        t.switch(Switch(1, SwitchReason.CALL, suspend=True))
        x1 = _xsave_bytes(v1)
        assert x1[XSAVE_XMM0:XSAVE_XMM0 + 16] == bytes(range(1, 17))
        assert int.from_bytes(x1[XSAVE_MXCSR:XSAVE_MXCSR + 4], "little") == 0x7F80
        d1 = v1.get_debugregs()
        assert d1.db[2] == 0xD2D2000 and d1.dr7 == own_dr7
        assert (v1.regs.rbx, v1.regs.r15, v1.regs.rsp) == (0x1111, 0x1515, rsp1)   # RSP is private
        assert v1.sregs.cr2 == 0xC2C2
        assert m.memory.u32(abi.control_page(0, 1) + abi.VTL_ENTRY_REASON) == abi.VTL_ENTRY_VTL_CALL

        # back, with a change in plane 1: only that is copied
        x1[XSAVE_XMM0 + 16:XSAVE_XMM0 + 32] = b"\xEE" * 16
        x1[XSAVE_BV] |= 0b11
        _set_xsave_bytes(v1, x1)
        t.switch(Switch(None, SwitchReason.RETURN))
        x0 = _xsave_bytes(v0)
        assert x0[XSAVE_XMM0:XSAVE_XMM0 + 16] == bytes(range(1, 17))
        assert x0[XSAVE_XMM0 + 16:XSAVE_XMM0 + 32] == b"\xEE" * 16
        assert v0.regs.rsp == 0x5000
        assert v0.get_debugregs().db[2] == 0xD2D2000

        # A round trip that changes nothing leaves both planes' state as it was (the policy may
        # skip SETs it knows are redundant; how many ioctls that takes depends on the host's
        # features, e.g. XCR0 is copied only where the guest has XSAVE).
        def sse(v):                                    # MXCSR and XMM0-15 of the XSAVE image
            x = _xsave_bytes(v)
            return bytes(x[XSAVE_MXCSR:XSAVE_MXCSR + 4] + x[XSAVE_XMM0:XSAVE_XMM0 + 256])
        images = sse(v0), sse(v1)
        drs = tuple(v0.get_debugregs().db), tuple(v1.get_debugregs().db)
        t.switch(Switch(1, SwitchReason.CALL, suspend=True))
        t.switch(Switch(None, SwitchReason.RETURN))
        assert (sse(v0), sse(v1)) == images
        assert (tuple(v0.get_debugregs().db), tuple(v1.get_debugregs().db)) == drs
        assert pol.summary()["state_ioctls"] > 0


def test_pkru_is_kept_by_the_destination():
    """The XSAVE merge keeps the destination's PKRU bytes and XSTATE_BV bit 9."""
    off = 2688
    src = ffi.new("struct kvm_xsave *")
    region = ffi.cast("uint8_t *", src.region)
    for i in range(4):
        region[off + i] = 0xAA
    ffi.cast("uint64_t *", region + 512)[0] = 0b11 | 1 << 9
    mine = bytearray(4096)
    mine[off:off + 4] = b"\x55\x55\x55\x55"
    mine[512:520] = (0b11).to_bytes(8, "little")
    merge_pkru(src, bytes(mine), off)
    out = bytes(ffi.buffer(src.region))
    assert out[off:off + 4] == b"\x55\x55\x55\x55"
    assert int.from_bytes(out[512:520], "little") == 0b11
