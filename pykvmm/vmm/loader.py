"""Finding and checking guest images (user files and the bundled guests under guest/)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from . import abi

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO_ROOT / "guest"
BUILD_DIR = GUEST_DIR / "build"
DEMO_GUEST = "demo"


class UserFileError(ValueError):
    """A file the user named cannot be used; the message says why."""


class GuestImageError(UserFileError):
    """The guest image cannot be used; the message says why and what to do."""


def open_regular_file(path: str | os.PathLike, what: str, error=UserFileError) -> int:
    """An fd of ``path`` opened for reading, if it is a regular file (never blocks: a FIFO,
    a device or a socket is refused, not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except PermissionError:
        raise error(f"cannot read {what} {path}: permission denied") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise error(f"{path} is {kind}, not a {what}")
    return fd


def load_image(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise GuestImageError(f"guest file {p} does not exist (build the bundled guests with "
                              "'make -C guest', or give a path to a flat binary)")
    fd = open_regular_file(p, "guest image", GuestImageError)
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(abi.GUEST_MAX_SIZE + 1)      # at most: a file may grow while read
    except OSError as e:
        raise GuestImageError(f"cannot read guest file {p}: {e.strerror}") from None
    if len(data) > abi.GUEST_MAX_SIZE:
        raise GuestImageError(f"guest file {p} is more than {abi.GUEST_MAX_SIZE} bytes; the most pykvmm "
                              f"loads is {abi.GUEST_MAX_SIZE} bytes ({abi.GUEST_MAX_SIZE >> 20} MiB)")
    if not data:
        raise GuestImageError(f"guest file {p} is empty: a guest is a flat x86-64 binary entered "
                              f"at {abi.GUEST_LOAD_ADDR:#x}")
    return data


def bundled_guest(name: str, build: bool = True) -> Path:
    """guest/build/<name>.bin, built with make if it is missing or out of date."""
    target = BUILD_DIR / f"{name}.bin"
    if build and (GUEST_DIR / "Makefile").exists():
        res = subprocess.run(["make", "-s", "-C", str(GUEST_DIR), f"build/{name}.bin"],
                             capture_output=True, text=True)
        if res.returncode != 0 and not target.exists():
            raise GuestImageError(f"could not build bundled guest {name!r}:\n{res.stderr.strip()}")
    if not target.exists():
        raise GuestImageError(f"bundled guest {name!r} not found at {target}")
    return target


def bundled_names() -> list[str]:
    return sorted(p.stem for p in GUEST_DIR.glob("*.S"))
