"""Flat extents (FLAT, VMFS, VMFSRDM, VMFSRAW) and ZERO extents.

A flat extent is raw data at a byte offset in a file or device.  The
server's reads get a FileRange, which it sends with sendfile(2) so the data
never enters Python; other readers get one os.pread.  Allocation comes
from the host file system: SEEK_DATA/SEEK_HOLE say where holes are.
"""

import ctypes
import ctypes.util
import errno
import os
import stat

from ..engine import EngineError, FileRange
from .extent import DATA, ZERO, ExtentReader, VmdkError

SECTOR = 512

# fallocate(2) modes: Python's os module offers only posix_fallocate.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1024 * 1024


def _load_fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                           use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                          ctypes.c_longlong]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = []


def punch_hole(fd, offset, length):
    """Deallocate a byte range so it reads as zeros.  False when the file
    system (or platform) cannot."""
    if not _fallocate:
        _fallocate.append(_load_fallocate())
    fallocate = _fallocate[0]
    if fallocate is None:
        return False
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return fallocate(fd, mode, offset, length) == 0


def write_zeros(fd, offset, length, path):
    chunk = memoryview(bytes(min(length, _ZERO_CHUNK)))
    end = offset + length
    while offset < end:
        n = min(len(chunk), end - offset)
        pwrite_all(fd, chunk[:n], offset, path)
        offset += n


def pwrite_all(fd, data, offset, path):
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n == len(view):
            return  # the usual case: no slicing
        if n <= 0:
            raise VmdkError("%s: short write at byte %d" % (path, offset))
        view = view[n:]
        offset += n


def truncated_error(path, count, offset):
    return VmdkError("%s: truncated: %d bytes needed at byte %d, the file "
                     "ends before" % (path, count, offset))


def pread_exact(fd, count, offset, path):
    """Read exactly ``count`` bytes; a short read means a truncated file."""
    try:
        return FileRange(fd, offset, count).read()
    except EngineError:
        raise truncated_error(path, count, offset)


def open_file(path, writable):
    try:
        return os.open(path, (os.O_RDWR if writable else os.O_RDONLY)
                       | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        error = VmdkError("%s: cannot open: %s" % (path, e.strerror))
        # Kept so the backend can fall back to read-only on EACCES/EROFS.
        error.errno = e.errno
        raise error


def file_size(fd):
    """Size of a file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


class FlatExtent(ExtentReader):
    """Raw data at byte ``start`` of ``path``."""

    # Writes never allocate metadata, so the disk need not serialize them.
    lock_free_writes = True

    def __init__(self, path, size, start=0, writable=False):
        self.path = path
        self.size = size
        self.start = start
        self.writable = writable
        self.fd = open_file(path, writable)
        available = file_size(self.fd)
        # A regular file can shrink under us; a device cannot.
        self._may_shrink = stat.S_ISREG(os.fstat(self.fd).st_mode)
        if available < start + size:
            os.close(self.fd)
            raise VmdkError(
                "%s: truncated: the descriptor needs %d bytes from byte %d "
                "but the file has %d" % (path, size, start, available))

    def map(self, offset, count):
        runs = []
        pos = self.start + offset
        end = pos + count
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    data = end
                else:
                    # No SEEK_DATA on this file system: everything is data.
                    runs.append((end - pos, DATA))
                    break
            data = min(data, end)
            if data > pos:
                runs.append((data - pos, ZERO))
                pos = data
                if pos >= end:
                    break
            try:
                hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            except OSError:
                hole = end
            if hole <= pos:
                hole = end
            runs.append((hole - pos, DATA))
            pos = hole
        return runs

    def read(self, offset, count):
        return [(count, pread_exact(self.fd, count, self.start + offset,
                                    self.path))]

    def read_range(self, offset, count):
        where = self.start + offset
        # A reply cannot be taken back once sendfile has begun it, so a
        # file truncated since it was opened must fail here, cleanly.
        if self._may_shrink and os.fstat(self.fd).st_size < where + count:
            raise truncated_error(self.path, count, where)
        return [(count, FileRange(self.fd, where, count))]

    def write(self, offset, data):
        pwrite_all(self.fd, data, self.start + offset, self.path)

    def in_place(self, offset, count):
        return self.start + offset

    def zero(self, offset, count, may_trim=False):
        if may_trim and self._punch(offset, count):
            return
        write_zeros(self.fd, self.start + offset, count, self.path)

    def trim(self, offset, count):
        self._punch(offset, count, zero_edges=False)

    def _punch(self, offset, count, zero_edges=True):
        # Only whole 4 KiB blocks can be freed; the edges stay as data.
        first = self.start + offset
        end = first + count
        aligned_first = (first + 4095) & ~4095
        aligned_end = end & ~4095
        if aligned_end <= aligned_first:
            return False
        if not punch_hole(self.fd, aligned_first, aligned_end - aligned_first):
            return False
        if not zero_edges:
            return True
        if first < aligned_first:
            write_zeros(self.fd, first, aligned_first - first, self.path)
        if aligned_end < end:
            write_zeros(self.fd, aligned_end, end - aligned_end,
                        self.path)
        return True

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ZeroExtent(ExtentReader):
    """A ZERO extent line: no file, reads zeros, holds nothing."""

    def __init__(self, size):
        self.size = size
        self.writable = False

    def map(self, offset, count):
        return [(count, ZERO)]

    def read(self, offset, count):
        return [(count, ZERO)]
