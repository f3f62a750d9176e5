"""Finding, loading and calling VMware's libvixDiskLib.

Every call into the library goes through ``Library.call`` so that its time
is counted for -D vddk.stats=1 and its errors carry VDDK's own text.
"""

import ctypes
import errno
import os

from ..engine import EngineError, UsageError
from . import abi
from .stats import STATS, now

DEFAULT_LIBDIR = "/usr/lib64/vmware-vix-disklib"

# Newest first: a VDDK tree normally holds one, but a tree with several
# should give the most recent API.
SUPPORTED_MAJORS = (9, 8, 7, 6)

SEE_MANUAL = "see LIBRARY LOCATION in vddktool(1)"

PREFIX = "VixDiskLib_"


def library_name(major):
    return "libvixDiskLib.so.%d" % major


def find_library(libdir=None):
    """(path, major) of the newest VDDK under LIBDIR/lib64 or LIBDIR, or
    None.  Only looks at the file system: loading may need a re-exec."""
    libdir = libdir or DEFAULT_LIBDIR
    for major in SUPPORTED_MAJORS:
        for directory in (os.path.join(libdir, "lib64"), libdir):
            path = os.path.join(directory, library_name(major))
            if os.path.isfile(path):
                return path, major
    return None


def require_library(libdir=None):
    """Like find_library, but a missing library is the user's to fix."""
    found = find_library(libdir)
    if found is None:
        shown = libdir or DEFAULT_LIBDIR
        raise UsageError(
            "libdir: no libvixDiskLib.so.N (N = %s) in %s or %s/lib64 "
            "(unpack VDDK there or point libdir= at it, %s)"
            % (", ".join(str(m) for m in SUPPORTED_MAJORS), shown, shown,
               SEE_MANUAL))
    return found


class VddkError(EngineError):
    """A VixDiskLib call failed; the message is VDDK's own explanation."""

    def __init__(self, function, code, text):
        message = "%s: %s (VixError %d)" % (function, text, code)
        super().__init__(errno.EIO, message)
        self.function = function
        self.code = code


class Library(object):
    """A loaded libvixDiskLib with its prototypes applied."""

    def __init__(self, path, major):
        self.path = path
        self.major = major
        try:
            self.dll = ctypes.CDLL(path)
        except OSError as e:
            raise UsageError("libdir: cannot load %s: %s (%s)"
                             % (path, e, SEE_MANUAL))
        self.functions = {}
        missing = []
        for name, (restype, argtypes, required) in abi.PROTOTYPES.items():
            try:
                function = getattr(self.dll, name)
            except AttributeError:
                if required:
                    missing.append(name)
                continue
            function.restype = restype
            function.argtypes = argtypes
            self.functions[name[len(PREFIX):]] = function
        if missing:
            raise UsageError(
                "libdir: %s lacks %s (vddktool needs VDDK 6.7 or newer, %s)"
                % (path, ", ".join(sorted(missing)), SEE_MANUAL))

    def has(self, short_name):
        """True if VixDiskLib_<short_name> exists in this library."""
        return short_name in self.functions

    def function_names(self):
        return sorted(PREFIX + name for name in self.functions)

    def call(self, short_name, *args, **kwargs):
        """Call VixDiskLib_<short_name>, counting its time and bytes."""
        function = self.functions[short_name]
        start = now()
        try:
            return function(*args)
        finally:
            STATS.record(short_name, now() - start, kwargs.get("nbytes", 0))

    def check(self, short_name, *args, **kwargs):
        """Call a function returning VixError; raise VddkError on failure."""
        err = self.call(short_name, *args, **kwargs)
        if err != abi.VIX_OK:
            raise self.error(short_name, err)

    def error(self, short_name, code):
        return VddkError(PREFIX + short_name, code, self.error_text(code))

    def error_text(self, code):
        pointer = self.functions["GetErrorText"](code, None)
        if not pointer:
            return "unknown error"
        try:
            return ctypes.string_at(pointer).decode("utf-8",
                                                    "replace").strip()
        finally:
            self.functions["FreeErrorText"](pointer)

    def transport_modes(self):
        """The library's default transport list, or None if it cannot
        say (ListTransportModes is missing from some versions)."""
        if not self.has("ListTransportModes"):
            return None
        modes = self.call("ListTransportModes")
        return modes.decode("utf-8", "replace") if modes else None


def loaded_path(library):
    """The file the dynamic linker really loaded (it may differ from the
    name we asked for, through symlinks), via glibc's dladdr."""
    try:
        libdl = ctypes.CDLL(None)
        dladdr = libdl.dladdr
    except (OSError, AttributeError):
        return os.path.realpath(library.path)

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p),
                    ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p),
                    ("dli_saddr", ctypes.c_void_p)]

    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    dladdr.restype = ctypes.c_int
    info = DlInfo()
    symbol = ctypes.cast(library.functions["InitEx"], ctypes.c_void_p)
    if dladdr(symbol, ctypes.byref(info)) and info.dli_fname:
        return os.path.realpath(info.dli_fname.decode("utf-8", "replace"))
    return os.path.realpath(library.path)
