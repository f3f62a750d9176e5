"""vmfsSparse (COWD) disks served end to end: a root disk, a snapshot
over its parent, writes through NBD, and create-type=vmfs-sparse."""

from conftest import need, run
from vmdk_fixtures import (build_cowd, expected_map, random_disk,
                           served_bytes, served_map, write_descriptor)

MIB = 1024 * 1024
SECTOR = 512


def cowd_disk(tmp_path, name, data, grain_sectors=1, parent=None):
    """NAME.vmdk + NAME-delta.vmdk; a child names ``parent``'s descriptor
    (whose CID write_descriptor sets to 12345678)."""
    delta = "%s-delta.vmdk" % name
    allocated = build_cowd(str(tmp_path / delta), data,
                           grain_sectors=grain_sectors,
                           parent=parent and parent + ".vmdk")
    desc = tmp_path / ("%s.vmdk" % name)
    write_descriptor(str(desc), "vmfsSparse",
                     ['RW %d VMFSSPARSE "%s"' % (len(data) // SECTOR, delta)],
                     parent_hint=parent and parent + ".vmdk",
                     parent_cid="12345678" if parent else "ffffffff")
    return desc, allocated


def test_serves_a_root_disk(tmp_path, start_server):
    data = random_disk(3 * MIB, 1)
    desc, allocated = cowd_disk(tmp_path, "root", data)
    server = start_server("-r", "file=%s" % desc)
    assert served_bytes(server, tmp_path) == data
    assert served_map(server) == expected_map(data, SECTOR, allocated)


def snapshot(tmp_path, grain_sectors=1):
    base_data = random_disk(2 * MIB, 2, hole_every=7, zero_every=11)
    cowd_disk(tmp_path, "base", base_data)
    child_data = bytearray(len(base_data))
    child_data[MIB:MIB + 8192] = b"\x5a" * 8192
    child, _ = cowd_disk(tmp_path, "snap", bytes(child_data),
                         grain_sectors=grain_sectors, parent="base")
    merged = bytearray(base_data)
    merged[MIB:MIB + 8192] = child_data[MIB:MIB + 8192]
    return child, merged


def test_serves_a_snapshot_over_its_parent(tmp_path, start_server):
    child, merged = snapshot(tmp_path)
    server = start_server("-r", "file=%s" % child)
    assert served_bytes(server, tmp_path) == bytes(merged)


def test_partial_grain_writes_keep_the_parent_data(tmp_path, start_server):
    # 4 KiB grains in the snapshot: a 512-byte write into a grain it does
    # not hold must bring the other 3.5 KiB from the parent.
    need("qemu-io")
    child, merged = snapshot(tmp_path, grain_sectors=8)
    server = start_server("file=%s" % child)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 4608 512",
         "-c", "write -z 12288 1024", server.qemu_uri])
    merged[4608:5120] = b"\x77" * 512
    merged[12288:13312] = bytes(1024)
    assert served_bytes(server, tmp_path) == bytes(merged)
    server.stop()
    # And again from the files, after the server closed them.
    again = start_server("-r", "file=%s" % child)
    assert served_bytes(again, tmp_path, "again.raw") == bytes(merged)


def test_nbdcopy_fills_a_new_vmfs_sparse_disk(tmp_path, start_server):
    need("qemu-img")
    data = random_disk(3 * MIB, 3)
    source = tmp_path / "source.raw"
    source.write_bytes(data)
    image = tmp_path / "new.vmdk"
    server = start_server("file=%s" % image, "create=true",
                          "create-size=%d" % len(data),
                          "create-type=vmfs-sparse")
    run(["nbdcopy", str(source), server.uri])
    assert served_bytes(server, tmp_path) == data
    assert server.stop() == 0
    assert 'createType="vmfsSparse"' in image.read_text()
    assert (tmp_path / "new-delta.vmdk").read_bytes()[:4] == b"COWD"
    assert "identical" in run(["qemu-img", "compare", str(image),
                               str(source)]).stdout
