"""The clients nbd-notes.md describes, each talking to the real program
the way it really does: the kernel's nbd-client (GO with no info requests,
simple replies only), qemu-img (BLOCK_STATUS with REQ_ONE), nbdinfo --map
over a badly fragmented disk, and a client that hangs up in the middle of
a large reply (SIGPIPE must not kill the server)."""

import json
import os
import re
import socket
import struct

import pytest

from conftest import need, run
from test_server_raw import RawClient
from test_vmdk_cowd_serve import cowd_disk
from vddktool import protocol as nbd
from vmdk_fixtures import expected_map, served_map

MIB = 1024 * 1024
SECTOR = 512


@pytest.fixture
def flat_disk(tmp_path):
    """A monolithicFlat VMDK whose extent holds random bytes; returns
    (descriptor path, contents)."""
    need("qemu-img")
    path = str(tmp_path / "flat.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         "subformat=monolithicFlat", path, str(4 * MIB)])
    contents = os.urandom(4 * MIB)
    with open(str(tmp_path / "flat-flat.vmdk"), "r+b") as f:
        f.write(contents)
    return path, contents


# ---------------------------------------------------------------------------
# the Linux kernel's nbd-client


def kernel_style_go(client):
    """What nbd-client does: fixed newstyle, GO naming the default export
    with no info requests, no STRUCTURED_REPLY.  Returns (size, flags)."""
    client.greet(nbd.CLIENT_FLAG_FIXED_NEWSTYLE | nbd.CLIENT_FLAG_NO_ZEROES)
    client.option(nbd.OPT_GO, struct.pack(">IH", 0, 0))
    export = None
    while True:
        _, reply_type, payload = client.reply()
        if reply_type == nbd.REP_ACK:
            assert export is not None, "GO acknowledged without INFO_EXPORT"
            return export
        assert reply_type == nbd.REP_INFO, hex(reply_type)
        if struct.unpack_from(">H", payload)[0] == nbd.INFO_EXPORT:
            export = nbd.INFO_EXPORT_PAYLOAD.unpack(payload)[1:]


def read_simple(client, cookie, offset, length):
    client.request(nbd.CMD_READ, cookie, offset, length)
    error, got_cookie = client.simple_reply()
    assert (error, got_cookie) == (0, cookie)
    return client.recv(length)


def test_kernel_client_reads_with_simple_replies(flat_disk, start_server):
    path, contents = flat_disk
    server = start_server("-r", path)
    client = RawClient.unix(server.sock)
    try:
        size, flags = kernel_style_go(client)
        assert size == len(contents)
        assert flags & nbd.TFLAG_HAS_FLAGS and flags & nbd.TFLAG_READ_ONLY
        # 512-byte blocks as the kernel sends them (nbd-client -b default),
        # and a large one as readahead does.
        for cookie, (offset, length) in enumerate(
                [(0, 512), (3 * MIB + 512, 1024), (MIB, 128 * 1024)], 1):
            assert read_simple(client, cookie, offset, length) == \
                contents[offset:offset + length]
        client.request(nbd.CMD_DISC, 99, 0, 0)
        assert client.at_eof()
    finally:
        client.close()


def test_kernel_client_writes_flushes_and_reads_back(flat_disk,
                                                     start_server):
    path, contents = flat_disk
    server = start_server(path)
    client = RawClient.unix(server.sock)
    try:
        _, flags = kernel_style_go(client)
        assert flags & nbd.TFLAG_SEND_FLUSH
        block = os.urandom(4096)
        client.request(nbd.CMD_WRITE, 1, 8192, len(block), data=block)
        assert client.simple_reply() == (0, 1)
        client.request(nbd.CMD_FLUSH, 2, 0, 0)
        assert client.simple_reply() == (0, 2)
        assert read_simple(client, 3, 4096, 3 * 4096) == \
            contents[4096:8192] + block + contents[12288:16384]
        # DF needs structured replies, which this client never asked for.
        client.request(nbd.CMD_READ, 4, 0, 512, flags=nbd.CMD_FLAG_DF)
        assert client.simple_reply() == (nbd.NBD_EINVAL, 4)
    finally:
        client.close()


# ---------------------------------------------------------------------------
# qemu-img: BLOCK_STATUS with REQ_ONE


def test_qemu_img_map_over_nbd_uses_req_one_and_matches(tmp_path,
                                                        start_server):
    need("qemu-img")
    need("qemu-io")
    path = str(tmp_path / "sparse.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", path, str(8 * MIB)])
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 64k",
         "-c", "write -P 0x22 1M 192k", "-c", "write -P 0x33 7M 64k", path])
    server = start_server("-v", "-r", path)
    over_nbd = json.loads(run(["qemu-img", "map", "--output=json", "-f",
                               "raw", server.qemu_uri]).stdout)
    local = json.loads(run(["qemu-img", "map", "--output=json",
                            path]).stdout)

    def runs(entries):
        return [(e["start"], e["length"], e["data"]) for e in entries]
    assert runs(over_nbd) == runs(local)
    status_flags = re.findall(r"BLOCK_STATUS flags (0x[0-9a-f]+)",
                              server.log())
    assert status_flags, "qemu-img asked no BLOCK_STATUS"
    assert all(int(f, 16) & nbd.CMD_FLAG_REQ_ONE for f in status_flags)


# ---------------------------------------------------------------------------
# a badly fragmented disk


def alternating_sectors(count):
    """Every other 512-byte sector holds data: ``count`` extents."""
    data = bytearray(count * SECTOR)
    for index in range(0, count, 2):
        data[index * SECTOR:(index + 1) * SECTOR] = b"\xa5" * SECTOR
    return bytes(data)


def test_nbdinfo_map_of_a_disk_with_many_extents(tmp_path, start_server):
    count = 2 * nbd.MAX_EXTENTS_PER_REPLY + 500
    data = alternating_sectors(count)
    desc, allocated = cowd_disk(tmp_path, "fragmented", data)
    server = start_server("-r", "file=%s" % desc)
    assert served_map(server) == expected_map(data, SECTOR, allocated)
    assert len(expected_map(data, SECTOR, allocated)) == count


def test_one_block_status_reply_is_bounded(tmp_path, start_server):
    count = nbd.MAX_EXTENTS_PER_REPLY + 1000
    data = alternating_sectors(count)
    desc, _ = cowd_disk(tmp_path, "fragmented", data)
    server = start_server("-r", "file=%s" % desc)
    script = (
        "import json\n"
        "h.add_meta_context('base:allocation')\n"
        "h.connect_uri(%r)\n"
        "seen = []\n"
        "def cb(context, offset, entries, err):\n"
        "    seen.append(entries)\n"
        "h.block_status(h.get_size(), 0, cb)\n"
        "print(json.dumps(seen))\n" % server.uri)
    replies = json.loads(run([need("nbdsh"), "-c", script]).stdout)
    assert len(replies) == 1
    entries = replies[0]
    lengths, kinds = entries[0::2], entries[1::2]
    assert len(lengths) == nbd.MAX_EXTENTS_PER_REPLY
    assert set(lengths) == {SECTOR}
    assert kinds[:4] == [0, 3, 0, 3]


# ---------------------------------------------------------------------------
# a client that hangs up in the middle of a reply


def test_client_hanging_up_mid_reply_does_not_kill_the_server(
        flat_disk, start_server):
    path, contents = flat_disk
    server = start_server("-r", path)
    for _ in range(5):
        client = RawClient.unix(server.sock)
        kernel_style_go(client)
        # Far more than a socket buffer holds: the server is still writing
        # when the connection goes away (EPIPE or ECONNRESET, and SIGPIPE
        # unless it is ignored).
        for cookie in range(4):
            client.request(nbd.CMD_READ, cookie, 0, len(contents))
        client.recv(4096)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                               struct.pack("ii", 1, 0))
        client.close()
    assert server.proc.poll() is None, server.log()
    out = run([need("nbdinfo"), "--size", server.uri]).stdout
    assert out.strip() == str(len(contents))
    assert "Traceback" not in server.log()
