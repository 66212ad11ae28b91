"""Finding kvm-unit-tests and building it (x86_64) in a scratch folder.

The suite is third-party test data: it is built from wherever it lies (KUT_DIR, or
../shared/kvm-unit-tests beside the repository), never copied into the project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..vmm.loader import REPO_ROOT

SHARED_SUITE = REPO_ROOT.parent / "shared" / "kvm-unit-tests"


class SuiteError(RuntimeError):
    """The suite cannot be found or built; the message says why."""


def find_suite(explicit: str | os.PathLike | None = None) -> Path | None:
    """The kvm-unit-tests folder: the one given, else $KUT_DIR, else ../shared/kvm-unit-tests."""
    def valid(p) -> bool:
        return (Path(p) / "x86" / "unittests.cfg").is_file()

    if explicit is not None:
        if not valid(explicit):
            raise SuiteError(f"{explicit} is not a kvm-unit-tests folder (no x86/unittests.cfg)")
        return Path(explicit)
    for cand in (os.environ.get("KUT_DIR"), SHARED_SUITE):
        if cand and valid(cand):
            return Path(cand)
    return None


def is_built(suite: Path) -> bool:
    return (suite / "config.mak").is_file() and any((suite / "x86").glob("*.flat"))


def build_suite(source: Path, dest: Path, jobs: int = 2) -> Path:
    """Copy the suite to dest/kvm-unit-tests, configure for x86_64 and build it; return that folder."""
    tree = Path(dest) / "kvm-unit-tests"
    if not tree.exists():
        shutil.copytree(source, tree, symlinks=True, ignore=shutil.ignore_patterns("*.o", "*.flat", "*.elf"))
    for cmd in (["./configure", "--arch=x86_64"], ["make", f"-j{jobs}"]):
        res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
            raise SuiteError(f"building kvm-unit-tests failed at '{' '.join(cmd)}' in {tree}:\n{tail}")
    return tree


def suite_build(explicit: str | os.PathLike | None, scratch: Path) -> Path:
    """A built suite: the given/found one if already built there, else a fresh build in scratch."""
    source = find_suite(explicit)
    if source is None:
        raise SuiteError("kvm-unit-tests not found: give --suite DIR or set KUT_DIR "
                         f"(looked in {SHARED_SUITE})")
    return source if is_built(source) else build_suite(source, scratch)
