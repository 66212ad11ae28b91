"""The VTL personality (pykvmm/vmm/vtl.py) on every planes backend, through the vtl_* guests.

Every value checked comes from the guest's own reports (GUEST_SYNC) or from the run result;
see each guest's header comment for what it reports.
"""

from __future__ import annotations

import pytest

from pykvmm.uapi import ffi
from pykvmm.vmm import abi, vtl
from pykvmm.vmm.hyperv import tlfs
from pykvmm.vmm.hypercalls import hypercall_page
from pykvmm.vmm.machine import ExitStatus, Machine, MachineConfig
from pykvmm.vmm.outcomes import Fault, Switch, SwitchReason
from pykvmm.vmm.personalities import POLICIES, make_policy
from pykvmm.x86 import arch
from pykvmm.x86.xsave import merge_pkru

from conftest import assert_done, guest_image

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


def stub_out_offsets() -> tuple[int, int, int]:
    """Offsets in the hypercall page of the hypercall instruction of the generic, VtlCall and
    VtlReturn stubs: where the VMM points RIP for a #UD."""
    page = hypercall_page("port")
    insn = bytes([0xE6, abi.PORT_HYPERCALL])
    return tuple(page.index(insn, off) for off in (abi.HCPAGE_HYPERCALL, abi.HCPAGE_VTL_CALL,
                                                     abi.HCPAGE_VTL_RETURN))


# ---- registry -----------------------------------------------------------------------------

def test_personalities_registered_and_default(kvm_available):
    assert {"none", "vtl", "vmpl"} <= set(POLICIES)
    assert make_policy("vtl").name == "vtl" and make_policy("vmpl").name == "vmpl"
    with Machine(guest_image("vtl_call"), MachineConfig(planes=2, quiet=True)) as m:
        assert m.policy.name == "vtl"
    with Machine(guest_image("hello"), MachineConfig(planes=1, quiet=True)) as m:
        assert m.policy.name == "none"


# ---- 1. VtlCall / VtlReturn and the shared / private state ---------------------------------

A = {r: 0xA000000000000000 + n * 0x0101010101 for n, r in enumerate(
    ("rbx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"), 1)}
B = {r: v ^ (0xA0 ^ 0xB0) << 56 for r, v in A.items()}
C = {r: v ^ (0xA0 ^ 0xC0) << 56 for r, v in A.items()}
D = {r: v ^ (0xA0 ^ 0xD0) << 56 for r, v in A.items()}

VTL_CALL_SYNCS = {
    (0, 1, 0x100): 1,                                   # first entry: reason VtlCall
    (0, 1, 0x101): 1, (0, 1, 0x102): A["rbx"], (0, 1, 0x103): 0, (0, 1, 0x104): 0x11,
    (0, 1, 0x105): A["r15"], (0, 1, 0x106): 0xC2C20A0A, (0, 1, 0x107): 0xDA0000,
    (0, 1, 0x108): 0xDA3000, (0, 1, 0x10A): 1, (0, 1, 0x10B): 1, (0, 1, 0x10C): 0,
    (0, 1, 0x10D): 1,
    (0, 0, 0x11): 1, (0, 0, 0x12): 0x12, (0, 0, 0x13): B["rbx"], (0, 0, 0x14): B["r15"],
    (0, 0, 0x15): 0xC2C20B0B, (0, 0, 0x16): 0xDB1000, (0, 0, 0x18): 1,
    (0, 0, 0x19): abi.PAGE_TABLE_ADDR, (0, 0, 0x1A): 1, (0, 0, 0x1B): 1, (0, 0, 0x1C): 0xDA0000,
    (0, 1, 0x201): 1, (0, 1, 0x202): C["rbx"],
    (0, 0, 0x21): 0x5AFE00000000A0A0, (0, 0, 0x22): 0x5AFE00000000C0C0,
    (0, 0, 0x23): D["rbx"], (0, 0, 0x24): C["rsi"],
}


def test_vtl_call_shared_and_private_state(run_guest, backend):
    r = run_vtl(run_guest, "vtl_call", backend)
    assert syncs(r) == VTL_CALL_SYNCS
    assert r.switches == {(0, 1): 3, (1, 0): 3}
    assert r.entry_reasons == {"call": 3, "return": 3}
    assert r.hypercalls == {"HvCallVtlCall": 3, "HvCallVtlReturn": 3}
    assert r.stats["ud_injected"] == 0 and r.stats["faults_injected"] == 0
    assert r.stats["shared_state_copies"] == 5      # every switch but the first entry


def test_vtl_call_same_without_set_elision(run_guest, backend, monkeypatch):
    """Leaving out SETs the destination does not need changes nothing the guest can see."""
    monkeypatch.setattr(vtl.VtlPolicy, "elide_sets", False)
    r = run_vtl(run_guest, "vtl_call", backend)
    assert syncs(r) == VTL_CALL_SYNCS


# ---- 2.-5. interrupts -----------------------------------------------------------------------

def test_vtl_ipi_within_vtl1_preempts_vtl0(run_guest, backend):
    r = run_vtl(run_guest, "vtl_ipi_within", backend, vcpus=2)
    assert syncs(r) == {(0, 0, 1): 0, (1, 0, 1): 0x60, (1, 0, 2): abi.VTL_ENTRY_INTERRUPT,
                        (1, 0, 3): 1, (1, 0, 4): 1, (1, 0, 5): 1}
    assert r.switches == {(0, 1): 4, (1, 0): 4}
    assert r.entry_reasons == {"call": 3, "interrupt": 1, "return": 4}
    assert r.stats["preemptions"] == 1


def test_vtl_ipi_across_synthetic_cluster_ipi(run_guest, backend):
    r = run_vtl(run_guest, "vtl_ipi_across", backend, vcpus=2)
    s = abi
    assert syncs(r) == {
        (0, 0, 1): 0, (0, 0, 2): 0, (0, 0, 3): 0,
        (0, 0, 0x10): tlfs.INVALID_PARAMETER,        # vector 0x0f
        (0, 0, 0x11): tlfs.INVALID_PARAMETER,        # vector 0x100
        (0, 0, 0x12): tlfs.INVALID_PARAMETER,        # reserved HV_INPUT_VTL bits
        (0, 0, 0x13): tlfs.INVALID_PARAMETER,        # VTL2 of 2 planes
        (0, 0, 0x14): tlfs.INVALID_PARAMETER,        # vCPU2 of 2
        (0, 0, 0x15): tlfs.INVALID_ALIGNMENT,        # GPA not 8-aligned
        (0, 0, 0x16): tlfs.INVALID_PARAMETER,        # GPA outside guest memory
        (0, 0, 0x17): tlfs.INVALID_HYPERCALL_INPUT,  # rep count
        (0, 0, 0x18): tlfs.INVALID_HYPERCALL_INPUT,  # variable header size
        (0, 0, 0x19): tlfs.SUCCESS,                  # empty mask: nothing sent
        (0, 0, 0x1a): tlfs.ACCESS_DENIED,            # VTL0 cannot interrupt VTL1
        (1, 0, 1): 0x50, (1, 0, 2): 0x51, (1, 0, 3): 0x22, (1, 0, 4): 2,
        (1, 0, 5): 0x52, (1, 0, 6): 1, (1, 0, 7): 1,
    }
    assert r.switches == {(0, 1): 6, (1, 0): 6}
    assert r.entry_reasons == {"call": 4, "interrupt": 2, "return": 6}
    assert r.stats["ipis"] == {"synthetic_same_vtl": 3, "synthetic_cross_vtl": 0}
    assert r.stats["ipis_dropped"] == 0
    assert r.hypercalls["HvCallSendSyntheticClusterIpi"] == 14


def test_vtl_isolation_icr_ipis_stay_in_their_vtl(run_guest, backend):
    r = run_vtl(run_guest, "vtl_isolation", backend, vcpus=2)
    assert syncs(r) == {(1, 0, 1): 1, (1, 0, 2): 0, (1, 0, 3): 1, (1, 0, 4): 0, (1, 0, 5): 1}
    # preemptions: 0x45 (VTL1's own ICR) and the synthetic control; never the VTL0 ICR IPI
    assert r.entry_reasons == {"call": 4, "interrupt": 2, "return": 6}
    assert r.stats["ipis"] == {"synthetic_same_vtl": 1, "synthetic_cross_vtl": 0}


def test_vtl_lower_pending_until_vtl_return(run_guest, backend):
    r = run_vtl(run_guest, "vtl_lower_pending", backend, vcpus=2)
    assert syncs(r) == {(0, 1, 0x101): 0, (0, 1, 0x102): 0, (0, 1, 0x103): 0,
                        (0, 0, 4): 1, (0, 0, 1): 1, (0, 0, 2): 1, (0, 0, 3): 0x4746}
    assert r.entry_reasons == {"call": 3, "return": 3}        # no preemption of VTL1
    assert r.switches == {(0, 1): 3, (1, 0): 3}
    assert r.stats["preemptions"] == 0


def test_vtl_tpr_masks_preemption(run_guest, backend):
    r = run_vtl(run_guest, "vtl_tpr", backend)
    assert syncs(r) == {(0, 0, 1): 0, (0, 0, 2): 0, (0, 0, 3): 1, (0, 0, 4): 0, (0, 0, 5): 1,
                        (0, 0, 6): 0x68, (0, 0, 7): abi.VTL_ENTRY_INTERRUPT}
    assert r.entry_reasons == {"call": 4, "interrupt": 1, "return": 5}
    assert r.stats["preemptions"] == 1
    assert r.stats["interrupts_masked"] >= 1


# ---- 6. ping-pong -----------------------------------------------------------------------------

def test_vtl_pingpong_counts_every_ipi(run_guest, backend):
    n = 2000
    r = run_vtl(run_guest, "vtl_pingpong", backend, vcpus=2, arg=n, timeout=60)
    assert syncs(r) == {(v, 0, stage): value for v in (0, 1)
                        for stage, value in ((1, n), (2, n), (3, 0), (4, n))}
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
def test_vtl_pingpong_pairs_none_lost(run_guest, backend, vcpus, n):
    """vCPU pairs ping-pong at once; the slow case is the 8 vCPUs x 2 planes soak
    (100k cross-VTL IPIs: 8 vCPUs x n pings + n pongs)."""
    r = run_vtl(run_guest, "vtl_pingpong", backend, vcpus=vcpus, arg=n, timeout=1800)
    assert syncs(r) == {(v, 0, stage): value for v in range(vcpus)
                        for stage, value in ((1, n), (2, n), (3, 0), (4, n))}
    assert r.stats["ipis"] == {"synthetic_same_vtl": vcpus * n, "synthetic_cross_vtl": vcpus * n}
    assert r.stats["ipis_dropped"] == 0


# ---- 7. the demo --------------------------------------------------------------------------------

def test_demo_story(run_guest, backend):
    r = run_vtl(run_guest, "demo", backend, vcpus=2)
    by_vcpu = {v: [u.message for u in r.ucalls if u.verb == abi.UCALL_PRINT and u.vcpu == v] for v in (0, 1)}
    assert by_vcpu[0] == [
        "vCPU0/VTL0: hello! starting the secure kernel in VTL1 with a VtlCall",
        "vCPU0/VTL1: secure kernel up (entered by VtlCall, entry reason 1); VtlReturn to VTL0",
        "vCPU0/VTL0: asking VTL1 for help with a VtlCall",
        "vCPU0/VTL1: passing it to VTL1 on vCPU1: SendSyntheticClusterIpi(vector 0x50, VTL1)",
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


def test_demo_one_vcpu_and_one_plane(run_guest):
    r = run_guest("demo", vcpus=1, planes=2)
    assert_done(r)
    assert syncs(r) == {(0, 0, 1): 0x51}
    assert "vCPU0/VTL1: interrupt 0x50 preempted VTL0 (entry reason 2: Interrupt)" in r.prints()
    r = run_guest("demo", vcpus=1, planes=1)
    assert_done(r)
    assert r.prints() == ["demo: this story needs two planes (run with --planes 2)"]


# ---- 8. malformed calls --------------------------------------------------------------------------

def test_vtl_bad_calls_get_ud_and_the_vmm_carries_on(run_guest, backend):
    r = run_vtl(run_guest, "vtl_bad", backend)
    generic, call, ret = stub_out_offsets()
    assert syncs(r) == {
        (0, 0, 1): generic, (0, 0, 2): generic, (0, 0, 3): call, (0, 0, 4): ret, (0, 0, 5): generic,
        (0, 1, 0x106): call, (0, 1, 0x107): ret, (0, 1, 0x108): ret,
        (0, 0, 0x20): 0x1235,                       # a valid VtlCall afterwards still works
        (0, 0, 0x30): 5, (0, 0, 0x31): 3,           # #UDs the guest's handlers counted per VTL
    }
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
        t.plane, t.started_planes = 1, {0, 1}
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
    r = run_vtl(run_guest, "vtl_vmpl", backend, personality="vmpl")
    assert syncs(r) == {
        (0, 1, 0x101): 0x1B12,      # VTL1 sees its own r12, not VTL0's 0x0a12
        (0, 1, 0x102): 0,           # nor VTL0's CR2
        (0, 1, 0x103): abi.VTL_ENTRY_VTL_CALL,
        (0, 0, 1): 0x0A13,          # VTL0 keeps its r13 (VTL1 set its own to 0x1b13)
        (0, 0, 2): 0, (0, 0, 3): tlfs.HVCALL_VTL_CALL,   # rax/rcx as VTL0's own stub left them
        (0, 0, 4): 0,               # a normal return loads nothing from the control page
        (0, 0, 5): 0, (0, 0, 6): 0,  # the IPI for VTL1 did not preempt VTL0 ...
        (0, 0, 7): 1,               # ... VTL1 took it when next called
    }
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
