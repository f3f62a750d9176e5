"""Compile the fake libvixDiskLib.so.N with gcc.

Each (major, optional) variant is compiled once per process into a private
cache and then copied where a test wants it, so a test session pays for
gcc a handful of times however many libdirs its tests lay out.
"""

import atexit
import os
import shutil
import subprocess
import tempfile
import threading

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "fake_vixdisklib.c")

# The functions a real VDDK >= 6.7 has that older ones lack; optional=False
# builds a library without them.
OPTIONAL_FUNCTIONS = (
    "VixDiskLib_QueryAllocatedBlocks",
    "VixDiskLib_FreeBlockList",
    "VixDiskLib_AllocateConnectParams",
)

_cache = {}
_cache_lock = threading.Lock()
_cache_dir = []


def library_name(major):
    return "libvixDiskLib.so.%d" % major


def _private_dir():
    if not _cache_dir:
        path = tempfile.mkdtemp(prefix="fake-vddk-")
        atexit.register(shutil.rmtree, path, True)
        _cache_dir.append(path)
    return _cache_dir[0]


def _compile(major, optional, optimize=False):
    name = library_name(major)
    output = os.path.join(_private_dir(),
                          "%s-%s%s" % (name, "full" if optional else "old",
                                       "-O2" if optimize else ""),
                          name)
    os.makedirs(os.path.dirname(output))
    # -O0 for tests: gcc runs in a third of the time, and the fake needs
    # no speed there; benchmarks ask for -O2.
    cmd = ["gcc", "-shared", "-fPIC", "-O2" if optimize else "-O0",
           "-pthread",
           "-std=gnu11", "-Wall", "-Wextra", "-Werror",
           "-fvisibility=hidden",
           "-Wl,-soname," + name,
           "-DFAKE_VDDK_MAJOR=%d" % major]
    if optional:
        cmd.append("-DFAKE_VDDK_OPTIONAL")
    cmd += ["-o", output, SOURCE]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.communicate()[0].decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError("building the fake VDDK failed:\n%s\n%s"
                           % (" ".join(cmd), out))
    return output


def build(outdir, major=8, optional=True, subdir="lib64", optimize=False):
    """Put a fake VDDK into outdir/subdir/libvixDiskLib.so.<major>, as VDDK
    lays itself out (subdir="" puts it straight into outdir, the other
    place the library is looked for); return the library's path."""
    key = (major, bool(optional), bool(optimize))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _compile(major, optional, optimize)
        built = _cache[key]
    target_dir = os.path.join(str(outdir), subdir) if subdir else str(outdir)
    if not os.path.isdir(target_dir):
        os.makedirs(target_dir)
    target = os.path.join(target_dir, library_name(major))
    # Copy under a temporary name so no reader ever sees half a library.
    partial = target + ".partial"
    shutil.copyfile(built, partial)
    os.replace(partial, target)
    return target
