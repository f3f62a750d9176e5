"""Hosted sparse extents (magic KDMV): monolithicSparse and split sparse.

The grain directory (GD) is read once and kept; grain tables (GTs) are read
on first use and cached.  Writes put the grain on disk before the table
entry that points at it, so a crash leaves at worst an unreferenced grain,
never an entry pointing at garbage.  The disk's lock serializes every call
that can allocate.
"""

import array
import os
import struct

from .extent import DATA, UNALLOCATED, ZERO, ExtentReader, VmdkError
from ..engine import FileRange
from .flat import (SECTOR, file_size, open_file, pread_exact, pwrite_all,
                   truncated_error)
from .grains import unpack_le_array

MAGIC = b"KDMV"

FLAG_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GD = 1 << 1
FLAG_ZEROED_GRAINS = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
# Incompatible flags live in the high half; only these two are known.
INCOMPATIBLE_MASK = 0xFFFF0000 & ~(FLAG_COMPRESSED | FLAG_MARKERS)

GD_AT_END = 0xFFFFFFFFFFFFFFFF
GTE_ZEROED = 1

UNCLEAN_SHUTDOWN_OFFSET = 72
NEWLINE_TEST = b"\n \r\n"

# Past this many cached grain tables (2 KiB each) the cache starts over:
# 16384 tables map 512 GiB of 64 KiB grains.
GT_CACHE_LIMIT = 16384


class SparseHeader(object):
    """The 512-byte header of a hosted sparse (and stream) extent."""

    LAYOUT = struct.Struct("<4sIIQQQQIQQQB4sH")
    FIELDS = ("magic", "version", "flags", "capacity", "grain_size",
              "descriptor_offset", "descriptor_size", "gtes_per_gt",
              "rgd_offset", "gd_offset", "overhead", "unclean_shutdown",
              "newline_test", "compress_algorithm")

    def __init__(self, **values):
        self.magic = MAGIC
        self.version = 1
        self.flags = FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD
        self.capacity = 0
        self.grain_size = 128
        self.descriptor_offset = 0
        self.descriptor_size = 0
        self.gtes_per_gt = 512
        self.rgd_offset = 0
        self.gd_offset = 0
        self.overhead = 0
        self.unclean_shutdown = 0
        self.newline_test = NEWLINE_TEST
        self.compress_algorithm = 0
        for key, value in values.items():
            setattr(self, key, value)

    @classmethod
    def unpack(cls, data):
        return cls(**dict(zip(cls.FIELDS, cls.LAYOUT.unpack_from(data))))

    def pack(self):
        packed = self.LAYOUT.pack(*(getattr(self, f) for f in self.FIELDS))
        return packed + bytes(SECTOR - len(packed))

    @property
    def compressed(self):
        return bool(self.flags & FLAG_COMPRESSED)

    def validate(self, path):
        """Raise VmdkError for anything this reader cannot trust."""
        if self.magic != MAGIC:
            raise VmdkError("%s: not a hosted sparse extent (magic %r, "
                            "expected KDMV)" % (path, self.magic))
        if not 1 <= self.version <= 3:
            raise VmdkError("%s: sparse header version %d is not supported "
                            "(1 to 3 are)" % (path, self.version))
        if self.flags & INCOMPATIBLE_MASK:
            raise VmdkError("%s: unknown incompatible header flags 0x%08x"
                            % (path, self.flags & INCOMPATIBLE_MASK))
        grain = self.grain_size
        if grain == 0 or grain & (grain - 1) or grain > 1 << 16:
            raise VmdkError("%s: grain size %d sectors is not a power of two "
                            "up to 65536" % (path, grain))
        gtes = self.gtes_per_gt
        if gtes == 0 or gtes > 1 << 16:
            raise VmdkError("%s: %d entries per grain table is not "
                            "supported" % (path, gtes))
        if self.capacity == 0:
            raise VmdkError("%s: the sparse header's capacity is 0" % path)

    @property
    def gd_entries(self):
        per_table = self.grain_size * self.gtes_per_gt
        return (self.capacity + per_table - 1) // per_table


def read_header(fd, path):
    header = SparseHeader.unpack(pread_exact(fd, SECTOR, 0, path))
    header.validate(path)
    return header


def read_embedded_descriptor(fd, header, path):
    """The descriptor text stored inside a sparse file, or None."""
    if not header.descriptor_offset or not header.descriptor_size:
        return None
    return pread_exact(fd, header.descriptor_size * SECTOR,
                       header.descriptor_offset * SECTOR, path)


class SparseExtent(ExtentReader):
    """One hosted sparse extent of ``size`` bytes."""

    lock_free_writes = False

    def __init__(self, path, size, writable=False):
        self.path = path
        self.size = size
        self.writable = writable
        #: set by the disk when a parent exists: (offset, count) -> bytes,
        #: the parent's data under this extent, for partial grain writes.
        self.backing = None
        self.fd = open_file(path, writable)
        try:
            self._open(size)
        except Exception:
            os.close(self.fd)
            self.fd = None
            raise

    def _open(self, size):
        path = self.path
        header = read_header(self.fd, path)
        if header.compressed:
            raise VmdkError("%s: compressed grains (streamOptimized) need "
                            "the stream reader" % path)
        if header.gd_offset == GD_AT_END:
            header = self._footer(header)
        if header.gd_offset == 0:
            raise VmdkError("%s: damaged: the header has no grain directory "
                            "offset" % path)
        self.header = header
        self.grain_bytes = header.grain_size * SECTOR
        self.table_span = self.grain_bytes * header.gtes_per_gt
        self.gt_bytes = header.gtes_per_gt * 4
        self.gt_sectors = (self.gt_bytes + SECTOR - 1) // SECTOR
        self.zeroed_grains = bool(header.flags & FLAG_ZEROED_GRAINS)
        self.file_bytes = file_size(self.fd)
        if header.capacity * SECTOR < size:
            raise VmdkError("%s: capacity %d sectors is smaller than the "
                            "extent line's %d" % (path, header.capacity,
                                                  size // SECTOR))
        self.gd = self._read_directory(header.gd_offset, "grain directory")
        self.rgd = None
        if header.flags & FLAG_REDUNDANT_GD and header.rgd_offset:
            self.rgd = self._read_directory(header.rgd_offset,
                                            "redundant grain directory")
        self._gt_cache = {}
        # New grains and tables go at the end, on a sector boundary.
        self._end = (self.file_bytes + SECTOR - 1) // SECTOR * SECTOR
        if self.writable:
            self._set_unclean(1)

    def _footer(self, header):
        """The GD is at the end (gdOffset all ones): the footer has it."""
        end = file_size(self.fd)
        if end < 3 * SECTOR:
            raise VmdkError("%s: truncated: no footer" % self.path)
        footer = SparseHeader.unpack(
            pread_exact(self.fd, SECTOR, end - 2 * SECTOR, self.path))
        if footer.magic != MAGIC or footer.gd_offset == GD_AT_END:
            raise VmdkError("%s: the grain directory is said to be at the "
                            "end but there is no footer" % self.path)
        footer.validate(self.path)
        return footer

    def _read_directory(self, sector, what):
        count = self.header.gd_entries
        start = sector * SECTOR
        if start + count * 4 > self.file_bytes:
            raise VmdkError("%s: truncated or damaged: the %s (%d entries at "
                            "sector %d) lies beyond the end of the file"
                            % (self.path, what, count, sector))
        table = unpack_le_array(
            "I", pread_exact(self.fd, count * 4, start, self.path))
        limit = self.file_bytes // SECTOR
        for index, entry in enumerate(table):
            if entry and entry + self.gt_sectors > limit:
                raise VmdkError("%s: truncated or damaged: %s entry %d "
                                "points at sector %d, past the end of the "
                                "file" % (self.path, what, index, entry))
        return table

    # --- lookup --------------------------------------------------------------
    def _table(self, gt_sector):
        table = self._gt_cache.get(gt_sector)
        if table is None:
            table = unpack_le_array("I", pread_exact(
                self.fd, self.gt_bytes, gt_sector * SECTOR, self.path))
            if len(self._gt_cache) >= GT_CACHE_LIMIT:
                self._gt_cache.clear()
            # Readers fill the cache without the disk's lock: if a writer
            # cached (and updated) this table meanwhile, its copy wins,
            # never the older one read here.
            table = self._gt_cache.setdefault(gt_sector, table)
        return table

    def _grain_entry(self, grain):
        """The GTE of grain number ``grain`` (0 when its GT is absent)."""
        gt_sector = self.gd[grain // self.header.gtes_per_gt]
        if not gt_sector:
            return 0
        return self._table(gt_sector)[grain % self.header.gtes_per_gt]

    def _state(self, entry):
        if entry == 0:
            return UNALLOCATED
        if entry == GTE_ZEROED and self.zeroed_grains:
            return ZERO
        return DATA

    def _runs(self, offset, count):
        """Yield (length, state, file byte offset or None) per grain piece,
        skipping whole tables that are absent."""
        end = offset + count
        pos = offset
        gtes = self.header.gtes_per_gt
        while pos < end:
            grain, within = divmod(pos, self.grain_bytes)
            gt_sector = self.gd[grain // gtes]
            if not gt_sector:
                table_end = (grain // gtes + 1) * self.table_span
                n = min(end, table_end) - pos
                yield n, UNALLOCATED, None
                pos += n
                continue
            table = self._table(gt_sector)
            index = grain % gtes
            while pos < end and index < gtes:
                n = min(self.grain_bytes - within, end - pos)
                entry = table[index]
                state = self._state(entry)
                where = entry * SECTOR + within if state is DATA else None
                yield n, state, where
                pos += n
                within = 0
                index += 1

    def map(self, offset, count):
        merged = []
        for n, state, _ in self._runs(offset, count):
            if merged and merged[-1][1] is state:
                merged[-1][0] += n
            else:
                merged.append([n, state])
        return [(n, state) for n, state in merged]

    def read(self, offset, count):
        """Contiguous grains in the file are read with one pread."""
        return self._read(offset, count, self._read_data)

    def read_range(self, offset, count):
        """Contiguous grains in the file are one FileRange."""
        return self._read(offset, count, self._data_range)

    def _read(self, offset, count, read_data):
        pieces = []
        run_start = run_length = 0
        for n, state, where in self._runs(offset, count):
            contiguous = run_length and where == run_start + run_length
            if state is DATA and contiguous:
                run_length += n
                continue
            if run_length:
                pieces.append(read_data(run_start, run_length))
                run_length = 0
            if state is DATA:
                run_start, run_length = where, n
            elif pieces and pieces[-1][1] is state:
                pieces[-1] = (pieces[-1][0] + n, state)
            else:
                pieces.append((n, state))
        if run_length:
            pieces.append(read_data(run_start, run_length))
        return pieces

    def _read_data(self, where, length):
        self._check_grown(where, length)
        return (length, pread_exact(self.fd, length, where, self.path))

    def _data_range(self, where, length):
        self._check_grown(where, length)
        if where + length > self.file_bytes:
            raise truncated_error(self.path, length, where)
        return (length, FileRange(self.fd, where, length))

    def _check_grown(self, where, length):
        if where + length > self.file_bytes:
            # Another connection may have grown the file since we looked.
            self.file_bytes = file_size(self.fd)

    # --- writing -------------------------------------------------------------
    def _set_unclean(self, value):
        pwrite_all(self.fd, bytes((value,)), UNCLEAN_SHUTDOWN_OFFSET,
                    self.path)

    def _allocate(self, nbytes):
        where = self._end
        self._end += (nbytes + SECTOR - 1) // SECTOR * SECTOR
        return where

    def _ensure_table(self, gd_index):
        """The GT sector for a GD index, allocating the GT (and its
        redundant copy) when the GDE is 0."""
        gt_sector = self.gd[gd_index]
        if gt_sector:
            return gt_sector
        empty = bytes(self.gt_sectors * SECTOR)
        gt_where = self._allocate(len(empty))
        pwrite_all(self.fd, empty, gt_where, self.path)
        if self.rgd is not None:
            rgt_where = self._allocate(len(empty))
            pwrite_all(self.fd, empty, rgt_where, self.path)
            self._set_directory_entry(self.rgd, self.header.rgd_offset,
                                      gd_index, rgt_where // SECTOR)
        self.file_bytes = self._end
        self._set_directory_entry(self.gd, self.header.gd_offset, gd_index,
                                  gt_where // SECTOR)
        return gt_where // SECTOR

    def _set_directory_entry(self, directory, sector, index, value):
        pwrite_all(self.fd, struct.pack("<I", value),
                    sector * SECTOR + index * 4, self.path)
        directory[index] = value

    def _set_entries(self, first_grain, values):
        """Point consecutive grains at ``values``, one pwrite per table."""
        gtes = self.header.gtes_per_gt
        done = 0
        while done < len(values):
            grain = first_grain + done
            gd_index, index = divmod(grain, gtes)
            n = min(gtes - index, len(values) - done)
            chunk = values[done:done + n]
            packed = struct.pack("<%dI" % n, *chunk)
            gt_sector = self._ensure_table(gd_index)
            # Both copies point at written data before the cache says so.
            if self.rgd is not None and self.rgd[gd_index]:
                pwrite_all(self.fd, packed,
                            self.rgd[gd_index] * SECTOR + index * 4, self.path)
            pwrite_all(self.fd, packed, gt_sector * SECTOR + index * 4,
                        self.path)
            table = self._table(gt_sector)
            table[index:index + n] = array.array(table.typecode, chunk)
            done += n

    def in_place(self, offset, count):
        """The file offset where ``count`` bytes at ``offset`` can be
        written as they are, without the disk's lock: every grain of the
        range already holds data, in one run of the file.  Else None.
        Written grains never move and their space is never reused, so
        writing into them changes no metadata."""
        start = expected = None
        for n, state, where in self._runs(offset, count):
            if state is not DATA or (start is not None and
                                     where != expected):
                return None
            if start is None:
                start = where
            expected = where + n
        return start

    def write(self, offset, data):
        view = memoryview(data).cast("B")
        pos = 0
        total = len(view)
        gb = self.grain_bytes
        while pos < total:
            grain, within = divmod(offset + pos, gb)
            n = min(gb - within, total - pos)
            entry = self._grain_entry(grain)
            state = self._state(entry)
            if state is DATA:
                pwrite_all(self.fd, view[pos:pos + n],
                            entry * SECTOR + within, self.path)
                pos += n
                continue
            if n == gb:
                # A run of whole unallocated grains: one allocation, one
                # write, one table update.
                count = 1
                while (pos + (count + 1) * gb <= total and
                       self._state(self._grain_entry(grain + count))
                       is not DATA):
                    count += 1
                span = view[pos:pos + count * gb]
                where = self._allocate(len(span))
                pwrite_all(self.fd, span, where, self.path)
                self.file_bytes = self._end
                first = where // SECTOR
                self._set_entries(grain, [first + i * self.header.grain_size
                                          for i in range(count)])
                pos += count * gb
                continue
            grain_data = self._grain_base(grain, state)
            grain_data[within:within + n] = view[pos:pos + n]
            where = self._allocate(gb)
            pwrite_all(self.fd, grain_data, where, self.path)
            self.file_bytes = self._end
            self._set_entries(grain, [where // SECTOR])
            pos += n

    def _grain_base(self, grain, state):
        """What a grain holds before a partial write: the parent's data for
        an unallocated grain, else zeros."""
        gb = self.grain_bytes
        base = bytearray(gb)
        if state is UNALLOCATED and self.backing is not None:
            start = grain * gb
            n = min(gb, self.size - start)
            if n > 0:
                base[:n] = self.backing(start, n)
        return base

    def zero(self, offset, count, may_trim=False):
        gb = self.grain_bytes
        pos = offset
        end = offset + count
        while pos < end:
            grain, within = divmod(pos, gb)
            n = min(gb - within, end - pos)
            state = self._state(self._grain_entry(grain))
            reads_zero = state is ZERO or (state is UNALLOCATED and
                                           self.backing is None)
            if reads_zero:
                pos += n
                continue
            if n == gb and self.zeroed_grains:
                count_whole = 1
                while (pos + (count_whole + 1) * gb <= end):
                    count_whole += 1
                self._set_entries(grain, [GTE_ZEROED] * count_whole)
                pos += count_whole * gb
                continue
            self.write(pos, bytes(n))
            pos += n

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        if self.fd is None:
            return
        try:
            if self.writable:
                os.fsync(self.fd)
                self._set_unclean(0)
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = None
