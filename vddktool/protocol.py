"""The NBD protocol without any I/O: constants, encoders, decoders and the
handshake as a state machine.

Nothing here touches a socket or a thread, so every state and every
malformed input can be reached from a unit test (the h11 approach): the
server feeds received bytes in, gets events out, answers the events that
need a decision (which export, which size) and sends whatever bytes the
machine has queued.  All integers on the wire are big-endian.
"""

import errno as _errno
import struct

from .engine import (CACHE_NONE, EXTENT_HOLE, EXTENT_ZERO, FUA_NONE,
                     MAX_REQUEST_SIZE)

# ---------------------------------------------------------------------------
# magics

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef
EXTENDED_REQUEST_MAGIC = 0x21e41c71
EXTENDED_REPLY_MAGIC = 0x6e8a278c

# handshake flags (server -> client) and client flags (client -> server)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO", OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT | 1
REP_ERR_POLICY = REP_ERROR_BIT | 2
REP_ERR_INVALID = REP_ERROR_BIT | 3
REP_ERR_PLATFORM = REP_ERROR_BIT | 4
REP_ERR_TLS_REQD = REP_ERROR_BIT | 5
REP_ERR_UNKNOWN = REP_ERROR_BIT | 6
REP_ERR_SHUTDOWN = REP_ERROR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
REP_ERR_TOO_BIG = REP_ERROR_BIT | 9

# NBD_INFO types inside REP_INFO
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM", CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES", CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

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

# error numbers on the wire (the protocol fixes Linux's values)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# structured reply chunk types and flags
CHUNK_FLAG_DONE = 1 << 0
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) + 1
CHUNK_ERROR_OFFSET = (1 << 15) + 2

# meta contexts this server knows, by name -> id sent to the client
BASE_ALLOCATION = "base:allocation"
META_CONTEXTS = {BASE_ALLOCATION: 1}
BASE_ALLOCATION_ID = META_CONTEXTS[BASE_ALLOCATION]

# Limits on what a client may make us read during the handshake.  A
# string is at most 4096 bytes (the spec's limit); an option payload
# longer than this cannot be legitimate and is refused without reading it.
MAX_STRING = 4096
MAX_OPTION_LENGTH = 64 * 1024
MAX_ERROR_MESSAGE = 4096

# ---------------------------------------------------------------------------
# wire formats, compiled once

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
OFFSET_HOLE_CHUNK = struct.Struct(">IHHQIQI")
ERROR_CHUNK_START = struct.Struct(">IHHQIIH")
EXTENT_DESCRIPTOR = struct.Struct(">II")

REQUEST_SIZE = REQUEST.size
EXPORT_NAME_PADDING = bytes(124)


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


# ---------------------------------------------------------------------------
# errno mapping


def nbd_errno(err):
    """Map a host errno to one the protocol defines (nbdkit's mapping:
    anything without an NBD equivalent becomes EINVAL)."""
    return _ERRNO_MAP.get(err, NBD_EINVAL)


_ERRNO_MAP = {
    _errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP, _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

# ---------------------------------------------------------------------------
# option replies


def option_reply(option, reply_type, payload=b""):
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type,
                                    len(payload)) + payload


def option_error(option, reply_type, message=""):
    """An error reply; the optional message is for humans (libnbd shows
    it)."""
    text = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    return option_reply(option, reply_type, text)


def server_reply(name, description=""):
    """One export for NBD_OPT_LIST: its name, then its description."""
    raw_name = name.encode("utf-8", "surrogateescape")
    return option_reply(OPT_LIST, REP_SERVER,
                        U32.pack(len(raw_name)) + raw_name
                        + description.encode("utf-8", "replace"))


def meta_context_reply(option, context_id, name):
    return option_reply(option, REP_META_CONTEXT,
                        U32.pack(context_id) + name.encode("utf-8"))


# ---------------------------------------------------------------------------
# export facts: sizes, flags, block sizes


def _power_of_two_at_most(n):
    return 1 << (n.bit_length() - 1) if n >= 1 else 1


def _power_of_two_at_least(n):
    return 1 << (n - 1).bit_length() if n > 1 else 1


def clamp_block_size(size, minimum, preferred, maximum):
    """Make an engine's (min, preferred, max) obey the spec's rules, which
    qemu enforces by dropping the connection: min a power of two <= 64 KiB
    dividing the export size, preferred a power of two >= max(min, 512),
    max a multiple of min, >= preferred and <= MAX_REQUEST_SIZE."""
    minimum = _power_of_two_at_most(max(1, min(int(minimum), 64 * 1024)))
    while minimum > 1 and size % minimum:
        minimum //= 2
    preferred = _power_of_two_at_least(max(int(preferred), minimum, 512))
    preferred = min(preferred, _power_of_two_at_most(MAX_REQUEST_SIZE))
    maximum = min(max(int(maximum), preferred), MAX_REQUEST_SIZE)
    maximum -= maximum % minimum
    return minimum, preferred, maximum


def transmission_flags(engine, readonly, structured):
    """The flags that advertise exactly what ``engine`` can do."""
    flags = TFLAG_HAS_FLAGS
    writable = not readonly and engine.can_write()
    if not writable:
        flags |= TFLAG_READ_ONLY
    if engine.can_flush():
        flags |= TFLAG_SEND_FLUSH
    if writable:
        if engine.can_fua() != FUA_NONE:
            flags |= TFLAG_SEND_FUA
        if engine.can_trim():
            flags |= TFLAG_SEND_TRIM
        if engine.can_zero():
            # A fast-zero request is always answered: by the engine when
            # it can zero quickly, else at once with ENOTSUP, which is
            # what lets a client skip pre-zeroing cheaply.
            flags |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO
    if engine.is_rotational():
        flags |= TFLAG_ROTATIONAL
    if structured:
        flags |= TFLAG_SEND_DF
    if engine.can_multi_conn():
        flags |= TFLAG_CAN_MULTI_CONN
    if engine.can_cache() != CACHE_NONE:
        flags |= TFLAG_SEND_CACHE
    return flags


class ExportInfo(object):
    """What the handshake tells a client about one export."""

    __slots__ = ("name", "size", "flags", "block_size", "description")

    def __init__(self, name, size, flags, block_size, description=""):
        self.name = name
        self.size = size
        self.flags = flags
        self.block_size = block_size
        self.description = description


def info_replies(option, export, requested):
    """The REP_INFO packets answering INFO/GO, EXPORT first (mandatory).
    BLOCK_SIZE is always sent: it tells clients the 64 MiB maximum, which
    is more than they assume without it."""
    out = [option_reply(option, REP_INFO, INFO_EXPORT_PAYLOAD.pack(
        INFO_EXPORT, export.size, export.flags))]
    if INFO_NAME in requested:
        out.append(option_reply(option, REP_INFO, U16.pack(INFO_NAME)
                                + export.name.encode("utf-8",
                                                     "surrogateescape")))
    if INFO_DESCRIPTION in requested and export.description:
        out.append(option_reply(option, REP_INFO, U16.pack(INFO_DESCRIPTION)
                                + export.description.encode("utf-8",
                                                            "replace")))
    out.append(option_reply(option, REP_INFO, INFO_BLOCK_SIZE_PAYLOAD.pack(
        INFO_BLOCK_SIZE, *export.block_size)))
    return b"".join(out)


def export_name_reply(export, no_zeroes):
    """The answer to NBD_OPT_EXPORT_NAME (no option reply header)."""
    reply = EXPORT_NAME_REPLY.pack(export.size, export.flags)
    return reply if no_zeroes else reply + EXPORT_NAME_PADDING


# ---------------------------------------------------------------------------
# option payload decoders; each raises ProtocolError on malformed input


def _decode_string(payload, pos, length):
    end = pos + length
    if length > MAX_STRING or end > len(payload):
        raise ProtocolError("string of %d bytes does not fit" % length)
    try:
        return bytes(payload[pos:end]).decode("utf-8"), end
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8")


def _decode_u32(payload, pos):
    if pos + 4 > len(payload):
        raise ProtocolError("payload is truncated")
    return U32.unpack_from(payload, pos)[0], pos + 4


def decode_info_request(payload):
    """INFO/GO payload -> (export name, [info types])."""
    length, pos = _decode_u32(payload, 0)
    name, pos = _decode_string(payload, pos, length)
    if pos + 2 > len(payload):
        raise ProtocolError("info request count is missing")
    count = U16.unpack_from(payload, pos)[0]
    pos += 2
    if len(payload) != pos + 2 * count:
        raise ProtocolError("info request list has the wrong length")
    infos = [U16.unpack_from(payload, pos + 2 * i)[0] for i in range(count)]
    return name, infos


def decode_meta_context_request(payload):
    """LIST/SET_META_CONTEXT payload -> (export name, [queries])."""
    length, pos = _decode_u32(payload, 0)
    name, pos = _decode_string(payload, pos, length)
    count, pos = _decode_u32(payload, pos)
    queries = []
    for _ in range(count):
        length, pos = _decode_u32(payload, pos)
        query, pos = _decode_string(payload, pos, length)
        queries.append(query)
    if pos != len(payload):
        raise ProtocolError("meta context request has trailing bytes")
    return name, queries


def match_meta_contexts(queries, listing):
    """The known contexts a query list selects.  Unknown namespaces select
    nothing (not an error).  Listing with no queries, or with a bare
    namespace like "base:", returns everything in scope."""
    if listing and not queries:
        return sorted(META_CONTEXTS)
    found = []
    for query in queries:
        for name in sorted(META_CONTEXTS):
            namespace = name.split(":", 1)[0] + ":"
            if query == name or (listing and query == namespace):
                if name not in found:
                    found.append(name)
    return found


# ---------------------------------------------------------------------------
# the handshake state machine


class NeedData(object):
    """The machine waits for ``count`` more bytes."""

    __slots__ = ("count",)

    def __init__(self, count):
        self.count = count

    def __repr__(self):
        return "NeedData(%d)" % self.count


class ExportRequest(object):
    """The client named an export (INFO, GO or EXPORT_NAME).  Answer with
    ``Handshake.answer_export(ExportInfo or None)`` (None: no such export)."""

    __slots__ = ("option", "name", "infos")

    def __init__(self, option, name, infos):
        self.option = option
        self.name = name
        self.infos = infos

    def __repr__(self):
        return "ExportRequest(%s, %r)" % (OPTION_NAMES[self.option],
                                          self.name)


class ListRequest(object):
    """NBD_OPT_LIST: answer with ``Handshake.answer_list([(name, desc)])``."""

    __slots__ = ()


class TlsRequest(object):
    """NBD_OPT_STARTTLS with TLS enabled.  The server either upgrades the
    connection (``Handshake.tls_started()`` after sending the queued ACK)
    or declines (``Handshake.refuse_tls()``)."""

    __slots__ = ()


class Closed(object):
    """The connection must end once queued bytes are sent."""

    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason

    def __repr__(self):
        return "Closed(%r)" % self.reason


class Ready(object):
    """Negotiation is over: transmission begins with these settings."""

    __slots__ = ("export", "structured", "meta_contexts")

    def __init__(self, export, structured, meta_contexts):
        self.export = export
        self.structured = structured
        self.meta_contexts = meta_contexts


# machine states
_GREETING_SENT = "greeting-sent"
_OPTION_HEADER = "option-header"
_OPTION_PAYLOAD = "option-payload"
_AWAITING_EXPORT = "awaiting-export"
_AWAITING_LIST = "awaiting-list"
_AWAITING_TLS = "awaiting-tls"
_DONE = "done"


class Handshake(object):
    """Server side of fixed-newstyle negotiation.

    Use: send ``greeting()``; then loop on ``next_event()``, sending
    ``data_to_send()`` after each call.  ``NeedData(n)``: read up to n bytes
    and ``receive_data`` them (reading exactly n keeps the transmission
    bytes out of the machine).  ``tls`` is "off", "on" or "require"; with
    "require", options other than STARTTLS and ABORT are refused until
    ``tls_started()``.
    """

    def __init__(self, tls="off"):
        self.tls = tls
        self.tls_active = False
        self.no_zeroes = False
        self.structured = False
        self.meta_contexts = {}
        self._meta_export = None
        self._state = _GREETING_SENT
        self._inbuf = bytearray()
        self._outbuf = []
        self._option = None
        self._option_length = 0
        self._pending = None
        self._closed = None

    # -- byte plumbing ------------------------------------------------------
    def greeting(self):
        return GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    def receive_data(self, data):
        if self._state == _DONE:
            raise ProtocolError("negotiation is over")
        self._inbuf += data

    def data_to_send(self):
        out = b"".join(self._outbuf)
        del self._outbuf[:]
        return out

    @property
    def trailing_data(self):
        """Bytes received past the end of negotiation (belong to
        transmission)."""
        return bytes(self._inbuf)

    def _take(self, count):
        data = bytes(self._inbuf[:count])
        del self._inbuf[:count]
        return data

    def _send(self, data):
        self._outbuf.append(data)

    def _close(self, reason):
        self._state = _DONE
        self._closed = Closed(reason)
        return self._closed

    def _error(self, reply_type, message=""):
        self._send(option_error(self._option, reply_type, message))

    # -- events -------------------------------------------------------------
    def next_event(self):
        if self._closed is not None:
            return self._closed
        if self._state == _GREETING_SENT:
            return self._read_client_flags()
        if self._state == _OPTION_HEADER:
            return self._read_option_header()
        if self._state == _OPTION_PAYLOAD:
            return self._read_option_payload()
        if self._state in (_AWAITING_EXPORT, _AWAITING_LIST, _AWAITING_TLS):
            return self._pending
        raise ProtocolError("negotiation is over")

    def _read_client_flags(self):
        if len(self._inbuf) < CLIENT_FLAGS.size:
            return NeedData(CLIENT_FLAGS.size - len(self._inbuf))
        flags = CLIENT_FLAGS.unpack(self._take(CLIENT_FLAGS.size))[0]
        if flags & ~KNOWN_CLIENT_FLAGS:
            return self._close("unknown client flags 0x%x" % flags)
        # A plain newstyle client (no FIXED_NEWSTYLE bit) is served too,
        # as nbdkit does: all it can send is EXPORT_NAME.
        self.no_zeroes = bool(flags & CLIENT_FLAG_NO_ZEROES)
        self._state = _OPTION_HEADER
        return self._read_option_header()

    def _read_option_header(self):
        if len(self._inbuf) < OPTION_HEADER.size:
            return NeedData(OPTION_HEADER.size - len(self._inbuf))
        magic, option, length = OPTION_HEADER.unpack(
            self._take(OPTION_HEADER.size))
        if magic != IHAVEOPT:
            return self._close("bad option magic 0x%x" % magic)
        self._option = option
        if length > MAX_OPTION_LENGTH:
            # Skipping it would mean reading whatever the client claims.
            self._error(REP_ERR_TOO_BIG, "option payload is too long")
            return self._close("option %d payload of %d bytes is too long"
                               % (option, length))
        self._option_length = length
        self._state = _OPTION_PAYLOAD
        return self._read_option_payload()

    def _read_option_payload(self):
        if len(self._inbuf) < self._option_length:
            return NeedData(self._option_length - len(self._inbuf))
        payload = self._take(self._option_length)
        self._state = _OPTION_HEADER
        event = self._handle_option(self._option, payload)
        if event is not None:
            return event
        return self._read_option_header()

    # -- options ------------------------------------------------------------
    def _tls_blocks(self, option):
        return (self.tls == "require" and not self.tls_active
                and option not in (OPT_STARTTLS, OPT_ABORT))

    def _handle_option(self, option, payload):
        """Return an event for the caller, or None when the option was
        answered here."""
        if self._tls_blocks(option):
            if option == OPT_EXPORT_NAME:
                return self._close("EXPORT_NAME before TLS")
            self._error(REP_ERR_TLS_REQD, "TLS is required")
            return None
        handler = self._OPTION_HANDLERS.get(option)
        if handler is None:
            self._error(REP_ERR_UNSUP, "option %d is not supported" % option)
            return None
        return handler(self, payload)

    def _opt_export_name(self, payload):
        if len(payload) > MAX_STRING:
            return self._close("export name is too long")
        try:
            name = payload.decode("utf-8")
        except UnicodeDecodeError:
            return self._close("export name is not UTF-8")
        return self._await_export(ExportRequest(OPT_EXPORT_NAME, name, []))

    def _opt_abort(self, payload):
        self._send(option_reply(OPT_ABORT, REP_ACK))
        return self._close("client aborted")

    def _opt_list(self, payload):
        if payload:
            self._error(REP_ERR_INVALID, "LIST takes no data")
            return None
        self._state = _AWAITING_LIST
        self._pending = ListRequest()
        return self._pending

    def _opt_starttls(self, payload):
        if payload:
            self._error(REP_ERR_INVALID, "STARTTLS takes no data")
            return None
        if self.tls == "off":
            self._error(REP_ERR_POLICY, "TLS is not enabled on this server")
            return None
        if self.tls_active:
            self._error(REP_ERR_INVALID, "TLS is already active")
            return None
        self._state = _AWAITING_TLS
        self._pending = TlsRequest()
        return self._pending

    def _opt_info_or_go(self, payload):
        try:
            name, infos = decode_info_request(payload)
        except ProtocolError as exc:
            too_long = len(payload) >= 4 and (
                U32.unpack_from(payload)[0] > MAX_STRING)
            self._error(REP_ERR_TOO_BIG if too_long else REP_ERR_INVALID,
                        str(exc))
            return None
        return self._await_export(ExportRequest(self._option, name, infos))

    def _opt_structured_reply(self, payload):
        if payload:
            self._error(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        elif self.structured:
            self._error(REP_ERR_INVALID, "structured replies already on")
        else:
            self.structured = True
            self._send(option_reply(OPT_STRUCTURED_REPLY, REP_ACK))
        return None

    def _opt_meta_context(self, payload):
        option = self._option
        if not self.structured:
            self._error(REP_ERR_INVALID,
                        "negotiate structured replies first")
            return None
        try:
            name, queries = decode_meta_context_request(payload)
        except ProtocolError as exc:
            self._error(REP_ERR_INVALID, str(exc))
            return None
        listing = option == OPT_LIST_META_CONTEXT
        found = match_meta_contexts(queries, listing)
        if not listing:
            self.meta_contexts = dict(
                (META_CONTEXTS[context], context) for context in found)
            self._meta_export = name
        for context in found:
            self._send(meta_context_reply(option, META_CONTEXTS[context],
                                          context))
        self._send(option_reply(option, REP_ACK))
        return None

    _OPTION_HANDLERS = {
        OPT_EXPORT_NAME: _opt_export_name,
        OPT_ABORT: _opt_abort,
        OPT_LIST: _opt_list,
        OPT_STARTTLS: _opt_starttls,
        OPT_INFO: _opt_info_or_go,
        OPT_GO: _opt_info_or_go,
        OPT_STRUCTURED_REPLY: _opt_structured_reply,
        OPT_LIST_META_CONTEXT: _opt_meta_context,
        OPT_SET_META_CONTEXT: _opt_meta_context,
    }

    def _await_export(self, request):
        self._state = _AWAITING_EXPORT
        self._pending = request
        return request

    # -- decisions from the caller -------------------------------------------
    def _expect(self, state):
        if self._state != state:
            raise ProtocolError("no %s decision is pending (state %s)"
                                % (state, self._state))
        self._state = _OPTION_HEADER
        pending, self._pending = self._pending, None
        return pending

    def answer_export(self, export, message=""):
        """``export``: ExportInfo, or None when the name is unknown."""
        request = self._expect(_AWAITING_EXPORT)
        option = request.option
        if export is None:
            if option == OPT_EXPORT_NAME:
                return self._close("unknown export %r" % request.name)
            self._send(option_error(option, REP_ERR_UNKNOWN,
                                    message or "unknown export"))
            return None
        if option == OPT_INFO:
            self._send(info_replies(option, export, request.infos))
            self._send(option_reply(option, REP_ACK))
            return None
        # The spec: contexts chosen for another export do not carry over.
        if self._meta_export is not None and self._meta_export != request.name:
            self.meta_contexts = {}
        if option == OPT_GO:
            self._send(info_replies(option, export, request.infos))
            self._send(option_reply(option, REP_ACK))
        else:
            self._send(export_name_reply(export, self.no_zeroes))
        self._state = _DONE
        return Ready(export, self.structured, dict(self.meta_contexts))

    def answer_list(self, exports):
        self._expect(_AWAITING_LIST)
        for name, description in exports:
            self._send(server_reply(name, description or ""))
        self._send(option_reply(OPT_LIST, REP_ACK))

    def refuse_tls(self, message="TLS is not available"):
        self._expect(_AWAITING_TLS)
        self._send(option_error(OPT_STARTTLS, REP_ERR_POLICY, message))

    def accept_tls(self):
        """Queue the ACK; after sending it the caller wraps the connection
        and calls ``tls_started()``."""
        self._expect(_AWAITING_TLS)
        self._send(option_reply(OPT_STARTTLS, REP_ACK))

    def tls_started(self):
        # The spec: nothing negotiated in the clear survives the upgrade.
        self.tls_active = True
        self.structured = False
        self.meta_contexts = {}
        self._meta_export = None
        if self._inbuf:
            raise ProtocolError("client sent data before the TLS handshake")


# ---------------------------------------------------------------------------
# transmission: requests and replies


def decode_request(header):
    """28 header bytes -> (flags, command, cookie, offset, length)."""
    magic, flags, command, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError("bad request magic 0x%x" % magic)
    return flags, command, cookie, offset, length


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
    """What transmission requests are checked against (fixed at GO)."""

    __slots__ = ("size", "flags", "minimum", "maximum", "structured",
                 "has_block_status")

    def __init__(self, size, flags, block_size, structured, has_block_status):
        self.size = size
        self.flags = flags
        self.minimum = block_size[0]
        self.maximum = block_size[2]
        self.structured = structured
        self.has_block_status = has_block_status


_RANGE_COMMANDS = (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE,
                   CMD_WRITE_ZEROES, CMD_BLOCK_STATUS)
_WRITE_COMMANDS = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
_DATA_COMMANDS = (CMD_READ, CMD_WRITE)
_NEEDED_FLAG = {
    CMD_FLUSH: TFLAG_SEND_FLUSH, CMD_TRIM: TFLAG_SEND_TRIM,
    CMD_WRITE_ZEROES: TFLAG_SEND_WRITE_ZEROES, CMD_CACHE: TFLAG_SEND_CACHE,
}


def validate_request(command, flags, offset, length, limits):
    """0 when the request may go to the engine, else the NBD errno."""
    allowed = _ALLOWED_CMD_FLAGS.get(command)
    if allowed is None:
        return NBD_EINVAL
    tflags = limits.flags
    if command in _WRITE_COMMANDS and tflags & TFLAG_READ_ONLY:
        return NBD_EPERM
    needed = _NEEDED_FLAG.get(command)
    if needed is not None and not tflags & needed:
        return NBD_EINVAL
    if flags & ~allowed:
        return NBD_EINVAL
    if flags & CMD_FLAG_FUA and not tflags & TFLAG_SEND_FUA:
        return NBD_EINVAL
    if flags & CMD_FLAG_DF and not limits.structured:
        return NBD_EINVAL
    if flags & CMD_FLAG_FAST_ZERO and not tflags & TFLAG_SEND_FAST_ZERO:
        return NBD_EINVAL
    if command == CMD_FLUSH:
        return NBD_EINVAL if offset or length else 0
    if command == CMD_DISC:
        return 0
    if command in _DATA_COMMANDS and (
            length > MAX_REQUEST_SIZE or length > limits.maximum):
        return NBD_EINVAL
    if length == 0 or offset + length > limits.size:
        return NBD_ENOSPC if command in _WRITE_COMMANDS else NBD_EINVAL
    minimum = limits.minimum
    if minimum > 1 and (offset % minimum or length % minimum):
        return NBD_EINVAL
    if command == CMD_BLOCK_STATUS and not limits.has_block_status:
        return NBD_EINVAL
    return 0
