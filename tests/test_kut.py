"""kvm-unit-tests, unmodified, booted by pykvmm's multiboot loader on the real /dev/kvm.

The suite is built once per test run (fixture kut_suite). Each test asserts what the guest
itself reported: its exit code through isa-debug-exit and its SUMMARY line on the UART.
"""

import pytest

from pykvmm.vmm.machine import ExitStatus


def serial(result) -> list[str]:
    return [text for vcpu, _, text in result.console if vcpu < 0]


def assert_kut_pass(result, summary: str) -> None:
    out = serial(result)
    assert result.exit_code == 0 and result.status == ExitStatus.DONE, \
        f"{result.status.name} exit_code={result.exit_code} crash={result.crash and result.crash.reason}\n" \
        + "\n".join(out[-20:])
    assert f"SUMMARY: {summary}" in out
    assert not any(line.startswith("FAIL") for line in out)


def test_setjmp(run_kut):
    r = run_kut("setjmp")
    assert_kut_pass(r, "10 tests")
    assert [line for line in serial(r) if line.startswith("PASS")][-1] == "PASS: actual 9 == expected 9"


@pytest.mark.parametrize("vcpus", [2, 3])
def test_smptest_starts_aps_by_init_sipi(run_kut, vcpus):
    r = run_kut("smptest", vcpus=vcpus)
    assert_kut_pass(r, "1 tests")
    out = serial(r)
    assert f"found {vcpus} cpus" in out
    assert {f"ipi called, cpu {i}" for i in range(vcpus)} <= set(out)


def test_idt_test(run_kut):
    assert_kut_pass(run_kut("idt_test"), "4 tests")


def test_planes_are_invisible_to_kut(run_kut):
    r = run_kut("smptest", vcpus=2, planes=2)
    assert_kut_pass(r, "1 tests")
    assert r.switches == {}


def test_initrd_environment_overrides_fw_cfg(run_kut, tmp_path):
    # lib/x86/fwcfg.c takes NR_CPUS from the environment module (QEMU's -initrd) over fw_cfg.
    env = tmp_path / "env"
    env.write_text("NR_CPUS=1\n")
    r = run_kut("smptest", vcpus=2, initrd=str(env), timeout=10)
    assert "smp: waiting for 0 APs" in serial(r)
    r = run_kut("smptest", vcpus=2)
    assert "smp: waiting for 1 APs" in serial(r)
