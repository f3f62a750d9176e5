"""What a client may cost: the handshake limit's watchdog.

A client that connects and says nothing would otherwise hold its thread
and descriptor forever (qemu's CVE-2024-7409).  One watchdog thread
serves every connection: a timer thread each would double what a flood
of connections costs.
"""

import contextlib
import threading
from time import monotonic


# Dropped clients are logged at most this often (with a count of the
# others): a flood of idle connections must not flood the log too.
REPORT_SECONDS = 60.0


class NegotiationExpired(Exception):
    """The client did not finish negotiating in time."""


class HandshakeWatchdog(object):
    """Calls ``connection.negotiation_expired(report)`` for each
    connection that spends more than ``limit`` seconds of its own inside
    ``watch(connection)``: time the server spends on the client's behalf
    (opening a disk on a slow vCenter) is left out with ``paused()``.
    ``report`` is None when the connection should not log, else how many
    were dropped without a word since the last one that did.  ``limit``
    0 means no limit (no thread either)."""

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._deadlines = {}    # connection -> monotonic deadline
        self._thread = None
        self._stopped = False
        self._last_report = None    # only the watchdog's thread uses these
        self._unreported = 0

    @contextlib.contextmanager
    def watch(self, connection):
        """Yields a timer (use ``with timer.paused():``).  Raises
        NegotiationExpired at the end of the block if the connection
        expired meanwhile (its channel is already cut)."""
        if not self.limit:
            yield _Timer(None, connection)
            return
        with self._lock:
            self._deadlines[connection] = monotonic() + self.limit
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run,
                                                name="nbd-handshake-limit")
                self._thread.daemon = True
                self._thread.start()
            self._changed.notify()
        timer = _Timer(self, connection)
        try:
            yield timer
        finally:
            with self._lock:
                expired = self._deadlines.pop(connection, None) is None
        if expired:
            raise NegotiationExpired("negotiation took longer than %g "
                                     "seconds" % self.limit)

    def _pause(self, connection):
        """Seconds left, or None when the connection already expired."""
        with self._lock:
            deadline = self._deadlines.pop(connection, None)
        return None if deadline is None else deadline - monotonic()

    def _resume(self, connection, left):
        with self._lock:
            self._deadlines[connection] = monotonic() + left
            self._changed.notify()

    def _run(self):
        while True:
            with self._lock:
                connection = self._next_expired()
                if connection is None:
                    return
            try:
                connection.negotiation_expired(self._report())
            except Exception:   # a closed socket: it is ending anyway
                pass

    def _report(self):
        now = monotonic()
        if self._last_report is not None \
                and now - self._last_report < REPORT_SECONDS:
            self._unreported += 1
            return None
        self._last_report = now
        report, self._unreported = self._unreported, 0
        return report

    def _next_expired(self):
        """Wait for the next deadline to pass; None once stopped.  A
        scan of every deadline: there are at most --max-connections."""
        while not self._stopped:
            if not self._deadlines:
                self._changed.wait()
                continue
            connection = min(self._deadlines, key=self._deadlines.get)
            left = self._deadlines[connection] - monotonic()
            if left > 0:
                self._changed.wait(left)
                continue
            del self._deadlines[connection]
            return connection
        return None

    def stop(self):
        with self._lock:
            self._stopped = True
            self._changed.notify()
            thread = self._thread
        if thread is not None:
            thread.join()


class _Timer(object):
    """One connection's clock; ``paused()`` stops it for a while."""

    def __init__(self, watchdog, connection):
        self._watchdog = watchdog
        self._connection = connection

    @contextlib.contextmanager
    def paused(self):
        if self._watchdog is None:
            yield
            return
        left = self._watchdog._pause(self._connection)
        if left is None:
            raise NegotiationExpired("negotiation took longer than %g "
                                     "seconds" % self._watchdog.limit)
        try:
            yield
        finally:
            self._watchdog._resume(self._connection, left)
