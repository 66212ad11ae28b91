"""Hypercall fuzzing: a guest issues thousands of random and edge-case hypercalls from a
host-made table; the VMM must answer each with an HV status or the documented #UD, never
crash or hang, and the guest must keep running to DONE."""

from __future__ import annotations

import struct

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from pykvmm.vmm import abi  # noqa: E402
from pykvmm.vmm.hyperv import tlfs  # noqa: E402
from pykvmm.vmm.hypercalls import Control  # noqa: E402
from pykvmm.vmm.machine import Machine, MachineConfig  # noqa: E402

from conftest import assert_done, guest_image  # noqa: E402

UD_MARK = 0xFFFFFFFF00000006
MEM = abi.DEFAULT_MEM_SIZE
CODES = [tlfs.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, tlfs.HVCALL_VTL_CALL, tlfs.HVCALL_VTL_RETURN,
         abi.HVCALL_PYKVMM_NOP, abi.HVCALL_PYKVMM_SWITCH_PLANE, 0x0000, 0x000C, 0x0050, 0xFFFF]
GPAS = [0, 1, 7, abi.HYPERCALL_PAGE_ADDR, abi.BOOT_INFO_ADDR, abi.control_page(0, 0), abi.control_page(0, 1),
        abi.control_page(3, 15), MEM - 8, MEM - 1, MEM, MEM + 0x1000, 1 << 40, 2**64 - 1, 2**63]

u64 = st.integers(0, 2**64 - 1)
control = st.one_of(
    st.builds(lambda code, fast, reps, start: Control.encode(code, fast, reps, start),
              st.sampled_from(CODES), st.booleans(), st.sampled_from([0, 0, 1, 4095]), st.sampled_from([0, 0, 7])),
    st.builds(lambda code, junk: code | junk, st.sampled_from(CODES), u64),
    u64,
)
# SendSyntheticClusterIpi's fast input: vector | target VTL << 32
ipi_input = st.builds(lambda vec, vtl: vec | vtl << 32, st.integers(0, 0x1FF), st.integers(0, 0xFF))
rdx = st.one_of(st.sampled_from(GPAS), ipi_input, u64)
r8 = st.one_of(st.sampled_from([0, 1, 2, 3, 1 << 63, 2**64 - 1]), u64)
cases = st.lists(st.tuples(control, rdx, r8), min_size=50, max_size=300)

TRIED = {"calls": 0}


def run_cases(table, planes, personality):
    with Machine(guest_image("hcall_fuzz"), MachineConfig(planes=planes, personality=personality,
                                                         quiet=True, vcpus=1)) as m:
        base = abi.free_memory_start(1)
        blob = struct.pack("<Q", len(table)) + b"".join(struct.pack("<QQQQ", c, d, r, 0) for c, d, r in table)
        m.memory.write(base, blob)
        result = m.run(30)
        statuses = [m.memory.u64(base + 8 + 32 * i + 24) for i in range(len(table))]
        faults = m.faults_injected
    return result, statuses, faults


def check(table, planes, personality):
    result, statuses, faults = run_cases(table, planes, personality)
    assert_done(result)
    assert result.syncs()[0] == (1, len(table)), (result.switches, result.entry_reasons, result.stats,
                                                  [hex(x) for x in statuses[:3]])
    uds = result.syncs()[1][1]
    assert uds == sum(1 for s in statuses if s == UD_MARK)
    assert uds == faults
    for (c, _, _), s in zip(table, statuses):
        if s == UD_MARK:
            continue
        # an HV status in bits 15:0 (reps completed above it), or a VTL switch's shared RAX
        assert s & 0xFFFF in tlfs.STATUS or (c & 0xFFFF) in (tlfs.HVCALL_VTL_CALL, tlfs.HVCALL_VTL_RETURN,
                                                              abi.HVCALL_PYKVMM_SWITCH_PLANE), hex(s)
    TRIED["calls"] += len(table)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_fuzz_hypercalls_one_plane(kvm_available, table):
    check(table, planes=1, personality="auto")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_fuzz_hypercalls_two_vtls(kvm_available, table):
    check(table, planes=2, personality="auto")


def test_fuzz_edge_cases_exhaustively(kvm_available):
    """Every listed code with every edge GPA, fast and slow."""
    table = [(Control.encode(code, fast), gpa, r)
             for code in CODES for fast in (False, True) for gpa in GPAS for r in (0, 2**64 - 1)]
    check(table, planes=2, personality="auto")
    print(f"hypercall fuzzing: {TRIED['calls']} calls tried in this session")
