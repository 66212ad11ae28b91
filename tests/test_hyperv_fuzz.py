"""Fuzzing the Hyper-V personality: random synthetic-MSR writes and reads and random
hypercall inputs from a host-made table. The VMM must answer each one (a value, a status,
#GP or #UD), never crash or hang, and the guest must reach DONE."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import assert_done, run_hv_fuzz  # noqa: E402
from pykvmm.vmm import abi  # noqa: E402
from pykvmm.vmm.hyperv import HvConfig, tlfs as T  # noqa: E402

MEM = abi.DEFAULT_MEM_SIZE
SCRATCH = abi.free_memory_start(1) + (1 << 20)     # page GPAs the fuzzer may hand out
u64 = st.integers(0, 2**64 - 1)

MSRS = [T.MSR_GUEST_OS_ID, T.MSR_HYPERCALL, T.MSR_VP_INDEX, T.MSR_VP_RUNTIME, T.MSR_TIME_REF_COUNT,
        T.MSR_REFERENCE_TSC, T.MSR_TSC_FREQUENCY, T.MSR_APIC_FREQUENCY, T.MSR_EOI, T.MSR_ICR, T.MSR_TPR,
        T.MSR_VP_ASSIST_PAGE, T.MSR_SCONTROL, T.MSR_SVERSION, T.MSR_SIEFP, T.MSR_SIMP, T.MSR_EOM,
        *range(T.MSR_SINT0, T.MSR_SINT0 + 16), *range(T.MSR_STIMER0_CONFIG, T.MSR_STIMER0_CONFIG + 8),
        *range(T.MSR_CRASH_P0, T.MSR_CRASH_P0 + 5)]
msr = st.one_of(st.sampled_from(MSRS), st.integers(T.MSR_RANGE_BASE, T.MSR_RANGE_BASE + T.MSR_RANGE_SIZE - 1))
page_values = st.builds(lambda page, low: SCRATCH + page * 0x1000 + low, st.integers(0, 15),
                        st.sampled_from([0, 1, 3, 0xFFE, 0xFFF]))
msr_value = st.one_of(page_values, st.sampled_from([0, 1, 0x10, 0x30 | T.SINT_AUTO_EOI, T.SINT_MASKED, 1 << 20,
                                                    T.STIMER_ENABLE | T.STIMER_PERIODIC | (3 << 16),
                                                    T.STIMER_ENABLE | T.STIMER_DIRECT_MODE | (0x40 << 4)]),
                      st.integers(0, 2**20), u64)
CODES = [T.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, T.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST, T.HVCALL_NOTIFY_LONG_SPIN_WAIT,
         T.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, T.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX, T.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX,
         T.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX, T.HVCALL_GET_PARTITION_ID, T.HVCALL_POST_MESSAGE, T.HVCALL_SIGNAL_EVENT,
         abi.HVCALL_PYKVMM_ECHO, abi.HVCALL_PYKVMM_NOP, 0x0000, 0xFFFF]
control = st.one_of(
    st.builds(lambda code, fast, var, reps, start: code | fast << 16 | var << 17 | reps << 32 | start << 48,
              st.sampled_from(CODES), st.integers(0, 1), st.sampled_from([0, 0, 1, 3, 0x3FF]),
              st.sampled_from([0, 1, 5, 40, 4095]), st.sampled_from([0, 0, 3, 4095])),
    st.builds(lambda code, junk: code | junk, st.sampled_from(CODES), u64),
    u64)
gpa = st.one_of(st.builds(lambda page, off: SCRATCH + page * 0x1000 + off, st.integers(0, 15),
                          st.sampled_from([0, 4, 8, 0xF00, 0xFF8])),
                st.sampled_from([0, 7, MEM - 8, MEM, 2**64 - 8]), u64)
op = st.one_of(st.tuples(st.just(0), control, gpa, gpa),
               st.tuples(st.just(1), msr, msr_value, st.just(0)),
               st.tuples(st.just(2), msr, st.just(0), st.just(0)))


PAGE_MSRS = {T.MSR_HYPERCALL, T.MSR_REFERENCE_TSC, T.MSR_VP_ASSIST_PAGE, T.MSR_SIMP, T.MSR_SIEFP}


def acceptable(kind, index, value) -> bool:
    """Not fuzzed: what a guest does to itself on purpose on any Hyper-V. Writes that end the
    run (reset, crash notification), an enabled overlay page on the guest's own code, tables
    or stack (below SCRATCH), an ICR that INITs or SIPIs the guest's own vCPU."""
    if kind != 1:
        return True
    if index == T.MSR_RESET and value & 1 or index == T.MSR_CRASH_CTL and value >> 63:
        return False
    if index in PAGE_MSRS and value & 1 and (value & ~0xFFF) < SCRATCH:
        return False
    return not (index == T.MSR_ICR and (value >> 8) & 7 != 0)


cases = st.lists(op.filter(lambda o: acceptable(*o[:3])), min_size=40, max_size=250)


def run_table(table):
    return run_hv_fuzz(table, hyperv=HvConfig.everything())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases)
def test_fuzz_msrs_and_hypercalls(kvm_available, table):
    result, out = run_table(table)
    assert_done(result)
    assert result.syncs()[0] == (1, len(table))
    for (kind, a, _, _), (value, vector) in zip(table, out):
        assert vector in (0, 6, 13), (kind, hex(a), vector)
        if kind == 0 and vector == 0:
            assert value & 0xFFFF in T.STATUS, (hex(a), hex(value))
            assert value >> 44 == 0, hex(value)     # nothing above the reps-completed field
        if kind != 0:
            assert vector != 6


def test_fuzz_edge_table(kvm_available):
    """A fixed table of the nastiest inputs, run every time (hypothesis varies the rest)."""
    table = [(1, T.MSR_STIMER0_COUNT, 1, 0), (1, T.MSR_STIMER0_CONFIG, T.STIMER_ENABLE | T.STIMER_PERIODIC
                                                     | T.STIMER_DIRECT_MODE | (0x40 << 4), 0),
             (1, T.MSR_SIMP, SCRATCH | 1, 0), (1, T.MSR_SCONTROL, 1, 0), (1, T.MSR_SINT0 + 3, 0x41, 0),
             (1, T.MSR_STIMER0_CONFIG + 2, T.STIMER_ENABLE | T.STIMER_PERIODIC | (3 << 16), 0),
             (1, T.MSR_STIMER0_COUNT + 2, 1, 0),
             (0, abi.HVCALL_PYKVMM_ECHO | 4095 << 32, SCRATCH + 0x2000, SCRATCH + 0x3000),
             (0, T.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX | 0x3FF << 17 | 4095 << 32, SCRATCH, 0),
             (0, T.HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX | 1 << 16 | 0x3FF << 17, 0x40, 0),
             (1, T.MSR_HYPERCALL, SCRATCH + 0x5000 | 3, 0), (0, T.HVCALL_GET_PARTITION_ID, 0, SCRATCH),
             (1, T.MSR_STIMER0_CONFIG, 0, 0), (1, T.MSR_STIMER0_CONFIG + 2, 0, 0),
             (1, T.MSR_GUEST_OS_ID, 0, 0), (0, T.HVCALL_GET_PARTITION_ID, 0, SCRATCH)]
    result, out = run_table(table)
    assert_done(result)
    assert out[7] == (T.INVALID_HYPERCALL_INPUT, 0)   # 4095 reps: more than a page of input
    assert out[-1][1] == 6                    # GUEST_OS_ID = 0: the page is off, #UD
