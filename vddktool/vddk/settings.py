"""The VDDK engine's checks of its parameters, and how a failed open is
told, apart from the engine itself.

Everything here runs before the server forks into the background (or,
for explain_open_failure, on a failure): each mistake is one line that
names the parameter and the way out.
"""

import os

from .. import log, params as paramtable
from ..engine import UsageError
from .reexec import restarted

# What a remote connection cannot do without, in the order we ask for them.
REQUIRED_REMOTE = (
    ("server", "server=HOSTNAME"),
    ("thumbprint", "thumbprint=xx:xx:...:xx, see THUMBPRINTS in "
                   "vddktool(1)"),
    ("user", "user=USERNAME"),
    ("password", "password=PASSWORD|-|+FILENAME|-FD, or cookie=COOKIE"),
    ("vm", "vm=moref=ID, see MANAGED OBJECT REFERENCE in vddktool(1)"),
)


def check_settings(values):
    """Refuse what VDDK cannot serve; make libdir= and config= absolute
    (``values`` is changed in place)."""
    file_name, export = values.get("file"), values.get("export")
    if file_name is not None and export is not None:
        raise UsageError(
            "export: cannot be combined with file= (serve one disk with "
            "file=, or let clients choose with export=WILDCARD)")
    paramtable.check_disk(values)
    if paramtable.is_remote(values):
        _check_remote(values)
    if values.get("force-share") and not restarted():
        log.warning("force-share: ignored by the VDDK engine, which keeps "
                    "its own lock files (use backend=native for qemu's "
                    "image locks)")
    _make_paths_absolute(values)


def _check_remote(values):
    for name, example in REQUIRED_REMOTE:
        value = values.get(name)
        if name == "password" and value is None:
            value = values.get("cookie")
        if value is None:
            raise UsageError("%s: is required for a remote disk (add %s)"
                             % (name, example))
    thumbprint = values.get("thumbprint")
    if not (paramtable.looks_like_thumbprint(thumbprint) or restarted()):
        log.debug("thumbprint=%s is not a SHA-1 or SHA-256 fingerprint; "
                  "passing it to VDDK as given (VDDK's error will show the "
                  "server's real one)", thumbprint)
    if values.get("file") is None and values.get("export") is None:
        raise UsageError(
            "file: a remote disk needs a file name (add "
            "file='[datastore] dir/name.vmdk' or export=WILDCARD)")


def _make_paths_absolute(values):
    """libdir= and config= reach InitEx only after the daemon has moved
    to /, where a relative path would mean something else."""
    for name in ("libdir", "config"):
        if values.get(name) is not None:
            values[name] = os.path.abspath(values[name])
    config = values.get("config")
    if config is not None and not os.path.isfile(config):
        reason = ("is not a regular file" if os.path.exists(config)
                  else "does not exist")
        raise UsageError("config: %s %s (name an existing VDDK "
                         "configuration file, or drop config=)"
                         % (config, reason))


def explain_open_failure(error, path, messages):
    """Name the disk in a failed ConnectEx or Open, and quote what VDDK
    logged about the server's certificate (``messages``): with a wrong
    thumbprint that message carries the real one, while the error code
    only says "Unknown error"."""
    error.message = "cannot open %s: %s" % (path, error.message)
    certificate = [m for m in messages if "thumbprint" in m.lower()]
    if certificate:
        error.message += "; VDDK said: %s" % certificate[-1].strip()
    elif not log.verbose():
        # The reason is usually in the messages VDDK logged just before.
        error.message += " (run with -v to see VDDK's own messages)"
