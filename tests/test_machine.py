"""The foundation guests on the real /dev/kvm: results come from the guest's own reports."""

import pytest

from pykvmm.vmm import abi
from pykvmm.vmm.machine import ExitStatus

from conftest import assert_done


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_hello_reports_from_every_vcpu(run_guest, vcpus):
    r = run_guest("hello", vcpus=vcpus)
    assert_done(r)
    for v in range(vcpus):
        assert r.syncs(vcpu=v) == [(1, 42), (2, v)]
    assert r.prints().count("hello via ucall") == vcpus
    console = sorted(text for _, _, text in r.console if text.startswith("hello from"))
    assert console == sorted(f"hello from vCPU {v} plane 0" for v in range(vcpus))


def test_ipi_between_two_vcpus(run_guest):
    r = run_guest("ipi", vcpus=2)
    assert_done(r)
    assert r.syncs(vcpu=1) == [(1, 0x40)]
    assert r.syncs(vcpu=0) == [(1, 0)]


def test_assert_failure_carries_values_and_message(run_guest):
    r = run_guest("assert_fail")
    assert r.status == ExitStatus.ASSERT_FAILED
    assert r.failure.args[:2] == (1, 2)
    assert r.failure.message == "one is not two"
    assert r.failure.file.endswith("assert_fail.S") and r.failure.line > 0


def test_triple_fault_is_a_crash_with_state(run_guest):
    r = run_guest("fault")
    assert r.status == ExitStatus.CRASHED
    assert "triple fault" in r.crash.reason
    plane0 = r.crash.report.planes[0]
    assert plane0.regs["rax"] == 0xFA17 and plane0.regs["rbx"] == 0x1234
    from pykvmm.debug.disasm import insn_at
    assert insn_at(plane0.code, plane0.code_addr, plane0.regs["rip"]).text == "ud2"
    assert any("about to fault" in text for _, _, text in r.console)


def test_unhandled_exception_reported_by_guest_runtime(run_guest):
    r = run_guest("exception")
    assert r.status == ExitStatus.ASSERT_FAILED
    assert r.failure.message == "unhandled exception"
    assert r.failure.args[0] == 6                      # #UD
    assert abi.GUEST_LOAD_ADDR <= r.failure.args[1] < abi.GUEST_LOAD_ADDR + 0x10000


def test_hang_times_out_with_location(run_guest):
    r = run_guest("hang", timeout=0.5)
    assert r.status == ExitStatus.TIMEOUT
    [report] = r.timeout_reports
    assert report.planes[0].regs["rflags"] & (1 << 9) == 0   # it hangs with interrupts off
    from pykvmm.debug.disasm import insn_at
    ps = report.planes[0]
    assert insn_at(ps.code, ps.code_addr, ps.regs["rip"]).text.startswith("jmp")


def test_hypercall_dispatcher(run_guest):
    r = run_guest("hypercall")
    assert_done(r)
    assert r.syncs() == [(1, 1)]
    assert r.hypercalls.get("PykvmmNop") == 1
    assert r.hypercalls.get("hypercall 0x7777") == 1


def test_pio_loop_counts_exits(run_guest):
    r = run_guest("pio_loop", arg=500)
    assert_done(r)
    assert r.exits >= 500


@pytest.mark.parametrize("arg, line_text, values", [
    (1, "r12 != 5", (5, 5)), (2, "r12 < 5", (5, 5)), (3, "r12 lacks bit 1", (5, 6))])
def test_assert_macros_fail_with_operands_and_their_text(run_guest, arg, line_text, values):
    r = run_guest("assert_macros", arg=arg)
    assert r.status == ExitStatus.ASSERT_FAILED
    assert r.failure.message == line_text and tuple(r.failure.args[:2]) == values
    assert r.syncs() == []                              # it stopped at the failing assertion


def test_assert_macros_pass_when_true(run_guest):
    r = run_guest("assert_macros", arg=0)
    assert_done(r)
    assert r.syncs() == [(1, 3)]


def test_vcpu_threads_get_short_gil_turns_while_running(kvm_available):
    """While vCPU threads run, a thread woken by a kick waits at most VCPU_SWITCH_INTERVAL for
    the GIL (not CPython's 5 ms); the process's interval is restored after the run."""
    import sys

    from pykvmm.vmm.machine import VCPU_SWITCH_INTERVAL, Machine, MachineConfig
    from conftest import guest_image

    before = sys.getswitchinterval()
    seen = []
    with Machine(guest_image("pio_loop"), MachineConfig(arg=5, quiet=True)) as m:
        m.threads[0].set_port_handler(abi.PORT_NULL, lambda ex: seen.append(sys.getswitchinterval()))
        assert_done(m.run(60))
    assert seen and all(s <= VCPU_SWITCH_INTERVAL for s in seen)
    assert sys.getswitchinterval() == before


def test_guest_cpuid_offers_the_tsc_deadline_timer_kvm_emulates(kvm):
    """KVM_CAP_TSC_DEADLINE_TIMER: the guest's CPUID.1:ECX has TSC-deadline even where
    KVM_GET_SUPPORTED_CPUID leaves it out (mainline before 6.9), as QEMU does."""
    from pykvmm.uapi import constants as C
    from pykvmm.vmm.machine import Machine, MachineConfig
    from pykvmm.x86 import longmode

    from conftest import guest_image
    emulated = kvm.check_extension(C.KVM_CAP_TSC_DEADLINE_TIMER) > 0
    with Machine(guest_image("hello"), MachineConfig(quiet=True)) as m:
        cpuid = m.threads[0].planes_vcpu.cpuid
        ecx = next(cpuid.entries[i].ecx for i in range(cpuid.nent) if cpuid.entries[i].function == 1)
    assert bool(ecx & longmode.CPUID_1_ECX_TSC_DEADLINE) == emulated


def test_checked_ioctl_asks_again_after_a_signal(kvm, monkeypatch):
    """KVM_CREATE_VM (mm_take_all_locks) gives up with EINTR when a signal is pending, e.g. a
    profiler sampling the process: the checked ioctl asks again instead of failing the run.
    KVM_RUN's EINTR stays a kick (Vcpu.run, test_planes), and raw_ioctl returns it as it is."""
    import errno
    from pykvmm import kvm as kvm_module
    from pykvmm.uapi import IOCTLS, ffi

    real = kvm_module._ioctl
    interrupted = []

    def once_interrupted(fd, code, arg):
        if code == IOCTLS["KVM_CREATE_VM"].code and not interrupted:
            interrupted.append(code)
            ffi.errno = errno.EINTR
            return -1
        return real(fd, code, arg)

    monkeypatch.setattr(kvm_module, "_ioctl", once_interrupted)
    vm = kvm.create_vm()
    assert interrupted and vm.fd >= 0
    vm.close()
    interrupted.clear()
    assert kvm.raw_ioctl("KVM_CREATE_VM", 0) == -errno.EINTR
