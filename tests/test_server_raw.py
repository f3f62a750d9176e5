"""What libnbd will not send: a hand-made client on a raw socket, plus
the server's life cycle (stdio pipes, TCP, shutdown with work in flight)."""

import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import rawserver
from conftest import need, run
from nbdclient import NbdClient, Plain
from rawserver import raw_server  # noqa: F401 (fixture)
from vddktool import protocol as nbd


class RawClient(NbdClient):
    """tools/nbdclient.py's client under the names these tests use:
    ``go`` greets too and sets no meta context; ``request`` and
    ``simple_reply`` deal in raw cookies."""

    def __init__(self, sock=None, read_fd=None, write_fd=None):
        super().__init__(Plain(sock, read_fd, write_fd))
        self.sock = sock

    @classmethod
    def unix(cls, path, timeout=20):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock)

    def go(self, name=b"", structured=False):
        self.greet()
        return super().go(name, structured, block_status=False)

    def request(self, command, cookie, offset, length, flags=0, data=b""):
        self.send(nbd.encode_request(command, cookie, offset, length, flags)
                  + data)

    def simple_reply(self):
        magic, error, cookie = nbd.SIMPLE_REPLY.unpack(self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return error, cookie


@pytest.fixture
def ram_disk(raw_server):
    """A server on 1 MiB of RAM, and a connected, greeted-to-GO client."""
    def connect(*args):
        server = raw_server("--ram", str(1 << 20), *args)
        client = RawClient.unix(server.sock)
        return server, client
    return connect


# ---------------------------------------------------------------------------
# handshake


def test_unknown_client_flags_disconnect(ram_disk):
    _, client = ram_disk()
    client.greet(flags=nbd.CLIENT_FLAG_FIXED_NEWSTYLE | 0x80)
    assert client.at_eof()


def test_bad_option_magic_disconnects(ram_disk):
    _, client = ram_disk()
    client.greet()
    client.send(struct.pack(">QII", 0x0123456789, nbd.OPT_GO, 0))
    assert client.at_eof()


def test_unknown_option_is_skipped_and_negotiation_goes_on(ram_disk):
    _, client = ram_disk()
    client.greet()
    client.option(0x1234, b"z" * 1000)
    assert client.reply()[:2] == (0x1234, nbd.REP_ERR_UNSUP)
    client.option(nbd.OPT_GO, b"\0\0\0\0\0\0")
    replies = []
    while not replies or replies[-1] == nbd.REP_INFO:
        replies.append(client.reply()[1])
    assert replies[-1] == nbd.REP_ACK


def test_oversized_option_payload_is_refused_unread(ram_disk):
    _, client = ram_disk()
    client.greet()
    client.send(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, 0x99, 1 << 30))
    assert client.reply()[1] == nbd.REP_ERR_TOO_BIG
    assert client.at_eof()


def test_set_meta_context_needs_structured_replies(ram_disk):
    _, client = ram_disk()
    client.greet()
    query = b"base:allocation"
    client.option(nbd.OPT_SET_META_CONTEXT, b"\0\0\0\0\0\0\0\1"
                  + struct.pack(">I", len(query)) + query)
    assert client.reply()[1] == nbd.REP_ERR_INVALID


def test_starttls_is_refused_by_policy(ram_disk):
    _, client = ram_disk()
    client.greet()
    client.option(nbd.OPT_STARTTLS)
    assert client.reply()[1] == nbd.REP_ERR_POLICY


def test_export_name_pads_for_clients_without_no_zeroes(ram_disk):
    _, client = ram_disk()
    client.greet(flags=nbd.CLIENT_FLAG_FIXED_NEWSTYLE)
    client.option(nbd.OPT_EXPORT_NAME, b"")
    reply = client.recv(134)
    size, flags = nbd.EXPORT_NAME_REPLY.unpack_from(reply)
    assert size == 1 << 20 and flags & nbd.TFLAG_HAS_FLAGS
    assert reply[10:] == bytes(124)
    client.request(nbd.CMD_READ, 5, 0, 512)
    assert client.simple_reply() == (0, 5)
    assert client.recv(512) == bytes(512)


def test_unknown_export_name_disconnects(ram_disk):
    _, client = ram_disk()
    client.greet()
    client.option(nbd.OPT_EXPORT_NAME, b"nope")
    assert client.at_eof()


# ---------------------------------------------------------------------------
# transmission


def test_bad_request_magic_disconnects(ram_disk):
    _, client = ram_disk()
    client.go()
    client.send(b"\xff" * 28)
    assert client.at_eof()


def test_unknown_command_is_einval_and_connection_lives(ram_disk):
    _, client = ram_disk()
    client.go()
    client.request(42, 1, 0, 512)
    assert client.simple_reply() == (nbd.NBD_EINVAL, 1)
    client.request(nbd.CMD_READ, 2, 0, 8)
    assert client.simple_reply() == (0, 2)


def test_oversized_read_is_einval_and_connection_lives(raw_server):
    server = raw_server("--ram", str(1 << 20), "--block-size",
                        "1,4096,%d" % (1 << 30))
    client = RawClient.unix(server.sock)
    client.go()
    client.request(nbd.CMD_READ, 1, 0, (64 << 20) + 1)
    assert client.simple_reply() == (nbd.NBD_EINVAL, 1)
    client.request(nbd.CMD_READ, 2, 0, 8)
    assert client.simple_reply() == (0, 2)


def test_oversized_write_is_refused_then_disconnected(ram_disk):
    _, client = ram_disk()
    client.go()
    client.request(nbd.CMD_WRITE, 7, 0, (64 << 20) + 1)
    assert client.simple_reply() == (nbd.NBD_EINVAL, 7)
    assert client.at_eof()


def test_refused_write_payload_is_consumed(ram_disk):
    _, client = ram_disk()
    client.go()
    client.request(nbd.CMD_WRITE, 1, (1 << 20) - 4, 8, data=b"12345678")
    assert client.simple_reply() == (nbd.NBD_ENOSPC, 1)
    client.request(nbd.CMD_READ, 2, 0, 8)
    assert client.simple_reply() == (0, 2)


def test_disc_finishes_in_flight_requests_first(ram_disk):
    _, client = ram_disk("--delay-read", "0:0.5")
    client.go()
    client.request(nbd.CMD_READ, 11, 0, 4096)
    client.request(nbd.CMD_DISC, 12, 0, 0)
    assert client.simple_reply() == (0, 11)
    assert client.recv(4096) == bytes(4096)
    assert client.at_eof()


def test_structured_read_of_ram_is_one_done_data_chunk(ram_disk):
    _, client = ram_disk()
    client.go(structured=True)
    client.request(nbd.CMD_READ, 3, 512, 1024)
    fields = struct.unpack(">IHHQIQ", client.recv(28))
    assert fields == (nbd.STRUCTURED_REPLY_MAGIC, nbd.CHUNK_FLAG_DONE,
                      nbd.CHUNK_OFFSET_DATA, 3, 1032, 512)
    assert client.recv(1024) == bytes(1024)


def test_block_status_without_a_context_is_einval(ram_disk):
    _, client = ram_disk()
    client.go(structured=True)
    client.request(nbd.CMD_BLOCK_STATUS, 4, 0, 512)
    header = struct.unpack(">IHHQI", client.recv(20))
    assert header[2] == nbd.CHUNK_ERROR and header[3] == 4
    error = struct.unpack(">IH", client.recv(header[4])[:6])[0]
    assert error == nbd.NBD_EINVAL


# ---------------------------------------------------------------------------
# life cycle


def test_stdio_over_pipes(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, rawserver.THIS, "--stdio", "--ram", "65536"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        client = RawClient(read_fd=proc.stdout.fileno(),
                           write_fd=proc.stdin.fileno())
        assert client.go() == 65536
        client.request(nbd.CMD_WRITE, 1, 100, 3, data=b"abc")
        assert client.simple_reply() == (0, 1)
        client.request(nbd.CMD_READ, 2, 99, 5)
        assert client.simple_reply() == (0, 2)
        assert client.recv(5) == b"\0abc\0"
        client.request(nbd.CMD_DISC, 3, 0, 0)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()


def test_stdio_over_pipes_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, rawserver.THIS, "--stdio", "--ram", "65536"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        client = RawClient(read_fd=proc.stdout.fileno(),
                           write_fd=proc.stdin.fileno())
        client.go()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert b"after 1 flushes" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()


def test_sigterm_lets_in_flight_requests_finish(raw_server):
    server = raw_server("--ram", str(1 << 20), "--delay-read", "0:0.7")
    client = RawClient.unix(server.sock)
    client.go()
    idle = RawClient.unix(server.sock)
    idle.go()
    client.request(nbd.CMD_READ, 9, 0, 4096)
    time.sleep(0.2)  # the read is now sleeping in the engine
    server.proc.send_signal(signal.SIGTERM)
    assert client.simple_reply() == (0, 9)
    assert client.recv(4096) == bytes(4096)
    assert client.at_eof() and idle.at_eof()
    assert server.proc.wait(20) == 0
    log = server.log()
    assert log.count("closed export") == 2
    assert "threads left: 0 " in log


def test_sigterm_stops_a_client_stuck_in_the_handshake(raw_server):
    server = raw_server("--ram", "4096")
    client = RawClient.unix(server.sock)
    client.greet()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    assert client.at_eof()


def test_unix_and_tcp_listeners_at_once(raw_server, tmp_path):
    port_file = tmp_path / "port"
    server = raw_server("--ram", "8192", "--tcp-port-file", str(port_file))
    deadline = time.time() + 20
    while not port_file.exists() and time.time() < deadline:
        time.sleep(0.02)
    port = int(port_file.read_text())
    nbdinfo = need("nbdinfo")
    for uri in ("nbd://127.0.0.1:%d/" % port, server.uri):
        assert "export-size: 8192" in run([nbdinfo, uri]).stdout


def test_shutdown_cuts_off_a_client_that_never_reads(raw_server):
    server = raw_server("--ram", str(1 << 20), "--shutdown-grace", "1")
    client = RawClient.unix(server.sock)
    client.go()
    for cookie in range(64):  # 64 MiB of replies nobody reads
        client.request(nbd.CMD_READ, cookie, 0, 1 << 20)
    time.sleep(0.3)
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    assert time.time() - started < 10
    assert "cutting off clients" in server.log()
    client.close()
