"""Property tests of the sans-IO protocol module (hypothesis).

The handshake machine is fed client byte streams, mostly well-formed
options with random payloads and some plain noise, cut at random places:
it must never raise anything but ProtocolError, and how the stream is cut
must not change a single byte it sends or a single decision it asks for.
Requests and replies must decode to what was encoded."""

import os
import struct

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:     # pragma: no cover - run-matrix.sh installs it
    raise ImportError("hypothesis is not installed: tests/run-matrix.sh "
                      "installs it in every venv (or pip install "
                      "hypothesis; 'hypothesis<6.32' on Python 3.6)")

from vddktool import engine as eng
from vddktool import protocol as nbd

# Quick enough for every run on eight interpreters (VDDKTOOL_EXAMPLES=5000
# for a longer hunt); no example database is written into the checkout.
settings.register_profile(
    "vddktool", max_examples=int(os.environ.get("VDDKTOOL_EXAMPLES", "60")),
    deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vddktool")

EXPORT = nbd.ExportInfo("", 1 << 20, nbd.TFLAG_HAS_FLAGS,
                        (1, 4096, 32 << 20), "the disk")

u16 = st.integers(0, 0xffff)
u32 = st.integers(0, 0xffffffff)
u64 = st.integers(0, 0xffffffffffffffff)


# ---------------------------------------------------------------------------
# client streams

def _string(text):
    data = text.encode("utf-8")
    return struct.pack(">I", len(data)) + data


@st.composite
def info_payloads(draw):
    infos = draw(st.lists(u16, max_size=4))
    return (_string(draw(st.sampled_from(["", "disk", "é"])))
            + struct.pack(">H%dH" % len(infos), len(infos), *infos))


@st.composite
def meta_context_payloads(draw):
    queries = draw(st.lists(st.sampled_from(
        ["base:allocation", "base:", "qemu:dirty-bitmap:x", "", "x"]),
        max_size=3))
    return (_string(draw(st.sampled_from(["", "disk"])))
            + struct.pack(">I", len(queries))
            + b"".join(_string(q) for q in queries))


@st.composite
def options(draw):
    """One option, usually well-formed, sometimes with a wrong length, a
    bad magic or a payload that is noise."""
    code = draw(st.one_of(
        st.sampled_from(sorted(nbd.OPTION_NAMES)), u32))
    if code in (nbd.OPT_INFO, nbd.OPT_GO):
        payload = draw(st.one_of(info_payloads(), st.binary(max_size=20)))
    elif code in (nbd.OPT_LIST_META_CONTEXT, nbd.OPT_SET_META_CONTEXT):
        payload = draw(st.one_of(meta_context_payloads(),
                                 st.binary(max_size=20)))
    elif code == nbd.OPT_EXPORT_NAME:
        payload = draw(st.sampled_from([b"", b"disk", b"\xff\xfe"]))
    else:
        payload = draw(st.one_of(st.just(b""), st.binary(max_size=12)))
    length = len(payload)
    if draw(st.integers(0, 19)) == 0:
        length = draw(u32)
    magic = nbd.IHAVEOPT if draw(st.integers(0, 29)) else draw(u64)
    return nbd.OPTION_HEADER.pack(magic, code, length) + payload


@st.composite
def client_streams(draw):
    flags = draw(st.one_of(st.integers(0, 3), u32))
    body = b"".join(draw(st.lists(options(), max_size=6)))
    tail = draw(st.binary(max_size=40))
    return struct.pack(">I", flags) + body + tail


def cut(stream, points):
    """The stream in pieces at the given positions."""
    bounds = sorted(set(p % (len(stream) + 1) for p in points))
    pieces, start = [], 0
    for bound in bounds + [len(stream)]:
        if bound > start:
            pieces.append(stream[start:bound])
            start = bound
    return pieces


def describe(event):
    """An event as comparable text (not every event class has a repr)."""
    fields = [getattr(event, name) for name in type(event).__slots__
              if name != "export"]
    return "%s%r" % (type(event).__name__, tuple(fields))


def negotiate(pieces, tls="off", upgrade=False):
    """Run the server's side against a client sending ``pieces``, as
    server.py does: answers the default export, lists one export, and
    refuses TLS, or with ``upgrade`` accepts it (the rest of the stream
    then stands for what TLS decrypts).  Returns (bytes sent, decisions
    asked for, bytes left over)."""
    handshake = nbd.Handshake(tls)
    sent = [handshake.greeting()]
    decisions = []
    pieces = list(pieces)
    while True:
        event = handshake.next_event()
        sent.append(handshake.data_to_send())
        if isinstance(event, nbd.NeedData):
            if not pieces:
                decisions.append("client went away")
                return b"".join(sent), decisions, b""
            handshake.receive_data(pieces.pop(0))
            continue
        decisions.append(describe(event))
        if isinstance(event, nbd.Closed):
            return b"".join(sent), decisions, b""
        if isinstance(event, nbd.ExportRequest):
            outcome = handshake.answer_export(
                EXPORT if event.name == "" else None)
        elif isinstance(event, nbd.ListRequest):
            outcome = handshake.answer_list([("", "the disk")])
        elif upgrade:
            assert isinstance(event, nbd.TlsRequest)
            outcome = handshake.accept_tls()
            sent.append(handshake.data_to_send())
            early = handshake.trailing_data
            handshake.tls_started()
            decisions.append("TLS")
            if early:
                pieces.insert(0, early)
        else:
            assert isinstance(event, nbd.TlsRequest)
            outcome = handshake.refuse_tls()
        sent.append(handshake.data_to_send())
        if isinstance(outcome, (nbd.Ready, nbd.Closed)):
            decisions.append(type(outcome).__name__)
            left = handshake.trailing_data + b"".join(pieces) \
                if isinstance(outcome, nbd.Ready) else b""
            return b"".join(sent), decisions, left


def negotiate_or_protocol_error(pieces, tls="off", upgrade=False):
    try:
        return negotiate(pieces, tls, upgrade)
    except nbd.ProtocolError as exc:
        return "ProtocolError: %s" % exc


@given(client_streams(), st.lists(st.integers(0, 1 << 16), max_size=12),
       st.sampled_from(["off", "on", "require"]), st.booleans())
def test_handshake_never_raises_and_cuts_change_nothing(stream, points, tls,
                                                        upgrade):
    whole = negotiate_or_protocol_error([stream], tls, upgrade)
    assert negotiate_or_protocol_error(cut(stream, points), tls,
                                       upgrade) == whole


@given(client_streams(), st.booleans())
def test_required_tls_asks_about_no_export_before_the_upgrade(stream,
                                                             upgrade):
    result = negotiate_or_protocol_error([stream], "require", upgrade)
    if isinstance(result, str):
        return
    decisions = result[1]
    before = decisions[:decisions.index("TLS")] if "TLS" in decisions \
        else decisions
    assert not [d for d in before
                if d.startswith(("ExportRequest", "ListRequest", "Ready"))]


@given(client_streams())
def test_handshake_byte_by_byte_is_the_same(stream):
    whole = negotiate_or_protocol_error([stream])
    assert negotiate_or_protocol_error(
        [stream[i:i + 1] for i in range(len(stream))]) == whole


@given(st.binary(max_size=200),
       st.lists(st.integers(0, 1 << 16), max_size=8))
def test_handshake_survives_noise(stream, points):
    negotiate_or_protocol_error(cut(stream, points))


@given(client_streams())
def test_every_option_reply_is_well_framed(stream):
    result = negotiate_or_protocol_error([stream])
    if isinstance(result, str):
        return
    sent = result[0]
    magic, ihaveopt, _ = nbd.GREETING.unpack_from(sent)
    assert (magic, ihaveopt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    pos = nbd.GREETING.size
    while pos < len(sent):
        if sent[pos:pos + 8] != struct.pack(">Q", nbd.OPTION_REPLY_MAGIC):
            # Only the answer to EXPORT_NAME has no reply header, and it
            # ends the negotiation.
            assert len(sent) - pos in (nbd.EXPORT_NAME_REPLY.size,
                                       nbd.EXPORT_NAME_REPLY.size + 124)
            break
        length = nbd.OPTION_REPLY_HEADER.unpack_from(sent, pos)[3]
        pos += nbd.OPTION_REPLY_HEADER.size + length
        assert pos <= len(sent)


# ---------------------------------------------------------------------------
# transmission encode/decode


@given(u16, u16, u64, u64, u32)
def test_request_decodes_to_what_was_encoded(flags, command, cookie, offset,
                                              length):
    header = nbd.encode_request(command, cookie, offset, length, flags)
    assert len(header) == nbd.REQUEST.size
    assert nbd.decode_request(header) == (flags, command, cookie, offset,
                                          length)


@given(st.binary(min_size=28, max_size=28))
def test_any_request_header_decodes_or_is_a_protocol_error(header):
    try:
        flags, command, cookie, offset, length = nbd.decode_request(header)
    except nbd.ProtocolError:
        assert header[:4] != struct.pack(">I", nbd.REQUEST_MAGIC)
    else:
        assert nbd.encode_request(command, cookie, offset, length,
                                  flags) == header


@given(u64, u32)
def test_simple_reply_decodes(cookie, error):
    assert nbd.SIMPLE_REPLY.unpack(nbd.simple_reply(cookie, error)) == (
        nbd.SIMPLE_REPLY_MAGIC, error, cookie)


@given(u64, u64, u32, st.booleans())
def test_hole_chunk_decodes(cookie, offset, length, done):
    magic, flags, kind, got_cookie, size, got_offset, got_length = \
        nbd.OFFSET_HOLE_CHUNK.unpack(
            nbd.offset_hole_chunk(cookie, offset, length, done))
    assert (magic, kind, got_cookie, size, got_offset, got_length) == (
        nbd.STRUCTURED_REPLY_MAGIC, nbd.CHUNK_OFFSET_HOLE, cookie, 12,
        offset, length)
    assert flags == (nbd.CHUNK_FLAG_DONE if done else 0)


@given(u64, u32, st.text(max_size=50), st.one_of(st.none(), u64))
def test_error_chunk_decodes(cookie, error, message, offset):
    chunk = nbd.error_chunk(cookie, error, message, offset)
    magic, flags, kind, got_cookie, length, got_error, text_length = \
        nbd.ERROR_CHUNK_START.unpack_from(chunk)
    body = chunk[nbd.CHUNK_HEADER.size:]
    assert len(body) == length
    assert (got_cookie, got_error) == (cookie, error)
    text = chunk[nbd.ERROR_CHUNK_START.size:
                 nbd.ERROR_CHUNK_START.size + text_length]
    assert text.decode("utf-8") == message
    if offset is None:
        assert kind == nbd.CHUNK_ERROR and length == 6 + text_length
    else:
        assert kind == nbd.CHUNK_ERROR_OFFSET
        assert struct.unpack(">Q", chunk[-8:])[0] == offset


@given(u64, u32, st.lists(st.tuples(st.integers(1, 0xffffffff), u32),
                          min_size=1, max_size=20))
def test_block_status_chunk_decodes(cookie, context, extents):
    chunk = nbd.block_status_chunk(cookie, context, extents)
    _, _, kind, got_cookie, length = nbd.CHUNK_HEADER.unpack_from(chunk)
    body = chunk[nbd.CHUNK_HEADER.size:]
    assert (kind, got_cookie, length) == (nbd.CHUNK_BLOCK_STATUS, cookie,
                                          len(body))
    assert struct.unpack_from(">I", body)[0] == context
    decoded = [nbd.EXTENT_DESCRIPTOR.unpack_from(body, 4 + 8 * i)
               for i in range((len(body) - 4) // 8)]
    assert decoded == extents


@given(st.text(max_size=30), st.lists(u16, max_size=6))
def test_info_request_decodes(name, infos):
    payload = _string(name) + struct.pack(">H%dH" % len(infos), len(infos),
                                          *infos)
    assert nbd.decode_info_request(payload) == (name, infos)


@given(st.text(max_size=20), st.lists(st.text(max_size=20), max_size=5))
def test_meta_context_request_decodes(name, queries):
    payload = (_string(name) + struct.pack(">I", len(queries))
               + b"".join(_string(q) for q in queries))
    assert nbd.decode_meta_context_request(payload) == (name, queries)


# ---------------------------------------------------------------------------
# extents


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3)),
                max_size=40),
       st.integers(0, 20000), st.integers(1, 20000), st.booleans())
def test_normalized_extents_are_what_clients_accept(runs, offset, count,
                                                    req_one):
    extents, position = [], 0
    for length, flags in runs:
        extents.append(eng.Extent(position, length, flags))
        position += length
    out = nbd.normalize_extents(extents, offset, count, req_one)
    assert all(length > 0 for length, _ in out)
    assert sum(length for length, _ in out) <= count
    assert all(a[1] != b[1] for a, b in zip(out, out[1:]))
    if req_one:
        assert len(out) <= 1
    covered = max(0, min(position, offset + count) - offset)
    if not req_one:
        assert sum(length for length, _ in out) == covered
    # Each byte keeps the flags the engine gave it.
    pos = offset
    for length, flags in out:
        for probe in (pos, pos + length - 1):
            owner = [e for e in extents
                     if e.offset <= probe < e.offset + e.length]
            assert owner and owner[0].flags & 3 == flags
        pos += length


# ---------------------------------------------------------------------------
# block sizes


def is_power_of_two(n):
    return n > 0 and n & (n - 1) == 0


@given(st.integers(0, 1 << 50), st.integers(0, 1 << 33),
       st.integers(0, 1 << 33), st.integers(0, 1 << 33))
def test_advertised_block_sizes_follow_the_spec(size, minimum, preferred,
                                                maximum):
    # Whatever an engine answers, what goes out must satisfy the rules
    # qemu enforces by hanging up.
    low, mid, high = nbd.clamp_block_size(size, minimum, preferred, maximum)
    assert is_power_of_two(low) and low <= 64 * 1024
    assert size % low == 0
    assert is_power_of_two(mid) and mid >= max(low, 512)
    assert mid <= high <= nbd.MAX_REQUEST_SIZE
    assert high % low == 0
