"""The cffi declarations in pykvmm/uapi against the machine's <linux/kvm.h>, and the RFC
layouts against the numbers in shared/reference/planes-uapi.md.

A C probe is generated from cffi's own type introspection: every struct in the cdefs, every
field at every depth (anonymous unions, nested structs, struct array elements), and every
mainline ioctl code. It is compiled with the system compiler and its output compared with
ffi.sizeof / ffi.offsetof, one test per struct and per ioctl.
"""

import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from pykvmm.uapi import IOCTLS, PROFILES, ffi
from pykvmm.uapi import ioctls as ioc
from pykvmm.uapi.structs import MAINLINE_CDEF

CDEF_STRUCTS = re.findall(r"^struct (\w+) \{", MAINLINE_CDEF, re.M)

# ---- what the probe deliberately does not check, and why ---------------------------------
# Structs that exist only in RFCs (checked against planes-uapi.md further down).
RFC_ONLY_STRUCTS = {"kvm_plane_event_exit", "kvm_plane_event_exit_v1", "kvm_apic_id_groups"}
# (struct, top-level member) pairs absent from mainline headers.
RFC_PADDING1_FIELDS = {"plane", "padding1", "suspended_planes", "req_exit_planes"}
SKIPPED_MEMBERS = {
    # planes RFC: carved out of mainline's __u8 padding1[6] (bytes 2..8); see
    # test_rfc_kvm_run_fields_live_in_mainline_padding1.
    **{("kvm_run", f): "RFC field inside mainline padding1[6]" for f in RFC_PADDING1_FIELDS},
    # planes RFC / v1 exit-union members: no mainline counterpart.
    ("kvm_run", "plane_event"): "planes RFC only",
    ("kvm_run", "plane_event_v1"): "planes v1 only",
}
# Members newer than some system headers: probed only when the header has the macro.
NEWER_MEMBERS = {("kvm_run", "memory_fault"): "KVM_EXIT_MEMORY_FAULT"}

MAINLINE_STRUCTS = [s for s in CDEF_STRUCTS if s not in RFC_ONLY_STRUCTS]
MAINLINE_IOCTLS = sorted(name for name, e in IOCTLS.items() if e.mainline)


@dataclass(frozen=True)
class Check:
    struct: str      # test id: a struct name, or "ioctl"
    key: str         # unique probe output key
    what: str        # human description for failure messages
    c_expr: str      # C expression the probe prints
    ours: int        # the value cffi / pykvmm computes
    guard: str | None = None


def _walk(ctype, prefix="", base=0):
    """(C member designator, offset from the outer struct, field ctype) for every field."""
    for name, field in ctype.fields:
        assert field.bitsize == -1, f"bitfield {prefix}{name}: the probe does not handle bitfields"
        path, offset, t = prefix + name, base + field.offset, field.type
        yield path, offset, t
        if t.kind in ("struct", "union"):
            yield from _walk(t, path + ".", offset)
        elif t.kind == "array" and t.item.kind in ("struct", "union"):
            yield from _walk(t.item, path + "[0].", offset)


def _struct_checks(struct):
    ctype = ffi.typeof(f"struct {struct}")
    c_type = f"struct {struct}"
    checks = [Check(struct, f"{struct}:sizeof", f"sizeof({c_type})", f"sizeof({c_type})", ffi.sizeof(ctype))]
    for path, offset, t in _walk(ctype):
        top = re.split(r"[.\[]", path, maxsplit=1)[0]
        if (struct, top) in SKIPPED_MEMBERS:
            continue
        guard = NEWER_MEMBERS.get((struct, top))
        checks.append(Check(struct, f"{struct}:{path}:offset", f"offsetof({c_type}, {path})",
                            f"offsetof({c_type}, {path})", offset, guard))
        if not (t.kind == "array" and t.length is None):  # flexible array: offset only
            checks.append(Check(struct, f"{struct}:{path}:size", f"sizeof({c_type}.{path})",
                                f"sizeof((({c_type} *)0)->{path})", ffi.sizeof(t), guard))
    if struct == "kvm_run":  # mainline's padding1[6], which the RFC fields replace
        checks += [Check(struct, "kvm_run:mainline padding1:offset", "offsetof(kvm_run, padding1)",
                         "offsetof(struct kvm_run, padding1)", 2),
                   Check(struct, "kvm_run:mainline padding1:size", "sizeof(kvm_run.padding1)",
                         "sizeof(((struct kvm_run *)0)->padding1)", 6)]
    return checks


def _ioctl_checks():
    return [Check("ioctl", f"ioctl:{name}", name, name, IOCTLS[name].code) for name in MAINLINE_IOCTLS]


ALL_CHECKS = [c for s in MAINLINE_STRUCTS for c in _struct_checks(s)] + _ioctl_checks()


def _probe_source(checks) -> str:
    out = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "", "int main(void)", "{"]
    for c in checks:
        line = f'    printf("%s %lu\\n", "{c.key}", (unsigned long)({c.c_expr}));'
        if c.guard:
            out += [f"#ifdef {c.guard}", line, "#else", f'    printf("%s MISSING\\n", "{c.key}");', "#endif"]
        else:
            out.append(line)
    return "\n".join(out + ["    return 0;", "}", ""])


@pytest.fixture(scope="module")
def header(tmp_path_factory):
    """key -> value the system <linux/kvm.h> gives (None: guarded member the header lacks)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: neither cc nor gcc is on PATH")
    tmp = tmp_path_factory.mktemp("kvm_probe")
    src, exe = tmp / "probe.c", tmp / "probe"
    src.write_text(_probe_source(ALL_CHECKS))
    build = subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"{cc} could not compile the <linux/kvm.h> probe {src}:\n{build.stderr}", pytrace=False)
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    values = {}
    for line in run.stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        values[key] = None if value == "MISSING" else int(value)
    assert set(values) == {c.key for c in ALL_CHECKS}, "probe output does not cover every check"
    return values


def _mismatches(header, checks):
    errors = []
    for c in checks:
        theirs = header[c.key]
        if theirs is None:
            assert c.guard, f"{c.key}: the probe printed no value"
            continue  # a member newer than this system header
        if theirs != c.ours:
            errors.append(f"{c.struct}: {c.what}: pykvmm {c.ours} ({c.ours:#x}), "
                          f"<linux/kvm.h> {theirs} ({theirs:#x})")
    return errors


@pytest.mark.parametrize("struct", MAINLINE_STRUCTS)
def test_struct_layout_matches_linux_header(header, struct):
    errors = _mismatches(header, [c for c in ALL_CHECKS if c.struct == struct])
    if errors:
        pytest.fail(f"struct {struct} differs from the system <linux/kvm.h>:\n" + "\n".join(errors), pytrace=False)


@pytest.mark.parametrize("name", MAINLINE_IOCTLS)
def test_ioctl_code_matches_linux_header(header, name):
    errors = _mismatches(header, [c for c in ALL_CHECKS if c.key == f"ioctl:{name}"])
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


def test_probe_exclusions_name_real_declarations():
    """The documented exclusions must refer to things the cdefs really declare."""
    assert RFC_ONLY_STRUCTS <= set(CDEF_STRUCTS)
    kvm_run_fields = dict(ffi.typeof("struct kvm_run").fields)
    for struct, member in {**SKIPPED_MEMBERS, **NEWER_MEMBERS}:
        assert struct == "kvm_run" and member in kvm_run_fields, (struct, member)
    # kvm_run's walk reaches deep anonymous/nested members
    keys = {c.key for c in ALL_CHECKS}
    assert {"kvm_run:io.port:offset", "kvm_run:s.regs.sregs.cs.base:offset",
            "kvm_xcrs:xcrs[0].value:offset", "kvm_msrs:entries:offset"} <= keys
    assert "kvm_msrs:entries:size" not in keys


# ---- RFC layouts: numbers from planes-uapi.md ----------------------------------------------

def test_rfc_kvm_run_fields_live_in_mainline_padding1():
    for name in RFC_PADDING1_FIELDS:
        start = ffi.offsetof("struct kvm_run", name)
        end = start + ffi.sizeof(dict(ffi.typeof("struct kvm_run").fields)[name].type)
        assert 2 <= start and end <= 8, f"kvm_run.{name} spans bytes {start}..{end}, outside padding1[6] (2..8)"


@pytest.mark.parametrize("fields, offset", [
    (("plane",), 2),
    (("suspended_planes",), 4),
    (("req_exit_planes",), 6),
    (("exit_reason",), 8),
    (("plane_event",), 32),
    (("plane_event", "cause"), 32),
    (("plane_event", "pending_event_planes"), 34),
    (("plane_event", "target"), 36),
    (("plane_event", "padding"), 38),
    (("plane_event", "flags"), 40),
    (("plane_event", "extra"), 48),
    (("plane_event_v1",), 32),
    (("plane_event_v1", "cause"), 32),
    (("plane_event_v1", "plane"), 36),
    (("plane_event_v1", "extra"), 40),
], ids=lambda v: ".".join(v) if isinstance(v, tuple) else str(v))
def test_rfc_kvm_run_offsets(fields, offset):
    assert ffi.offsetof("struct kvm_run", *fields) == offset


@pytest.mark.parametrize("ctype, size", [
    ("struct kvm_plane_event_exit", 80),
    ("struct kvm_plane_event_exit_v1", 72),
    ("struct kvm_irq_routing_entry", 48),
    ("struct kvm_apic_id_groups", 1),
])
def test_rfc_struct_sizes(ctype, size):
    assert ffi.sizeof(ctype) == size


def test_rfc_irq_routing_entry_plane_slot():
    # mainline 'pad', the svsm-6.17 branch's 'plane'
    assert ffi.offsetof("struct kvm_irq_routing_entry", "pad") == 12
    assert dict(ffi.typeof("struct kvm_irq_routing_entry").fields)["pad"].type.cname == "uint32_t"


def test_rfc_apic_id_groups_ioctl():
    entry = IOCTLS["KVM_SET_APIC_ID_GROUPS"]
    assert entry.code == 0x4001AED7
    assert not entry.mainline


@pytest.mark.parametrize("name, cap, cap_fpu, exit_reason, create_plane, create_vcpu_plane, event", [
    ("rfc-2025-04", 239, 240, 40, 0xAED6, 0xAED7, "plane_event"),
    ("svsm-6.17", 244, 245, 41, 0xAED6, 0xAED7, "plane_event"),
    ("v1-2026-06", 249, None, 44, 0xAEE4, None, "plane_event_v1"),
])
def test_planes_profiles(name, cap, cap_fpu, exit_reason, create_plane, create_vcpu_plane, event):
    p = PROFILES[name]
    assert (p.cap_planes, p.cap_planes_fpu, p.exit_plane_event) == (cap, cap_fpu, exit_reason)
    assert p.create_plane.code == create_plane and not p.create_plane.mainline
    if create_vcpu_plane is None:
        assert p.create_vcpu_plane is None
    else:
        assert p.create_vcpu_plane.code == create_vcpu_plane and p.create_vcpu_plane.on == "plane"
    assert p.event_struct == event and ffi.offsetof("struct kvm_run", event) == 32
    assert p.userspace_schedules == (name != "v1-2026-06")


# ---- the _IOC helpers, against well-known mainline values -----------------------------------

@pytest.mark.parametrize("code, expected", [
    (ioc._IO(ioc.KVMIO, 0x80), 0xAE80),                                              # KVM_RUN
    (ioc._IO(ioc.KVMIO, 0x01), 0xAE01),                                              # KVM_CREATE_VM
    (ioc._IOR(ioc.KVMIO, 0x81, "struct kvm_regs"), 0x8090AE81),                      # KVM_GET_REGS
    (ioc._IOR(ioc.KVMIO, 0x83, "struct kvm_sregs"), 0x8138AE83),                     # KVM_GET_SREGS
    (ioc._IOR(ioc.KVMIO, 0x8E, "struct kvm_lapic_state"), 0x8400AE8E),               # KVM_GET_LAPIC
    (ioc._IOR(ioc.KVMIO, 0xA4, "struct kvm_xsave"), 0x9000AEA4),                     # KVM_GET_XSAVE
    (ioc._IOW(ioc.KVMIO, 0x46, "struct kvm_userspace_memory_region"), 0x4020AE46),   # SET_USER_MEMORY_REGION
    (ioc._IOWR(ioc.KVMIO, 0x02, "struct kvm_msr_list"), 0xC004AE02),                 # KVM_GET_MSR_INDEX_LIST
    (ioc._IOWR(ioc.KVMIO, 0x85, "struct kvm_translation"), 0xC018AE85),              # KVM_TRANSLATE
])
def test_ioc_helpers_known_values(code, expected):
    assert code == expected, f"{code:#x} != {expected:#x}"


def test_ioc_rejects_oversized_argument():
    with pytest.raises(ValueError):
        ioc._IOC(ioc._IOC_READ, ioc.KVMIO, 0, 1 << 14)
