"""Disks qemu cannot make: ZERO, RDONLY and NOACCESS extent lines, flat
OFFSETs, vmfsThin descriptors; damaged files; the CID and uncleanShutdown
bookkeeping of writes; grain tables allocated on demand."""

import errno
import os
import struct

import pytest

from conftest import need, run
from vddktool.engine import EngineError
from vddktool.vmdk.descriptor import Descriptor
from vddktool.vmdk.disk import Disk, read_descriptor
from vddktool.vmdk.extent import DATA, ZERO, VmdkError
from vddktool.vmdk.create import create
from vddktool.vmdk.sparse import UNCLEAN_SHUTDOWN_OFFSET, SparseHeader

MiB = 1024 * 1024
S = 512


def qemu_img(*args):
    need("qemu-img")
    return run(["qemu-img"] + [str(a) for a in args])


def write_descriptor(path, create_type, extent_lines, extra=()):
    text = ["# Disk DescriptorFile", "version=1", "CID=fffffffe",
            "parentCID=ffffffff", 'createType="%s"' % create_type]
    text += list(extra) + [""] + list(extent_lines)
    text += ["", 'ddb.adapterType = "lsilogic"']
    path.write_text("\n".join(text) + "\n")


def patterned(n, seed):
    return bytes((i * 7 + seed) % 251 for i in range(n))


@pytest.fixture
def mixed(tmp_path):
    """data.bin is 64 KiB of a pattern.  The disk:
    sectors 0-9 from data.bin at sector 4 (RW), 10-19 zeros (ZERO),
    20-29 from data.bin at 40 (RDONLY), 30-39 NOACCESS."""
    data = patterned(64 * 1024, 3)
    (tmp_path / "data.bin").write_bytes(data)
    path = tmp_path / "mixed.vmdk"
    write_descriptor(path, "custom", [
        'RW 10 FLAT "data.bin" 4', "RW 10 ZERO",
        'RDONLY 10 FLAT "data.bin" 40', 'NOACCESS 10 FLAT "data.bin" 0'])
    return path, data


def test_extents_are_laid_end_to_end_with_their_offsets(mixed):
    path, data = mixed
    disk = Disk(str(path))
    try:
        assert disk.size == 40 * S
        assert bytes(disk.read_bytes(0, 10 * S)) == data[4 * S:14 * S]
        assert bytes(disk.read_bytes(10 * S, 10 * S)) == bytes(10 * S)
        assert bytes(disk.read_bytes(20 * S, 10 * S)) == data[40 * S:50 * S]
        # A read spanning three extents.
        got = bytes(disk.read_bytes(9 * S, 12 * S))
        assert got == data[13 * S:14 * S] + bytes(10 * S) + data[40 * S:41 * S]
        assert disk.map(10 * S, 10 * S) == [(10 * S, ZERO)]
    finally:
        disk.close()


def test_noaccess_extents_refuse_reads(mixed):
    disk = Disk(str(mixed[0]))
    try:
        with pytest.raises(EngineError) as err:
            disk.read(30 * S, S)
        assert err.value.errno == errno.EPERM
    finally:
        disk.close()


def test_rdonly_and_zero_extents_refuse_writes_and_nothing_changes(mixed):
    path, data = mixed
    disk = Disk(str(path), writable=True)
    try:
        assert disk.writable
        for offset in (20 * S, 15 * S, 5 * S):
            with pytest.raises(EngineError) as err:
                # 5*S..25*S spans RW, ZERO and RDONLY: refused as a whole.
                disk.write(offset, b"\xff" * (20 * S if offset == 5 * S
                                              else S))
            assert err.value.errno == errno.EPERM
        disk.write(0, b"\xee" * S)
    finally:
        disk.close()
    now = (path.parent / "data.bin").read_bytes()
    assert now[4 * S:5 * S] == b"\xee" * S
    assert now[:4 * S] + now[5 * S:] == data[:4 * S] + data[5 * S:]


def test_a_vmfs_thin_descriptor_serves_its_flat_file(tmp_path):
    data = patterned(1 * MiB, 9)
    (tmp_path / "t-flat.vmdk").write_bytes(data)
    path = tmp_path / "t.vmdk"
    write_descriptor(path, "vmfsThin", ['RW 2048 VMFS "t-flat.vmdk"'],
                     ['ddb.thinProvisioned = "1"'])
    disk = Disk(str(path), writable=True)
    try:
        assert disk.create_type == "vmfsThin"
        assert bytes(disk.read_bytes(0, MiB)) == data
        disk.write(4096, b"\x01" * 10)
    finally:
        disk.close()
    assert (tmp_path / "t-flat.vmdk").read_bytes()[4096:4106] == b"\x01" * 10


def test_flat_holes_map_as_zero(tmp_path):
    flat = tmp_path / "h-flat.vmdk"
    with open(str(flat), "wb") as f:
        f.truncate(4 * MiB)
        f.seek(1 * MiB)
        f.write(b"\x07" * MiB)
    path = tmp_path / "h.vmdk"
    write_descriptor(path, "monolithicFlat", ['RW 8192 FLAT "h-flat.vmdk" 0'])
    disk = Disk(str(path))
    try:
        runs = disk.map(0, 4 * MiB)
        assert (MiB, DATA) in runs
        assert runs[0] == (MiB, ZERO)
        assert sum(n for n, _ in runs) == 4 * MiB
    finally:
        disk.close()


# --- damaged files ---------------------------------------------------------


@pytest.fixture
def sparse(tmp_path):
    path = tmp_path / "s.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", path, "64M")
    need("qemu-io")
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 1 0 1M", str(path)])
    return path


def patch(path, offset, data):
    with open(str(path), "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_of(path):
    with open(str(path), "rb") as f:
        return SparseHeader.unpack(f.read(S))


@pytest.mark.parametrize("damage,message", [
    (lambda p: patch(p, 0, b"XXXX"), "not a VMDK"),
    (lambda p: patch(p, 4, struct.pack("<I", 9)), "version 9"),
    (lambda p: patch(p, 8, struct.pack("<I", 3 | 1 << 20)),
     "incompatible header flags"),
    (lambda p: patch(p, 20, struct.pack("<Q", 100)), "grain size 100"),
    (lambda p: patch(p, 56, struct.pack("<Q", 1 << 30)), "grain directory"),
    (lambda p: os.truncate(str(p), 30 * S), "truncated"),
], ids=["magic", "version", "flags", "grain-size", "gd-offset", "truncated"])
def test_a_damaged_sparse_file_is_refused_by_name(sparse, damage, message):
    damage(sparse)
    with pytest.raises(VmdkError) as err:
        Disk(str(sparse))
    assert str(sparse) in str(err.value)
    assert message in str(err.value)


def test_a_grain_past_the_end_is_an_error_naming_the_file(sparse):
    # Keep the metadata, lose the grains.
    os.truncate(str(sparse), header_of(sparse).overhead * S + 1000)
    disk = Disk(str(sparse))
    try:
        with pytest.raises(VmdkError) as err:
            disk.read(0, 65536)
        assert str(sparse) in str(err.value) and "truncated" in str(
            err.value)
    finally:
        disk.close()


def test_a_missing_extent_file_is_named(tmp_path):
    path = tmp_path / "m.vmdk"
    write_descriptor(path, "monolithicFlat", ['RW 8 FLAT "gone-flat.vmdk" 0'])
    with pytest.raises(VmdkError, match="gone-flat.vmdk"):
        Disk(str(path))


def test_a_short_flat_file_is_refused(tmp_path):
    (tmp_path / "x-flat.vmdk").write_bytes(bytes(1000))
    path = tmp_path / "x.vmdk"
    write_descriptor(path, "monolithicFlat", ['RW 8 FLAT "x-flat.vmdk" 0'])
    with pytest.raises(VmdkError, match="x-flat.vmdk: truncated"):
        Disk(str(path))


def test_a_broken_chain_is_refused_unless_single_link(tmp_path):
    base = tmp_path / "b.vmdk"
    create(str(base), MiB, "monolithic-flat")
    child = tmp_path / "c.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "b.vmdk", "-F", "vmdk",
             child)
    # The parent is written after the snapshot: its CID changes.
    disk = Disk(str(base), writable=True)
    disk.write(0, b"x")
    disk.close()
    with pytest.raises(VmdkError) as err:
        Disk(str(child))
    assert str(child) in str(err.value) and "CID" in str(err.value)
    Disk(str(child), single_link=True).close()


# --- bookkeeping of writes -------------------------------------------------


def test_the_cid_changes_on_the_first_write_only(sparse):
    before, _ = read_descriptor(str(sparse))
    disk = Disk(str(sparse), writable=True)
    try:
        assert read_descriptor(str(sparse))[0].cid == before.cid
        disk.write(0, b"a")
        first = read_descriptor(str(sparse))[0].cid
        disk.write(0, b"b")
        assert read_descriptor(str(sparse))[0].cid == first != before.cid
    finally:
        disk.close()
    qemu_img("check", sparse)


def test_unclean_shutdown_is_set_while_open_for_writing(sparse):
    def flag():
        with open(str(sparse), "rb") as f:
            f.seek(UNCLEAN_SHUTDOWN_OFFSET)
            return f.read(1)
    Disk(str(sparse)).close()
    assert flag() == b"\0"
    disk = Disk(str(sparse), writable=True)
    assert flag() == b"\1"
    disk.close()
    assert flag() == b"\0"


def test_grain_tables_are_allocated_when_the_directory_has_none(sparse):
    """qemu preallocates every grain table; other producers leave GD
    entries at 0.  Clear both directories and write into that range."""
    header = header_of(sparse)
    tables = 2   # 64 MiB / 32 MiB per table
    for directory in (header.gd_offset, header.rgd_offset):
        patch(sparse, directory * S + 4, bytes(4 * (tables - 1)))
    # Table 1 is now absent: 32 MiB..64 MiB reads as unallocated.
    size_before = os.path.getsize(str(sparse))
    disk = Disk(str(sparse), writable=True)
    try:
        assert disk.map(32 * MiB, 32 * MiB) == [(32 * MiB, ZERO)]
        disk.write(40 * MiB + 100, b"\x5a" * 70000)
        assert bytes(disk.read_bytes(40 * MiB + 100, 70000)) == \
            b"\x5a" * 70000
    finally:
        disk.close()
    assert os.path.getsize(str(sparse)) > size_before
    with open(str(sparse), "rb") as f:
        for directory in (header.gd_offset, header.rgd_offset):
            f.seek(directory * S + 4)
            assert struct.unpack("<I", f.read(4))[0] != 0
    qemu_img("check", sparse)
    raw = sparse.parent / "s.raw"
    qemu_img("convert", "-O", "raw", sparse, raw)
    data = raw.read_bytes()
    assert data[40 * MiB + 100:40 * MiB + 70100] == b"\x5a" * 70000
    assert data[:MiB] == b"\x01" * MiB


def test_an_embedded_descriptor_is_read_from_the_sparse_file(sparse):
    desc, where = read_descriptor(str(sparse))
    assert where == (S, 20 * S)
    assert desc.create_type == "monolithicSparse"
    assert isinstance(desc, Descriptor)


def test_a_small_binary_file_is_not_taken_for_a_descriptor(tmp_path):
    path = tmp_path / "junk.vmdk"
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    with pytest.raises(VmdkError, match="junk.vmdk: not a VMDK"):
        Disk(str(path))


def test_zeroing_a_flat_extent_may_punch_a_hole(tmp_path):
    path = tmp_path / "p.vmdk"
    create(str(path), 4 * MiB, "monolithic-flat")
    disk = Disk(str(path), writable=True)
    try:
        disk.write(0, b"\x31" * (4 * MiB))
        disk.zero(1 * MiB + 100, 2 * MiB, may_trim=True)
        data = bytes(disk.read_bytes(0, 4 * MiB))
        assert data == (b"\x31" * (MiB + 100) + bytes(2 * MiB) +
                        b"\x31" * (MiB - 100))
        # The aligned middle is a hole now; the unaligned edges are data.
        assert (2 * MiB - 4096, ZERO) in disk.map(MiB + 4096, 2 * MiB - 4096)
    finally:
        disk.close()


def test_trimming_a_flat_extent_frees_whole_blocks_only(tmp_path):
    path = tmp_path / "t.vmdk"
    create(str(path), 1 * MiB, "monolithic-flat")
    disk = Disk(str(path), writable=True)
    try:
        disk.write(0, b"\x41" * MiB)
        disk.trim(100, 8192)
        assert bytes(disk.read_bytes(0, 4096)) == b"\x41" * 4096
        assert bytes(disk.read_bytes(4096, 4096)) == bytes(4096)
        assert bytes(disk.read_bytes(8192, 4096)) == b"\x41" * 4096
    finally:
        disk.close()
