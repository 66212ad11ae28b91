"""The kvm-unit-tests runner: unittests.cfg parsing, QEMU options to pykvmm's, run_tests.sh
outcomes, reference parsing and the table (pure logic); and `pykvmm kut` on real tests."""

import pytest

from pykvmm.kut import config as C
from pykvmm.kut import runner as R
from test_cli import assert_clean_error, pykvmm

CFG = """
# comment
[smptest]
file = smptest.flat
smp = 2

[vmexit_ipi]
file = vmexit.flat
smp = 2
extra_params = -append 'ipi'
groups = vmexit

[xapic]
file = apic.flat
extra_params = -cpu qemu64,-x2apic,+tsc-deadline -machine pit=off
timeout = 60

[hyperv_synic]
file = hyperv_synic.flat
extra_params = -cpu kvm64,hv_vpindex,hv_synic -device hyperv-testdev
groups = hyperv

[pmu]
file = pmu.flat
check = /proc/sys/kernel/nmi_watchdog=0
accel = kvm
arch = i386
timeout = 90s
"""


def test_parse_config():
    tests = {t.name: t for t in C.parse_config(CFG)}
    assert list(tests) == ["smptest", "vmexit_ipi", "xapic", "hyperv_synic", "pmu"]
    assert tests["smptest"].smp == 2 and tests["smptest"].timeout is None
    assert tests["vmexit_ipi"].groups == ["vmexit"]
    assert tests["xapic"].timeout == 60 and tests["pmu"].timeout == 90 and tests["pmu"].timeout_text == "90s"
    assert tests["pmu"].check == ["/proc/sys/kernel/nmi_watchdog=0"] and tests["pmu"].accel == "kvm"


def test_parse_config_rejects_garbage():
    with pytest.raises(C.ConfigError, match="line 1"):
        C.parse_config("file = x.flat\n")


def test_plan_translates_qemu_options():
    tests = {t.name: t for t in C.parse_config(CFG)}
    plan = C.plan_run(tests["xapic"])
    assert plan.args() == ["--cpu", "qemu64,-x2apic,+tsc-deadline", "--mem", "128", "--no-pit"]
    assert C.plan_run(tests["vmexit_ipi"]).cmdline == "ipi"
    assert C.plan_run(tests["hyperv_synic"]).unsupported == []   # the Hyper-V personality has it
    e = C.TestEntry("x", extra_params="-m 2g -M q35,kernel-irqchip=split -overcommit cpu-pm=on")
    plan = C.plan_run(e)
    assert plan.mem_mib == 2048
    assert plan.unsupported == ["-machine q35", "-machine kernel-irqchip=split", "-overcommit cpu-pm=on"]


def test_pre_run_skips_as_run_tests_sh():
    tests = {t.name: t for t in C.parse_config(CFG)}
    assert R.pre_run_skip(tests["pmu"], False, False) == "(i386 only)"
    assert R.pre_run_skip(C.TestEntry("n", groups=["nodefault"]), False, False) == "(test marked as manual run only)"
    assert R.pre_run_skip(C.TestEntry("n", groups=["nodefault"]), False, True) is None
    assert R.pre_run_skip(C.TestEntry("c", check=["/nonexistent/x=Y"]), False, False) == "(/nonexistent/x not equal to Y)"


@pytest.mark.parametrize("rc,stdout,stderr,status,detail,ours", [
    (0, "x\nSUMMARY: 4 tests\n", "guest wrote 0x0 to isa-debug-exit", "PASS", "(4 tests)", False),
    (1, "SUMMARY: 4 tests, 1 unexpected failures\n", "guest wrote 0x1 to isa-debug-exit", "FAIL",
     "(4 tests, 1 unexpected failures)", False),
    (1, "SUMMARY: 2 tests, 2 skipped\n", "guest wrote 0x26 to isa-debug-exit", "SKIP", "(2 tests, 2 skipped)", False),
    (4, "", "pykvmm: guest timed out", "FAIL", "(timeout; duration=90s)", False),
    (3, "", "pykvmm: guest crashed on vCPU 0 plane 0: triple fault", "FAIL",
     "(guest crashed on vCPU 0 plane 0: triple fault)", False),
    (1, "", "Traceback (most recent call last):\n  ...\nKeyError: 3\n", "FAIL", "(pykvmm failure: KeyError: 3)", True),
    (-11, "", "", "FAIL", "(pykvmm failure: terminated on signal 11)", True),
])
def test_classify(rc, stdout, stderr, status, detail, ours):
    r = R.classify(C.TestEntry("t"), rc, stdout, stderr)
    assert (r.status, r.detail, r.pykvmm_failure) == (status, detail, ours)


def test_reference_parsing_and_table_mark_differences():
    ref = R.parse_reference("# header\n\x1b[32mPASS\x1b[0m smptest (1 tests)\nFAIL apic (timeout; duration=30)\n"
                            "SKIP pku  [QEMU aborted]\n")
    assert ref == {"smptest": ("PASS", "(1 tests)"), "apic": ("FAIL", "(timeout; duration=30)"),
                   "pku": ("SKIP", "[QEMU aborted]")}
    results = [R.TestResult("smptest", "PASS", "(1 tests)"), R.TestResult("apic", "PASS"),
               R.TestResult("pku", "SKIP")]
    text = R.table(results, ref, "qemu")
    lines = text.splitlines()
    assert lines[1].split() == ["smptest", "PASS", "PASS"]
    assert lines[2].split() == ["apic", "PASS", "FAIL", "*"]
    assert lines[-1] == "totals: pykvmm 2 PASS 0 FAIL 1 SKIP; qemu 1 PASS 1 FAIL 1 SKIP; 1 differ"
    assert R.summary_line(results) == "SUMMARY: 2 PASS, 0 FAIL, 1 SKIP"
    assert R.tap(results).splitlines()[2:] == ["ok 1 - smptest (1 tests)", "ok 2 - apic", "ok 3 - pku # SKIP "]


def test_cli_kut_runs_named_tests_and_compares(kut_suite, kvm_available, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("PASS smptest (1 tests)\nFAIL setjmp\n")
    res = pykvmm("kut", "--suite", str(kut_suite), "smptest", "setjmp", "cmpxchg8b", "--compare", str(ref),
                 timeout=300)
    out = res.stdout.splitlines()
    assert "PASS smptest (1 tests)" in out and "PASS setjmp (10 tests)" in out
    assert "SKIP cmpxchg8b (i386 only)" in out
    assert "SUMMARY: 2 PASS, 0 FAIL, 1 SKIP" in out
    assert any(line.split() == ["setjmp", "PASS", "FAIL", "*"] for line in out)
    assert res.returncode == 0, res.stderr


def test_cli_kut_tap_and_planes(kut_suite, kvm_available):
    res = pykvmm("kut", "--suite", str(kut_suite), "smptest3", "--planes", "2", "--tap", timeout=300)
    assert res.stdout.splitlines() == ["TAP version 13", "1..1", "ok 1 - smptest3 (1 tests)"], res.stdout


def test_cli_kut_bad_input_exit_2(tmp_path, kut_suite):
    assert_clean_error(pykvmm("kut", "--suite", str(tmp_path)), 2, "not a kvm-unit-tests folder")
    assert_clean_error(pykvmm("kut", "--suite", str(kut_suite), "no_such_test"), 2, "no such test")
