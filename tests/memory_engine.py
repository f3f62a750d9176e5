"""A disk in memory that notes every call made to it: the engine under
filters in tests that must see what a filter passes down (requests split,
prefetches issued, writes never arriving)."""

import threading

from vddktool.engine import (CACHE_NATIVE, EXTENT_HOLE, EXTENT_ZERO,
                             FUA_NATIVE, PARALLEL, Backend, Engine, Extent)


class MemoryEngine(Engine):
    """One connection's view of ``backend.data``.  ``calls`` (on the
    backend) lists (name, count, offset, flags) for every data call."""

    def __init__(self, backend, readonly):
        self.backend = backend
        self.readonly = readonly
        self.thread_model = backend.thread_model
        self.keeps_write_buffers = backend.keeps_write_buffers

    def _note(self, name, count=0, offset=0, flags=0):
        with self.backend.lock:
            self.backend.calls.append((name, count, offset, flags))

    def get_size(self):
        return len(self.backend.data)

    def block_size(self):
        return self.backend.block_limits

    def can_write(self):
        return not self.readonly

    def can_flush(self):
        return True

    def can_fua(self):
        return self.backend.fua

    def can_trim(self):
        return not self.readonly

    def can_fast_zero(self):
        return self.backend.fast_zero

    def can_extents(self):
        return True

    def can_cache(self):
        return self.backend.cache_mode

    def can_multi_conn(self):
        return True

    def pread(self, count, offset, flags=0):
        self._note("pread", count, offset, flags)
        return bytes(self.backend.data[offset:offset + count])

    def pwrite(self, buf, offset, flags=0):
        data = bytes(buf)
        self._note("pwrite", len(data), offset, flags)
        assert not self.readonly, "a write reached a read-only engine"
        self.backend.data[offset:offset + len(data)] = data

    def flush(self, flags=0):
        self._note("flush")

    def trim(self, count, offset, flags=0):
        self._note("trim", count, offset, flags)
        self.backend.data[offset:offset + count] = bytes(count)

    def zero(self, count, offset, flags=0):
        self._note("zero", count, offset, flags)
        self.backend.data[offset:offset + count] = bytes(count)

    def extents(self, count, offset, flags=0):
        """Runs of zero bytes are holes, the rest data, in 4K units."""
        self._note("extents", count, offset, flags)
        data = self.backend.data
        unit = 4096
        end = min(offset + count, len(data))
        out = []
        position = offset
        while position < end:
            stop = min(position - position % unit + unit, end)
            flags_here = (EXTENT_HOLE | EXTENT_ZERO
                          if not any(data[position:stop]) else 0)
            if out and out[-1].flags == flags_here:
                out[-1].length += stop - position
            else:
                out.append(Extent(position, stop - position, flags_here))
            position = stop
        return out

    def cache(self, count, offset, flags=0):
        self._note("cache", count, offset, flags)

    def close(self):
        self._note("close")
        with self.backend.lock:
            self.backend.open_engines -= 1


class AsyncMemoryEngine(MemoryEngine):
    """The same, offering the asynchronous calls (done at once)."""

    def can_submit(self):
        return True

    def submit_pread(self, count, offset, flags, done):
        self._note("submit_pread", count, offset, flags)
        done(None, bytes(self.backend.data[offset:offset + count]))

    def submit_pwrite(self, buf, offset, flags, done):
        data = bytes(buf)
        self._note("submit_pwrite", len(data), offset, flags)
        self.backend.data[offset:offset + len(data)] = data
        done(None, None)


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self, data, asynchronous=False, thread_model=PARALLEL,
                 fua=FUA_NATIVE, block_limits=(1, 4096, 64 * 1024 * 1024),
                 cache_mode=CACHE_NATIVE, fast_zero=True,
                 keeps_write_buffers=False, readonly=False):
        super().__init__({}, readonly)
        self.data = bytearray(data)
        self.engine_class = AsyncMemoryEngine if asynchronous \
            else MemoryEngine
        self.thread_model = thread_model
        self.fua = fua
        self.block_limits = block_limits
        self.cache_mode = cache_mode
        self.fast_zero = fast_zero
        self.keeps_write_buffers = keeps_write_buffers
        self.lock = threading.Lock()
        self.calls = []
        self.opened = 0
        self.open_engines = 0
        self.preconnects = 0

    def preconnect(self, readonly):
        self.preconnects += 1

    def open(self, export_name, readonly, is_tls=False):
        with self.lock:
            self.opened += 1
            self.open_engines += 1
        return self.engine_class(self, readonly or self.readonly)

    def calls_named(self, *names):
        with self.lock:
            return [call for call in self.calls if call[0] in names]

    def forget_calls(self):
        with self.lock:
            del self.calls[:]
