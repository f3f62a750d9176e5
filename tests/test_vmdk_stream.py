"""streamOptimized reading: both layouts, odd grains, damage; qemu-img is
the oracle wherever it can read the file."""

import json
import random
import re
import struct
import threading
import zlib

import pytest

from conftest import need, run
from vmdk_fixtures import (build_stream, mapped, random_disk, read_all,
                           stream_grain_sectors)
from vddktool.vmdk.extent import DATA, UNALLOCATED, ZERO, VmdkError
from vddktool.vmdk.stream import StreamExtent

GRAIN = 64 * 1024
MIB = 1024 * 1024


def disk(size=3 * MIB, seed=1):
    """Random data with whole-grain holes (so some grains are left out)."""
    return random_disk(size, seed, chunk=GRAIN)


def qemu_raw(tmp_path, image):
    need("qemu-img")
    out = str(tmp_path / "qemu.raw")
    run(["qemu-img", "convert", "-O", "raw", image, out])
    with open(out, "rb") as f:
        return f.read()


def open_stream(path, size):
    return StreamExtent(str(path), size)


@pytest.mark.parametrize("footer", [True, False], ids=["vmware", "header"])
def test_reads_back_what_was_stored(tmp_path, footer):
    data = disk()
    path = tmp_path / "s.vmdk"
    build_stream(str(path), data, footer=footer)
    extent = open_stream(path, len(data))
    try:
        assert read_all(extent) == data
        # Small unaligned requests go through the decoded-grain cache.
        assert read_all(extent, 4096 * 3 + 512) == data
    finally:
        extent.close()


def test_concurrent_readers(tmp_path):
    # The server reads one extent from many threads; the table and grain
    # caches are shared between them.
    data = disk(seed=11)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, data)
    extent = open_stream(path, len(data))
    failures = []

    def reader(seed):
        rng = random.Random(seed)
        for _ in range(200):
            offset = rng.randrange(len(data) - 10000)
            count = rng.randrange(1, 10000)
            got = b"".join(bytes(length) if isinstance(value, str)
                           else bytes(value) for length, value in
                           extent.read(offset, count))
            if got != data[offset:offset + count]:
                failures.append((offset, count))

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        extent.close()
    assert failures == []


def test_vmware_layout_agrees_with_qemu(tmp_path):
    data = disk(seed=2)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, data, footer=True)
    extent = open_stream(path, len(data))
    try:
        assert read_all(extent) == qemu_raw(tmp_path, path) == data
    finally:
        extent.close()


def test_reads_a_stream_made_by_qemu(tmp_path):
    need("qemu-img")
    data = disk(seed=3)
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    image = str(tmp_path / "q.vmdk")
    run(["qemu-img", "convert", "-O", "vmdk", "-o",
         "subformat=streamOptimized", str(raw), image])
    extent = open_stream(image, len(data))
    try:
        assert extent.header.gd_offset != 0xFFFFFFFFFFFFFFFF
        assert read_all(extent) == data
    finally:
        extent.close()


def test_compressed_grains_without_markers(tmp_path):
    data = disk(seed=10)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, data, footer=False, markers=False)
    extent = open_stream(path, len(data))
    try:
        assert not extent.has_markers
        assert read_all(extent) == data
    finally:
        extent.close()


def test_map_matches_the_stored_grains(tmp_path):
    data = disk(seed=4)
    path = str(tmp_path / "s.vmdk")
    stored = build_stream(path, data)
    assert stored and len(stored) < len(data) // GRAIN
    extent = open_stream(path, len(data))
    try:
        expected = []
        for grain in range(len(data) // GRAIN):
            state = DATA if grain in stored else UNALLOCATED
            expected.append((grain * GRAIN, GRAIN, state))
        got = []
        for offset, length, state in mapped(extent):
            got += [(o, GRAIN, state)
                    for o in range(offset, offset + length, GRAIN)]
        assert got == expected
    finally:
        extent.close()


def test_map_agrees_with_qemu_img_map(tmp_path):
    data = disk(seed=5)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, data)
    need("qemu-img")
    runs = json.loads(run(["qemu-img", "map", "--output=json",
                           path]).stdout)
    qemu = [(r["start"], r["length"], DATA if r["data"] else UNALLOCATED)
            for r in runs]
    extent = open_stream(path, len(data))
    try:
        assert mapped(extent) == qemu
    finally:
        extent.close()


def test_zeroed_grain_entries_read_as_zero_state(tmp_path):
    data = bytearray(disk(seed=6))
    data[GRAIN:2 * GRAIN] = bytes(GRAIN)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, bytes(data), zeroed={1})
    extent = open_stream(path, len(data))
    try:
        assert extent.map(GRAIN, GRAIN) == [(GRAIN, ZERO)]
        assert extent.read(GRAIN, 100) == [(100, ZERO)]
        assert read_all(extent) == bytes(data)
    finally:
        extent.close()


def test_last_grain_that_decompresses_short(tmp_path):
    # 3 MiB + 7 sectors: the last grain holds 3584 bytes, not 64 KiB.
    data = random_disk(3 * MIB + 7 * 512, 7, hole_every=1000,
                       zero_every=1000)
    path = str(tmp_path / "s.vmdk")
    stored = build_stream(path, data)
    assert len(data) // GRAIN in stored
    extent = open_stream(path, len(data))
    try:
        tail = extent.read(len(data) - 3584, 3584)
        assert b"".join(bytes(v) for _, v in tail) == data[-3584:]
        assert read_all(extent) == data == qemu_raw(tmp_path, path)
    finally:
        extent.close()


def test_compressed_grain_larger_than_a_grain(tmp_path):
    # zlib level 0 stores random data with framing: more than 64 KiB.
    data = random_disk(MIB, 8, hole_every=1000, zero_every=1000)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, data, level=0)
    with open(path, "rb") as f:
        f.seek(stream_grain_sectors(path)[0] * 512)
        _, size = struct.unpack("<QI", f.read(12))
    assert size > GRAIN
    extent = open_stream(path, len(data))
    try:
        assert read_all(extent) == data
    finally:
        extent.close()


def test_writes_are_refused(tmp_path):
    data = disk(MIB)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, data)
    extent = open_stream(path, len(data))
    try:
        assert extent.writable is False
        with pytest.raises(VmdkError, match="s.vmdk.*rewritten"):
            extent.write(0, b"x" * 512)
        with pytest.raises(VmdkError, match="rewritten"):
            extent.zero(0, 512)
    finally:
        extent.close()
    with open(path, "rb") as f:
        assert f.read(4) == b"KDMV"


# --- damage -----------------------------------------------------------------

def damaged(tmp_path, change, footer=True):
    """Build a stream, apply ``change(raw, grains)`` to its bytes, and
    return (path, data)."""
    data = disk(MIB, seed=9)
    path = str(tmp_path / "bad.vmdk")
    build_stream(path, data, footer=footer)
    grains = stream_grain_sectors(path)
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    raw = change(raw, grains)
    with open(path, "wb") as f:
        f.write(raw)
    return path, data


def expect_error(path, size, pattern):
    """Opening or reading everything must fail with a VmdkError naming the
    file, never return data."""
    with pytest.raises(VmdkError) as info:
        extent = StreamExtent(path, size)
        try:
            read_all(extent)
        finally:
            extent.close()
    message = str(info.value)
    assert path in message
    assert re.search(pattern, message), message


def test_truncated_stream_loses_its_footer(tmp_path):
    path, data = damaged(tmp_path, lambda raw, g: raw[:len(raw) - 1024])
    expect_error(path, len(data), "footer|end-of-stream")


def test_truncated_in_the_middle_of_grains(tmp_path):
    def cut(raw, grains):
        # Keep the footer where it was expected, drop a grain's bytes.
        sector = sorted(grains.values())[-1]
        return raw[:sector * 512 + 20]
    path, data = damaged(tmp_path, cut, footer=False)
    expect_error(path, len(data), "truncated|past the end")


def test_damaged_end_of_stream_marker(tmp_path):
    def change(raw, grains):
        raw[-512 + 12] = 7
        return raw
    path, data = damaged(tmp_path, change)
    expect_error(path, len(data), "end-of-stream")


def test_corrupt_compressed_data(tmp_path):
    def change(raw, grains):
        sector = grains[min(grains)]
        raw[sector * 512 + 12:sector * 512 + 40] = bytes(28)
        return raw
    path, data = damaged(tmp_path, change)
    expect_error(path, len(data), "decompress")


def test_grain_marker_for_another_sector(tmp_path):
    def change(raw, grains):
        struct.pack_into("<Q", raw, grains[min(grains)] * 512, 999 * 128)
        return raw
    path, data = damaged(tmp_path, change)
    expect_error(path, len(data), "marker")


def test_grain_table_entry_past_the_end(tmp_path):
    def change(raw, grains):
        # Point the first stored grain's entry far beyond the file.
        first = grains[min(grains)]
        entry = struct.pack("<I", first)
        at = raw.rfind(entry, 0, len(raw) - 1536)
        struct.pack_into("<I", raw, at, 0x100000)
        return raw
    path, data = damaged(tmp_path, change)
    expect_error(path, len(data), "past the end")


def test_grain_that_decompresses_short_in_the_middle(tmp_path):
    def change(raw, grains):
        sector = grains[min(grains)]
        short = zlib.compress(b"\x01" * 1000)
        raw[sector * 512:sector * 512 + 12 + len(short)] = struct.pack(
            "<QI", min(grains) * 128, len(short)) + short
        return raw
    path, data = damaged(tmp_path, change)
    expect_error(path, len(data), "1000 bytes")


def test_not_a_sparse_file(tmp_path):
    path = tmp_path / "text.vmdk"
    path.write_bytes(b"# Disk DescriptorFile\n" + bytes(2000))
    with pytest.raises(VmdkError, match="text.vmdk"):
        StreamExtent(str(path), 1024)


def test_extent_line_larger_than_capacity(tmp_path):
    data = disk(MIB)
    path = str(tmp_path / "s.vmdk")
    build_stream(path, data)
    with pytest.raises(VmdkError, match="sectors"):
        StreamExtent(path, 2 * MIB)
