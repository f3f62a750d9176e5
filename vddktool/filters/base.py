"""What every filter builds on: the process-wide half of a filter.

A filter has two halves, as in nbdkit.  ``FilterBackend`` lives for the
whole process and wraps the next Backend (another filter, or the engine's
backend): it takes part in config_complete, get_ready, after_fork,
preconnect and cleanup, holds what connections share (rate's buckets,
cow's overlay, limit's count), and opens one ``FilterEngine`` per
connection over the engine it opens below.  The engine half
(layers.FilterEngine) changes what the filter changes and inherits the
rest.
"""

import collections
import threading

from .. import log
from ..engine import (PARALLEL, Backend, Extent, Tally, UsageError,
                      in_memory)
from ..layers import FilterEngine

# How a connection opened its engine, kept so that the engine below can
# be opened again the same way (retry).
OpenRequest = collections.namedtuple("OpenRequest",
                                     "export_name readonly is_tls")


class FilterBackend(Backend):
    """The process-wide half of --filter=NAME, over ``next_backend``.

    Subclasses set ``name`` (the NAME of --filter=NAME), ``summary`` (one
    line for --help) and ``engine_class`` (a FilterEngine subclass whose
    constructor takes ``(backend, engine_below, request)``), read their
    parameters in ``configure``, and override the steps they need,
    calling the base class so the layer below takes its part too.
    """

    name = "?"
    summary = ""
    engine_class = FilterEngine

    # True for a filter that never writes to the layer below (cow): every
    # layer below it, the engine included, is opened read-only.
    opens_below_readonly = False

    def __init__(self, next_backend, params, readonly=False):
        super().__init__(params, readonly)
        self.next = next_backend
        self.configure(params)

    def configure(self, params):
        """Read this filter's parameters (nbdkit's config) and set up
        what connections will share."""

    @classmethod
    def thread_model(cls):
        """This filter's own thread model (a stack takes the strictest)."""
        return getattr(cls.engine_class, "thread_model", PARALLEL)

    def usage_error(self, parameter, message):
        """A mistake in one of this filter's parameters, naming both."""
        return UsageError("%s (--filter=%s): %s" % (parameter, self.name,
                                                   message))

    # --- the process-wide steps, each passed down the stack ---------------
    def config_complete(self):
        self.next.config_complete()

    def get_ready(self):
        # The layer below first: the VDDK backend may re-exec the process
        # here, which would lose anything a filter had set up before.
        self.next.get_ready()

    def after_fork(self):
        self.next.after_fork()

    def preconnect(self, readonly):
        self.next.preconnect(readonly)

    def list_exports(self, is_tls=False):
        return self.next.list_exports(is_tls)

    def describe(self, export_name):
        return self.next.describe(export_name)

    def cleanup(self):
        self.next.cleanup()

    # --- one connection ---------------------------------------------------
    def open_engine(self, export_name, readonly, is_tls=False):
        # The adapter sits once, at the bottom of the stack: the engine
        # the layer below opens already has it.
        return self.open(export_name, readonly, is_tls)

    def open(self, export_name, readonly, is_tls=False):
        request = OpenRequest(export_name, readonly, is_tls)
        below = self.open_below(request)
        try:
            return self.engine_class(self, below, request)
        except BaseException:
            below.close()
            raise

    def open_below(self, request, readonly=False):
        """Open the layer below as ``request`` asks (read-only as well if
        ``readonly``, or if this filter never writes below)."""
        return self.next.open_engine(
            request.export_name,
            request.readonly or readonly or self.opens_below_readonly,
            request.is_tls)


class RWLock(object):
    """Many holders of the shared side, or one of the exclusive side.

    Writers that must not interleave with a read-modify-write take the
    shared side; the read-modify-write takes the exclusive side.  A
    waiting exclusive holder keeps new shared holders out, so it is not
    starved by a steady stream of them.  ``acquire_shared`` and
    ``release_shared`` may be called from different threads (a request
    submitted on one and completed on another)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def shared(self):
        return _Held(self.acquire_shared, self.release_shared)

    def exclusive(self):
        return _Held(self._acquire_exclusive, self._release_exclusive)

    def acquire_shared(self):
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1

    def release_shared(self):
        with self._cond:
            self._shared -= 1
            if not self._shared:
                self._cond.notify_all()

    def _acquire_exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True

    def _release_exclusive(self):
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


class _Held(object):
    __slots__ = ("_enter", "_exit")

    def __init__(self, enter, leave):
        self._enter = enter
        self._exit = leave

    def __enter__(self):
        self._enter()

    def __exit__(self, *exc):
        self._exit()


def clip_extents(extents, start, end):
    """``extents`` cut to [start, end): what lies outside is dropped and
    the extents across either edge are shortened (new objects: the input
    may be a cache that others read)."""
    clipped = []
    for extent in extents:
        lo = max(extent.offset, start)
        hi = min(extent.offset + extent.length, end)
        if hi > lo:
            clipped.append(Extent(lo, hi - lo, extent.flags))
    return clipped


def noted_around(note, call, *args):
    """``call(*args)`` with ``note()`` before and after it: a filter that
    remembers what it read forgets it both when a change starts and when
    it has landed, so no answer fetched meanwhile is kept."""
    note()
    try:
        return call(*args)
    finally:
        note()


def finish_at_once(done, call, *args):
    """A submitted request a filter does synchronously (a rare case that
    needs its own reads and writes): ``done`` with what ``call(*args)``
    returned, or with what it raised."""
    try:
        data = call(*args)
    except Exception as exc:
        done(exc, None)
    else:
        done(None, data)


def reassembled(parts, out, done):
    """The engine.Tally of a read split in ``parts`` parts that fill
    ``out``: ``done`` gets ``out`` once all are in, or the first error."""
    return Tally(parts, lambda error, _: done(
        error, out if error is None else None))


def placed_into(out, at, skip, length, tally):
    """A completion for one part of a read split in parts: puts
    ``length`` bytes of the part's data, from ``skip`` on, into ``out``
    at ``at``, then counts the part done in ``tally`` (engine.Tally)."""
    def done(error, data):
        if error is None:
            out[at:at + length] = memoryview(in_memory(data))[
                skip:skip + length]
        tally.one_done(error, None)
    return done


def warn(filter_name, message, *args):
    log.warning("%s: " + message, filter_name, *args)
