"""A plane-aware gdb stub: the GDB remote serial protocol over TCP or a unix socket.

framing.py    packets, acks, escapes (one connection)
registers.py  the x86-64 register layout and target description; reading/writing one KVM vCPU
hostcaps.py   what the host's KVM does with guest debugging (probed on a scratch VM)
memory.py     guest-virtual memory and the breakpoints/watchpoints in it (int3, debug registers)
control.py    all-stop run control: the machine's ``debugger`` hooks, stops, resuming, detaching
handlers.py   one gdb session: the packet handlers and monitor commands
stub.py       the server: listening, accepting, serving sessions
"""

from .control import AllStopControl, split_tid, tid_of
from .hostcaps import HostDebugCaps, probe_host
from .stub import GdbStub

__all__ = ["AllStopControl", "GdbStub", "HostDebugCaps", "probe_host", "split_tid", "tid_of"]
