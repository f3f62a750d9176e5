"""The disk layer picks the right reader for each extent (stream, COWD,
seSparse), chains them to parents, and serves read-only formats
read-only."""

import errno
import json

import pytest

from conftest import need, run
from vddktool import log
from vddktool.engine import EngineError
from vddktool.vmdk.backend import NativeEngine
from vddktool.vmdk.create import create
from vddktool.vmdk.disk import Disk, read_descriptor
from vddktool.vmdk.extent import ZERO
from vmdk_fixtures import (build_cowd, build_sesparse, build_stream,
                           random_disk, write_descriptor)

MiB = 1024 * 1024


def qemu_img(*args):
    need("qemu-img")
    return run(["qemu-img"] + [str(a) for a in args])


def test_a_qemu_stream_file_is_read_by_the_stream_reader(tmp_path):
    source = tmp_path / "src.raw"
    data = random_disk(4 * MiB, seed=1)
    source.write_bytes(data)
    image = tmp_path / "s.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
             source, image)
    disk = Disk(str(image))
    try:
        assert type(disk.extents[0]).__name__ == "StreamExtent"
        assert bytes(disk.read_bytes(0, 4 * MiB)) == data
    finally:
        disk.close()


def test_a_stream_disk_opened_for_writing_is_served_read_only(
        tmp_path, capfd):
    image = tmp_path / "vm.vmdk"
    data = random_disk(2 * MiB, seed=2)
    build_stream(str(image), data)
    log.configure(verbose=True)
    try:
        disk = Disk(str(image), writable=True)
    finally:
        log.configure(verbose=False)
    try:
        assert not disk.writable
        engine = NativeEngine(disk, readonly=False)
        assert not engine.can_write()
        with pytest.raises(EngineError) as err:
            engine.pwrite(b"x", 0)
        assert err.value.errno == errno.EPERM
        assert bytes(disk.read_bytes(0, 2 * MiB)) == data
    finally:
        disk.close()
    assert "read-only" in capfd.readouterr().err


def test_a_vmfs_sparse_delta_falls_through_to_its_flat_parent(tmp_path):
    base = tmp_path / "base.vmdk"
    create(str(base), 2 * MiB, "vmfs-flat")
    base_data = random_disk(2 * MiB, seed=3, hole_every=1000,
                            zero_every=1000)
    parent = Disk(str(base), writable=True)
    parent.write(0, base_data)
    parent.close()
    base_cid = read_descriptor(str(base))[0].cid
    delta_data = bytearray(2 * MiB)
    delta_data[8192:8192 + 4096] = b"\xd1" * 4096
    build_cowd(str(tmp_path / "snap-delta.vmdk"), bytes(delta_data),
               grain_sectors=16, parent="base.vmdk")
    child = tmp_path / "snap.vmdk"
    write_descriptor(str(child), "vmfsSparse",
                     ['RW 4096 VMFSSPARSE "snap-delta.vmdk"'],
                     parent_hint="base.vmdk", parent_cid=base_cid)
    expected = bytearray(base_data)
    # The delta's grain 1 (8 KiB) is allocated whole: its zeros hide the base.
    expected[8192:16384] = b"\xd1" * 4096 + bytes(4096)
    disk = Disk(str(child), writable=True)
    try:
        assert type(disk.extents[0]).__name__ == "CowdExtent"
        assert bytes(disk.read_bytes(0, 2 * MiB)) == bytes(expected)
        # Part of an unallocated 8 KiB grain: the rest comes from the base.
        disk.write(MiB + 100, b"\xd2" * 50)
        expected[MiB + 100:MiB + 150] = b"\xd2" * 50
        assert bytes(disk.read_bytes(MiB, 8192)) == bytes(
            expected[MiB:MiB + 8192])
    finally:
        disk.close()
    again = Disk(str(child))
    try:
        assert bytes(again.read_bytes(0, 2 * MiB)) == bytes(expected)
    finally:
        again.close()


def test_a_sesparse_extent_is_read_and_refuses_writes(tmp_path):
    data = random_disk(1 * MiB, seed=4)
    build_sesparse(str(tmp_path / "se-sesparse.vmdk"), data,
                   zero=[200])
    path = tmp_path / "se.vmdk"
    write_descriptor(str(path), "seSparse",
                     ['RW 2048 SESPARSE "se-sesparse.vmdk"'])
    disk = Disk(str(path), writable=True)
    try:
        assert type(disk.extents[0]).__name__ == "SeSparseExtent"
        assert not disk.writable
        expected = bytearray(data)
        expected[200 * 4096:201 * 4096] = bytes(4096)
        assert bytes(disk.read_bytes(0, MiB)) == bytes(expected)
        assert disk.map(200 * 4096, 4096) == [(4096, ZERO)]
        with pytest.raises(EngineError) as err:
            disk.write(0, b"x")
        assert err.value.errno == errno.EPERM
    finally:
        disk.close()


def test_a_bare_cowd_file_is_served_as_a_disk(tmp_path):
    data = random_disk(1 * MiB, seed=5)
    path = tmp_path / "bare-delta.vmdk"
    build_cowd(str(path), data)
    disk = Disk(str(path))
    try:
        assert disk.create_type == "vmfsSparse"
        assert disk.size == MiB
        assert bytes(disk.read_bytes(0, MiB)) == data
    finally:
        disk.close()


def test_create_type_vmfs_sparse_makes_a_writable_delta(tmp_path):
    path = tmp_path / "vs.vmdk"
    assert create(str(path), 4 * MiB, "vmfs-sparse") is None
    disk = Disk(str(path), writable=True)
    try:
        assert disk.writable
        disk.write(MiB, b"\x99" * 70000)
    finally:
        disk.close()
    disk = Disk(str(path))
    try:
        assert bytes(disk.read_bytes(MiB, 70000)) == b"\x99" * 70000
        assert bytes(disk.read_bytes(0, 4096)) == bytes(4096)
    finally:
        disk.close()


def test_stream_map_agrees_with_qemu(tmp_path):
    source = tmp_path / "m.raw"
    source.write_bytes(random_disk(3 * MiB, seed=6, chunk=65536))
    image = tmp_path / "m.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
             source, image)
    disk = Disk(str(image))
    try:
        for entry in json.loads(qemu_img("map", "--output=json",
                                         image).stdout):
            states = set(s for _, s in disk.map(entry["start"],
                                                entry["length"]))
            assert (states == {ZERO}) == entry["zero"], entry
    finally:
        disk.close()
