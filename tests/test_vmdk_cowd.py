"""ESXi vmfsSparse (COWD): reads against the builder and qemu-img, writes
that allocate, create-type=vmfs-sparse, and damaged files."""

import os
import random
import struct

import pytest

from conftest import need, run
from vmdk_fixtures import (build_cowd, cowd_header, mapped, random_disk,
                           read_all, write_descriptor)
from vddktool.vmdk.cowd import CowdExtent, create_vmfs_sparse
from vddktool.vmdk.extent import DATA, UNALLOCATED, VmdkError

MIB = 1024 * 1024


def root_disk(tmp_path, size=5 * MIB, seed=1, grain_sectors=1):
    """(descriptor path, delta path, data, allocated grains)."""
    data = random_disk(size, seed)
    delta = str(tmp_path / "d-delta.vmdk")
    allocated = build_cowd(delta, data, grain_sectors=grain_sectors)
    desc = str(tmp_path / "d.vmdk")
    write_descriptor(desc, "vmfsSparse", ['RW %d VMFSSPARSE "d-delta.vmdk"'
                                          % (size // 512)])
    return desc, delta, data, allocated


def qemu_raw(tmp_path, image):
    need("qemu-img")
    out = str(tmp_path / "qemu.raw")
    run(["qemu-img", "convert", "-O", "raw", image, out])
    with open(out, "rb") as f:
        return f.read()


def qemu_identical(tmp_path, image, data):
    need("qemu-img")
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    assert "identical" in run(["qemu-img", "compare", image,
                               str(raw)]).stdout


@pytest.mark.parametrize("grain_sectors", [1, 8])
def test_reads_back_what_was_stored(tmp_path, grain_sectors):
    desc, delta, data, _ = root_disk(tmp_path, grain_sectors=grain_sectors)
    extent = CowdExtent(delta, len(data))
    try:
        assert read_all(extent) == data
        assert read_all(extent, 3 * 4096 + 512) == data
    finally:
        extent.close()


def test_agrees_with_qemu(tmp_path):
    desc, delta, data, _ = root_disk(tmp_path, seed=2)
    extent = CowdExtent(delta, len(data))
    try:
        assert read_all(extent) == qemu_raw(tmp_path, desc)
    finally:
        extent.close()


def test_map_matches_the_allocated_grains(tmp_path):
    desc, delta, data, allocated = root_disk(tmp_path, size=3 * MIB,
                                             seed=3, grain_sectors=8)
    grain = 8 * 512
    extent = CowdExtent(delta, len(data))
    try:
        got = {}
        for offset, length, state in mapped(extent):
            for start in range(offset, offset + length, grain):
                got[start // grain] = state
        assert got == {g: DATA if g in allocated else UNALLOCATED
                       for g in range(len(data) // grain)}
    finally:
        extent.close()


def test_writes_allocate_and_survive_reopening(tmp_path):
    desc, delta, data, _ = root_disk(tmp_path, size=6 * MIB, seed=4)
    model = bytearray(data)
    rng = random.Random(4)
    free_before, _ = cowd_header(delta)
    extent = CowdExtent(delta, len(data), writable=True)
    try:
        assert cowd_header(delta)[1] == 1     # uncleanShutdown while open
        for _ in range(40):
            offset = rng.randrange(len(data) - 300000)
            count = rng.randrange(1, 300000)
            chunk = rng.getrandbits(8 * count).to_bytes(count, "little")
            extent.write(offset, chunk)
            model[offset:offset + count] = chunk
        extent.zero(1000, 200000)
        model[1000:201000] = bytes(200000)
        assert read_all(extent) == bytes(model)
    finally:
        extent.close()
    free_after, unclean = cowd_header(delta)
    assert unclean == 0
    assert free_after > free_before
    assert free_after * 512 == os.path.getsize(delta)
    reopened = CowdExtent(delta, len(data))
    try:
        assert read_all(reopened) == bytes(model)
    finally:
        reopened.close()
    qemu_identical(tmp_path, desc, bytes(model))


def test_write_into_a_missing_grain_table(tmp_path):
    # 8 MiB of zeros: no grain table allocated; a write spanning two
    # tables allocates both.
    data = bytes(8 * MIB)
    delta = str(tmp_path / "z-delta.vmdk")
    build_cowd(delta, data)
    extent = CowdExtent(delta, len(data), writable=True)
    try:
        assert extent.map(0, len(data)) == [(len(data), UNALLOCATED)]
        payload = os.urandom(MIB)
        extent.write(2 * MIB - 1000, payload)
        assert extent.directory[0] and extent.directory[1]
        pieces = extent.read(2 * MIB - 1000, MIB)
        assert b"".join(bytes(value) for _, value in pieces) == payload
    finally:
        extent.close()


def test_unclean_file_is_read_with_a_warning(tmp_path, capfd):
    data = random_disk(MIB, 7)
    delta = str(tmp_path / "u-delta.vmdk")
    build_cowd(delta, data, unclean=True)
    extent = CowdExtent(delta, len(data))
    try:
        assert read_all(extent) == data
    finally:
        extent.close()
    assert "u-delta.vmdk: the vmfsSparse file was not closed cleanly" in (
        capfd.readouterr().err)


def test_read_only_extent_refuses_writes(tmp_path):
    desc, delta, data, _ = root_disk(tmp_path, size=MIB)
    extent = CowdExtent(delta, len(data))
    try:
        with pytest.raises(VmdkError, match="read-only"):
            extent.write(0, b"x" * 512)
    finally:
        extent.close()


# --- snapshots (child COWD) ------------------------------------------------

def child_disk(tmp_path, grain_sectors=1):
    data = bytearray(2 * MIB)
    data[MIB:MIB + 4096] = b"\x11" * 4096
    delta = str(tmp_path / "c-delta.vmdk")
    build_cowd(delta, bytes(data), grain_sectors=grain_sectors,
               parent="base.vmdk")
    return delta, bytes(data)


def test_child_reports_its_parent_and_holes(tmp_path):
    delta, data = child_disk(tmp_path)
    extent = CowdExtent(delta, len(data))
    try:
        assert not extent.is_root
        assert extent.parent_file_name == "base.vmdk"
        assert extent.map(0, MIB) == [(MIB, UNALLOCATED)]
        assert extent.map(MIB, 4096) == [(4096, DATA)]
    finally:
        extent.close()


def test_zero_on_a_child_hides_the_parent(tmp_path):
    delta, data = child_disk(tmp_path)
    extent = CowdExtent(delta, len(data), writable=True)
    try:
        extent.zero(0, 8192)
        assert extent.map(0, 8192) == [(8192, DATA)]
        assert extent.read(0, 8192)[0][1] == bytes(8192)
    finally:
        extent.close()


def test_root_zero_leaves_holes_unallocated(tmp_path):
    data = bytes(MIB)
    delta = str(tmp_path / "r-delta.vmdk")
    build_cowd(delta, data)
    extent = CowdExtent(delta, len(data), writable=True)
    try:
        extent.zero(0, MIB)
        assert extent.map(0, MIB) == [(MIB, UNALLOCATED)]
    finally:
        extent.close()


def test_partial_grain_of_a_child_takes_the_parent_data(tmp_path):
    delta, data = child_disk(tmp_path, grain_sectors=8)
    extent = CowdExtent(delta, len(data), writable=True)
    try:
        with pytest.raises(VmdkError, match="parent"):
            extent.write(512, b"\x22" * 512)
        parent = bytes(range(256)) * 16          # one 4 KiB grain
        extent.backing = lambda offset, count: parent[:count]
        extent.write(512, b"\x22" * 512)
        got = bytes(extent.read(0, 4096)[0][1])
        assert got == parent[:512] + b"\x22" * 512 + parent[1024:]
    finally:
        extent.close()


def test_write_spanning_partial_grains_keeps_both_ends(tmp_path):
    delta, data = child_disk(tmp_path, grain_sectors=8)
    parent = bytes(range(251)) * 60               # 15060 bytes, no period
    extent = CowdExtent(delta, len(data), writable=True)
    try:
        extent.backing = lambda offset, count: parent[offset:offset + count]
        extent.write(512, b"\x33" * (2 * 4096 + 512))   # grains 0, 1, 2
        got = b"".join(bytes(v) for _, v in extent.read(0, 3 * 4096))
        assert got == (parent[:512] + b"\x33" * (2 * 4096 + 512)
                       + parent[9216:12288])
    finally:
        extent.close()


# --- create-type=vmfs-sparse -----------------------------------------------

def test_create_vmfs_sparse(tmp_path):
    desc = str(tmp_path / "new.vmdk")
    size = 5 * MIB          # three grain tables, the last one partial
    assert create_vmfs_sparse(desc, size, "scsi-lsilogic", 7) is None
    delta = str(tmp_path / "new-delta.vmdk")
    text = open(desc).read()
    assert 'createType="vmfsSparse"' in text
    assert 'RW %d VMFSSPARSE "new-delta.vmdk"' % (size // 512) in text
    assert 'ddb.adapterType = "lsilogic"' in text
    with open(delta, "rb") as f:
        assert f.read(4) == b"COWD"
    need("qemu-img")
    assert "(%d bytes)" % size in run(["qemu-img", "info", desc]).stdout
    data = random_disk(size, 5)
    extent = CowdExtent(delta, size, writable=True)
    try:
        for offset in range(0, size, 256 * 1024):
            chunk = data[offset:offset + 256 * 1024]
            if any(chunk):
                extent.write(offset, chunk)
    finally:
        extent.close()
    qemu_identical(tmp_path, desc, data)
    run(["qemu-img", "check", desc])


def test_create_never_overwrites(tmp_path):
    desc = tmp_path / "new.vmdk"
    (tmp_path / "new-delta.vmdk").write_bytes(b"keep")
    with pytest.raises(VmdkError, match="new-delta.vmdk"):
        create_vmfs_sparse(str(desc), MIB, "ide", 4)
    assert not desc.exists()
    assert (tmp_path / "new-delta.vmdk").read_bytes() == b"keep"


# --- damage ----------------------------------------------------------------

def damaged(tmp_path, change):
    desc, delta, data, _ = root_disk(tmp_path, size=2 * MIB, seed=6)
    with open(delta, "rb") as f:
        raw = bytearray(f.read())
    with open(delta, "wb") as f:
        f.write(change(raw))
    return delta, data


def expect_error(path, size, pattern):
    with pytest.raises(VmdkError, match=pattern) as info:
        extent = CowdExtent(path, size)
        try:
            read_all(extent)
        finally:
            extent.close()
    assert path in str(info.value)


def test_truncated_file(tmp_path):
    delta, data = damaged(tmp_path, lambda raw: raw[:len(raw) // 2])
    expect_error(delta, len(data), "truncated|past the end")


def test_truncated_header(tmp_path):
    delta, data = damaged(tmp_path, lambda raw: raw[:1000])
    expect_error(delta, len(data), "header")


def test_bad_magic(tmp_path):
    delta, data = damaged(tmp_path, lambda raw: b"XXXX" + raw[4:])
    expect_error(delta, len(data), "COWD")


def test_directory_too_small_for_the_disk(tmp_path):
    def change(raw):
        struct.pack_into("<I", raw, 12, 10 * 4096 * 8)   # numSectors
        return raw
    delta, data = damaged(tmp_path, change)
    expect_error(delta, len(data), "too few")


def test_grain_entry_pointing_into_the_header(tmp_path):
    def change(raw):
        gt = struct.unpack_from("<I", raw, 4 * 512)[0]
        struct.pack_into("<I", raw, gt * 512, 2)     # grain 0 -> sector 2
        return raw
    delta, data = damaged(tmp_path, change)
    expect_error(delta, len(data), "inside the header")


def test_directory_entry_pointing_into_the_header(tmp_path):
    def change(raw):
        struct.pack_into("<I", raw, 4 * 512, 1)
        return raw
    delta, data = damaged(tmp_path, change)
    expect_error(delta, len(data), "inside the header")


def test_extent_line_larger_than_the_file(tmp_path):
    desc, delta, data, _ = root_disk(tmp_path, size=MIB)
    expect_error(delta, 2 * MIB, "sectors")
