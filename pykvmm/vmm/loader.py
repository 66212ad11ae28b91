"""Finding and checking guest images (user files and the bundled guests under guest/)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import abi

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO_ROOT / "guest"
BUILD_DIR = GUEST_DIR / "build"
DEMO_GUEST = "demo"


class GuestImageError(ValueError):
    """The guest image cannot be used; the message says why and what to do."""


def read_file(path: str | os.PathLike, what: str, max_size: int = abi.GUEST_MAX_SIZE) -> bytes:
    """The bytes of a file the user named, or a GuestImageError that says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise GuestImageError(f"{what} file {p} does not exist")
    if p.is_dir():
        raise GuestImageError(f"{p} is a directory, not a {what} file")
    try:
        size = p.stat().st_size
        if size > max_size:
            raise GuestImageError(f"{what} file {p} is {size} bytes; the most pykvmm loads is "
                                  f"{max_size} bytes ({max_size >> 20} MiB)")
        return p.read_bytes()
    except PermissionError:
        raise GuestImageError(f"cannot read {what} file {p}: permission denied") from None
    except OSError as e:
        raise GuestImageError(f"cannot read {what} file {p}: {e.strerror}") from None


def load_image(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.exists():
        raise GuestImageError(f"guest file {p} does not exist (build the bundled guests with "
                              "'make -C guest', or give a path to a flat binary or a multiboot kernel)")
    data = read_file(p, "guest")
    if not data:
        raise GuestImageError(f"guest file {p} is empty: a guest is a flat x86-64 binary entered "
                              f"at {abi.GUEST_LOAD_ADDR:#x}, or a multiboot/ELF kernel")
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
