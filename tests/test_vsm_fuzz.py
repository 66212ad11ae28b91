"""Fuzzing the VSM calls (vmm/vsm/) from VTL0 of a two-VTL partition booted the TLFS way:
random HvCallModifyVtlProtectionMask, EnablePartitionVtl, EnableVpVtl (random initial
contexts), Get/SetVpRegisters and TranslateVirtualAddress inputs, in memory and fast forms.
The VMM must answer each with a TLFS status (or #UD), never crash or hang, and VTL0 must reach
DONE (a SetVpRegisters aimed at VTL0 itself is left out: that is the guest harming itself)."""

from __future__ import annotations

import struct

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import assert_done, run_hv_fuzz  # noqa: E402
from pykvmm.vmm import abi  # noqa: E402
from pykvmm.vmm.hyperv import HvConfig, tlfs as T  # noqa: E402

SCRATCH = abi.free_memory_start(1) + (1 << 20)
CODES = [T.HVCALL_MODIFY_VTL_PROTECTION_MASK, T.HVCALL_ENABLE_PARTITION_VTL, T.HVCALL_ENABLE_VP_VTL,
         T.HVCALL_GET_VP_REGISTERS, T.HVCALL_SET_VP_REGISTERS, T.HVCALL_TRANSLATE_VIRTUAL_ADDRESS]
REGISTER_NAMES = [0x20000 + i for i in range(18)] + [0x40000, 0x40002, 0x40003, 0x40004, 0x50000, 0x50005,
                                                      0x60001, 0x70000, 0x80001, 0x80004, 0x90013,
                                                      *range(0xD0002, 0xD0008), 0xD0010, 0xD0011, 0x1234]
u64 = st.integers(0, 2**64 - 1)
vtl_byte = st.sampled_from([0, 0x10, 0x11, 0x12, 0x1F, 0x30, 0xFF])
partition = st.sampled_from([2**64 - 1, 2**64 - 1, 1, 7])


def header(code):
    """A plausible header for ``code``, fuzzed field by field (16 bytes; 240 for EnableVpVtl)."""
    if code == T.HVCALL_ENABLE_VP_VTL:
        return st.builds(lambda p, vp, vtl, ctx: struct.pack("<QIB3x", p, vp, vtl) + ctx,
                         partition, st.sampled_from([0, 1, 0xFFFFFFFE]), st.integers(0, 3),
                         st.binary(min_size=224, max_size=224))
    if code == T.HVCALL_TRANSLATE_VIRTUAL_ADDRESS:
        return st.builds(lambda p, vp, flags, vtl, gva: struct.pack("<QIIQQ", p, vp, 0, flags | vtl << 56, gva),
                         partition, st.sampled_from([0xFFFFFFFE, 0, 3]), st.integers(0, 0x7F), vtl_byte,
                         st.one_of(st.integers(0, 0x4000), u64))
    if code == T.HVCALL_SET_VP_REGISTERS:         # never VTL0's own registers
        return st.builds(lambda p, vtl: struct.pack("<QIB3x", p, 0xFFFFFFFE, vtl), partition,
                         st.sampled_from([0x11, 0x1F, 0x30]))
    return st.builds(lambda p, second, vtl: struct.pack("<QIB3x", p, second, vtl), partition,
                     st.sampled_from([0, 1, 0xF, 0x10, 0xFFFFFFFE]), vtl_byte)


def elements(code):
    if code == T.HVCALL_GET_VP_REGISTERS:
        return st.lists(st.sampled_from(REGISTER_NAMES), min_size=1, max_size=6).map(lambda ns: b"".join(struct.pack("<I", n) for n in ns))
    if code == T.HVCALL_SET_VP_REGISTERS:
        return st.lists(st.tuples(st.sampled_from(REGISTER_NAMES), u64), min_size=1, max_size=4).map(
            lambda xs: b"".join(struct.pack("<I12xQQ", n, v, 0) for n, v in xs))
    if code == T.HVCALL_MODIFY_VTL_PROTECTION_MASK:
        return st.lists(st.one_of(st.integers(0, 0x4000), u64), min_size=1, max_size=6).map(
            lambda ps: b"".join(struct.pack("<Q", p) for p in ps))
    return st.just(b"")


@st.composite
def call(draw):
    code = draw(st.sampled_from(CODES))
    head, elems = draw(header(code)), draw(elements(code))
    size = {T.HVCALL_GET_VP_REGISTERS: 4, T.HVCALL_SET_VP_REGISTERS: 32,
            T.HVCALL_MODIFY_VTL_PROTECTION_MASK: 8}.get(code)
    n = len(elems) // size if size else 0
    block = head + elems
    reps = draw(st.sampled_from([n, n, n, 0, 1, 4095]))     # mostly the count the elements make
    fast = draw(st.sampled_from([0, 0, 0, 1]))
    control = code | fast << 16 | reps << 32
    return control, block


def run_calls(calls):
    table, pages = [], []
    for i, (control, block) in enumerate(calls):
        gpa = SCRATCH + i * 0x1000
        pages.append((gpa, block[:0x1000]))
        rdx, r8 = (gpa, SCRATCH + 0x80000 + i * 0x1000)
        if control >> 16 & 1:      # fast: the first 16 bytes in RDX/R8, the rest would be XMM
            rdx, r8 = struct.unpack("<QQ", block[:16].ljust(16, b"\0"))
        table.append((0, control, rdx, r8))
    return run_hv_fuzz(table, pages, planes=2, hyperv=HvConfig.everything(), vtl_boot="tlfs")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(call(), min_size=10, max_size=60))
def test_fuzz_vsm_calls(kvm_available, calls):
    result, out = run_calls(calls)
    assert_done(result)
    for (control, _), (value, vector) in zip(calls, out):
        assert vector in (0, 6), (hex(control), vector)
        if vector == 0:
            assert value & 0xFFFF in T.STATUS, (hex(control), hex(value))
            assert value >> 44 == 0, hex(value)
