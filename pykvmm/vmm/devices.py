"""The machine's devices: the test-result (ucall) port (the console is vmm/console.py)."""

from __future__ import annotations

from dataclasses import dataclass

from . import abi
from .console import escape_controls
from .memory import GuestMemory, GuestMemoryError

VERB_NAMES = {abi.UCALL_SYNC: "SYNC", abi.UCALL_ASSERT: "ASSERT", abi.UCALL_PRINT: "PRINT",
              abi.UCALL_DONE: "DONE"}


@dataclass
class Ucall:
    """One guest-to-host test message (the kernel selftests' ucall)."""
    vcpu: int
    plane: int
    verb: int
    args: tuple[int, int, int, int]
    line: int = 0
    file: str = ""
    message: str = ""

    @property
    def name(self) -> str:
        return VERB_NAMES.get(self.verb, f"verb{self.verb}")

    def describe(self) -> str:
        where = f"vcpu{self.vcpu}/plane{self.plane}"
        if self.verb == abi.UCALL_SYNC:
            return f"{where} SYNC stage={self.args[0]} value={self.args[1]:#x}"
        if self.verb == abi.UCALL_ASSERT:
            loc = f"{self.file}:{self.line}" if self.file else f"line {self.line}"
            return (f"{where} ASSERT failed at {loc}: {self.message or '(no message)'} "
                    f"(values {self.args[0]:#x}, {self.args[1]:#x})")
        if self.verb == abi.UCALL_PRINT:
            return f"{where} {self.message}"
        return f"{where} {self.name}"


class BadUcall(ValueError):
    pass


def decode_ucall(mem: GuestMemory, gpa: int, vcpu: int, plane: int) -> Ucall:
    try:
        raw = mem.read(gpa, abi.UC_SIZE)
    except GuestMemoryError as e:
        raise BadUcall(f"ucall block address {gpa:#x} is not in guest memory") from e
    verb = int.from_bytes(raw[abi.UC_VERB:abi.UC_VERB + 4], "little")
    if verb not in VERB_NAMES:
        raise BadUcall(f"ucall block at {gpa:#x} has unknown verb {verb}")
    line = int.from_bytes(raw[abi.UC_LINE:abi.UC_LINE + 4], "little")
    args = tuple(int.from_bytes(raw[abi.UC_ARGS + 8 * i:abi.UC_ARGS + 8 * i + 8], "little") for i in range(4))
    file_ptr = int.from_bytes(raw[abi.UC_FILE:abi.UC_FILE + 8], "little")
    msg_ptr = int.from_bytes(raw[abi.UC_MSG:abi.UC_MSG + 8], "little")
    try:
        # guest text, shown on the terminal in failures and PRINTs: control characters escaped
        file = escape_controls(mem.cstring(file_ptr, abi.UCALL_STRING_MAX))
        msg = escape_controls(mem.cstring(msg_ptr, abi.UCALL_STRING_MAX))
    except GuestMemoryError as e:
        raise BadUcall(f"ucall string pointer is outside guest memory: {e}") from e
    return Ucall(vcpu, plane, verb, args, line, file, msg)
