"""What the benchmarks share: paths, the client environment, test data,
a server process on a Unix socket, and interleaved timed runs."""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
# Debian's NBD clients and servers, ahead of pyenv's shims.
CLIENT_ENV = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ["PATH"])


def make_source(path, size_mib, sparse=False):
    """Two thirds data, one third zeros (holes when ``sparse``), so sparse
    formats have something to skip."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size_mib):
            if i % 3 == 2:
                if sparse:
                    f.seek(MiB, os.SEEK_CUR)
                else:
                    f.write(bytes(MiB))
            else:
                f.write(chunk[i:] + chunk[:i])
        f.truncate(size_mib * MiB)


def preallocate(path, size_mib):
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size_mib * MiB)


def timed(argv):
    start = time.monotonic()
    subprocess.check_call(argv, env=CLIENT_ENV)
    return time.monotonic() - start


def nbdcopy(workload, source, uri):
    """A write workload copies ``source`` into the server; anything else
    reads the server's disk and throws it away."""
    options = ["--connections=1"] if workload.endswith("1conn") else []
    if "write" in workload:
        return ["nbdcopy"] + options + [source, uri]
    return ["nbdcopy"] + options + [uri, "null:"]


def interleaved_rates(servers, measure, runs, warm_up=True):
    """{name: median of ``runs`` values of measure(uri)}, measuring each
    server in turn (A, B, C, A, B, C..., so a noisy neighbour hurts all
    alike), after one warm-up run each.  Every server is stopped at the
    end, even on failure."""
    try:
        rates = dict((s.name, []) for s in servers)
        if warm_up:
            for s in servers:
                measure(s.uri)
        for _ in range(runs):
            for s in servers:
                rates[s.name].append(measure(s.uri))
    finally:
        for s in servers:
            s.stop()
    return dict((name, statistics.median(r)) for name, r in rates.items())


def copy_rates(servers, workload, source, size_mib, runs):
    """MiB/s by server name: nbdcopy's median over ``runs`` interleaved
    runs (see interleaved_rates).  Before each write, untimed, the page
    cache's dirty data goes to disk (sync): otherwise the kernel writes
    back the last run's gigabyte during whichever run comes next, and
    that run pays for it on one of the two cores."""
    def rate(uri):
        if "write" in workload:
            subprocess.check_call(["sync"])
        return size_mib / timed(nbdcopy(workload, source, uri))
    return interleaved_rates(servers, rate, runs)


def convert(source, target, subformat):
    subprocess.check_call(["qemu-img", "convert", "-O", "vmdk", "-o",
                           "subformat=" + subformat, source, target],
                          env=CLIENT_ENV)


class Served(object):
    """A server started on a Unix socket; stop() (or leaving a with-block)
    ends it and removes the socket."""

    def __init__(self, name, argv, sock, env=None):
        self.name = name
        self.sock = sock
        self.uri = "nbd+unix:///?socket=" + sock
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     env=dict(CLIENT_ENV, **(env or {})),
                                     cwd=ROOT)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("%s did not start: %r" % (self.name, argv))
            time.sleep(0.05)

    def __enter__(self):
        return self.uri

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def bench_arguments(doc, workloads, default_size=1024, more=None):
    """The options every benchmark takes (--size, --runs, --python,
    --only, --dir), plus what ``more(parser)`` adds; --only is checked
    against ``workloads`` and returned as a list."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--size", type=int, default=default_size,
                        help="MiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs vddktool")
    parser.add_argument("--only", default=",".join(workloads),
                        help="comma-separated workloads")
    parser.add_argument("--dir", default=None,
                        help="where to put the disks (default: a temp dir)")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    args.only = args.only.split(",")
    unknown = set(args.only) - set(workloads)
    if unknown:
        parser.error("unknown workload %s (choose from %s)"
                     % (", ".join(sorted(unknown)), ", ".join(workloads)))
    return args, parser


class Workspace(object):
    """A benchmark's directory: files in it, and a new socket name for
    each server started."""

    def __init__(self, work, size_mib, python):
        self.work = work
        self.size = size_mib
        self.python = python
        self._sockets = 0

    def path(self, name):
        return os.path.join(self.work, name)

    def sock(self):
        self._sockets += 1
        return self.path("nbd%d.sock" % self._sockets)
