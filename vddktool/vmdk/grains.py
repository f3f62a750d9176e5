"""What the grain-table formats (stream, COWD, seSparse) have in common.

Each of them finds a virtual grain through two levels: a directory entry
names a grain table, a table entry names the grain.  Only the encoding of
the entries differs, so this base class does the walking: whole missing
tables become one run (a terabyte of unallocated space is one step, not
millions), and grains that lie back to back in the file are read with one
pread.
"""

import array
import collections
import os
import sys
import threading

from .extent import DATA, UNALLOCATED, ExtentReader, VmdkError

SECTOR = 512

# Grain tables kept in memory per extent.  A table covers 2 MiB (COWD) to
# 32 MiB (hosted sparse), so this holds the metadata of the busy part of
# even a large disk while bounding memory to a few tens of MiB.
TABLE_CACHE_ENTRIES = 1024


def read_exact(fd, path, offset, length, what):
    """``length`` bytes at ``offset``, or VmdkError naming the file: a short
    read means the file was truncated, and guessing zeros would be a silent
    wrong byte."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise VmdkError("%s: %s at byte %d runs past the end of the file "
                        "(truncated or damaged)" % (path, what, offset))
    return data


def unpack_le_array(typecode, data):
    """An array of little-endian unsigned integers (uint32 'I' or uint64
    'Q') decoded in one call, which per-entry struct calls would not be."""
    entries = array.array(typecode)
    if entries.itemsize != {"I": 4, "Q": 8}[typecode]:
        raise RuntimeError("unexpected C integer size for %r" % typecode)
    entries.frombytes(data)
    if sys.byteorder != "little":
        entries.byteswap()
    return entries


def pack_le_array(entries):
    if sys.byteorder != "little":
        entries = array.array(entries.typecode, entries)
        entries.byteswap()
    return entries.tobytes()


class TableCache(object):
    """A bounded, thread-safe least-recently-used map of grain tables."""

    def __init__(self, limit=TABLE_CACHE_ENTRIES):
        self._tables = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
            return table

    def put(self, key, table):
        with self._lock:
            self._tables[key] = table
            self._tables.move_to_end(key)
            while len(self._tables) > self._limit:
                self._tables.popitem(last=False)


class GrainTableExtent(ExtentReader):
    """Base of grain-table extents.  Subclasses set ``path``, ``fd``,
    ``size``, ``grain_size`` (bytes), ``grains_per_table`` and implement
    ``_table`` and ``_entry``; compressed formats also ``_grain_bytes``."""

    path = ""
    fd = -1
    grain_size = SECTOR
    grains_per_table = 1
    #: True when a DATA grain is not raw bytes at a file offset
    compressed = False

    def __init__(self, path, size_bytes, writable=False):
        self.path = path
        self.size = size_bytes
        self.writable = bool(writable)
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self._tables = TableCache()
        try:
            self._open()
        except BaseException:
            GrainTableExtent.close(self)
            raise

    def _open(self):
        """Read and check the headers; raise VmdkError naming the file."""
        raise NotImplementedError

    @property
    def grain_bytes(self):
        """The grain in bytes, under the name the disk layer reads to
        choose its preferred request size."""
        return self.grain_size

    def _table(self, table_index):
        """The grain table (an indexable of raw entries), or None when the
        directory has no table there (every grain under it unallocated)."""
        raise NotImplementedError

    def _entry(self, entry, grain_index):
        """(state, where) for one raw table entry.  For DATA, ``where`` is
        the byte offset of the grain in the file (raw formats) or what
        ``_grain_bytes`` needs (compressed formats)."""
        raise NotImplementedError

    def _grain_bytes(self, grain_index, where):
        """The whole decoded grain (compressed formats only)."""
        raise NotImplementedError

    # --- walking ------------------------------------------------------------
    def _check_range(self, offset, count):
        if offset < 0 or count < 0 or offset + count > self.size:
            raise VmdkError("%s: request for %d bytes at %d is outside the "
                            "extent of %d bytes"
                            % (self.path, count, offset, self.size))

    def _pieces(self, offset, count):
        """Yield (length, state, where, start, grain) in order, covering
        exactly ``count`` bytes from ``offset``: a run of grains in the
        same state from ``start`` bytes into ``grain``.  A DATA run of a
        raw format is contiguous in the file from ``where``; a DATA run of
        a compressed format is one grain."""
        self._check_range(offset, count)
        end = offset + count
        grain_size = self.grain_size
        per_table = self.grains_per_table
        table_span = grain_size * per_table
        merge_data = not self.compressed
        entry_of = self._entry
        while offset < end:
            table_index = offset // table_span
            table_end = min(end, (table_index + 1) * table_span)
            table = self._table(table_index)
            if table is None:
                yield table_end - offset, UNALLOCATED, None, 0, None
                offset = table_end
                continue
            base = table_index * per_table
            first = offset // grain_size
            run = None      # [length, state, where, start, grain, next]
            for grain in range(first, (table_end - 1) // grain_size + 1):
                state, where = entry_of(table[grain - base], grain)
                grain_offset = grain * grain_size
                start = offset - grain_offset if grain == first else 0
                length = min(grain_size, table_end - grain_offset) - start
                if run is not None and run[1] == state and (
                        state != DATA or (merge_data and where == run[5])):
                    run[0] += length
                    if state == DATA:
                        run[5] += grain_size
                    continue
                if run is not None:
                    yield run[0], run[1], run[2], run[3], run[4]
                following = where + grain_size if (
                    state == DATA and merge_data) else None
                run = [length, state, where, start, grain, following]
            yield run[0], run[1], run[2], run[3], run[4]
            offset = table_end

    def map(self, offset, count):
        runs = []
        for length, state, _, _, _ in self._pieces(offset, count):
            if runs and runs[-1][1] == state:
                runs[-1] = (runs[-1][0] + length, state)
            else:
                runs.append((length, state))
        return runs

    def read(self, offset, count):
        runs = []
        # A pending raw run: [file_offset, length]; flushed into one pread
        # when the next piece is not its continuation in the file.
        pending = None
        for length, state, where, start, grain in self._pieces(offset,
                                                               count):
            if state == DATA and not self.compressed:
                file_offset = where + start
                if pending and pending[0] + pending[1] == file_offset:
                    pending[1] += length
                    continue
                if pending:
                    runs.append(self._read_raw(*pending))
                pending = [file_offset, length]
                continue
            if pending:
                runs.append(self._read_raw(*pending))
                pending = None
            if state == DATA:
                data = self._grain_bytes(grain, where)
                runs.append((length, memoryview(data)[start:start + length]))
            elif runs and runs[-1][1] == state:
                runs[-1] = (runs[-1][0] + length, state)
            else:
                runs.append((length, state))
        if pending:
            runs.append(self._read_raw(*pending))
        return runs

    def _read_raw(self, file_offset, length):
        return length, read_exact(self.fd, self.path, file_offset, length,
                                  "grain data")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
