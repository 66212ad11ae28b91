"""TLFS "Hypercall Interface": the hypercall page, the input value, memory / fast / XMM-fast
input and output, rep calls and their continuation, and the status in RAX.

Transport. The page the guest names in HV_X64_MSR_HYPERCALL gets port-I/O stubs (``out``
to PORT_HYPERCALL), at Hyper-V's offsets (0x00 hypercall, 0x0F VtlCall, 0x26 VtlReturn).
Port I/O is the one mechanism that exits to userspace on every KVM: on this host
``vmcall``/``vmmcall`` never leave KVM_RUN, and on mainline KVM without KVM_CAP_HYPERV
the kernel answers them itself (RAX = -KVM_ENOSYS) without an exit. A filtered WRMSR would
exit too, but needs a free MSR index and costs the same exit. The ordinary stub is

    0: out PORT_HYPERCALL, al      the call (registers carry everything)
    2: cmp rax, -1                 all-ones = "continue me" (never a valid result value)
    6: je 0
    8: ret

so a rep call that has used its time budget returns to the guest with RCX's rep start
index advanced and RAX = all-ones; pending interrupts are taken at the ``je`` and the stub
re-issues the call. That is the TLFS continuation ("the hypervisor returns to the caller
with RIP unchanged"), and it does not depend on where a host leaves RIP at a PIO exit.

Input value (RCX): bits 15:0 call code, 16 Fast, 26:17 variable header size (8-byte units),
31 nested (no L1 hypervisor here: reserved), 43:32 rep count, 59:48 rep start index; bits
30:27, 47:44, 63:60 RsvdZ. The VTL fields live in the inputs (HV_INPUT_VTL, decoded by the
calls that take one). Result (RAX): bits 15:0 status, 43:32 reps completed.

Memory form: RDX = input GPA, R8 = output GPA, each 8-byte aligned and not crossing a page
(INVALID_ALIGNMENT), inside guest memory (INVALID_PARAMETER). Fast form: the input is RDX,
R8 and, with hv_xmm_input, XMM0-5 (112 bytes); more than fits -> INVALID_HYPERCALL_INPUT.
Fast output (hv_xmm_output) goes into the 16-byte register slots after the input.
Hypercalls at CPL > 0, or before the guest enabled the page, raise #UD.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...uapi import ffi
from ...x86 import arch
from ...x86.xsave import fpu_image
from .. import abi
from ..hypercalls import CONTROL_RESERVED_MASK as CONTROL_RESERVED, NAMES, STUB_OUT_OFFSETS, HvInputVtl, hypercall_page
from ..memory import GuestMemoryError
from ..outcomes import Answer, Outcome
from . import tlfs as T

CONTINUE = 0xFFFFFFFFFFFFFFFF
CONTINUE_STUB = bytes([0xE6, abi.PORT_HYPERCALL,      # out PORT_HYPERCALL, al
                       0x48, 0x83, 0xF8, 0xFF,         # cmp rax, -1
                       0x74, 0xF8,                     # je -8 (back to the out)
                       0xC3])                          # ret
REP_BUDGET = 16        # reps per guest entry before a continuation
FAST_REGS_SIZE = 112   # RDX, R8, XMM0-5
_XMM_LEGACY_OFFSET = 160


def page_bytes() -> bytes:
    """The hypercall page: pykvmm's port stubs with the continuing ordinary stub at 0."""
    page = bytearray(hypercall_page("port"))
    page[abi.HCPAGE_HYPERCALL:abi.HCPAGE_HYPERCALL + len(CONTINUE_STUB)] = CONTINUE_STUB
    assert abi.HCPAGE_HYPERCALL + len(CONTINUE_STUB) <= abi.HCPAGE_VTL_CALL
    return bytes(page)


class HvError(Exception):
    """Answer the call with this status (after ``reps`` completed reps)."""

    def __init__(self, status: int, why: str = ""):
        super().__init__(why or T.STATUS.get(status, hex(status)))
        self.status = status


class HvUndefined(Exception):
    """The call raises #UD in the caller."""


class HvSuspend(Exception):
    """The caller's VP is suspended before the call completes (e.g. a flush of a TLB a higher
    VTL locked, vsm/tlb.py): return to the guest with nothing done and RAX all-ones, so that
    the page's stub re-issues the call, as the TLFS re-issues it when the VP is unsuspended."""


@dataclass
class CallSpec:
    code: int
    name: str
    feature: str | None      # the hv flag that enables it (None: always there)
    fn: object               # simple: fn(call, header) -> output bytes | None
                             # rep:    fn(call, header, index, element) -> output element | None
    header_size: int = 0     # fixed input header bytes
    var_header: bool = False
    rep_size: int = 0        # input bytes per rep (0: a simple call)
    out_rep_size: int = 0
    out_size: int = 0        # simple call output bytes

    @property
    def rep(self) -> bool:
        return self.rep_size > 0


class Call:
    """One hypercall as the guest issued it, with its decoded input value."""

    def __init__(self, hv, thread, plane: int, vp, regs):
        self.hv, self.thread, self.plane, self.vp, self.regs = hv, thread, plane, vp, regs
        c = regs.rcx
        self.control = c
        self.code = c & 0xFFFF
        self.fast = bool(c & T.CONTROL_FAST)
        self.var_qwords = (c & T.CONTROL_VARHEAD_MASK) >> T.CONTROL_VARHEAD_SHIFT
        self.rep_count = (c >> T.CONTROL_REP_COUNT_SHIFT) & T.REP_MAX
        self.rep_start = (c >> T.CONTROL_REP_START_SHIFT) & T.REP_MAX
        self._fast_regs: bytes | None = None
        self.var_header = b""

    @property
    def vcpu(self):
        return self.thread.plane_vcpu(self.plane)

    # -- input ---------------------------------------------------------------------------
    def fast_registers(self) -> bytes:
        """RDX, R8 and (with hv_xmm_input) XMM0-5, as one little-endian block."""
        if self._fast_regs is None:
            r = self.regs
            block = r.rdx.to_bytes(8, "little") + r.r8.to_bytes(8, "little")
            if self.hv.config.has("xmm_input"):
                block += bytes(ffi.buffer(self.vcpu.get_fpu().xmm))[:96]
            self._fast_regs = block
        return self._fast_regs

    def read_input(self, size: int) -> bytes:
        if self.fast:
            regs = self.fast_registers()
            if size > len(regs):
                raise HvError(T.INVALID_HYPERCALL_INPUT, f"{size} input bytes do not fit the fast registers "
                                                         f"({len(regs)} bytes{'' if len(regs) > 16 else ', no hv_xmm_input'})")
            return regs[:size]
        self.hv.check_vtl_access(self.plane, self.regs.rdx, size, "input", write=False)
        return self.hv.read_block(self.plane, self.regs.rdx, size, "input")

    # -- output --------------------------------------------------------------------------
    def write_output(self, offset: int, data: bytes, input_size: int) -> None:
        if not data:
            return
        if not self.fast:
            self.hv.check_vtl_access(self.plane, self.regs.r8 + offset, len(data), "output", write=True)
            self.hv.write_block(self.plane, self.regs.r8, offset, data)
            return
        if not self.hv.config.has("xmm_output"):
            raise HvError(T.INVALID_HYPERCALL_INPUT, "fast call with output needs hv_xmm_output")
        start = -(-input_size // 16) * 16 + offset
        if start + len(data) > FAST_REGS_SIZE:
            raise HvError(T.INVALID_HYPERCALL_INPUT, "output does not fit the fast registers")
        self.hv.write_fast_output(self, start, data)


class HypercallTable:
    """The TLFS calls of one partition, hooked into the machine's transport-agnostic
    dispatcher (the dispatcher keeps owning pykvmm's own and the VTL calls)."""

    def __init__(self, hv):
        self.hv = hv
        self.specs: dict[int, CallSpec] = {}
        self.continuations = 0

    def add(self, spec: CallSpec, replace: bool = True) -> None:
        d = self.hv.machine.dispatcher
        if not replace and spec.code in d.handlers:
            return
        self.specs[spec.code] = spec
        NAMES.setdefault(spec.code, spec.name)
        d.register(spec.code, lambda thread, plane, control, regs, s=spec: self._handle(s, thread, plane, regs))

    # -- the one entry point --------------------------------------------------------------
    def _handle(self, spec: CallSpec, thread, plane: int, regs) -> Outcome:
        """The dispatcher's contract: an outcome. Outputs in RDX/R8 and the continuation's RCX
        are written to the live ``regs``, which the Answer commits with RAX."""
        hv = self.hv
        vp = hv.vp(thread.index, plane)
        call = Call(hv, thread, plane, vp, regs)
        try:
            hv.check_hypercall_allowed(call)
            if spec.feature and not hv.config.has(spec.feature):
                return Answer(T.INVALID_HYPERCALL_CODE)
            with hv.lock:
                return Answer(self._run(spec, call))
        except HvUndefined as e:
            return hv.undefined(call, str(e))
        except HvSuspend:
            return Answer(CONTINUE)
        except HvError as e:
            return Answer(e.status | (getattr(e, "reps", 0) << T.RESULT_REP_SHIFT))

    def _run(self, spec: CallSpec, call: Call) -> int:
        """The call's result value (RAX)."""
        c = call.control
        if c & CONTROL_RESERVED:
            raise HvError(T.INVALID_HYPERCALL_INPUT, f"reserved bits in the input value {c:#x}")
        if call.var_qwords and not spec.var_header:
            raise HvError(T.INVALID_HYPERCALL_INPUT, f"{spec.name} takes no variable header")
        var_size = call.var_qwords * 8
        head_size = spec.header_size + var_size
        if not spec.rep:
            if call.rep_count or call.rep_start:
                raise HvError(T.INVALID_HYPERCALL_INPUT, f"{spec.name} is not a rep call")
            block = call.read_input(head_size)
            call.var_header = block[spec.header_size:]
            out = spec.fn(call, block[:spec.header_size])
            if out:
                call.write_output(0, out, head_size)
            return T.SUCCESS
        if call.rep_start >= call.rep_count:
            raise HvError(T.INVALID_HYPERCALL_INPUT, f"rep start {call.rep_start} >= rep count {call.rep_count}")
        total = head_size + call.rep_count * spec.rep_size
        if not call.fast and total > 4096:
            raise HvError(T.INVALID_HYPERCALL_INPUT, f"{total} input bytes are more than a page")
        block = call.read_input(total)
        header = block[:spec.header_size]
        call.var_header = block[spec.header_size:head_size]
        i = call.rep_start
        end = min(call.rep_count, i + REP_BUDGET)
        try:
            while i < end:
                off = head_size + i * spec.rep_size
                out = spec.fn(call, header, i, block[off:off + spec.rep_size])
                if out:
                    call.write_output(i * spec.out_rep_size, out, total)
                i += 1
        except HvError as e:
            e.reps = i
            raise
        if i < call.rep_count:
            regs = call.regs
            regs.rcx = (regs.rcx & ~(T.REP_MAX << T.CONTROL_REP_START_SHIFT)) | (i << T.CONTROL_REP_START_SHIFT)
            self.continuations += 1
            hook = self.hv.on_continuation
            if hook:
                hook(call, i)
            return CONTINUE
        return T.SUCCESS | (i << T.RESULT_REP_SHIFT)


def rewind_to_out(hv, call: Call) -> None:
    """Point RIP back at the stub's ``out`` if this host left it past it (as #UD must)."""
    v = call.vcpu
    regs = call.regs
    base = hv.plane_state(call.plane).hypercall_gpa
    try:
        gpa = v.translate(regs.rip - 2)
    except Exception:
        return
    if gpa is not None and base is not None and gpa - base in STUB_OUT_OFFSETS:
        regs.rip -= 2


def read_xmm_output_image(v):
    """The vCPU's XSAVE image with its legacy x87/SSE state current (for an XMM write)."""
    return fpu_image(v)


def write_xmm(v, start: int, data: bytes) -> None:
    """Bytes ``start``.. of the fast register block (RDX, R8, XMM0-5) from ``data``, for the
    part that falls into the XMM registers (the caller handles RDX/R8)."""
    image = read_xmm_output_image(v)
    raw = ffi.cast("uint8_t *", image.region)
    ffi.memmove(raw + _XMM_LEGACY_OFFSET + start - 16, data, len(data))
    v.set_xsave(image)


def is_cpl0(v) -> bool:
    return v.sregs.cs.dpl == 0 and bool(v.sregs.cr0 & arch.CR0_PE)


__all__ = ["Call", "CallSpec", "HvError", "HvSuspend", "HvUndefined", "HypercallTable", "page_bytes", "GuestMemoryError"]


def target_vtl(input_vtl: int, plane: int, plane_count: int) -> int:
    """HV_INPUT_VTL -> the plane it names."""
    vtl = HvInputVtl(input_vtl)
    if vtl.reserved:
        raise HvError(T.INVALID_PARAMETER, f"HV_INPUT_VTL {input_vtl:#x} has reserved bits")
    target = vtl.target(plane)
    if target >= plane_count:
        raise HvError(T.INVALID_PARAMETER, f"target VTL {target} does not exist ({plane_count} VTLs)")
    return target


def processor_mask(mask: int, vcpus: int) -> list[int]:
    if mask >> vcpus:
        raise HvError(T.INVALID_PARAMETER, f"processor mask {mask:#x} names VPs that do not exist ({vcpus})")
    return [i for i in range(vcpus) if mask >> i & 1]


def vp_set(fmt: int, valid_banks: int, banks: bytes, vcpus: int) -> list[int]:
    """HV_VP_SET: Format (0 sparse 4K banks, 1 all), ValidBankMask, then one u64 bank of 64
    VP bits per set bit of the mask (the variable header)."""
    if fmt == T.GENERIC_SET_ALL:
        return list(range(vcpus))
    if fmt != T.GENERIC_SET_SPARSE_4K:
        raise HvError(T.INVALID_PARAMETER, f"HV_VP_SET format {fmt} is unknown")
    n = bin(valid_banks).count("1")
    if len(banks) != 8 * n:
        raise HvError(T.INVALID_HYPERCALL_INPUT, f"HV_VP_SET has {n} valid banks but the variable header "
                                                 f"holds {len(banks) // 8}")
    out, k = [], 0
    for bank in range(64):
        if valid_banks >> bank & 1:
            bits = int.from_bytes(banks[8 * k:8 * k + 8], "little")
            k += 1
            for b in range(64):
                if bits >> b & 1:
                    vp = bank * 64 + b
                    if vp >= vcpus:
                        raise HvError(T.INVALID_PARAMETER, f"HV_VP_SET names VP {vp}, which does not exist")
                    out.append(vp)
    return out


def install_echo(hv) -> None:
    """PykvmmEcho (pykvmm-only code, outside Hyper-V's range): header u64 addend, rep
    elements u64, output element i = input i + addend. A rep call with output, so the rep,
    continuation, memory, fast and XMM input/output paths have a guest-visible effect."""
    from .. import abi

    def echo(call, header, index, element):
        add = int.from_bytes(header, "little")
        return ((int.from_bytes(element, "little") + add) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    hv.table.add(CallSpec(abi.HVCALL_PYKVMM_ECHO, "PykvmmEcho", None, echo, header_size=8, rep_size=8,
                          out_rep_size=8))
