"""streamOptimized disks served end to end: reading with nbdcopy and
nbdinfo, and create-type=stream-optimized filled over NBD."""

from conftest import need, run
from vmdk_fixtures import (build_stream, expected_map, random_disk,
                           served_bytes, served_map)

GRAIN = 64 * 1024
MIB = 1024 * 1024


def test_serves_a_vmware_stream(tmp_path, start_server):
    data = random_disk(4 * MIB + 3 * 512, 1, chunk=GRAIN)
    image = tmp_path / "s.vmdk"
    stored = build_stream(str(image), data)
    server = start_server("file=%s" % image)
    assert served_bytes(server, tmp_path) == data
    assert served_map(server) == expected_map(data, GRAIN, stored)


def test_a_served_stream_is_read_only(tmp_path, start_server):
    need("nbdinfo")
    data = random_disk(MIB, 2, chunk=GRAIN)
    image = tmp_path / "s.vmdk"
    build_stream(str(image), data)
    before = image.read_bytes()
    server = start_server("file=%s" % image)
    assert "is_read_only: true" in run(["nbdinfo", server.uri]).stdout
    server.stop()
    assert image.read_bytes() == before


def fill_new_stream(tmp_path, start_server, data, copy, size=None):
    """create-type=stream-optimized, ``copy(server, source)`` copies the
    source file (``data``, which copy may change) into it, the server
    stops; the file must pass qemu-img check and compare."""
    need("qemu-img")
    source = tmp_path / "source.raw"
    source.write_bytes(data)
    image = tmp_path / "new.vmdk"
    server = start_server("file=%s" % image, "create=true",
                          "create-size=%d" % (size or len(data)),
                          "create-type=stream-optimized")
    copy(server, str(source))
    assert server.stop() == 0
    run(["qemu-img", "check", str(image)])
    assert "identical" in run(["qemu-img", "compare", str(image),
                               str(source)]).stdout
    assert "streamOptimized" in run(["qemu-img", "info", str(image)]).stdout


def test_nbdcopy_fills_a_new_stream(tmp_path, start_server):
    need("nbdcopy")
    data = random_disk(24 * MIB, 3, chunk=GRAIN)

    def copy(server, source):
        run(["nbdcopy", source, server.uri])
    fill_new_stream(tmp_path, start_server, data, copy)


def test_qemu_img_convert_fills_a_new_stream(tmp_path, start_server):
    data = random_disk(8 * MIB, 4, chunk=GRAIN)

    def copy(server, source):
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source,
             server.qemu_uri])
    fill_new_stream(tmp_path, start_server, data, copy)


def test_nbdcopy_fills_distant_regions_of_a_new_stream(tmp_path,
                                                       start_server):
    # Data hundreds of MiB apart: nbdcopy must not be offered several
    # connections copying separate regions, which would arrive out of
    # order far beyond what the writer buffers.
    need("nbdcopy")
    size = 400 * MIB
    chunk = random_disk(MIB, 5, hole_every=1000, zero_every=1000)
    regions = [0, 130 * MIB, 260 * MIB, size - MIB]

    def copy(server, source):
        with open(source, "r+b") as f:
            f.truncate(size)
            for offset in regions:
                f.seek(offset)
                f.write(chunk)
        run(["nbdcopy", source, server.uri])
    fill_new_stream(tmp_path, start_server, b"", copy, size=size)
