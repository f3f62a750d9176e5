"""Crash safety of the native engine on a sparse VMDK: killed with
SIGKILL in the middle of writes, the image is consistent (qemu-img
check) and every write the server acknowledged with FUA, or before a
FLUSH it acknowledged, is in it; stopped with SIGTERM in the middle of
writes, it flushes, closes cleanly and keeps every acknowledged write.

(A killed process leaves its writes in the page cache: this checks what
the engine had written and in what order, not what a power cut would
leave on the platter.)"""

import os
import signal
import threading

import pytest

from conftest import need, run
from nbdclient import NbdClient
from vddktool import protocol as nbd

CHUNK = 64 * 1024
DISK_SIZE = 128 * 1024 * 1024
# Stop the server once this many writes are known to be durable.
DURABLE_BEFORE_STOP = 100


class Writer(threading.Thread):
    """Writes fresh chunks in batches of eight (two with FUA), with a
    FLUSH after every third batch, until the connection fails.  Each
    chunk is written once, so what a chunk must hold is never in doubt."""

    def __init__(self, sock):
        super().__init__()
        self.client = NbdClient.unix(sock)
        self.client.greet()
        self.client.go()
        self.acknowledged = {}      # offset -> data
        self.durable = {}           # acknowledged with FUA or flushed
        self.enough = threading.Event()
        self.failure = None
        self.ran_out = False

    def run(self):
        try:
            self._write()
        except Exception as exc:    # the server went away: expected
            self.failure = exc
        finally:
            self.enough.set()

    def _write(self):
        client = self.client
        offsets = iter(range(0, DISK_SIZE, CHUNK))
        batches = 0
        while True:
            sent = {}
            for number in range(8):
                offset = next(offsets, None)
                if offset is None:
                    self.ran_out = True
                    return
                data = os.urandom(CHUNK)
                flags = nbd.CMD_FLAG_FUA if number < 2 else 0
                sent[client.submit(nbd.CMD_WRITE, offset, CHUNK, flags,
                                   data)] = (offset, data, flags)
            for _ in range(len(sent)):
                reply = client.receive()
                offset, data, flags = sent[reply.cookie]
                if reply.error:
                    raise AssertionError("write failed: %d" % reply.error)
                self.acknowledged[offset] = data
                if flags:
                    self.durable[offset] = data
            batches += 1
            if batches % 3 == 0:
                flushed = dict(self.acknowledged)
                if client.call(nbd.CMD_FLUSH, 0, 0).error:
                    raise AssertionError("flush failed")
                self.durable.update(flushed)
            if len(self.durable) >= DURABLE_BEFORE_STOP:
                self.enough.set()


def stop_during_writes(server, sig):
    writer = Writer(server.sock)
    writer.start()
    assert writer.enough.wait(120)
    os.kill(server.proc.pid, sig)
    writer.join(60)
    writer.client.close()
    assert not writer.is_alive()
    # The server was stopped with writes still coming, not after them.
    assert not writer.ran_out and writer.failure is not None
    return writer


def image_content(disk, tmp_path):
    assert "No errors were found" in run(["qemu-img", "check", disk]).stdout
    raw = str(tmp_path / "content.raw")
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", disk, raw])
    with open(raw, "rb") as f:
        return f.read()


def missing(content, writes):
    return [offset for offset, data in writes.items()
            if content[offset:offset + len(data)] != data]


@pytest.fixture
def sparse_disk(tmp_path, start_server):
    need("qemu-img")
    disk = str(tmp_path / "disk.vmdk")
    server = start_server(disk, "create=true", "create-size=%d" % DISK_SIZE)
    return disk, server


def test_sigkill_during_writes_keeps_what_was_made_durable(sparse_disk,
                                                           tmp_path):
    disk, server = sparse_disk
    writer = stop_during_writes(server, signal.SIGKILL)
    server.proc.wait(30)
    assert server.proc.returncode == -signal.SIGKILL
    content = image_content(disk, tmp_path)
    assert len(writer.durable) >= DURABLE_BEFORE_STOP
    assert missing(content, writer.durable) == []


def test_sigterm_during_writes_flushes_and_closes_cleanly(sparse_disk,
                                                          tmp_path):
    disk, server = sparse_disk
    writer = stop_during_writes(server, signal.SIGTERM)
    assert server.proc.wait(30) == 0
    content = image_content(disk, tmp_path)
    # A clean stop flushes for the clients: every acknowledged write is
    # there, FUA or not.
    assert missing(content, writer.acknowledged) == []
    assert "Traceback" not in server.log()

