"""Layer 1: the KVM ABI only (structs, ioctl codes, constants, planes ABI profiles)."""

from . import constants
from .ffi import ffi, libc
from .ioctls import IOCTLS, Ioctl, ioctl
from .profiles import DEFAULT_PROFILE, PROFILES, PlanesAbi

__all__ = ["ffi", "libc", "constants", "IOCTLS", "Ioctl", "ioctl", "PlanesAbi", "PROFILES", "DEFAULT_PROFILE"]
