"""The transmission phase without I/O: request headers in, reply bytes
out, and the checks a request passes before it reaches an engine."""

import struct

from ..engine import (EXTENT_HOLE, EXTENT_ZERO, FLAG_FAST_ZERO, FLAG_FUA,
                      FLAG_MAY_TRIM, FLAG_REQ_ONE, MAX_REQUEST_SIZE)
from .wire import (CHUNK_BLOCK_STATUS, CHUNK_ERROR, CHUNK_ERROR_OFFSET,
                   CHUNK_FLAG_DONE, CHUNK_HEADER, CHUNK_NONE,
                   CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CMD_BLOCK_STATUS,
                   CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO,
                   CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH,
                   CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
                   COMMAND_NAMES, ERROR_CHUNK_START, EXTENT_DESCRIPTOR,
                   MAX_ERROR_MESSAGE, NBD_EINVAL, NBD_ENOSPC, NBD_EPERM,
                   OFFSET_DATA_HEADER, OFFSET_HOLE_CHUNK, ProtocolError,
                   REQUEST, REQUEST_MAGIC, SIMPLE_REPLY, SIMPLE_REPLY_MAGIC,
                   STRUCTURED_REPLY_MAGIC, TFLAG_READ_ONLY, TFLAG_SEND_CACHE,
                   TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
                   TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES, U32)

# The flags each command may carry (any other bit is EINVAL).
_ALLOWED_CMD_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

# ---------------------------------------------------------------------------
# transmission: requests and replies


def decode_request(header):
    """28 header bytes -> (flags, command, cookie, offset, length)."""
    magic, flags, command, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError("bad request magic 0x%x" % magic)
    return flags, command, cookie, offset, length


_unpack_request = REQUEST.unpack

# A header's command and length fields, from byte 6 (the cookie and
# offset between them skipped).
_COMMAND_AND_LENGTH = struct.Struct(">H16xI")


def peek_command_and_length(header):
    """(command, length) of a request header, without decoding the rest
    (the server glances at the next request before it is its turn)."""
    return _COMMAND_AND_LENGTH.unpack_from(header, 6)


class Request(object):
    """One decoded request; ``payload`` is a WRITE's data once read."""

    __slots__ = ("flags", "command", "cookie", "offset", "length", "payload")

    def __init__(self, header):
        # decode_request, inlined: this runs once per request.
        (magic, self.flags, self.command, self.cookie, self.offset,
         self.length) = _unpack_request(header)
        if magic != REQUEST_MAGIC:
            raise ProtocolError("bad request magic 0x%x" % magic)
        self.payload = None

    @property
    def name(self):
        return COMMAND_NAMES.get(self.command, str(self.command))

    def __repr__(self):
        return "Request(%s flags 0x%x offset %d length %d cookie %d)" % (
            self.name, self.flags, self.offset, self.length, self.cookie)


def engine_flags(request):
    """The engine.FLAG_* word for a request's NBD command flags."""
    flags = request.flags
    out = FLAG_FUA if flags & CMD_FLAG_FUA else 0
    command = request.command
    if command == CMD_WRITE_ZEROES:
        if not flags & CMD_FLAG_NO_HOLE:
            out |= FLAG_MAY_TRIM
        if flags & CMD_FLAG_FAST_ZERO:
            out |= FLAG_FAST_ZERO
    elif command == CMD_BLOCK_STATUS and flags & CMD_FLAG_REQ_ONE:
        out |= FLAG_REQ_ONE
    return out


def encode_request(command, cookie, offset, length, flags=0):
    """For tests and tools: a request header (data follows for WRITE)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def simple_reply(cookie, error=0):
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie, chunk_type, length, done):
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC,
                             CHUNK_FLAG_DONE if done else 0, chunk_type,
                             cookie, length)


def none_chunk(cookie):
    return chunk_header(cookie, CHUNK_NONE, 0, True)


def offset_data_header(cookie, offset, data_length, done):
    """Chunk header plus offset; the data follows (sent without copying)."""
    return OFFSET_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE if done else 0,
        CHUNK_OFFSET_DATA, cookie, 8 + data_length, offset)


def offset_hole_chunk(cookie, offset, hole_length, done):
    return OFFSET_HOLE_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE if done else 0,
        CHUNK_OFFSET_HOLE, cookie, 12, offset, hole_length)


def error_chunk(cookie, error, message="", offset=None, done=True):
    """ERROR chunk, or ERROR_OFFSET when ``offset`` is given."""
    text = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    tail = b"" if offset is None else struct.pack(">Q", offset)
    chunk_type = CHUNK_ERROR if offset is None else CHUNK_ERROR_OFFSET
    return ERROR_CHUNK_START.pack(
        STRUCTURED_REPLY_MAGIC, CHUNK_FLAG_DONE if done else 0, chunk_type,
        cookie, 6 + len(text) + len(tail), error, len(text)) + text + tail


def block_status_chunk(cookie, context_id, extents, done=True):
    """``extents``: [(length, flags)]."""
    body = b"".join(EXTENT_DESCRIPTOR.pack(length, flags)
                    for length, flags in extents)
    return chunk_header(cookie, CHUNK_BLOCK_STATUS, 4 + len(body),
                        done) + U32.pack(context_id) + body


def error_reply(request, error, message="", structured=False):
    """The reply buffers for a failed request: an ERROR chunk where the
    client expects chunks (structured READ and BLOCK_STATUS), else a
    simple reply carrying the errno."""
    if structured and request.command in (CMD_READ, CMD_BLOCK_STATUS):
        return [error_chunk(request.cookie, error, message)]
    return [simple_reply(request.cookie, error)]


def simple_read_reply(cookie, data):
    return [simple_reply(cookie), data]


def one_chunk_read_reply(cookie, offset, data):
    """A structured READ answered by one data chunk holding all of
    ``data`` (the cheapest reply to build and to send)."""
    return [offset_data_header(cookie, offset, len(data), True), data]


def structured_read_reply(cookie, offset, length, pieces):
    """The chunks answering a structured READ of ``length`` bytes at
    ``offset``, from ``(offset, data)`` pieces in order (an engine's
    pread_sparse).  ``data`` None becomes an OFFSET_HOLE chunk; anything
    else an OFFSET_DATA header followed by ``data`` itself, which the
    channel sends as it is (a file range included).  Empty pieces are
    dropped; the last chunk carries DONE.  Raises ValueError when the
    pieces do not cover the request in order or a piece's data has the
    wrong length."""
    bounds = [start for start, _ in pieces] + [offset + length]
    if bounds[0] != offset or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError("pieces out of place")
    runs = [(start, bounds[index + 1] - start, data)
            for index, (start, data) in enumerate(pieces)
            if bounds[index + 1] > start]
    reply = []
    last = len(runs) - 1
    for index, (start, size, data) in enumerate(runs):
        done = index == last
        if data is None:
            reply.append(offset_hole_chunk(cookie, start, size, done))
            continue
        if len(data) != size:
            raise ValueError("a piece of %d bytes holds %d" % (size,
                                                               len(data)))
        reply.append(offset_data_header(cookie, start, size, done))
        reply.append(data)
    return reply


_EXTENT_FLAG_MASK = EXTENT_HOLE | EXTENT_ZERO

# A badly fragmented disk could otherwise answer one BLOCK_STATUS with
# megabytes of descriptors.  The spec lets a reply cover less than was
# asked; clients simply ask again from where it ended.  128 KiB of
# descriptors still maps 8 GiB of 64 KiB grains per reply.
MAX_EXTENTS_PER_REPLY = 16384


def normalize_extents(extents, offset, count, req_one):
    """Engine extents -> [(length, flags)] a client accepts: starting at
    ``offset``, inside the request, no zero-length entries, neighbours with
    equal flags merged, at most MAX_EXTENTS_PER_REPLY of them; with
    ``req_one`` exactly one, no longer than asked."""
    end = offset + count
    out = []
    position = offset
    for extent in extents:
        extent_end = extent.offset + extent.length
        if extent_end <= position:
            continue
        if extent.offset > position:
            break  # a gap: report only what is known to be contiguous
        stop = min(extent_end, end)
        flags = extent.flags & _EXTENT_FLAG_MASK
        if out and out[-1][1] == flags:
            out[-1][0] += stop - position
        elif len(out) == MAX_EXTENTS_PER_REPLY:
            break
        else:
            out.append([stop - position, flags])
        position = stop
        if position >= end:
            break
    if req_one:
        out = out[:1]
    return [(length, flags) for length, flags in out]


class Limits(object):
    """What transmission requests are checked against (fixed at GO).
    ``rules`` holds, per command, what validate_request needs: the NBD
    errno that refuses the command outright (0: none), the command flags
    this export accepts with it, and the longest length it may carry."""

    __slots__ = ("size", "flags", "minimum", "maximum", "structured",
                 "has_block_status", "rules")

    def __init__(self, size, flags, block_size, structured, has_block_status):
        self.size = size
        self.flags = flags
        self.minimum = block_size[0]
        self.maximum = block_size[2]
        self.structured = structured
        self.has_block_status = has_block_status
        self.rules = dict((command, self._rule(command, allowed))
                          for command, allowed in _ALLOWED_CMD_FLAGS.items())

    def _rule(self, command, allowed):
        tflags = self.flags
        refusal = 0
        if command in _WRITE_COMMANDS and tflags & TFLAG_READ_ONLY:
            refusal = NBD_EPERM
        elif command in _NEEDED_FLAG and not tflags & _NEEDED_FLAG[command]:
            refusal = NBD_EINVAL
        elif command == CMD_BLOCK_STATUS and not self.has_block_status:
            refusal = NBD_EINVAL
        # Flags the export did not offer are refused like unknown ones.
        if not tflags & TFLAG_SEND_FUA:
            allowed &= ~CMD_FLAG_FUA
        if not self.structured:
            allowed &= ~CMD_FLAG_DF
        if not tflags & TFLAG_SEND_FAST_ZERO:
            allowed &= ~CMD_FLAG_FAST_ZERO
        longest = _NO_LIMIT
        if command in _DATA_COMMANDS:
            longest = min(MAX_REQUEST_SIZE, self.maximum)
        return refusal, allowed, longest


_NO_LIMIT = 1 << 64     # lengths are 32-bit: no command reaches it
_WRITE_COMMANDS = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
_DATA_COMMANDS = (CMD_READ, CMD_WRITE)
_NEEDED_FLAG = {
    CMD_FLUSH: TFLAG_SEND_FLUSH, CMD_TRIM: TFLAG_SEND_TRIM,
    CMD_WRITE_ZEROES: TFLAG_SEND_WRITE_ZEROES, CMD_CACHE: TFLAG_SEND_CACHE,
}


def validate_request(command, flags, offset, length, limits):
    """0 when the request may go to the engine, else the NBD errno."""
    rule = limits.rules.get(command)
    if rule is None:
        return NBD_EINVAL
    refusal, allowed, longest = rule
    if refusal:
        return refusal
    if flags & ~allowed:
        return NBD_EINVAL
    if command == CMD_FLUSH:
        return NBD_EINVAL if offset or length else 0
    if command == CMD_DISC:
        return 0
    if length > longest:
        return NBD_EINVAL
    if length == 0 or offset + length > limits.size:
        return NBD_ENOSPC if command in _WRITE_COMMANDS else NBD_EINVAL
    minimum = limits.minimum
    if minimum > 1 and (offset % minimum or length % minimum):
        return NBD_EINVAL
    return 0
