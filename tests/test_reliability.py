"""Faults, signals and resource hygiene: the VMM stops cleanly, says what happened and leaves
nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pykvmm.planes import open_planes_vm
from pykvmm.vmm import abi
from pykvmm.vmm.machine import ExitStatus, Machine, MachineConfig

from conftest import guest_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_triple_fault_in_vtl1_while_vtl0_waits(run_guest):
    r = run_guest("vtl_crash", planes=2, personality="vtl")
    assert r.status == ExitStatus.CRASHED
    assert r.crash.plane == 1 and "triple fault" in r.crash.reason
    report = r.crash.report
    assert report.suspended == [0]                      # VTL0 was waiting in its VtlCall
    assert report.planes[1].regs["r12"] == 0x7777
    assert set(report.planes) == {0, 1}
    from pykvmm.debug.disasm import insn_at
    p1 = report.planes[1]
    assert insn_at(p1.code, p1.code_addr, p1.regs["rip"]).text == "ud2"


def test_crash_leaves_no_threads_or_fds(kvm_available):
    before_fds, before_threads = open_fds(), threading.active_count()
    for _ in range(3):
        with Machine(guest_image("fault"), MachineConfig(vcpus=2, planes=2, quiet=True)) as m:
            assert m.run(10).status == ExitStatus.CRASHED
    assert threading.active_count() == before_threads
    assert open_fds() == before_fds


def test_handler_exception_stops_every_vcpu_with_a_dump(kvm_available, monkeypatch):
    """A bug in a pykvmm exit handler: crash status, state dump, every thread stopped."""
    before_fds, before_threads = open_fds(), threading.active_count()
    with Machine(guest_image("hello"), MachineConfig(vcpus=2, quiet=True)) as m:
        def broken(ex):
            raise RuntimeError("injected handler bug")
        t = m.threads[1]
        t.set_port_handler(abi.PORT_UCALL, broken)       # vCPU 1's ucall port
        r = m.run(10)
    assert r.status == ExitStatus.CRASHED
    assert r.crash.vcpu == 1 and "injected handler bug" in r.crash.reason
    assert r.crash.report is not None and r.crash.report.planes[0].regs
    assert threading.active_count() == before_threads
    assert open_fds() == before_fds


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_a_running_guest(kvm_available, sig):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "pykvmm", "run", "hang", "--vcpus", "2"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the guest runs once both vCPU threads exist (import and start-up take seconds on a loaded host)
    deadline = time.monotonic() + 60
    while len(os.listdir(f"/proc/{p.pid}/task")) < 3 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(sig)
    out, err = p.communicate(timeout=20)
    assert p.returncode == ExitStatus.INTERRUPTED, err
    assert "interrupted" in err and "Traceback" not in err
    assert "RIP=" in err


@pytest.mark.slow
def test_create_destroy_1000_planed_vms(kvm):
    """1,000 two-plane VMs (each plane a KVM VM with an irqchip and a vCPU): fds and RSS
    come back to where they started."""
    import mmap
    from pykvmm.uapi import ffi

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    mem = mmap.mmap(-1, 2 << 20)
    buf = ffi.from_buffer(mem)
    hva = int(ffi.cast("uintptr_t", buf))

    def cycle():
        with open_planes_vm(kvm, "multivm") as vm:
            vm.set_user_memory_region(0, 0, 2 << 20, hva)
            vm.create_irqchip()
            cpu = vm.create_vcpu(0)
            vm.create_plane(1).create_vcpu_plane(cpu)

    for _ in range(20):      # warm up allocator pools
        cycle()
    fds, rss = open_fds(), rss_kib()
    t0 = time.monotonic()
    for _ in range(1000):
        cycle()
    elapsed = time.monotonic() - t0
    assert open_fds() == fds
    grown = rss_kib() - rss
    print(f"1000 two-plane VMs in {elapsed:.1f} s; RSS {rss} KiB -> {rss + grown} KiB")
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 1000 VMs"
