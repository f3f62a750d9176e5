"""--filter=rate: limit the bandwidth of reads and writes.

nbdkit's token buckets: rate= limits all connections together,
connection-rate= each one; reads and writes have buckets of their own.
Rates are in bits per second with nbdkit's size suffixes (rate=8M is
8 Mibit/s, 1 MiB/s).  A bucket holds ``burstiness`` seconds' worth of
tokens (2 by default) and starts full, so a client may go at full speed
for that long before it is held to the rate.  A request takes its bytes
times 8 from the connection's bucket and from the global one, sleeping
while either is short.  rate-file= and connection-rate-file= name a file
whose first line, read before each request, sets a new rate (a missing
or unreadable file changes nothing).  Zeroes and trims carry no data and
are free.  Over an engine that can submit (VDDK), requests stay
submitted once they have their tokens.
"""

import threading
import time

from .. import log
from ..layers import FilterEngine
from ..params import parse_size
from .base import FilterBackend


class Bucket(object):
    """Tokens (bits) added at ``rate`` per second up to ``capacity``; a
    rate of 0 means no limit."""

    def __init__(self, rate, burst_seconds):
        self.burst_seconds = burst_seconds
        self.rate = rate or 0
        self.capacity = self.rate * burst_seconds
        self.level = self.capacity
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def adjust(self, rate):
        with self.lock:
            old = self.rate
            self.rate = rate
            self.capacity = rate * self.burst_seconds
            self.level = min(self.level, self.capacity)
        return old

    def _take(self, bits):
        """Take what there is of ``bits``; return (bits still owed,
        seconds until they will have been added)."""
        with self.lock:
            if not self.rate:
                return 0, 0.0
            now = time.monotonic()
            elapsed = max(0.0, now - self.last)
            self.last = now
            self.level = min(self.capacity,
                             self.level + self.rate * elapsed)
            if self.level >= bits:
                self.level -= bits
                return 0, 0.0
            bits -= self.level
            self.level = 0
            return bits, bits / float(self.rate)

    def consume(self, bits):
        while bits > 0:
            bits, wait = self._take(bits)
            if bits > 0:
                time.sleep(wait)


class RateFile(object):
    """A file that may hold a new rate for a bucket."""

    def __init__(self, path, bucket):
        self.path = path
        self.bucket = bucket

    def apply(self):
        try:
            with open(self.path, "rb") as f:
                line = f.readline().decode("utf-8", "replace")
        except OSError:
            return      # absent or unreadable: keep the rate
        try:
            rate = parse_size(line.strip())
        except ValueError:
            log.debug("rate: %s: %r is not a rate, ignored", self.path, line)
            return
        old = self.bucket.adjust(rate)
        if old != rate:
            log.debug("rate: %s: rate changed from %d to %d bits per "
                      "second", self.path, old, rate)


def _limits(bucket, path):
    """(bucket, the RateFile that adjusts it or None)."""
    return bucket, RateFile(path, bucket) if path else None


class RateEngine(FilterEngine):
    def __init__(self, backend, below, request):
        super().__init__(below)
        self.backend = backend
        rate = backend.connection_rate
        burst = backend.burst_seconds
        path = backend.connection_rate_file
        self.reads = (backend.reads, _limits(Bucket(rate, burst), path))
        self.writes = (backend.writes, _limits(Bucket(rate, burst), path))

    @staticmethod
    def _throttle(limits, count):
        bits = count * 8
        for bucket, rate_file in limits:
            if rate_file is not None:
                rate_file.apply()
            bucket.consume(bits)

    def pread(self, count, offset, flags=0):
        self._throttle(self.reads, count)
        return self.next.pread(count, offset, flags)

    def pwrite(self, buf, offset, flags=0):
        self._throttle(self.writes, memoryview(buf).nbytes)
        return self.next.pwrite(buf, offset, flags)

    # Submitted requests wait for their tokens on the thread that submits
    # them (the connection's reader, which then reads no further request
    # meanwhile), and go down as they were: the rate holds, and what it
    # allows stays in flight together.
    def submit_pread(self, count, offset, flags, done):
        self._throttle(self.reads, count)
        self.next.submit_pread(count, offset, flags, done)

    def submit_pwrite(self, buf, offset, flags, done):
        self._throttle(self.writes, memoryview(buf).nbytes)
        self.next.submit_pwrite(buf, offset, flags, done)

    def recycle(self, data):
        self.next.recycle(data)     # reads pass through untouched


class RateFilter(FilterBackend):
    name = "rate"
    summary = "limit the bandwidth, in total and per connection"
    engine_class = RateEngine

    def configure(self, params):
        self.connection_rate = params.get("connection-rate")
        self.connection_rate_file = params.get("connection-rate-file")
        self.burst_seconds = params.get("burstiness") or 2.0
        rate = params.get("rate")
        path = params.get("rate-file")
        # Shared by every connection.
        self.reads = _limits(Bucket(rate, self.burst_seconds), path)
        self.writes = _limits(Bucket(rate, self.burst_seconds), path)


FILTER = RateFilter
