"""What differs between KVMs (kvm_pvm here, mainline kvm_amd/kvm_intel elsewhere): the probed
host conventions, and the code paths that depend on them, each on a real guest."""

from __future__ import annotations

import pytest

from conftest import guest_image
from pykvmm.debug.disasm import insn_at
from pykvmm.kvm import Kvm
from pykvmm.uapi import constants as C
from pykvmm.vmm import host
from pykvmm.vmm.machine import ExitStatus, Machine, MachineConfig


def test_conventions_are_probed_with_a_value_and_what_was_seen(kvm):
    found = host.conventions(kvm)
    assert set(found) == set(host.PROBES)
    assert found["pio_out_rip"].value in ("on", "past")
    assert found["shutdown"].value in ("kept", "reset")
    for name in ("sse", "x87", "int3"):
        assert found[name].value in ("yes", "no") and found[name].detail
    assert found["sti_shadow"].value in ("kept", "lost")


def test_sti_shadow_verdict():
    assert host.sti_shadow_verdict(0).value == "lost"          # on the shadowed instruction
    assert host.sti_shadow_verdict(1).value == "kept"          # right after it
    assert host.sti_shadow_verdict(3).value == "kept"          # at the next entry (kvm_pvm)
    assert host.sti_shadow_verdict(None).value == "unknown"


@pytest.mark.parametrize("shadow", ["kept", "lost"])
def test_timeout_names_a_dropped_sti_shadow(kvm_available, monkeypatch, shadow):
    """A guest halted with interrupts on and nothing pending when the run times out: where the
    host drops the STI shadow (made real here by the convention's answer), the result says
    that its wake-up may have come before the `hlt`; elsewhere it says nothing."""
    import pykvmm.vmm.machine as machine
    real = machine.convention
    monkeypatch.setattr(machine, "convention", lambda kvm, name: host.Probe(shadow, "") if name == "sti_shadow"
                        else real(kvm, name))
    with Machine(guest_image("halt_idle"), MachineConfig(vcpus=2, quiet=True)) as m:
        r = m.run(3.0)                 # the run limit is what is tested: they halt at once
    assert r.status == ExitStatus.TIMEOUT
    if shadow == "lost":
        assert r.message.startswith("vcpu0, vcpu1 halted with interrupts on") and "sti_shadow: lost" in r.message
    else:
        assert r.message == ""


def test_timeout_with_a_vcpu_still_running_only_suggests_the_sti_shadow(kvm_available, monkeypatch):
    """Halted vCPUs beside one that still runs may just have finished their part (kvm-unit-tests'
    APs do): the note names the running vCPU and offers the lost wake-up as one explanation."""
    import pykvmm.vmm.machine as machine
    real = machine.convention
    monkeypatch.setattr(machine, "convention", lambda kvm, name: host.Probe("lost", "") if name == "sti_shadow"
                        else real(kvm, name))
    with Machine(guest_image("halt_idle"), MachineConfig(vcpus=3, quiet=True)) as m:
        r = m.run(3.0)                 # the run limit is what is tested: vcpu2 spins for good
    assert r.status == ExitStatus.TIMEOUT
    assert r.message.startswith("vcpu2 still running; vcpu0, vcpu1 halted with interrupts on"), r.message
    assert "finished, or" in r.message and "sti_shadow: lost" in r.message


def test_sti_shadow_probe_sees_a_dropped_shadow(kvm):
    """What QEMU's emulated SVM (before 9.1) does at VM entry, made real here: enter without the
    shadow. The probe must then see the interrupt come in on the shadowed instruction."""
    assert host.probe_sti_shadow(kvm, shadow=0).value == "lost"


def test_pio_completion_leaves_rip_past_the_out_on_every_host(kvm):
    with host.ScratchVm(kvm, b"\x90\xE6\xEB\xEB\xFE") as s:        # nop; out 0xeb, al; jmp $
        ex = s.vcpu.run()
        assert ex.port == 0xEB
        assert s.offset() in (1, 3)          # on the `out` (mainline) or past it (kvm_pvm)
        s.vcpu.complete_pending_io()
        assert s.offset() == 3


def _kvm_amd_reset(v) -> None:
    """Do to ``v`` what kvm_amd does at a SHUTDOWN intercept: INIT it (state of a fresh vCPU)."""
    with Kvm(v.vm.kvm.path) as k, k.create_vm() as vm:
        fresh = vm.create_vcpu(0)
        regs, sregs = fresh.get_regs(), fresh.get_sregs()
    assert host.looks_reset(regs, sregs)
    v.set_sregs(sregs)
    v.set_regs(regs)


@pytest.mark.parametrize("guest, planes, reg, value, personality", [
    ("fault", 1, "rax", 0xFA17, "auto"), ("vtl_crash", 2, "r12", 0x7777, "vtl"),
    ("vtl_crash", 2, "r12", 0x7777, "vmpl")])
def test_triple_fault_state_recreated_when_kvm_resets_the_vcpu(kvm_available, monkeypatch, guest, planes, reg, value,
                                                              personality):
    """kvm_amd's behaviour made real here: the vCPU is reset at the shutdown exit, and the
    crash report must still show the ud2 and the registers the guest had there (under vmpl the
    VtlCall into the crashing plane is made in C, which keeps the entry state too)."""
    import pykvmm.vmm.vcpu_thread as vcpu_thread
    real = vcpu_thread.recover_after_shutdown

    def reset_then_recover(v, kick):
        _kvm_amd_reset(v)
        return real(v, kick)

    monkeypatch.setattr(vcpu_thread, "recover_after_shutdown", reset_then_recover)
    with Machine(guest_image(guest), MachineConfig(planes=planes, personality=personality, quiet=True)) as m:
        for t in m.threads:
            for p in range(planes):
                v = t.plane_vcpu(p)
                v.enable_sync_regs(C.KVM_SYNC_X86_REGS | C.KVM_SYNC_X86_SREGS | m.policy.sync_classes)
                v.keep_entry_state()
        r = m.run(60)
    assert r.status == ExitStatus.CRASHED and "triple fault" in r.crash.reason
    assert "re-created by re-executing" in r.crash.state, r.crash.state
    ps = r.crash.report.planes[planes - 1]
    assert ps.regs[reg] == value
    assert ps.sregs["cs"]["selector"] != 0xF000
    assert insn_at(ps.code, ps.code_addr, ps.regs["rip"]).text == "ud2"


def test_triple_fault_state_is_the_guests_where_kvm_keeps_it(run_guest, kvm):
    if host.convention(kvm, "shutdown").value != "kept":
        pytest.skip("this host's KVM resets the vCPU at a triple fault (the re-created state is tested above)")
    r = run_guest("fault")
    assert r.crash.state == ""


def test_vtl_switch_shares_real_x87_and_sse_registers(run_guest, kvm):
    """The guest's own movdqu/fild/fistp across a VtlCall and a VtlReturn (where the host runs them)."""
    from conftest import assert_done, require
    for unit in ("sse", "x87"):
        found = host.convention(kvm, unit)
        require(unit, found.value == "yes", f"this host's KVM cannot run guest {unit} code ({found.detail})")
    r = run_guest("vtl_fpu", planes=2, personality="vtl")
    assert_done(r)
    syncs = dict(r.syncs())
    assert (syncs[0x101], syncs[0x102], syncs[0x103]) == (0xA0A1A2A3A4A5A6A7, 0xA8A9AAABACADAEAF, 3)
    assert (syncs[0x11], syncs[0x12], syncs[0x13]) == (0xB0B1B2B3B4B5B6B7, 0xB8B9BABBBCBDBEBF, 5)
    assert syncs[0x14] == 0xA0A1A2A3A4A5A6A7


def test_caps_lists_the_host_conventions(kvm_available):
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pykvmm", "caps", "--json"], cwd=root, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=root), timeout=300)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)["host"]
    assert set(found) == set(host.PROBES) | {"vmcall"}
    assert found["vmcall"]["value"] in ("never-returns", "exits", "in-kernel", "unknown")
    assert all(c["detail"] for c in found.values())
