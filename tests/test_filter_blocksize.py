"""--filter=blocksize: side by side with nbdkit's, and what the engine
below is asked (the fake VDDK's record, a counting engine)."""

import hashlib
import threading
import time

import pytest

from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)
from filter_oracle import (assert_same_info, block_map, contents, file_bytes,
                           flat_vmdk, nbdsh, side_by_side)
from memory_engine import MemoryBackend
from vddktool.filters.blocksize import BlocksizeFilter
from vmdk_fixtures import random_disk

MiB = 1024 * 1024


@pytest.mark.parametrize("params", [
    ["minblock=512"], ["minblock=512", "maxdata=2M"],
    ["minblock=4k", "maxlen=64k"], ["maxdata=1M"]])
def test_same_as_nbdkit(tmp_path, start_server, start_nbdkit, params):
    # A size that is not a multiple of 4K: minblock=4k rounds it down.
    data = random_disk(3 * MiB + 1536, seed=1)
    pair = side_by_side(tmp_path, start_server, start_nbdkit, data,
                        ["--filter=blocksize"], params)
    assert_same_info(pair)
    assert block_map(pair.ours.uri) == block_map(pair.theirs.uri)
    ours = contents(pair.ours.uri, tmp_path, "ours.out")
    assert ours == contents(pair.theirs.uri, tmp_path, "theirs.out")
    assert ours == data[:len(ours)]


UNALIGNED_CHANGES = """
h.pwrite(b'\\x11' * 1000, 100)
h.pwrite(b'\\x22' * 70000, 4095)
h.zero(3000, 9000)
h.zero(2 * 1024 * 1024 + 123, 70001)
h.trim(5000, 300000)
h.pwrite(b'\\x33' * 7, 511, nbd.CMD_FLAG_FUA)
h.flush()
print(h.pread(100, 1000) == b'\\x11' * 100)
"""


def test_unaligned_writes_zeroes_and_trims_land_as_in_nbdkit(
        tmp_path, start_server, start_nbdkit):
    data = random_disk(4 * MiB, seed=2, hole_every=7, zero_every=11)
    pair = side_by_side(tmp_path, start_server, start_nbdkit, data,
                        ["--filter=blocksize"], ["minblock=4k",
                                                 "maxdata=64k"])
    for server in (pair.ours, pair.theirs):
        assert nbdsh(server.uri, UNALIGNED_CHANGES).stdout.split() == \
            ["True"]
    # Trims of unaligned ends are skipped, so both files must agree byte
    # for byte on whatever each left there.
    assert file_bytes(pair.our_file) == file_bytes(pair.their_file)
    assert file_bytes(pair.our_file) != data


def test_vddk_sees_only_aligned_requests_of_at_most_maxdata(
        fake_vddk, start_server, tmp_path):
    data = random_disk(12 * MiB, seed=3)
    disk = fake_vddk.remote_disk(size=len(data), data=data)
    # The fake fails remote requests above 2M as ESXi's NFC service does.
    fake_vddk.limit_remote_requests(2 * MiB)
    fake_vddk.expect(user="root", password="secret")
    server = start_server("--filter=blocksize", "backend=vddk",
                          "libdir=" + fake_vddk.libdir, "server=esxi",
                          "user=root", "password=secret",
                          "thumbprint=" + ":".join(["ab"] * 20),
                          "vm=moref=vm-1", disk, "minblock=512",
                          "maxdata=2M", env=fake_vddk.env)
    out = nbdsh(server.uri, "import hashlib\n"
                "print(hashlib.sha256(h.pread(8 * 1024 * 1024, 1024))"
                ".hexdigest())\n"
                "print(h.pread(1000, 12345).hex())").stdout
    assert out.split() == [hashlib.sha256(data[1024:1024 + 8 * MiB])
                           .hexdigest(), data[12345:13345].hex()]
    reads = fake_vddk.calls("ReadAsync") + fake_vddk.calls("Read")
    counts = [call.number("count") for call in reads]
    assert max(counts) == 2 * MiB // 512
    assert sum(counts) >= 8 * MiB // 512 + 2


def test_without_the_filter_the_same_read_fails(fake_vddk, start_server):
    """What the seed's maxdata=2M advice avoids."""
    disk = fake_vddk.remote_disk(size=12 * MiB)
    fake_vddk.limit_remote_requests(2 * MiB)
    server = start_server("backend=vddk", "libdir=" + fake_vddk.libdir,
                          "server=esxi", "user=root", "password=secret",
                          "thumbprint=" + ":".join(["ab"] * 20),
                          "vm=moref=vm-1", disk, env=fake_vddk.env)
    proc = nbdsh(server.uri, "h.pread(8 * 1024 * 1024, 0)", check=False)
    assert proc.returncode != 0


class SlowReads(MemoryBackend):
    """Reads that take a while, so read-modify-writes overlap in time."""

    def open(self, export_name, readonly, is_tls=False):
        engine = super().open(export_name, readonly, is_tls)
        fast_read = engine.pread

        def slow_read(count, offset, flags=0):
            data = fast_read(count, offset, flags)
            time.sleep(0.002)
            return data
        engine.pread = slow_read
        return engine


def test_overlapping_unaligned_writes_do_not_lose_each_other():
    memory = SlowReads(bytes(4096), block_limits=(512, 4096, 64 * MiB))
    blocksize = BlocksizeFilter(memory, {"minblock": 512})
    engines = [blocksize.open_engine("", False) for _ in range(4)]
    errors = []

    def writer(index, engine):
        try:
            for _ in range(10):
                # Each writer owns bytes 100*index .. +10 of one block.
                engine.pwrite(bytes([index + 1]) * 10, 100 * index)
        except Exception as exc:    # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(i, e))
               for i, e in enumerate(engines)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    for index in range(4):
        start = 100 * index
        assert memory.data[start:start + 10] == bytes([index + 1]) * 10
    # Only whole 512-byte blocks reached the engine.
    assert all(count % 512 == 0 and offset % 512 == 0
               for name, count, offset, _ in memory.calls
               if name in ("pread", "pwrite"))


def test_fast_zero_of_an_unaligned_range_fails_fast(tmp_path, start_server):
    data = random_disk(MiB, seed=4)
    descriptor = flat_vmdk(str(tmp_path), "disk", data)[0]
    server = start_server("--filter=blocksize", descriptor, "minblock=4k")
    script = ("import errno\n"
              "print(h.can_fast_zero())\n"
              "try:\n"
              "    h.zero(1000, 10, nbd.CMD_FLAG_FAST_ZERO)\n"
              "except nbd.Error as e:\n"
              "    print(e.errnum == errno.ENOTSUP)\n"
              "print(h.pread(1000, 10) == %r)\n" % data[10:1010])
    assert nbdsh(server.uri, script).stdout.split() == ["True"] * 3
