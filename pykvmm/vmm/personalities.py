"""The registry of plane policies by name (``--personality``). It imports every policy;
no policy imports it."""

from __future__ import annotations

from .policy import PlanePolicy
from .vtl import VmplPolicy, VtlPolicy

POLICIES: dict[str, type[PlanePolicy]] = {"none": PlanePolicy, "vtl": VtlPolicy, "vmpl": VmplPolicy}


def default_personality(planes: int) -> str:
    """What ``--personality auto`` means: VTLs for a guest with planes, else the bare policy."""
    return "vtl" if planes > 1 else "none"


def make_policy(name: str, planes: int = 1) -> PlanePolicy:
    if name == "auto":
        name = default_personality(planes)
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown personality {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None
