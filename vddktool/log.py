"""Messages and debug flags, nbdkit style.

``error``/``warning`` always go out; ``debug`` only with -v.  -D NAME.FLAG=N
sets integer flags that modules read with ``debug_flag``.  --log chooses
stderr, syslog or nothing.  Messages never contain secrets: callers pass
``params.Secret`` objects, whose str() is masked.
"""

import os
import threading

PROGRAM = "vddktool"

_state = {"verbose": False, "dest": "stderr", "syslog": None}
_flags = {}
_lock = threading.Lock()

# The -D flags that something reads (the manual lists each under DEBUG
# FLAGS); any other is set all the same, with a warning, as nbdkit does.
KNOWN_DEBUG_FLAGS = ("nbdkit.backend.datapath", "vddk.datapath",
                     "vddk.diskinfo", "vddk.extents", "vddk.stats")


def configure(verbose=False, dest="stderr"):
    """dest: stderr | syslog | null."""
    _state["verbose"] = verbose
    _state["dest"] = dest
    if dest == "syslog" and _state["syslog"] is None:
        import syslog
        syslog.openlog(PROGRAM, syslog.LOG_PID, syslog.LOG_DAEMON)
        _state["syslog"] = syslog


def verbose():
    return _state["verbose"]


def set_debug_flag(name, value, warn=True):
    if warn and name not in KNOWN_DEBUG_FLAGS:
        warning("-D %s: no such debug flag, so it changes nothing (the "
                "flags are listed under DEBUG FLAGS in vddktool(1))", name)
    _flags[name] = value


def datapath_debug():
    """Whether the server logs a line per request: with -v, unless
    -D nbdkit.backend.datapath=0 (virt-v2v passes it) asks for quiet."""
    return _state["verbose"] and bool(
        debug_flag("nbdkit.backend.datapath", 1))


def debug_flag(name, default=0):
    return _flags.get(name, default)


def debug_flags():
    return dict(_flags)


def _emit(level, text, syslog_priority):
    dest = _state["dest"]
    if dest == "null":
        return
    if dest == "syslog":
        _state["syslog"].syslog(syslog_priority, "%s: %s" % (level, text))
        return
    prefix = level + ": " if level else ""
    line = "%s: %s%s\n" % (PROGRAM, prefix, text)
    data = line.encode("utf-8", "replace")
    with _lock:
        try:
            os.write(2, data)
        except OSError:
            pass


def error(fmt, *args):
    _emit("error", fmt % args if args else fmt, 3)


def warning(fmt, *args):
    _emit("warning", fmt % args if args else fmt, 4)


def debug(fmt, *args):
    if _state["verbose"]:
        _emit("debug", fmt % args if args else fmt, 7)
