"""Layers of an engine stack: what sits between the server and an engine.

* ``FilterEngine``: the base of every filter's per-connection half; it
  passes everything to the layer below unless the filter overrides it.
* ``EngineAdapter``: the bottom of every stack, right above the engine
  (``Backend.open_engine`` puts it there): the one place where FUA is
  emulated and a fast zero the engine cannot promise is refused.
* ``SerializedEngine``: the top, where a layer's thread model forbids
  concurrent calls.

The interface they all implement is engine.Engine.
"""

import errno
import threading

from .engine import (FLAG_FAST_ZERO, FLAG_FUA, FUA_NATIVE, PARALLEL, Engine,
                     EngineError, stricter)

_FORWARDED_CALLS = ("get_size", "block_size", "can_write", "can_flush",
                    "can_fua", "can_trim", "can_zero", "can_fast_zero",
                    "can_extents", "can_cache", "can_multi_conn",
                    "is_rotational", "is_latency_bound", "pwrite", "flush",
                    "trim", "zero", "extents", "cache", "close",
                    "submit_pread", "submit_pwrite", "submit_zero",
                    "complete_on")


class FilterEngine(Engine):
    """An engine that passes everything to ``next`` unless overridden.

    Filters (--filter=NAME) subclass this; a filter changes one behaviour
    and inherits the rest, so adding one touches nothing else.  Reads go
    through the filter's own ``pread`` when it has one, so a filter that
    overrides pread alone is never bypassed by the server's sparse or
    asynchronous reads; one that leaves reads alone passes them through
    untouched (file ranges, holes and all).
    """

    # The class attributes are this filter's own needs; the instance's
    # combine them with the layers below.
    thread_model = PARALLEL
    keeps_write_buffers = False

    # A filter that puts a new engine in ``self.next`` while open (retry
    # reopens the layer below) sets this: what it leaves alone then looks
    # up ``self.next`` at each call instead of being bound to the first.
    replaces_next = False

    def __init__(self, next_engine):
        self.next = next_engine
        cls = type(self)
        self.thread_model = stricter(cls.thread_model,
                                     next_engine.thread_model)
        self.keeps_write_buffers = (cls.keeps_write_buffers or
                                    next_engine.keeps_write_buffers)
        if not cls.replaces_next:
            for name in _FORWARDED_CALLS:
                if not _overrides(cls, name):
                    # Bound straight to the layer below: no extra call
                    # per request for what the filter leaves alone.
                    setattr(self, name, getattr(next_engine, name))
        self._own_pread = _overrides(cls, "pread")
        # A filter that reads for itself (either way of reading) must
        # see every read: asynchronous reads would bypass it.
        self._own_reads = self._own_pread or _overrides(cls, "pread_sparse")
        # Only data that passed through untouched goes back down.
        self._passes_reads_up = not self._own_reads and not _overrides(
            cls, "submit_pread")

    # Forwarding bodies, for super() calls from filters (instances bind
    # what they do not override straight to the layer below).
    def get_size(self):
        return self.next.get_size()

    def block_size(self):
        return self.next.block_size()

    def can_write(self):
        return self.next.can_write()

    def can_flush(self):
        return self.next.can_flush()

    def can_fua(self):
        return self.next.can_fua()

    def can_trim(self):
        return self.next.can_trim()

    def can_zero(self):
        return self.next.can_zero()

    def can_fast_zero(self):
        return self.next.can_fast_zero()

    def can_extents(self):
        return self.next.can_extents()

    def can_cache(self):
        return self.next.can_cache()

    def can_multi_conn(self):
        return self.next.can_multi_conn()

    def is_rotational(self):
        return self.next.is_rotational()

    def is_latency_bound(self):
        return self.next.is_latency_bound()

    def pwrite(self, buf, offset, flags=0):
        return self.next.pwrite(buf, offset, flags)

    def flush(self, flags=0):
        return self.next.flush(flags)

    def trim(self, count, offset, flags=0):
        return self.next.trim(count, offset, flags)

    def zero(self, count, offset, flags=0):
        return self.next.zero(count, offset, flags)

    def extents(self, count, offset, flags=0):
        return self.next.extents(count, offset, flags)

    def cache(self, count, offset, flags=0):
        return self.next.cache(count, offset, flags)

    def close(self):
        return self.next.close()

    def pread(self, count, offset, flags=0):
        return self.next.pread(count, offset, flags)

    def pread_sparse(self, count, offset, flags=0):
        if self._own_pread:
            return [(offset, self.pread(count, offset, flags))]
        return self.next.pread_sparse(count, offset, flags)

    def write_target(self, count, offset):
        # A filter that sees writes must see every one of them.
        if _overrides(type(self), "pwrite"):
            return None
        return self.next.write_target(count, offset)

    def can_submit(self):
        cls = type(self)
        reads = not self._own_reads or _overrides(cls, "submit_pread")
        writes = not _overrides(cls, "pwrite") or \
            _overrides(cls, "submit_pwrite")
        zeros = not _overrides(cls, "zero") or _overrides(cls, "submit_zero")
        return reads and writes and zeros and self.next.can_submit()

    def submit_pread(self, count, offset, flags, done):
        self.next.submit_pread(count, offset, flags, done)

    def submit_pwrite(self, buf, offset, flags, done):
        self.next.submit_pwrite(buf, offset, flags, done)

    def submit_zero(self, count, offset, flags, done):
        self.next.submit_zero(count, offset, flags, done)

    def complete_on(self, put):
        self.next.complete_on(put)

    def recycle(self, data):
        # A filter that saw the data on its way up may have kept it.
        if self._passes_reads_up:
            self.next.recycle(data)


def _overrides(cls, name):
    """Whether a FilterEngine subclass defines its own ``name``."""
    return getattr(cls, name) is not getattr(FilterEngine, name)


class EngineAdapter(FilterEngine):
    """The bottom of every stack, directly above the engine: emulates FUA
    with a flush where the engine cannot do it, and refuses a fast zero
    the engine cannot promise, so neither engines nor filters need to."""

    def __init__(self, next_engine):
        super().__init__(next_engine)
        self._fua = next_engine.can_fua()

    def _with_fua(self, method, args, flags):
        if flags & FLAG_FUA and self._fua != FUA_NATIVE:
            method(*args, flags=flags & ~FLAG_FUA)
            self.next.flush()
        else:
            method(*args, flags=flags)

    def pwrite(self, buf, offset, flags=0):
        self._with_fua(self.next.pwrite, (buf, offset), flags)

    def trim(self, count, offset, flags=0):
        self._with_fua(self.next.trim, (count, offset), flags)

    def zero(self, count, offset, flags=0):
        if flags & FLAG_FAST_ZERO:
            if not self.next.can_fast_zero():
                raise EngineError(errno.ENOTSUP, "zeroing is not fast here",
                                  expected=True)
        self._with_fua(self.next.zero, (count, offset), flags)

    def submit_zero(self, count, offset, flags, done):
        if flags & FLAG_FAST_ZERO and not self.next.can_fast_zero():
            done(EngineError(errno.ENOTSUP, "zeroing is not fast here",
                             expected=True), None)
        else:
            self.next.submit_zero(count, offset, flags, done)

    def write_target(self, count, offset):
        # Only plain writes (no FUA) are ever moved into a file.
        return self.next.write_target(count, offset)

    def can_submit(self):
        return self.next.can_submit()


class SerializedEngine(FilterEngine):
    """Wraps a stack whose thread model forbids concurrent calls."""

    def __init__(self, next_engine):
        super().__init__(next_engine)
        self.thread_model = PARALLEL
        self._lock = threading.Lock()
        for name in ("pread", "pread_sparse", "pwrite", "flush", "trim",
                     "zero", "extents", "cache"):
            setattr(self, name, self._locked(getattr(next_engine, name)))

    def _locked(self, method):
        lock = self._lock

        def call(*args, **kwargs):
            with lock:
                return method(*args, **kwargs)
        return call

    def write_target(self, count, offset):
        return None     # a write outside the lock would not be serialized

    def can_submit(self):
        return False
