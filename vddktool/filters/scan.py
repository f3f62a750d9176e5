"""--filter=scan: prefetch the whole disk in the background.

While a client is connected, a thread of its connection walks the disk
from start to end asking the layer below to cache scan-size (2M) at a
time, so that the client's own reads later find the data warm.  With
scan-ahead (the default) a client read beyond the scan makes it skip
forward past that read.  With scan-clock (the default) a later client
resumes where the scan had got to (one clock per export, shared by all
connections); scan-forever starts again at the end.

Where the layer below cannot cache (VDDK has no cache request), or
cannot take requests in parallel, the filter warns and does nothing, as
nbdkit's does; --filter=cow cow-on-cache=true below it keeps what the
scan reads in the overlay.  Reads and writes pass through untouched, so
the asynchronous path stays open.
"""

import collections
import threading

from .. import log
from ..engine import CACHE_NONE, PARALLEL
from ..layers import FilterEngine
from .base import FilterBackend, warn


class ScanEngine(FilterEngine):
    def __init__(self, backend, below, request):
        super().__init__(below)
        self.backend = backend
        self.export_name = request.export_name
        self._stop = threading.Event()
        self._reads = collections.deque()   # ends of client reads
        self._thread = None
        if below.can_cache() == CACHE_NONE:
            warn("scan", "the disk cannot prefetch (no cache request), not "
                 "scanning; add --filter=cow cow-on-cache=true after "
                 "--filter=scan")
        elif below.thread_model != PARALLEL:
            warn("scan", "the layers below serialize requests, not "
                 "scanning (put --filter=scan after them)")
        else:
            self._thread = threading.Thread(target=self._scan,
                                            name="scan-filter")
            self._thread.daemon = True
            self._thread.start()

    def _note_read(self, end):
        if self._thread is not None and self.backend.ahead:
            self._reads.append(end)

    # Reads are only looked at: each way of reading notes where the read
    # ends and passes it on unchanged (zero-copy and asynchronous).
    def pread(self, count, offset, flags=0):
        self._note_read(offset + count)
        return self.next.pread(count, offset, flags)

    def pread_sparse(self, count, offset, flags=0):
        self._note_read(offset + count)
        return self.next.pread_sparse(count, offset, flags)

    def submit_pread(self, count, offset, flags, done):
        self._note_read(offset + count)
        self.next.submit_pread(count, offset, flags, done)

    def _scan(self):
        backend = self.backend
        step = backend.step
        try:
            size = self.next.get_size()
            while size and not self._stop.is_set():
                offset = backend.clock_start(self.export_name)
                while offset < size and not self._stop.is_set():
                    while self._reads:
                        offset = max(offset, self._reads.popleft())
                    backend.clock_advance(self.export_name, offset)
                    if offset >= size:
                        break
                    count = min(step, size - offset)
                    try:
                        self.next.cache(count, offset)
                    except Exception as exc:
                        # Advice only: a failed prefetch is not an error.
                        log.debug("scan: prefetch at %d: %s", offset, exc)
                    offset += count
                if not backend.forever:
                    log.debug("scan: finished scanning the disk")
                    return
                backend.clock_reset(self.export_name)
        except Exception as exc:
            log.debug("scan: stopped: %s", exc)

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.next.close()


class ScanFilter(FilterBackend):
    name = "scan"
    summary = "prefetch the whole disk in the background"
    engine_class = ScanEngine

    def configure(self, params):
        self.ahead = params.get("scan-ahead", True)
        self.clock = params.get("scan-clock", True)
        self.forever = bool(params.get("scan-forever"))
        self.step = params.get("scan-size") or 2 * 1024 * 1024
        self._clocks = {}               # export name -> offset reached
        self._lock = threading.Lock()

    def clock_start(self, export_name):
        with self._lock:
            return self._clocks.get(export_name, 0) if self.clock else 0

    def clock_advance(self, export_name, offset):
        with self._lock:
            if self._clocks.get(export_name, 0) < offset:
                self._clocks[export_name] = offset

    def clock_reset(self, export_name):
        with self._lock:
            self._clocks[export_name] = 0


FILTER = ScanFilter
