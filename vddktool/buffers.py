"""Buffers used again instead of allocated anew.

A large bytearray costs more than its size suggests: Python zeroes it,
and the C library maps fresh pages for it and hands them back when it is
freed (page faults, and in a threaded process a TLB flush on every core).
Write payloads and VDDK's read buffers come in runs of one size (nbdcopy
asks for 256 KiB at a time), so a few spares of that size are enough.
"""

import threading


class BufferPool(object):
    """Spare bytearrays, given back once nobody uses them any more, so the
    next request of the same size skips allocating and zeroing one.
    Bounded in count and bytes (requests may be 64 MiB each).  A buffer
    from ``get`` holds whatever its last user left in it."""

    def __init__(self, max_count, max_bytes=32 * 1024 * 1024):
        self._spares = []
        self._bytes = 0
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, length):
        with self._lock:
            if self._spares and len(self._spares[-1]) == length:
                self._bytes -= length
                return self._spares.pop()
        return bytearray(length)

    def give_back(self, buffer):
        size = len(buffer)
        with self._lock:
            if len(self._spares) < self._max_count and (
                    self._bytes + size <= self._max_bytes or
                    not self._spares):
                self._spares.append(buffer)
                self._bytes += size
