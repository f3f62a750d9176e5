"""Write payloads moved from the socket straight into a flat extent with
splice(2): the bytes, the read-ahead part, a client gone mid-payload, a
file that fails (the stream stays framed), and who may offer a target."""

import errno
import os
import socket
import threading

import pytest

from conftest import CLIENT_ENV, need, run
from inprocess import serving
from vddktool.engine import Engine
from vddktool.layers import EngineAdapter, FilterEngine, SerializedEngine
from vddktool.server import splice as splice_module
from vddktool.server.channels import SocketChannel
from vddktool.server.splice import FileWriteFailed
from vmdk_fixtures import write_descriptor

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield SocketChannel(ours), theirs
    ours.close()
    theirs.close()


def send_soon(sock, data):
    thread = threading.Thread(target=sock.sendall, args=(data,))
    thread.start()
    return thread


def test_a_payload_lands_in_the_file_read_ahead_part_included(pair,
                                                               tmp_path):
    channel, client = pair
    payload = os.urandom(300 * KiB)
    path = tmp_path / "extent"
    path.write_bytes(bytes(MiB))
    fd = os.open(str(path), os.O_RDWR)
    try:
        sender = send_soon(client, b"H" * 28 + payload + b"NEXT")
        header = memoryview(bytearray(28))
        # The header read pulls part of the payload into the read-ahead.
        assert channel.read_into(header)
        assert channel.receive_into_file(fd, 4096, len(payload)) is True
        tail = memoryview(bytearray(4))
        assert channel.read_into(tail) and bytes(tail) == b"NEXT"
        sender.join()
    finally:
        os.close(fd)
    assert path.read_bytes()[4096:4096 + len(payload)] == payload


def test_after_a_spliced_payload_the_next_header_is_read_alone(pair,
                                                              tmp_path):
    """Reading ahead after a spliced payload would pull the start of the
    next payload into Python; the header alone is read instead, so that
    payload is spliced whole.  Other reads still read ahead."""
    channel, client = pair
    first, second = os.urandom(300 * KiB), os.urandom(64 * KiB)
    path = tmp_path / "extent"
    path.write_bytes(bytes(MiB))
    fd = os.open(str(path), os.O_RDWR)
    header = memoryview(bytearray(28))
    try:
        sender = send_soon(client, b"1" * 28 + first + b"2" * 28 + second +
                           b"3" * 28 + b"4" * 28 + b"5" * 28)
        assert channel.read_into(header)
        assert channel.receive_into_file(fd, 0, len(first)) is True
        sender.join()   # everything after it is waiting in the socket
        assert channel.read_into(header) and bytes(header) == b"2" * 28
        assert channel.buffered(1) is None
        assert channel.receive_into_file(fd, 512 * KiB, len(second)) is True
        assert channel.read_into(header) and bytes(header) == b"3" * 28
        # No payload in between: the next read takes what has come.
        assert channel.read_into(header) and bytes(header) == b"4" * 28
        assert bytes(channel.buffered(28)) == b"5" * 28
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:len(first)] == first
    assert data[512 * KiB:512 * KiB + len(second)] == second


def test_after_a_large_payload_read_into_memory_the_header_is_read_alone(
        pair):
    """The same where the payload goes into a buffer (VDDK's writes, TLS
    aside): the next payload then arrives in one receive, not partly in
    the read-ahead, copied out of it."""
    channel, client = pair
    first, second = os.urandom(100 * KiB), os.urandom(64 * KiB)
    client.sendall(b"1" * 28 + first + b"2" * 28 + second + b"3" * 28)
    header = memoryview(bytearray(28))
    assert channel.read_into(header)
    payload = memoryview(bytearray(len(first)))
    assert channel.read_into(payload) and bytes(payload) == first
    assert channel.read_into(header) and bytes(header) == b"2" * 28
    assert channel.buffered(1) is None
    payload = memoryview(bytearray(len(second)))
    assert channel.read_into(payload) and bytes(payload) == second
    assert channel.read_into(header) and bytes(header) == b"3" * 28


def test_a_client_gone_mid_payload_is_the_end_of_the_stream(pair,
                                                            tmp_path):
    channel, client = pair
    fd = os.open(str(tmp_path / "extent"), os.O_RDWR | os.O_CREAT)
    try:
        client.sendall(os.urandom(100 * KiB))
        client.shutdown(socket.SHUT_WR)
        assert channel.receive_into_file(fd, 0, 256 * KiB) is False
    finally:
        os.close(fd)


def test_a_failing_file_still_takes_the_payload(pair, tmp_path):
    channel, client = pair
    path = tmp_path / "extent"
    path.write_bytes(bytes(MiB))
    fd = os.open(str(path), os.O_RDONLY)     # every write to it fails
    try:
        sender = send_soon(client, os.urandom(200 * KiB) + b"NEXT")
        with pytest.raises(FileWriteFailed) as caught:
            channel.receive_into_file(fd, 0, 200 * KiB)
        assert caught.value.errno == errno.EBADF
        tail = memoryview(bytearray(4))
        assert channel.read_into(tail) and bytes(tail) == b"NEXT"
        sender.join()
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(MiB)


class _Plain(Engine):
    def write_target(self, count, offset):
        return (99, offset)


class _SeesWrites(FilterEngine):
    def pwrite(self, buf, offset, flags=0):
        return self.next.pwrite(buf, offset, flags)


def test_only_a_stack_that_leaves_writes_alone_offers_a_target():
    assert EngineAdapter(_Plain()).write_target(4096, 8) == (99, 8)
    assert FilterEngine(EngineAdapter(_Plain())).write_target(1, 2) == (99, 2)
    assert _SeesWrites(EngineAdapter(_Plain())).write_target(1, 2) is None
    assert SerializedEngine(EngineAdapter(_Plain())).write_target(1, 2) \
        is None


def test_nbdcopy_into_a_flat_vmdk_moves_payloads_by_splice(tmp_path,
                                                          spliced_moves):
    from vddktool.vmdk.backend import NativeBackend
    moves = spliced_moves
    (tmp_path / "disk-flat.vmdk").write_bytes(bytes(8 * MiB))
    path = str(tmp_path / "disk.vmdk")
    write_descriptor(path, "monolithicFlat",
                     ['RW %d FLAT "disk-flat.vmdk" 0' % (8 * MiB // 512)])
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(8 * MiB))
    backend = NativeBackend({"file": path})
    backend.get_ready()
    try:
        with serving(backend, tmp_path) as uri:
            run([need("nbdcopy"), "--connections=1", str(source), uri],
                env=CLIENT_ENV)
    finally:
        backend.cleanup()
    assert (tmp_path / "disk-flat.vmdk").read_bytes() == source.read_bytes()
    assert len(moves) >= 8      # nbdcopy writes 256 KiB at a time


def test_small_and_fua_writes_still_take_the_usual_way(tmp_path,
                                                      monkeypatch):
    from vddktool.vmdk.backend import NativeBackend
    moves = []
    monkeypatch.setattr(splice_module.Splicer, "move",
                        lambda self, *args: moves.append(args))
    (tmp_path / "disk-flat.vmdk").write_bytes(bytes(MiB))
    path = str(tmp_path / "disk.vmdk")
    write_descriptor(path, "monolithicFlat",
                     ['RW %d FLAT "disk-flat.vmdk" 0' % (MiB // 512)])
    backend = NativeBackend({"file": path})
    backend.get_ready()
    try:
        with serving(backend, tmp_path) as uri:
            run([need("nbdsh"), "-u", uri, "-c",
                 "h.pwrite(b'\\x01' * 4096, 0)\n"
                 "h.pwrite(b'\\x02' * 262144, 65536, nbd.CMD_FLAG_FUA)"],
                env=CLIENT_ENV)
    finally:
        backend.cleanup()
    data = (tmp_path / "disk-flat.vmdk").read_bytes()
    assert data[:4096] == b"\x01" * 4096
    assert data[65536:65536 + 262144] == b"\x02" * 262144
    assert moves == []
