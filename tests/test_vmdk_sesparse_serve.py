"""seSparse disks served end to end, read-only."""

import json

from conftest import need, run
from vmdk_fixtures import (SESPARSE_GRAIN, build_sesparse, random_disk,
                           served_bytes, served_map, write_descriptor)

MIB = 1024 * 1024


def test_serves_a_sesparse_disk(tmp_path, start_server):
    need("nbdinfo")
    data = bytearray(random_disk(17 * MIB, 1))
    zeroed, unmapped = [3, 4100], [6]
    for grain in zeroed + unmapped:
        data[grain * SESPARSE_GRAIN:(grain + 1) * SESPARSE_GRAIN] = bytes(
            SESPARSE_GRAIN)
    extent = tmp_path / "se-sesparse.vmdk"
    states = build_sesparse(str(extent), bytes(data), zero=zeroed,
                            unmapped=unmapped)
    desc = tmp_path / "se.vmdk"
    write_descriptor(str(desc), "seSparse", ['RW %d SESPARSE '
                                             '"se-sesparse.vmdk"'
                                             % (len(data) // 512)])
    server = start_server("file=%s" % desc)
    assert "is_read_only: true" in run(["nbdinfo", server.uri]).stdout
    assert served_bytes(server, tmp_path) == bytes(data)
    kinds = {}
    for offset, length, kind in served_map(server):
        for start in range(offset, offset + length, SESPARSE_GRAIN):
            kinds[start // SESPARSE_GRAIN] = kind
    for grain in range(len(data) // SESPARSE_GRAIN):
        expected = "data" if states.get(grain) == "data" else "zero"
        assert kinds[grain] == expected, grain


def test_serves_a_sesparse_snapshot_over_its_parent(tmp_path, start_server):
    # Unallocated grains show the parent; zeroed and unmapped grains hide
    # it; allocated grains hold the snapshot's data.
    need("qemu-io")
    size = 17 * MIB
    base = tmp_path / "base.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(base), str(size)])
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x44 0 %d" % size,
         str(base)])
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           str(base)]).stdout)
    base_cid = "%08x" % info["format-specific"]["data"]["cid"]
    delta = bytearray(size)
    delta[8 * SESPARSE_GRAIN:10 * SESPARSE_GRAIN] = b"\x55" * (
        2 * SESPARSE_GRAIN)
    build_sesparse(str(tmp_path / "snap-sesparse.vmdk"), bytes(delta),
                   zero=[2], unmapped=[4100])
    snap = tmp_path / "snap.vmdk"
    write_descriptor(str(snap), "seSparse",
                     ['RW %d SESPARSE "snap-sesparse.vmdk"' % (size // 512)],
                     parent_hint="base.vmdk", parent_cid=base_cid)
    expected = bytearray(b"\x44" * size)
    expected[8 * SESPARSE_GRAIN:10 * SESPARSE_GRAIN] = delta[
        8 * SESPARSE_GRAIN:10 * SESPARSE_GRAIN]
    for grain in (2, 4100):
        expected[grain * SESPARSE_GRAIN:(grain + 1) * SESPARSE_GRAIN] = bytes(
            SESPARSE_GRAIN)
    server = start_server("file=%s" % snap)
    assert served_bytes(server, tmp_path) == bytes(expected)
