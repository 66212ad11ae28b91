"""Faults, signals and resource hygiene: the VMM stops cleanly, says what happened and leaves
nothing behind."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pykvmm.planes import open_planes_vm
from pykvmm.vmm import abi
from pykvmm.vmm.host import convention
from pykvmm.vmm.machine import ExitStatus, Machine, MachineConfig

from conftest import LAST_RESORT, guest_image, thread_states, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def open_fds() -> int:
    # Collected first: garbage of an earlier test (a VM nobody closed) closing its fds in the
    # middle of a test made a count drop by one (seen once in a full run).
    gc.collect()
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
            assert m.run(LAST_RESORT).status == ExitStatus.CRASHED
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
        r = m.run(LAST_RESORT)
    assert r.status == ExitStatus.CRASHED
    assert r.crash.vcpu == 1 and "injected handler bug" in r.crash.reason
    assert r.crash.report is not None and r.crash.report.planes[0].regs
    assert threading.active_count() == before_threads
    assert open_fds() == before_fds


def catches(pid: int, sig: int) -> bool:
    """The process has a handler installed for ``sig`` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(x.split()[1], 16) for x in f if x.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def start_run(*args):
    return subprocess.Popen([sys.executable, "-m", "pykvmm", "run", *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_a_running_guest(kvm_available, sig, tmp_path):
    """No --timeout: the main thread waits for the guest and must still see the signal (it did
    not, 3 runs of 3). Status 130, where each vCPU was, the summary and the trace."""
    trace = tmp_path / "t.jsonl"
    p = start_run("hang", "--vcpus", "2", "--trace", str(trace))
    wait_for(lambda: catches(p.pid, signal.SIGTERM) and "vcpu1" in thread_states(p.pid), "the vCPU threads")
    p.send_signal(sig)
    out, err = p.communicate(timeout=600)
    assert p.returncode == ExitStatus.INTERRUPTED, err
    assert "interrupted" in err and "Traceback" not in err
    assert "RIP=" in err and "--- interrupted after" in err
    from pykvmm.debug import trace as tr
    assert tr.load(str(trace))[-1] == {**tr.load(str(trace))[-1], "kind": "lifecycle", "what": "end",
                                       "status": "INTERRUPTED"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_machine_is_built(kvm_available, sig):
    """A signal before the run loop (building 64 vCPUs x 16 planes) gave "Aborted!" (1) or 143."""
    p = start_run("hello", "--vcpus", "64", "--planes", "16")
    wait_for(lambda: catches(p.pid, signal.SIGTERM), "pykvmm's handler (Python catches SIGINT itself from the start)")
    t0 = time.monotonic()
    p.send_signal(sig)
    out, err = p.communicate(timeout=600)
    print(f"signal during start-up: exit after {time.monotonic() - t0:.2f} s")
    assert p.returncode == ExitStatus.INTERRUPTED, err
    assert "interrupted" in err and "Traceback" not in err and "Aborted" not in err


def test_second_signal_forces_the_exit(kvm_available):
    p = start_run("hang", "--vcpus", "2")
    wait_for(lambda: catches(p.pid, signal.SIGTERM) and "vcpu1" in thread_states(p.pid), "the vCPU threads")
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    assert p.returncode == ExitStatus.INTERRUPTED, err
    assert "Traceback" not in err and "race condition" not in err


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


# ---- round 2: what an outside attack found (issue 15) ------------------------------------------

HOSTILE_CONSOLE, HOSTILE_SYNC, HOSTILE_PORTS, HOSTILE_ESCAPES, HOSTILE_OUTSIDE_RAM = 1, 2, 3, 4, 5
HOSTILE_CLI_HLT, HOSTILE_STI_HLT, HOSTILE_FAIL_ESCAPES = 6, 7, 8


def hostile(mode: int, count: int = 0) -> str:
    """--arg for guest/hostile.S: the mode and how many times (0: forever)."""
    return str(mode | count << 8)


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT, **kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "pykvmm", *args], capture_output=True, timeout=kw.pop("timeout", 600),
                          env=env, cwd=ROOT, **kw)


def test_console_history_is_bounded(run_guest):
    """Rule: nothing a guest repeats grows host memory. The console keeps its newest lines."""
    from pykvmm.vmm.console import CONSOLE_HISTORY_LINES
    n = CONSOLE_HISTORY_LINES + 200
    r = run_guest("hostile", arg=int(hostile(HOSTILE_CONSOLE, n)), timeout=600)
    assert r.ok
    assert len(r.console) == CONSOLE_HISTORY_LINES and r.console[-1][2] == "spam spam spam spam"
    assert r.stats["console_lines"] == n


def test_ucall_history_is_bounded_and_counted(run_guest):
    from pykvmm.vmm.machine import UCALL_HISTORY
    n = UCALL_HISTORY + 50
    r = run_guest("hostile", arg=int(hostile(HOSTILE_SYNC, n)), timeout=300)
    assert r.ok
    assert len(r.ucalls) == UCALL_HISTORY
    assert r.ucall_counts == {"SYNC": n, "DONE": 1}
    assert r.syncs()[-1] == (1, n)               # the newest are the ones kept


def test_every_port_warnings_are_summarised(run_guest):
    """OUT to every port: one warning per port was kept in a list searched under a lock (quadratic);
    now the summary shows a few and counts the rest."""
    from pykvmm.vmm.machine import WARNING_EXAMPLES
    r = run_guest("hostile", arg=int(hostile(HOSTILE_PORTS)), timeout=1800)
    assert r.ok
    warnings = r.stats["warnings"]
    assert len(warnings) == WARNING_EXAMPLES + 1
    assert warnings[0] == "vcpu0/plane0: write to unhandled port 0x0 ignored"
    more = re.fullmatch(r"\.\.\. and ([\d,]+) more like it", warnings[-1])
    # every port but pykvmm's own, the PC devices' (UART, fw_cfg, RTC, ACPI PM, pc-testdev,
    # isa-debug-exit, PCI configuration, pci-testdev's 256-port BAR: about 390) and the
    # in-kernel PIC's and PIT's
    assert more and 65_000 < int(more.group(1).replace(",", "")) + WARNING_EXAMPLES <= 65_536 - 5, warnings[-1]


def test_outside_ram_reads_ones_and_drops_writes(run_guest):
    r = run_guest("hostile", arg=int(hostile(HOSTILE_OUTSIDE_RAM)))
    assert r.ok, (r.status, r.crash and r.crash.reason)
    assert r.syncs() == [(1, 2**64 - 1), (2, 2**64 - 1)]     # read: all ones; written: dropped
    assert r.stats["outside_ram"] == "2 reads (all ones), 1 writes (dropped), first at 0x7fe00000"


def test_console_escapes_control_characters(kvm_available):
    res = cli("run", "hostile", "--arg", hostile(HOSTILE_ESCAPES))
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b]0;owned\\x07title set\n" in out
    assert "\\x1b[8mhidden\\x1b[0m text\n" in out
    assert "\\x0d--- done after 1.0 ms\n" in out                 # a fake summary cannot pose as one
    assert "byte \\xff end\n" in out
    raw = cli("run", "hostile", "--arg", hostile(HOSTILE_ESCAPES), "--raw-console")
    assert raw.returncode == 0 and b"\x1b]0;owned\x07title set\n" in raw.stdout and b"byte \xff end" in raw.stdout


def test_console_prints_any_byte_in_any_encoding(kvm_available):
    res = cli("run", "hostile", "--arg", hostile(HOSTILE_ESCAPES), env={"PYTHONIOENCODING": "latin-1"})
    assert res.returncode == 0, res.stderr
    assert b"byte \\xff end" in res.stdout and b"Traceback" not in res.stderr
    raw = cli("run", "hostile", "--arg", hostile(HOSTILE_ESCAPES), "--raw-console", env={"PYTHONIOENCODING": "ascii"})
    assert raw.returncode == 0 and b"byte \xff end" in raw.stdout, raw.stderr


def test_closed_stdout_ends_the_run_quietly(kvm_available):
    """`pykvmm run ... | head -1`: the reader leaves; the run ends with status 141 and says nothing."""
    p = subprocess.Popen([sys.executable, "-m", "pykvmm", "run", "hostile", "--arg", hostile(HOSTILE_CONSOLE)],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"spam spam spam spam\n"
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(600) == ExitStatus.STDOUT_CLOSED, err
    assert err == b""


FILLER = b"#" * 4096


def full_pipe():
    """(reader, writer fd) of a pipe shrunk to one page (F_SETPIPE_SZ) and already full of
    FILLER: whoever gets the writer is blocked from its first byte, however fast or slow the
    guest (the mainline KVM in QEMU TCG makes ~160 console exits a second)."""
    import fcntl
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)                          # F_SETPIPE_SZ
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, FILLER[filled % len(FILLER):])
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    assert filled == len(FILLER)
    return os.fdopen(r, "rb"), w


def blocked_run(*args, backlog: int | None = None, stderr_blocked: bool = True):
    """`pykvmm run ARGS` with stdout (and stderr) on full pipes nobody reads; ``backlog``: a
    smaller output backlog than CONSOLE_BACKLOG_MAX, so little output fills it. The pipes'
    readers are ``p.stdout``, ``p.stderr`` (FILLER first)."""
    start = "import sys, pykvmm.vmm.console as c, pykvmm.cli as cli; "
    if backlog is not None:
        start += f"c.CONSOLE_BACKLOG_MAX = {backlog}; "
    out_r, out_w = full_pipe()
    err_r, err_w = full_pipe() if stderr_blocked else (None, subprocess.PIPE)
    p = subprocess.Popen([sys.executable, "-c", start + "sys.argv[0] = 'pykvmm'; cli.main()", "run", *args],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=out_w, stderr=err_w)
    os.close(out_w)
    if stderr_blocked:
        os.close(err_w)
        p.stderr = err_r
    p.stdout = out_r
    return p


def test_timeout_holds_while_stdout_is_blocked(kvm_available):
    """Nobody reads stdout: the guest's console fills the pipe, the timeout still ends the run."""
    p = blocked_run("hostile", "--arg", hostile(HOSTILE_CONSOLE), "--timeout", "1", stderr_blocked=False)
    try:
        assert p.wait(600) == ExitStatus.TIMEOUT       # stdout never read
    finally:
        p.kill()
    err = p.stderr.read().decode()
    assert "timed out" in err and "while the output was blocked, still blocked at the end" in err


def exit_after_guest_started(p, what: str, signal_to_send=None) -> float:
    """Seconds from the vCPU thread's start to the exit of ``p`` (which nobody reads)."""
    wait_for(lambda: p.poll() is not None or "vcpu0" in thread_states(p.pid), "the vCPU thread")
    assert p.poll() is None, f"ended before its guest ran: {p.returncode}"
    t0 = time.monotonic()
    if signal_to_send is not None:
        p.send_signal(signal_to_send)
    try:
        p.wait(600)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"{what} did not end the run while stdout and stderr were blocked")
    return time.monotonic() - t0


@pytest.mark.parametrize("how", ["timeout", "signal"])
def test_blocked_stderr_holds_neither_timeout_nor_signal(kvm_available, how):
    """`--trace-exits` prints a line per exit on stderr; nobody reads stderr or stdout. The run
    still ends at its timeout (or at SIGINT): before, a vCPU thread waited in the write."""
    args = ["hostile", "--arg", hostile(HOSTILE_CONSOLE), "--trace-exits"]
    p = blocked_run(*args, *(["--timeout", "2"] if how == "timeout" else []))
    took = exit_after_guest_started(p, how, None if how == "timeout" else signal.SIGINT)
    print(f"{how}: exit {took:.1f} s after the guest started")
    assert p.returncode == (ExitStatus.TIMEOUT if how == "timeout" else ExitStatus.INTERRUPTED)
    # 2 s of timeout, the vCPUs' stop, and at most StdStreams.FINAL_DRAIN_LIMIT for the readers:
    # bounded whatever the terminal does (generous for a machine 10x slower)
    assert took < 60
    assert p.stderr.read(len(FILLER)) == FILLER         # nothing of pykvmm's fitted


def test_blocked_stderr_output_is_dropped_and_counted(kvm_available, tmp_path):
    """stderr blocked while the guest runs: what does not fit in the backlog is dropped and the
    summary says how much, once a reader comes back (here: when the trace is complete)."""
    trace = tmp_path / "t.jsonl"
    # a backlog smaller than any line: every write of the run is dropped, however few the
    # guest made (one exit in 2 s under nested KVM, the first --trace-exits line loads capstone)
    p = blocked_run("hostile", "--arg", hostile(HOSTILE_SYNC), "--quiet", "--trace-exits", "--timeout", "2",
                    "--trace", str(trace), backlog=64)

    def trace_complete():
        try:
            return '"what":"end"' in trace.read_text()[-300:]
        except FileNotFoundError:
            return False
    wait_for(trace_complete, "the trace's end event")
    err = p.stderr.read().decode()                      # the reader comes back: EOF at the exit
    assert p.wait(600) == ExitStatus.TIMEOUT, err[-2000:]
    assert "--- timeout after" in err, err[-2000:]
    dropped = re.search(r"stderr not shown: (\d+) bytes dropped while stderr was blocked", err)
    assert dropped and int(dropped.group(1)) > 0, err[-2000:]


def test_bounded_writer_never_waits_for_its_reader():
    """The writer under pykvmm run's stdout and stderr, on a pipe nobody reads."""
    from pykvmm.vmm.console import CONSOLE_BACKLOG_MAX, BoundedWriter, finish_writers
    r, w = os.pipe()
    try:
        writer = BoundedWriter(w)
        t0 = time.monotonic()
        chunk = b"x" * 999 + b"\n"
        total = 3 * CONSOLE_BACKLOG_MAX // len(chunk) * len(chunk)
        for _ in range(total // len(chunk)):
            writer.put_bytes(chunk)
        assert time.monotonic() - t0 < 30                # never blocked (a blocked write is forever)
        assert writer.dropped >= total - CONSOLE_BACKLOG_MAX - (1 << 20) and writer.dropped % len(chunk) == 0
        lost, = finish_writers([writer], time.monotonic() + 30, stall=0.2)
        assert lost > writer.dropped                     # what was queued and never taken, too
        os.set_blocking(r, False)
        got = os.read(r, 1 << 20)
        assert got and got == chunk * (len(got) // len(chunk)) + chunk[:len(got) % len(chunk)]
    finally:
        os.close(r)
        os.close(w)


def test_trace_streams_to_the_file_and_survives_sigkill(kvm_available, tmp_path):
    from pykvmm.debug import trace as tr
    path = tmp_path / "t.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "pykvmm", "run", "hostile", "--arg", hostile(HOSTILE_SYNC),
                          "--quiet", "--trace", str(path)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while (not path.exists() or path.stat().st_size < 4096) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    events = tr.load(str(path))
    assert events[0]["kind"] == "lifecycle" and any(e["kind"] == "ucall" for e in events)


def test_trace_write_failure_is_an_error(kvm_available, tmp_path):
    res = cli("run", "hello", "--trace", "/dev/full")
    assert res.returncode == ExitStatus.OUTPUT_FAILED, res.stderr
    assert b"could not write the trace to /dev/full: No space left on device" in res.stderr


def test_incomplete_trace_file_is_set_aside(kvm_available, tmp_path):
    """A trace file that hits a limit (RLIMIT_FSIZE here, ENOSPC alike) is renamed .incomplete."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    path = tmp_path / "t.jsonl"
    res = subprocess.run([sys.executable, "-m", "pykvmm", "run", "hostile", "--arg", hostile(HOSTILE_SYNC, 2000),
                          "--quiet", "--trace", str(path)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, preexec_fn=limit, timeout=600)
    assert res.returncode == ExitStatus.OUTPUT_FAILED, res.stderr
    assert b"File too large" in res.stderr and b"t.jsonl.incomplete" in res.stderr
    assert not path.exists() and (tmp_path / "t.jsonl.incomplete").stat().st_size > 0


@pytest.mark.slow
def test_host_memory_stays_flat_under_guest_spam(kvm_available, tmp_path):
    """RSS of `pykvmm run` while a guest prints, syncs and is traced without end (was 45 -> 260 MB
    printing for 20 s, 26 -> 93 MB syncing): the peak stays near the start."""
    def peak_rss_mib(args, seconds):
        p = subprocess.Popen([sys.executable, "-m", "pykvmm", "run", "hostile", *args, "--quiet"], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        samples = []
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                with open(f"/proc/{p.pid}/status") as f:
                    samples.append(next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024)
                time.sleep(0.5)
        finally:
            p.kill()
            p.wait()
        return samples[2], max(samples)

    for args in (["--arg", hostile(HOSTILE_CONSOLE)], ["--arg", hostile(HOSTILE_SYNC)],
                 ["--arg", hostile(HOSTILE_SYNC), "--trace", str(tmp_path / "t.jsonl")]):
        early, peak = peak_rss_mib(args, 20)
        print(f"{' '.join(args)}: RSS {early:.0f} MiB after 1 s, peak {peak:.0f} MiB over 20 s")
        assert peak - early < 16, (args, early, peak)


@pytest.mark.parametrize("vcpus, planes", [(1, 1), (2, 1), (2, 2)])
def test_all_vcpus_halted_with_interrupts_off_is_a_hang(run_guest, vcpus, planes):
    """`cli; hlt` everywhere and no --timeout ran forever; now status 4 with the reason."""
    r = run_guest("hostile", arg=int(hostile(HOSTILE_CLI_HLT)), vcpus=vcpus, planes=planes, timeout=None)
    assert r.status == ExitStatus.TIMEOUT
    assert r.message == "all vCPUs halted with interrupts disabled"
    assert len(r.timeout_reports) == vcpus


def test_halted_with_interrupts_on_is_not_a_hang(run_guest, kvm):
    """`sti; hlt` can be woken (an IPI, a timer): only the timeout ends it. Where the host drops
    the STI shadow (host convention sti_shadow), the timeout says such a wait may have lost its
    wake-up (test_mainline checks that message both ways)."""
    r = run_guest("hostile", arg=int(hostile(HOSTILE_STI_HLT)), timeout=3)
    assert r.status == ExitStatus.TIMEOUT
    if convention(kvm, "sti_shadow").value == "lost":
        assert r.message.startswith("vcpu0 halted with interrupts on and nothing pending")
    else:
        assert r.message == ""


def test_hang_exit_4_from_the_cli(kvm_available):
    res = cli("run", "hostile", "--arg", hostile(HOSTILE_CLI_HLT), "--vcpus", "2")
    err = res.stderr.decode()
    assert res.returncode == ExitStatus.TIMEOUT, err
    assert "guest hung: all vCPUs halted with interrupts disabled" in err and "Traceback" not in err


def test_assertion_message_escapes_control_characters(kvm_available):
    """Guest text reaches stderr too (a failed assertion's message): escaped like the console."""
    res = cli("run", "hostile", "--arg", hostile(HOSTILE_FAIL_ESCAPES))
    err = res.stderr.decode()
    assert res.returncode == ExitStatus.ASSERT_FAILED, err
    assert "\x1b" not in err and "\\x1b]0;owned\\x07\\x1b[8mall good" in err
