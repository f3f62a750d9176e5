"""--filter=retry: when a request fails, reopen the disk and try again.

For long copies over a network that drops now and then: after a failure
the filter waits retry-delay seconds (doubled after each attempt with
retry-exponential=yes), closes the layer below, opens it again as the
connection first did (read-only from then on with retry-readonly=yes)
and repeats the request, up to ``retries`` times; then the client gets
the last error.  A reopen that fails counts as one more failed attempt.
With the defaults (5 retries, 2 s doubling) it gives up after about a
minute.

Like nbdkit's, the filter serializes requests on a connection: a reopen
must not pull the disk from under a request running beside it.
"""

import errno

from .. import log
from ..engine import (FLAG_FAST_ZERO, FLAG_FUA, FUA_NONE, SERIALIZE_REQUESTS,
                      SHUTTING_DOWN, EngineError)
from ..layers import FilterEngine
from .base import FilterBackend


def _pause(seconds):
    """Wait between attempts; True if the server began to stop meanwhile
    (a SIGTERM must not wait out a minute of back-off)."""
    return SHUTTING_DOWN.wait(seconds)


class RetryEngine(FilterEngine):
    thread_model = SERIALIZE_REQUESTS
    replaces_next = True

    def __init__(self, backend, below, request):
        super().__init__(below)
        self.backend = backend
        self.request = request
        self.reopens = 0
        self.is_open = True

    # What the filter leaves alone (get_size, can_*) is not bound to the
    # first engine (replaces_next): FilterEngine's bodies ask self.next,
    # the engine open now.

    # --- the retry loop ---------------------------------------------------
    def _attempt(self, name, call):
        """Run ``call(engine)`` on the engine open now, reopening it and
        trying again after each failure, as configured."""
        backend = self.backend
        delay = backend.delay
        attempt = 0
        while True:
            try:
                if not self.is_open:
                    raise EngineError(errno.ESHUTDOWN, "the disk could not "
                                      "be reopened")
                return call(self.next)
            except EngineError as exc:
                if exc.expected:
                    raise
                error = exc
            except OSError as exc:
                error = exc
            if attempt >= backend.retries or SHUTTING_DOWN.is_set():
                if backend.retries:
                    log.debug("retry: %s: giving up after %d retries",
                              name, attempt)
                raise error
            attempt += 1
            log.debug("retry: %s failed (%s); retry %d in %g seconds",
                      name, error, attempt, delay)
            if _pause(delay):
                raise error     # the server is stopping: no more waits
            if backend.exponential:
                delay *= 2
            self._reopen()

    def _reopen(self):
        self.reopens += 1
        if self.is_open:
            self.is_open = False
            try:
                self.next.close()
            except Exception as exc:
                log.debug("retry: closing the failed disk: %s", exc)
        try:
            self.next = self.backend.open_below(
                self.request, readonly=self.backend.force_readonly)
        except Exception as exc:
            log.debug("retry: reopening the disk failed: %s", exc)
            return
        self.is_open = True

    def _refuse_writes(self, flags, engine, capability):
        """Refusals that need no retry: read-only after a reopen, or the
        engine open now cannot do it."""
        if self.reopens and self.backend.force_readonly:
            raise EngineError(errno.EROFS, "the disk was reopened read-only "
                              "after a failure (retry-readonly=yes)")
        if not getattr(engine, capability)():
            raise EngineError(errno.EROFS, "the disk is read-only")
        if flags & FLAG_FUA and engine.can_fua() == FUA_NONE:
            raise EngineError(errno.EIO, "the disk cannot force unit access")

    def _in_range(self, engine, count, offset, writing):
        if offset + count > engine.get_size():
            raise EngineError(errno.ENOSPC if writing else errno.EIO,
                              "the request ends beyond the reopened disk")

    def _reading(self, method, count, offset, *args):
        """A read-like call: checked against the engine open now, then
        attempted."""
        def call(engine):
            self._in_range(engine, count, offset, False)
            return getattr(engine, method)(count, offset, *args)
        return self._attempt(method, call)

    def _writing(self, method, capability, count, offset, flags, *args):
        def call(engine):
            self._refuse_writes(flags, engine, capability)
            self._in_range(engine, count, offset, True)
            return getattr(engine, method)(*args + (offset, flags))
        return self._attempt(method, call)

    def pread(self, count, offset, flags=0):
        return self._reading("pread", count, offset, flags)

    def extents(self, count, offset, flags=0):
        return self._reading("extents", count, offset, flags)

    def cache(self, count, offset, flags=0):
        return self._reading("cache", count, offset, flags)

    def pwrite(self, buf, offset, flags=0):
        return self._writing("pwrite", "can_write",
                             memoryview(buf).nbytes, offset, flags, buf)

    def trim(self, count, offset, flags=0):
        return self._writing("trim", "can_trim", count, offset, flags, count)

    def zero(self, count, offset, flags=0):
        if flags & FLAG_FAST_ZERO and not (self.is_open and
                                           self.next.can_fast_zero()):
            raise EngineError(errno.ENOTSUP, "zeroing is not fast here",
                              expected=True)
        return self._writing("zero", "can_zero", count, offset, flags, count)

    def flush(self, flags=0):
        def flush(engine):
            if not engine.can_flush():
                raise EngineError(errno.EIO, "the disk cannot flush")
            return engine.flush(flags)
        return self._attempt("flush", flush)

    def close(self):
        log.debug("retry: reopens needed: %d", self.reopens)
        if self.is_open:
            self.is_open = False
            self.next.close()


class RetryFilter(FilterBackend):
    name = "retry"
    summary = "reopen the disk and retry a request that failed"
    engine_class = RetryEngine

    def configure(self, params):
        self.retries = params.get("retries", 5)
        self.delay = params.get("retry-delay") or 2
        self.exponential = params.get("retry-exponential", True)
        self.force_readonly = bool(params.get("retry-readonly"))


FILTER = RetryFilter
