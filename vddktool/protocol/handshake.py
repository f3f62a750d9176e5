"""The handshake (fixed-newstyle negotiation) as a state machine.

Bytes go in with ``receive_data``, events come out of ``next_event``, and
the caller answers the events that need a decision (which export, what
size); no socket or thread anywhere, so every state is reachable from a
unit test or a fuzzer.  The replies and decoders it uses are in
options.py.
"""

from .options import (decode_info_request, decode_meta_context_request,
                      export_name_reply, info_replies, match_meta_contexts,
                      meta_context_reply, option_error, option_reply,
                      server_reply)
from .wire import (CLIENT_FLAGS, CLIENT_FLAG_FIXED_NEWSTYLE,
                   CLIENT_FLAG_NO_ZEROES, GREETING, IHAVEOPT,
                   KNOWN_CLIENT_FLAGS, MAX_OPTION_LENGTH, MAX_STRING,
                   META_CONTEXTS, NBDMAGIC, OPTION_HEADER, OPTION_NAMES,
                   OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
                   OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS,
                   OPT_STRUCTURED_REPLY, ProtocolError, REP_ACK,
                   REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TLS_REQD,
                   REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
                   SERVER_HANDSHAKE_FLAGS, U32)


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
