"""--filter=readahead: read more than asked while the client reads in
order, and answer the next reads from what was read.

Each connection keeps one buffer.  A read it does not cover is read from
the layer below at least ``window`` bytes long; a read that starts just
where the buffer ends doubles the window (64K up to 4M, and never more
than the layer below takes in one request), any other miss starts again
at 64K.  This is the design of nbdkit's readahead before 1.32, which
helps where the engine cannot prefetch (VDDK has no cache request).

The data a client sees never changes: a write, zero or trim through any
connection throws every buffer away, before and after it, and a buffer
filled while one ran is not used.
"""

import threading

from ..engine import in_memory
from ..layers import FilterEngine
from .base import FilterBackend, noted_around

WINDOW_MIN = 64 * 1024
WINDOW_MAX = 4 * 1024 * 1024


class ReadaheadEngine(FilterEngine):
    def __init__(self, backend, below, request):
        super().__init__(below)
        self.backend = backend
        self.max_window = max(WINDOW_MIN,
                              min(WINDOW_MAX, below.block_size()[2]))
        self.window = WINDOW_MIN
        self.buffer = b""
        self.position = 0
        self.generation = -1    # the writes count the buffer was read at
        self.lock = threading.Lock()

    def _covers(self, count, offset):
        return (self.generation == self.backend.generation and
                self.position <= offset and
                offset + count <= self.position + len(self.buffer))

    def pread(self, count, offset, flags=0):
        with self.lock:
            if not self._covers(count, offset):
                follows = (self.generation == self.backend.generation and
                           offset == self.position + len(self.buffer))
                self.window = (min(self.window * 2, self.max_window)
                               if follows else WINDOW_MIN)
                self._fill(count, offset, flags)
            start = offset - self.position
            return self.buffer[start:start + count]

    def _fill(self, count, offset, flags):
        generation = self.backend.generation
        length = min(max(count, self.window), self.next.get_size() - offset)
        self.buffer = b""   # let the old one go before reading the next
        self.buffer = in_memory(self.next.pread(length, offset, flags))
        self.position = offset
        self.generation = generation

    def pwrite(self, buf, offset, flags=0):
        return noted_around(self.backend.changed, self.next.pwrite, buf,
                            offset, flags)

    def zero(self, count, offset, flags=0):
        return noted_around(self.backend.changed, self.next.zero, count,
                            offset, flags)

    def trim(self, count, offset, flags=0):
        return noted_around(self.backend.changed, self.next.trim, count,
                            offset, flags)

    def close(self):
        self.buffer = b""
        self.next.close()


class ReadaheadFilter(FilterBackend):
    name = "readahead"
    summary = "read ahead of a client that reads in order"
    engine_class = ReadaheadEngine

    def configure(self, params):
        # Counts writes through every connection: a buffer read under an
        # older count may hold what a write has since changed.
        self.generation = 0
        self._lock = threading.Lock()

    def changed(self):
        with self._lock:
            self.generation += 1


FILTER = ReadaheadFilter
