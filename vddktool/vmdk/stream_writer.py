"""streamOptimized extents: writing new ones.

``StreamWriter`` makes VMware's layout (see stream.py) for create-type=
stream-optimized.  How create.py hooks it in:

    writer = stream_writer.create_stream_optimized(path, size,
                                                   adapter_type, hwversion)

creates the file (it must not exist) and returns a writable extent to
serve as the disk's only extent.  Keep that one writer for the life of the
backend (every connection writes through it) and call ``writer.close()``
at cleanup.  After every ``flush()`` and after ``close()`` the file is a
complete stream (grain tables, directory, footer, end-of-stream), so a
killed server leaves the data up to the last flush readable.

The writer sets ``sequential_writes_only``: a backend serving it must not
advertise multi-conn, or nbdcopy copies distant regions of the disk at
once over several connections, which no bounded buffer can put in order.

Writes must go forwards, as nbdcopy and qemu-img convert send them.
Requests in flight arrive in any order, and a client skipping a hole may
already be writing far beyond it, so the writer buffers up to
``BUFFER_GRAINS`` unfinished grains wherever they are.  A grain is
compressed and appended once every grain before it is done, or, when the
buffer is full, the lowest buffered grains are finished (their unwritten
bytes read as zeros, as in any new disk).  A later write to a grain
already appended is refused with an error saying why.
"""

import array
import collections
import os
import threading
import zlib

from . import descriptor as descriptor_mod
from .create import disk_database
from .extent import DATA, UNALLOCATED, VmdkError
from .grains import SECTOR, GrainTableExtent, pack_le_array
from .sparse import (FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_TEST,
                     GD_AT_END, SparseHeader)
from .stream import (COMPRESS_DEFLATE, GRAIN_MARKER, MARKER_EOS, MARKER_FOOTER,
                     MARKER_GD, MARKER_GT, MAX_GTE_SECTOR, MAX_TABLE_ENTRIES,
                     meta_marker, round_up, decode_grain)

# What StreamWriter produces.
WRITER_GRAIN_SECTORS = 128
WRITER_DESCRIPTOR_SECTORS = 20
WRITER_OVERHEAD_SECTORS = 128
# 64 MiB of unfinished grains: four times what nbdcopy keeps in flight on
# one connection (64 requests of 256 KiB).
BUFFER_GRAINS = 1024
# zlib level: level 1 compresses disk data nearly as well as the default
# at several times the speed, and the writer is the bottleneck of a copy.
WRITER_ZLIB_LEVEL = 1


class _PendingGrain(object):
    """A grain being filled by writes that may arrive in any order."""

    __slots__ = ("data", "covered")

    def __init__(self, length):
        self.data = bytearray(length)
        self.covered = []          # sorted, merged [start, end) byte ranges

    def fill(self, start, chunk):
        end = start + len(chunk)
        self.data[start:end] = chunk
        merged = []
        for a, b in self.covered:
            if b < start or a > end:
                merged.append((a, b))
            else:
                start, end = min(a, start), max(b, end)
        merged.append((start, end))
        merged.sort()
        self.covered = merged

    def complete(self):
        return self.covered == [(0, len(self.data))]


class StreamWriter(GrainTableExtent):
    """A new streamOptimized file in VMware's layout, written forwards."""

    compressed = True
    writable = True
    #: Writes must arrive roughly in order: a backend serving this extent
    #: must not advertise multi-conn (nbdcopy would then copy separate
    #: regions of the disk at once, far apart).
    sequential_writes_only = True

    def __init__(self, path, size_bytes, adapter_type="ide", hwversion=4,
                 buffer_grains=BUFFER_GRAINS):
        if size_bytes <= 0 or size_bytes % SECTOR:
            raise VmdkError("%s: a stream disk needs a size that is a "
                            "non-zero multiple of 512 bytes" % path)
        self.path = path
        self.size = size_bytes
        self.grain_size = WRITER_GRAIN_SECTORS * SECTOR
        self.grains_per_table = MAX_TABLE_ENTRIES
        self._lock = threading.RLock()
        # Signalled whenever a grain's compression finishes.
        self._compressed = threading.Condition(self._lock)
        self._capacity = size_bytes // SECTOR
        table_span = self.grain_size * self.grains_per_table
        self._table_count = (size_bytes + table_span - 1) // table_span
        self._tables = {}          # table index -> array of GTEs
        self._directory = array.array("I", bytes(4 * self._table_count))
        self._pending = {}         # grain index -> _PendingGrain
        self._next_grain = 0       # grains below this are final
        # Final grains not yet appended, ascending: grain -> [data, packed]
        # with packed None while a thread compresses it.
        self._finishing = collections.OrderedDict()
        self._open_table = None    # table whose GT is not yet appended
        self._buffer_grains = buffer_grains
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL,
                              0o666)
        except OSError as exc:
            raise VmdkError("%s: cannot create the stream file: %s"
                            % (path, exc.strerror))
        self._header = self._new_header(adapter_type, hwversion)
        os.pwrite(self.fd, self._header.pack() + self._descriptor, 0)
        self._data_end = WRITER_OVERHEAD_SECTORS * SECTOR
        self._write_tail()

    def _new_header(self, adapter_type, hwversion):
        name = os.path.basename(self.path)
        extent = descriptor_mod.ExtentLine("RW", self._capacity, "SPARSE",
                                           name)
        text = descriptor_mod.build(
            "streamOptimized", [extent],
            disk_database(self.size, adapter_type, hwversion)).encode()
        room = WRITER_DESCRIPTOR_SECTORS * SECTOR
        self._descriptor = text + bytes(room - len(text))
        return SparseHeader(
            version=3,
            flags=FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity=self._capacity, grain_size=WRITER_GRAIN_SECTORS,
            descriptor_offset=1, descriptor_size=WRITER_DESCRIPTOR_SECTORS,
            gtes_per_gt=MAX_TABLE_ENTRIES, gd_offset=GD_AT_END,
            overhead=WRITER_OVERHEAD_SECTORS,
            compress_algorithm=COMPRESS_DEFLATE)

    # --- the extent interface ------------------------------------------------
    def write(self, offset, data):
        data = memoryview(data).cast("B")
        with self._lock:
            self._check_range(offset, len(data))
            self._check_forwards(offset, len(data))
            position, end = offset, offset + len(data)
            while position < end:
                grain = position // self.grain_size
                start = position - grain * self.grain_size
                length = min(self.grain_size - start, end - position)
                chunk = data[position - offset:position - offset + length]
                self._pending_grain(grain).fill(start, chunk)
                position += length
            claimed = self._finish_complete_head()
            claimed += self._finish_over_budget()
        self._compress_and_append(claimed)

    def zero(self, offset, count, may_trim=False):
        """Unwritten parts of a new stream read as zeros already, so only
        buffered grains need zeroing; zeroing a finished grain that holds
        data is refused like a backwards write."""
        with self._lock:
            self._check_range(offset, count)
            first = offset // self.grain_size
            last = (offset + count - 1) // self.grain_size
            if first < self._next_grain and self._any_data(
                    first, min(last + 1, self._next_grain)):
                self._refuse_backwards(offset)
            for grain in [g for g in self._pending if first <= g <= last]:
                pending = self._pending[grain]
                base = grain * self.grain_size
                start = max(offset, base) - base
                stop = min(offset + count, base + len(pending.data)) - base
                pending.fill(start, bytes(stop - start))
            # Zeros never finish grains they do not touch: qemu-img convert
            # zeroes the whole disk before writing any data.
            claimed = self._finish_complete_head()
        self._compress_and_append(claimed)

    def flush(self):
        """Make everything written so far durable: buffered grains become
        final, and the file is a complete stream."""
        with self._lock:
            if self.fd < 0:
                return
            claimed = self._finish_below(max(self._pending) + 1) \
                if self._pending else []
        self._compress_and_append(claimed)
        with self._lock:
            # Grains other threads are compressing must land before the
            # tail, or the tail would describe a stream without them.
            while any(packed is None
                      for _, packed in self._finishing.values()):
                self._compressed.wait()
            self._append_compressed()
            self._write_tail()
            os.fsync(self.fd)

    def close(self):
        with self._lock:
            if self.fd < 0:
                return
            try:
                self.flush()
            finally:
                super().close()

    def _table(self, table_index):
        return self._tables.get(table_index)

    def _entry(self, entry, grain_index):
        if grain_index in self._pending or grain_index in self._finishing:
            return DATA, None
        return (DATA, entry) if entry else (UNALLOCATED, None)

    def _grain_bytes(self, grain_index, sector):
        pending = self._pending.get(grain_index)
        if pending is not None:
            return bytes(pending.data)
        if grain_index in self._finishing:
            return self._finishing[grain_index][0]
        expected = min(self.grain_size, self.size - grain_index *
                       self.grain_size)
        return decode_grain(self.fd, self.path, sector, grain_index,
                            self.grain_size, expected, self._data_end)

    def map(self, offset, count):
        with self._lock:
            return super().map(offset, count)

    def read(self, offset, count):
        with self._lock:
            return super().read(offset, count)

    # --- buffering -----------------------------------------------------------
    def _check_forwards(self, offset, count):
        first = offset // self.grain_size
        if first < self._next_grain:
            self._refuse_backwards(offset)

    def _refuse_backwards(self, offset):
        raise VmdkError(
            "%s: the write at byte %d goes back to a part of the stream that "
            "is already compressed and written (stream-optimized disks are "
            "written once, in order; copy with nbdcopy or qemu-img convert)"
            % (self.path, offset))

    def _any_data(self, first, stop):
        """True when a finished grain in [first, stop) holds data."""
        for grain, (data, _) in self._finishing.items():
            if first <= grain < stop and not _all_zeros(data):
                return True
        per_table = self.grains_per_table
        for table_index, table in self._tables.items():
            base = table_index * per_table
            low, high = max(first, base), min(stop, base + per_table)
            if low < high and any(table[low - base:high - base]):
                return True
        return False

    def _pending_grain(self, grain):
        pending = self._pending.get(grain)
        if pending is None:
            length = min(self.grain_size, self.size - grain * self.grain_size)
            pending = self._pending[grain] = _PendingGrain(length)
            self._table_for(grain // self.grains_per_table)
        return pending

    def _table_for(self, table_index):
        table = self._tables.get(table_index)
        if table is None:
            table = self._tables[table_index] = array.array(
                "I", bytes(4 * self.grains_per_table))
        return table

    # Finishing a grain takes three steps.  Under the lock, it leaves the
    # buffer for the finishing queue (from then on writes to it are
    # refused).  Outside the lock, the thread that finished it compresses
    # it, so several server threads compress at once.  Under the lock
    # again, grains at the front of the queue are appended in order.

    def _finish_complete_head(self):
        """Finish the complete grains at the head of the buffer."""
        claimed = []
        while True:
            pending = self._pending.get(self._next_grain)
            if pending is None or not pending.complete():
                return claimed
            claimed += self._finish_below(self._next_grain + 1)

    def _finish_over_budget(self):
        """With the buffer full, finish the lowest buffered grains."""
        excess = len(self._pending) - self._buffer_grains
        if excess <= 0:
            return []
        return self._finish_below(sorted(self._pending)[excess - 1] + 1)

    def _finish_below(self, new_next):
        """Make every grain below ``new_next`` final (unwritten bytes of a
        buffered grain are zeros, as in any new disk); return the buffered
        ones as [(grain, data)] for the caller to compress."""
        claimed = []
        for grain in sorted(g for g in self._pending if g < new_next):
            data = bytes(self._pending.pop(grain).data)
            self._finishing[grain] = [data, None]
            claimed.append((grain, data))
        self._next_grain = max(self._next_grain, new_next)
        return claimed

    def _compress_and_append(self, claimed):
        results = [(grain, _compress_grain(data)) for grain, data in claimed]
        with self._lock:
            for grain, packed in results:
                self._finishing[grain][1] = packed
            if results:
                self._compressed.notify_all()
            self._append_compressed()

    def _append_compressed(self):
        """Append the compressed grains at the front of the queue; once
        the queue is empty, the grain tables below the buffer are done."""
        while self._finishing:
            grain, (_, packed) = next(iter(self._finishing.items()))
            if packed is None:
                return
            self._close_tables_below(grain // self.grains_per_table)
            if packed:
                self._append_grain(grain, packed)
            del self._finishing[grain]
        self._close_tables_below(self._next_grain // self.grains_per_table)

    def _append_grain(self, grain, packed):
        record = GRAIN_MARKER.pack(grain * WRITER_GRAIN_SECTORS,
                                   len(packed)) + packed
        record += bytes(round_up(len(record), SECTOR) - len(record))
        if (self._data_end + len(record)) // SECTOR > MAX_GTE_SECTOR:
            raise VmdkError("%s: the compressed stream has reached 2 TiB, "
                            "the most its 32-bit grain tables can address"
                            % self.path)
        os.pwrite(self.fd, record, self._data_end)
        table_index = grain // self.grains_per_table
        self._tables[table_index][grain % self.grains_per_table] = (
            self._data_end // SECTOR)
        self._open_table = table_index
        self._data_end += len(record)

    def _close_tables_below(self, table_index):
        """Append the grain table of the open table once no grain of it can
        change any more."""
        if self._open_table is not None and self._open_table < table_index:
            self._data_end = self._append_table(self._open_table,
                                                self._data_end)
            self._open_table = None

    def _append_table(self, table_index, position):
        """Write a GT marker and the table at ``position``; return the end."""
        table_bytes = pack_le_array(self._tables[table_index])
        sectors = len(table_bytes) // SECTOR
        os.pwrite(self.fd, meta_marker(sectors, MARKER_GT) + table_bytes,
                  position)
        self._directory[table_index] = position // SECTOR + 1
        return position + SECTOR + len(table_bytes)

    def _write_tail(self):
        """After the grains: the open table, the directory, the footer and
        the end-of-stream marker.  The next grain overwrites all of this,
        and the tail is written again at the next flush."""
        position = self._data_end
        if self._open_table is not None:
            position = self._append_table(self._open_table, position)
        directory = pack_le_array(self._directory)
        directory += bytes(round_up(len(directory), SECTOR) - len(directory))
        gd_sector = position // SECTOR + 1
        footer = SparseHeader.unpack(self._header.pack())
        footer.gd_offset = gd_sector
        tail = (meta_marker(len(directory) // SECTOR, MARKER_GD) + directory
                + meta_marker(1, MARKER_FOOTER) + footer.pack()
                + meta_marker(0, MARKER_EOS))
        os.pwrite(self.fd, tail, position)
        os.ftruncate(self.fd, position + len(tail))


def _all_zeros(data):
    # bytes.count runs at memory speed; any() is a thousand times slower
    # on a grain that really is all zeros.
    return not data[0] and data.count(0) == len(data)


def _compress_grain(data):
    """The zlib stream of a grain; b"" for a grain of zeros, which is left
    out of the stream (it reads as zeros anyway)."""
    if _all_zeros(data):
        return b""
    return zlib.compress(data, WRITER_ZLIB_LEVEL)


def create_stream_optimized(path, size_bytes, adapter_type, hwversion):
    """Create ``path`` as an empty streamOptimized disk and return the
    writer that fills it (see the module docstring)."""
    return StreamWriter(path, size_bytes, adapter_type, hwversion)
