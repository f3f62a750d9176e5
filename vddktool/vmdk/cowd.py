"""ESXi vmfsSparse extents (magic COWD): the deltas of ESXi snapshots.

A 2048-byte header of uint32 fields, a grain directory of sector numbers
of grain tables, tables of 4096 sector numbers of grains.  0 means "not
allocated": the parent's data, or zeros for a root disk.  There is no
zeroed-grain entry, so making a grain of a child read as zeros means
writing zeros into it.

New grains and tables go at freeSector, which is then moved on.  Order of
writes on allocation, so a crash never leaves an entry pointing at
garbage: the grain (or zeroed table) first, then freeSector, then the
entry that points at it.  uncleanShutdown is set while the file is open
for writing.

create-type=vmfs-sparse: ``create_vmfs_sparse(descriptor_path, size,
adapter_type, hwversion)`` writes the descriptor (createType vmfsSparse)
and an empty NAME-delta.vmdk next to it.
"""

import array
import os
import struct
import threading

from .. import log
from . import descriptor as descriptor_mod
from .create import disk_database
from .extent import DATA, UNALLOCATED, VmdkError
from .grains import (SECTOR, GrainTableExtent, pack_le_array, read_exact,
                     unpack_le_array)

MAGIC = b"COWD"
VERSION = 1
HEADER_SIZE = 2048
# magic, version, flags, numSectors, grainSize, gdOffset, numGDEntries,
# freeSector
FIELDS = struct.Struct("<4sIIIIIII")
FREE_SECTOR_AT = 28
GEOMETRY_AT = 32
PARENT_NAME_AT, PARENT_NAME_SIZE = 32, 1024
GENERATION_AT = 1060
UNCLEAN_SHUTDOWN_AT = 1648
FLAG_ROOT = 0x01            # no parent: unallocated grains are zeros
FLAG_CHECK_CAPABLE = 0x02

TABLE_ENTRIES = 4096
TABLE_BYTES = TABLE_ENTRIES * 4
TABLE_SECTORS = TABLE_BYTES // SECTOR
# Sector numbers are uint32: a COWD file cannot grow past 2 TiB.
MAX_SECTOR = 0xFFFFFFFF
# Zeros for a child disk are written in pieces of this size.
ZERO_CHUNK = 1024 * 1024


class CowdExtent(GrainTableExtent):
    """A vmfsSparse extent, readable and (if ``writable``) writable."""

    grains_per_table = TABLE_ENTRIES
    #: ``backing(offset, count) -> bytes``: what the parent disk holds under
    #: this extent, set by the disk layer when there is a parent, so a
    #: write covering part of a new grain keeps the parent's data in the
    #: rest of it.
    backing = None

    def __init__(self, path, size_bytes, writable=False):
        self._lock = threading.Lock()
        super().__init__(path, size_bytes, writable)
        if self.writable:
            try:
                self._set_unclean(1)
            except BaseException:
                GrainTableExtent.close(self)
                raise

    def _open(self):
        path = self.path
        raw = read_exact(self.fd, path, 0, HEADER_SIZE, "the COWD header")
        (magic, version, flags, sectors, grain_sectors, gd_offset,
         gd_entries, free_sector) = FIELDS.unpack_from(raw)
        if magic != MAGIC:
            raise VmdkError("%s: not a vmfsSparse extent (no COWD magic)"
                            % path)
        if version != VERSION:
            raise VmdkError("%s: unsupported COWD version %d"
                            % (path, version))
        if (grain_sectors < 1 or grain_sectors & (grain_sectors - 1)
                or grain_sectors > 0x200000):
            raise VmdkError("%s: invalid grain size of %d sectors"
                            % (path, grain_sectors))
        if sectors * SECTOR < self.size:
            raise VmdkError("%s: the extent line says %d sectors but the "
                            "file holds only %d"
                            % (path, self.size // SECTOR, sectors))
        span = grain_sectors * TABLE_ENTRIES
        if gd_entries < (sectors + span - 1) // span:
            raise VmdkError("%s: the grain directory has %d entries, too few "
                            "for %d sectors (damaged file)"
                            % (path, gd_entries, sectors))
        if gd_offset * SECTOR < HEADER_SIZE:
            raise VmdkError("%s: the grain directory at sector %d overlaps "
                            "the header (damaged file)" % (path, gd_offset))
        self.grain_size = grain_sectors * SECTOR
        self.gd_offset = gd_offset
        self.free_sector = free_sector
        if struct.unpack_from("<I", raw, UNCLEAN_SHUTDOWN_AT)[0]:
            # Harmless for reading: entries are written after what they
            # point at.  Allocation starts past the end of the file, so
            # grains a crash left unreferenced are never handed out twice.
            log.warning("%s: the vmfsSparse file was not closed cleanly",
                        path)
        self.is_root = bool(flags & FLAG_ROOT)
        self.parent_file_name = None if self.is_root else raw[
            PARENT_NAME_AT:PARENT_NAME_AT + PARENT_NAME_SIZE].split(
                b"\0", 1)[0].decode("utf-8", "replace")
        self.directory = unpack_le_array("I", read_exact(
            self.fd, path, gd_offset * SECTOR, gd_entries * 4,
            "the grain directory"))
        file_sectors = (os.fstat(self.fd).st_size + SECTOR - 1) // SECTOR
        # Tables and grains live after the header and the directory: an
        # entry pointing into them is damage, not data.
        self._first_data_sector = gd_offset + (
            gd_entries * 4 + SECTOR - 1) // SECTOR
        if free_sector < self._first_data_sector:
            raise VmdkError("%s: freeSector %d lies inside the metadata "
                            "(damaged file)" % (path, free_sector))
        # Never allocate over something that is already there, even if a
        # crash left freeSector behind the end of the file.
        self._next_free = max(free_sector, file_sectors)

    # --- reading -----------------------------------------------------------
    def _table(self, table_index):
        table = self._tables.get(table_index)
        if table is None:
            sector = self.directory[table_index]
            if sector == 0:
                return None
            if sector < self._first_data_sector:
                raise VmdkError("%s: grain directory entry %d points at "
                                "sector %d, inside the header (damaged file)"
                                % (self.path, table_index, sector))
            table = unpack_le_array("I", read_exact(
                self.fd, self.path, sector * SECTOR, TABLE_BYTES,
                "grain table %d" % table_index))
            self._tables.put(table_index, table)
        return table

    def _entry(self, entry, grain_index):
        if entry == 0:
            return UNALLOCATED, None
        if entry < self._first_data_sector:
            raise VmdkError("%s: the entry of grain %d points at sector %d, "
                            "inside the header (damaged file)"
                            % (self.path, grain_index, entry))
        return DATA, entry * SECTOR

    # --- writing -----------------------------------------------------------
    def write(self, offset, data):
        self._check_writable()
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        with self._lock:
            self._write_locked(offset, data)

    def zero(self, offset, count, may_trim=False):
        """Allocated grains get zeros written.  Unallocated grains already
        read as zeros in a root disk; under a parent they would show the
        parent's data, so they are allocated and zeroed."""
        self._check_writable()
        self._check_range(offset, count)
        with self._lock:
            position = offset
            for length, state, where, start, _ in list(
                    self._pieces(offset, count)):
                if state == DATA or self._has_parent():
                    self._write_zeros(position, length)
                position += length

    def _write_zeros(self, offset, count):
        zeros = bytes(min(ZERO_CHUNK, count))
        end = offset + count
        while offset < end:
            n = min(len(zeros), end - offset)
            self._write_locked(offset, memoryview(zeros)[:n])
            offset += n

    def _check_writable(self):
        if not self.writable:
            raise VmdkError("%s: this extent is read-only" % self.path)

    def _write_locked(self, offset, data):
        """Write allocated grains in place (one pwrite per run that is
        contiguous in the file); give each run of unallocated grains one
        contiguous allocation."""
        position = 0
        in_place = None     # [file offset, data position, length]
        for length, state, where, start, _ in list(
                self._pieces(offset, len(data))):
            if state == DATA:
                if in_place and in_place[0] + in_place[2] == where + start:
                    in_place[2] += length
                else:
                    self._write_in_place(in_place, data)
                    in_place = [where + start, position, length]
            else:
                self._write_in_place(in_place, data)
                in_place = None
                self._allocate(offset + position,
                               data[position:position + length])
            position += length
        self._write_in_place(in_place, data)

    def _write_in_place(self, run, data):
        if run:
            file_offset, position, length = run
            os.pwrite(self.fd, data[position:position + length], file_offset)

    def _allocate(self, offset, data):
        """Give the unallocated range at ``offset`` new grains, consecutive
        in the file, holding ``data``."""
        grain_size = self.grain_size
        grain_sectors = grain_size // SECTOR
        first = offset // grain_size
        last = (offset + len(data) - 1) // grain_size
        count = last - first + 1
        head = offset - first * grain_size
        if head == 0 and len(data) == count * grain_size:
            buffer = data
        else:
            buffer = bytearray(count * grain_size)
            if head:
                self._fill_partial_grain(buffer, 0, first)
            if (head + len(data)) % grain_size and not (count == 1 and head):
                self._fill_partial_grain(buffer, count - 1, last)
            buffer[head:head + len(data)] = data
        tables = range(first // TABLE_ENTRIES, last // TABLE_ENTRIES + 1)
        for table_index in tables:
            self._ensure_table(table_index)
        sector = self._reserve(count * grain_sectors)
        os.pwrite(self.fd, buffer, sector * SECTOR)
        self._store_free_sector()
        for table_index in tables:
            base = table_index * TABLE_ENTRIES
            low = max(first, base) - base
            high = min(last + 1, base + TABLE_ENTRIES) - base
            start = sector + (base + low - first) * grain_sectors
            table = self._table(table_index)
            table[low:high] = array.array("I", range(
                start, start + (high - low) * grain_sectors, grain_sectors))
            os.pwrite(self.fd, pack_le_array(table[low:high]),
                      self.directory[table_index] * SECTOR + low * 4)

    def _has_parent(self):
        return self.backing is not None or not self.is_root

    def _fill_partial_grain(self, buffer, n, grain):
        """What a new grain holds outside the bytes being written: the
        parent's data, or zeros in a root disk."""
        if not self._has_parent():
            return
        if self.backing is None:
            raise VmdkError("%s: a write covering part of a new grain of a "
                            "snapshot needs the parent's data, and none is "
                            "available (write whole %d-byte grains)"
                            % (self.path, self.grain_size))
        grain_size = self.grain_size
        length = min(grain_size, self.size - grain * grain_size)
        parent_data = self.backing(grain * grain_size, length)
        if len(parent_data) != length:
            # Slice assignment would silently resize the buffer.
            raise VmdkError("%s: the parent gave %d bytes for a grain of %d"
                            % (self.path, len(parent_data), length))
        buffer[n * grain_size:n * grain_size + length] = parent_data

    def _ensure_table(self, table_index):
        if self.directory[table_index]:
            return
        sector = self._reserve(TABLE_SECTORS)
        os.pwrite(self.fd, bytes(TABLE_BYTES), sector * SECTOR)
        self._store_free_sector()
        os.pwrite(self.fd, struct.pack("<I", sector),
                  self.gd_offset * SECTOR + table_index * 4)
        self.directory[table_index] = sector
        self._tables.put(table_index, unpack_le_array(
            "I", bytes(TABLE_BYTES)))

    def _reserve(self, sectors):
        first = self._next_free
        if first + sectors > MAX_SECTOR:
            raise VmdkError("%s: the vmfsSparse file is full (its sector "
                            "numbers are 32-bit)" % self.path)
        self._next_free = first + sectors
        return first

    def _store_free_sector(self):
        os.pwrite(self.fd, struct.pack("<I", self._next_free),
                  FREE_SECTOR_AT)

    def _set_unclean(self, value):
        os.pwrite(self.fd, struct.pack("<I", value), UNCLEAN_SHUTDOWN_AT)

    def flush(self):
        if self.writable and self.fd >= 0:
            os.fsync(self.fd)

    def close(self):
        if self.fd < 0:
            return
        try:
            if self.writable:
                os.fsync(self.fd)
                self._set_unclean(0)
                os.fsync(self.fd)
        finally:
            super().close()


def delta_file_name(descriptor_path):
    """NAME.vmdk -> NAME-delta.vmdk, VMware's name for the COWD file."""
    base = os.path.basename(descriptor_path)
    if base.lower().endswith(".vmdk"):
        base = base[:-5]
    return base + "-delta.vmdk"


def create_vmfs_sparse(descriptor_path, size_bytes, adapter_type, hwversion):
    """Create an empty root vmfsSparse disk: the descriptor at
    ``descriptor_path`` and NAME-delta.vmdk beside it.  Neither may exist."""
    if size_bytes <= 0 or size_bytes % SECTOR:
        raise VmdkError("%s: a vmfsSparse disk needs a size that is a "
                        "non-zero multiple of 512 bytes" % descriptor_path)
    sectors = size_bytes // SECTOR
    if sectors > MAX_SECTOR:
        raise VmdkError("%s: a vmfsSparse disk holds at most 2 TiB"
                        % descriptor_path)
    delta_name = delta_file_name(descriptor_path)
    delta_path = os.path.join(os.path.dirname(descriptor_path), delta_name)
    ddb = disk_database(size_bytes, adapter_type, hwversion)
    extent = descriptor_mod.ExtentLine("RW", sectors, "VMFSSPARSE",
                                       delta_name)
    text = descriptor_mod.build("vmfsSparse", [extent], ddb).encode()
    _write_new(delta_path, _empty_cowd(sectors, ddb))
    try:
        _write_new(descriptor_path, text)
    except BaseException:
        os.unlink(delta_path)
        raise


def _empty_cowd(sectors, ddb):
    gd_entries = (sectors + TABLE_ENTRIES - 1) // TABLE_ENTRIES
    gd_offset = HEADER_SIZE // SECTOR
    gd_bytes = (gd_entries * 4 + SECTOR - 1) // SECTOR * SECTOR
    free_sector = gd_offset + gd_bytes // SECTOR
    header = bytearray(HEADER_SIZE)
    FIELDS.pack_into(header, 0, MAGIC, VERSION,
                     FLAG_ROOT | FLAG_CHECK_CAPABLE, sectors, 1,
                     gd_offset, gd_entries, free_sector)
    geometry = dict(ddb)
    struct.pack_into("<III", header, GEOMETRY_AT,
                     int(geometry["geometry.cylinders"]),
                     int(geometry["geometry.heads"]),
                     int(geometry["geometry.sectors"]))
    struct.pack_into("<I", header, GENERATION_AT, 1)
    return bytes(header) + bytes(gd_bytes)


def _write_new(path, data):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise VmdkError("%s: cannot create: %s" % (path, exc.strerror))
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
