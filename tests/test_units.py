"""Pure-logic unit tests (no /dev/kvm): APIC encodings, the hypercall control word and
page, the guest ABI include, long-mode tables, the console and ucall decoding."""

import io
import struct
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from pykvmm.vmm import abi
from pykvmm.vmm.hyperv import tlfs
from pykvmm.vmm.console import Console
from pykvmm.vmm.devices import BadUcall, decode_ucall
from pykvmm.vmm.hypercalls import CONTROL_RESERVED_MASK, Control, Dispatcher, hypercall_page
from pykvmm.vmm.memory import GuestMemory, GuestMemoryError
from pykvmm.vmm.outcomes import Answer
from pykvmm.x86 import apic, longmode
from pykvmm.x86.apic import Icr

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # fall back to the parametrized samples below
    given = None

REPO = Path(__file__).resolve().parent.parent
U64 = (1 << 64) - 1
ICR_DEFINED_BITS = 0xFFFFFFFF_000CCFFF  # dest 63:32, shorthand 19:18, trigger 15, level 14, DM 11:8, vector 7:0


def _property(strategy, samples):
    """Run a property with hypothesis when it is installed, else over fixed samples."""
    if given is not None:
        return given(strategy())
    return pytest.mark.parametrize("value", samples)


# ---- x86.apic -------------------------------------------------------------------------------

ICR_SAMPLES = [Icr(0x30), Icr(0, apic.DM_INIT), Icr(0x10, apic.DM_STARTUP, shorthand=apic.SH_OTHERS),
               Icr(0xFF, apic.DM_NMI, True, False, True, apic.SH_SELF, 0xFFFFFFFF)]
U64_SAMPLES = [0, U64, 0x12345678_9ABCDEF0, 1 << 12, 0xCCFFF]


@pytest.mark.parametrize("icr, value", [
    (Icr(0x30, destination=2), 0x2_00004030),
    (Icr(0, apic.DM_INIT), 0x4500),
    (Icr(0x10, apic.DM_STARTUP, shorthand=apic.SH_OTHERS), 0xC4610),
    (Icr(0x41, apic.DM_FIXED, logical=True, level=False, trigger_level=True, destination=0x0001_0003), 0x10003_00008841),
])
def test_icr_known_values(icr, value):
    assert icr.encode() == value
    assert Icr.decode(value) == icr


@_property(lambda: st.builds(Icr, vector=st.integers(0, 0xFF), delivery_mode=st.integers(0, 7),
                             logical=st.booleans(), level=st.booleans(), trigger_level=st.booleans(),
                             shorthand=st.integers(0, 3), destination=st.integers(0, 0xFFFFFFFF)),
           ICR_SAMPLES)
def test_icr_roundtrip(value):
    assert Icr.decode(value.encode()) == value


@_property(lambda: st.integers(0, U64), U64_SAMPLES)
def test_icr_decode_keeps_exactly_the_defined_bits(value):
    assert Icr.decode(value).encode() == value & ICR_DEFINED_BITS


def _kvm_x2apic_destination(address: int) -> int:
    """KVM's decoding with KVM_X2APIC_API_USE_32BIT_IDS (kvm_set_msi_irq ->
    x86_msi_msg_get_destid(msg, true)): address_lo[19:12] | address_hi[31:8] << 8."""
    lo, hi = address & 0xFFFFFFFF, address >> 32
    assert hi & 0xFF == 0, "KVM rejects address_hi[7:0] != 0 in x2APIC format"
    return (lo >> 12) & 0xFF | (hi & 0xFFFFFF00)


@pytest.mark.parametrize("dest, vector, mode, address, data", [
    (0, 0x20, apic.DM_FIXED, 0xFEE00000, 0x20),
    (3, 0x41, apic.DM_FIXED, 0xFEE03000, 0x41),
    (0xFF, 0xEF, apic.DM_NMI, 0xFEEFF000, 0x4EF),
    (0x1234, 0x30, apic.DM_FIXED, 0x1200_FEE34000, 0x30),          # high bits in address_hi[31:8]
    (0x1000_0002, 0x30, apic.DM_FIXED, 0x1000_0000_FEE02000, 0x30),  # plane 1 << 28 | vcpu 2
])
def test_msi_message_known_values(dest, vector, mode, address, data):
    assert apic.msi_message(dest, vector, mode) == (address, data)


@pytest.mark.parametrize("dest", [0, 1, 0xFF, 0x8000, 0x1000_0000, 0x3000_0005, 0xFFFF_FFFF])
def test_msi_message_reaches_its_destination_under_x2apic_32bit_ids(dest):
    address, _ = apic.msi_message(dest, 0x40)
    assert address & 0xFFF00000 == 0xFEE00000
    assert _kvm_x2apic_destination(address) == dest


@pytest.mark.parametrize("dest", [0x100, 0x7FFF])
def test_msi_message_mid_range_ids_under_x2apic_32bit_ids(dest):
    address, _ = apic.msi_message(dest, 0x40)
    assert _kvm_x2apic_destination(address) == dest


@pytest.mark.parametrize("dest", [0, 1, 0xFE, 0xFF, 0x100, 0x101, 0x1FF, 0x7FFF, 0x8000, 0x1234_5678,
                                  0x1000_0002, 0xFFFF_FFFE, 0xFFFF_FFFF])
def test_msi_destination_decodes_what_msi_message_encodes(dest):
    """One decoder beside the encoder; above APIC ID 255 (x2APIC destinations) too, and as KVM
    reads the address with 32-bit x2APIC IDs (the backends tell the target vCPU with it)."""
    address, _ = apic.msi_message(dest, 0x40)
    assert apic.msi_destination(address) == dest == _kvm_x2apic_destination(address)


def _lapic_page(irr=(), isr=(), values=None) -> bytes:
    """A KVM_GET_LAPIC register page: these IRR and ISR vectors, ``values`` {offset: u32}."""
    regs = bytearray(1024)
    for base, vectors in ((apic.APIC_IRR, irr), (apic.APIC_ISR, isr)):
        for v in vectors:
            off = base + (v // 32) * 0x10
            struct.pack_into("<I", regs, off, struct.unpack_from("<I", regs, off)[0] | 1 << (v % 32))
    for off, value in (values or {}).items():
        struct.pack_into("<I", regs, off, value)
    return bytes(regs)


def test_irr_empty_page():
    regs = _lapic_page(isr=[0x30])
    assert apic.irr_vectors(regs) == [] and not apic.irr_pending(regs) and apic.highest_irr(regs) is None


def test_irr_vectors_and_pending():
    regs = _lapic_page(irr=[0x20, 0x31, 0x3F, 0xFF], isr=[0x50])
    assert apic.irr_vectors(regs) == [0x20, 0x31, 0x3F, 0xFF]
    assert apic.isr_vectors(regs) == [0x50]
    assert apic.irr_pending(regs)
    assert apic.highest_irr(regs) == 0xFF
    assert apic.reg32(regs, apic.APIC_IRR + 0x10) == 1 | (1 << 17) | (1 << 31)


def test_irr_ignores_bytes_between_irr_registers():
    regs = bytearray(1024)
    for w in range(8):  # each 32-bit IRR register sits in a 16-byte slot; bytes 4..15 are not IRR
        regs[apic.APIC_IRR + w * 0x10 + 4:apic.APIC_IRR + (w + 1) * 0x10] = b"\xFF" * 12
    assert apic.irr_vectors(bytes(regs)) == [] and not apic.irr_pending(bytes(regs))


# ---- vmm.hypercalls --------------------------------------------------------------------------

def test_control_known_value():
    c = Control(0x0001_0003_0001_0011)
    assert (c.code, c.fast, c.rep_count, c.rep_start, c.var_header_size, c.reserved_bits) == \
        (tlfs.HVCALL_VTL_CALL, True, 3, 1, 0, 0)
    assert Control.encode(tlfs.HVCALL_VTL_CALL, fast=True, rep_count=3, rep_start=1) == c.value


@pytest.mark.parametrize("bit", [27, 30, 31, 44, 47, 60, 63])
def test_control_reserved_bits(bit):
    c = Control(abi.HVCALL_PYKVMM_NOP | 1 << bit)
    assert c.reserved_bits == 1 << bit
    assert c.code == abi.HVCALL_PYKVMM_NOP and c.rep_count == 0 and c.rep_start == 0


@_property(lambda: st.tuples(st.integers(0, 0xFFFF), st.booleans(), st.integers(0, 0xFFF),
                             st.integers(0, 0xFFF), st.integers(0, 0x3FF)),
           [(0, False, 0, 0, 0), (0xFFFF, True, 0xFFF, 0xFFF, 0x3FF), (0x8001, False, 1, 0, 7)])
def test_control_encode_roundtrip(value):
    code, fast, rep_count, rep_start, var_header_size = value
    c = Control(Control.encode(code, fast, rep_count, rep_start, var_header_size))
    assert (c.code, c.fast, c.rep_count, c.rep_start, c.var_header_size) == value
    assert c.reserved_bits == 0


@_property(lambda: st.integers(0, U64), U64_SAMPLES)
def test_control_fields_and_reserved_bits_cover_the_word(value):
    c = Control(value)
    assert Control.encode(c.code, c.fast, c.rep_count, c.rep_start, c.var_header_size) | c.reserved_bits == value


def test_control_reserved_mask_is_the_tlfs_gaps():
    assert CONTROL_RESERVED_MASK == 0xF000_F000_F800_0000


def test_dispatcher_nop_and_errors():
    d = Dispatcher()
    regs = SimpleNamespace(rcx=Control.encode(abi.HVCALL_PYKVMM_NOP), rdx=U64, r8=2)
    assert d.dispatch(None, 0, regs)[1] == Answer(tlfs.SUCCESS, (("rdx", 1),))
    regs.rcx |= 1 << 27
    assert d.dispatch(None, 0, regs)[1] == Answer(tlfs.INVALID_HYPERCALL_INPUT)
    regs.rcx = Control.encode(0x7777)
    assert d.dispatch(None, 0, regs)[1] == Answer(tlfs.INVALID_HYPERCALL_CODE)
    assert d.counts == {abi.HVCALL_PYKVMM_NOP: 2, 0x7777: 1}


def test_hypercall_page_stubs_trap_everywhere_else():
    """Each stub at the offsets VsmCodePageOffsets reports makes one exit (an `out` to the
    hypercall port) and returns; every other byte is int3, so a stray call traps visibly.
    What the stubs do is checked by guests (hypercall, vtl_call, vtl_bad)."""
    capstone = pytest.importorskip("capstone")
    page = hypercall_page("port")
    assert len(page) == 4096
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    covered = set()
    for off in (abi.HCPAGE_HYPERCALL, abi.HCPAGE_VTL_CALL, abi.HCPAGE_VTL_RETURN):
        insns = []
        for insn in md.disasm(page[off:], off):
            insns.append(insn)
            covered.update(range(insn.address, insn.address + insn.size))
            if insn.mnemonic == "ret":
                break
        assert insns[-1].mnemonic == "ret", f"stub at {off:#x} does not return"
        outs = [i for i in insns if i.mnemonic == "out"]
        assert len(outs) == 1 and int(outs[0].op_str.split(",")[0], 0) == abi.PORT_HYPERCALL, insns
    assert all(page[i] == 0xCC for i in range(4096) if i not in covered), "bytes outside the stubs must be int3"


def test_hypercall_page_rejects_unknown_transport():
    with pytest.raises(ValueError, match="transport"):
        hypercall_page("carrier-pigeon")


# ---- vmm.abi ----------------------------------------------------------------------------------

def test_abi_asm_include():
    # cffi is blocked: the guest build must not need it
    code = "import sys, runpy; sys.modules['cffi'] = None; runpy.run_module('pykvmm.vmm.abi', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("/*") and ".set PORT_UCALL, 0xe8" in lines
    sets = {}
    for line in lines[1:]:
        directive, rest = line.split(" ", 1)
        name, value = rest.split(", ")
        assert directive == ".set"
        sets[name] = int(value, 16)
    expected = {k: v for k, v in vars(abi).items() if k.isupper() and isinstance(v, int)}
    assert sets == expected
    assert sets["STACK_BASE"] == 0x1400000 and sets["HCPAGE_VTL_RETURN"] == 0x26


# ---- x86.longmode ------------------------------------------------------------------------------

def _desc(gdt: bytes, selector: int):
    lo = int.from_bytes(gdt[selector:selector + 8], "little")
    base = (lo >> 16 & 0xFFFFFF) | (lo >> 56 & 0xFF) << 24
    limit = (lo & 0xFFFF) | (lo >> 48 & 0xF) << 16
    return SimpleNamespace(base=base, limit=limit, type=lo >> 40 & 0xF, s=lo >> 44 & 1, dpl=lo >> 45 & 3,
                           p=lo >> 47 & 1, l=lo >> 53 & 1, d=lo >> 54 & 1, g=lo >> 55 & 1)


def test_gdt_descriptors():
    tss_addr = 0xFFFF_8000_1234_5000
    gdt = longmode.gdt_bytes(tss_addr)
    assert len(gdt) == longmode.GDT_ENTRIES * 8 and gdt[:8] == bytes(8)
    code = _desc(gdt, abi.SEL_CODE64)
    assert (code.p, code.s, code.dpl, code.type, code.l, code.d, code.g) == (1, 1, 0, 0xB, 1, 0, 1)
    data = _desc(gdt, abi.SEL_DATA)
    assert (data.p, data.s, data.dpl, data.type, data.l, data.d, data.g) == (1, 1, 0, 0x3, 0, 1, 1)
    tss = _desc(gdt, abi.SEL_TSS)
    assert (tss.p, tss.s, tss.type, tss.limit) == (1, 0, 0xB, 0x67)
    upper = int.from_bytes(gdt[abi.SEL_TSS + 8:abi.SEL_TSS + 16], "little")
    assert tss.base | (upper & 0xFFFFFFFF) << 32 == tss_addr and upper >> 32 == 0


@pytest.mark.parametrize("mem_size", [2 << 20, 64 << 20, 3 << 30])
def test_identity_page_tables(mem_size):
    base = abi.PAGE_TABLE_ADDR
    pt = longmode.identity_page_tables(base, mem_size)
    q = lambda off: struct.unpack_from("<Q", pt, off)[0]  # noqa: E731
    n_pd, n_pages = -(-mem_size // (1 << 30)), mem_size >> 21
    assert len(pt) == longmode.page_tables_size(mem_size) == 0x2000 + 0x1000 * n_pd
    rw = longmode.PAGE_PRESENT | longmode.PAGE_WRITE
    assert q(0) == (base + 0x1000) | rw and q(8) == 0
    assert [q(0x1000 + 8 * i) for i in range(n_pd + 1)] == [base + 0x2000 + 0x1000 * i | rw for i in range(n_pd)] + [0]
    pds = 0x2000
    assert q(pds) == 0 | rw | longmode.PAGE_HUGE
    for k in {n_pages // 2, n_pages - 1}:
        assert q(pds + 8 * k) == k << 21 | rw | longmode.PAGE_HUGE, f"PD entry {k}"
    assert pt[pds + 8 * n_pages:] == bytes(len(pt) - pds - 8 * n_pages)


def test_identity_page_tables_limit():
    with pytest.raises(ValueError):
        longmode.identity_page_tables(0, 513 << 30)


# ---- vmm.devices: console and ucall --------------------------------------------------------------

def test_console_line_buffering_per_vcpu_and_plane():
    out = io.StringIO()
    con = Console(out)
    con.write(0, 0, b"hel")
    con.write(0, 1, b"other\r\n")
    assert out.getvalue() == "other\n"
    con.write(0, 0, b"lo\nwor")
    assert out.getvalue() == "other\nhello\n"
    con.flush()
    assert out.getvalue() == "other\nhello\nwor\n"
    assert list(con.lines) == [(0, 1, "other"), (0, 0, "hello"), (0, 0, "wor")]
    con.flush()
    assert len(con.lines) == 3


def test_console_prefixes_and_bad_utf8():
    out = io.StringIO()
    Console(out, prefix_vcpus=True, prefix_planes=True).write(1, 2, b"a\xffb\n")
    Console(out, prefix_planes=True).write(1, 2, b"x\n")
    assert out.getvalue() == "[vcpu1/plane2] a\\xffb\n[plane2] x\n"     # not UTF-8: shown escaped


def test_console_long_line_is_emitted_without_newline():
    out = io.StringIO()
    con = Console(out)
    con.write(0, 0, b"x" * 4097)                   # cut at CONSOLE_LINE_MAX: host memory stays bounded
    assert out.getvalue() == "x" * 4096 + "\n"
    con.flush()
    assert out.getvalue() == "x" * 4096 + "\nx\n"


@pytest.fixture
def mem():
    m = GuestMemory(2 << 20)
    yield m
    m.close()


def test_memory_seen_by_a_plane_reads_and_writes_its_cover(mem):
    """A page covered for some planes (a VSM overlay of another VTL) is, for those planes, the
    cover's content: reads and writes may span covered and plain pages; other planes, and the
    memory itself, see the RAM."""
    cover = types.SimpleNamespace(map=bytearray(b"c" * 0x1000), planes={1})
    mem.write(0x2000, b"r" * 0x1000)
    mem.write(0x3000, b"s" * 0x10)
    assert mem.seen_by(1) is mem                    # nothing covered: no view, no cost
    mem.covers[0x2000] = cover
    one = mem.seen_by(1)
    assert one.read(0x2FFE, 4) == b"ccss" and mem.seen_by(0).read(0x2FFE, 4) == b"rrss"
    one.write(0x2FFF, b"XY")
    assert cover.map[0xFFF:] == b"X" and mem.read(0x2FFF, 2) == b"rY"
    one.write_u64(0x2008, 0x1122334455667788)
    assert one.u64(0x2008) == 0x1122334455667788 and mem.u64(0x2008) == int.from_bytes(b"r" * 8, "little")
    cover.map[0x10:0x14] = b"hi\0x"
    assert one.cstring(0x2010, 16) == "hi" and one.seen_by(1) is one
    with pytest.raises(GuestMemoryError):
        one.read(mem.size - 2, 4)


def _ucall_block(verb, line=0, args=(0, 0, 0, 0), file_ptr=0, msg_ptr=0) -> bytes:
    raw = struct.pack("<II4QQQ", verb, line, *args, file_ptr, msg_ptr)
    assert len(raw) == abi.UC_SIZE
    return raw


def test_decode_ucall_assert(mem):
    mem.write(0x2000, b"guest/hello.S\0")
    mem.write(0x2100, b"boom\0garbage")
    mem.write(0x1000, _ucall_block(abi.UCALL_ASSERT, 42, (1, 2, 3, 4), 0x2000, 0x2100))
    uc = decode_ucall(mem, 0x1000, vcpu=3, plane=1)
    assert (uc.vcpu, uc.plane, uc.verb, uc.line, uc.args, uc.file, uc.message) == \
        (3, 1, abi.UCALL_ASSERT, 42, (1, 2, 3, 4), "guest/hello.S", "boom")
    assert uc.describe() == "vcpu3/plane1 ASSERT failed at guest/hello.S:42: boom (values 0x1, 0x2)"


def test_decode_ucall_sync_without_strings(mem):
    mem.write(0x1000, _ucall_block(abi.UCALL_SYNC, args=(7, 0xBEEF, 0, 0)))
    uc = decode_ucall(mem, 0x1000, 0, 0)
    assert (uc.name, uc.file, uc.message) == ("SYNC", "", "")
    assert uc.describe() == "vcpu0/plane0 SYNC stage=7 value=0xbeef"


def test_decode_ucall_truncates_unterminated_string(mem):
    mem.write(0x3000, b"A" * (abi.UCALL_STRING_MAX + 100))
    mem.write(0x1000, _ucall_block(abi.UCALL_PRINT, msg_ptr=0x3000))
    assert decode_ucall(mem, 0x1000, 0, 0).message == "A" * abi.UCALL_STRING_MAX


@pytest.mark.parametrize("gpa, block, match", [
    ((2 << 20) - abi.UC_SIZE + 8, None, "not in guest memory"),       # block runs off the end
    (-8, None, "not in guest memory"),
    (0x1000, _ucall_block(99), "unknown verb 99"),
    (0x1000, _ucall_block(abi.UCALL_PRINT, msg_ptr=2 << 20), "outside guest memory"),
    (0x1000, _ucall_block(abi.UCALL_ASSERT, file_ptr=1 << 63), "outside guest memory"),
])
def test_decode_ucall_bad_blocks(mem, gpa, block, match):
    if block is not None:
        mem.write(gpa, block)
    with pytest.raises(BadUcall, match=match):
        decode_ucall(mem, gpa, 0, 0)


@pytest.mark.parametrize("dcr, divide", [(0xB, 1), (0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32),
                                         (0x9, 64), (0xA, 128)])
def test_lapic_timer_remaining_from_current_count_and_divide(dcr, divide):
    """SDM 11.5.4 divide values, KVM's 1 GHz LAPIC bus: TMCCT x divide ns until the expiry."""
    regs = _lapic_page(values={apic.APIC_SPIV: 0x1FF, apic.APIC_LVT_TIMER: 0xB1, apic.APIC_TIMER_CURRENT: 1000,
                               apic.APIC_TIMER_DIVIDE: dcr})
    assert apic.timer_remaining_ns(regs) == 1000 * divide
    assert apic.timer_armed_lvt(regs) == 0xB1


def test_lapic_timer_not_counting_or_not_armed():
    on = {apic.APIC_SPIV: 0x1FF, apic.APIC_TIMER_DIVIDE: 0xB}
    expired = _lapic_page(values={**on, apic.APIC_LVT_TIMER: 0xB1})                  # TMCCT 0
    tsc_deadline = _lapic_page(values={**on, apic.APIC_LVT_TIMER: 0xB1 | 2 << 17, apic.APIC_TIMER_CURRENT: 5})
    masked = _lapic_page(values={**on, apic.APIC_LVT_TIMER: 0xB1 | apic.LVT_MASKED})
    apic_off = _lapic_page(values={apic.APIC_SPIV: 0xFF, apic.APIC_LVT_TIMER: 0xB1})
    assert apic.timer_remaining_ns(expired) is None and apic.timer_remaining_ns(tsc_deadline) is None
    assert apic.timer_armed_lvt(masked) is None and apic.timer_armed_lvt(apic_off) is None


def test_deliverable_counts_a_vector_pending_besides_the_irr():
    """An expired timer KVM has not put in the IRR yet is judged against the PPR like the IRR."""
    tpr_5 = _lapic_page(values={apic.APIC_TPR: 0x50})
    assert apic.deliverable_irr(tpr_5) is None
    assert apic.deliverable_irr(tpr_5, 0x61) == 0x61
    assert apic.deliverable_irr(tpr_5, 0x5F) is None
    assert apic.deliverable_irr(_lapic_page(irr=[0x72], values={apic.APIC_TPR: 0x50}), 0x61) == 0x72


def test_host_timer_fires_in_time_order_and_wakes_for_an_earlier_one():
    """planes/hosttimer.py: a timer set earlier than the one the thread sleeps for wakes it."""
    import threading
    import time

    from pykvmm.planes.hosttimer import HostTimer

    fired, done = [], threading.Event()
    t = HostTimer()
    try:
        now = time.monotonic()
        t.call_at(now + 30.0, fired.append, "late")
        t.call_at(now + 0.05, fired.append, "early")
        t.call_at(now + 0.02, fired.append, "first")
        t.call_at(now + 0.06, done.set)
        assert done.wait(20.0), "the host timer never fired the earlier timers"
        assert fired == ["first", "early"] and time.monotonic() >= now + 0.06
        assert t.pending() == 1
    finally:
        t.close()
    assert t.pending() == 0 and fired == ["first", "early"]


def test_periodic_stimer_catches_up_half_a_period_apart_or_skips_when_lazy():
    from pykvmm.vmm.hyperv.timers import CATCH_UP_LIMIT, next_expiration
    assert next_expiration(1000, 100, 1050, lazy=False) == (1100, 1100)   # on time
    assert next_expiration(1000, 100, 1350, lazy=False) == (1100, 1400)   # behind: each one, spaced
    assert next_expiration(1000, 100, 1350, lazy=True) == (1400, 1400)    # lazy: the next grid point
    far = 1100 + 100 * CATCH_UP_LIMIT
    assert next_expiration(1000, 100, far + 30, lazy=False) == (far + 100, far + 100)


def test_auto_eoi_kicks_wait_until_the_vcpu_has_run_since_its_last_service():
    from pykvmm.vmm.hyperv.partition import AUTO_EOI_KICK, KICK_DUTY, HyperV, VpHv
    hv = object.__new__(HyperV)
    kicks = []
    threads = [SimpleNamespace(index=i, plane=0, planes_vcpu=SimpleNamespace(kick=lambda i=i: kicks.append(i)))
               for i in range(3)]
    hv.machine = SimpleNamespace(threads=threads)
    hv.vps = {(i, 0): VpHv(i, 0) for i in range(3)}
    hv.vps[(0, 0)].auto_eoi = {0xf2}                     # never serviced: due at once
    hv.vps[(1, 0)].auto_eoi = {0xf2}
    hv.vps[(1, 0)].auto_eoi_serviced = 10.0              # back in the guest at t = 10 s
    due, nxt = hv.auto_eoi_due(10.0 + AUTO_EOI_KICK / 4)
    assert due == [threads[0]]                           # vCPU 2 holds nothing
    assert nxt == pytest.approx(AUTO_EOI_KICK * 3 / 4)   # vCPU 1, once it has run its share
    assert hv.auto_eoi_due(10.0 + AUTO_EOI_KICK)[0] == threads[:2]
    # a kick that took 2 ms to serve: the next waits 4 x 2 ms after that service
    hv.kick_for_auto_eoi(threads[1], 20.0)
    assert kicks == [1]
    assert hv.auto_eoi_due(20.0 + AUTO_EOI_KICK / 2)[0] == [threads[0]]     # not twice at once
    hv.auto_eoi_served(hv.vps[(1, 0)], 20.002)
    assert threads[1] not in hv.auto_eoi_due(20.002 + KICK_DUTY * 0.002 - 0.0005)[0]
    assert threads[1] in hv.auto_eoi_due(20.002 + KICK_DUTY * 0.002)[0]
    # a quick kick: back to the floor
    hv.kick_for_auto_eoi(threads[1], 30.0)
    hv.auto_eoi_served(hv.vps[(1, 0)], 30.00001)
    assert threads[1] in hv.auto_eoi_due(30.00001 + AUTO_EOI_KICK)[0]
    for vp in hv.vps.values():
        vp.auto_eoi.clear()
    assert hv.auto_eoi_due(11.0) == ([], None)
