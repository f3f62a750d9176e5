"""A VMDK disk: its descriptor's extents laid end to end, over its parents.

Reads of a run that this link does not hold fall through to the parent
link (named by parentFileNameHint, checked by CID).  With single-link the
parent is never opened and such runs read as zeros.  The disk owns the
lock that serializes allocation, so one Disk shared by every connection
keeps sparse metadata consistent.
"""

import bisect
import errno
import os
import re
import struct
import threading

from .. import log
from ..engine import EngineError
from .descriptor import (FLAT_TYPES, MAX_DESCRIPTOR_BYTES, NO_PARENT_CID,
                         Descriptor, ExtentLine, new_cid, same_cid)
from .extent import DATA, UNALLOCATED, ZERO, ExtentReader, VmdkError
from .flat import (SECTOR, FlatExtent, ZeroExtent, file_size, open_file,
                   pwrite_all)
from .locks import ImageLocks
from .sparse import (FLAG_COMPRESSED, MAGIC as SPARSE_MAGIC, SparseExtent,
                     read_embedded_descriptor, read_header)

COWD_MAGIC = b"COWD"
SESPARSE_MAGIC = struct.pack("<Q", 0xCAFEBABE)

# Control characters that never appear in a text descriptor.
_BINARY_BYTES = re.compile(b"[\\x01-\\x08\\x0e-\\x1f]")

# A chain deeper than this is surely a loop of hints.
MAX_CHAIN_LENGTH = 255


class NoAccessExtent(ExtentReader):
    """A NOACCESS extent line: its data may not be read or written."""

    def __init__(self, size, path):
        self.size = size
        self.path = path
        self.writable = False

    def map(self, offset, count):
        return [(count, DATA)]

    def read(self, offset, count):
        raise EngineError(errno.EPERM, "%s: this extent is NOACCESS"
                          % self.path)


def _c2_reader(module, name, path):
    """C2's extent readers are imported only when a disk needs them."""
    try:
        mod = __import__("vddktool.vmdk." + module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError):
        raise VmdkError("%s: this extent format (%s) is not supported yet"
                        % (path, module))


def _magic(path):
    fd = open_file(path, False)
    try:
        return os.pread(fd, 8, 0)
    finally:
        os.close(fd)


def extent_path(line, directory):
    """The file behind an extent line, or None (ZERO extents)."""
    if line.kind == "ZERO":
        return None
    return os.path.join(directory, line.filename)


def open_extent(line, directory, writable, create_type):
    """The reader for one extent line."""
    size = line.sectors * SECTOR
    path = extent_path(line, directory)
    if path is None:
        return ZeroExtent(size)
    if line.access == "NOACCESS":
        return NoAccessExtent(size, path)
    writable = writable and line.access == "RW"
    if line.kind in FLAT_TYPES:
        return FlatExtent(path, size, line.offset * SECTOR, writable)
    if line.kind == "VMFSSPARSE":
        return _c2_reader("cowd", "CowdExtent", path)(path, size, writable)
    if line.kind == "SESPARSE":
        return _c2_reader("sesparse", "SeSparseExtent", path)(
            path, size, writable)
    magic = _magic(path)
    if magic[:4] == COWD_MAGIC:
        return _c2_reader("cowd", "CowdExtent", path)(path, size, writable)
    if magic[:4] != SPARSE_MAGIC:
        raise VmdkError("%s: a SPARSE extent, but the file starts with %r "
                        "(expected KDMV)" % (path, magic[:4]))
    if (_sparse_flags(path) & FLAG_COMPRESSED or
            create_type.lower() == "streamoptimized"):
        return _c2_reader("stream", "StreamExtent", path)(path, size,
                                                          writable)
    return SparseExtent(path, size, writable)


def _sparse_flags(path):
    fd = open_file(path, False)
    try:
        return read_header(fd, path).flags
    finally:
        os.close(fd)


def read_descriptor(path):
    """(Descriptor, where) for the file the user named.  ``where`` is the
    byte offset and room of an embedded descriptor, or None when the
    descriptor is the whole file."""
    fd = open_file(path, False)
    try:
        head = os.pread(fd, SECTOR, 0)
        if head[:4] == SPARSE_MAGIC:
            header = read_header(fd, path)
            text = read_embedded_descriptor(fd, header, path)
            if text is None:
                # A bare extent: serve it as the only extent of a disk.
                kind = ("streamOptimized" if header.compressed
                        else "monolithicSparse")
                return _synthesized(path, kind, header.capacity,
                                    "SPARSE"), None
            where = (header.descriptor_offset * SECTOR,
                     header.descriptor_size * SECTOR)
            return _embedded(Descriptor.parse(text, path), path,
                             header.capacity), where
        if head[:4] == COWD_MAGIC:
            sectors = struct.unpack_from("<I", head, 12)[0]
            return _synthesized(path, "vmfsSparse", sectors,
                                "VMFSSPARSE"), None
        if head[:8] == SESPARSE_MAGIC:
            sectors = struct.unpack_from("<Q", head, 16)[0]
            return _synthesized(path, "seSparse", sectors, "SESPARSE"), None
        size = file_size(fd)
        if size > MAX_DESCRIPTOR_BYTES:
            raise VmdkError("%s: not a VMDK (no sparse header, and too big "
                            "for a descriptor)" % path)
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    text = data.split(b"\0", 1)[0]
    if not text.strip() or _BINARY_BYTES.search(text):
        raise VmdkError("%s: not a VMDK (neither a sparse header nor a text "
                        "descriptor)" % path)
    return Descriptor.parse(data, path), None


def _embedded(descriptor, path, capacity):
    """A descriptor found inside a sparse file describes that file, the
    disk's one extent, whatever its extent line calls it: the name it was
    created under, before a rename or an OVA tool's copy, or a converter's
    placeholder.  qemu reads such files the same way.  The lines stay as
    written, so a CID update leaves the extent line alone."""
    name = os.path.basename(path)
    first = descriptor.extents[0]
    if len(descriptor.extents) != 1 or first.filename != name:
        log.debug("%s: the embedded descriptor names %s; the file itself is "
                  "the extent", path, ", ".join(
                      repr(e.filename) for e in descriptor.extents))
    descriptor.extents = [ExtentLine(first.access, capacity, "SPARSE", name)]
    return descriptor


def _synthesized(path, create_type, sectors, kind):
    lines = ['createType="%s"' % create_type,
             ExtentLine("RW", sectors, kind, os.path.basename(path)).text()]
    return Descriptor.parse("\n".join(lines), path)


def _plain_extent(extents):
    """The one extent of a disk that is a single writable extent taking
    writes without a lock (a flat disk), else None."""
    if len(extents) == 1 and extents[0].writable and getattr(
            extents[0], "lock_free_writes", False):
        return extents[0]
    return None


class Disk(object):
    """One link of a chain, with its parent (another Disk) or None."""

    def __init__(self, path, writable=False, single_link=False,
                 force_share=False, _chain=()):
        self.path = os.path.abspath(path)
        self.descriptor, self._embedded = read_descriptor(self.path)
        self.directory = os.path.dirname(self.path)
        self.lock = threading.Lock()
        self._cid_renewed = False
        self.extents = []
        self.starts = []
        self.parent = None
        self.file_locks = ImageLocks(writable, force_share)
        try:
            # Before anything is written (an open marks a sparse extent
            # as not shut down): another writer may be at work.
            self._lock_files()
            self._open_extents(writable)
            if not single_link and self.descriptor.parent_cid != NO_PARENT_CID:
                self.parent = self._open_parent(_chain + (self.path,),
                                                force_share)
            self._give_extents_backing()
        except BaseException:
            self.close()
            raise
        self.size = sum(e.size for e in self.extents)
        self.writable = any(e.writable for e in self.extents)
        self._plain_extent = _plain_extent(self.extents)
        if writable and not self.writable:
            log.debug("%s: no extent of this %s disk can be written; "
                      "serving it read-only", self.path, self.create_type)

    @classmethod
    def around(cls, path, extent, create_type):
        """A disk whose one extent is already open: the writer that
        create-type=stream-optimized returns, which owns its file and
        its descriptor."""
        disk = cls.__new__(cls)
        disk.path = os.path.abspath(path)
        disk.descriptor = _synthesized(path, create_type,
                                       extent.size // SECTOR, "SPARSE")
        disk._embedded = None
        disk.directory = os.path.dirname(disk.path)
        disk.lock = threading.Lock()
        # The writer keeps its own descriptor: never rewrite it here.
        disk._cid_renewed = True
        disk.extents = [extent]
        disk.starts = [0]
        disk.parent = None
        disk.size = extent.size
        disk.writable = extent.writable
        disk._plain_extent = _plain_extent(disk.extents)
        disk.file_locks = ImageLocks(extent.writable)
        try:
            disk._lock_files()
        except BaseException:
            disk.close()
            raise
        return disk

    @property
    def create_type(self):
        return self.descriptor.create_type or "custom"

    def _lock_files(self):
        """qemu's locks on the descriptor and every extent file."""
        self.file_locks.lock(self.path)
        for line in self.descriptor.extents:
            path = extent_path(line, self.directory)
            if path is not None:
                self.file_locks.lock(path)

    def _open_extents(self, writable):
        position = 0
        for line in self.descriptor.extents:
            extent = open_extent(line, self.directory, writable,
                                 self.create_type)
            self.extents.append(extent)
            self.starts.append(position)
            position += extent.size

    def _open_parent(self, chain, force_share):
        hint = self.descriptor.parent_hint
        if not hint:
            raise VmdkError("%s: the descriptor has a parentCID but no "
                            "parentFileNameHint (single-link=true serves "
                            "this link alone)" % self.path)
        parent_path = os.path.join(self.directory, hint)
        if not os.path.exists(parent_path):
            # A hint written on another host: look beside the child.
            beside = os.path.join(self.directory,
                                  hint.replace("\\", "/").split("/")[-1])
            if os.path.exists(beside):
                parent_path = beside
        parent_path = os.path.abspath(parent_path)
        if parent_path in chain or len(chain) > MAX_CHAIN_LENGTH:
            raise VmdkError("%s: the parentFileNameHint chain loops back "
                            "to %s" % (self.path, parent_path))
        if not os.path.exists(parent_path):
            raise VmdkError("%s: parent %s does not exist (single-link=true "
                            "serves this link alone)" % (self.path,
                                                         parent_path))
        parent = Disk(parent_path, writable=False, force_share=force_share,
                      _chain=chain)
        if not same_cid(parent.descriptor.cid, self.descriptor.parent_cid):
            parent.close()
            raise VmdkError(
                "%s: parent %s has CID %s but this link was taken from CID "
                "%s: the parent changed after the snapshot" % (
                    self.path, parent_path, parent.descriptor.cid,
                    self.descriptor.parent_cid))
        return parent

    def _give_extents_backing(self):
        if self.parent is None:
            return
        for start, extent in zip(self.starts, self.extents):
            extent.backing = self._backing_for(start)

    def _backing_for(self, start):
        def backing(offset, count):
            return self.parent.read_bytes(start + offset, count)
        return backing

    # --- mapping virtual offsets onto extents --------------------------------
    def _spans(self, offset, count):
        """Yield (extent, offset in extent, length, offset in request)."""
        index = bisect.bisect_right(self.starts, offset) - 1
        done = 0
        while done < count:
            extent = self.extents[index]
            within = offset + done - self.starts[index]
            n = min(extent.size - within, count - done)
            yield extent, within, n, done
            done += n
            index += 1

    # --- reading -------------------------------------------------------------
    def read(self, offset, count, file_ranges=False):
        """[(offset, data or None)] covering the range; None reads zeros.
        With ``file_ranges``, data may be an engine.FileRange."""
        if len(self.extents) == 1 and offset + count <= self.size:
            # The common case, kept short: one extent, often one piece.
            pieces = _reader(self.extents[0], file_ranges)(offset, count)
            if len(pieces) == 1 and not isinstance(pieces[0][1], str):
                return [(offset, pieces[0][1])]
            return self._resolve(offset, pieces, file_ranges)
        pieces = []
        pos = offset
        end = min(offset + count, self.size)
        for extent, within, n, _ in self._spans(offset, end - offset):
            pieces.extend(self._resolve(
                pos, _reader(extent, file_ranges)(within, n), file_ranges))
            pos += n
        if pos < offset + count:
            # Past the end of a smaller parent: zeros.
            pieces.append((pos, None))
        return _merge_holes(pieces)

    def _resolve(self, pos, extent_pieces, file_ranges):
        """Extent pieces -> disk pieces: parents fill the unallocated."""
        pieces = []
        for length, value in extent_pieces:
            if value is UNALLOCATED and self.parent is not None:
                pieces.extend(self.parent.read(pos, length, file_ranges))
            elif value is UNALLOCATED or value is ZERO:
                pieces.append((pos, None))
            else:
                pieces.append((pos, value))
            pos += length
        return _merge_holes(pieces)

    def read_bytes(self, offset, count):
        pieces = self.read(offset, count)
        if len(pieces) == 1 and pieces[0][1] is not None:
            return pieces[0][1]
        out = bytearray(count)
        for i, (pos, data) in enumerate(pieces):
            if data is not None:
                out[pos - offset:pos - offset + len(data)] = data
        return out

    def map(self, offset, count):
        """[(length, DATA or ZERO)] covering the range, parents resolved."""
        runs = []
        pos = offset
        end = min(offset + count, self.size)
        for extent, within, n, _ in self._spans(offset, end - offset):
            for length, state in extent.map(within, n):
                if state is UNALLOCATED and self.parent is not None:
                    runs.extend(self.parent.map(pos, length))
                else:
                    runs.append((length, DATA if state is DATA else ZERO))
                pos += length
        if pos < offset + count:
            runs.append((offset + count - pos, ZERO))
        return runs

    # --- writing -------------------------------------------------------------
    def _writable_spans(self, offset, count):
        spans = list(self._spans(offset, count))
        for extent, _, _, _ in spans:
            if not extent.writable:
                raise EngineError(errno.EPERM, "%s: this part of the disk "
                                  "is read-only" % self.path)
        self._renew_cid()
        return spans

    def _locked(self, extent):
        return _NO_LOCK if getattr(extent, "lock_free_writes", False) \
            else self.lock

    def write(self, offset, data):
        view = memoryview(data).cast("B")
        if self._cid_renewed and offset + len(view) <= self.size and \
                self._plain_extent is not None:
            # The common flat disk: nothing to split and nothing to lock.
            self._plain_extent.write(offset, view)
            return
        for extent, within, n, done in self._writable_spans(offset, len(view)):
            where = _in_place(extent, within, n)
            if where is not None:
                pwrite_all(extent.fd, view[done:done + n], where, extent.path)
                continue
            with self._locked(extent):
                extent.write(within, view[done:done + n])

    def write_target(self, offset, count):
        """``(fd, file_offset)`` when the range lies in one extent that
        can take it in place, in one run of its file, without a lock (a
        flat extent, or sparse grains already written), else None (see
        Engine.write_target)."""
        extent = self._plain_extent
        if extent is not None and self._cid_renewed and \
                offset + count <= self.size:
            return extent.fd, extent.start + offset  # as write's fast path
        try:
            spans = self._writable_spans(offset, count)
        except (EngineError, VmdkError):
            return None     # pwrite will say why
        if len(spans) != 1:
            return None
        extent, within, n, _ = spans[0]
        where = _in_place(extent, within, n)
        return None if where is None else (extent.fd, where)

    def zero(self, offset, count, may_trim=False):
        for extent, within, n, _ in self._writable_spans(offset, count):
            with self._locked(extent):
                extent.zero(within, n, may_trim)

    def trim(self, offset, count):
        """Give back space where an extent can; contents become undefined
        (here: they stay as they were, or read as zeros)."""
        for extent, within, n, _ in self._writable_spans(offset, count):
            trim = getattr(extent, "trim", None)
            if trim is not None:
                with self._locked(extent):
                    trim(within, n)

    def _renew_cid(self):
        """VMware changes the CID on the first write after open, so that
        children taken before the change no longer match."""
        if self._cid_renewed:
            return
        with self.lock:
            if self._cid_renewed:
                return
            self.descriptor.set("CID", new_cid())
            self._write_descriptor()
            self._cid_renewed = True

    def _write_descriptor(self):
        data = self.descriptor.encode()
        fd = open_file(self.path, True)
        try:
            if self._embedded is None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            else:
                where, room = self._embedded
                if len(data) > room:
                    raise VmdkError("%s: the new descriptor does not fit in "
                                    "its %d bytes" % (self.path, room))
                os.pwrite(fd, data + bytes(room - len(data)), where)
            os.fsync(fd)
        finally:
            os.close(fd)

    def flush(self):
        for extent in self.extents:
            if extent.writable:
                extent.flush()

    def close(self):
        for extent in self.extents:
            extent.close()
        self.extents = []
        self._plain_extent = None
        if self.parent is not None:
            self.parent.close()
            self.parent = None
        # Last: closing an extent may still write (the clean-shutdown mark).
        self.file_locks.release()

    @property
    def sequential_writes_only(self):
        """True when an extent must be written forwards (a new stream):
        several connections would write distant regions at once."""
        return self.writable and any(
            getattr(e, "sequential_writes_only", False) for e in self.extents)

    @property
    def preferred_block_size(self):
        """A grain: smaller writes to sparse extents read-modify-write."""
        # grain_bytes here, grain_size (bytes) in the grain-table readers.
        grains = [getattr(e, "grain_bytes", 0) or getattr(e, "grain_size", 0)
                  for e in self.extents]
        return max([4096] + grains)

    def describe(self):
        return "VMDK %s %s" % (self.create_type, self.path)


class _NoLock(object):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


def _in_place(extent, offset, count):
    """Where in its file an extent takes ``count`` bytes at ``offset``
    as they are, with no lock (Extent.in_place), or None."""
    in_place = getattr(extent, "in_place", None)
    return None if in_place is None else in_place(offset, count)


def _reader(extent, file_ranges):
    return extent.read_range if file_ranges else extent.read


def _merge_holes(pieces):
    merged = []
    for pos, data in pieces:
        if data is None and merged and merged[-1][1] is None:
            continue
        merged.append((pos, data))
    return merged


def open_disk(path, writable=False, single_link=False, force_share=False):
    return Disk(path, writable, single_link, force_share)
