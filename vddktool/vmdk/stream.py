"""streamOptimized extents: reading both layouts (writing new ones is
stream_writer.py's).

A stream disk is a hosted sparse file whose grains are zlib streams, each
behind a marker (virtual sector, compressed size), written once from start
to end.  Two layouts exist:

* VMware's: the header's gdOffset is all ones; the real header is a footer
  1024 bytes before the end of the file, between a footer marker and the
  end-of-stream marker.  Grain tables and the directory sit behind their
  own markers after the grains they describe.
* qemu's: the header holds the real gdOffset; no footer.

Reading (``StreamExtent``) is read-only: rewriting a compressed grain in
place is impossible, so writes are refused.
"""

import os
import struct
import zlib

from .extent import DATA, UNALLOCATED, ZERO, VmdkError
from .grains import (SECTOR, GrainTableExtent, TableCache, read_exact,
                     unpack_le_array)
from .sparse import (FLAG_COMPRESSED, FLAG_MARKERS, FLAG_ZEROED_GRAINS,
                     GD_AT_END, GTE_ZEROED, MAGIC, SparseHeader, read_header)

COMPRESS_DEFLATE = 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
GRAIN_MARKER = struct.Struct("<QI")        # lba, compressed size
META_MARKER = struct.Struct("<QII")        # sectors following, 0, type
MAX_TABLE_ENTRIES = 512
MAX_GTE_SECTOR = 0xFFFFFFFF


def meta_marker(sectors_following, marker_type):
    packed = META_MARKER.pack(sectors_following, 0, marker_type)
    return packed + bytes(SECTOR - len(packed))


def round_up(value, unit):
    return (value + unit - 1) // unit * unit


def decode_grain(fd, path, sector, grain_index, grain_size, expected_len,
                 file_size, has_markers=True):
    """The decompressed grain whose marker (or zlib data) is at ``sector``.

    ``expected_len`` is what the grain must hold at least: a whole grain,
    or less for the last grain of a disk whose size is not a multiple of
    the grain."""
    offset = sector * SECTOR
    if has_markers:
        head = read_exact(fd, path, offset, GRAIN_MARKER.size,
                          "grain marker of grain %d" % grain_index)
        lba, compressed_size = GRAIN_MARKER.unpack(head)
        if lba != grain_index * (grain_size // SECTOR):
            raise VmdkError("%s: the grain marker at sector %d says sector "
                            "%d, but the grain table put grain %d there "
                            "(damaged file)" % (path, sector, lba,
                                                grain_index))
        if compressed_size == 0:
            raise VmdkError("%s: grain %d at sector %d has a compressed size "
                            "of 0 (damaged file)"
                            % (path, grain_index, sector))
        compressed = read_exact(fd, path, offset + GRAIN_MARKER.size,
                                compressed_size,
                                "compressed grain %d" % grain_index)
    else:
        # Without markers the length is unknown; a grain never compresses
        # to more than twice its size, and zlib finds its own end.
        want = min(2 * grain_size, max(0, file_size - offset))
        compressed = read_exact(fd, path, offset, want,
                                "compressed grain %d" % grain_index)
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(compressed, grain_size + 1)
    except zlib.error as exc:
        raise VmdkError("%s: grain %d at sector %d does not decompress: %s "
                        "(damaged file)" % (path, grain_index, sector, exc))
    if len(data) > grain_size:
        raise VmdkError("%s: grain %d at sector %d decompresses to more than "
                        "a grain of %d bytes (damaged file)"
                        % (path, grain_index, sector, grain_size))
    if not inflater.eof or len(data) < expected_len:
        raise VmdkError("%s: grain %d at sector %d decompresses to %d bytes, "
                        "expected %d (truncated or damaged file)"
                        % (path, grain_index, sector, len(data),
                           expected_len))
    return data


class StreamExtent(GrainTableExtent):
    """A streamOptimized (compressed) sparse extent, read-only."""

    compressed = True
    writable = False
    # Decoded grains kept for reads smaller than a grain (a 64 KiB grain
    # read in 4 KiB requests would otherwise be inflated 16 times).
    DECODED_CACHE_GRAINS = 32

    def __init__(self, path, size_bytes, writable=False):
        self._decoded = TableCache(self.DECODED_CACHE_GRAINS)
        # Read-only whatever is asked: streams are written once, in order.
        super().__init__(path, size_bytes, False)

    def _open(self):
        path = self.path
        self.file_size = os.fstat(self.fd).st_size
        header = read_header(self.fd, path)
        if header.gd_offset == GD_AT_END:
            header = self._read_footer()
        self._check_header(header)
        self.header = header
        self.grain_size = header.grain_size * SECTOR
        self.grains_per_table = header.gtes_per_gt
        self.has_markers = bool(header.flags & FLAG_MARKERS)
        self.zeroed_grain_gtes = bool(header.flags & FLAG_ZEROED_GRAINS)
        self.capacity_bytes = header.capacity * SECTOR
        table_span = header.grain_size * header.gtes_per_gt
        tables = (header.capacity + table_span - 1) // table_span
        self.directory = unpack_le_array("I", read_exact(
            self.fd, path, header.gd_offset * SECTOR, tables * 4,
            "the grain directory"))

    def _read_footer(self):
        """The header copy VMware writes at the end, checked with the
        markers around it."""
        path = self.path
        if self.file_size < 4 * SECTOR:
            raise VmdkError("%s: the header says the grain directory is at "
                            "the end, but the file is too short for a "
                            "footer (truncated)" % path)
        tail = read_exact(self.fd, path, self.file_size - 3 * SECTOR,
                          3 * SECTOR, "the footer")
        _, size, kind = META_MARKER.unpack_from(tail, 0)
        footer = SparseHeader.unpack(tail[SECTOR:2 * SECTOR])
        eos = META_MARKER.unpack_from(tail, 2 * SECTOR)
        if size != 0 or kind != MARKER_FOOTER or footer.magic != MAGIC:
            raise VmdkError("%s: no valid footer 1024 bytes before the end "
                            "of the file (truncated or damaged stream)"
                            % path)
        if eos != (0, 0, MARKER_EOS):
            raise VmdkError("%s: no end-of-stream marker in the last sector "
                            "(truncated or damaged stream)" % path)
        if footer.gd_offset == GD_AT_END:
            raise VmdkError("%s: the footer does not say where the grain "
                            "directory is (damaged stream)" % path)
        footer.validate(path)
        return footer

    def _check_header(self, header):
        path = self.path
        if header.compress_algorithm != COMPRESS_DEFLATE and not (
                header.flags & FLAG_COMPRESSED):
            raise VmdkError("%s: not a compressed (streamOptimized) extent"
                            % path)
        if header.compress_algorithm not in (0, COMPRESS_DEFLATE):
            raise VmdkError("%s: unsupported compression algorithm %d"
                            % (path, header.compress_algorithm))
        if header.gtes_per_gt > MAX_TABLE_ENTRIES:
            raise VmdkError("%s: invalid grain table size of %d entries"
                            % (path, header.gtes_per_gt))
        if header.capacity * SECTOR < self.size:
            raise VmdkError("%s: the extent line says %d sectors but the "
                            "file holds only %d" % (path, self.size // SECTOR,
                                                    header.capacity))
        if header.gd_offset * SECTOR >= self.file_size:
            raise VmdkError("%s: the grain directory at sector %d is past "
                            "the end of the file (truncated)"
                            % (path, header.gd_offset))

    def _table(self, table_index):
        table = self._tables.get(table_index)
        if table is None:
            sector = self.directory[table_index]
            if sector == 0:
                return None
            table = unpack_le_array("I", read_exact(
                self.fd, self.path, sector * SECTOR,
                self.grains_per_table * 4,
                "grain table %d" % table_index))
            self._tables.put(table_index, table)
        return table

    def _entry(self, entry, grain_index):
        if entry == 0:
            return UNALLOCATED, None
        if entry == GTE_ZEROED and self.zeroed_grain_gtes:
            return ZERO, None
        return DATA, entry

    def _grain_bytes(self, grain_index, sector):
        data = self._decoded.get(grain_index)
        if data is None:
            expected = min(self.grain_size,
                           self.capacity_bytes - grain_index * self.grain_size)
            data = decode_grain(self.fd, self.path, sector, grain_index,
                                self.grain_size, expected, self.file_size,
                                self.has_markers)
            self._decoded.put(grain_index, data)
        return data

    def write(self, offset, data):
        self._refuse_rewrite()

    def zero(self, offset, count, may_trim=False):
        self._refuse_rewrite()

    def _refuse_rewrite(self):
        raise VmdkError("%s: streamOptimized disks cannot be rewritten in "
                        "place (serve it read-only, or convert it to another "
                        "sub-format)" % self.path)


# --- writing ----------------------------------------------------------------
