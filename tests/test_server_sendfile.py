"""Zero-copy reads: flat extents hand the server FileRange pieces, sent
with sendfile(2) on sockets and read into memory on pipes."""

import errno
import os
import struct
import subprocess

import pytest

from conftest import CLIENT_ENV, need, run, vddktool_cmd
from inprocess import serving
from test_server_raw import RawClient
from vddktool import log, protocol as nbd
from vddktool.engine import (Backend, Engine, EngineError, FileRange,
                             in_memory)
from vmdk_fixtures import write_descriptor

KiB = 1024
PIECE = 64 * KiB


@pytest.fixture
def mixed_disk(tmp_path):
    """A descriptor of FLAT, ZERO and FLAT (at an offset) extents: one
    read of it gets file ranges around a hole.  Returns (path, bytes)."""
    first, second = os.urandom(PIECE), os.urandom(PIECE)
    (tmp_path / "a.bin").write_bytes(first)
    (tmp_path / "b.bin").write_bytes(os.urandom(4 * KiB) + second)
    path = str(tmp_path / "mixed.vmdk")
    sectors = PIECE // 512
    write_descriptor(path, "custom", [
        'RW %d FLAT "a.bin" 0' % sectors,
        "RW %d ZERO" % sectors,
        'RW %d FLAT "b.bin" 8' % sectors])
    return path, first + bytes(PIECE) + second


def nbdsh(script):
    need("nbdsh")
    return run(["nbdsh", "-c", script], env=CLIENT_ENV)


def test_file_range_reads_its_bytes(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"0123456789")
    fd = os.open(str(path), os.O_RDONLY)
    try:
        piece = FileRange(fd, 2, 5)
        assert len(piece) == 5
        assert piece.read() == b"23456"
        assert in_memory(piece) == b"23456"
        assert bytes(piece) == b"23456"
        assert in_memory(b"as is") == b"as is"
    finally:
        os.close(fd)


def test_file_range_past_the_end_of_its_file_is_eio(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"0123456789")
    fd = os.open(str(path), os.O_RDONLY)
    try:
        with pytest.raises(EngineError) as caught:
            FileRange(fd, 8, 5).read()
        assert caught.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_native_engine_gives_file_ranges_to_the_server_only(mixed_disk):
    from vddktool.vmdk.backend import NativeBackend
    path, data = mixed_disk
    backend = NativeBackend({"file": path}, readonly=True)
    backend.get_ready()
    try:
        engine = backend.open("", True)
        pieces = engine.pread_sparse(len(data), 0)
        assert [(pos, type(piece).__name__) for pos, piece in pieces] == [
            (0, "FileRange"), (PIECE, "NoneType"), (2 * PIECE, "FileRange")]
        assert bytes(engine.pread(len(data), 0)) == data
    finally:
        backend.cleanup()


def test_nbdcopy_over_a_socket_gets_the_flat_bytes(mixed_disk, tmp_path,
                                                   start_server):
    need("nbdcopy")
    path, data = mixed_disk
    server = start_server("-r", "file=" + path)
    out = tmp_path / "copy.raw"
    run(["nbdcopy", server.uri, str(out)], env=CLIENT_ENV)
    assert out.read_bytes() == data


def test_simple_replies_over_a_socket_get_the_flat_bytes(mixed_disk,
                                                         start_server):
    path, data = mixed_disk
    server = start_server("-r", "file=" + path)
    proc = nbdsh("h.set_request_structured_replies(False)\n"
                 "h.connect_uri(%r)\n"
                 "import sys\n"
                 "sys.stdout.write(h.pread(%d, 1000).hex())"
                 % (server.uri, 2 * PIECE))
    assert bytes.fromhex(proc.stdout.strip()) == data[1000:1000 + 2 * PIECE]


def read_structured(client, cookie, offset, length):
    """Assemble one structured READ reply: OFFSET_DATA and OFFSET_HOLE."""
    out = bytearray(length)
    while True:
        magic, flags, kind, got_cookie, size = nbd.CHUNK_HEADER.unpack(
            client.recv(nbd.CHUNK_HEADER.size))
        assert (magic, got_cookie) == (nbd.STRUCTURED_REPLY_MAGIC, cookie)
        payload = client.recv(size)
        assert kind in (nbd.CHUNK_OFFSET_DATA, nbd.CHUNK_OFFSET_HOLE), kind
        start = struct.unpack_from(">Q", payload)[0] - offset
        if kind == nbd.CHUNK_OFFSET_DATA:
            out[start:start + size - 8] = payload[8:]
        else:
            hole = struct.unpack_from(">I", payload, 8)[0]
            out[start:start + hole] = bytes(hole)
        if flags & nbd.CHUNK_FLAG_DONE:
            return bytes(out)


def test_pipes_read_file_ranges_into_memory(mixed_disk):
    """-s over pipes: no sendfile, the same bytes."""
    path, data = mixed_disk
    proc = subprocess.Popen(vddktool_cmd("-s", "-r", "file=" + path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        client = RawClient(read_fd=proc.stdout.fileno(),
                           write_fd=proc.stdin.fileno())
        assert client.go(structured=True) == len(data)
        client.request(nbd.CMD_READ, 7, 0, len(data))
        assert read_structured(client, 7, 0, len(data)) == data
        client.request(nbd.CMD_DISC, 8, 0, 0)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def test_flat_file_truncated_while_served_fails_cleanly(tmp_path,
                                                        start_server):
    """The range is checked before the reply starts: EIO for the lost
    part, and the connection goes on serving the rest."""
    data = os.urandom(4 * PIECE)
    (tmp_path / "d-flat.bin").write_bytes(data)
    path = str(tmp_path / "d.vmdk")
    write_descriptor(path, "monolithicFlat",
                     ['RW %d FLAT "d-flat.bin" 0' % (len(data) // 512)])
    server = start_server("-r", "file=" + path)
    proc = nbdsh(
        "h.connect_uri(%r)\n"
        "import os\n"
        "os.truncate(%r, %d)\n"
        "try:\n"
        "    h.pread(%d, %d)\n"
        "    print('read')\n"
        "except nbd.Error as e:\n"
        "    print('errno', e.errno)\n"
        "print(h.pread(%d, 0).hex())"
        % (server.uri, str(tmp_path / "d-flat.bin"), 2 * PIECE,
           PIECE, 3 * PIECE, PIECE))
    lines = proc.stdout.split()
    assert lines[:2] == ["errno", errno.errorcode[errno.EIO]]
    assert bytes.fromhex(lines[2]) == data[:PIECE]
    assert "truncated" in server.log()


class _UnreadableEngine(Engine):
    """Hands out ranges of a descriptor opened write-only: sendfile fails
    after the reply header has gone."""

    def __init__(self, fd):
        self.fd = fd

    def get_size(self):
        return 1024 * KiB

    def pread(self, count, offset, flags=0):
        return bytes(count)

    def pread_sparse(self, count, offset, flags=0):
        return [(offset, FileRange(self.fd, offset, count))]


class _UnreadableBackend(Backend):
    def __init__(self, fd):
        super().__init__({}, readonly=True)
        self.fd = fd

    def open(self, export_name, readonly, is_tls=False):
        return _UnreadableEngine(self.fd)


@pytest.fixture
def unreadable_server(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(bytes(1024 * KiB))
    fd = os.open(str(path), os.O_WRONLY)
    try:
        with serving(_UnreadableBackend(fd), tmp_path,
                     readonly=True) as uri:
            yield uri
    finally:
        os.close(fd)


def test_sendfile_failure_mid_reply_drops_the_connection(unreadable_server,
                                                         capfd):
    log.configure()
    proc = nbdsh(
        "h.connect_uri(%r)\n"
        "try:\n"
        "    h.pread(%d, 0)\n"
        "    print('read')\n"
        "except nbd.Error as e:\n"
        "    print('failed')\n"
        "print('dead' if h.aio_is_dead() else 'alive')\n"
        "h2 = nbd.NBD()\n"
        "h2.connect_uri(%r)\n"
        "print(h2.get_size())"
        % (unreadable_server, PIECE, unreadable_server))
    assert proc.stdout.split() == ["failed", "dead", str(1024 * KiB)]
    assert "dropping the connection" in capfd.readouterr().err


def test_sparse_grains_are_file_ranges_too(tmp_path):
    """Allocated grains of a hosted sparse extent go out with sendfile,
    contiguous ones as one range."""
    from vddktool.vmdk.backend import NativeBackend
    data = bytearray(4 * PIECE)
    data[PIECE:3 * PIECE] = os.urandom(2 * PIECE)
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(data))
    path = str(tmp_path / "d.vmdk")
    run(["qemu-img", "convert", "-O", "vmdk", "-o",
         "subformat=monolithicSparse", str(raw), path], env=CLIENT_ENV)
    backend = NativeBackend({"file": path}, readonly=True)
    backend.get_ready()
    try:
        engine = backend.open("", True)
        pieces = engine.pread_sparse(len(data), 0)
        assert [type(piece).__name__ for _, piece in pieces] == [
            "NoneType", "FileRange", "NoneType"]
        assert pieces[1][0] == PIECE
        assert bytes(pieces[1][1]) == data[PIECE:3 * PIECE]
    finally:
        backend.cleanup()
