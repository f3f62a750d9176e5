"""backend=native: serve a local VMDK with the pure-Python engine.

One Disk is opened for the whole process and shared by every connection,
so writes seen by one client are seen by all (multi-conn is safe) and
sparse allocation is serialized by the disk's lock.
"""

import errno
import threading

from .. import log
from ..params import check_disk
from ..engine import (CACHE_EMULATE, FLAG_MAY_TRIM, FLAG_REQ_ONE,
                      MAX_REQUEST_SIZE, Backend, Engine, EngineError,
                      EXTENT_HOLE, EXTENT_ZERO, Extent, UsageError)
from .disk import Disk
from .extent import DATA, VmdkError


# create-type -> createType, for describing a disk made by another module.
_CREATE_TYPE_NAMES = {"stream-optimized": "streamOptimized",
                      "vmfs-sparse": "vmfsSparse"}


def _engine_error(exc):
    return EngineError(errno.EIO, str(exc))


class NativeEngine(Engine):
    """One connection's view of the shared disk."""

    # Extent writers write or copy before returning (see ExtentReader).
    keeps_write_buffers = False

    def __init__(self, disk, readonly):
        self.disk = disk
        self.readonly = readonly

    def get_size(self):
        return self.disk.size

    def block_size(self):
        return (1, self.disk.preferred_block_size, MAX_REQUEST_SIZE)

    def can_write(self):
        return not self.readonly and self.disk.writable

    def can_flush(self):
        return True

    def can_trim(self):
        return self.can_write()

    def can_zero(self):
        return self.can_write()

    def can_extents(self):
        return True

    def can_cache(self):
        return CACHE_EMULATE

    def can_multi_conn(self):
        # One shared disk, so flushes are seen by every connection; but a
        # forwards-only writer must not invite parallel copies.
        return not (self.can_write() and self.disk.sequential_writes_only)

    def pread(self, count, offset, flags=0):
        try:
            return self.disk.read_bytes(offset, count)
        except VmdkError as e:
            raise _engine_error(e)

    def pread_sparse(self, count, offset, flags=0):
        try:
            return self.disk.read(offset, count, file_ranges=True)
        except VmdkError as e:
            raise _engine_error(e)

    def pwrite(self, buf, offset, flags=0):
        self._check_writable()
        try:
            self.disk.write(offset, buf)
        except VmdkError as e:
            raise _engine_error(e)

    def write_target(self, count, offset):
        if not self.can_write():
            return None
        try:
            return self.disk.write_target(offset, count)
        except VmdkError:
            return None

    def zero(self, count, offset, flags=0):
        self._check_writable()
        try:
            self.disk.zero(offset, count, bool(flags & FLAG_MAY_TRIM))
        except VmdkError as e:
            raise _engine_error(e)

    def trim(self, count, offset, flags=0):
        self._check_writable()
        try:
            self.disk.trim(offset, count)
        except VmdkError as e:
            raise _engine_error(e)

    def flush(self, flags=0):
        try:
            self.disk.flush()
        except VmdkError as e:
            raise _engine_error(e)

    def extents(self, count, offset, flags=0):
        req_one = flags & FLAG_REQ_ONE
        try:
            runs = self.disk.map(offset, count)
        except VmdkError as e:
            raise _engine_error(e)
        result = []
        pos = offset
        for length, state in runs:
            flags = 0 if state is DATA else EXTENT_HOLE | EXTENT_ZERO
            if result and result[-1].flags == flags:
                result[-1].length += length
            else:
                if req_one and result:
                    break
                result.append(Extent(pos, length, flags))
            pos += length
        return result

    def _check_writable(self):
        if not self.can_write():
            raise EngineError(errno.EPERM, "this disk is read-only")


class NativeBackend(Backend):
    name = "native"

    def __init__(self, params, readonly=False):
        super().__init__(params, readonly)
        self.disk = None
        self._open_lock = threading.Lock()

    @property
    def path(self):
        return self.params.get("file")

    def config_complete(self):
        check_disk(self.params)
        if self.params.get("force-share") and not self.readonly:
            raise UsageError("force-share: only for reading (add -r): two "
                             "writers corrupt an image, so a writer never "
                             "shares it")
        if self.params.get("create"):
            self._check_create()

    def _check_create(self):
        from .create import check_create
        check_create(self.path, self.params)

    def get_ready(self):
        """Create and open the disk before daemonizing, so a damaged file
        is reported on the terminal with exit status 1."""
        if self.params.get("create") and self.disk is None:
            from .create import create_from_params
            try:
                new_extent = create_from_params(self.path, self.params)
            except (VmdkError, OSError) as e:
                raise UsageError("create: cannot create %s: %s" % (
                    self.path, getattr(e, "strerror", None) or e))
            if new_extent is not None:
                self.disk = Disk.around(self.path, new_extent,
                                        _CREATE_TYPE_NAMES.get(
                                            self.params.get("create-type"),
                                            "custom"))
        self._ensure_open()

    def after_fork(self):
        self._ensure_open()

    def _ensure_open(self):
        with self._open_lock:
            if self.disk is not None:
                return self.disk
            try:
                self.disk = self._open_disk(not self.readonly)
            except VmdkError as e:
                raise UsageError("file: %s" % e)
            except OSError as e:
                raise UsageError("file: %s: %s" % (self.path, e.strerror))
            log.debug("native: opened %s, %d bytes, %d extent(s)%s",
                      self.disk.describe(), self.disk.size,
                      len(self.disk.extents),
                      ", with parents" if self.disk.parent else "")
            return self.disk

    def _open_disk(self, writable):
        options = dict(single_link=bool(self.params.get("single-link")),
                       force_share=bool(self.params.get("force-share")))
        try:
            return Disk(self.path, writable=writable, **options)
        except VmdkError as e:
            if not writable or getattr(e, "errno", None) not in (
                    errno.EACCES, errno.EPERM, errno.EROFS):
                raise
        # Like nbdkit's file plugin: a file we may not write is served
        # read-only rather than not at all.
        log.warning("%s: cannot open for writing, serving read-only "
                    "(add -r to silence this)", self.path)
        return Disk(self.path, writable=False, **options)

    def describe(self, export_name):
        if self.disk is not None:
            return self.disk.describe()
        return "VMDK %s" % self.path

    def open(self, export_name, readonly, is_tls=False):
        try:
            disk = self._ensure_open()
        except UsageError as e:
            raise EngineError(errno.EIO, str(e))
        return NativeEngine(disk, readonly or self.readonly)

    def cleanup(self):
        with self._open_lock:
            if self.disk is not None:
                self.disk.close()
                self.disk = None
