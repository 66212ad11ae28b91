"""Selftest-style fixtures: real /dev/kvm, skips only for a missing host feature.

PYKVMM_REQUIRE=kvm,native,apic-groups,... turns the skip for that feature into a failure
(for hosts that must have it), like the kernel selftests' TEST_REQUIRE run in CI.
"""

from __future__ import annotations

import os
import struct

import pytest

from pykvmm.kvm import DEFAULT_KVM_DEVICE, Kvm, KvmError
from pykvmm.vmm import abi, loader
from pykvmm.vmm.machine import Machine, MachineConfig

# The run timeout of a guest expected to finish, and the limit of waits for what must happen:
# only a test that already fails meets it. Generous: the suite runs ~10x slower under nested
# KVM in QEMU TCG (scripts/nested-kvm.sh), and a loaded machine can be slower still.
LAST_RESORT = 300.0

REQUIRED = {f.strip() for f in os.environ.get("PYKVMM_REQUIRE", "").split(",") if f.strip()}


def require(feature: str, available: bool, reason: str) -> None:
    """Skip with ``reason`` unless ``feature`` is listed in PYKVMM_REQUIRE (then fail)."""
    if available:
        return
    if feature in REQUIRED:
        pytest.fail(f"PYKVMM_REQUIRE={feature}: {reason}")
    pytest.skip(reason)


def pytest_runtest_logreport(report):
    """PYKVMM_FAILURE_LOG=FILE: append each failure's report to FILE as soon as it happens
    (scripts/nested-kvm.sh: a run hours long shows why a test failed while it goes on)."""
    path = os.environ.get("PYKVMM_FAILURE_LOG")
    if path and report.failed:
        import time
        with open(path, "a") as f:
            f.write(f"==== {time.strftime('%H:%M:%S')} {report.nodeid} ({report.when}, {report.duration:.1f} s)\n"
                    f"{report.longreprtext}\n{report.capstdout}{report.capstderr}\n")


def _kvm_status() -> tuple[bool, str]:
    try:
        Kvm(DEFAULT_KVM_DEVICE).close()
        return True, ""
    except KvmError as e:
        return False, f"host lacks usable KVM: {e}"


@pytest.fixture(scope="session")
def kvm_available():
    ok, why = _kvm_status()
    require("kvm", ok, why)
    return True


@pytest.fixture
def kvm(kvm_available):
    k = Kvm(DEFAULT_KVM_DEVICE)
    yield k
    k.close()


def _backend_probes():
    ok, _ = _kvm_status()
    if not ok:
        return {}
    from pykvmm.planes import probe_all
    with Kvm(DEFAULT_KVM_DEVICE) as k:
        return probe_all(k)


_PROBES = None


def backend_probe(name: str):
    global _PROBES
    if _PROBES is None:
        _PROBES = _backend_probes()
    return _PROBES.get(name)


@pytest.fixture(params=["native", "apic-groups", "multivm"])
def backend(request, kvm_available):
    """Each planes backend; those the host lacks skip with the probe's reason."""
    probe = backend_probe(request.param)
    require(request.param, probe is not None and probe.available,
            probe.reason if probe else "backend probe failed")
    return request.param


def guest_image(name: str) -> bytes:
    return loader.load_image(loader.bundled_guest(name))


@pytest.fixture
def run_guest(kvm_available):
    """run_guest("hello", vcpus=2, planes=2, backend=..., timeout=10) -> RunResult."""

    def run(name: str, timeout: float = LAST_RESORT, **config):
        config.setdefault("quiet", True)
        with Machine(guest_image(name), MachineConfig(**config)) as m:
            return m.run(timeout)

    return run


HV_FUZZ_ENTRY = 48      # guest/hv_fuzz.S: kind, a, b, c in, then the two results out (u64 each)


def run_hv_fuzz(table, pages=(), **config):
    """Run guest/hv_fuzz on ``table`` [(kind, a, b, c)] (``pages``: (gpa, bytes) written first)
    and return (RunResult, [(result0, result1) per entry])."""
    config.setdefault("quiet", True)
    with Machine(guest_image("hv_fuzz"), MachineConfig(**config)) as m:
        for gpa, data in pages:
            m.memory.write(gpa, data)
        base = abi.free_memory_start(1)
        m.memory.write(base, struct.pack("<Q", len(table))
                       + b"".join(struct.pack("<QQQQQQ", k, a, b, c, 0, 0) for k, a, b, c in table))
        result = m.run(60)
        out = [(m.memory.u64(base + 8 + HV_FUZZ_ENTRY * i + 32), m.memory.u64(base + 8 + HV_FUZZ_ENTRY * i + 40))
               for i in range(len(table))]
    return result, out


def assert_done(result) -> None:
    """The guest reported DONE on every vCPU; otherwise show what it said."""
    if result.ok:
        return
    detail = result.failure.describe() if result.failure else (result.crash.reason if result.crash else "")
    pytest.fail(f"guest did not finish: {result.status.name}: {detail}\nucalls: "
                + "\n".join(u.describe() for u in result.ucalls[-20:]))


def wait_for(condition, what: str, timeout: float = LAST_RESORT, poll: float = 0.01):
    """Poll ``condition`` until it returns something true (returned), or fail saying ``what``.

    Tests wait for conditions, never fixed times: the same test must pass on a machine 10x
    slower (pykvmm under nested KVM in QEMU TCG); the timeout is only a last resort."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def thread_states(pid: int) -> dict[str, str]:
    """Each named thread of process ``pid`` -> its scheduler state (R running, S sleeping, ...).
    pykvmm names its vCPU threads vcpu0, vcpu1, ...: one running guest code stays in R."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[name] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue                  # the thread ended meanwhile
    return out


@pytest.fixture(scope="session")
def kut_suite(tmp_path_factory):
    """kvm-unit-tests built once per test run in a scratch folder (x86/*.flat ready)."""
    from pykvmm.kut.build import SHARED_SUITE, build_suite, find_suite

    source = find_suite()
    require("kut", source is not None,
            f"kvm-unit-tests not found: KUT_DIR is unset and {SHARED_SUITE} does not exist")
    return build_suite(source, tmp_path_factory.mktemp("kut"))


@pytest.fixture
def run_kut(kvm_available, kut_suite):
    """run_kut("smptest", vcpus=2, cmdline="...") -> RunResult of x86/<name>.flat under pykvmm."""
    from pykvmm.vmm import boot

    def run(name: str, timeout: float = LAST_RESORT, cmdline: str = "", initrd: str | None = None, **config):
        config.setdefault("quiet", True)
        image = boot.open_guest(kut_suite / "x86" / f"{name}.flat", cmdline=cmdline, initrd=initrd)
        with Machine(image, MachineConfig(**config)) as m:
            return m.run(timeout)

    return run
