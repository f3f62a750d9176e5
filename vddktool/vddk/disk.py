"""One open VDDK disk: the engine a connection reads and writes.

Reads and writes go out as ReadAsync and WriteAsync, so the server can
keep many requests of one connection in flight (``submit_pread``/
``submit_pwrite``); the synchronous calls are a submit and a wait.
Their completions are queued, never finished on VDDK's threads
(completions.py).

VixDiskLib handles are not safe for concurrent calls, so every call on a
handle holds the handle's lock.  nbdkit gets the same guarantee by
funnelling calls through one thread per handle; in Python that thread
costs a wake-up and a GIL hand-off per request (measured: no faster),
while the lock is only held for the instant ReadAsync takes to queue a
request.  Completions never take it.
"""

import ctypes
import errno
import threading

from .. import log
from ..buffers import BufferPool
from ..engine import (EXTENT_HOLE, EXTENT_ZERO, FLAG_REQ_ONE, FUA_EMULATE,
                      MAX_REQUEST_SIZE, PARALLEL, Engine, EngineError,
                      Extent)
from . import abi, completions
from .library import PREFIX

# VDDK's Open and Close are not thread-safe: one at a time, process-wide.
OPEN_CLOSE_LOCK = threading.Lock()

SECTOR = abi.SECTOR_SIZE
CHUNK_SECTORS = abi.MIN_CHUNK_SIZE
MAX_SECTORS_PER_QUERY = abi.MAX_CHUNK_NUMBER * CHUNK_SECTORS

# Spare read buffers per connection: enough for a window of reads in
# flight (the pool also caps their bytes).
READ_BUFFERS_KEPT = 64


# ctypes array types by length, made once: requests come in a few sizes.
_ARRAY_TYPES = {}
_ARRAY_TYPES_KEPT = 64


def _ctypes_view(buf, count):
    """A ctypes view of ``buf`` without copying when the buffer allows."""
    array_type = _ARRAY_TYPES.get(count)
    if array_type is None:
        array_type = ctypes.c_uint8 * count
        if len(_ARRAY_TYPES) < _ARRAY_TYPES_KEPT:
            _ARRAY_TYPES[count] = array_type
    try:
        return array_type.from_buffer(buf)
    except TypeError:
        return array_type.from_buffer_copy(buf)


# ---------------------------------------------------------------------------
# the engine


class VddkEngine(Engine):
    thread_model = PARALLEL
    # Synchronous writes wait for their completion; submitted ones are
    # handed back by the server after done().
    keeps_write_buffers = False

    def __init__(self, backend, connection, handle, readonly):
        self.backend = backend
        self.lib = backend.lib
        self.connection = connection
        self.handle = handle
        self.readonly = readonly
        self.capacity = 0           # sectors
        self.preferred = 4096
        self._handle_lock = threading.Lock()
        self._datapath_debug = (log.verbose() and
                                log.debug_flag("vddk.datapath", 1))
        self._timed = bool(log.debug_flag("vddk.stats"))
        # Read buffers the server has sent and given back (recycle).
        self._read_buffers = BufferPool(READ_BUFFERS_KEPT)
        # Submitted requests complete through the server's queue once it
        # has offered one (complete_on).  Synchronous calls never do:
        # nothing need be reading that queue while they wait.
        self._queueing = None   # kept alive as long as the engine
        self._submit_callback = completions.IMMEDIATE_CALLBACK

    def _call(self, function, *args):
        """A checked call on this handle (raises VddkError)."""
        with self._handle_lock:
            return self.lib.check(function, self.handle, *args)

    def load_info(self):
        info_ptr = ctypes.POINTER(abi.Info)()
        self._call("GetInfo", ctypes.byref(info_ptr))
        try:
            info = info_ptr.contents
            self.capacity = info.capacity
            physical = info.physicalSectorSize if self.lib.major >= 7 else 0
            if physical and physical & (physical - 1) == 0:
                self.preferred = max(self.preferred, physical)
            if log.debug_flag("vddk.diskinfo"):
                self._log_info(info)
        finally:
            self.lib.call("FreeInfo", info_ptr)
        with self._handle_lock:
            mode = self.lib.call("GetTransportMode", self.handle)
        log.debug("transport mode: %s",
                  mode.decode("utf-8", "replace") if mode else "unknown")

    def _log_info(self, info):
        def text(value):
            return value.decode("utf-8", "replace") if value else "(none)"
        log.debug("disk info: capacity %d sectors (%d bytes)",
                  info.capacity, info.capacity * SECTOR)
        log.debug("disk info: BIOS geometry %d/%d/%d, physical geometry "
                  "%d/%d/%d", info.biosGeo.cylinders, info.biosGeo.heads,
                  info.biosGeo.sectors, info.physGeo.cylinders,
                  info.physGeo.heads, info.physGeo.sectors)
        log.debug("disk info: adapter type %d, %d link(s), parent %s, "
                  "uuid %s", info.adapterType, info.numLinks,
                  text(info.parentFileNameHint), text(info.uuid))
        if self.lib.major >= 7:
            log.debug("disk info: sector size %d logical, %d physical",
                      info.logicalSectorSize, info.physicalSectorSize)

    # --- what the disk can do -----------------------------------------
    def get_size(self):
        return self.capacity * SECTOR

    def block_size(self):
        return (SECTOR, self.preferred, MAX_REQUEST_SIZE)

    def can_write(self):
        return not self.readonly

    def can_flush(self):
        return True

    def can_fua(self):
        return FUA_EMULATE

    def can_zero(self):
        return not self.readonly

    def can_fast_zero(self):
        return False

    def can_extents(self):
        return self.lib.has("QueryAllocatedBlocks")

    def can_submit(self):
        return True

    def is_latency_bound(self):
        # Remote disks wait on the network; local ones on VDDK's own
        # queue, which a request at a time leaves idle just the same.
        return True

    # --- data ---------------------------------------------------------
    def complete_on(self, put):
        self._queueing = completions.QueueingCallback(put)
        self._submit_callback = self._queueing.pointer

    def _start(self, function, buffer, count, offset, done, callback):
        """Queue one ReadAsync or WriteAsync; ``done`` follows, through
        ``callback``."""
        array = _ctypes_view(buffer, count)
        request_id = completions.start(completions.Transfer(
            self.lib, function, count, buffer, array, done, self._timed))
        sector, sectors = offset // SECTOR, count // SECTOR
        if self._datapath_debug:
            log.debug("%s%s: sector %d, %d sectors, request %d", PREFIX,
                      function, sector, sectors, request_id)
        call = self.lib.functions[function]
        with self._handle_lock:
            err = call(self.handle, sector, sectors, array, callback,
                       request_id)
        if err != abi.VIX_ASYNC:
            # Refused (or done on the spot): no callback will come.
            transfer = completions.forget(request_id)
            if transfer is not None:
                transfer.finish(err)

    def submit_pread(self, count, offset, flags, done):
        self._read(count, offset, done, self._submit_callback)

    def _read(self, count, offset, done, callback):
        if offset % SECTOR or count % SECTOR:
            done(_unaligned(count, offset), None)
        elif count:
            self._start("ReadAsync", self._read_buffers.get(count), count,
                        offset, done, callback)
        else:
            done(None, bytearray())

    def submit_pwrite(self, buf, offset, flags, done):
        self._write(buf, offset, done, self._submit_callback)

    def _write(self, buf, offset, done, callback):
        count = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
        if offset % SECTOR or count % SECTOR:
            done(_unaligned(count, offset), None)
        elif self.readonly:
            done(EngineError(errno.EPERM, "this disk is read-only"), None)
        elif count:
            self._start("WriteAsync", buf, count, offset, done, callback)
        else:
            done(None, None)

    def recycle(self, data):
        if type(data) is bytearray:
            self._read_buffers.give_back(data)

    def pread(self, count, offset, flags=0):
        return completions.wait_for(self._read, count, offset)

    def pwrite(self, buf, offset, flags=0):
        completions.wait_for(self._write, buf, offset)

    def flush(self, flags=0):
        # Flush only covers writes VDDK has been handed, so let the
        # queued ones land first (one lock: no new request in between).
        with self._handle_lock:
            self.lib.check("Wait", self.handle)
            self.lib.check("Flush", self.handle)

    # --- extents ------------------------------------------------------
    def _allocated_blocks(self, start, sectors):
        """[(start, length)] in sectors of the allocated chunks in a
        chunk-aligned range."""
        block_list = ctypes.POINTER(abi.BlockList)()
        with self._handle_lock:
            self.lib.check("QueryAllocatedBlocks", self.handle, start,
                           sectors, CHUNK_SECTORS, ctypes.byref(block_list))
        try:
            blocks = [(b.offset, b.length) for b in abi.blocks_of(block_list)]
        finally:
            self.lib.call("FreeBlockList", block_list)
        if log.debug_flag("vddk.extents"):
            for block_start, length in blocks:
                log.debug("allocated: sector %d, %d sectors",
                          block_start, length)
        return blocks

    def _query_runs(self, start, end, req_one):
        """(start, length, flags) runs in sectors covering [start, end),
        both multiples of the chunk size."""
        runs = []
        while start < end:
            sectors = min(end - start, MAX_SECTORS_PER_QUERY)
            cursor, stop = start, start + sectors
            for block_start, length in self._allocated_blocks(start,
                                                              sectors):
                block_start = max(block_start, cursor)
                block_end = min(block_start + length, stop)
                if block_end <= block_start:
                    continue
                if block_start > cursor:
                    runs.append((cursor, block_start - cursor,
                                 EXTENT_HOLE | EXTENT_ZERO))
                runs.append((block_start, block_end - block_start, 0))
                cursor = block_end
            if cursor < stop:
                runs.append((cursor, stop - cursor, EXTENT_HOLE | EXTENT_ZERO))
            start = stop
            if req_one:
                break
        return runs

    def extents(self, count, offset, flags=0):
        req_one = flags & FLAG_REQ_ONE
        end_byte = min(offset + count, self.get_size())
        # QueryAllocatedBlocks only takes whole chunks, and the disk may
        # end in a partial one: that tail is reported as data.
        queryable_end = self.capacity // CHUNK_SECTORS * CHUNK_SECTORS
        first = offset // SECTOR // CHUNK_SECTORS * CHUNK_SECTORS
        last = -(-end_byte // SECTOR // CHUNK_SECTORS) * CHUNK_SECTORS
        last = min(last, queryable_end)
        runs = self._query_runs(first, last, req_one) if first < last else []
        tail = max(last, first) * SECTOR
        if tail < end_byte and not (req_one and runs):
            runs.append((tail // SECTOR, -(-(end_byte - tail) // SECTOR), 0))
        return _clip_extents(runs, offset, end_byte)

    # --- end ----------------------------------------------------------
    def close(self):
        with OPEN_CLOSE_LOCK:
            try:
                if self.handle:
                    for function in ("Wait", "Close"):
                        with self._handle_lock:
                            err = self.lib.call(function, self.handle)
                        if err != abi.VIX_OK:
                            log.error("%s", self.lib.error(function, err))
                    self.handle = abi.HandlePtr()
            finally:
                self.connection.close()


def _unaligned(count, offset):
    return EngineError(errno.EINVAL, "VDDK reads and writes whole 512-byte "
                       "sectors only (offset %d, length %d)" % (offset, count))


def _clip_extents(runs, start, end):
    """Sector runs -> byte Extents inside [start, end), neighbours with the
    same flags merged."""
    extents = []
    for run_start, length, flags in runs:
        lo = max(run_start * SECTOR, start)
        hi = min((run_start + length) * SECTOR, end)
        if hi <= lo:
            continue
        if extents and extents[-1].flags == flags and \
                extents[-1].offset + extents[-1].length == lo:
            extents[-1].length += hi - lo
        else:
            extents.append(Extent(lo, hi - lo, flags))
    if not extents:
        extents.append(Extent(start, max(end - start, 1), 0))
    return extents
