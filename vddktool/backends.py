"""Which engine serves the disk: backend=auto|vddk|native."""

from .engine import UsageError
from .params import is_remote


def backend_class(name):
    """Import lazily: the native engine must not pay for ctypes and VDDK."""
    if name == "native":
        from .vmdk.backend import NativeBackend
        return NativeBackend
    if name == "vddk":
        from .vddk.backend import VddkBackend
        return VddkBackend
    raise UsageError("backend: %r is not one of auto, vddk, native" % name)


def choose_backend(values):
    """Resolve backend=auto: VDDK when its library is found, else native
    (which serves local files only)."""
    name = values.get("backend") or "auto"
    if name == "auto":
        from .vddk.library import find_library
        if find_library(values.get("libdir")) is not None:
            name = "vddk"
        elif is_remote(values):
            raise UsageError(
                "server=: remote disks need VMware's VDDK library, which "
                "was not found (set libdir=, see LIBRARY LOCATION in "
                "vddktool(1))")
        else:
            name = "native"
    elif name == "native" and is_remote(values):
        raise UsageError("backend=native serves local files only; remote "
                         "disks (server=, export=) need backend=vddk")
    return backend_class(name)
