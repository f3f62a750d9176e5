"""Time spent in each VixDiskLib call, for -D vddk.stats=1.

VDDK is slow in uneven ways (QueryAllocatedBlocks, ConnectEx); the summary
at exit tells an administrator which call to blame.
"""

import threading
import time

from .. import log


class CallStats(object):
    __slots__ = ("seconds", "calls", "nbytes")

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self.nbytes = 0


class Stats(object):
    def __init__(self):
        self._lock = threading.Lock()
        self._by_name = {}

    def record(self, name, seconds, nbytes=0):
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None:
                entry = self._by_name[name] = CallStats()
            entry.seconds += seconds
            entry.calls += 1
            entry.nbytes += nbytes

    def snapshot(self):
        """{name: (seconds, calls, bytes)}"""
        with self._lock:
            return dict((name, (e.seconds, e.calls, e.nbytes))
                        for name, e in self._by_name.items())

    def report_lines(self):
        """The summary table, slowest function first."""
        rows = sorted(self.snapshot().items(),
                      key=lambda item: (-item[1][0], item[0]))
        lines = ["VDDK function stats (-D vddk.stats=1):",
                 "%-28s %14s %8s %14s" % ("VixDiskLib_...", "usecs",
                                          "calls", "bytes")]
        for name, (seconds, calls, nbytes) in rows:
            lines.append("  %-26s %14d %8d %14s" % (
                name, int(seconds * 1e6), calls,
                nbytes if nbytes else ""))
        return lines

    def log_report(self):
        if not log.debug_flag("vddk.stats"):
            return
        for line in self.report_lines():
            log.debug("%s", line)


# One table per process: connections share the library.
STATS = Stats()


def now():
    # monotonic, so a clock step cannot make a call look negative.
    return time.monotonic()
