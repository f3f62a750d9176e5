"""What the handshake says and reads besides its states: option replies,
the facts sent about an export (size, flags, block sizes), and the
decoders of option payloads, each raising ProtocolError on a malformed
one."""

from ..engine import CACHE_NONE, FUA_NONE, MAX_REQUEST_SIZE
from .wire import (EXPORT_NAME_PADDING, EXPORT_NAME_REPLY, INFO_BLOCK_SIZE,
                   INFO_BLOCK_SIZE_PAYLOAD, INFO_DESCRIPTION, INFO_EXPORT,
                   INFO_EXPORT_PAYLOAD, INFO_NAME, MAX_ERROR_MESSAGE,
                   MAX_STRING, META_CONTEXTS, OPTION_REPLY_HEADER,
                   OPTION_REPLY_MAGIC, OPT_LIST, ProtocolError, REP_INFO,
                   REP_META_CONTEXT, REP_SERVER, TFLAG_CAN_MULTI_CONN,
                   TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_ROTATIONAL,
                   TFLAG_SEND_CACHE, TFLAG_SEND_DF, TFLAG_SEND_FAST_ZERO,
                   TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, TFLAG_SEND_TRIM,
                   TFLAG_SEND_WRITE_ZEROES, U16, U32)


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
