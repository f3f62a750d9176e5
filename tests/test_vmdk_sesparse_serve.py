"""seSparse disks served end to end, read-only."""

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
