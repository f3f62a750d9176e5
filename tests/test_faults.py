"""Faults in the disk reach the client as the right NBD error, and only
the request that met them: the server goes on serving that connection
and others, and nothing it acknowledged is lost.

Three sources: the fake VDDK's injected errors (FAKE_VDDK_FAIL_*), a
native disk on a file system that fills up (a small tmpfs, where the
tests may mount one), and an engine that raises EIO (in-process)."""

import errno
import os
import subprocess

import pytest

from conftest import need, run
from fake_vddk.fixtures import fake_vddk  # noqa: F401 (fixture)
from inprocess import serving
from nbdclient import NbdClient
from vddktool import engine as eng
from vddktool.layers import FilterEngine
from vddktool import protocol as nbd
from vddktool.vmdk.backend import NativeBackend

KiB = 1024
MiB = 1024 * KiB


def connect(sock, structured=True):
    client = NbdClient.unix(sock)
    client.greet()
    client.go(structured=structured)
    return client


def write_and_flush(client, pieces):
    """{offset: data} written, each acknowledged, then a FLUSH."""
    for offset, data in sorted(pieces.items()):
        assert client.pwrite(data, offset).error == 0
    assert client.call(nbd.CMD_FLUSH, 0, 0).error == 0


def reads_back(client, pieces):
    return all(client.pread(len(data), offset).data == data
               for offset, data in pieces.items())


# ---------------------------------------------------------------------------
# the fake VDDK's injected errors


@pytest.mark.parametrize("structured", [True, False],
                         ids=["structured", "simple"])
def test_vddk_read_error_is_eio_for_that_request_only(fake_vddk,
                                                      start_server,
                                                      structured):
    bad = 512 * KiB
    fake_vddk.fail_read_at(bad + 100)
    server = start_server("backend=vddk", "libdir=" + fake_vddk.libdir,
                          fake_vddk.local_disk(size=MiB), env=fake_vddk.env)
    writer = connect(server.sock)
    reader = connect(server.sock, structured)
    try:
        kept = {0: os.urandom(64 * KiB), 768 * KiB: os.urandom(4 * KiB)}
        write_and_flush(writer, kept)
        assert reader.pread(4096, bad).error == nbd.NBD_EIO
        # The same connection goes on, and so does the other one.
        assert reads_back(reader, kept)
        assert reads_back(writer, kept)
    finally:
        writer.close()
        reader.close()
    third = connect(server.sock)
    assert third.pread(4096, 0).data == kept[0][:4096]
    third.close()


def test_vddk_write_error_is_eio_and_earlier_writes_stay(fake_vddk,
                                                         start_server):
    bad = 256 * KiB
    fake_vddk.fail_write_at(bad)
    disk = fake_vddk.local_disk(size=MiB)
    server = start_server("backend=vddk", "libdir=" + fake_vddk.libdir,
                          disk, env=fake_vddk.env)
    client = connect(server.sock)
    kept = {0: os.urandom(64 * KiB), 512 * KiB: os.urandom(64 * KiB)}
    try:
        write_and_flush(client, kept)
        assert client.pwrite(os.urandom(4096), bad).error == nbd.NBD_EIO
        assert client.call(nbd.CMD_FLUSH, 0, 0).error == 0
        assert reads_back(client, kept)
        client.disconnect()
    finally:
        client.close()
    server.stop()
    with open(disk, "rb") as f:
        content = f.read()
    assert all(content[offset:offset + len(data)] == data
               for offset, data in kept.items())


# ---------------------------------------------------------------------------
# a native disk on a full file system


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs, or None where this test may not mount one."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                           str(mount_point)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    if proc.returncode != 0:
        yield None
        return
    try:
        yield str(mount_point)
    finally:
        subprocess.call(["umount", "-l", str(mount_point)])


def test_a_full_file_system_is_enospc_and_nothing_acknowledged_is_lost(
        small_fs, start_server, tmp_path):
    if small_fs is None:
        # No mount here (not root): the same path through an engine
        # that raises ENOSPC.
        check_engine_errors(tmp_path, errno.ENOSPC, nbd.NBD_ENOSPC)
        return
    need("qemu-img")
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        f.write(bytes(512 * KiB))
    disk = os.path.join(small_fs, "disk.vmdk")
    server = start_server(disk, "create=true", "create-size=64M")
    client = connect(server.sock)
    acknowledged = {}
    try:
        error = 0
        for number in range(64):
            data = os.urandom(64 * KiB)
            error = client.pwrite(data, number * 64 * KiB).error
            if error:
                break
            acknowledged[number * 64 * KiB] = data
        assert error == nbd.NBD_ENOSPC
        assert acknowledged, "the disk was full before the first write"
        assert reads_back(client, acknowledged)
        # Another connection is served meanwhile.
        other = connect(server.sock)
        assert reads_back(other, acknowledged)
        other.close()
        # Room again: the same connection writes again.
        os.unlink(filler)
        data = os.urandom(64 * KiB)
        assert client.pwrite(data, 63 * 64 * KiB).error == 0
        acknowledged[63 * 64 * KiB] = data
        assert client.call(nbd.CMD_FLUSH, 0, 0).error == 0
        client.disconnect()
    finally:
        client.close()
    assert server.stop() == 0
    assert "No errors were found" in run(["qemu-img", "check",
                                          disk]).stdout
    raw = str(tmp_path / "disk.raw")
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", disk, raw])
    with open(raw, "rb") as f:
        content = f.read()
    assert all(content[offset:offset + len(data)] == data
               for offset, data in acknowledged.items())


# ---------------------------------------------------------------------------
# an engine that raises


class Failing(FilterEngine):
    """Fails reads, writes and flushes while ``failing`` holds an errno."""

    failing = None

    def _check(self):
        if Failing.failing:
            raise OSError(Failing.failing, os.strerror(Failing.failing))

    def pread(self, count, offset, flags=0):
        self._check()
        return self.next.pread(count, offset, flags)

    def pwrite(self, buf, offset, flags=0):
        self._check()
        return self.next.pwrite(buf, offset, flags)

    def flush(self, flags=0):
        self._check()
        return self.next.flush(flags)


class FailingBackend(NativeBackend):
    def open(self, export_name, readonly, is_tls=False):
        return Failing(super().open(export_name, readonly, is_tls))


def check_engine_errors(tmp_path, error, nbd_error):
    need("qemu-img")
    disk = str(tmp_path / "disk.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", disk, "4M"])
    backend = FailingBackend({"file": disk})
    backend.get_ready()
    try:
        with serving(backend, tmp_path) as uri:
            sock = uri.split("socket=")[1]
            client = connect(sock)
            kept = {0: os.urandom(64 * KiB), MiB: os.urandom(512)}
            write_and_flush(client, kept)
            Failing.failing = error
            try:
                assert client.pread(4096, 0).error == nbd_error
                assert client.pwrite(b"x" * 512, 2 * MiB).error == nbd_error
                assert client.call(nbd.CMD_FLUSH, 0, 0).error == nbd_error
                # Block status does not touch the failing calls.
                reply = client.call(nbd.CMD_BLOCK_STATUS, 0, 4096)
                assert reply.error == 0 and reply.extents
            finally:
                Failing.failing = None
            assert reads_back(client, kept)
            client.disconnect()
            client.close()
    finally:
        backend.cleanup()


def test_an_engine_eio_reaches_the_client_as_eio(tmp_path):
    check_engine_errors(tmp_path, errno.EIO, nbd.NBD_EIO)


def test_an_engine_enospc_reaches_the_client_as_enospc(tmp_path):
    check_engine_errors(tmp_path, errno.ENOSPC, nbd.NBD_ENOSPC)
