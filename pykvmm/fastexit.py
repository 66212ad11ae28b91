"""The exit fast path: a small C loop (fastexit.c, cffi API mode) that runs KVM_RUN and answers
the exits whose answer is pure and table-driven without returning to Python.

Why: an exit to userspace costs ~8 us on the development host in any VMM; QEMU's own work per
exit is ~0.5 us, pykvmm's Python exit path 5-8 us (README, "Running kvm-unit-tests"). No Python
path gets to QEMU's figure, so the exits a C table can answer are answered in C.

What a table answers (``FastTable``; the devices fill it, the loop only reads it):
    * reads of a clock register (``set_clock``): the ACPI PM timer, whose device passes its own
      epoch, rate and mask, so that one formula with one set of constants serves both paths;
    * reads and writes of ports nobody owns (``absent``): all ones, dropped, as the port bus
      answers them; a port is marked after Python answered it once (and warned) and unmarked
      when a device claims it (PortBus does both);
    * writes counted by a device (``set_counter``): pci-testdev's test register, the count kept
      in memory the Python device reads.
Everything else (and EINTR from a kick) comes back to Python as from a plain KVM_RUN.
When it is used: vmm/machine.py (Machine._attach_fast_path: not with more than one plane) and
vmm/vcpu_thread.py (not while a trace sink or the gdb stub must see every exit). With more than
one plane, ``FastSwitch`` (below) makes the plane switches of a policy that needs nothing else.

How it is built: on first use, ``cffi`` writes the C module and ``gcc`` compiles it into a
cache folder (``$PYKVMM_CACHE``, else ``$XDG_CACHE_HOME/pykvmm``, else ``~/.cache/pykvmm``),
keyed by a hash of the source, the cdef and the Python ABI; later runs load it. If it cannot
be built or loaded, pykvmm runs the Python path and ``status()`` (``pykvmm caps``) says why.
``PYKVMM_FASTPATH=0`` turns it off (comparisons, debugging).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import importlib.util
import os
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import cffi

from .kvm import count_compiled_ioctls
from .uapi import ffi as kvm_ffi        # pykvmm's own cdefs (kvm_run addresses)
from .vmm import abi
from .vmm.hyperv import tlfs
from .x86.arch import MAX_PLANES

ENV_SWITCH = "PYKVMM_FASTPATH"
MODULE = "_pykvmm_fastexit"
SOURCE = Path(__file__).with_name("fastexit.c")
RULES = 8                               # the rule slots of a table (FASTEXIT_RULES)

# The facts fastexit.c shares with the rest of pykvmm, defined for it here from their one source
# (prepended to the C source, so a change rebuilds the module: the source is in the cache key)
C_FACTS = {
    "FASTEXIT_RULES": RULES,
    "FASTEXIT_PLANES": MAX_PLANES,
    "HVCALL_VTL_CALL": tlfs.HVCALL_VTL_CALL,
    "HVCALL_VTL_RETURN": tlfs.HVCALL_VTL_RETURN,
    "ENTRY_VTL_CALL": abi.VTL_ENTRY_VTL_CALL,
}
RULE_NONE, RULE_CLOCK_READ, RULE_COUNT_WRITE = 0, 1, 2
SPACE_PORT, SPACE_MMIO = 0, 1
ABSENT_READ, ABSENT_WRITE = 1, 2        # the bits of FastTable.absent (PortBus.absent)

CDEF = """
struct fastexit_rule {
    uint32_t kind; uint32_t space; uint64_t addr; uint32_t size; int32_t match;
    uint32_t *counter; int64_t epoch_ns; uint64_t hz; uint64_t mask; ...;
};
struct fastexit_table { uint8_t absent[65536]; struct fastexit_rule rules[%(RULES)d]; ...; };
int fastexit_run(int vcpu_fd, void *run_area, const struct fastexit_table *t, uint64_t *handled,
                 void *entry_copy);
uint64_t fastexit_clock_value(const struct fastexit_rule *rule, int64_t now_ns);
void fastexit_count_add(uint32_t *counter);
struct fastexit_planes {
    int32_t fd[%(P)d]; void *run[%(P)d]; void *entry_copy[%(P)d]; uint32_t *entry_reason[%(P)d];
    uint64_t exits[%(P)d]; uint64_t switches[%(P)d][%(P)d]; uint64_t calls, returns; uint32_t above[%(P)d];
    uint32_t plane; uint32_t depth; uint8_t stack[%(P)d]; uint32_t entered; uint32_t port; ...;
};
int fastexit_run_planes(struct fastexit_planes *s);
""" % {"RULES": RULES, "P": MAX_PLANES}


class Unavailable(Exception):
    """The fast path cannot be used here; the message is the reason ``pykvmm caps`` prints."""


def switched_off() -> str | None:
    """The reason if the environment turns the fast path off, else None."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    return f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}" if value in ("0", "off", "no", "false") else None


def cache_dir() -> Path:
    if os.environ.get("PYKVMM_CACHE"):
        return Path(os.environ["PYKVMM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pykvmm"


def _key(source: str) -> str:
    h = hashlib.sha256()
    for part in (source, CDEF, cffi.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "",
                 sysconfig.get_paths()["include"]):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build(folder: Path) -> Path:
    """Compile the module into ``folder`` (atomically: concurrent first uses each build and the
    last rename wins) and return its path. Raises Unavailable with the reason."""
    try:
        source = "".join(f"#define {name} {value:#x}\n" for name, value in C_FACTS.items()) + SOURCE.read_text()
    except OSError as e:
        raise Unavailable(f"its C source is missing ({e})") from None
    target = folder / f"{MODULE}-{_key(source)}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    except OSError as e:
        raise Unavailable(f"cannot write its cache folder {folder}: {e.strerror}") from None
    try:
        builder = cffi.FFI()
        builder.cdef(CDEF)
        builder.set_source(MODULE, source)
        c_file = work / f"{MODULE}.c"
        with contextlib.redirect_stdout(io.StringIO()):     # cffi says "generating ..."
            builder.emit_c_code(str(c_file))
        # gcc directly, not cffi's compile(): that needs setuptools, which a venv may lack
        include = sysconfig.get_paths()["include"]
        out = work / target.name
        cmd = [os.environ.get("CC", "gcc"), "-shared", "-fPIC", "-O2", f"-I{include}",
               str(c_file), "-o", str(out)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise Unavailable(f"no C compiler ({cmd[0]} not found)") from None
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{cmd[0]} took longer than 120 s") from None
        if res.returncode != 0:
            lines = [ln for ln in res.stderr.splitlines() if "error" in ln] or res.stderr.splitlines()
            raise Unavailable(f"{cmd[0]} failed: {(lines[0] if lines else 'no message').strip()}")
        os.replace(out, target)
        return target
    finally:
        for p in work.glob("*"):
            p.unlink(missing_ok=True)
        work.rmdir()


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_lock = threading.Lock()
_state: list = []          # [module or None, reason or None], filled by the first load()


def load():
    """The compiled module (``.ffi``, ``.lib``) or None; built on first use, once per process.
    The switch is read at every call (tests turn it off and on)."""
    if switched_off():
        return None
    with _lock:
        if not _state:
            try:
                path = build(cache_dir())
                try:
                    _state[:] = [_load_module(path), None]
                except (ImportError, OSError) as e:
                    raise Unavailable(f"the compiled module does not load: {e}") from None
            except Unavailable as e:
                _state[:] = [None, str(e)]
        return _state[0]


def status() -> tuple[bool, str]:
    """(on, why): for ``pykvmm caps`` and the tests' skip reason."""
    off = switched_off()
    if off:
        return False, off
    module = load()
    if module is None:
        return False, f"cannot be built or loaded: {_state[1]}"
    return True, (f"compiled: PM timer reads, absent ports and pci-testdev's test writes answered in C, "
                  f"vmpl's VtlCall/VtlReturn switched there; "
                  f"{ENV_SWITCH}=0 turns it off")


class FastTable:
    """One machine's table (``absent`` ports and up to RULES rules), in C memory the loop reads.

    Writes from Python while a vCPU runs the loop on another thread are ordered so the loop
    never sees half a rule: a rule is switched off, filled, then its kind is stored last."""

    def __init__(self, module):
        self.module = module
        self.ffi, self.lib = module.ffi, module.lib
        self.table = self.ffi.new("struct fastexit_table *")
        self.absent = self.ffi.buffer(self.table.absent)      # writable bytes, one per port
        self._keys: dict[object, int] = {}                   # owner key -> rule index

    def _rule(self, key) -> int:
        index = self._keys.get(key)
        if index is None:
            used = set(self._keys.values())
            free = [i for i in range(RULES) if i not in used]
            if not free:
                raise ValueError(f"the fast path's table holds {RULES} rules")
            index = self._keys[key] = free[0]
        return index

    def _store(self, key, kind: int, space: int, addr: int, size: int, **fields) -> None:
        r = self.table.rules[self._rule(key)]
        r.kind = RULE_NONE
        r.space, r.addr, r.size = space, addr, size
        for name, value in fields.items():
            setattr(r, name, value)
        r.kind = kind

    def set_clock(self, key, port: int, size: int, epoch_ns: int, hz: int, mask: int) -> None:
        """Reads of ``size`` bytes at ``port``: ((CLOCK_MONOTONIC ns - epoch_ns) * hz // 1e9) & mask."""
        self._store(key, RULE_CLOCK_READ, SPACE_PORT, port, size, epoch_ns=epoch_ns, hz=hz, mask=mask,
                    match=-1, counter=self.ffi.NULL)

    def set_counter(self, key, io: bool, addr: int, counter_address: int, match: int | None) -> None:
        """Byte writes at ``addr`` (a port with ``io``) add one to the uint32 at ``counter_address``
        when they carry ``match`` (any byte if None); other values are dropped."""
        self._store(key, RULE_COUNT_WRITE, SPACE_PORT if io else SPACE_MMIO, addr, 1,
                    match=-1 if match is None else match,
                    counter=self.ffi.cast("uint32_t *", counter_address))

    def clear(self, key) -> None:
        index = self._keys.pop(key, None)
        if index is not None:
            self.table.rules[index].kind = RULE_NONE

    def count_add(self, counter_address: int) -> None:
        """One more in a counter of set_counter, atomically (the loop may add on another vCPU)."""
        self.lib.fastexit_count_add(self.ffi.cast("uint32_t *", counter_address))

    def clock_value(self, key, now_ns: int) -> int:
        """What the loop answers for rule ``key`` at ``now_ns`` (tests compare it with Python's)."""
        return self.lib.fastexit_clock_value(self.table.rules + self._keys[key], now_ns)

    def address(self) -> int:
        return int(self.ffi.cast("uintptr_t", self.table))


class FastSwitch:
    """One vCPU's plane switches in C (``fastexit_run_planes``): a well-formed VtlCall or
    VtlReturn through the hypercall port switches planes without returning to Python, for a
    policy whose switch moves no state, needs no look at other planes' LAPICs and writes the
    VtlCall EntryReason into the entered plane's control page (vmm/vtl.py's vmpl; the vCPU
    thread decides when: vmm/vcpu_thread.py). Every other exit returns as from a plain KVM_RUN.

    ``vcpus``: plane -> its KVM vCPU; ``above``: plane -> the planes a VtlCall from it may
    enter (the lowest is entered); ``entry_reasons``: plane -> host address of its EntryReason.
    After ``run`` the loop's own effects are folded into the vCPUs (exit counts, IF, sync
    areas); ``plane``, ``stack()``, ``entered`` and ``take_switches()`` give the rest to the
    thread. While a run is in progress ``request_immediate_exit`` (a kick) stops every plane."""

    def __init__(self, module, vcpus: dict, port: int, above: dict, entry_reasons: dict):
        self.ffi, self.lib = module.ffi, module.lib
        s = self.s = self.ffi.new("struct fastexit_planes *")
        self.vcpus = dict(vcpus)
        self._runs = [v.run_struct for v in self.vcpus.values()]
        self._plane_of = {v: p for p, v in self.vcpus.items()}
        self.plane = min(self.vcpus)
        for p in range(len(s.fd)):
            s.fd[p] = -1
        for p, v in self.vcpus.items():
            s.fd[p] = v.fd
            s.run[p] = self.ffi.cast("void *", int(kvm_ffi.cast("uintptr_t", v.run_struct)))
            s.above[p] = above.get(p, 0)
            if entry_reasons.get(p) is not None:
                s.entry_reason[p] = self.ffi.cast("uint32_t *", entry_reasons[p])
        s.port = port
        self._keep_entry = [(p, v) for p, v in self.vcpus.items() if v.keeps_entry_state]
        for p, v in self._keep_entry:
            s.entry_copy[p] = self.ffi.cast("void *", v.entry_state_address())
        self.entered = 0
        self._loop = self.lib.fastexit_run_planes

    def set_stack(self, suspended: list[int]) -> None:
        """The thread's suspended stack (after a switch Python made)."""
        s = self.s
        s.depth = len(suspended)
        for i, p in enumerate(suspended):
            s.stack[i] = p

    def stack(self) -> list[int]:
        s = self.s
        return list(s.stack[0:s.depth])

    def request_immediate_exit(self) -> None:
        """A kick (planes.api: under the lock, with the run in progress): every plane's KVM_RUN
        returns at once, the one in progress through the kick's signal."""
        for run in self._runs:
            run.immediate_exit = 1

    @property
    def switched(self) -> int:
        """Switches made in C since the last take_switches()."""
        return self.s.calls + self.s.returns

    def take_switches(self) -> tuple[int, int, list[tuple[int, int, int]]]:
        """(VtlCalls, VtlReturns, [(from, to, count)]) made in C since the last call; resets them."""
        s = self.s
        calls, returns = s.calls, s.returns
        s.calls = s.returns = 0
        pairs = []
        planes = list(self.vcpus)
        for a in planes:
            row = s.switches[a]
            for b in planes:
                n = row[b]
                if n:
                    pairs.append((a, b, n))
                    row[b] = 0
        return calls, returns, pairs

    def run(self, vcpu):
        """KVM_RUN of ``vcpu`` (one of ``vcpus``), switching planes in C, until an exit for
        Python: that exit, decoded by the KVM vCPU of the plane it came from (``plane``)."""
        s = self.s
        s.plane = self._plane_of[vcpu]
        for p, v in self._keep_entry:
            v.refresh_entry_sources()
        ret = self._loop(s)
        final = s.plane
        self.plane = final
        self.entered, s.entered = s.entered, 0
        exits = s.exits
        entries = 1
        for p, v in self.vcpus.items():
            n = exits[p]
            if n or p == final:     # (the final plane: its entry state was kept here, exits or not)
                exits[p] = 0
                entries += n
                v.count_fast_exits(n, p == final)
            if p != final:
                v.run_struct.immediate_exit = 0         # a kick's: the final plane's stays (a
                                                        # kick after its exit is for the next run)
        count_compiled_ioctls("KVM_RUN", entries)
        return self.vcpus[final].run(ran=ret)
