"""The native engine against qemu as an oracle, for every sub-format qemu
can make: qemu-io writes, we read; we write, qemu-img checks and compares.
"""

import json
import os
import random

import pytest

from conftest import need, run
from vddktool.vmdk.disk import Disk
from vddktool.vmdk.extent import DATA, ZERO

MiB = 1024 * 1024


def qemu_img(*args):
    need("qemu-img")
    return run(["qemu-img"] + [str(a) for a in args])


def qemu_io(image, *commands):
    need("qemu-io")
    argv = ["qemu-io", "-f", "vmdk"]
    for command in commands:
        argv += ["-c", command]
    run(argv + [str(image)])


def qemu_map(image):
    return json.loads(qemu_img("map", "--output=json", image).stdout)


def random_writes(rng, size, count):
    """(offset, length, pattern byte) with unaligned edges, some crossing
    grain and grain-table boundaries, one at the very end."""
    writes = [(size - 3000, 3000, 0x5a)]
    for _ in range(count):
        length = rng.randrange(1, 300 * 1024)
        writes.append((rng.randrange(0, size - length), length,
                       rng.randrange(1, 256)))
    return writes


def make_image(tmp_path, name, size, *options):
    image = tmp_path / name
    args = ["create", "-q", "-f", "vmdk"]
    for option in options:
        args += ["-o", option]
    qemu_img(*(args + [image, size]))
    return image


def assert_reads_like_qemu(disk, image, tmp_path):
    """Our map agrees with qemu-img map (zero flag) and our bytes with
    qemu-img convert wherever qemu says there is data."""
    raw = tmp_path / (os.path.basename(str(image)) + ".raw")
    qemu_img("convert", "-O", "raw", image, raw)
    with open(str(raw), "rb") as oracle:
        for entry in qemu_map(image):
            start, length = entry["start"], entry["length"]
            expected = ZERO if entry["zero"] else DATA
            ours = disk.map(start, length)
            assert sum(n for n, _ in ours) == length
            assert set(state for _, state in ours) == {expected}, entry
            if expected is ZERO:
                # Flat extents read holes as bytes, sparse ones as None.
                pieces = disk.read(start, min(length, 8 * MiB))
                assert all(data is None or not any(data)
                           for _, data in pieces), entry
                continue
            for pos in range(start, start + length, 8 * MiB):
                n = min(8 * MiB, start + length - pos)
                oracle.seek(pos)
                assert bytes(disk.read_bytes(pos, n)) == oracle.read(n), pos


SUBFORMATS = [
    ("monolithicSparse", 64 * MiB, []),
    ("monolithicSparse", 64 * MiB, ["zeroed_grain=on"]),
    ("monolithicFlat", 64 * MiB, []),
    ("twoGbMaxExtentSparse", 2 * 1024 * MiB + 64 * MiB, []),
    ("twoGbMaxExtentFlat", 2 * 1024 * MiB + 64 * MiB, []),
]


@pytest.mark.parametrize("subformat,size,options", SUBFORMATS,
                         ids=[s[0] + "".join(s[2]) for s in SUBFORMATS])
def test_data_written_by_qemu_reads_back(tmp_path, subformat, size, options):
    image = make_image(tmp_path, "d.vmdk", size,
                       "subformat=" + subformat, *options)
    rng = random.Random(subformat + "".join(options))
    writes = random_writes(rng, size, 12)
    # Straddle the 2 GiB extent boundary of the split formats.
    writes.append((2 * 1024 * MiB - 1000, 5000, 0x77) if size > 2048 * MiB
                  else (0, 1, 0x01))
    qemu_io(image, *["write -P %d %d %d" % (p, o, n) for o, n, p in writes])
    if options:
        qemu_io(image, "write -z %d %d" % (1 * MiB, 2 * MiB))
    disk = Disk(str(image))
    try:
        assert disk.size == size
        assert_reads_like_qemu(disk, image, tmp_path)
    finally:
        disk.close()


def test_zeroed_grains_read_as_zero_and_map_as_zero(tmp_path):
    image = make_image(tmp_path, "z.vmdk", 16 * MiB, "zeroed_grain=on")
    qemu_io(image, "write -P 0xcc 0 8M", "write -z 1M 2M")
    disk = Disk(str(image))
    try:
        assert disk.map(1 * MiB, 2 * MiB) == [(2 * MiB, ZERO)]
        assert disk.read(1 * MiB, 2 * MiB) == [(1 * MiB, None)]
        assert bytes(disk.read_bytes(0, 4)) == b"\xcc" * 4
    finally:
        disk.close()


def make_chain(tmp_path):
    base = make_image(tmp_path, "base.vmdk", 32 * MiB)
    qemu_io(base, "write -P 0x11 0 4M", "write -P 0x22 20M 1M")
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
             child)
    qemu_io(child, "write -P 0x33 1M 100k", "write -P 0x44 31M 1M")
    return base, child


def test_a_snapshot_chain_reads_through_to_its_parent(tmp_path):
    _, child = make_chain(tmp_path)
    disk = Disk(str(child))
    try:
        assert disk.parent is not None
        assert_reads_like_qemu(disk, child, tmp_path)
    finally:
        disk.close()


def test_single_link_serves_the_child_alone(tmp_path):
    _, child = make_chain(tmp_path)
    disk = Disk(str(child), single_link=True)
    try:
        assert disk.parent is None
        assert bytes(disk.read_bytes(0, 4)) == bytes(4)
        assert bytes(disk.read_bytes(1 * MiB, 4)) == b"\x33" * 4
        assert disk.map(20 * MiB, 1 * MiB) == [(1 * MiB, ZERO)]
    finally:
        disk.close()


# --- writing ---------------------------------------------------------------


def write_and_compare(tmp_path, image, writes, zeros=()):
    """Apply writes and zeros through the engine and to a bytearray that
    starts as qemu's view; qemu-img check must be clean and qemu-img
    compare must find the two identical."""
    expected_path = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", image, expected_path)
    expected = bytearray(expected_path.read_bytes())
    disk = Disk(str(image), writable=True)
    try:
        for offset, length, pattern in writes:
            disk.write(offset, bytes([pattern]) * length)
            expected[offset:offset + length] = bytes([pattern]) * length
        for offset, length in zeros:
            disk.zero(offset, length)
            expected[offset:offset + length] = bytes(length)
        disk.flush()
    finally:
        disk.close()
    expected_path.write_bytes(bytes(expected))
    qemu_img("check", image)
    qemu_img("compare", "-f", "raw", "-F", "vmdk", expected_path, image)


@pytest.mark.parametrize("subformat,options", [
    ("monolithicSparse", []), ("monolithicSparse", ["zeroed_grain=on"]),
    ("monolithicFlat", [])], ids=["sparse", "sparse-zeroed-grains", "flat"])
def test_writes_are_what_qemu_reads(tmp_path, subformat, options):
    size = 48 * MiB
    image = make_image(tmp_path, "w.vmdk", size, "subformat=" + subformat,
                       *options)
    qemu_io(image, "write -P 0x99 5M 3M")
    rng = random.Random(7)
    writes = random_writes(rng, size, 25)
    write_and_compare(tmp_path, image, writes,
                      zeros=[(5 * MiB + 100, 2 * MiB), (40 * MiB, 64 * 1024)])


def test_split_sparse_writes_across_extents(tmp_path):
    size = 2 * 1024 * MiB + 8 * MiB
    image = make_image(tmp_path, "s.vmdk", size,
                       "subformat=twoGbMaxExtentSparse")
    writes = [(2 * 1024 * MiB - 70000, 200000, 0x42), (0, 512, 0x43),
              (size - 65536, 65536, 0x44)]
    # Compare only what we touched: a full 2 GiB raw would be slow.
    disk = Disk(str(image), writable=True)
    try:
        for offset, length, pattern in writes:
            disk.write(offset, bytes([pattern]) * length)
    finally:
        disk.close()
    qemu_img("check", image)
    raw = tmp_path / "s.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    with open(str(raw), "rb") as f:
        for offset, length, pattern in writes:
            f.seek(offset)
            assert f.read(length) == bytes([pattern]) * length


def test_partial_grain_write_in_a_child_keeps_the_parent_data(tmp_path):
    _, child = make_chain(tmp_path)
    write_and_compare(tmp_path, child,
                      [(100, 1000, 0x55), (20 * MiB + 4096, 10, 0x66)],
                      zeros=[(3 * MiB, 4096)])


def test_zeroing_a_child_hides_the_parent(tmp_path):
    _, child = make_chain(tmp_path)
    disk = Disk(str(child), writable=True)
    try:
        disk.zero(0, 4 * MiB)
        assert bytes(disk.read_bytes(0, 4 * MiB)) == bytes(4 * MiB)
    finally:
        disk.close()
    raw = tmp_path / "c.raw"
    qemu_img("convert", "-O", "raw", child, raw)
    assert raw.read_bytes()[:4 * MiB] == bytes(4 * MiB)


def test_zeroing_whole_grains_uses_zeroed_grain_entries(tmp_path):
    image = make_image(tmp_path, "zg.vmdk", 8 * MiB, "zeroed_grain=on")
    qemu_io(image, "write -P 0xee 0 8M")
    size_before = os.path.getsize(str(image))
    disk = Disk(str(image), writable=True)
    try:
        disk.zero(1 * MiB, 4 * MiB)
        assert disk.map(1 * MiB, 4 * MiB) == [(4 * MiB, ZERO)]
    finally:
        disk.close()
    assert os.path.getsize(str(image)) == size_before
    entries = qemu_map(image)
    assert any(e["start"] == 1 * MiB and e["length"] == 4 * MiB
               and e["zero"] and not e["data"] for e in entries), entries
    qemu_img("check", image)
