"""Write payload buffers: reused only for engines that let go of them."""

import os

from conftest import CLIENT_ENV, need, run
from inprocess import serving
from vddktool.engine import Backend, Engine

SIZE = 1024 * 1024
WRITE = 65536


class _KeepingEngine(Engine):
    """Keeps every buffer pwrite gets, as a queue of async writes would."""

    def __init__(self, kept):
        self.kept = kept

    def get_size(self):
        return SIZE

    def can_write(self):
        return True

    def pread(self, count, offset, flags=0):
        return bytes(count)

    def pwrite(self, buf, offset, flags=0):
        self.kept.append((offset, buf))


class _KeepingBackend(Backend):
    def __init__(self, keeps):
        super().__init__({})
        self.keeps = keeps
        self.kept = []

    def open(self, export_name, readonly, is_tls=False):
        engine = _KeepingEngine(self.kept)
        engine.keeps_write_buffers = self.keeps
        return engine


def write_blocks(uri, count):
    """Write ``count`` blocks of distinct bytes; returns them."""
    need("nbdsh")
    blocks = [bytes([index + 1]) * WRITE for index in range(count)]
    run(["nbdsh", "-u", uri, "-c",
         "for i in range(%d):\n"
         "    h.pwrite(bytes([i + 1]) * %d, i * %d)" % (count, WRITE, WRITE)],
        env=CLIENT_ENV)
    return blocks


def test_an_engine_that_keeps_buffers_gets_a_new_one_each_write(tmp_path):
    backend = _KeepingBackend(keeps=True)
    with serving(backend, tmp_path) as uri:
        blocks = write_blocks(uri, 6)
    assert [bytes(buf) for _, buf in sorted(backend.kept,
                                            key=lambda k: k[0])] == blocks
    assert len(set(id(buf) for _, buf in backend.kept)) == 6


def test_an_engine_that_lets_go_gets_its_buffers_back(tmp_path):
    backend = _KeepingBackend(keeps=False)
    with serving(backend, tmp_path) as uri:
        write_blocks(uri, 6)
    # The buffers are recycled: far fewer distinct ones than writes.
    assert len(set(id(buf) for _, buf in backend.kept)) < 6


def test_reused_buffers_write_the_right_bytes(tmp_path, start_server):
    """The native engine lets go of its buffers: many same-sized writes
    of different bytes through reused buffers all land as written."""
    from vmdk_fixtures import write_descriptor
    (tmp_path / "d-flat.bin").write_bytes(bytes(SIZE))
    path = str(tmp_path / "d.vmdk")
    write_descriptor(path, "monolithicFlat",
                     ['RW %d FLAT "d-flat.bin" 0' % (SIZE // 512)])
    server = start_server("file=" + path)
    blocks = write_blocks(server.uri, 12)
    server.stop()
    with open(str(tmp_path / "d-flat.bin"), "rb") as f:
        assert f.read(12 * WRITE) == b"".join(blocks)
    assert os.path.getsize(str(tmp_path / "d-flat.bin")) == SIZE


def test_unix_sockets_get_a_larger_send_buffer():
    import socket
    from vddktool.server import channels
    left, right = socket.socketpair()
    try:
        before = left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        channels.enlarge_send_buffer(left)
        after = left.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        with open("/proc/sys/net/core/wmem_max") as f:
            cap = int(f.read())
        # Linux doubles what it is asked for, within wmem_max.
        assert after == 2 * min(channels.UNIX_SEND_BUFFER, cap)
        assert after >= before
    finally:
        left.close()
        right.close()
