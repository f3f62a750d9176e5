"""Shared fixtures: start vddktool servers on private sockets and stop them.

Every test that starts a server goes through ``start_server`` so nothing
outlives its test.  Real NBD clients (nbdinfo, nbdcopy, nbdsh, qemu-img,
qemu-io) are run as subprocesses; ``nbdsh`` has /usr/bin/python3 in its
shebang, so it finds python3-libnbd whatever interpreter runs pytest.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests share tools/nbdclient.py with the fuzz and load tools.
sys.path.insert(0, os.path.join(ROOT, "tools"))

# Client tools run with Debian's /usr/bin ahead of pyenv's shims.
CLIENT_ENV = dict(os.environ)
CLIENT_ENV["PATH"] = "/usr/bin:/bin:" + os.environ.get("PATH", "")
CLIENT_ENV.setdefault("LIBNBD_DEBUG", "0")


def vddktool_cmd(*args):
    """The command line that runs this checkout's vddktool."""
    return [sys.executable, "-m", "vddktool"] + list(args)


def run(cmd, check=True, timeout=120, input=None, env=None, cwd=None):
    """subprocess.run with captured text output (3.6 has no capture_output)."""
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        input=input.encode() if isinstance(input, str) else input,
        timeout=timeout, env=env or CLIENT_ENV, cwd=cwd)
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise AssertionError("%r exited %d\nstdout: %s\nstderr: %s" % (
            cmd, proc.returncode, proc.stdout, proc.stderr))
    return proc


def vddktool(*args, **kwargs):
    """Run vddktool to completion (for --run, --help, errors...)."""
    kwargs.setdefault("cwd", ROOT)
    return run(vddktool_cmd(*args), **kwargs)


class Server(object):
    """A vddktool running in the foreground on a Unix socket."""

    def __init__(self, proc, sock, log_path):
        self.proc = proc
        self.sock = sock
        self.log_path = log_path

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def uri_for(self, export):
        from urllib.parse import quote
        return "nbd+unix:///%s?socket=%s" % (quote(export, safe=""),
                                             self.sock)

    @property
    def qemu_uri(self):
        return "nbd+unix://?socket=" + self.sock

    def log(self):
        with open(self.log_path, "r", errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Stop the server; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_socket(path, proc, log_path, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            with open(log_path) as f:
                raise AssertionError("server exited %d before listening:\n%s"
                                     % (proc.returncode, f.read()))
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("server did not create %s" % path)


def _starter(tmp_path, name, command, base_env, cwd=None):
    """start(*args, env=None) -> Server running ``command(sock) + args``
    in the foreground on tmp_path/NAMEn.sock; and the list of those
    started, to stop."""
    started = []

    def start(*args, **kwargs):
        sock = str(tmp_path / ("%s%d.sock" % (name, len(started))))
        log_path = str(tmp_path / ("%s%d.log" % (name, len(started))))
        env = dict(base_env)
        env.update(kwargs.get("env") or {})
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                command(sock) + list(args), cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=env)
        server = Server(proc, sock, log_path)
        started.append(server)
        wait_for_socket(sock, proc, log_path)
        return server
    return start, started


@pytest.fixture
def start_server(tmp_path):
    """start_server(*args, env=None) -> Server on tmp_path/nbdN.sock."""
    start, started = _starter(
        tmp_path, "nbd", lambda sock: vddktool_cmd("-f", "-U", sock),
        os.environ, cwd=ROOT)
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_nbdkit(tmp_path):
    """The same for Debian's nbdkit, the reference to compare with
    (tests/filter_oracle.py): start_nbdkit(*args, env=None)."""
    need("nbdkit")
    start, started = _starter(tmp_path, "nbdkit",
                              lambda sock: ["nbdkit", "-f", "-U", sock],
                              CLIENT_ENV)
    yield start
    for server in started:
        server.stop()


def free_tcp_port():
    """A loopback port that was free a moment ago (tests that need TCP)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def need(tool):
    """Fail (not skip) when a client the tests rely on is missing: .ci/run
    installs them all, so a missing one is a set-up bug to see."""
    path = shutil.which(tool, path=CLIENT_ENV["PATH"])
    assert path, "%s is not installed (run .ci/run or see README)" % tool
    return path


def threads_and_descriptors(pid):
    """How many threads and open descriptors a process has now."""
    return (len(os.listdir("/proc/%d/task" % pid)),
            len(os.listdir("/proc/%d/fd" % pid)))


# An idle server's threads: the main one, and the handshake limit's
# (there from the first client on).
IDLE_THREADS = 2


def idle_counts(server, context=None):
    """Threads and descriptors of an idle server, after one whole
    connection (TLS with an ssl context)."""
    from nbdclient import NbdClient
    client = NbdClient.unix(server.sock)
    client.greet()
    if context is not None:
        client.starttls(context)
    client.go()
    client.disconnect()
    assert client.at_eof()
    client.close()
    pid = server.proc.pid
    deadline = time.time() + 30
    while threads_and_descriptors(pid)[0] != IDLE_THREADS:
        assert time.time() < deadline, threads_and_descriptors(pid)
        time.sleep(0.05)
    return threads_and_descriptors(pid)


def settles_at(pid, expected, timeout=30):
    """Wait until the process has ``expected`` (threads, descriptors);
    returns what it has at the end (equal unless the wait ran out)."""
    deadline = time.time() + timeout
    while True:
        now = threads_and_descriptors(pid)
        if now == expected or time.time() > deadline:
            return now
        time.sleep(0.05)


@pytest.fixture
def spliced_moves(monkeypatch):
    """The sizes of the payloads the server moves into files with
    splice(2), in order (server/splice.py's Splicer.move, counted)."""
    from vddktool.server import splice as splice_module
    moves = []
    real_move = splice_module.Splicer.move

    def counting_move(self, fd, offset, count):
        moves.append(count)
        return real_move(self, fd, offset, count)
    monkeypatch.setattr(splice_module.Splicer, "move", counting_move)
    return moves
