"""Writes that land in place, without the disk's lock: a flat extent
always, a sparse extent where every grain of the range is already
written and the grains follow each other in the file.  Such writes may
run side by side and be spliced from the socket; the rest still
allocate under the lock.  Also: the grain table cache, which readers
fill without the lock, never takes back what a writer put there."""

import os
import threading

import pytest

from conftest import CLIENT_ENV, need, run
from inprocess import serving
from vddktool.vmdk import sparse as sparse_module
from vddktool.vmdk.disk import Disk
from vddktool.vmdk.sparse import SparseExtent

KiB = 1024
MiB = 1024 * KiB
GRAIN = 64 * KiB    # qemu-img's default for monolithicSparse


def qemu_img(*args):
    need("qemu-img")
    return run(["qemu-img"] + [str(a) for a in args])


def qemu_io(path, command):
    need("qemu-io")
    run(["qemu-io", "-f", "vmdk", "-c", command, str(path)])


@pytest.fixture
def sparse(tmp_path):
    """16 MiB: grains 0-3 written in one go (one run of the file), grain
    8 written after them, the rest never written."""
    path = tmp_path / "s.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse",
             path, "16M")
    qemu_io(path, "write -P 1 0 256k")
    qemu_io(path, "write -P 2 512k 64k")
    return path


class CountingLock(object):
    """Stands in for the disk's lock and counts who takes it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.taken = 0

    def __enter__(self):
        self._lock.acquire()
        self.taken += 1

    def __exit__(self, *exc):
        self._lock.release()


def test_written_grains_in_one_run_of_the_file_take_writes_in_place(sparse):
    extent = SparseExtent(str(sparse), 16 * MiB, writable=True)
    try:
        start = extent.in_place(0, GRAIN)
        assert start is not None and start % 512 == 0
        # Inside the run: the offset follows the run; across it, one call.
        assert extent.in_place(100, 4 * GRAIN - 100) == start + 100
        assert extent.in_place(GRAIN + 7, 10) == start + GRAIN + 7
        # Grain 4 was never written; grain 8 is elsewhere in the file.
        assert extent.in_place(3 * GRAIN, 2 * GRAIN) is None
        assert extent.in_place(4 * GRAIN, 512) is None
        assert extent.in_place(8 * GRAIN, GRAIN) is not None
        assert extent.in_place(8 * GRAIN, GRAIN) != start + 8 * GRAIN
        assert extent.in_place(7 * GRAIN, 2 * GRAIN) is None
    finally:
        extent.close()


def test_only_writes_that_allocate_take_the_disks_lock(sparse):
    disk = Disk(str(sparse), writable=True)
    counting = disk.lock = CountingLock()
    try:
        # The first write renews the descriptor's CID, under the lock.
        disk.write(0, b"\x01" * 512)
        counting.taken = 0
        size_before = os.path.getsize(str(sparse))
        disk.write(GRAIN // 2, b"\x07" * (2 * GRAIN))     # written grains
        assert counting.taken == 0
        assert os.path.getsize(str(sparse)) == size_before
        disk.write(4 * GRAIN + 512, b"\x08" * 1024)        # a new grain
        assert counting.taken == 1
        assert os.path.getsize(str(sparse)) > size_before
        target = disk.write_target(GRAIN, GRAIN)
        assert target is not None and target[0] == disk.extents[0].fd
        assert disk.write_target(9 * GRAIN, GRAIN) is None
    finally:
        disk.close()
    raw = sparse.parent / "s.raw"
    qemu_img("check", sparse)
    qemu_img("convert", "-O", "raw", sparse, raw)
    data = raw.read_bytes()
    assert data[:GRAIN // 2] == b"\x01" * (GRAIN // 2)
    assert data[GRAIN // 2:GRAIN // 2 + 2 * GRAIN] == b"\x07" * (2 * GRAIN)
    assert data[GRAIN // 2 + 2 * GRAIN:4 * GRAIN] == \
        b"\x01" * (GRAIN + GRAIN // 2)
    assert data[4 * GRAIN:4 * GRAIN + 512] == bytes(512)
    assert data[4 * GRAIN + 512:4 * GRAIN + 1536] == b"\x08" * 1024
    assert data[8 * GRAIN:9 * GRAIN] == b"\x02" * GRAIN


def test_a_table_read_without_the_lock_never_replaces_a_writers(sparse,
                                                               monkeypatch):
    """A reader misses the cache and reads a grain table from the file;
    meanwhile a writer allocates a grain, caches the table and updates
    it.  The reader's older copy must not replace the writer's."""
    extent = SparseExtent(str(sparse), 16 * MiB, writable=True)
    try:
        gt_sector = extent.gd[0]
        real_pread = sparse_module.pread_exact
        writers_table = []

        def pread_then_a_writer_runs(fd, count, offset, path):
            stale = real_pread(fd, count, offset, path)
            if offset == gt_sector * 512 and not writers_table:
                # The writer's turn, between the read and the caching.
                monkeypatch.setattr(sparse_module, "pread_exact", real_pread)
                extent.write(4 * GRAIN, b"\x09" * GRAIN)
                writers_table.append(extent._gt_cache[gt_sector])
            return stale
        extent._gt_cache.clear()
        monkeypatch.setattr(sparse_module, "pread_exact",
                            pread_then_a_writer_runs)
        table = extent._table(gt_sector)
        assert table is writers_table[0]
        assert extent._gt_cache[gt_sector] is writers_table[0]
        # So the new grain is known: writing it again takes no lock, and
        # a partial write keeps the rest of it.
        assert extent.in_place(4 * GRAIN, GRAIN) is not None
    finally:
        extent.close()


def test_nbdcopy_into_written_sparse_grains_moves_payloads_by_splice(
        tmp_path, spliced_moves):
    from vddktool.vmdk.backend import NativeBackend
    moves = spliced_moves
    path = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse",
             path, "8M")
    source = tmp_path / "source.raw"
    backend = NativeBackend({"file": str(path)})
    backend.get_ready()
    try:
        with serving(backend, tmp_path) as uri:
            for round_number in range(2):
                source.write_bytes(os.urandom(8 * MiB))
                run([need("nbdcopy"), "--connections=1", str(source), uri],
                    env=CLIENT_ENV)
                if round_number == 0:
                    # Every grain was new: each write allocated.
                    assert moves == []
    finally:
        backend.cleanup()
    # The second copy found every grain written: 256 KiB at a time.
    assert len(moves) >= 8
    qemu_img("check", path)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", path, source)
