"""One connection's requests run on its engine; the protocol package
builds the replies.  Nothing here reads or writes the socket: every
method returns the buffers to send, so any dispatcher can drive it.
"""

import errno

from .. import log
from .. import protocol as nbd
from ..engine import EngineError, FileRange, errno_of, in_memory

# File ranges shorter than this are read into memory rather than sent
# with sendfile(2): the same one system call, and the reply can then go
# out in one sendmsg with its neighbours' (see LeaderFollowers' corking).
SMALL_FILE_RANGE = 64 * 1024


class Written(object):
    """A WRITE's payload moved by the channel straight into the disk file
    (Engine.write_target): nothing left to write but the outcome."""

    __slots__ = ("error",)

    def __init__(self, error=None):
        self.error = error


class Commands(object):
    """Executes requests on ``engine`` and returns their replies.

    ``structured``: the client negotiated structured replies;
    ``context_id``: the id of base:allocation, or None; ``zero_copy``:
    the channel can send file ranges itself.
    """

    def __init__(self, engine, peer, structured, context_id, zero_copy,
                 buffers):
        self.engine = engine
        self.peer = peer
        self.structured = structured
        self.context_id = context_id
        self.zero_copy = zero_copy
        self.buffers = buffers
        self.extents_known = engine.can_extents()
        self._recycle_writes = not engine.keeps_write_buffers
        self._handlers = {
            nbd.CMD_READ: (self._read_structured if structured
                           else self._read_simple),
            nbd.CMD_WRITE: self._write,
            nbd.CMD_FLUSH: self._flush,
            nbd.CMD_TRIM: self._trim,
            nbd.CMD_CACHE: self._cache,
            nbd.CMD_WRITE_ZEROES: self._zero,
            nbd.CMD_BLOCK_STATUS: self._block_status,
        }

    def execute(self, request):
        """Run a valid request to its end; the reply, error or not."""
        try:
            return self._handlers[request.command](request)
        except Exception as exc:
            return self.failed(request, exc)

    def failed(self, request, exc):
        error = nbd.nbd_errno(errno_of(exc))
        if getattr(exc, "expected", False):
            log.debug("%s: %s: %s", self.peer, request.name, exc)
        else:
            log.error("%s: %s at offset %d length %d: %s", self.peer,
                      request.name, request.offset, request.length, exc)
        return nbd.error_reply(request, error, str(exc), self.structured)

    # -- asynchronous READ and WRITE (engines that can submit) --
    def submit(self, request, done):
        """Start a READ, WRITE or WRITE_ZEROES; ``done(error, data)``
        follows, from any thread, and ``completed`` then gives its reply."""
        command, engine = request.command, self.engine
        try:
            if command == nbd.CMD_READ:
                engine.submit_pread(request.length, request.offset, 0, done)
            elif command == nbd.CMD_WRITE:
                engine.submit_pwrite(request.payload, request.offset, 0, done)
            else:
                engine.submit_zero(request.length, request.offset,
                                   nbd.engine_flags(request), done)
        except Exception as exc:
            done(exc, None)

    def completed(self, request, error, data):
        command = request.command
        if command == nbd.CMD_WRITE:
            # The engine has let go of it (done was called).
            self.buffers.give_back(request.payload)
            request.payload = None
        if error is not None:
            return self.failed(request, error)
        if command != nbd.CMD_READ:
            return [nbd.simple_reply(request.cookie)]
        if len(data) != request.length:
            return self.failed(request, EngineError(
                errno.EIO, "short read from the disk"))
        if not self.zero_copy:
            data = in_memory(data)
        if self.structured:
            return nbd.one_chunk_read_reply(request.cookie, request.offset,
                                            data)
        return nbd.simple_read_reply(request.cookie, data)

    def sent(self, request, data):
        """The reply built from a completion is out: a READ's buffer goes
        back to the engine, which may fill it again (Engine.recycle)."""
        if data is not None and request.command == nbd.CMD_READ:
            self.engine.recycle(data)

    # -- command handlers: each returns the reply buffers --
    def _read_simple(self, request):
        data = self.engine.pread(request.length, request.offset)
        if len(data) != request.length:
            raise EngineError(errno.EIO, "short read from the disk")
        return nbd.simple_read_reply(request.cookie, data)

    def _read_structured(self, request):
        length = request.length
        if length < SMALL_FILE_RANGE or request.flags & nbd.CMD_FLAG_DF:
            # Small reads skip hole chunks and file ranges: one pread, one
            # data chunk.
            data = self.engine.pread(length, request.offset)
            if len(data) != length:
                raise EngineError(errno.EIO, "short read from the disk")
            return nbd.one_chunk_read_reply(request.cookie, request.offset,
                                            data)
        pieces = self.engine.pread_sparse(length, request.offset)
        return self._structured_reply(request, pieces)

    def _structured_reply(self, request, pieces):
        if not self.zero_copy:
            pieces = [(start, in_memory(data) if type(data) is FileRange
                       else data) for start, data in pieces]
        try:
            return nbd.structured_read_reply(request.cookie, request.offset,
                                             request.length, pieces)
        except ValueError as exc:
            raise EngineError(errno.EIO, "the disk returned %s" % exc)

    def _write(self, request):
        payload = request.payload
        if type(payload) is Written:
            if payload.error is not None:
                raise payload.error
            return [nbd.simple_reply(request.cookie)]
        self.engine.pwrite(payload, request.offset, nbd.engine_flags(request))
        if self._recycle_writes:
            self.buffers.give_back(payload)
        return [nbd.simple_reply(request.cookie)]

    def _flush(self, request):
        self.engine.flush()
        return [nbd.simple_reply(request.cookie)]

    def _trim(self, request):
        self.engine.trim(request.length, request.offset,
                         nbd.engine_flags(request))
        return [nbd.simple_reply(request.cookie)]

    def _cache(self, request):
        self.engine.cache(request.length, request.offset)
        return [nbd.simple_reply(request.cookie)]

    def _zero(self, request):
        self.engine.zero(request.length, request.offset,
                         nbd.engine_flags(request))
        return [nbd.simple_reply(request.cookie)]

    def _block_status(self, request):
        offset, length = request.offset, request.length
        if self.extents_known:
            flags = nbd.engine_flags(request)
            extents = nbd.normalize_extents(
                self.engine.extents(length, offset, flags), offset, length,
                bool(request.flags & nbd.CMD_FLAG_REQ_ONE))
            if not extents:
                raise EngineError(errno.EIO, "disk returned no extents")
        else:
            extents = [(length, 0)]  # all data, as nbdkit reports
        return [nbd.block_status_chunk(request.cookie, self.context_id,
                                       extents)]
