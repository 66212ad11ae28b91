"""The Hyper-V personality (pykvmm/vmm/hyperv): real guests on /dev/kvm that discover and use
the TLFS enlightenments, and unit tests of the pure parts (flags, CPUID leaves)."""

import subprocess
import sys

import pytest

from conftest import assert_done, guest_image
from pykvmm.vmm import abi
from pykvmm.vmm.hyperv import discovery, tlfs as T
from pykvmm.vmm.hyperv.features import FLAGS, HvConfig, HvFlagError, parse_flags
from pykvmm.vmm.machine import Machine, MachineConfig
from pykvmm.x86 import apic


def everything():
    return HvConfig.everything()


# ---- flags and CPUID (pure) ----------------------------------------------------------------

def test_flags_accept_both_qemu_spellings_and_values():
    cfg = parse_flags(["hv_synic", "hv-vpindex", "hv-stimer=on", "hv_time", "hv_spinlocks=0x1fff",
                       "hv_vendor_id=pykvmm", "+hv_relaxed", "hv_relaxed=off"])
    assert cfg.flags == {"synic", "vpindex", "stimer", "time"}
    assert cfg.spinlocks == 0x1FFF and cfg.vendor_id == "pykvmm"
    cfg.check()


@pytest.mark.parametrize("bad, why", [("hv_bogus", "unknown Hyper-V flag"), ("synic", "not a Hyper-V flag"),
                                      ("hv_spinlocks", "needs a value"), ("hv_spinlocks=x", "not a number"),
                                      ("hv_vendor_id=0123456789abc", "longer than 12"),
                                      ("hv_synic=maybe", "use on or off")])
def test_flags_bad_input_is_a_clear_error(bad, why):
    with pytest.raises(HvFlagError, match=why):
        parse_flags([bad])


def test_flags_dependencies():
    with pytest.raises(HvFlagError, match="hv_stimer needs hv_synic"):
        parse_flags(["hv_stimer", "hv_time", "hv_vpindex"]).check()
    everything().check()


def test_cpuid_leaves_follow_the_flags_exactly():
    none = discovery.leaves(HvConfig(), 2)
    assert none[T.CPUID_FEATURES] == (T.ACCESS_HYPERCALL_MSRS, T.ACCESS_PARTITION_ID, 0, 0)
    assert none[T.CPUID_ENLIGHTENMENT_INFO] == (0, T.SPINLOCK_NEVER_NOTIFY, 0, 0)
    synic = discovery.leaves(parse_flags(["hv_vpindex", "hv_synic"]), 2)
    a, b, _, _ = synic[T.CPUID_FEATURES]
    assert a == T.ACCESS_HYPERCALL_MSRS | T.ACCESS_VP_INDEX | T.ACCESS_SYNIC_REGS
    assert b == T.ACCESS_PARTITION_ID | T.POST_MESSAGES | T.SIGNAL_EVENTS
    full = discovery.leaves(everything(), 4)
    assert full[T.CPUID_VENDOR][0] == T.CPUID_LAST
    assert full[T.CPUID_INTERFACE][0] == T.INTERFACE_HV1
    assert full[T.CPUID_IMPLEMENT_LIMITS][:2] == (4, 4)
    assert sorted(full) == list(range(0x40000000, 0x4000000B))


# ---- guests ------------------------------------------------------------------------------------

def run(name, *, hyperv=None, timeout=30.0, hook=None, **config):
    config.setdefault("quiet", True)
    with Machine(guest_image(name), MachineConfig(hyperv=hyperv, **config)) as m:
        if hook:
            hook(m)
        return m.run(timeout), m


def test_msrs_reserved_bits_gp_and_values(kvm_available):
    r, m = run("hv_msrs", hyperv=everything())
    assert_done(r)
    syncs = dict((k, v) for k, v in r.syncs() if k >= 0x20)
    rows = syncs[0x30]
    assert rows > 40
    # Every expected #GP was the VMM's decision (none from KVM): the guest checked each row.
    assert r.stats["hyperv"]["gp_injected"] == 18
    # CPUID as the guest saw it = what discovery built.
    seen = [v for k, v in r.syncs() if 0x10 <= k < 0x20]
    want = discovery.leaves(everything(), 1)
    assert seen == [x for leaf in range(0x40000000, 0x4000000B) for x in want[leaf]]
    # The TSC page and TIME_REF_COUNT agree: the MSR read comes after the page read, within 50 ms.
    assert 0 <= syncs[0x20] < 500_000
    assert syncs[0x40] == 0x42 and syncs[0x41] == 1     # hv_vapic ICR and EOI onto the x2APIC


def test_without_hyperv_the_synthetic_msrs_do_not_exist(kvm_available):
    r, _ = run("hv_msrs")
    assert r.failure is not None and r.failure.args[:2] == (13, 0)   # row 0: KVM's own #GP


def test_hypercall_statuses_rep_continuation_and_xmm(kvm_available):
    sent = []

    def hook(m):
        def interrupt_at_first_continuation(call, next_rep):
            if not sent:
                sent.append(next_rep)
                m.pvm.planes[0].signal_msi(*apic.msi_message(0, 0x41))
        m.hyperv.on_continuation = interrupt_at_first_continuation

    r, m = run("hv_hcall", hyperv=everything(), hook=hook)
    assert_done(r)
    assert sent == [16]
    syncs = dict(r.syncs())
    assert syncs[3] == 16          # the interrupt ran after rep 16 was written, before rep 17
    assert syncs[1] == 27
    hv = r.stats["hyperv"]
    assert hv["continuations"] == 2 and hv["ud_injected"] == 1 and hv["tlb_flushes"] >= 2


def test_cli_hyperv_flag(kvm_available):
    out = subprocess.run([sys.executable, "-m", "pykvmm", "run", "hv_msrs", "--hyperv", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hyperv:" in out.stdout + out.stderr


def test_echo_code_is_outside_hyper_v_range():
    assert abi.HVCALL_PYKVMM_ECHO >= 0x8000 and set(FLAGS) >= {"synic", "stimer", "time", "vapic"}


def test_synic_and_timers_are_per_vtl(kvm_available):
    r, _ = run("hv_synic_vtl", hyperv=everything(), planes=2, personality="vtl")
    assert_done(r)
    s = dict(r.syncs())
    assert s[1] == 0            # PostMessage to VTL1's connection
    assert s[2] == 0            # ... left VTL0's own SINT2 slot empty
    assert s[3] == 1            # ... and reached VTL1's handler (preempting VTL0)
    assert s[4] == 1            # VTL0's own connection reaches VTL0
    assert s[5] == 0            # VTL0's SIEF page untouched by VTL1's event
    assert s[6] == 0x11         # VTL1's flag 0x23 set, its auto-EOI SINT3 handler ran once
    assert s[7] >= 20 and s[8] >= 20 and s[9] == 0   # both VTLs' timers, each with its own index
    # VTL1's timer preempted VTL0; how many of its expirations each needed an entry of their
    # own depends on the host's speed (4 of 20+ under nested KVM: several taken in one entry)
    assert r.stats["preemptions"] >= 1


def test_stimer_direct_one_shot_auto_enable_and_disable_rules_and_auto_eoi(kvm_available):
    r, _ = run("hv_stimer", hyperv=everything())
    assert_done(r)
    s = dict(r.syncs())
    assert s[1] == 0 and s[2] >= 6          # direct one-shot disabled itself; direct periodic ran
    assert s[3] == 1 and s[4] == 1          # armed in the past: fired at once, with its COUNT
    assert s[5] == 0 and s[6] == 0          # COUNT = 0, SINTx = 0: not enabled
    assert s[7] == 1                        # AutoEnable by the COUNT write
    assert s[8] == 2                        # auto-EOI: the second message, re-asserted by EOM while
                                            # the first was in service, was taken
    # a periodic timer 10 periods behind: one that is not lazy delivers every expiration it
    # missed, half a period apart at the least (never back to back); a lazy one skips to the
    # next point of its grid
    assert s[9] == 0 and s[10] >= 100000 // 2
    assert s[11] >= 1 and s[12] == 0


def test_stimer_direct_mode_needs_its_flag(kvm_available):
    cfg = parse_flags(["hv_vpindex", "hv_synic", "hv_time", "hv_stimer"])
    r, m = run("hv_stimer", hyperv=cfg)
    assert r.failure is not None and "wrmsr faulted" in r.failure.message
    assert any("needs hv_stimer_direct" in g for g in m.hyperv.gp_reasons)
