"""STARTTLS in the handshake machine, against the NBD spec's FORCEDTLS and
SELECTIVETLS rules: what is refused before the upgrade, what the upgrade
forgets, and that nothing about an export is told in the clear when TLS
is required."""

import struct

import pytest

from test_protocol import (EXPORT, feed, info_payload, meta_payload,
                           negotiating, option, reply_types)
from vddktool import protocol as nbd

PLAIN_NEWSTYLE = nbd.CLIENT_FLAG_NO_ZEROES


def started(tls="require"):
    """A machine that has just gone through STARTTLS and its upgrade."""
    handshake = negotiating(tls=tls)
    event, _ = feed(handshake, option(nbd.OPT_STARTTLS))
    assert isinstance(event, nbd.TlsRequest)
    handshake.accept_tls()
    assert reply_types(handshake.data_to_send()) == [nbd.REP_ACK]
    handshake.tls_started()
    return handshake


@pytest.mark.parametrize("opt, payload", [
    (nbd.OPT_LIST, b""),
    (nbd.OPT_INFO, info_payload("disk", [nbd.INFO_NAME])),
    (nbd.OPT_GO, info_payload("")),
    (nbd.OPT_STRUCTURED_REPLY, b""),
    (nbd.OPT_LIST_META_CONTEXT, meta_payload("", [])),
    (nbd.OPT_SET_META_CONTEXT, meta_payload("", ["base:allocation"])),
    (nbd.OPT_EXTENDED_HEADERS, b""),
    (0x4242, b"what"),
], ids=["list", "info", "go", "structured", "list-meta", "set-meta",
        "extended", "unknown"])
def test_required_tls_refuses_every_option_before_the_upgrade(opt, payload):
    handshake = negotiating(tls="require")
    event, out = feed(handshake, option(opt, payload))
    # The machine answered alone: the server was not asked about exports.
    assert isinstance(event, nbd.NeedData)
    assert reply_types(out) == [nbd.REP_ERR_TLS_REQD]


def test_required_tls_lets_abort_through():
    handshake = negotiating(tls="require")
    event, out = feed(handshake, option(nbd.OPT_ABORT))
    assert isinstance(event, nbd.Closed)
    assert reply_types(out) == [nbd.REP_ACK]


def test_required_tls_hangs_up_on_export_name_before_the_upgrade():
    handshake = negotiating(tls="require")
    event, out = feed(handshake, option(nbd.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(event, nbd.Closed) and out == b""


def test_required_tls_hangs_up_on_a_client_without_fixed_newstyle():
    # Such a client cannot send STARTTLS: it could only ever be served in
    # the clear.
    handshake = negotiating(tls="require", flags=PLAIN_NEWSTYLE)
    assert isinstance(handshake.next_event(), nbd.Closed)


def test_optional_tls_is_refused_to_a_client_without_fixed_newstyle():
    handshake = negotiating(tls="on", flags=PLAIN_NEWSTYLE)
    event, out = feed(handshake, option(nbd.OPT_STARTTLS))
    assert isinstance(event, nbd.NeedData)
    assert reply_types(out) == [nbd.REP_ERR_POLICY]


def test_optional_tls_serves_a_plain_client():
    handshake = negotiating(tls="on")
    event, _ = feed(handshake, option(nbd.OPT_GO, info_payload("disk")))
    assert isinstance(event, nbd.ExportRequest)
    assert isinstance(handshake.answer_export(EXPORT), nbd.Ready)


def test_starttls_with_data_is_invalid():
    handshake = negotiating(tls="require")
    event, out = feed(handshake, option(nbd.OPT_STARTTLS, b"x"))
    assert isinstance(event, nbd.NeedData)
    assert reply_types(out) == [nbd.REP_ERR_INVALID]


def test_second_starttls_is_invalid():
    handshake = started()
    _, out = feed(handshake, option(nbd.OPT_STARTTLS))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]


def test_after_the_upgrade_options_reach_the_server():
    handshake = started()
    event, _ = feed(handshake, option(nbd.OPT_LIST))
    assert isinstance(event, nbd.ListRequest)
    handshake.answer_list([("disk", "")])
    assert reply_types(handshake.data_to_send()) == [nbd.REP_SERVER,
                                                     nbd.REP_ACK]
    event, _ = feed(handshake, option(nbd.OPT_GO, info_payload("disk")))
    assert isinstance(event, nbd.ExportRequest)
    assert isinstance(handshake.answer_export(EXPORT), nbd.Ready)


def test_the_upgrade_forgets_structured_replies_and_meta_contexts():
    handshake = negotiating(tls="on")
    feed(handshake, option(nbd.OPT_STRUCTURED_REPLY))
    feed(handshake, option(nbd.OPT_SET_META_CONTEXT,
                           meta_payload("disk", ["base:allocation"])))
    assert handshake.meta_contexts
    feed(handshake, option(nbd.OPT_STARTTLS))
    handshake.accept_tls()
    handshake.data_to_send()
    handshake.tls_started()
    # Setting a meta context again needs structured replies again.
    _, out = feed(handshake, option(nbd.OPT_SET_META_CONTEXT,
                                    meta_payload("disk",
                                                 ["base:allocation"])))
    assert reply_types(out) == [nbd.REP_ERR_INVALID]
    event, _ = feed(handshake, option(nbd.OPT_GO, info_payload("disk")))
    ready = handshake.answer_export(EXPORT)
    assert not ready.structured and ready.meta_contexts == {}


def test_no_data_is_taken_while_the_tls_handshake_runs():
    handshake = negotiating(tls="on")
    feed(handshake, option(nbd.OPT_STARTTLS))
    handshake.accept_tls()
    with pytest.raises(nbd.ProtocolError):
        handshake.next_event()
    with pytest.raises(nbd.ProtocolError):
        handshake.receive_data(b"\x16\x03\x01")


def test_bytes_past_starttls_are_left_for_tls():
    handshake = negotiating(tls="on")
    hello = b"\x16\x03\x01\x00\x05hello"
    event, _ = feed(handshake, option(nbd.OPT_STARTTLS) + hello)
    assert isinstance(event, nbd.TlsRequest)
    handshake.accept_tls()
    assert handshake.trailing_data == hello
    handshake.tls_started()
    assert handshake.trailing_data == b""


def test_tls_started_without_an_upgrade_is_a_protocol_error():
    handshake = negotiating(tls="on")
    with pytest.raises(nbd.ProtocolError):
        handshake.tls_started()


def test_tls_mode_must_be_known():
    with pytest.raises(ValueError):
        nbd.Handshake("yes")


def test_required_tls_tells_nothing_before_the_upgrade():
    """Every option the spec knows, well-formed, in one stream: the only
    bytes that come back are error replies without a word about exports,
    and the server is never asked about one."""
    stream = struct.pack(">I", nbd.CLIENT_FLAG_FIXED_NEWSTYLE)
    for opt in sorted(nbd.OPTION_NAMES):
        if opt not in (nbd.OPT_EXPORT_NAME, nbd.OPT_ABORT,
                       nbd.OPT_STARTTLS):
            stream += option(opt, info_payload(
                "disk", [nbd.INFO_NAME, nbd.INFO_DESCRIPTION]))
    handshake = nbd.Handshake("require")
    handshake.receive_data(stream)
    event = handshake.next_event()
    out = handshake.data_to_send()
    assert isinstance(event, nbd.NeedData)
    assert set(reply_types(out)) == {nbd.REP_ERR_TLS_REQD}
    assert b"disk" not in out
