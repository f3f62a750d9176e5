"""seSparse: reads against the builder and qemu-img, entry kinds, and the
checks that refuse variants and damage."""

import functools
import struct

import pytest

from conftest import need, run
from vmdk_fixtures import (SESPARSE_GRAIN, build_sesparse, mapped,
                           random_disk, read_all, sesparse_grain_entry,
                           write_descriptor)
from vddktool.vmdk.extent import DATA, UNALLOCATED, ZERO, VmdkError
from vddktool.vmdk.sesparse import SeSparseExtent, grain_slot

MIB = 1024 * 1024
# More than one grain table (each covers 16 MiB), and a partial last one.
SIZE = 20 * MIB + 3 * SESPARSE_GRAIN
ZEROED = [5, 4096 + 7]
UNMAPPED = [9, 4100]


@functools.lru_cache(maxsize=None)
def contents(seed):
    data = bytearray(random_disk(SIZE, seed))
    for grain in ZEROED + UNMAPPED:
        data[grain * SESPARSE_GRAIN:(grain + 1) * SESPARSE_GRAIN] = bytes(
            SESPARSE_GRAIN)
    return bytes(data)


def se_disk(tmp_path, **kwargs):
    """(descriptor, extent path, data, states)."""
    data = contents(kwargs.pop("seed", 1))
    path = str(tmp_path / "s-sesparse.vmdk")
    states = build_sesparse(path, data, zero=ZEROED,
                            unmapped=UNMAPPED, **kwargs)
    desc = str(tmp_path / "s.vmdk")
    write_descriptor(desc, "seSparse", ['RW %d SESPARSE "s-sesparse.vmdk"'
                                        % (SIZE // 512)])
    return desc, path, data, states


def test_grain_slot_encoding():
    for slot in (0, 1, 4095, 4096, 4100, 123456789, (1 << 60) - 1):
        assert grain_slot(sesparse_grain_entry(slot)) == slot
    # Bits 48-59 hold the low 12 bits of the slot.
    assert grain_slot((3 << 60) | (5 << 48) | 2) == (2 << 12) | 5


def test_reads_back_what_was_stored(tmp_path):
    desc, path, data, _ = se_disk(tmp_path)
    extent = SeSparseExtent(path, len(data))
    try:
        assert read_all(extent) == data
        assert read_all(extent, 100000) == data
    finally:
        extent.close()


def test_agrees_with_qemu(tmp_path):
    need("qemu-img")
    desc, path, data, _ = se_disk(tmp_path, seed=2)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    assert "identical" in run(["qemu-img", "compare", desc,
                               str(raw)]).stdout
    extent = SeSparseExtent(path, len(data))
    try:
        out = str(tmp_path / "qemu.raw")
        run(["qemu-img", "convert", "-O", "raw", desc, out])
        with open(out, "rb") as f:
            assert read_all(extent) == f.read()
    finally:
        extent.close()


def test_map_states_match_the_entries(tmp_path):
    desc, path, data, states = se_disk(tmp_path, seed=3)
    kinds = {"data": DATA, "zero": ZERO, "unmapped": ZERO}
    extent = SeSparseExtent(path, len(data))
    try:
        got = {}
        for offset, length, state in mapped(extent):
            for start in range(offset, offset + length, SESPARSE_GRAIN):
                got[start // SESPARSE_GRAIN] = state
        assert got == {g: kinds.get(states.get(g), UNALLOCATED)
                       for g in range(SIZE // SESPARSE_GRAIN)}
        assert extent.read(5 * SESPARSE_GRAIN, 10) == [(10, ZERO)]
    finally:
        extent.close()


def test_is_read_only(tmp_path):
    desc, path, data, _ = se_disk(tmp_path)
    extent = SeSparseExtent(path, len(data), writable=True)
    try:
        assert extent.writable is False
        with pytest.raises(VmdkError):
            extent.write(0, b"x" * 512)
    finally:
        extent.close()


# --- refused variants and damage ---------------------------------------------

def expect_error(path, size, pattern):
    with pytest.raises(VmdkError, match=pattern) as info:
        extent = SeSparseExtent(path, size)
        try:
            read_all(extent)
        finally:
            extent.close()
    assert path in str(info.value)


@functools.lru_cache(maxsize=None)
def pristine_file(tmp_dir):
    desc, path, data, _ = se_disk(tmp_dir)
    with open(path, "rb") as f:
        return path, data, f.read()


def patched(tmp_path_factory, change):
    """A copy of one pristine seSparse file with ``change`` applied (built
    once: the damage tests only differ in their change)."""
    base = tmp_path_factory.getbasetemp() / "sesparse-pristine"
    base.mkdir(exist_ok=True)
    _, data, raw = pristine_file(base)
    path = str(tmp_path_factory.mktemp("damaged") / "s-sesparse.vmdk")
    with open(path, "wb") as f:
        f.write(change(bytearray(raw)))
    return path, data


def test_dirty_journal_is_refused(tmp_path):
    desc, path, data, _ = se_disk(tmp_path, replay_journal=1)
    expect_error(path, len(data), "journal")


def test_bad_magic(tmp_path):
    desc, path, data, _ = se_disk(tmp_path, magic=0xDEADBEEF)
    expect_error(path, len(data), "not a seSparse")


@pytest.mark.parametrize("field, value, what", [
    (1, 0x0000000300000001, "version"),
    (3, 16, "grain size"),
    (5, 1, "flags"),
    (7, 9, "reserved"),
])
def test_unknown_variants_are_refused(tmp_path_factory, field, value, what):
    def change(raw):
        struct.pack_into("<Q", raw, field * 8, value)
        return raw
    path, data = patched(tmp_path_factory, change)
    expect_error(path, len(data), what)


def test_bad_volatile_header(tmp_path_factory):
    def change(raw):
        struct.pack_into("<Q", raw, 512, 0x1234)
        return raw
    path, data = patched(tmp_path_factory, change)
    expect_error(path, len(data), "volatile")


def test_bad_directory_entry(tmp_path_factory):
    def change(raw):
        struct.pack_into("<Q", raw, 2 * 512, 0x2000000000000000)
        return raw
    path, data = patched(tmp_path_factory, change)
    expect_error(path, len(data), "directory entry")


def test_bad_grain_entry_kind(tmp_path_factory):
    def change(raw):
        # The first table written sits right after the directory.
        gd = struct.unpack_from("<Q", raw, 2 * 512)[0] & 0xFFFFFFFF
        table_at = (3 + gd * 64) * 512
        struct.pack_into("<Q", raw, table_at + 8, 0x7000000000000000)
        return raw
    path, data = patched(tmp_path_factory, change)
    expect_error(path, len(data), "not a known kind")


def test_truncated_grains(tmp_path_factory):
    path, data = patched(tmp_path_factory, lambda raw: raw[:len(raw) // 2])
    expect_error(path, len(data), "truncated|past the end")


def test_truncated_header(tmp_path_factory):
    path, data = patched(tmp_path_factory, lambda raw: raw[:300])
    expect_error(path, len(data), "header")
