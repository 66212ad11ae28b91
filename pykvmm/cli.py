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
from .vmm import abi, boot, loader
from .vmm.console import StdStreams, write_if_ready
from .vmm.hyperv.features import HvConfig
from .vmm.machine import ExitStatus, Machine, MachineConfig
from .vmm.personalities import POLICIES
from .debug.session import DebugSession
from .debug.symbols import SymbolError, Symbols

DEMO_VCPUS, DEMO_PLANES = 2, 2


MAX_TIMEOUT = 30 * 86400.0


class Seconds(click.ParamType):
    """A finite number of seconds in (0, MAX_TIMEOUT]: inf, nan and 1e10 are typing errors."""

    name = "SECONDS"

    def convert(self, value, param, ctx):
        try:
            s = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not 0 < s <= MAX_TIMEOUT:          # false for nan too
            self.fail(f"{value} is not a number of seconds in (0, {MAX_TIMEOUT:.0f}] (30 days)", param, ctx)
        return s


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


def _print_summary(result, planes: int, label: str, streams) -> None:
    out = []
    if result.exit_code is not None:
        from .vmm.devices.debug_exit import qemu_status

        out.append(f"guest wrote {result.exit_code:#x} to isa-debug-exit (QEMU would exit with status "
                   f"{qemu_status(result.exit_code)})")
    out += [f"--- {result.status.name.lower()} after {result.elapsed * 1000:.1f} ms, {result.exits} exits "
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
    if streams.err.dropped:
        out.append(f"stderr not shown: {streams.err.dropped} bytes dropped while stderr was blocked")
    streams.last_words("\n".join(out) + "\n")


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
@click.option("--timeout", type=Seconds(), default=None,
              help=f"Stop the guest after SECONDS (exit status 4); at most {MAX_TIMEOUT:.0f}.")
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
@click.option("--cpu", metavar="MODEL[,+FEAT,-FEAT,...]", default=None,
              help="Guest CPU model and features in QEMU's -cpu syntax (qemu64, kvm64, Opteron_G1, host, max); "
                   "default: every feature KVM supports.")
@click.option("--no-pit", is_flag=True, help="No i8254 PIT (as QEMU's -machine pit=off).")
@click.option("--append", "cmdline", metavar="TEXT", default="",
              help="Kernel command line for a multiboot/ELF guest (as QEMU's -append).")
@click.option("--initrd", metavar="FILE", default=None,
              help="File given to a multiboot/ELF guest as module 0 (as QEMU's -initrd).")
@click.option("--symbols", metavar="ELF", default=None,
              help="Guest symbols for --trace, --trace-exits, dumps and crash reports (default: the .elf "
                   "beside the guest binary, e.g. guest/build/NAME.elf).")
def run(guest, vcpus, planes, backend, personality, timeout, arg, mem_mib, kvm_device, quiet, raw_console,
        hyperv, vtl_boot, cpu, no_pit, cmdline, initrd, **debug):
    """Run GUEST: a flat x86-64 binary, a multiboot or ELF kernel (kvm-unit-tests' x86/*.flat,
    booted as QEMU's -kernel does), or a bundled guest's name; default: the cross-VTL IPI demo.

    Exit status: 0 guest reported DONE, 1 guest assertion failed, 2 bad usage or input,
    3 guest crashed, 4 timeout or hang, 5 host lacks what is needed, 6 the trace could not be
    written, 130 interrupted, 141 stdout was closed.
    """
    interrupts = _Interrupts()
    streams = StdStreams.install()      # from here on no print can hold the timeout or a signal
    try:
        interrupts.install()
        _run(interrupts, streams, guest, vcpus, planes, backend, personality, timeout, arg, mem_mib, kvm_device,
             quiet, raw_console, hyperv, vtl_boot, cpu, no_pit, cmdline, initrd, debug)
    except KeyboardInterrupt:                       # the first signal, before the guest ran
        _err("interrupted before the guest ran")
        sys.exit(ExitStatus.INTERRUPTED)
    finally:
        streams.finish()


def _run(interrupts, streams, guest, vcpus, planes, backend, personality, timeout, arg, mem_mib, kvm_device, quiet,
         raw_console, hyperv, vtl_boot, cpu, no_pit, cmdline, initrd, debug):
    if mem_mib % 2:
        raise click.BadParameter("must be a multiple of 2", param_hint="--mem")
    try:
        path, is_demo = _resolve_guest(guest)
        image = boot.open_guest(path, cmdline=cmdline, initrd=initrd)
    except (loader.GuestImageError, boot.BootError) as e:
        _err(str(e))
        sys.exit(ExitStatus.USAGE)
    vcpus = vcpus or (DEMO_VCPUS if is_demo else 1)
    planes = planes or (DEMO_PLANES if is_demo else 1)
    config = MachineConfig(vcpus=vcpus, planes=planes, backend=backend, personality=personality,
                           kvm_device=kvm_device, arg=arg, mem_size=mem_mib << 20, quiet=quiet,
                           raw_console=raw_console, hyperv=HvConfig.everything() if hyperv else None,
                           vtl_boot=vtl_boot or ("tlfs" if hyperv and planes > 1 and personality in ("auto", "vtl")
                                                 else "pykvmm"),
                           cpu=cpu, pit=not no_pit)
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
    try:
        symbols = debug["symbols"] = Symbols.for_image(path, debug["symbols"])
    except (SymbolError, OSError) as e:
        machine.close()
        _err(f"--symbols: {getattr(e, 'strerror', None) or e}")
        sys.exit(ExitStatus.USAGE)
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
    _report(result, planes, label, symbols, streams)
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
            write_if_ready(2, b"pykvmm: second signal: exiting now\n")
            os._exit(ExitStatus.INTERRUPTED)
        if self.machine is None:
            raise KeyboardInterrupt
        self.machine.interrupt()      # the run loop sees it within Machine.POLL_INTERVAL


def _report(result, planes: int, label: str, symbols, streams) -> None:
    from .debug.dump import explain_crash, format_cpu_report, where

    if result.status == ExitStatus.ASSERT_FAILED and result.failure is None:
        _err(f"guest reported failure: it wrote code {result.exit_code} to isa-debug-exit")
    elif result.status == ExitStatus.ASSERT_FAILED:
        _err("guest assertion failed: " + result.failure.describe())
    elif result.status == ExitStatus.CRASHED:
        c = result.crash
        _err(f"guest crashed on vCPU {c.vcpu} {label} {c.plane}: {explain_crash(c, symbols)}")
        if c.state:
            _err(c.state)
        if c.report is not None:
            click.echo(format_cpu_report(c.report, label, symbols), err=True)
        _err("the registers and code above are the crashed vCPU's, every plane; fix the guest "
             "(a triple fault usually means an exception with no usable IDT)")
    elif result.status in (ExitStatus.TIMEOUT, ExitStatus.INTERRUPTED):
        why = ("was interrupted" if result.status == ExitStatus.INTERRUPTED
               else f"hung: {result.message}" if result.message else "timed out")
        _err(f"guest {why}; where each unfinished vCPU was:")
        for rep in result.timeout_reports:
            click.echo("  " + where(rep, symbols), err=True)
        for rep in result.timeout_reports:
            click.echo(format_cpu_report(rep, label, symbols), err=True)
    _print_summary(result, planes, label, streams)


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
    fast = info["fast_path"]
    click.echo(f"exit fast path: {'on' if fast['on'] else 'off'} ({fast['detail']})")


@main.command()
@click.argument("tests", nargs=-1)
@click.option("--suite", metavar="DIR", default=None,
              help="kvm-unit-tests folder, built or not (default: $KUT_DIR, else ../shared/kvm-unit-tests).")
@click.option("--planes", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Planes per vCPU; the tests run in plane 0 and must not notice the others.")
@click.option("-j", "jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="Tests run at once.")
@click.option("--tap", "as_tap", is_flag=True, help="TAP output instead of run_tests.sh's lines.")
@click.option("--compare", metavar="FILE", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A reference run (run_tests.sh output, e.g. QEMU/KVM's) to put beside ours; differences are marked.")
@click.option("--logs", metavar="DIR", default=None, help="Write each test's output to DIR/<test>.log.")
@click.option("--timeout-scale", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Multiply every test's timeout (unittests.cfg's, or run_tests.sh's 90 s) on a loaded machine.")
@click.option("--hv-flags", metavar="FLAGS", default="",
              help="Hyper-V flags (e.g. hv_vsm) added, with the flags they need, to every test whose -cpu has hv_* flags.")
def kut(tests, suite, planes, jobs, as_tap, compare, logs, timeout_scale, hv_flags):
    """Run kvm-unit-tests (x86/unittests.cfg) on pykvmm, as run_tests.sh runs them on QEMU.

    TESTS are test names (default: every test). Prints PASS/FAIL/SKIP per test, the SUMMARY
    counts and a table. Exit status: 0, or 1 when pykvmm itself failed on a test or (with
    --compare) a test that passes in the reference does not pass here; 2 bad usage.
    """
    import tempfile

    from .kut import build, config, runner
    from .vmm.hyperv.features import HvFlagError, normalize, with_needs

    reference = None
    if compare:
        reference = runner.parse_reference(Path(compare).read_text(errors="replace"))
        if not reference:
            _err(f"{compare} has no PASS/FAIL/SKIP lines (expected run_tests.sh output)")
            sys.exit(ExitStatus.USAGE)
    extra_hv = tuple(normalize(f) or f for f in hv_flags.split(",") if f.strip())
    try:
        with_needs(extra_hv)
    except HvFlagError as e:
        _err(f"--hv-flags: {e}")
        sys.exit(ExitStatus.USAGE)
    scratch = tempfile.TemporaryDirectory(prefix="pykvmm-kut-build-")
    try:
        tree = build.suite_build(suite, Path(scratch.name))
        entries = config.load_config(tree)
        runner.select(entries, list(tests))
    except (build.SuiteError, config.ConfigError, ValueError) as e:
        _err(str(e))
        scratch.cleanup()
        sys.exit(ExitStatus.USAGE)
    log_dir = None
    if logs:
        log_dir = Path(logs)
        log_dir.mkdir(parents=True, exist_ok=True)
    color = sys.stdout.isatty() and not as_tap
    on_result = None if as_tap else (lambda r: click.echo(r.line(color)))
    try:
        results = runner.run_suite(entries, tree, names=list(tests), planes=planes, jobs=jobs, log_dir=log_dir,
                                   on_result=on_result, timeout_scale=timeout_scale, hv_flags=extra_hv)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(ExitStatus.INTERRUPTED)
    finally:
        scratch.cleanup()
    if as_tap:
        click.echo(runner.tap(results))
        return
    click.echo(runner.summary_line(results))
    click.echo(runner.table(results, reference, "reference"))
    bad = any(r.pykvmm_failure for r in results)
    if reference is not None:
        bad |= any(reference.get(r.name, ("",))[0] == "PASS" and r.status != "PASS" for r in results)
    sys.exit(1 if bad else 0)


@main.group()
def trace():
    """Read traces written by `pykvmm run --trace FILE`."""


def _trace_filters(f):
    """--vcpu/--plane/--from/--to/--kind, shared by the trace commands."""
    f = click.option("--kind", metavar="KIND[,KIND]", default=None,
                     help="Only these kinds: exit, hypercall, switch, plane_event, interrupt, fault, ucall, "
                          "console, lifecycle.")(f)
    f = click.option("--to", "end", type=float, default=None, metavar="US", help="Only events at or before US µs.")(f)
    f = click.option("--from", "start", type=float, default=None, metavar="US",
                     help="Only events at or after US µs (since the run started).")(f)
    f = click.option("--plane", default=None, metavar="N[,N-M]", help="Only these planes.")(f)
    f = click.option("--vcpu", default=None, metavar="N[,N-M]", help="Only these vCPUs.")(f)
    return f


def _trace_filter(file, vcpu, plane, start, end, kind):
    """The filter of the trace commands' options, once FILE is known to be a regular file; or
    exit 2 with a one-line error."""
    from .debug.query import TraceFilter, parse_ids, parse_kinds

    try:
        os.close(loader.open_regular_file(file, "trace file"))
        return TraceFilter(parse_ids(vcpu, "vcpu"), parse_ids(plane, "plane"), start, end, parse_kinds(kind))
    except ValueError as e:
        _err(str(e))
        sys.exit(ExitStatus.USAGE)


def _load_trace(file, **filters):
    """(events, filter) of a trace FILE, or exit 2 with a one-line error."""
    from .debug.trace import TraceFormatError, load

    flt = _trace_filter(file, **filters)
    try:
        return load(file), flt
    except (TraceFormatError, UnicodeDecodeError, ValueError) as e:
        _err(str(e))
        sys.exit(ExitStatus.USAGE)


@trace.command("summary")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_trace_filters
def trace_summary(file, as_json, **filters):
    """Exits per reason, hypercalls, plane residency per vCPU and switch latency percentiles
    of a trace FILE (JSON lines or Chrome JSON), for the selected events."""
    from .debug.summary import format_summary, summarize

    events, flt = _load_trace(file, **filters)
    summary = summarize(events, flt)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@trace.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_trace_filters
def trace_show(file, **filters):
    """The selected events of a trace FILE as a timeline: time (µs), vCPU/plane, kind, what."""
    from .debug.query import timeline

    events, flt = _load_trace(file, **filters)
    for line in timeline(events, flt):
        click.echo(line)


@trace.command("export")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, metavar="OUT", help="The file to write (.json: Chrome; .jsonl).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "chrome"]), default=None,
              help="Format of OUT (default: from its name, else jsonl).")
@_trace_filters
def trace_export(file, output, fmt, **filters):
    """Convert a trace FILE (e.g. the JSON lines a run streamed) to a Chrome trace for Perfetto,
    or to JSON lines, keeping the selected events. JSON lines are converted as they are read
    (memory does not grow with the trace)."""
    from .debug.trace import JsonlSource, ListSource, TraceFormatError, is_jsonl, write_trace_from

    flt = _trace_filter(file, **filters)
    try:
        streamed = is_jsonl(file)
    except OSError as e:
        _err(f"cannot read {file}: {e.strerror or e}")
        sys.exit(ExitStatus.USAGE)
    if streamed:
        source = JsonlSource(file, keep=flt)
    else:
        events, _ = _load_trace(file, **filters)
        source = ListSource(flt.apply(events))
    try:
        written = write_trace_from(source, output, fmt)
    except (TraceFormatError, UnicodeDecodeError, OSError) as e:
        _err(f"cannot write {output}: {e.strerror or e}" if isinstance(e, OSError) else str(e))
        try:
            os.unlink(output)
        except OSError:
            pass
        sys.exit(ExitStatus.USAGE)
    kept, read = (source.kept, source.read) if streamed else (len(source.events), len(events))
    _err(f"trace: {kept} of {read} events written to {output} ({written})")


@trace.command("plot")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, metavar="IMAGE", help="The picture to write (.png, .svg, .pdf).")
@click.option("--title", default=None, help="The picture's title (default: the trace's name).")
@_trace_filters
def trace_plot(file, output, title, **filters):
    """Draw a trace FILE: a lane per vCPU coloured by plane, switch ticks, IPI arrows
    (needs matplotlib: pip install 'pykvmm[plot]')."""
    from .debug.plot import PlotUnavailable, plot_timeline

    events, flt = _load_trace(file, **filters)
    try:
        drawn = plot_timeline(events, output, flt, title=title or os.path.basename(file))
    except PlotUnavailable as e:
        _err(str(e))
        sys.exit(ExitStatus.HOST)
    except (OSError, ValueError) as e:
        _err(f"cannot write {output}: {e}")
        sys.exit(ExitStatus.USAGE)
    _err(f"trace plot: {len(drawn['vcpus'])} vCPU lanes, {drawn['switches']} switches, {drawn['ipis']} IPIs "
         f"written to {output}")


if __name__ == "__main__":
    main()
