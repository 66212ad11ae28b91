"""The one cffi FFI instance (ABI mode: no compiler needed at install) and libc's ioctl."""

import cffi

from .structs import LIBC_CDEF, MAINLINE_CDEF

ffi = cffi.FFI()
ffi.cdef(MAINLINE_CDEF)
ffi.cdef(LIBC_CDEF)
libc = ffi.dlopen(None)
