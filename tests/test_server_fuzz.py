"""Random requests against the real program over a raw socket: every
request gets exactly one well-formed final reply carrying an NBD errno, the
connection ends cleanly, and the server goes on serving with nothing like
a traceback in its log."""

import os
import random
import struct
import sys
import threading

import pytest

from conftest import need, run
from test_server_raw import RawClient
from vddktool import protocol as nbd

MIB = 1024 * 1024
DISK_SIZE = 2 * MIB
NBD_ERRNOS = {0, nbd.NBD_EPERM, nbd.NBD_EIO, nbd.NBD_ENOMEM, nbd.NBD_EINVAL,
              nbd.NBD_ENOSPC, nbd.NBD_EOVERFLOW, nbd.NBD_ENOTSUP,
              nbd.NBD_ESHUTDOWN}
ALL_FLAGS = (nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_DF
             | nbd.CMD_FLAG_REQ_ONE | nbd.CMD_FLAG_FAST_ZERO)


@pytest.fixture
def sparse_disk(tmp_path):
    need("qemu-img")
    path = str(tmp_path / "disk.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", path, str(DISK_SIZE)])
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x61 64k 128k", path])
    return path


def random_requests(chooser, count):
    """(command, flags, cookie, offset, length, payload); DISC never,
    unknown commands sometimes, lengths and offsets mostly near the disk."""
    for cookie in range(1, count + 1):
        command = chooser.choice([0, 0, 1, 3, 4, 5, 6, 7, 7, 9, 0x4242])
        flags = chooser.choice([0, 0, 0, 0, chooser.randint(0, ALL_FLAGS),
                                chooser.randint(0, 0xffff)])
        offset = chooser.choice([0, chooser.randrange(0, DISK_SIZE, 512),
                                 chooser.randrange(0, DISK_SIZE, 512),
                                 chooser.randrange(DISK_SIZE),
                                 DISK_SIZE - 512, DISK_SIZE,
                                 chooser.randint(0, (1 << 64) - 1)])
        length = chooser.choice([0, 1, 512, 512, 4096, 4096,
                                 chooser.randint(1, 65536),
                                 chooser.randint(0, 0xffffffff)])
        if command == nbd.CMD_WRITE:
            length = min(length, 65536)     # its payload is sent in full
        if command == nbd.CMD_READ and length > 4 * MIB:
            length = chooser.randint(0, 4 * MIB)
        payload = os.urandom(length) if command == nbd.CMD_WRITE else b""
        yield command, flags, cookie, offset, length, payload


def read_replies(client, requests, structured):
    """Cookie -> final error, checking each reply's framing."""
    by_cookie = dict((r[2], r) for r in requests)
    final = {}
    while len(final) < len(requests):
        magic_bytes = client.recv(4)
        assert len(magic_bytes) == 4, "connection ended early: %d of %d " \
            "answered" % (len(final), len(requests))
        magic = struct.unpack(">I", magic_bytes)[0]
        if magic == nbd.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", client.recv(12))
            command, _, _, _, length, _ = by_cookie[cookie]
            if command == nbd.CMD_READ and error == 0:
                assert not structured, "simple reply to a structured read"
                assert len(client.recv(length)) == length
            done = True
        else:
            assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
            assert structured
            chunk_flags, kind, cookie, length = struct.unpack(
                ">HHQI", client.recv(16))
            body = client.recv(length)
            assert len(body) == length
            error = 0
            if kind & 0x8000:
                error = struct.unpack_from(">I", body)[0]
                assert error != 0
            else:
                assert kind in (nbd.CHUNK_NONE, nbd.CHUNK_OFFSET_DATA,
                                nbd.CHUNK_OFFSET_HOLE,
                                nbd.CHUNK_BLOCK_STATUS), kind
            done = bool(chunk_flags & nbd.CHUNK_FLAG_DONE)
            if cookie in final:
                raise AssertionError("chunk after the final one")
            if not done:
                final.setdefault(("partial", cookie), error)
                continue
            error = final.pop(("partial", cookie), 0) or error
        assert cookie in by_cookie and cookie not in final, cookie
        assert error in NBD_ERRNOS, error
        final[cookie] = error
    return final


def go(client, structured):
    client.greet()
    if structured:
        client.option(nbd.OPT_STRUCTURED_REPLY)
        assert client.reply()[1] == nbd.REP_ACK
        query = b"base:allocation"
        client.option(nbd.OPT_SET_META_CONTEXT,
                      struct.pack(">II", 0, 1)
                      + struct.pack(">I", len(query)) + query)
        while client.reply()[1] != nbd.REP_ACK:
            pass
    client.option(nbd.OPT_GO, struct.pack(">IH", 0, 0))
    while client.reply()[1] != nbd.REP_ACK:
        pass


@pytest.mark.parametrize("structured", [False, True],
                         ids=["simple", "structured"])
def test_random_requests_get_one_well_formed_reply_each(
        sparse_disk, start_server, structured):
    server = start_server(sparse_disk)
    chooser = random.Random(7 if structured else 8)
    for _ in range(3):
        requests = list(random_requests(chooser, 150))
        client = RawClient.unix(server.sock)
        try:
            go(client, structured)
            stream = b"".join(
                nbd.encode_request(command, cookie, offset, length, flags)
                + payload
                for command, flags, cookie, offset, length, payload
                in requests)
            # Sent from another thread: the server stops reading while its
            # replies wait for us to read them.
            sender = threading.Thread(target=client.send, args=(stream,))
            sender.start()
            errors = read_replies(client, requests, structured)
            sender.join()
            client.request(nbd.CMD_DISC, 0, 0, 0)
            assert client.at_eof()
        finally:
            client.close()
        # Something must have worked and something must have been refused,
        # or the requests tested nothing.
        assert 0 in errors.values() and nbd.NBD_EINVAL in errors.values()
    assert server.proc.poll() is None
    need("qemu-img")
    run(["qemu-img", "info", "-f", "raw", server.qemu_uri])
    log_text = server.log()
    assert "Traceback" not in log_text and "internal error" not in log_text


# ---------------------------------------------------------------------------
# short runs of tools/fuzz.py (the long run: python3 tools/fuzz.py)


def test_protocol_module_fuzz_finds_nothing():
    from fuzz import fuzz_protocol
    findings = fuzz_protocol(3000, seed=11)
    assert findings.sessions > 500
    assert findings.clean, findings.problems


def test_live_server_fuzz_with_tls_finds_nothing(tmp_path):
    need("openssl")
    from fuzz_server import fuzz_server
    findings = fuzz_server(3000, seed=12, work=str(tmp_path),
                           python=sys.executable, workers=3)
    assert findings.sessions > 50
    assert findings.clean, findings.problems
