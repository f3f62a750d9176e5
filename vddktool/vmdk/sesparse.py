"""seSparse extents: the snapshot deltas of ESXi 6.5+ on VMFS 6, read-only.

VMware publishes no specification; the layout is the one qemu reads, and
every field qemu checks is checked here too, because a file that differs
is a variant nobody has described and guessing would return wrong data.

A constant header (26 uint64) and a volatile header (whose journal must
be empty: a dirty file needs VMware's journal replay first).  A grain
directory of uint64 entries naming grain tables by index, tables of 4096
uint64 entries whose top nibble says what the grain is: 0 unallocated,
1 unmapped (SCSI UNMAP) and 2 zeroed (both read as zeros), 3 allocated,
with the grain's index split over the rest of the entry.
"""

import struct

from .extent import DATA, UNALLOCATED, ZERO, VmdkError
from .grains import SECTOR, GrainTableExtent, read_exact, unpack_le_array

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x0000000200000001
CONST_HEADER = struct.Struct("<26Q")
VOLATILE_HEADER = struct.Struct("<4Q")
GRAIN_SECTORS = 8
TABLE_SECTORS = 64
TABLE_ENTRIES = TABLE_SECTORS * SECTOR // 8

DIRECTORY_TABLE_MARK = 0x1000000000000000
ENTRY_KIND_SHIFT = 60
KIND_UNALLOCATED, KIND_UNMAPPED, KIND_ZERO, KIND_ALLOCATED = 0, 1, 2, 3


def grain_slot(entry):
    """The grain's slot in the grains area from an allocated entry: the low
    12 bits of the slot sit in bits 48-59, the rest in bits 0-47."""
    return (((entry & 0x0FFF000000000000) >> 48)
            | ((entry & 0x0000FFFFFFFFFFFF) << 12))


class SeSparseExtent(GrainTableExtent):
    """A seSparse extent.  Writing is not supported."""

    grain_size = GRAIN_SECTORS * SECTOR
    grains_per_table = TABLE_ENTRIES
    writable = False

    def __init__(self, path, size_bytes, writable=False):
        # Read-only whatever is asked: writes are refused by the disk.
        super().__init__(path, size_bytes, False)

    def _open(self):
        path = self.path
        fields = CONST_HEADER.unpack(read_exact(
            self.fd, path, 0, CONST_HEADER.size, "the seSparse header"))
        (magic, version, capacity, grain_size, table_size, flags,
         reserved1, reserved2, reserved3, reserved4,
         volatile_offset, _volatile_size, _journal_header_offset,
         _journal_header_size, _journal_offset, _journal_size,
         gd_offset, gd_size, tables_offset, _tables_size,
         _bitmap_offset, _bitmap_size, _backmap_offset, _backmap_size,
         grains_offset, _grains_size) = fields
        if magic != CONST_MAGIC:
            raise VmdkError("%s: not a seSparse extent (header magic "
                            "0x%x)" % (path, magic))
        checks = [
            (version == VERSION, "version 0x%016x" % version),
            (grain_size == GRAIN_SECTORS, "grain size %d" % grain_size),
            (table_size == TABLE_SECTORS,
             "grain table size %d" % table_size),
            (flags == 0, "flags 0x%x" % flags),
            ((reserved1, reserved2, reserved3, reserved4) == (0, 0, 0, 0),
             "non-zero reserved fields"),
        ]
        for ok, what in checks:
            if not ok:
                raise VmdkError("%s: unsupported seSparse variant: %s"
                                % (path, what))
        padding = read_exact(self.fd, path, CONST_HEADER.size,
                             SECTOR - CONST_HEADER.size, "the seSparse header")
        if any(padding):
            raise VmdkError("%s: unsupported seSparse variant: non-zero "
                            "header padding" % path)
        self._check_volatile_header(volatile_offset)
        if capacity * SECTOR < self.size:
            raise VmdkError("%s: the extent line says %d sectors but the "
                            "file holds only %d"
                            % (path, self.size // SECTOR, capacity))
        span = GRAIN_SECTORS * TABLE_ENTRIES
        needed = (capacity + span - 1) // span
        if gd_size * SECTOR // 8 < needed:
            raise VmdkError("%s: the grain directory has room for %d tables, "
                            "%d are needed (damaged file)"
                            % (path, gd_size * SECTOR // 8, needed))
        self.directory = unpack_le_array("Q", read_exact(
            self.fd, path, gd_offset * SECTOR, needed * 8,
            "the grain directory"))
        self.tables_offset = tables_offset
        self.grains_offset = grains_offset

    def _check_volatile_header(self, sector):
        raw = read_exact(self.fd, self.path, sector * SECTOR, SECTOR,
                         "the seSparse volatile header")
        magic, _free_table, _next_txn, replay_journal = \
            VOLATILE_HEADER.unpack_from(raw)
        if magic != VOLATILE_MAGIC:
            raise VmdkError("%s: bad seSparse volatile header magic 0x%x "
                            "(damaged file)" % (self.path, magic))
        if replay_journal:
            raise VmdkError("%s: the seSparse journal has not been replayed "
                            "(the snapshot was not closed cleanly; open it "
                            "once with VMware to repair it)" % self.path)
        if any(raw[VOLATILE_HEADER.size:]):
            raise VmdkError("%s: unsupported seSparse variant: non-zero "
                            "volatile header padding" % self.path)

    def _table(self, table_index):
        table = self._tables.get(table_index)
        if table is not None:
            return table
        entry = self.directory[table_index]
        if entry == 0:
            return None
        if entry & 0xFFFFFFFF00000000 != DIRECTORY_TABLE_MARK:
            raise VmdkError("%s: grain directory entry %d is 0x%016x, not a "
                            "grain table (damaged file)"
                            % (self.path, table_index, entry))
        sector = self.tables_offset + (entry & 0xFFFFFFFF) * TABLE_SECTORS
        table = unpack_le_array("Q", read_exact(
            self.fd, self.path, sector * SECTOR, TABLE_ENTRIES * 8,
            "grain table %d" % table_index))
        self._tables.put(table_index, table)
        return table

    def _entry(self, entry, grain_index):
        kind = entry >> ENTRY_KIND_SHIFT
        if kind == KIND_ALLOCATED:
            sector = self.grains_offset + grain_slot(entry) * GRAIN_SECTORS
            return DATA, sector * SECTOR
        if kind in (KIND_ZERO, KIND_UNMAPPED):
            return ZERO, None
        if entry == 0:
            return UNALLOCATED, None
        raise VmdkError("%s: grain table entry 0x%016x of grain %d is not a "
                        "known kind (damaged file)"
                        % (self.path, entry, grain_index))
