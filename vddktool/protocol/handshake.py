"""The handshake (fixed-newstyle negotiation) as a state machine, with
the option replies and payload decoders it uses.

Bytes go in with ``receive_data``, events come out of ``next_event``, and
the caller answers the events that need a decision (which export, what
size); no socket or thread anywhere, so every state is reachable from a
unit test or a fuzzer.
"""

from ..engine import CACHE_NONE, FUA_NONE, MAX_REQUEST_SIZE
from .wire import (CLIENT_FLAGS, CLIENT_FLAG_FIXED_NEWSTYLE,
                   CLIENT_FLAG_NO_ZEROES, EXPORT_NAME_PADDING,
                   EXPORT_NAME_REPLY, GREETING, IHAVEOPT, INFO_BLOCK_SIZE,
                   INFO_BLOCK_SIZE_PAYLOAD, INFO_DESCRIPTION, INFO_EXPORT,
                   INFO_EXPORT_PAYLOAD, INFO_NAME, KNOWN_CLIENT_FLAGS,
                   MAX_ERROR_MESSAGE, MAX_OPTION_LENGTH, MAX_STRING,
                   META_CONTEXTS, NBDMAGIC, OPTION_HEADER, OPTION_NAMES,
                   OPTION_REPLY_HEADER, OPTION_REPLY_MAGIC, OPT_ABORT,
                   OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
                   OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS,
                   OPT_STRUCTURED_REPLY, ProtocolError, REP_ACK,
                   REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TLS_REQD,
                   REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO,
                   REP_META_CONTEXT, REP_SERVER, SERVER_HANDSHAKE_FLAGS,
                   TFLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY,
                   TFLAG_ROTATIONAL, TFLAG_SEND_CACHE, TFLAG_SEND_DF,
                   TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
                   TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES, U16, U32)

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
    connection (``Handshake.accept_tls()``, send the queued ACK, run the
    TLS handshake, then ``Handshake.tls_started()``) or declines
    (``Handshake.refuse_tls()``)."""

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
_STARTING_TLS = "starting-tls"
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
        if tls not in ("off", "on", "require"):
            raise ValueError("tls must be off, on or require, not %r" % tls)
        self.tls = tls
        self.tls_active = False
        # The spec allows TLS only after both sides agreed on fixed
        # newstyle: for any other client the server acts as if TLS were
        # off (decided once the client's flags are in).
        self._tls_offered = tls != "off"
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
        if self._state == _STARTING_TLS:
            # These bytes belong to the TLS handshake, not to NBD.
            raise ProtocolError("the TLS handshake has not finished")
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
        if self._state == _STARTING_TLS:
            raise ProtocolError("the TLS handshake has not finished")
        raise ProtocolError("negotiation is over")

    def _read_client_flags(self):
        if len(self._inbuf) < CLIENT_FLAGS.size:
            return NeedData(CLIENT_FLAGS.size - len(self._inbuf))
        flags = CLIENT_FLAGS.unpack(self._take(CLIENT_FLAGS.size))[0]
        if flags & ~KNOWN_CLIENT_FLAGS:
            return self._close("unknown client flags 0x%x" % flags)
        # A plain newstyle client (no FIXED_NEWSTYLE bit) is served too,
        # as nbdkit does: all it can send is EXPORT_NAME.  It cannot use
        # TLS, so where TLS is required it cannot be served at all.
        if not flags & CLIENT_FLAG_FIXED_NEWSTYLE:
            if self.tls == "require":
                return self._close("TLS is required and the client does "
                                   "not speak fixed newstyle")
            self._tls_offered = False
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
        if not self._tls_offered:
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
        """Queue the ACK.  After sending it the caller runs the TLS
        handshake over the connection, starting with ``trailing_data``
        (bytes the client sent past STARTTLS belong to TLS), then calls
        ``tls_started()``; meanwhile the machine takes no data."""
        self._expect(_AWAITING_TLS)
        self._state = _STARTING_TLS
        self._send(option_reply(OPT_STARTTLS, REP_ACK))

    def tls_started(self):
        """The TLS handshake succeeded: negotiation resumes, encrypted."""
        if self._state != _STARTING_TLS:
            raise ProtocolError("no TLS upgrade is pending (state %s)"
                                % self._state)
        self._state = _OPTION_HEADER
        # The spec: nothing negotiated in the clear survives the upgrade.
        self.tls_active = True
        self.structured = False
        self.meta_contexts = {}
        self._meta_export = None
        del self._inbuf[:]
