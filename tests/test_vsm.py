"""VSM (vmm/vsm/): VTL memory protections, secure intercepts, VP registers, on real guests."""

from __future__ import annotations

import time

import pytest

from pykvmm.vmm import abi
from pykvmm.vmm.hyperv.features import HvConfig

from conftest import assert_done


@pytest.fixture
def run_vsm(run_guest):
    """A VSM guest: --hyperv with every enlightenment (hv_vsm included), VTLs = planes."""
    def run(name, **config):
        config.setdefault("hyperv", HvConfig.everything())
        config.setdefault("backend", "multivm")
        return run_guest(name, **config)
    return run

INTERCEPT_READ, INTERCEPT_WRITE, INTERCEPT_EXECUTE = 0, 1, 2


def test_vtl0_cannot_run_its_code_in_vtl1(run_vsm):
    """The attack that patched the shared VtlReturn stub (and VTL1's code) so that VTL1 ran
    VTL0's code now ends in intercepts; VTL0 never sees VTL1's secret."""
    r = run_vsm("vsm_attack", planes=2)
    assert_done(r)
    s = dict(r.syncs())
    # ModifyVtlProtectionMask: success (status 0) and every rep completed (bits 43:32)
    assert [s[0x10], s[0x11], s[0x12], s[0x13]] == [1 << 32, 1 << 32, 1 << 32, 4 << 32]
    assert [s[1], s[2], s[3], s[4]] == [INTERCEPT_WRITE, INTERCEPT_WRITE, INTERCEPT_READ, INTERCEPT_EXECUTE]
    assert s[5] == abi.HYPERCALL_PAGE_ADDR + abi.HCPAGE_VTL_RETURN
    assert s[6] == 0x5A5A                   # the read was not performed
    assert s[7] == 1                        # the VtlReturn stub is intact
    assert s[8] == 0x1235                   # VtlCall/VtlReturn still work
    assert s[9] == 0                        # VTL0's code never ran (in any VTL)
    assert s[10] == 4
    assert 0x99 not in s
    assert r.stats["vsm"]["intercepts"] == 4
    assert r.entry_reasons.get("intercept") == 4


def test_attack_succeeds_without_protections(run_vsm, monkeypatch):
    """The control: with ModifyVtlProtectionMask answering without protecting anything, the
    same guest does run VTL0's code in VTL1 (so the test above can fail)."""
    from pykvmm.vmm.vsm import protections
    monkeypatch.setattr(protections.VtlProtections, "set_masks", lambda *a: None)
    r = run_vsm("vsm_attack", planes=2)
    assert r.ok and (0x99, 1) in r.syncs(plane=1)     # VTL0's code ran in VTL1


@pytest.mark.parametrize("vcpus,accesses", [(1, 300), (2, 200)])
def test_protection_violation_stress(run_vsm, vcpus, accesses):
    """Random VTL0 reads, writes and fetches of pages VTL1 protected: each violation is
    intercepted exactly once (the guest checks every access), VTL0 never sees or changes the
    data, and the VMM's count of intercepts is the guest's."""
    r = run_vsm("vsm_stress", planes=2, vcpus=vcpus, arg=accesses, timeout=120)
    assert_done(r)
    expected = 0
    for v in range(vcpus):
        s = dict(r.syncs(vcpu=v))
        assert s[1] == accesses
        expected += s[2]
    assert dict(r.syncs(vcpu=0))[3] == 0          # every protected qword still holds the pattern
    assert expected > accesses // 3
    assert r.stats["vsm"]["intercepts"] == expected
    assert r.entry_reasons["intercept"] == expected


@pytest.mark.slow
def test_protection_violation_stress_long(run_vsm):
    r = run_vsm("vsm_stress", planes=2, vcpus=4, arg=2000, timeout=600)
    assert_done(r)
    expected = sum(dict(r.syncs(vcpu=v))[2] for v in range(4))
    assert r.stats["vsm"]["intercepts"] == expected and dict(r.syncs(vcpu=0))[3] == 0


ACCESS_DENIED, INVALID_PARAMETER, INVALID_HYPERCALL_INPUT = 6, 5, 3
INVALID_PARTITION_ID, INVALID_VP_INDEX = 0xD, 0xE
REPS = 32


def test_vsm_call_statuses(run_vsm):
    """HvCallModifyVtlProtectionMask and HvCallGet/SetVpRegisters: TLFS statuses and rep
    counts for good and bad input, the input-VTL rule (never a higher VTL), shared registers."""
    r = run_vsm("vsm_calls", planes=2)
    assert_done(r)
    s = dict(r.syncs())
    assert s[0x01] == ACCESS_DENIED and s[0x02] == ACCESS_DENIED    # VTL0 protecting itself / VTL1
    assert s[0x03] == ACCESS_DENIED                                  # VTL0 reading VTL1's registers
    assert s[0x04] == 1 << REPS and s[0x05] == abi.HCPAGE_VTL_CALL | abi.HCPAGE_VTL_RETURN << 12
    assert s[0x11] == INVALID_PARAMETER and s[0x12] == INVALID_PARAMETER
    assert s[0x13] == INVALID_PARAMETER                              # r-- : multivm refuses, cleanly
    assert any("no-execute" in w for w in r.stats["warnings"])
    assert s[0x14] == INVALID_PARAMETER | 2 << REPS                  # two pages done, then outside RAM
    assert s[0x15] == INVALID_PARTITION_ID and s[0x16] == INVALID_PARAMETER
    assert s[0x17] == 1 << REPS and s[0x18] == INVALID_HYPERCALL_INPUT   # fast (XMM) form; no reps
    assert s[0x20] == 1 << REPS and s[0x21] == 0                     # fast Get, XMM output
    assert s[0x22] == INVALID_HYPERCALL_INPUT                        # a count overflowing the XMM registers
    assert s[0x19] == INVALID_PARAMETER and s[0x1A] == INVALID_VP_INDEX and s[0x1B] == INVALID_PARAMETER
    assert s[0x1C] == 1 << REPS and s[0x1D] == 0                     # VTL0's own RSP
    assert s[0x1E] == 1 << REPS and s[0x06] == 0x77                  # a shared register, set from VTL1
    # HvCallTranslateVirtualAddress: result codes, the VTL protections of the translated VTL
    assert s[0x40] == 0 and s[0x41] == 0                              # identity-mapped, success
    assert s[0x42] == 1                                               # PageNotPresent
    assert s[0x43] == 6 and s[0x44] == 0                              # r-x: no write, read fine
    assert s[0x45] == 5                                               # ---: no read
    assert s[0x46] == INVALID_PARAMETER and s[0x07] == ACCESS_DENIED  # reserved flag; a higher VTL


INVALID_VTL_STATE = 0x51


def test_tlfs_boot_enable_vtls_and_vp_assist_control(run_vsm):
    """--vtl-boot tlfs: only VTL0 runs at reset; discovery, EnablePartitionVtl/EnableVpVtl
    with their statuses, VTL1 starting from the initial context, VsmPartitionConfig's
    write-once rule, VtlCall/VtlReturn through VTL1's VP assist page, a secure intercept
    message in VTL1's SynIC message page."""
    r = run_vsm("vsm_boot", planes=2, vtl_boot="tlfs")
    assert_done(r)
    s = dict(r.syncs())
    assert s[0x01] == 3                                       # AccessVsm, AccessVpRegisters
    assert s[0x02] == 1 and r.stats["ud_reasons"] == {"call-from-top": 1}   # VtlCall, no VTL1 yet
    assert s[0x03] == 1 | 1 << 16                             # EnabledVtlSet {0}, MaximumVtl 1
    assert s[0x04] == INVALID_VTL_STATE                       # EnableVpVtl before the partition
    assert (s[0x05], s[0x06], s[0x07], s[0x08], s[0x09]) == (ACCESS_DENIED, INVALID_PARAMETER,
                                                             INVALID_PARAMETER, 0, INVALID_VTL_STATE)
    assert (s[0x0A], s[0x0B], s[0x0C], s[0x0D]) == (INVALID_VP_INDEX, INVALID_PARAMETER, 0, INVALID_VTL_STATE)
    assert s[0x0E] == INVALID_PARAMETER                       # VTL0 has no VsmPartitionConfig
    assert s[0x33] == 0x1111                                  # shared RBX on VTL1's first entry
    assert s[0x31] == abi.VTL_ENTRY_VTL_CALL and s[0x32] == 0x301
    assert s[0x34] == 1 << REPS and s[0x35] == INVALID_PARAMETER   # write-once
    assert s[0x36] == 0                                       # VP assist page enabled
    assert (s[0x10], s[0x11]) == (0xAAAA, 0xCCCC)             # VtlReturnX64Rax/Rcx from the assist page
    assert s[0x37] == abi.VTL_ENTRY_VTL_CALL and s[0x12] == 1
    # a secure intercept delivered through VTL1's SynIC message page (SINT0)
    assert s[0x38] == abi.VTL_ENTRY_INTERCEPT and s[0x39] == 0x80000001     # HvMessageTypeGpaIntercept
    assert s[0x3A] == 0 and s[0x3B] == INTERCEPT_WRITE and s[0x3C] == 0 and s[0x13] == 1
    assert r.stats["vsm"]["intercepts_synic"] == 1 and r.stats["hyperv"]["messages"] == 1
    assert s[0x14] == ACCESS_DENIED and s[0x3D] == 0     # no hypercall output into VTL1's page
    assert s[0x15] == ACCESS_DENIED                      # VTL0 cannot interrupt VTL1
    assert s[0x3E] == 1                                  # HvRegisterVpAssistPage


def test_tlfs_boot_needs_hv_vsm(kvm_available):
    from pykvmm.vmm.machine import Machine, MachineConfig
    from conftest import guest_image
    with pytest.raises(ValueError, match="--vtl-boot tlfs needs --hyperv"):
        Machine(guest_image("vsm_boot"), MachineConfig(planes=2, vtl_boot="tlfs"))


def test_each_vtl_has_its_own_local_apic(run_guest):
    """VTL1 switches its APIC off (IA32_APIC_BASE); VTL0's stays on and takes its own IPI."""
    r = run_guest("vsm_apic", planes=2, backend="multivm")
    assert_done(r)
    s = dict(r.syncs())
    assert s[0x11] == 0xC00 and s[0x12] == 0         # VTL1: on, then off
    assert s[1] == 0xC00 and s[2] == 1               # VTL0: still on, its self-IPI arrived


def test_vina_notifies_the_higher_vtl_of_a_lower_vtls_interrupt(run_vsm):
    """HvRegisterVsmVina: an interrupt for VTL0 while VTL1 runs raises VTL1's VINA vector once
    and latches VinaAsserted; AutoReset clears it when VTL1 returns, then VTL0 takes its
    interrupt. Without VINA the lower VTL's interrupt just waits (test_vtl)."""
    r = run_vsm("vsm_vina", planes=2, vtl_boot="pykvmm")
    assert_done(r)
    s = dict(r.syncs())
    assert s[0x11] == 1 << REPS and s[0x12] == 1 and s[0x13] == 1
    assert s[0x14] == 0x360 and s[0x15] == INVALID_PARAMETER
    assert s[1] == 1 and s[0x16] == 0
    assert r.stats["vsm"]["vina_asserted"] == 1


def test_tlb_locked_holds_back_lower_vtl_flushes(run_vsm):
    """HvRegisterVsmVpSecureVtlConfig.TlbLocked: VTL0's flushes aimed at a VP whose VTL1 locked
    VTL0's TLB do not complete until VTL1 clears the bit or returns to VTL0; flushes of other
    VPs and VTL1's own flushes are not held; a VtlReturn releases the lock (the bit reads 0)."""
    r = run_vsm("vsm_tlb", planes=2, vcpus=2)
    assert_done(r)
    s = dict(r.syncs())
    assert s[0x11] == 1 << REPS and s[0x12] == 2                   # locked, reads back TlbLocked
    assert s[0x01] == 0 and s[0x21] == 0                           # own VP; VTL1's own TLB
    assert s[0x13] == 0                                            # held while locked
    assert s[0x14] == 1 << REPS and s[0x03] == 0                   # unlocked: the flush completed
    assert s[0x15] == 1                                            # the ListEx flush held too (an HV_VP_SET)
    assert s[0x04] == 1 << REPS and s[0x02] == 2                   # ... until VTL1 returned
    assert s[0x16] == 0                                            # the return released the lock
    assert r.stats["vsm"]["flushes_held"] >= 2
    assert r.stats["vsm"]["flushes_suspended"] >= 1                # re-issued through the page's stub


INVALID_VP_STATE = 0x15
VP1_LSTAR, NEW_LSTAR = 0x11110000, 0x22220000


def test_registers_of_another_vp(run_vsm):
    """HvCallGet/SetVpRegisters and HvCallTranslateVirtualAddress with another VP's index:
    a VTL reaches its own and lower VTLs of any VP while that VP does not execute with those
    registers (INVALID_VP_STATE while it does), never a higher VTL (ACCESS_DENIED), never a VP
    that does not exist (INVALID_VP_INDEX)."""
    r = run_vsm("vsm_remote", planes=2, vcpus=2)
    assert_done(r)
    s = dict(r.syncs())
    assert s[0x01] == 1 << REPS and s[0x03] == VP1_LSTAR            # VTL0 reads VTL0 of the parked VP1
    assert s[0x04] == ACCESS_DENIED and s[0x05] == INVALID_VP_INDEX
    assert s[0x11] == 1 << REPS and s[0x12] == VP1_LSTAR            # VTL1 reads VP1's VTL0 ...
    assert s[0x13] == 1 << REPS and s[0x02] == NEW_LSTAR            # ... and sets it: VP1's VTL0 sees it
    assert s[0x14] == INVALID_VP_STATE and s[0x15] == INVALID_VP_STATE   # VP1 runs VTL1 (and the shared set)
    assert s[0x16] == 0 and s[0x17] == 0                            # a translation through VP1's VTL0
    assert s[0x18] == 0x301                                         # VP1's VsmVpStatus: VTL1 active
    assert s[0x06] == INVALID_VP_STATE                              # VP1 runs VTL0 now
    assert r.stats["vsm"]["remote_vp_accesses"] >= 7


FS0, FS1 = 0x10000F00, 0x20000F00


def test_per_vtl_state_and_the_shared_reference_time(run_vsm):
    """TPR (CR8), FS.base and the VP assist page are each VTL's own; each VTL's reference TSC
    page shows the same partition time, and rdtsc the same TSC; each VTL's LAPIC timer interrupts that VTL, and a
    lower VTL's timer waits while a higher VTL runs; HvCallSendSyntheticClusterIpiEx reaches
    a lower VTL, never a higher one."""
    start = time.monotonic()
    r = run_vsm("vsm_state", planes=2)
    wall = time.monotonic() - start
    assert_done(r)
    s = dict(r.syncs())
    assert (s[0x11], s[0x12], s[0x13]) == (9, FS1, abi.VTL_ENTRY_VTL_CALL)      # VTL1's own
    assert s[0x14] == 1                                                      # VTL0's assist page | enable
    assert (s[0x01], s[0x02], s[0x03]) == (3, FS0, 0)                        # VTL0's, untouched
    assert s[0x04] == 1 and s[0x09] == 1                 # t0 <= t1 <= t2, in reference time and TSC
    assert 0 < s[0x05] < wall * 1e7                 # the partition's time runs with the host's
    assert s[0x15] == 1 and s[0x16] == 0 and s[0x06] == 1                    # LAPIC timers
    assert s[0x17] == 0 and s[0x07] == 1 and s[0x08] == ACCESS_DENIED        # SendIpiEx down, not up


A, B, C, D, E = 0xA1A1, 0xB2B2, 0xC3C3, 0xD4D4, 0xE5E5


def test_overlay_pages_are_per_vtl_and_give_the_ram_back(run_vsm):
    """A VTL's SynIC message page and hypercall page cover the guest page for that VTL only
    (the other VTL keeps seeing and changing its RAM there, never the overlay nor the secure
    intercept messages in it, and the hypervisor on its behalf neither reads nor writes the
    overlay: its hypercall input and output are its RAM); when the overlay goes, the RAM is back
    as the other VTL left it."""
    r = run_vsm("vsm_overlay", planes=2)
    assert_done(r)
    s = dict(r.syncs())
    assert s[0x11] == 0 and s[0x01] == A and s[0x02] == 0             # VTL1's fresh overlay; VTL0's RAM
    assert s[0x16] == 0                         # VTL0's hypercall output went to its RAM, not the overlay
    assert s[0x12] == 0x80000001 and s[0x03] == A                     # the message is VTL1's alone
    assert s[0x13] == A and (s[0x04], s[0x05], s[0x06]) == (A, E, 0)  # the RAM back, with VTL0's write
    assert s[0x14] == 0xE6 and s[0x07] == C and s[0x15] == C          # the hypercall page too
    assert r.stats["vsm"]["overlays_restored"] >= 2
