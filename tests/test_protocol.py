"""Unit tests of vddktool.protocol: no sockets, every state driven by hand."""

import errno
import random
import struct

import pytest

from vddktool import engine as eng
from vddktool import protocol as nbd

# ---------------------------------------------------------------------------
# helpers: the client's side of the wire


def option(opt, payload=b""):
    return nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, opt, len(payload)) + payload


def info_payload(name, infos=()):
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_payload(name, queries):
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query.encode()
    return out


def parse_replies(data):
    """Option replies -> [(option, type, payload)]."""
    replies = []
    while data:
        magic, opt, rtype, length = nbd.OPTION_REPLY_HEADER.unpack_from(data)
        assert magic == nbd.OPTION_REPLY_MAGIC
        start = nbd.OPTION_REPLY_HEADER.size
        replies.append((opt, rtype, data[start:start + length]))
        data = data[start + length:]
    return replies


def reply_types(data):
    return [rtype for _, rtype, _ in parse_replies(data)]


def negotiating(tls="off", flags=nbd.CLIENT_FLAG_FIXED_NEWSTYLE
                | nbd.CLIENT_FLAG_NO_ZEROES):
    handshake = nbd.Handshake(tls)
    handshake.receive_data(struct.pack(">I", flags))
    return handshake


def feed(handshake, data):
    """Feed bytes, return (event, bytes to send)."""
    handshake.receive_data(data)
    event = handshake.next_event()
    return event, handshake.data_to_send()


EXPORT = nbd.ExportInfo("disk", 1 << 20, nbd.TFLAG_HAS_FLAGS, (1, 4096,
                                                              1 << 25),
                        "a test disk")


def go_ready(handshake, name="disk", infos=()):
    event, _ = feed(handshake, option(nbd.OPT_GO, info_payload(name, infos)))
    assert isinstance(event, nbd.ExportRequest)
    ready = handshake.answer_export(EXPORT)
    return ready, handshake.data_to_send()


# ---------------------------------------------------------------------------
# greeting and client flags


def test_greeting_offers_fixed_newstyle_and_no_zeroes():
    magic, ihaveopt, flags = nbd.GREETING.unpack(nbd.Handshake().greeting())
    assert (magic, ihaveopt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    assert flags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES


def test_machine_asks_for_exactly_the_missing_client_flag_bytes():
    handshake = nbd.Handshake()
    assert handshake.next_event().count == 4
    handshake.receive_data(b"\0\0")
    assert handshake.next_event().count == 2


def test_unknown_client_flags_close_the_connection():
    handshake = negotiating(flags=nbd.CLIENT_FLAG_FIXED_NEWSTYLE | 0x100)
    assert isinstance(handshake.next_event(), nbd.Closed)


def test_plain_newstyle_client_may_use_export_name():
    handshake = negotiating(flags=0)
    event, _ = feed(handshake, option(nbd.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(event, nbd.ExportRequest)
    assert isinstance(handshake.answer_export(EXPORT), nbd.Ready)
    assert len(handshake.data_to_send()) == 134


def test_after_client_flags_the_machine_wants_an_option_header():
    event = negotiating().next_event()
    assert isinstance(event, nbd.NeedData)
    assert event.count == nbd.OPTION_HEADER.size


def test_bad_option_magic_closes():
    handshake = negotiating()
    event, _ = feed(handshake, struct.pack(">QII", 0x1234, nbd.OPT_GO, 0))
    assert isinstance(event, nbd.Closed)


# ---------------------------------------------------------------------------
# simple options


def test_unknown_option_is_unsupported_and_its_payload_skipped():
    handshake = negotiating()
    event, out = feed(handshake, option(200, b"x" * 100)
                      + option(nbd.OPT_STRUCTURED_REPLY))
    assert reply_types(out) == [nbd.REP_ERR_UNSUP, nbd.REP_ACK]
    assert isinstance(event, nbd.NeedData)


def test_extended_headers_are_unsupported():
    handshake = negotiating()
    _, out = feed(handshake, option(nbd.OPT_EXTENDED_HEADERS))
    assert reply_types(out) == [nbd.REP_ERR_UNSUP]


def test_oversized_option_is_refused_without_waiting_for_its_payload():
    handshake = negotiating()
    event, out = feed(handshake, nbd.OPTION_HEADER.pack(
        nbd.IHAVEOPT, nbd.OPT_GO, nbd.MAX_OPTION_LENGTH + 1))
    assert isinstance(event, nbd.Closed)
    assert reply_types(out) == [nbd.REP_ERR_TOO_BIG]


def test_option_payload_is_awaited_in_full():
    handshake = negotiating()
    event, _ = feed(handshake, option(nbd.OPT_GO, info_payload("disk"))[:-3])
    assert isinstance(event, nbd.NeedData) and event.count == 3


def test_abort_is_acknowledged_then_closes():
    handshake = negotiating()
    event, out = feed(handshake, option(nbd.OPT_ABORT))
    assert isinstance(event, nbd.Closed)
    assert parse_replies(out) == [(nbd.OPT_ABORT, nbd.REP_ACK, b"")]


def test_structured_reply_is_acknowledged_once():
    handshake = negotiating()
    _, out = feed(handshake, option(nbd.OPT_STRUCTURED_REPLY)
                  + option(nbd.OPT_STRUCTURED_REPLY))
    assert reply_types(out) == [nbd.REP_ACK, nbd.REP_ERR_INVALID]
    assert handshake.structured


def test_structured_reply_with_payload_is_invalid():
    handshake = negotiating()
    _, out = feed(handshake, option(nbd.OPT_STRUCTURED_REPLY, b"x"))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]
    assert not handshake.structured


def test_list_asks_the_caller_and_sends_one_server_reply_each():
    handshake = negotiating()
    event, _ = feed(handshake, option(nbd.OPT_LIST))
    assert isinstance(event, nbd.ListRequest)
    handshake.answer_list([("", "default"), ("b", "")])
    replies = parse_replies(handshake.data_to_send())
    assert [r[1] for r in replies] == [nbd.REP_SERVER, nbd.REP_SERVER,
                                      nbd.REP_ACK]
    assert replies[0][2] == b"\0\0\0\0default"
    assert replies[1][2] == b"\0\0\0\1b"


def test_list_with_payload_is_invalid():
    handshake = negotiating()
    _, out = feed(handshake, option(nbd.OPT_LIST, b"junk"))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]


def test_answering_what_was_not_asked_is_a_bug():
    handshake = negotiating()
    handshake.next_event()
    with pytest.raises(nbd.ProtocolError):
        handshake.answer_export(EXPORT)


# ---------------------------------------------------------------------------
# exports: EXPORT_NAME, INFO, GO


def test_export_name_reply_has_padding_unless_no_zeroes():
    for flags, length in ((nbd.CLIENT_FLAG_FIXED_NEWSTYLE, 134),
                          (nbd.CLIENT_FLAG_FIXED_NEWSTYLE
                           | nbd.CLIENT_FLAG_NO_ZEROES, 10)):
        handshake = negotiating(flags=flags)
        event, _ = feed(handshake, option(nbd.OPT_EXPORT_NAME, b"disk"))
        assert event.name == "disk"
        ready = handshake.answer_export(EXPORT)
        out = handshake.data_to_send()
        assert isinstance(ready, nbd.Ready)
        assert len(out) == length
        assert nbd.EXPORT_NAME_REPLY.unpack_from(out) == (EXPORT.size,
                                                          EXPORT.flags)


def test_unknown_export_name_can_only_close():
    handshake = negotiating()
    feed(handshake, option(nbd.OPT_EXPORT_NAME, b"nope"))
    assert isinstance(handshake.answer_export(None), nbd.Closed)
    assert handshake.data_to_send() == b""


def test_info_replies_then_negotiation_continues():
    handshake = negotiating()
    event, _ = feed(handshake, option(nbd.OPT_INFO, info_payload(
        "disk", [nbd.INFO_NAME, nbd.INFO_DESCRIPTION, 999])))
    assert event.option == nbd.OPT_INFO and 999 in event.infos
    assert handshake.answer_export(EXPORT) is None
    replies = parse_replies(handshake.data_to_send())
    infos = [struct.unpack_from(">H", p)[0] for _, t, p in replies
             if t == nbd.REP_INFO]
    assert infos == [nbd.INFO_EXPORT, nbd.INFO_NAME, nbd.INFO_DESCRIPTION,
                     nbd.INFO_BLOCK_SIZE]
    assert replies[-1][1] == nbd.REP_ACK
    assert replies[1][2][2:] == b"disk"
    assert replies[2][2][2:] == b"a test disk"
    assert isinstance(handshake.next_event(), nbd.NeedData)


def test_info_export_packet_carries_size_and_flags():
    handshake = negotiating()
    feed(handshake, option(nbd.OPT_INFO, info_payload("disk")))
    handshake.answer_export(EXPORT)
    _, _, payload = parse_replies(handshake.data_to_send())[0]
    assert nbd.INFO_EXPORT_PAYLOAD.unpack(payload) == (
        nbd.INFO_EXPORT, EXPORT.size, EXPORT.flags)


def test_block_size_packet_carries_the_three_sizes():
    handshake = negotiating()
    feed(handshake, option(nbd.OPT_INFO, info_payload("disk")))
    handshake.answer_export(EXPORT)
    replies = parse_replies(handshake.data_to_send())
    sizes = [nbd.INFO_BLOCK_SIZE_PAYLOAD.unpack(p)[1:] for _, t, p in replies
             if t == nbd.REP_INFO and p[:2] == b"\0\3"]
    assert sizes == [EXPORT.block_size]


def test_unknown_export_for_info_is_err_unknown():
    handshake = negotiating()
    feed(handshake, option(nbd.OPT_INFO, info_payload("nope")))
    handshake.answer_export(None, "no such export")
    replies = parse_replies(handshake.data_to_send())
    assert replies == [(nbd.OPT_INFO, nbd.REP_ERR_UNKNOWN,
                        b"no such export")]


def test_go_ends_negotiation_without_padding_after_ack():
    ready, out = go_ready(negotiating())
    assert isinstance(ready, nbd.Ready)
    assert reply_types(out)[-1] == nbd.REP_ACK
    assert out.endswith(nbd.OPTION_REPLY_HEADER.pack(
        nbd.OPTION_REPLY_MAGIC, nbd.OPT_GO, nbd.REP_ACK, 0))


def test_go_without_description_request_sends_no_description():
    _, out = go_ready(negotiating())
    kinds = [p[:2] for _, t, p in parse_replies(out) if t == nbd.REP_INFO]
    assert b"\0\2" not in kinds and b"\0\0" in kinds


def test_bytes_after_go_belong_to_transmission():
    handshake = negotiating()
    request = nbd.encode_request(nbd.CMD_READ, 1, 0, 512)
    handshake.receive_data(option(nbd.OPT_GO, info_payload("disk"))
                           + request)
    handshake.next_event()
    handshake.answer_export(EXPORT)
    assert handshake.trailing_data == request


def test_go_with_wrong_info_count_is_invalid():
    handshake = negotiating()
    payload = info_payload("disk", [1]) + b"\0"
    _, out = feed(handshake, option(nbd.OPT_GO, payload))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]


def test_go_with_name_longer_than_payload_is_invalid():
    handshake = negotiating()
    payload = struct.pack(">I", 50) + b"abc"
    _, out = feed(handshake, option(nbd.OPT_GO, payload))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]


def test_go_with_name_over_4096_bytes_is_too_big():
    handshake = negotiating()
    _, out = feed(handshake, option(nbd.OPT_GO, info_payload("n" * 5000)))
    assert reply_types(out) == [nbd.REP_ERR_TOO_BIG]


def test_export_name_that_is_not_utf8_closes():
    handshake = negotiating()
    event, _ = feed(handshake, option(nbd.OPT_EXPORT_NAME, b"\xff\xfe"))
    assert isinstance(event, nbd.Closed)


# ---------------------------------------------------------------------------
# meta contexts


def test_meta_context_before_structured_reply_is_invalid():
    for opt in (nbd.OPT_SET_META_CONTEXT, nbd.OPT_LIST_META_CONTEXT):
        handshake = negotiating()
        _, out = feed(handshake, option(opt, meta_payload(
            "disk", [nbd.BASE_ALLOCATION])))
        assert reply_types(out) == [nbd.REP_ERR_INVALID]


def structured():
    handshake = negotiating()
    feed(handshake, option(nbd.OPT_STRUCTURED_REPLY))
    return handshake


def test_set_base_allocation_selects_it_for_go():
    handshake = structured()
    _, out = feed(handshake, option(nbd.OPT_SET_META_CONTEXT, meta_payload(
        "disk", [nbd.BASE_ALLOCATION])))
    replies = parse_replies(out)
    assert [r[1] for r in replies] == [nbd.REP_META_CONTEXT, nbd.REP_ACK]
    assert replies[0][2] == struct.pack(">I", nbd.BASE_ALLOCATION_ID) + \
        b"base:allocation"
    ready, _ = go_ready(handshake)
    assert ready.structured
    assert ready.meta_contexts == {nbd.BASE_ALLOCATION_ID:
                                   nbd.BASE_ALLOCATION}


def test_unknown_namespace_is_ignored_not_an_error():
    handshake = structured()
    _, out = feed(handshake, option(nbd.OPT_SET_META_CONTEXT, meta_payload(
        "disk", ["qemu:dirty-bitmap:x", "base:nonsense"])))
    assert reply_types(out) == [nbd.REP_ACK]
    ready, _ = go_ready(handshake)
    assert ready.meta_contexts == {}


def test_list_meta_context_without_queries_lists_all():
    handshake = structured()
    _, out = feed(handshake, option(nbd.OPT_LIST_META_CONTEXT,
                                    meta_payload("disk", [])))
    replies = parse_replies(out)
    assert [p[4:] for _, t, p in replies if t == nbd.REP_META_CONTEXT] == [
        b"base:allocation"]
    assert replies[-1][1] == nbd.REP_ACK


def test_list_meta_context_by_namespace():
    handshake = structured()
    _, out = feed(handshake, option(nbd.OPT_LIST_META_CONTEXT,
                                    meta_payload("disk", ["base:"])))
    assert reply_types(out) == [nbd.REP_META_CONTEXT, nbd.REP_ACK]


def test_set_meta_context_by_bare_namespace_selects_nothing():
    handshake = structured()
    _, out = feed(handshake, option(nbd.OPT_SET_META_CONTEXT,
                                    meta_payload("disk", ["base:"])))
    assert reply_types(out) == [nbd.REP_ACK]


def test_list_does_not_select():
    handshake = structured()
    feed(handshake, option(nbd.OPT_LIST_META_CONTEXT,
                           meta_payload("disk", [nbd.BASE_ALLOCATION])))
    ready, _ = go_ready(handshake)
    assert ready.meta_contexts == {}


def test_contexts_set_for_another_export_are_dropped_at_go():
    handshake = structured()
    feed(handshake, option(nbd.OPT_SET_META_CONTEXT,
                           meta_payload("other", [nbd.BASE_ALLOCATION])))
    ready, _ = go_ready(handshake, "disk")
    assert ready.meta_contexts == {}


def test_truncated_meta_context_query_is_invalid():
    handshake = structured()
    payload = meta_payload("disk", [nbd.BASE_ALLOCATION])[:-4]
    _, out = feed(handshake, option(nbd.OPT_SET_META_CONTEXT, payload))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]


def test_meta_context_with_trailing_bytes_is_invalid():
    handshake = structured()
    payload = meta_payload("disk", []) + b"zz"
    _, out = feed(handshake, option(nbd.OPT_LIST_META_CONTEXT, payload))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]


# ---------------------------------------------------------------------------
# TLS


def test_starttls_without_tls_is_refused_by_policy():
    _, out = feed(negotiating(), option(nbd.OPT_STARTTLS))
    assert reply_types(out) == [nbd.REP_ERR_POLICY]


def test_starttls_with_tls_on_asks_the_server():
    handshake = negotiating(tls="on")
    event, _ = feed(handshake, option(nbd.OPT_STARTTLS))
    assert isinstance(event, nbd.TlsRequest)
    handshake.refuse_tls()
    assert reply_types(handshake.data_to_send()) == [nbd.REP_ERR_POLICY]


def test_tls_required_refuses_other_options():
    handshake = negotiating(tls="require")
    _, out = feed(handshake, option(nbd.OPT_INFO, info_payload("disk")))
    assert reply_types(out) == [nbd.REP_ERR_TLS_REQD]


def test_tls_required_export_name_disconnects():
    handshake = negotiating(tls="require")
    event, _ = feed(handshake, option(nbd.OPT_EXPORT_NAME, b""))
    assert isinstance(event, nbd.Closed)


def test_tls_upgrade_forgets_earlier_negotiation():
    handshake = negotiating(tls="on")
    feed(handshake, option(nbd.OPT_STRUCTURED_REPLY))
    feed(handshake, option(nbd.OPT_STARTTLS))
    handshake.accept_tls()
    assert reply_types(handshake.data_to_send()) == [nbd.REP_ACK]
    handshake.tls_started()
    assert handshake.tls_active and not handshake.structured


# ---------------------------------------------------------------------------
# robustness


def test_byte_by_byte_feeding_gives_the_same_replies():
    stream = (option(99, b"abc") + option(nbd.OPT_STRUCTURED_REPLY)
              + option(nbd.OPT_LIST_META_CONTEXT, meta_payload("", [])))
    handshake = negotiating()
    _, at_once = feed(handshake, stream)
    handshake = negotiating()
    pieces = []
    for i in range(len(stream)):
        pieces.append(feed(handshake, stream[i:i + 1])[1])
    assert b"".join(pieces) == at_once
    assert len(reply_types(at_once)) == 4


def test_random_garbage_never_raises_anything_unexpected():
    rng = random.Random(1234)
    for _ in range(300):
        handshake = negotiating()
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        if rng.random() < 0.7:
            blob = nbd.OPTION_HEADER.pack(
                nbd.IHAVEOPT, rng.randint(0, 12),
                rng.randint(0, 80)) + blob
        handshake.receive_data(blob)
        event = handshake.next_event()
        while isinstance(event, (nbd.ExportRequest, nbd.ListRequest)):
            if isinstance(event, nbd.ListRequest):
                handshake.answer_list([])
                event = handshake.next_event()
            else:
                event = handshake.answer_export(None) or \
                    handshake.next_event()
        assert isinstance(event, (nbd.NeedData, nbd.Closed, nbd.Ready))
        handshake.data_to_send()


# ---------------------------------------------------------------------------
# transmission encoders and decoders


def test_request_roundtrip():
    header = nbd.encode_request(nbd.CMD_WRITE, 0xdeadbeefcafe, 1 << 40,
                                65536, nbd.CMD_FLAG_FUA)
    assert len(header) == 28
    assert nbd.decode_request(header) == (nbd.CMD_FLAG_FUA, nbd.CMD_WRITE,
                                          0xdeadbeefcafe, 1 << 40, 65536)


def test_request_with_bad_magic_is_a_protocol_error():
    header = bytearray(nbd.encode_request(nbd.CMD_READ, 1, 0, 1))
    header[0] ^= 0xff
    with pytest.raises(nbd.ProtocolError):
        nbd.decode_request(bytes(header))


def test_simple_reply_layout():
    assert nbd.simple_reply(7, nbd.NBD_EIO) == struct.pack(
        ">IIQ", nbd.SIMPLE_REPLY_MAGIC, 5, 7)


def test_offset_data_header_counts_the_offset_in_its_length():
    header = nbd.offset_data_header(9, 4096, 512, True)
    magic, flags, ctype, cookie, length, offset = struct.unpack(">IHHQIQ",
                                                                header)
    assert (magic, flags, ctype, cookie, length, offset) == (
        nbd.STRUCTURED_REPLY_MAGIC, nbd.CHUNK_FLAG_DONE,
        nbd.CHUNK_OFFSET_DATA, 9, 520, 4096)


def test_offset_hole_chunk_layout():
    chunk = nbd.offset_hole_chunk(3, 100, 200, False)
    assert struct.unpack(">IHHQIQI", chunk)[1:] == (
        0, nbd.CHUNK_OFFSET_HOLE, 3, 12, 100, 200)


def test_error_chunk_carries_errno_and_message():
    chunk = nbd.error_chunk(4, nbd.NBD_EIO, "bad sector")
    fields = struct.unpack_from(">IHHQIIH", chunk)
    assert fields[1:] == (nbd.CHUNK_FLAG_DONE, nbd.CHUNK_ERROR, 4, 16,
                          nbd.NBD_EIO, 10)
    assert chunk.endswith(b"bad sector")


def test_error_offset_chunk_ends_with_the_offset():
    chunk = nbd.error_chunk(4, nbd.NBD_EIO, "x", offset=1 << 33)
    assert struct.unpack_from(">H", chunk, 6)[0] == nbd.CHUNK_ERROR_OFFSET
    assert struct.unpack(">Q", chunk[-8:])[0] == 1 << 33
    assert struct.unpack_from(">I", chunk, 16)[0] == 6 + 1 + 8


def test_block_status_chunk_layout():
    chunk = nbd.block_status_chunk(5, 1, [(4096, 3), (512, 0)])
    assert struct.unpack_from(">I", chunk, 16)[0] == 4 + 16
    assert struct.unpack(">IIIII", chunk[20:]) == (1, 4096, 3, 512, 0)


def test_none_chunk_is_done_and_empty():
    assert struct.unpack(">IHHQI", nbd.none_chunk(2))[1:] == (
        nbd.CHUNK_FLAG_DONE, nbd.CHUNK_NONE, 2, 0)


# ---------------------------------------------------------------------------
# extents


def E(offset, length, flags=0):
    return eng.Extent(offset, length, flags)


def test_extents_are_clipped_to_the_request():
    assert nbd.normalize_extents([E(0, 100, 1), E(100, 900)], 50, 100,
                                 False) == [(50, 1), (50, 0)]


def test_equal_neighbours_merge_and_empty_extents_vanish():
    assert nbd.normalize_extents([E(0, 10, 3), E(10, 0, 0), E(10, 5, 3),
                                  E(15, 5, 0)], 0, 20, False) == [
        (15, 3), (5, 0)]


def test_req_one_gives_one_extent_no_longer_than_asked():
    assert nbd.normalize_extents([E(0, 1000, 0), E(1000, 5)], 0, 300,
                                 True) == [(300, 0)]


def test_req_one_merges_before_choosing():
    assert nbd.normalize_extents([E(0, 10, 2), E(10, 10, 2), E(20, 10)], 0,
                                 30, True) == [(20, 2)]


def test_extents_stop_at_a_gap():
    assert nbd.normalize_extents([E(0, 10), E(20, 10, 1)], 0, 30,
                                 False) == [(10, 0)]


def test_extents_not_covering_the_start_give_nothing():
    assert nbd.normalize_extents([E(10, 10)], 0, 20, False) == []


def test_unknown_extent_flag_bits_are_dropped():
    assert nbd.normalize_extents([E(0, 8, 0xf0 | 1)], 0, 8, False) == [
        (8, 1)]


def test_a_reply_holds_at_most_the_bounded_number_of_extents():
    limit = nbd.MAX_EXTENTS_PER_REPLY
    many = [E(i, 1, 3 * (i % 2)) for i in range(limit + 10)]
    out = nbd.normalize_extents(many, 0, limit + 10, False)
    assert len(out) == limit and out[-1] == (1, 3 * ((limit - 1) % 2))


def test_the_bound_still_merges_a_last_extent_of_the_same_kind():
    limit = nbd.MAX_EXTENTS_PER_REPLY
    many = [E(i, 1, 3 * (i % 2)) for i in range(limit)] + [
        E(limit, 5, 3 * ((limit - 1) % 2))]
    out = nbd.normalize_extents(many, 0, limit + 5, False)
    assert len(out) == limit and out[-1][0] == 6


# ---------------------------------------------------------------------------
# request validation


def limits(flags=None, size=1 << 20, block=(1, 4096, 1 << 25),
           structured=True, block_status=True):
    if flags is None:
        flags = (nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_SEND_FLUSH
                 | nbd.TFLAG_SEND_FUA | nbd.TFLAG_SEND_TRIM
                 | nbd.TFLAG_SEND_WRITE_ZEROES | nbd.TFLAG_SEND_FAST_ZERO
                 | nbd.TFLAG_SEND_CACHE | nbd.TFLAG_SEND_DF)
    return nbd.Limits(size, flags, block, structured, block_status)


READ_ONLY = nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_READ_ONLY


@pytest.mark.parametrize("command,flags,offset,length,lim,expected", [
    (nbd.CMD_READ, 0, 0, 4096, limits(), 0),
    (nbd.CMD_READ, 0, (1 << 20) - 1, 1, limits(), 0),
    (nbd.CMD_READ, 0, (1 << 20) - 1, 2, limits(), nbd.NBD_EINVAL),
    (nbd.CMD_WRITE, 0, (1 << 20) - 1, 2, limits(), nbd.NBD_ENOSPC),
    (nbd.CMD_WRITE_ZEROES, 0, 1 << 20, 1, limits(), nbd.NBD_ENOSPC),
    (nbd.CMD_READ, 0, 0, 0, limits(), nbd.NBD_EINVAL),
    (nbd.CMD_READ, 0, 0, eng.MAX_REQUEST_SIZE + 1,
     limits(size=1 << 30, block=(1, 4096, 1 << 30)), nbd.NBD_EINVAL),
    (nbd.CMD_READ, 0, 0, 65 * 1024, limits(block=(1, 4096, 65536)),
     nbd.NBD_EINVAL),
    (nbd.CMD_BLOCK_STATUS, 0, 0, 1 << 20, limits(block=(1, 4096, 65536)),
     0),
    (nbd.CMD_READ, 0, 256, 512, limits(block=(512, 4096, 65536)),
     nbd.NBD_EINVAL),
    (nbd.CMD_READ, 0, 512, 1024, limits(block=(512, 4096, 65536)), 0),
    (nbd.CMD_WRITE, 0, 0, 512, limits(READ_ONLY), nbd.NBD_EPERM),
    (nbd.CMD_TRIM, 0, 0, 512, limits(READ_ONLY), nbd.NBD_EPERM),
    (nbd.CMD_WRITE_ZEROES, 0, 0, 512, limits(READ_ONLY), nbd.NBD_EPERM),
    (nbd.CMD_READ, 0, 0, 512, limits(READ_ONLY), 0),
    (nbd.CMD_FLUSH, 0, 0, 0, limits(READ_ONLY), nbd.NBD_EINVAL),
    (nbd.CMD_FLUSH, 0, 0, 0, limits(), 0),
    (nbd.CMD_FLUSH, 0, 0, 512, limits(), nbd.NBD_EINVAL),
    (nbd.CMD_TRIM, 0, 0, 512, limits(nbd.TFLAG_HAS_FLAGS), nbd.NBD_EINVAL),
    (nbd.CMD_CACHE, 0, 0, 512, limits(nbd.TFLAG_HAS_FLAGS), nbd.NBD_EINVAL),
    (nbd.CMD_CACHE, 0, 0, 512, limits(), 0),
    (nbd.CMD_WRITE, nbd.CMD_FLAG_FUA, 0, 512, limits(), 0),
    (nbd.CMD_WRITE, nbd.CMD_FLAG_FUA, 0, 512,
     limits(nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_SEND_WRITE_ZEROES),
     nbd.NBD_EINVAL),
    (nbd.CMD_READ, nbd.CMD_FLAG_FUA, 0, 512, limits(), nbd.NBD_EINVAL),
    (nbd.CMD_READ, nbd.CMD_FLAG_DF, 0, 512, limits(), 0),
    (nbd.CMD_READ, nbd.CMD_FLAG_DF, 0, 512, limits(structured=False),
     nbd.NBD_EINVAL),
    (nbd.CMD_READ, nbd.CMD_FLAG_REQ_ONE, 0, 512, limits(), nbd.NBD_EINVAL),
    (nbd.CMD_BLOCK_STATUS, nbd.CMD_FLAG_REQ_ONE, 0, 512, limits(), 0),
    (nbd.CMD_BLOCK_STATUS, 0, 0, 512, limits(block_status=False),
     nbd.NBD_EINVAL),
    (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE,
     0, 512, limits(), 0),
    (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_FAST_ZERO, 0, 512,
     limits(nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_SEND_WRITE_ZEROES),
     nbd.NBD_EINVAL),
    (nbd.CMD_WRITE, nbd.CMD_FLAG_NO_HOLE, 0, 512, limits(), nbd.NBD_EINVAL),
    (nbd.CMD_WRITE, 1 << 9, 0, 512, limits(), nbd.NBD_EINVAL),
    (8, 0, 0, 512, limits(), nbd.NBD_EINVAL),
    (0xffff, 0, 0, 512, limits(), nbd.NBD_EINVAL),
])
def test_validate_request(command, flags, offset, length, lim, expected):
    assert nbd.validate_request(command, flags, offset, length,
                                lim) == expected


# ---------------------------------------------------------------------------
# export flags, block sizes, errno


class FakeEngine(eng.Engine):
    def __init__(self, **answers):
        self.answers = answers

    def __getattribute__(self, name):
        answers = object.__getattribute__(self, "answers")
        if name in answers:
            return lambda: answers[name]
        return object.__getattribute__(self, name)


def test_read_only_engine_advertises_no_write_commands():
    flags = nbd.transmission_flags(FakeEngine(can_trim=True), False, False)
    assert flags & nbd.TFLAG_READ_ONLY
    for bit in (nbd.TFLAG_SEND_TRIM, nbd.TFLAG_SEND_WRITE_ZEROES,
                nbd.TFLAG_SEND_FUA, nbd.TFLAG_SEND_FAST_ZERO):
        assert not flags & bit


def test_readonly_option_overrides_a_writable_engine():
    flags = nbd.transmission_flags(FakeEngine(can_write=True), True, False)
    assert flags & nbd.TFLAG_READ_ONLY
    assert not flags & nbd.TFLAG_SEND_WRITE_ZEROES


def test_writable_engine_flags_follow_its_answers():
    engine = FakeEngine(can_write=True, can_flush=True, can_trim=True,
                        can_multi_conn=True, can_cache=eng.CACHE_EMULATE,
                        is_rotational=True)
    flags = nbd.transmission_flags(engine, False, True)
    for bit in (nbd.TFLAG_HAS_FLAGS, nbd.TFLAG_SEND_FLUSH, nbd.TFLAG_SEND_FUA,
                nbd.TFLAG_SEND_TRIM, nbd.TFLAG_SEND_WRITE_ZEROES,
                nbd.TFLAG_CAN_MULTI_CONN, nbd.TFLAG_SEND_CACHE,
                nbd.TFLAG_ROTATIONAL, nbd.TFLAG_SEND_DF):
        assert flags & bit, hex(bit)
    assert not flags & nbd.TFLAG_READ_ONLY


def test_flags_omit_what_the_engine_cannot_do():
    flags = nbd.transmission_flags(FakeEngine(can_write=True), False, False)
    for bit in (nbd.TFLAG_SEND_FLUSH, nbd.TFLAG_SEND_FUA, nbd.TFLAG_SEND_TRIM,
                nbd.TFLAG_CAN_MULTI_CONN, nbd.TFLAG_SEND_CACHE,
                nbd.TFLAG_ROTATIONAL, nbd.TFLAG_SEND_DF):
        assert not flags & bit, hex(bit)


@pytest.mark.parametrize("size,given,expected", [
    (1 << 20, (1, 4096, 1 << 26), (1, 4096, 1 << 26)),
    (1 << 20, (512, 512, 1 << 30), (512, 512, eng.MAX_REQUEST_SIZE)),
    (1 << 20, (3, 100, 1000), (2, 512, 1000)),
    (1 << 20, (1 << 20, 1, 1), (65536, 65536, 65536)),
    (1000, (512, 4096, 1 << 20), (8, 4096, 1 << 20)),
    (1 << 20, (4096, 4096, 10000), (4096, 4096, 8192)),
])
def test_block_sizes_are_clamped_to_the_spec(size, given, expected):
    assert nbd.clamp_block_size(size, *given) == expected


@pytest.mark.parametrize("host,wire", [
    (errno.EROFS, nbd.NBD_EPERM), (errno.EDQUOT, nbd.NBD_ENOSPC),
    (errno.EFBIG, nbd.NBD_ENOSPC), (errno.EOPNOTSUPP, nbd.NBD_ENOTSUP),
    (errno.EIO, nbd.NBD_EIO), (errno.ENOENT, nbd.NBD_EINVAL),
    (errno.ESHUTDOWN, nbd.NBD_ESHUTDOWN),
])
def test_host_errno_maps_to_nbd_errno(host, wire):
    assert nbd.nbd_errno(host) == wire


def test_validation_of_random_requests_always_gives_an_nbd_errno():
    rng = random.Random(99)
    known = {0, nbd.NBD_EPERM, nbd.NBD_EINVAL, nbd.NBD_ENOSPC}
    for _ in range(2000):
        lim = limits(flags=rng.getrandbits(12) | nbd.TFLAG_HAS_FLAGS,
                     size=rng.choice([0, 1, 4096, 1 << 40]),
                     block=rng.choice([(1, 4096, 1 << 25),
                                       (512, 4096, 65536)]),
                     structured=rng.random() < 0.5,
                     block_status=rng.random() < 0.5)
        result = nbd.validate_request(
            rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0xffff]),
            rng.getrandbits(16), rng.getrandbits(64), rng.getrandbits(32),
            lim)
        assert result in known


# ---------------------------------------------------------------------------
# sans-IO


def test_the_protocol_module_does_no_io():
    # Importing it, with what it imports, must pull in nothing that talks
    # to the network: it is fed bytes and hands bytes back.
    import subprocess
    import sys
    from conftest import ROOT
    probe = ("import sys, vddktool.protocol\n"
             "print(sorted(m for m in ('socket', 'socketserver', 'select', "
             "'selectors', 'ssl') if m in sys.modules))\n")
    out = subprocess.check_output([sys.executable, "-c", probe], cwd=ROOT)
    assert out.decode().strip() == "[]"


def test_peek_reads_command_and_length_only():
    header = nbd.encode_request(nbd.CMD_WRITE, 0xabcdef, 1 << 40, 65536,
                                nbd.CMD_FLAG_FUA)
    assert nbd.peek_command_and_length(header) == (nbd.CMD_WRITE, 65536)
    assert nbd.peek_command_and_length(memoryview(header)) == (
        nbd.CMD_WRITE, 65536)


def test_one_chunk_read_reply_is_a_done_offset_data_chunk():
    data = bytearray(b"\xab" * 4096)
    header, body = nbd.one_chunk_read_reply(0x1122334455667788, 1 << 33,
                                            data)
    # Structured reply magic, flags, type, cookie, length; then the offset.
    magic, flags, chunk_type, cookie, length, offset = struct.unpack(
        ">IHHQIQ", header)
    assert magic == 0x668e33ef
    assert flags == 1                 # NBD_REPLY_FLAG_DONE
    assert chunk_type == 1            # NBD_REPLY_TYPE_OFFSET_DATA
    assert cookie == 0x1122334455667788
    assert length == 8 + 4096 and offset == 1 << 33
    assert body is data               # sent as it is, not copied
