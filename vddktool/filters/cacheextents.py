"""--filter=cacheextents: remember the last extents answer.

qemu-img asks for one extent at a time as it walks the disk, and each
query costs VDDK a slow QueryAllocatedBlocks that could have answered for
the whole disk.  The filter asks the layer below for everything it will
give (dropping "one is enough") and answers later queries that start
inside that answer from memory.  The memory is shared by all connections
(one per export) and forgotten at every write, zero or trim, before and
after it, so no query can store what a write is changing.  Writes and
zeroes may go the asynchronous way; they are seen all the same.
"""

import threading

from ..engine import FLAG_REQ_ONE, Extent
from ..layers import FilterEngine
from .base import FilterBackend, clip_extents, noted_around


class _Cached(object):
    __slots__ = ("start", "end", "extents")

    def __init__(self, extents):
        self.start = extents[0].offset
        self.end = extents[-1].offset + extents[-1].length
        self.extents = extents


class CacheExtentsEngine(FilterEngine):
    def __init__(self, backend, below, request):
        super().__init__(below)
        self.backend = backend
        self.export_name = request.export_name

    def extents(self, count, offset, flags=0):
        backend = self.backend
        cached, generation = backend.lookup(self.export_name, offset)
        if cached is not None:
            return clip_extents(cached.extents, offset, offset + count)
        extents = self.next.extents(count, offset, flags & ~FLAG_REQ_ONE)
        backend.store(self.export_name, extents, generation)
        return extents

    def pwrite(self, buf, offset, flags=0):
        return noted_around(self.backend.forget, self.next.pwrite, buf,
                            offset, flags)

    def zero(self, count, offset, flags=0):
        return noted_around(self.backend.forget, self.next.zero, count,
                            offset, flags)

    def trim(self, count, offset, flags=0):
        return noted_around(self.backend.forget, self.next.trim, count,
                            offset, flags)

    def _forgetting(self, done):
        """Forget now, and again when the change has landed."""
        forget = self.backend.forget

        def landed(error, data):
            forget()
            done(error, data)
        forget()
        return landed

    def submit_pwrite(self, buf, offset, flags, done):
        self.next.submit_pwrite(buf, offset, flags, self._forgetting(done))

    def submit_zero(self, count, offset, flags, done):
        self.next.submit_zero(count, offset, flags, self._forgetting(done))


class CacheExtentsFilter(FilterBackend):
    name = "cacheextents"
    summary = "remember the last extents answer (fewer slow queries)"
    engine_class = CacheExtentsEngine

    def configure(self, params):
        self._lock = threading.Lock()
        self._cache = {}            # export name -> _Cached
        # Bumped by every forget(): an answer fetched across a write is
        # not stored.
        self._generation = 0

    def lookup(self, export_name, offset):
        """(the cached answer covering offset or None, the generation to
        pass to store())."""
        with self._lock:
            cached = self._cache.get(export_name)
            if cached is not None and cached.start <= offset < cached.end:
                return cached, self._generation
            return None, self._generation

    def store(self, export_name, extents, generation):
        if not extents:
            return
        with self._lock:
            if generation == self._generation:
                # A copy: the caller may change the objects it was given.
                self._cache[export_name] = _Cached(
                    [Extent(e.offset, e.length, e.flags) for e in extents])

    def forget(self):
        with self._lock:
            self._generation += 1
            self._cache.clear()


FILTER = CacheExtentsFilter
