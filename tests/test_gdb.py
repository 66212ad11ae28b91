"""The plane-aware gdb stub, driven by the real gdb (`gdb -batch -nx -ex ...`) against
`pykvmm run GUEST --gdb ADDR` in a subprocess, plus protocol-level tests without gdb.

Every (vCPU, plane) is a gdb thread (id vcpu*16 + plane + 1). The 2-plane guest is
guest/dbg_planes.S: plane 0 switches to plane 1 (plane1_work) and back --arg times.
Every wait has a timeout so a broken stub fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import thread_states, wait_for
from pykvmm.debug.gdb import control as gctl, framing, registers as gregs
from pykvmm.debug.gdb.handlers import GdbSession
from pykvmm.debug.gdb.hostcaps import HostDebugCaps
from pykvmm.vmm import loader
from pykvmm.vmm.machine import Machine, MachineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Limits that only end a test that is already failing: generous, because the same tests run
# about 10x slower under nested KVM in QEMU TCG (start-up with --gdb probes the host first).
LAST_RESORT = 300.0
RUN_LIMIT = "600"                 # pykvmm run --timeout for the guest under gdb
GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian package gdb; .ci/run installs it)")


def needs_exec_breakpoints() -> None:
    """Skip where the host's KVM never reports an execution breakpoint (QEMU's emulated SVM:
    neither int3 nor the debug registers fire); the stub refuses breakpoints there."""
    from pykvmm.kvm import Kvm
    from pykvmm.vmm.host import convention
    with Kvm() as k:
        int3, hw = convention(k, "int3"), convention(k, "hw_breakpoint")
    if "yes" not in (int3.value, hw.value):
        pytest.skip(f"this host's KVM reports no execution breakpoints ({int3.detail}; {hw.detail})")


def vcpus_running(pid: int, vcpus: int):
    """A condition: every vCPU thread of pykvmm ``pid`` keeps running (one parked by the gdb
    stub sleeps); five polls in a row, so a wake-up on a busy machine is not taken for it."""
    seen = []

    def condition() -> bool:
        states = thread_states(pid)
        seen.append(all(states.get(f"vcpu{i}") == "R" for i in range(vcpus)))
        return seen[-5:] == [True] * 5
    return condition


def built(name: str, ext: str = "bin") -> str:
    p = os.path.join(ROOT, "guest", "build", f"{name}.{ext}")
    if not os.path.exists(p):
        pytest.skip(f"guest/build/{name}.{ext} is not built (make -C guest)")
    return p


def symbols(name: str) -> dict[str, int]:
    out = subprocess.run(["nm", built(name, "elf")], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in (ln.split() for ln in out.splitlines()) if len(parts) == 3}


class Vmm:
    """`pykvmm run ... --gdb ADDR` in the background; always reaped. Its stderr is read by a
    thread (select() on a buffered pipe would miss lines already in Python's buffer)."""

    def __init__(self, *args):
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen([sys.executable, "-m", "pykvmm", "run", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def wait_listening(self, timeout: float = LAST_RESORT) -> str:
        """Wait until the stub says where it listens; returns that address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"gdb stub listening on (\S+);", self.err)
            if m:
                return m.group(1)
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"pykvmm did not start its gdb stub: {self.err}")

    def finish(self, timeout: float = LAST_RESORT) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"pykvmm did not finish after gdb was done: {self.err}")
        self.reader.join(5)
        return self.proc.returncode, self.err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def vmm():
    started = []

    def start(*args):
        v = Vmm(*args)
        started.append(v)
        return v
    yield start
    for v in started:
        v.kill()


def gdb(target: str, *commands, elf: str | None = None, timeout: float = LAST_RESORT, interrupt_when=None) -> str:
    """Run gdb in batch mode. With ``interrupt_when``: send gdb Ctrl-C once
    ``interrupt_when(output so far)`` holds (gdb's output is read as it comes)."""
    argv = [GDB, "-batch", "-nx", "-ex", "set pagination off", "-ex", "set confirm off", "-ex", "set width 0"]
    if elf:
        argv += ["-ex", f"file {elf}"]
    argv += ["-ex", f"target remote {target}"]
    for c in commands:
        argv += ["-ex", c]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        if interrupt_when is not None:
            wait_for(lambda: interrupt_when("".join(lines)), "the condition for gdb's Ctrl-C", timeout)
            p.send_signal(signal.SIGINT)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        reader.join(5)
        pytest.fail(f"gdb timed out; its output:\n{''.join(lines)}")
    reader.join(5)
    return "".join(lines)


def values(out: str) -> list[int]:
    """The $N = 0x... values gdb printed, in order."""
    return [int(v, 16) for v in re.findall(r"^\$\d+ = (0x[0-9a-f]+)", out, re.M)]


@needs_gdb
def test_planes_are_threads_break_in_plane1_step_memory_registers_detach(kvm_available, vmm, tmp_path):
    needs_exec_breakpoints()
    sym = symbols("dbg_planes")
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("dbg_planes"), "--planes", "2", "--personality", "none", "--arg", "3", "--quiet",
            "--gdb", sock, "--timeout", RUN_LIMIT)
    assert v.wait_listening() == sock
    out = gdb(sock,
              "info threads",
              "thread 1", "p/x $rip", "thread 2", "p/x $rip",
              "break plane1_work", "continue",
              "info threads",
              "p/x $pc", "stepi", "stepi", "p/x $pc",
              "x/8bx &p1_count",
              "thread 1", "p/x $rip",
              "set var $r12 = 1",                  # plane 0's round count: one round only
              "p/x $r12", "thread 2", "p/x $r12",
              "set {long}((char *)&p1_mark + 8) = 0x1122334455667788",
              "x/1gx (char *)&p1_mark + 8",
              "monitor planes",
              "delete", "detach",
              elf=built("dbg_planes", "elf"))
    assert 'Thread 1 "vcpu0/plane0" (running plane)' in out, out
    assert 'Thread 2 "vcpu0/plane1" (never entered)' in out, out
    assert re.search(r'Thread 2 "vcpu0/plane1" hit Breakpoint 1, plane1_work', out), out
    assert re.search(r'Thread 1 "vcpu0/plane0" \(suspended\)', out), out
    assert re.search(r'\* 2 +Thread 2 "vcpu0/plane1" \(running plane\)\s+plane1_work', out), out
    rip0, rip1, pc_bp, pc_step, rip0_later, r12_plane0, r12_plane1 = values(out)[:7]
    assert rip0 == rip1 == 0x100000                           # both planes start at the entry
    assert pc_bp == sym["plane1_work"]
    assert pc_step == sym["plane1_work"] + 7 + 4              # lea (7 bytes), inc qword (4 bytes)
    assert re.search(rf"{sym['p1_count']:#x}( <p1_count>)?:\s+0x01(\s+0x00){{7}}", out), out  # the inc ran
    assert rip0_later == 0x4002                               # plane 0 waits inside the hypercall stub
    assert r12_plane0 == 1 and r12_plane1 != 1                # registers are per plane
    assert "0x1122334455667788" in out
    assert "vCPU 0: running plane 1, suspended plane 0" in out
    assert "detached" in out
    status, err = v.finish()
    assert status == 0, err
    assert "switches: plane0->plane1 1, plane1->plane0 1" in err, err   # plane 0 saw r12 = 1


@needs_gdb
def test_two_vcpus_stop_on_switch_tcp_and_kill(kvm_available, vmm):
    v = vmm(built("dbg_planes"), "--vcpus", "2", "--planes", "2", "--personality", "none", "--arg", "2",
            "--quiet", "--gdb", "0", "--gdb-stop-on-switch", "--timeout", RUN_LIMIT)
    addr = v.wait_listening()
    assert addr.startswith("127.0.0.1:")
    out = gdb(":" + addr.rpartition(":")[2], "info threads", "continue", "info threads", "monitor planes", "kill",
              elf=built("dbg_planes", "elf"))
    for name in ("vcpu0/plane0", "vcpu0/plane1", "vcpu1/plane0", "vcpu1/plane1"):
        assert f'"{name}"' in out, out
    assert re.search(r"Thread 1[78] ", out), out                    # vCPU 1's ids: 16 + plane + 1
    m = re.search(r"plane switch on vCPU (\d): plane 0 -> plane 1", out)
    assert m, out
    vcpu = m.group(1)
    assert re.search(rf'Thread \d+ "vcpu{vcpu}/plane1" stopped', out), out
    assert re.search(rf'\* \d+ +Thread \d+ "vcpu{vcpu}/plane1" \(running plane\)\s+_start', out), out
    assert f"vCPU {vcpu}: running plane 1, suspended plane 0" in out
    status, err = v.finish()
    assert status == 130, err
    assert "killed from gdb" in err


@needs_gdb
def test_ctrl_c_stops_every_vcpu(kvm_available, vmm, tmp_path):
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("hang"), "--vcpus", "2", "--gdb", sock, "--timeout", RUN_LIMIT)
    v.wait_listening()
    running = vcpus_running(v.proc.pid, 2)

    def vcpus_spinning(out: str) -> bool:
        # gdb prints where the guest stopped once it is connected, then sends `continue`
        return "_start ()" in out and running()

    out = gdb(sock, "continue", "info threads", "p/x $pc", "kill", elf=built("hang", "elf"),
              interrupt_when=vcpus_spinning)
    assert "received signal SIGINT" in out, out
    frames = re.findall(r'Thread \d+ "vcpu(\d)/plane0" \(running plane\)\s+(\w+)', out)
    assert sorted(frames) == [("0", "hang_loop"), ("1", "hang_loop")], out
    assert values(out)[-1] == symbols("hang")["hang_loop"]
    assert v.finish()[0] == 130


@needs_gdb
def test_crash_stops_with_sigsegv_then_ends(kvm_available, vmm, tmp_path):
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("fault"), "--quiet", "--gdb", sock, "--timeout", RUN_LIMIT)
    v.wait_listening()
    out = gdb(sock, "continue", "p/x $rax", "continue", elf=built("fault", "elf"))
    assert "triple fault" in out and "received signal SIGSEGV" in out, out
    assert "fault_ud2 ()" in out
    assert values(out)[0] == 0xFA17
    assert "exited with code 03" in out
    status, err = v.finish()
    assert status == 3 and "triple fault" in err


@needs_gdb
def test_vtl_personality_threads_and_a_vtl1_breakpoint(kvm_available, vmm, tmp_path):
    needs_exec_breakpoints()
    if "vtl1_main" not in symbols("vtl_call"):
        pytest.skip("guest vtl_call has no vtl1_main symbol")
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("vtl_call"), "--planes", "2", "--personality", "vtl", "--quiet", "--gdb", sock, "--timeout", RUN_LIMIT)
    v.wait_listening()
    out = gdb(sock, "break vtl1_main", "continue", "info threads", "detach", elf=built("vtl_call", "elf"))
    assert re.search(r'Thread 2 "vcpu0/vtl1" hit Breakpoint 1, .*vtl1_main', out), out
    assert 'Thread 1 "vcpu0/vtl0" (suspended)' in out, out
    status, err = v.finish()
    assert status == 0, err


def hypercall_outs() -> tuple[int, int]:
    """Guest addresses of the `out` in the VtlCall and VtlReturn stubs of the hypercall page."""
    from pykvmm.vmm import abi, hypercalls
    return tuple(abi.HYPERCALL_PAGE_ADDR + off for off in hypercalls.STUB_OUT_OFFSETS[1:])


@needs_gdb
def test_stepping_over_a_switching_instruction_stops_the_stepped_thread(kvm_available, vmm, tmp_path):
    """Regression: gdb 13.1 died (infrun.c finish_step_over: trap_expected) when the step over a
    breakpoint on the VtlCall stub's `out` was reported in the other plane's thread."""
    needs_exec_breakpoints()
    call_out, return_out = hypercall_outs()
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("vtl_call"), "--planes", "2", "--personality", "vtl", "--quiet", "--gdb", sock, "--timeout", RUN_LIMIT)
    v.wait_listening()
    out = gdb(sock,
              f"hbreak *{call_out:#x}", "continue",
              "continue",                          # steps over the breakpoint: the `out` switches to VTL1
              "stepi", "p/x $pc", "info threads",  # a stepi across the next VtlCall
              "thread 2", "p/x $pc", "stepi", "p/x $pc",
              "delete", f"hbreak *{return_out:#x}", "continue", "continue", "continue",
              elf=built("vtl_call", "elf"))
    assert "internal-error" not in out, out
    assert out.count('Thread 1 "vcpu0/vtl0" hit Breakpoint 1') == 2, out
    switch_msg = "the step switched vCPU 0 from VTL0 to VTL1; VTL1 (thread 2) has not run yet"
    assert out.count(switch_msg) == 2, out               # the step-over and the stepi
    pc_after_stepi, vtl1_pc, vtl1_pc_after_stepi = values(out)[:3]
    # the stepi ends in VTL0 on the `out` (RIP past it, or on it where KVM skips it at the next entry)
    assert pc_after_stepi in (call_out, call_out + 2)
    assert re.search(r'\* 1 +Thread 1 "vcpu0/vtl0" \(suspended\)', out), out
    # VTL1's next instruction (the `ret` after its last VtlReturn) had not run: stepi runs exactly it
    assert vtl1_pc in (return_out, return_out + 2)
    assert vtl1_pc_after_stepi > 0x100000 and "vtl1_main" in out, out
    assert out.count('Thread 2 "vcpu0/vtl1" hit Breakpoint 2') == 2, out
    assert out.count("the step switched vCPU 0 from VTL1 to VTL0; VTL0 (thread 1) has not run yet") == 2, out
    assert "exited normally" in out, out
    status, err = v.finish()
    assert status == 0, err


@needs_gdb
def test_step_over_a_switch_with_stop_on_switch_then_stops_at_the_switch(kvm_available, vmm, tmp_path):
    needs_exec_breakpoints()
    call_out, _ = hypercall_outs()
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("vtl_call"), "--planes", "2", "--personality", "vtl", "--quiet", "--gdb", sock,
            "--gdb-stop-on-switch", "--timeout", RUN_LIMIT)
    v.wait_listening()
    out = gdb(sock, f"hbreak *{call_out:#x}", "continue", "continue", "p/x $pc", "info threads", "kill",
              elf=built("vtl_call", "elf"))
    assert "internal-error" not in out, out
    assert 'Thread 1 "vcpu0/vtl0" hit Breakpoint 1' in out, out
    step_msg = out.index("the step switched vCPU 0 from VTL0 to VTL1")
    switch_msg = out.index("plane switch on vCPU 0: VTL0 -> VTL1")
    assert step_msg < switch_msg, out                 # gdb's step-over ends, then the switch stops
    assert re.search(r'Thread 2 "vcpu0/vtl1" stopped', out), out
    assert values(out)[-1] == symbols("vtl_call")["_start"]     # VTL1's first instruction has not run
    assert re.search(r'\* 2 +Thread 2 "vcpu0/vtl1" \(running plane\)', out), out
    assert v.finish()[0] == 130


@needs_gdb
def test_gdb_attaches_again_after_detach(kvm_available, vmm, tmp_path):
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("hang"), "--vcpus", "2", "--gdb", sock, "--timeout", RUN_LIMIT)
    v.wait_listening()
    first = gdb(sock, "info threads", "detach", elf=built("hang", "elf"))
    assert "detached" in first, first
    wait_for(vcpus_running(v.proc.pid, 2), "the guest to run after the detach")
    second = gdb(sock, "info threads", "p/x $pc", "detach", elf=built("hang", "elf"))
    frames = re.findall(r'Thread \d+ "vcpu(\d)/plane0" \(running plane\)\s+(\w+)', second)
    assert sorted(frames) == [("0", "hang_loop"), ("1", "hang_loop")], second   # it ran while detached
    assert values(second)[-1] == symbols("hang")["hang_loop"]
    third = gdb(sock, "p/x $pc", "kill", elf=built("hang", "elf"))
    assert values(third)[-1] == symbols("hang")["hang_loop"]
    status, err = v.finish()
    assert status == 130, err
    assert err.count("gdb connected again") == 2, err


@needs_gdb
def test_breakpoint_and_watchpoint_limits_say_why(kvm_available, vmm, tmp_path):
    needs_exec_breakpoints()
    sym = symbols("dbg_planes")
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("dbg_planes"), "--planes", "2", "--personality", "none", "--arg", "2", "--quiet",
            "--gdb", sock, "--timeout", RUN_LIMIT)
    v.wait_listening()
    base = sym["plane1_work"]
    out = gdb(sock, "monitor caps",
              *[f"hbreak *{base + k:#x}" for k in range(5)], "continue", "delete",
              "watch *(long *)&p1_count", "continue",
              elf=built("dbg_planes", "elf"))
    assert "Cannot access memory" not in out, out
    assert re.search(r"Cannot insert hardware breakpoint 5:\s*Remote failure reply: all 4 debug registers "
                     r"\(DR0-DR3\) are in use", out), out
    if "data watchpoints: yes" in out:       # the host fires data breakpoints: gdb gets them
        assert re.search(r"Hardware watchpoint 6: \*\(long \*\)&p1_count\s+Old value = 0\s+New value = 1", out), out
    else:
        assert "data watchpoints: no" in out, out
        assert "Could not insert hardware watchpoint 6" in out, out
        # gdb 13 does not print a Z2 refusal's reason: pykvmm says it on its own terminal
        v.kill()
        assert re.search(r"gdb stub: Z2,[0-9a-f]+,8 refused: this host's KVM ignores data breakpoints.*"
                         r"set can-use-hw-watchpoints 0", v.err), v.err


@needs_gdb
def test_system_state_per_plane_and_physical_memory(kvm_available, vmm, tmp_path):
    """At VtlCall 1 (guest/vtl_call.S) VTL0 has DR0/DR3/LSTAR = its A values, VTL1 its own LSTAR."""
    needs_exec_breakpoints()
    from pykvmm.vmm import hypercalls
    call_out, _ = hypercall_outs()
    sock = str(tmp_path / "gdb.sock")
    v = vmm(built("vtl_call"), "--planes", "2", "--personality", "vtl", "--quiet", "--gdb", sock, "--timeout", RUN_LIMIT)
    v.wait_listening()
    out = gdb(sock, f"hbreak *{call_out:#x}", "continue", "continue",
              "p/x $dr0", "p/x $dr3", "p/x $lstar", "p/x $efer", "thread 2", "p/x $lstar", "thread 1",
              "set var $kernel_gs_base = 0x1234000", "p/x $kernel_gs_base",
              "monitor state", "monitor lapic", "monitor phys 0x4000 16",
              "monitor phys-write 0x200000 c0ffee", "monitor phys 0x200000 3", "monitor phys 0xffffffffff 4",
              "delete", "kill", elf=built("vtl_call", "elf"))
    dr0, dr3, lstar0, efer, lstar1, kgs = values(out)[:6]
    assert (dr0, dr3) == (0xDA0000, 0xDA3000), out
    assert lstar0 == 0xFFFFFFFF8A000000 and lstar1 == 0xFFFFFFFF8B000000, out   # per plane
    assert efer & 0x500 == 0x500                         # LME | LMA
    assert kgs == 0x1234000, out                          # written through KVM_SET_MSRS and read back
    for phrase in ("vCPU 0: running VTL 0", "  VTL 1", "DR0=da0000", "DR3=da3000", "LSTAR=ffffffff8a000000",
                   "LSTAR=ffffffff8b000000", "KERNEL_GS_BASE=1234000", "bases: CS=0", "GS=",
                   "RIP=0000000000004017 <VtlCall_stub+0x8>"):   # stopped on the breakpoint
        assert phrase in out, phrase
    assert re.search(r"vCPU 0 VTL0: LAPIC id=0 TPR=0x0 PPR=0x0 IRR=\[\] ISR=\[\] timer: ", out), out
    assert "vCPU 0 VTL1: LAPIC id=0" in out, out
    page = hypercalls.hypercall_page()[:16]
    assert f"0x0000000000004000: {page.hex(' ')}" in out, out
    assert "wrote 3 bytes at guest-physical 0x200000" in out and "0x0000000000200000: c0 ff ee" in out, out
    assert "phys: 0xffffffffff+0x4 is outside guest RAM" in out, out
    assert v.finish()[0] == 130


# ---- the protocol, without gdb ------------------------------------------------------------------

def test_packet_helpers():
    assert framing.checksum(b"OK") == 0x9A
    raw = bytes(range(256))
    esc = framing.escape_binary(raw)
    assert b"#" not in esc and b"$" not in esc and b"*" not in esc
    assert framing.unescape_binary(esc) == raw
    assert gctl.tid_of(1, 1) == 18 and gctl.split_tid(18) == (1, 1) and gctl.tid_of(0, 0) == 1


def test_target_description_matches_the_g_packet():
    root = ET.fromstring(gregs.target_xml().split("\n", 2)[2])
    assert root.find("architecture").text == "i386:x86-64"
    regs = [r for f in root.iter("feature") for r in f.iter("reg")]
    assert [r.get("name") for r in regs] == [r[0] for r in gregs.REGISTERS]
    assert [int(r.get("regnum")) for r in regs] == list(range(len(regs)))
    core = [r.get("name") for r in root.find("feature[@name='org.gnu.gdb.i386.core']").iter("reg")]
    assert core[:18] == list(gregs.GPRS) + ["rip", "eflags"] and len(core) == 40   # gdb's amd64 core set


@pytest.fixture
def stub(kvm_available):
    image = loader.load_image(built("dbg_planes"))
    with Machine(image, MachineConfig(planes=2, personality="none", quiet=True)) as m:
        ctl = gctl.AllStopControl(m, HostDebugCaps(sw_bp=True, watch=True, blockirq=True))
        yield m, GdbSession(ctl)


def test_registers_are_per_plane(stub):
    m, s = stub
    assert s.handle(b"qfThreadInfo") == "m1,2"
    g = s.handle(b"g")
    assert len(g) == 2 * sum(r[1] // 8 for r in gregs.REGISTERS)
    rip = gregs.REG_INDEX["rip"]
    assert s.handle(b"Hg2") == "OK"
    assert s.handle(b"P%x=%s" % (rip, (0x123456).to_bytes(8, "little").hex().encode())) == "OK"
    assert int.from_bytes(bytes.fromhex(s.handle(b"p%x" % rip)), "little") == 0x123456
    assert m.threads[0].planes_vcpu.plane_vcpu(1).get_regs().rip == 0x123456
    assert m.threads[0].planes_vcpu.plane_vcpu(0).get_regs().rip == 0x100000
    assert s.handle(b"Hg1") == "OK" and s.handle(b"g") == g        # plane 0 untouched
    assert s.handle(b"Hg99") == "E01"
    info = bytes.fromhex(s.handle(b"qThreadExtraInfo,2")).decode()
    assert info == "vcpu0/plane1: never entered"


def test_software_breakpoints_hide_and_restore_the_byte(stub):
    m, s = stub
    addr = symbols("dbg_planes")["plane1_work"]
    orig = m.memory.read(addr, 2)          # identity-mapped
    assert s.handle(b"Z0,%x,1" % addr) == "OK"
    assert m.memory.read(addr, 1) == b"\xCC"
    assert s.handle(b"m%x,2" % addr) == orig.hex()          # gdb sees the original
    assert s.handle(b"M%x,1:90" % addr) == "OK"             # a write under the breakpoint
    assert m.memory.read(addr, 1) == b"\xCC"
    assert s.handle(b"z0,%x,1" % addr) == "OK"
    assert m.memory.read(addr, 2) == b"\x90" + orig[1:]


def test_breakpoints_refused_with_the_reason_where_none_can_fire(stub):
    m, s = stub
    s.ctl.bps.caps = HostDebugCaps(sw_bp=False, watch=False, exec_bp=False)
    for packet in (b"Z0,100000,1", b"Z1,100000,1"):
        assert s.handle(packet).startswith("E.01.this host's KVM never reports execution breakpoints")
    assert s.ctl.bps.hw == [None] * 4 and not s.ctl.bps.sw_bps
    assert s.handle(b"z1,100000,1") == "OK"


def test_hardware_slots_and_watchpoint_split(stub):
    m, s = stub
    assert s.handle(b"Z1,100000,1") == "OK"
    assert s.handle(b"Z2,102003,6") == "OK"        # 0x102003 1 + 0x102004 4 + 0x102008 1: 3 slots
    assert s.handle(b"Z4,102100,8").startswith("E.28.all 4 debug registers")        # only 4 of them
    dr7, dr = s.ctl.bps.debugregs()
    assert dr[:4] == [0x100000, 0x102003, 0x102004, 0x102008]
    assert dr7 & 0xFF == 0b01010101
    # per slot RW (bits 0-1: 00 exec, 01 write) and LEN (bits 2-3: 00 one byte, 11 four bytes)
    assert [(dr7 >> (16 + 4 * i)) & 0xF for i in range(4)] == [0b0000, 0b0001, 0b1101, 0b0001]
    assert s.handle(b"z2,102003,6") == "OK" and s.handle(b"Z3,102100,8") == ""
    assert s.ctl.bps.hw[1:] == [None, None, None]
