"""The exit fast path (pykvmm/fastexit.py): its C loop answers PM timer reads, absent ports and
pci-testdev's test writes without Python. Real guests (guest/fastpath, kvm-unit-tests' vmexit)
run with it on and off; the pure parts (the clock formula, the absent-port marks, the build's
failure reasons) are checked alone."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import LAST_RESORT, guest_image
from pykvmm import fastexit
from pykvmm.vmm import abi, events as ev
from pykvmm.vmm.devices.acpi_pm import PM_BASE, PM_TIMER_HZ, PM_TIMER_MASK, PM_TMR, AcpiPm
from pykvmm.vmm.devices.bus import ABSENT_READ, ABSENT_WRITE, PortBus, PortDevice
from pykvmm.vmm.machine import ExitStatus, Machine, MachineConfig

N = 200
PORTIO_NO_EVENTFD, MMIO_NO_EVENTFD = 3, 0      # pci_testdev.tests indices
RATE_MODE = 1 << 32                             # guest/fastpath's mode byte


@pytest.fixture
def fast_path(kvm_available):
    on, why = fastexit.status()
    if not on:
        pytest.skip(f"the exit fast path is off: {why}")


def run_fastpath(arg: int, on_null=None, **config):
    """guest/fastpath -> (RunResult, the machine's vCPU 0 thread, pci-testdev's counts)."""
    config.setdefault("quiet", True)
    with Machine(guest_image("fastpath"), MachineConfig(arg=arg, **config)) as m:
        if on_null is not None:
            m.threads[0].set_port_handler(abi.PORT_NULL, on_null)
        r = m.run(LAST_RESORT)
        counts = [t.count for t in m.platform.pci_testdev.tests]
        return r, m.threads[0], counts


def test_fast_path_answers_its_exits_as_python_does(fast_path):
    fast, t_fast, counts_fast = run_fastpath(N)
    slow, t_slow, counts_slow = run_fastpath(N, fast_path=False)
    for r in (fast, slow):
        assert r.status == ExitStatus.DONE, (r.status, r.failure, r.crash and r.crash.reason)
    # N+1 PM timer reads, the absent port's reads and writes but its first of each (Python
    # answers and warns), 2N port writes and N MMIO writes to pci-testdev
    assert fast.stats["fast_exits"] == (N + 1) + 2 * (N - 1) + 2 * N + N
    assert slow.stats["fast_exits"] == 0
    # the guest made the same exits; kicks (the hang check's, not the guest's) aside
    assert fast.exits - t_fast.kicks == slow.exits - t_slow.kicks
    for counts in (counts_fast, counts_slow):
        assert counts[PORTIO_NO_EVENTFD] == N and counts[MMIO_NO_EVENTFD] == N
    unhandled = "vcpu0/plane0: read of unhandled port 0x1234 returned all ones"
    assert unhandled in fast.stats["warnings"] and unhandled in slow.stats["warnings"]


@pytest.mark.parametrize("on", [True, False], ids=["fast", "python"])
def test_pm_timer_counts_at_its_rate_against_the_host_clock(kvm_available, request, on):
    if on:
        request.getfixturevalue("fast_path")       # skips, with the reason, where it is off
    seen = []       # (host ns at the guest's `out`, the PM timer value it carries)

    def on_null(ex):
        seen.append((time.monotonic_ns(), int.from_bytes(ex.data, "little")))

    r, _, _ = run_fastpath(RATE_MODE, on_null=on_null, fast_path=on)
    assert r.status == ExitStatus.DONE, (r.status, r.failure)
    assert len(seen) == 2
    (t0, v0), (t1, v1) = seen
    ticks = (v1 - v0) & PM_TIMER_MASK
    rate = ticks / ((t1 - t0) / 1e9)
    # 0.5 s of ticks; the host's time of each value comes one exit later (tens of us here,
    # more on a loaded or nested host): 10% leaves room for a descheduled vCPU thread
    assert 0.9 * PM_TIMER_HZ < rate < 1.1 * PM_TIMER_HZ, rate
    assert (r.stats["fast_exits"] > 1000) == on


def test_tracing_sees_every_exit(fast_path):
    events = []
    r, t, _ = run_fastpath(N, trace=events.append)
    assert r.status == ExitStatus.DONE
    assert r.stats["fast_exits"] == 0
    exits = [e for e in events if e.kind == ev.EXIT]
    assert len(exits) == r.exits
    pm_reads = [e for e in exits if e.details.get("exit") == "IoIn" and e.details.get("port") == PM_BASE + PM_TMR]
    assert len(pm_reads) == N + 1


def test_off_with_planes_and_when_configured(kvm_available):
    with Machine(guest_image("hello"), MachineConfig(planes=2, quiet=True)) as m:
        assert m.fast_table is None and m.fast_path_off == "off with more than one plane"
    with Machine(guest_image("hello"), MachineConfig(fast_path=False, quiet=True)) as m:
        assert m.fast_table is None and "configuration" in m.fast_path_off


# ---- plane switches in C (fastexit.FastSwitch: vmpl's VtlCall/VtlReturn) -------------------------

def run_vmpl(guest: str, arg: int = 0, **config):
    """(RunResult, vCPU 0's thread, the faults injected) of ``guest`` on 2 planes under vmpl."""
    with Machine(guest_image(guest), MachineConfig(planes=2, personality="vmpl", arg=arg, quiet=True,
                                                   **config)) as m:
        r = m.run(LAST_RESORT)
        return r, m.threads[0], list(m.faults)


@pytest.mark.parametrize("guest", ["vtl_roundtrip", "vtl_vmpl", "vtl_bad"])
def test_vmpl_switches_in_c_as_in_python(fast_path, guest):
    """The same run with the switches made in C and in Python: the same results, faults (vtl_bad's
    malformed calls go to Python, which injects #UD at the same RIP) and counts."""
    fast, t_fast, faults_fast = run_vmpl(guest, 300)
    slow, t_slow, faults_slow = run_vmpl(guest, 300, fast_path=False)
    assert slow.stats["fast_exits"] == 0
    assert fast.stats["fast_exits"] == 2 * fast.switches[(1, 0)] > 0      # every switch in C
    for key in ("status", "switches", "entry_reasons", "hypercalls", "ucall_counts"):
        assert getattr(fast, key) == getattr(slow, key), key
    assert fast.stats["ud_reasons"] == slow.stats["ud_reasons"]
    assert faults_fast == faults_slow
    assert fast.exits - t_fast.kicks == slow.exits - t_slow.kicks
    assert t_fast.plane == t_slow.plane and t_fast.suspended == t_slow.suspended


def test_vmpl_switch_loop_is_kicked_out(fast_path):
    """Kicks reach a vCPU whose C loop keeps switching planes (every plane's immediate_exit is
    set): an interrupted run of endless round trips stops, with the counts of what it did."""
    with Machine(guest_image("vtl_roundtrip"), MachineConfig(planes=2, personality="vmpl", arg=1 << 40,
                                                             quiet=True)) as m:
        t = m.threads[0]

        def interrupt_once_switching():
            deadline = time.monotonic() + LAST_RESORT
            while time.monotonic() < deadline:
                fast = t._fast_switch
                if fast is not None and fast.switched > 100:
                    break
                time.sleep(0.001)
            m.interrupt()

        watcher = threading.Thread(target=interrupt_once_switching)
        watcher.start()
        r = m.run(LAST_RESORT)
        watcher.join()
    assert r.status == ExitStatus.INTERRUPTED
    calls, returns = r.switches[(0, 1)], r.switches.get((1, 0), 0)
    assert calls > 100 and calls - returns in (0, 1)
    assert r.hypercalls == {"HvCallVtlCall": calls, "HvCallVtlReturn": returns}
    assert r.entry_reasons == {"call": calls, "return": returns}
    assert t.suspended == ([0] if calls > returns else []) and t.plane == calls - returns


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(fastexit.ENV_SWITCH, "0")
    assert fastexit.status() == (False, f"turned off by {fastexit.ENV_SWITCH}=0")
    assert fastexit.load() is None


def test_build_failures_give_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(fastexit.Unavailable, match="no C compiler"):
        fastexit.build(tmp_path / "cache")
    (tmp_path / "file").write_text("")
    with pytest.raises(fastexit.Unavailable, match="cannot write its cache folder"):
        fastexit.build(tmp_path / "file" / "cache")


def test_clock_formula_is_acpi_pm_timer(fast_path):
    # One definition: the device hands its epoch, rate and mask to the table; the C formula
    # must give what AcpiPm.timer() gives at the same instant, also past 85 minutes (where
    # elapsed ns * rate overflows 64 bits) and across the 24-bit wrap.
    table = fastexit.FastTable(fastexit.load())
    pm = AcpiPm(on_sleep=None)
    assert pm.attach_fast_path(table)
    epoch = pm._epoch
    for elapsed in (0, 1, 279, 999_999_999, 1_000_000_000, 4_686_000_000, 85 * 60 * 10**9,
                    86 * 60 * 10**9 + 123_456_789, 10 * 86400 * 10**9 + 7):
        pm.clock = lambda: epoch + elapsed
        assert table.clock_value(pm, epoch + elapsed) == pm.timer(), elapsed
    assert not AcpiPm(on_sleep=None, clock=lambda: 0).attach_fast_path(table)   # only the host's clock


def test_port_bus_absent_marks():
    bus = PortBus()
    bus.mark_absent(0x1234, ABSENT_READ)            # no fast path: nothing to mark
    bus.absent = memoryview(bytearray(65536))
    bus.mark_absent(0x1234, ABSENT_READ)
    bus.mark_absent(0x1234, ABSENT_WRITE)
    assert bus.absent[0x1234] == ABSENT_READ | ABSENT_WRITE
    bus.unmark_absent(0x1234, ABSENT_WRITE)         # a port handler for writes came
    assert bus.absent[0x1234] == ABSENT_READ
    bus.register(0x1230, 8, PortDevice())           # a device claims it
    assert bus.absent[0x1234] == 0
    bus.mark_absent(0x1234, ABSENT_READ)            # a mark that lost the race with register()
    assert bus.absent[0x1234] == 0


def test_fast_table_rules_and_their_limit(fast_path):
    table = fastexit.FastTable(fastexit.load())
    for i in range(fastexit.RULES):
        table.set_clock(i, 0x600 + i, 4, 0, PM_TIMER_HZ, PM_TIMER_MASK)
    with pytest.raises(ValueError, match="holds"):
        table.set_clock("one more", 0x700, 4, 0, 1, 1)
    table.clear(0)
    table.set_clock("one more", 0x700, 4, 0, 1, 1)  # the freed slot
    assert table.table.rules[0].addr == 0x700 and table.table.rules[0].kind == fastexit.RULE_CLOCK_READ
