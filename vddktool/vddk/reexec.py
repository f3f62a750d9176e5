"""Re-executing once with VDDK's directory on LD_LIBRARY_PATH.

VDDK ships private copies of libssl, libstdc++ and friends next to
libvixDiskLib.  The dynamic linker only honours LD_LIBRARY_PATH as it was
when the process started, so when the directory is missing we add it and
exec ourselves again, exactly once.

Secrets must not reach the new command line (visible in ps and
/proc/PID/cmdline): password= and cookie= are replaced with -FD of a pipe
that already holds the value.  The caller's own LD_LIBRARY_PATH travels in
VDDKTOOL_ORIGINAL_LD_LIBRARY_PATH; once the library is loaded,
``restore_caller_environment`` puts it back in os.environ, so --run
commands and other children see what the user had.
"""

import fcntl
import os
import sys

from .. import log
from ..params import REEXEC_PASSWORD_FD

# Set in the re-executed process; its presence stops a second re-exec.
REEXEC_MARKER = "VDDKTOOL_REEXECED"
# The caller's LD_LIBRARY_PATH before we changed it; absent when it was
# unset (REEXEC_MARKER tells the two cases apart from "no re-exec").
ORIGINAL_LD_LIBRARY_PATH = "VDDKTOOL_ORIGINAL_LD_LIBRARY_PATH"

SECRET_PARAMS = ("password", "cookie")
# Parameters whose parser takes -FD literally: the pipe's fd is announced
# in this variable instead.
SECRET_FD_VARIABLES = {"cookie": "VDDKTOOL_COOKIE_FD"}


def path_has_directory(search_path, directory):
    wanted = os.path.realpath(directory)
    return any(part and os.path.realpath(part) == wanted
               for part in (search_path or "").split(":"))


def restarted(environ=None):
    """True in the process started again: what the first start has said
    about the command line need not be said twice."""
    environ = os.environ if environ is None else environ
    return bool(environ.get(REEXEC_MARKER))


def needs_reexec(library_dir, environ=None):
    environ = os.environ if environ is None else environ
    if path_has_directory(environ.get("LD_LIBRARY_PATH"), library_dir):
        return False
    if environ.get(REEXEC_MARKER):
        # Something (a wrapper, the shell) stripped the variable again:
        # looping would not help.  Carry on and let dlopen decide.
        log.debug("LD_LIBRARY_PATH still lacks %s after re-exec; "
                  "not trying again", library_dir)
        return False
    return True


def original_command_line():
    """argv exactly as the interpreter got it (including -m vddktool or
    the zipapp path), which sys.argv does not keep."""
    with open("/proc/self/cmdline", "rb") as f:
        raw = f.read()
    return [arg.decode("utf-8", "surrogateescape")
            for arg in raw.split(b"\0")[:-1]]


def _pipe_holding(secret):
    """A read fd (>= 3, inheritable) from which exactly ``secret`` reads."""
    read_fd, write_fd = os.pipe()
    if read_fd <= 2:
        # params refuses fds 0-2: they are stdin/stdout/stderr.
        moved = fcntl.fcntl(read_fd, fcntl.F_DUPFD, 3)
        os.close(read_fd)
        read_fd = moved
    # The reader drops one trailing newline; adding one keeps a secret
    # that itself ends in a newline intact.
    data = secret.encode("utf-8") + b"\n"
    try:
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os.close(write_fd)
    os.set_inheritable(read_fd, True)
    return read_fd


def hide_secrets(argv, secrets, environ):
    """Rewrite NAME=VALUE arguments of secret parameters as NAME=-FD.

    ``secrets`` maps a parameter name to its already-read value (a
    params.Secret); names with no value are left alone.  password= reads
    -FD itself (the fd is named in ``environ`` too, so that the whole pipe
    is read, not just its first line); for cookie=, which takes its value
    literally, the fd is named in ``environ`` so that ``recover_secrets``
    can read it.
    """
    rewritten = []
    for arg in argv:
        name, sep, _ = arg.partition("=")
        secret = secrets.get(name) if sep else None
        if secret is not None:
            fd = _pipe_holding(secret.value)
            arg = "%s=-%d" % (name, fd)
            if name in SECRET_FD_VARIABLES:
                environ[SECRET_FD_VARIABLES[name]] = str(fd)
            elif name == "password":
                environ[REEXEC_PASSWORD_FD] = str(fd)
        rewritten.append(arg)
    return rewritten


def recover_secrets(values, environ=None):
    """In the re-executed process: replace cookie=-FD, as written by
    hide_secrets, with the value waiting in that pipe."""
    environ = os.environ if environ is None else environ
    for name, variable in SECRET_FD_VARIABLES.items():
        fd_text = environ.pop(variable, None)
        secret = values.get(name)
        if fd_text is None or secret is None or \
                secret.value != "-" + fd_text:
            continue
        with os.fdopen(int(fd_text), "rb") as pipe:
            data = pipe.read()
        if data.endswith(b"\n"):
            data = data[:-1]
        secret.value = data.decode("utf-8")


def startup_environment():
    """The environment this process was started with.

    Start-up code may already have edited os.environ for its own children
    (socket activation removes LISTEN_FDS, for one), but the re-executed
    process must start exactly as this one did.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environ)
    env = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


def reexec_environment(library_dir, environ=None):
    env = dict(startup_environment() if environ is None else environ)
    original = env.get("LD_LIBRARY_PATH")
    if original is not None:
        env[ORIGINAL_LD_LIBRARY_PATH] = original
    else:
        env.pop(ORIGINAL_LD_LIBRARY_PATH, None)
    env["LD_LIBRARY_PATH"] = (library_dir + ":" + original
                              if original else library_dir)
    env[REEXEC_MARKER] = "1"
    return env


def reexec_if_needed(library_dir, params):
    """Exec this program again with ``library_dir`` on LD_LIBRARY_PATH,
    unless it is there already.  Returns only when no re-exec happens."""
    if not needs_reexec(library_dir):
        return
    try:
        argv = original_command_line()
    except OSError as e:
        log.debug("cannot read /proc/self/cmdline (%s): not re-executing "
                  "with LD_LIBRARY_PATH", e.strerror)
        return
    # argv[0] may be a bare "python3" that Python would look up on PATH
    # again to find its prefix (and venv); name the interpreter we are.
    argv[0] = sys.executable
    secrets = dict((name, params.get(name)) for name in SECRET_PARAMS
                   if params.get(name) is not None)
    env = reexec_environment(library_dir)
    argv = hide_secrets(argv, secrets, env)
    log.debug("re-executing with LD_LIBRARY_PATH=%s", env["LD_LIBRARY_PATH"])
    # Whatever the parent buffered would otherwise be lost by exec.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def restore_caller_environment():
    """Put os.environ back as the user had it, once the library is loaded.

    The dynamic linker read LD_LIBRARY_PATH when this process started and
    never looks again, so VDDK keeps finding its own libraries, while every
    child (--run commands above all) gets the caller's environment.
    """
    restored = caller_environment()
    for name in (REEXEC_MARKER, ORIGINAL_LD_LIBRARY_PATH, "LD_LIBRARY_PATH"):
        if name in restored:
            os.environ[name] = restored[name]
        else:
            os.environ.pop(name, None)


def caller_environment(environ=None):
    """The environment as the user started us: what --run commands and
    other children should get.  Undoes reexec_environment."""
    env = dict(os.environ if environ is None else environ)
    if env.pop(REEXEC_MARKER, None):
        original = env.pop(ORIGINAL_LD_LIBRARY_PATH, None)
        if original is None:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = original
    return env
