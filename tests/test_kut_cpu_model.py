"""--cpu: QEMU's -cpu syntax, what a model gives the guest, and errors naming what we cannot honour."""

import pytest

from pykvmm.kvm import Kvm
from pykvmm.x86 import cpu_model as M


def leaf(cpuid, function, index=0):
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == function and e.index == index:
            return e
    return None


def test_parse_flags_props_and_order():
    spec = M.parse_cpu_spec("qemu64,+x2apic,-x2apic,tsc-deadline=on,sse4_1=off,vendor=GenuineIntel")
    assert spec.model == "qemu64" and spec.vendor == "GenuineIntel"
    assert spec.flags == {"x2apic": False, "tsc-deadline": True, "sse4.1": False}


@pytest.mark.parametrize("text,phrase", [
    ("pentium99", "unknown CPU model 'pentium99'"),
    ("qemu64,+frobnicate", "'frobnicate' is not something pykvmm can honour"),
    ("max,phys-bits=36", "phys-bits=36 is not something pykvmm can honour"),
    ("qemu64,vendor=Intel", "12 characters"),
])
def test_errors_name_what_cannot_be_honoured(text, phrase):
    with pytest.raises(M.CpuModelError, match=phrase.replace("(", r"\(")):
        M.parse_cpu_spec(text)


def test_flag_family_without_an_owner_is_an_error(monkeypatch):
    monkeypatch.setattr(M, "_EXTENSIONS", [])
    with pytest.raises(M.CpuModelError, match="'hv_vpindex'"):
        M.parse_cpu_spec("kvm64,hv_vpindex")


def test_registered_flag_family_is_handed_to_its_owner(monkeypatch):
    monkeypatch.setattr(M, "_EXTENSIONS", [])
    M.register_flags("hyperv", lambda name: name.startswith("hv_"))
    spec = M.parse_cpu_spec("kvm64,hv_vpindex,hv_synic=on,+x2apic")
    assert spec.extension_flags("hyperv") == {"hv_vpindex": True, "hv_synic": "on"}
    assert spec.flags == {"x2apic": True}


def test_qemu64_restricts_cpuid_to_the_model(kvm_available):
    with Kvm() as kvm:
        host = kvm.supported_cpuid()
        cpuid = kvm.supported_cpuid()
    applied = M.resolve("qemu64,-x2apic,+tsc-deadline", cpuid)
    l1 = leaf(cpuid, 1)
    assert not l1.ecx & (1 << 21)                        # -x2apic
    assert bool(l1.ecx & (1 << 24)) == ("tsc-deadline" in M.host_flags(host))
    assert not (leaf(cpuid, 7) and leaf(cpuid, 7).ebx)   # qemu64 has no leaf-7 features
    assert leaf(cpuid, 0).eax <= 0xD and all(cpuid.entries[i].function <= 0xD or
                                             cpuid.entries[i].function >= 0x40000000 for i in range(cpuid.nent))
    assert (l1.eax >> 8) & 0xF == 15 and (l1.eax >> 4) & 0xF == 107 & 0xF   # family 15, model 107
    assert applied.flags <= M.host_flags(host) | {"hypervisor"}
    assert "lm" in applied.flags and "x2apic" not in applied.flags


def test_host_model_keeps_every_supported_flag(kvm_available):
    with Kvm() as kvm:
        host = kvm.supported_cpuid()
        cpuid = kvm.supported_cpuid()
    applied = M.resolve("host", cpuid)
    assert M.host_flags(host) <= applied.flags


def test_missing_host_feature_warns_and_enforce_refuses(kvm_available):
    with Kvm() as kvm:
        supported = M.host_flags(kvm.supported_cpuid())
        absent = next(f for f in ("vmx", "svm", "avx512f", "pku", "la57") if f not in supported)
        applied = M.resolve(f"qemu64,+{absent}", kvm.supported_cpuid())
        assert f"host doesn't support requested feature: {absent}" in applied.warnings
        with pytest.raises(M.CpuModelError, match=absent):
            M.resolve(f"qemu64,+{absent},enforce", kvm.supported_cpuid())


def test_guest_sees_the_model(run_kut):
    # smptest passes with x2APIC hidden (the lib falls back to xAPIC MMIO) and with it shown.
    for cpu in ("qemu64,-x2apic", "qemu64,+x2apic"):
        r = run_kut("smptest", vcpus=2, cpu=cpu)
        assert r.exit_code == 0, cpu
