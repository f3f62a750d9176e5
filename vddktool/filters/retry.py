"""--filter=retry: when a request fails, reopen the disk and try again.

For long copies over a network that drops now and then: after a failure
the filter waits retry-delay seconds (doubled after each attempt with
retry-exponential=yes), closes the layer below, opens it again as the
connection first did (read-only from then on with retry-readonly=yes)
and repeats the request, up to ``retries`` times; then the client gets
the last error.  A reopen that fails counts as one more failed attempt.
With the defaults (5 retries, 2 s doubling) it gives up after about a
minute.

nbdkit's filter serializes the requests of a connection, so that a
reopen never pulls the disk from under a request running beside it;
virt-v2v and KubeVirt CDI put it on every VDDK command line, where it
leaves one request at a time waiting on the network.  Here requests run
in parallel (and are submitted, when the engine below can): each holds
the shared side of a lock while it uses the engine, and a reopen takes
the exclusive side, so it waits for the requests in progress and holds
new ones back.  Requests that fail together reopen the disk once: each
notes which opening of the disk it failed on (``generation``), and only
the first to get the exclusive side finds it still current.  A
submitted request that fails is retried on a thread of its own, so the
thread that finishes completions never waits out the back-off.
"""

import errno
import threading

from .. import log
from ..engine import (FLAG_FAST_ZERO, FLAG_FUA, FUA_NONE, SHUTTING_DOWN,
                      EngineError)
from ..layers import FilterEngine
from .base import FilterBackend, RWLock


def _pause(seconds):
    """Wait between attempts; True if the server began to stop meanwhile
    (a SIGTERM must not wait out a minute of back-off)."""
    return SHUTTING_DOWN.wait(seconds)


def _not_reopened():
    """The error of a request made while the disk is closed: the last
    reopen failed (the request's own retries may try another)."""
    return EngineError(errno.ESHUTDOWN, "the disk could not be reopened")


class RetryEngine(FilterEngine):
    replaces_next = True

    def __init__(self, backend, below, request):
        super().__init__(below)
        self.backend = backend
        self.request = request
        self.reopens = 0
        self.is_open = True
        self._in_use = RWLock()     # shared: a request; exclusive: reopen
        self._generation = 0        # how many times the disk was reopened
        self._put = None            # the server's completion queue, if any

    # What the filter leaves alone (get_size, can_*) is not bound to the
    # first engine (replaces_next): FilterEngine's bodies ask self.next,
    # the engine open now.

    # --- using the engine open now ------------------------------------
    def _enter(self):
        """(engine open now or None, its generation), held until _leave:
        no reopen meanwhile."""
        self._in_use.acquire_shared()
        return (self.next if self.is_open else None), self._generation

    def _leave(self):
        self._in_use.release_shared()

    # --- the retry loop ---------------------------------------------------
    def _attempt(self, name, call, failed=None):
        """Run ``call(engine)`` on the engine open now, reopening it and
        trying again after each failure, as configured.  ``failed``:
        (error, generation) of a first attempt already made (submitted)."""
        backend = self.backend
        delay = backend.delay
        attempt = 0
        while True:
            if failed is not None:
                (error, generation), failed = failed, None
            else:
                engine, generation = self._enter()
                try:
                    if engine is None:
                        raise _not_reopened()
                    return call(engine)
                except EngineError as exc:
                    if exc.expected:
                        raise
                    error = exc
                except OSError as exc:
                    error = exc
                finally:
                    self._leave()
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
            self._reopen(generation)

    def _reopen(self, generation):
        """Replace the engine that failed at ``generation``, unless a
        request that failed beside this one has done it already."""
        if generation != self._generation:
            return
        with self._in_use.exclusive():
            if generation != self._generation:
                return
            self._generation += 1
            self.reopens += 1
            if self.is_open:
                self.is_open = False
                try:
                    self.next.close()
                except Exception as exc:
                    log.debug("retry: closing the failed disk: %s", exc)
            try:
                engine = self.backend.open_below(
                    self.request, readonly=self.backend.force_readonly)
                if self._put is not None:
                    engine.complete_on(self._put)
            except Exception as exc:
                log.debug("retry: reopening the disk failed: %s", exc)
                return
            self.next = engine
            self.is_open = True

    def _worth_retrying(self, error):
        return isinstance(error, (EngineError, OSError)) and \
            not getattr(error, "expected", False) and \
            self.backend.retries and not SHUTTING_DOWN.is_set()

    def _submit(self, name, start, call, done):
        """``start(engine, finished)`` submits a request to the engine
        open now; if it fails, ``call(engine)`` repeats it synchronously,
        in the retry loop, on a thread of its own."""
        engine, generation = self._enter()

        def finished(error, data):
            self._leave()
            if error is None or not self._worth_retrying(error):
                done(error, data)
                return
            retrying = threading.Thread(
                target=self._retry_submitted, name="nbd-retry",
                args=(name, call, (error, generation), done))
            retrying.daemon = True  # a server stopping ends its waits
            retrying.start()
        if engine is None:
            finished(_not_reopened(), None)
            return
        try:
            start(engine, finished)
        except Exception as exc:
            finished(exc, None)

    def _retry_submitted(self, name, call, failed, done):
        try:
            data = self._attempt(name, call, failed)
        except Exception as exc:
            done(exc, None)
        else:
            done(None, data)

    def complete_on(self, put):
        self._put = put
        self.next.complete_on(put)

    def recycle(self, data):
        self.next.recycle(data)

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

    def _read_call(self, method, count, offset, *args):
        """A read-like call, checked against the engine it is made on."""
        def call(engine):
            self._in_range(engine, count, offset, False)
            return getattr(engine, method)(count, offset, *args)
        return call

    def _write_call(self, method, capability, count, offset, flags, *args):
        def call(engine):
            self._refuse_writes(flags, engine, capability)
            self._in_range(engine, count, offset, True)
            return getattr(engine, method)(*args + (offset, flags))
        return call

    def pread(self, count, offset, flags=0):
        return self._attempt("pread", self._read_call("pread", count, offset,
                                                      flags))

    def extents(self, count, offset, flags=0):
        return self._attempt("extents", self._read_call("extents", count,
                                                        offset, flags))

    def cache(self, count, offset, flags=0):
        return self._attempt("cache", self._read_call("cache", count,
                                                      offset, flags))

    def pwrite(self, buf, offset, flags=0):
        return self._attempt("pwrite", self._write_call(
            "pwrite", "can_write", memoryview(buf).nbytes, offset, flags,
            buf))

    def trim(self, count, offset, flags=0):
        return self._attempt("trim", self._write_call(
            "trim", "can_trim", count, offset, flags, count))

    def zero(self, count, offset, flags=0):
        self._refuse_slow_zero(flags)
        return self._attempt("zero", self._write_call(
            "zero", "can_zero", count, offset, flags, count))

    def _refuse_slow_zero(self, flags):
        if flags & FLAG_FAST_ZERO and not (self.is_open and
                                           self.next.can_fast_zero()):
            raise EngineError(errno.ENOTSUP, "zeroing is not fast here",
                              expected=True)

    # --- submitted: the same checks, then the engine's own submit -------
    def submit_pread(self, count, offset, flags, done):
        def start(engine, finished):
            self._in_range(engine, count, offset, False)
            engine.submit_pread(count, offset, flags, finished)
        self._submit("pread", start,
                     self._read_call("pread", count, offset, flags), done)

    def submit_pwrite(self, buf, offset, flags, done):
        self._submit_writing("pwrite", "can_write", memoryview(buf).nbytes,
                             offset, flags, buf, done)

    def submit_zero(self, count, offset, flags, done):
        try:
            self._refuse_slow_zero(flags)
        except EngineError as exc:
            done(exc, None)
            return
        self._submit_writing("zero", "can_zero", count, offset, flags, count,
                             done)

    def _submit_writing(self, method, capability, count, offset, flags,
                        first, done):
        """submit_pwrite or submit_zero (``first``: the data or the
        count), with the checks the synchronous call makes."""
        def start(engine, finished):
            self._refuse_writes(flags, engine, capability)
            self._in_range(engine, count, offset, True)
            getattr(engine, "submit_" + method)(first, offset, flags,
                                                finished)
        self._submit(method, start, self._write_call(
            method, capability, count, offset, flags, first), done)

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
