"""Layer 7: the command line (thin: parsing, wiring, printing)."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .kvm import DEFAULT_KVM_DEVICE, Kvm, KvmError, open_files_hint as _open_files_hint
from .vmm import abi, loader
from .vmm.hyperv.features import HvConfig
from .vmm.machine import ExitStatus, Machine, MachineConfig
from .vmm.personalities import POLICIES
from .debug.session import DebugSession

DEMO_VCPUS, DEMO_PLANES = 2, 2


def _err(msg: str) -> None:
    click.echo(f"pykvmm: {msg}", err=True)


def _resolve_guest(guest: str | None) -> tuple[Path, bool]:
    """(path, is_demo). GUEST may be a file or the name of a bundled guest."""
    if guest is None:
        return loader.bundled_guest(loader.DEMO_GUEST), True
    p = Path(guest)
    if not p.exists() and "/" not in guest and guest in loader.bundled_names():
        return loader.bundled_guest(guest), False
    return p, False


def _plane_label(personality: str, planes: int) -> str:
    return "VTL" if personality in ("vtl", "auto") and planes > 1 else "plane"


def _print_summary(result, planes: int, label: str) -> None:
    out = [f"--- {result.status.name.lower()} after {result.elapsed * 1000:.1f} ms, {result.exits} exits "
           f"({result.stats.get('backend')} backend, personality {result.stats.get('personality')})"]
    if result.hypercalls:
        out.append("hypercalls: " + ", ".join(f"{k} {v}" for k, v in sorted(result.hypercalls.items())))
    if planes > 1:
        sw = ", ".join(f"{label}{a}->{label}{b} {n}" for (a, b), n in sorted(result.switches.items())) or "none"
        out.append(f"switches: {sw}")
        if result.entry_reasons:
            out.append("entry reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(result.entry_reasons.items())))
    for key, value in result.stats.items():
        if key in ("backend", "personality", "warnings") or not value:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        out.append(f"{key.replace('_', ' ')}: {value}")
    for w in result.stats.get("warnings", []):
        out.append(f"warning: {w}")
    click.echo("\n".join(out), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pykvmm")
def main():
    """pykvmm: a userspace VMM on /dev/kvm for developing, testing and debugging VM planes."""


@main.command()
@click.argument("guest", required=False)
@click.option("--vcpus", type=click.IntRange(1, abi.MAX_VCPUS), default=None,
              help=f"vCPUs (1..{abi.MAX_VCPUS}; default 1, or {DEMO_VCPUS} for the demo).")
@click.option("--planes", type=click.IntRange(1, abi.MAX_PLANES), default=None,
              help=f"Planes per vCPU (1 to the backend's limit, {abi.MAX_PLANES} for multivm; default 1, or "
                   f"{DEMO_PLANES} for the demo).")
@click.option("--backend", type=click.Choice(["auto", "native", "apic-groups", "multivm"]), default="auto",
              show_default=True, help="How planes are made (auto: native > apic-groups > multivm).")
@click.option("--personality", type=click.Choice(["auto", *POLICIES]), default="auto", show_default=True,
              help="Plane policy (auto: vtl when --planes > 1).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop the guest after SECONDS (exit status 4).")
@click.option("--arg", type=click.IntRange(0, 2**64 - 1), default=0, help="Value passed to the guest in boot info.")
@click.option("--mem", "mem_mib", type=click.IntRange(32, 65536), default=abi.DEFAULT_MEM_SIZE >> 20,
              show_default=True, help="Guest memory in MiB (a multiple of 2).")
@click.option("--kvm-device", default=DEFAULT_KVM_DEVICE, show_default=True, help="The KVM device to open.")
@click.option("--quiet", is_flag=True, help="Do not echo the guest console.")
@click.option("--raw-console", is_flag=True,
              help="Pass the guest console through unchanged, terminal control sequences included "
                   "(default: control characters are shown escaped, e.g. \\x1b).")
@click.option("--hyperv", is_flag=True,
              help="Give the guest the Hyper-V enlightenments (every hv_* flag; see README).")
@click.option("--vtl-boot", type=click.Choice(["pykvmm", "tlfs"]), default=None,
              help="How VTLs above 0 start. pykvmm: every VTL is enabled at reset and starts at the guest "
                   "entry (pykvmm's own guests). tlfs: only VTL0 runs until the guest enables VTLs with "
                   "HvCallEnablePartitionVtl/EnableVpVtl, as on Hyper-V. Default: tlfs with --hyperv and "
                   "more than one plane (a VSM guest written against the TLFS runs unmodified), else pykvmm.")
@click.option("--trace", metavar="FILE", default=None,
              help="Record every exit, hypercall, plane switch, plane event, fault and ucall to FILE "
                   "(.json: Chrome trace for Perfetto/chrome://tracing; .jsonl: JSON lines).")
@click.option("--trace-format", type=click.Choice(["jsonl", "chrome"]), default=None,
              help="Format of --trace (default: from the file name, else jsonl).")
@click.option("--trace-exits", is_flag=True,
              help="Print every exit live on stderr: vCPU/plane, exit, RIP and the instruction there.")
@click.option("--dump-on-exit", is_flag=True,
              help="At the end, print every vCPU's planes: registers, segments, pending events, code at RIP.")
@click.option("--gdb", metavar="PORT|PATH", default=None,
              help="Serve gdb on 127.0.0.1:PORT (or the unix socket PATH) and wait for it before the first "
                   "instruction; every (vCPU, plane) is a gdb thread.")
@click.option("--gdb-stop-on-switch", is_flag=True, help="With --gdb: every plane switch stops the guest.")
def run(guest, vcpus, planes, backend, personality, timeout, arg, mem_mib, kvm_device, quiet, raw_console,
        hyperv, vtl_boot, **debug):
    """Run GUEST (a flat x86-64 binary, or a bundled guest's name; default: the cross-VTL IPI demo).

    Exit status: 0 guest reported DONE, 1 guest assertion failed, 2 bad usage or input,
    3 guest crashed, 4 timeout or hang, 5 host lacks what is needed, 6 the trace could not be
    written, 130 interrupted, 141 stdout was closed.
    """
    interrupts = _Interrupts()
    try:
        interrupts.install()
        _run(interrupts, guest, vcpus, planes, backend, personality, timeout, arg, mem_mib, kvm_device, quiet,
             raw_console, hyperv, vtl_boot, debug)
    except KeyboardInterrupt:                       # the first signal, before the guest ran
        _err("interrupted before the guest ran")
        sys.exit(ExitStatus.INTERRUPTED)


def _run(interrupts, guest, vcpus, planes, backend, personality, timeout, arg, mem_mib, kvm_device, quiet,
         raw_console, hyperv, vtl_boot, debug):
    if mem_mib % 2:
        raise click.BadParameter("must be a multiple of 2", param_hint="--mem")
    try:
        path, is_demo = _resolve_guest(guest)
        image = loader.load_image(path)
    except loader.GuestImageError as e:
        _err(str(e))
        sys.exit(ExitStatus.USAGE)
    vcpus = vcpus or (DEMO_VCPUS if is_demo else 1)
    planes = planes or (DEMO_PLANES if is_demo else 1)
    config = MachineConfig(vcpus=vcpus, planes=planes, backend=backend, personality=personality,
                           kvm_device=kvm_device, arg=arg, mem_size=mem_mib << 20, quiet=quiet,
                           raw_console=raw_console, hyperv=HvConfig.everything() if hyperv else None,
                           vtl_boot=vtl_boot or ("tlfs" if hyperv and planes > 1 and personality in ("auto", "vtl")
                                                 else "pykvmm"))
    try:
        machine = Machine(image, config)
    except KvmError as e:
        _err(str(e))
        sys.exit(ExitStatus.HOST)
    except OSError as e:          # e.g. EMFILE from Python's own opens; KVM's come as KvmError
        _err(f"cannot build the machine: {e.strerror or e}" + ("; " + _open_files_hint() if e.errno == errno.EMFILE
                                                              else ""))
        sys.exit(ExitStatus.HOST)
    except ValueError as e:
        _err(str(e))
        sys.exit(ExitStatus.USAGE)
    label = _plane_label(machine.policy.name, planes)
    session = DebugSession(**debug)
    try:
        session.attach(machine, label)
    except (OSError, ValueError) as e:
        machine.close()
        _err(f"cannot start the debugging options: {e}")
        sys.exit(ExitStatus.USAGE)
    interrupts.machine = machine                  # from now on a signal stops the run
    with machine:
        result = machine.run(timeout)
        session.after_run(result)
    if result.status == ExitStatus.STDOUT_CLOSED:
        _detach_stdout()              # quietly: the reader left; nothing more to say on it
        sys.exit(result.status)
    _report(result, planes, label)
    sys.exit(result.status)


def _detach_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's last flush cannot fail on a closed pipe."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


class _Interrupts:
    """SIGINT and SIGTERM during `pykvmm run` (README): the first one stops the run (status 130,
    with the dump, the summary and the trace; before the guest runs, it abandons the start-up);
    a second one exits at once. The handler stays installed until the process exits: switching
    to SIG_IGN races with a signal already caught ("Signal 15 ignored due to race condition")."""

    def __init__(self):
        self.machine = None
        self.count = 0

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            os.write(2, b"pykvmm: second signal: exiting now\n")
            os._exit(ExitStatus.INTERRUPTED)
        if self.machine is None:
            raise KeyboardInterrupt
        self.machine.interrupt()      # the run loop sees it within Machine.POLL_INTERVAL


def _report(result, planes: int, label: str) -> None:
    from .debug.dump import format_cpu_report, where

    if result.status == ExitStatus.ASSERT_FAILED:
        _err("guest assertion failed: " + result.failure.describe())
    elif result.status == ExitStatus.CRASHED:
        c = result.crash
        _err(f"guest crashed on vCPU {c.vcpu} {label} {c.plane}: {c.reason}")
        if c.state:
            _err(c.state)
        if c.report is not None:
            click.echo(format_cpu_report(c.report, label), err=True)
        _err("the registers and code above are the crashed vCPU's, every plane; fix the guest "
             "(a triple fault usually means an exception with no usable IDT)")
    elif result.status in (ExitStatus.TIMEOUT, ExitStatus.INTERRUPTED):
        why = "timed out" if result.status == ExitStatus.TIMEOUT else "was interrupted"
        _err(f"guest {why}; where each unfinished vCPU was:")
        for rep in result.timeout_reports:
            click.echo("  " + where(rep), err=True)
        for rep in result.timeout_reports:
            click.echo(format_cpu_report(rep, label), err=True)
    _print_summary(result, planes, label)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--kvm-device", default=DEFAULT_KVM_DEVICE, show_default=True)
def caps(as_json, kvm_device):
    """What this host's KVM offers pykvmm, and which planes backend 'auto' picks and why."""
    from .caps import gather

    try:
        with Kvm(kvm_device) as kvm:
            info = gather(kvm)
    except KvmError as e:
        _err(str(e))
        sys.exit(ExitStatus.HOST)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"KVM device {info['device']} (API {info['api_version']})")
    click.echo("capabilities:")
    for c in info["capabilities"]:
        click.echo(f"  {c['name']:<28} {c['value']:>6}  {c['meaning']}")
    click.echo("planes backends (probed with the ioctls on a scratch VM, never by capability number):")
    for b in info["backends"]:
        mark = "yes" if b["available"] else "no "
        click.echo(f"  {b['backend']:<12} {mark}  {b['reason']}")
    click.echo(f"auto picks: {info['auto']['backend']} ({info['auto']['reason']})")
    click.echo("hypercall transports:")
    for t in info["transports"]:
        click.echo(f"  {t['name']:<8} {'yes' if t['works'] else 'no '}  {t['detail']}")
    click.echo("host conventions (probed with tiny guests; they differ between KVMs):")
    for name, c in info["host"].items():
        click.echo(f"  {name:<12} {c['value']:<13} {c['detail']}")


@main.group()
def trace():
    """Read traces written by `pykvmm run --trace FILE`."""


@trace.command("summary")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trace_summary(file, as_json):
    """Exits per reason, hypercalls, plane residency per vCPU and switch latency percentiles
    of a trace FILE (JSON lines or Chrome JSON)."""
    from .debug.summary import format_summary, summarize
    from .debug.trace import TraceFormatError, load

    try:
        summary = summarize(load(file))
    except (TraceFormatError, UnicodeDecodeError) as e:
        _err(str(e))
        sys.exit(ExitStatus.USAGE)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


if __name__ == "__main__":
    main()
