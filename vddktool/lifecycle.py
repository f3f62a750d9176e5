"""The life of the server process, nbdkit style.

Listening sockets (-U, -p/-i, socket activation), daemonizing, the pidfile,
--exit-with-parent, --run and the signals that stop the server.  Nothing
here knows about NBD or disks: the CLI strings these steps together in the
order the backends need (see cli.run_server).
"""

import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from urllib.parse import quote

from . import log
from .engine import UsageError

DEFAULT_PORT = 10809

# systemd's socket activation protocol hands over fds from 3 onwards.
FIRST_ACTIVATED_FD = 3

PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------------
# where the server listens


class Listeners(object):
    """The bound, listening sockets and what the --run command needs to
    reach them.  ``close`` removes what we created on disk."""

    def __init__(self):
        self.sockets = []
        self.unix_path = None      # -U PATH (or the private one for -U -)
        self.private_dir = None    # made for -U -, removed on exit
        self.port = None           # the TCP port, for $port and $uri
        self.ipaddr = None
        self.activated = False

    def close(self):
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
        self.sockets = []
        # Only the process that bound the socket removes it: after a
        # daemonizing fork the parent must leave it for the daemon.
        if self.unix_path and self._owner_pid == os.getpid():
            _unlink_quietly(self.unix_path)
            if self.private_dir:
                shutil.rmtree(self.private_dir, ignore_errors=True)

    def adopt(self):
        """Called in the daemon after fork: it now owns the files."""
        self._owner_pid = os.getpid()

    _owner_pid = None


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def activated_fds(environ=None):
    """The fds passed by systemd-style socket activation, or [] when the
    environment is not addressed to this process."""
    environ = os.environ if environ is None else environ
    pid_text = environ.get("LISTEN_PID", "")
    count_text = environ.get("LISTEN_FDS", "")
    if not pid_text.isdigit() or int(pid_text) != os.getpid():
        return []
    if not count_text.isdigit() or int(count_text) < 1:
        return []
    return list(range(FIRST_ACTIVATED_FD,
                      FIRST_ACTIVATED_FD + int(count_text)))


def forget_activation(environ=None):
    """Children (the --run command) must not think the fds are theirs."""
    environ = os.environ if environ is None else environ
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)


def socket_from_fd(fd):
    """Wrap an inherited listening fd with the right address family.

    Python 3.6 does not detect the family of a socket built from a bare fd,
    so ask the kernel (SO_DOMAIN) first."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        family = probe.getsockopt(socket.SOL_SOCKET,
                                  getattr(socket, "SO_DOMAIN", 39))
    finally:
        probe.detach()
    return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)


def listen_activated(fds):
    listeners = Listeners()
    listeners.activated = True
    for fd in fds:
        try:
            sock = socket_from_fd(fd)
        except OSError as e:
            raise UsageError("LISTEN_FDS: file descriptor %d is not a "
                             "socket: %s (start the server from systemd or "
                             "libnbd, or unset LISTEN_PID and LISTEN_FDS)"
                             % (fd, e.strerror))
        sock.set_inheritable(False)
        listeners.sockets.append(sock)
    log.debug("socket activation: serving %d inherited socket(s)",
              len(fds))
    return listeners


def listen_unix(path):
    """-U PATH, or -U - for a private socket in a fresh temp dir."""
    listeners = Listeners()
    if path == "-":
        listeners.private_dir = tempfile.mkdtemp(prefix="vddktool")
        path = os.path.join(listeners.private_dir, "socket")
    else:
        path = os.path.abspath(path)
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under a temporary name and renamed once listening, so a client
    # that sees the path can connect: never "connection refused" between
    # bind() and listen().  (Too long a path for the suffix: bind directly.)
    staging = "%s.%d~" % (path, os.getpid())
    if len(os.fsencode(staging)) >= 108:
        staging = path
    try:
        sock.bind(staging)
        sock.listen(128)
        if staging != path:
            os.rename(staging, path)
    except OSError as e:
        sock.close()
        if staging != path and os.path.lexists(staging):
            os.unlink(staging)
        if listeners.private_dir:
            shutil.rmtree(listeners.private_dir, ignore_errors=True)
        raise UsageError("-U: cannot listen on %s: %s (choose a path in a "
                         "writable directory)" % (path, e.strerror))
    listeners.sockets.append(sock)
    listeners.unix_path = path
    listeners.adopt()
    log.debug("listening on Unix socket %s", path)
    return listeners


def _remove_stale_socket(path):
    """A socket file left by a server that died may be reused; anything
    else at that path is the user's and must not be touched."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError("-U: %s exists and is not a socket (remove it or "
                         "choose another path)" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        _unlink_quietly(path)
        return
    finally:
        probe.close()
    raise UsageError("-U: another server is listening on %s (stop it or "
                     "choose another path)" % path)


def listen_tcp(ipaddr, port):
    """-p PORT and -i ADDR: every address ADDR resolves to, or all
    interfaces (IPv4 and IPv6) when -i is not given."""
    listeners = Listeners()
    listeners.port = port
    listeners.ipaddr = ipaddr
    try:
        addresses = socket.getaddrinfo(ipaddr, port, socket.AF_UNSPEC,
                                       socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError("-i: cannot resolve %r: %s (give an address or "
                         "host name of this machine)" % (ipaddr, e.strerror))
    failures = []
    for family, socktype, proto, _, address in addresses:
        try:
            sock = socket.socket(family, socktype, proto)
        except OSError as e:
            failures.append(e)
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as nbdkit: otherwise the IPv6
                # socket takes the IPv4 port too and the second bind fails.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError as e:
            sock.close()
            failures.append(e)
            continue
        listeners.sockets.append(sock)
        log.debug("listening on %s port %d", address[0], port)
    if not listeners.sockets:
        reason = failures[0].strerror if failures else "no address"
        option = "-i" if ipaddr else "-p"
        raise UsageError("%s: cannot listen on %s port %d: %s (choose "
                         "another port with -p, or stop the program using "
                         "it)" % (option, ipaddr or "any address", port,
                                  reason))
    for e in failures:
        if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            log.warning("not listening on every address of port %d: %s",
                        port, e.strerror)
    return listeners


# ---------------------------------------------------------------------------
# the --run command


def nbd_uri(listeners, export_name, tls="off"):
    """The NBD URI a client uses to reach these listeners (nbds: when TLS
    is required, as nbdkit does)."""
    path = quote(export_name, safe="")
    scheme = "nbds" if tls == "require" else "nbd"
    if listeners.unix_path:
        return "%s+unix:///%s?socket=%s" % (
            scheme, path, quote(listeners.unix_path, safe="/"))
    host = listeners.ipaddr or "localhost"
    if ":" in host:
        host = "[%s]" % host
    if listeners.port != DEFAULT_PORT:
        host = "%s:%d" % (host, listeners.port)
    return "%s://%s/%s" % (scheme, host, path) if path \
        else "%s://%s" % (scheme, host)


# $tls for each --tls mode.  nbdkit leaves it unset when TLS is off; an
# explicit 0 lets scripts test it without "${tls:-0}".
TLS_ENV = {"off": "0", "on": "1", "require": "2"}


def run_environment(listeners, export_name, tls, base=None):
    env = dict(os.environ if base is None else base)
    uri = nbd_uri(listeners, export_name, tls)
    env["uri"] = uri
    env["nbd"] = uri
    env["port"] = str(listeners.port) if listeners.port else ""
    env["unixsocket"] = listeners.unix_path or ""
    env["exportname"] = export_name
    env["tls"] = TLS_ENV[tls]
    return env


class CaptiveCommand(object):
    """--run CMD: started once the server listens; when it exits the
    server stops and its exit status becomes ours."""

    def __init__(self, command, env, on_exit):
        self.command = command
        self.env = env
        self.on_exit = on_exit
        self.status = None
        self._proc = None
        self._watcher = None

    def start(self):
        log.debug("--run: starting the command")
        self._proc = subprocess.Popen(["/bin/sh", "-c", self.command],
                                      env=self.env, close_fds=True)
        self._watcher = threading.Thread(target=self._wait,
                                         name="run-command")
        self._watcher.daemon = True
        self._watcher.start()

    def _wait(self):
        self.status = exit_status(self._proc.wait())
        self.on_exit()

    def wait(self):
        """The command's exit status, once it has exited.

        Used when the server stopped first (a signal): exiting 0 then
        would tell a script that a copy still running had succeeded.
        Without its server the command's client fails soon enough."""
        if self.status is None:
            log.debug("--run: waiting for the command (process %d) to exit",
                      self._proc.pid)
        self._watcher.join()
        return self.status


def exit_status(returncode):
    """Popen's returncode as a shell would report it, and as nbdkit
    does: a command killed by signal N gives 128+N, said on stderr."""
    if returncode >= 0:
        return returncode
    log.error("--run: the command was killed by signal %d", -returncode)
    return 128 - returncode


# ---------------------------------------------------------------------------
# daemon, pidfile, parent death


def daemonize():
    """Fork into the background like nbdkit: the parent exits at once with
    status 0; the child leads a new session, in /, with stdio on /dev/null.
    Returns in the child only."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    log.debug("running in the background as process %d", os.getpid())
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def write_pidfile(path):
    """Written atomically so a reader never sees an empty file."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(temporary, "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(temporary, path)
    except OSError as e:
        _unlink_quietly(temporary)
        raise UsageError("-P: cannot write %s: %s (choose a writable path)"
                         % (path, e.strerror))


def exit_with_parent(stop):
    """Call ``stop`` when the parent process dies.

    Linux delivers SIGTERM through PR_SET_PDEATHSIG (the normal clean-stop
    path); a watcher thread polling the parent pid covers systems or
    sandboxes where prctl is unavailable, and the window before prctl."""
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGTERM)

    def watch():
        import time
        while os.getppid() == parent:
            time.sleep(0.5)
        log.debug("parent process %d exited: stopping", parent)
        stop()
    watcher = threading.Thread(target=watch, name="exit-with-parent")
    watcher.daemon = True
    watcher.start()


def _set_parent_death_signal(signum):
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                           use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG): %s",
                      os.strerror(ctypes.get_errno()))
            return False
        return True
    except (OSError, AttributeError) as e:
        log.debug("prctl is unavailable (%s): polling the parent instead", e)
        return False


# ---------------------------------------------------------------------------
# signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


def install_signal_handlers(stop):
    """SIGINT/SIGTERM/SIGQUIT stop the server cleanly; SIGPIPE is ignored
    so a client that vanishes costs one failed send, not the process.

    ``stop`` runs in its own thread: a handler runs on the main thread,
    which may be inside the server loop that ``stop`` waits for."""
    def on_signal(signum, frame):
        log.debug("received signal %d: shutting down", signum)
        thread = threading.Thread(target=stop, name="shutdown")
        thread.daemon = True
        thread.start()
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
