"""create=true: every create-type makes a disk qemu accepts, holding what
was written through the engine."""

import os
import random

import pytest

from conftest import need, run
from vddktool.engine import UsageError
from vddktool.params import ADAPTER_TYPES, CREATE_TYPES, defaults
from vddktool.vmdk.create import check_create, create, planned_files
from vddktool.vmdk.descriptor import Descriptor
from vddktool.vmdk.disk import Disk, read_descriptor

MiB = 1024 * 1024


def qemu_img(*args):
    need("qemu-img")
    return run(["qemu-img"] + [str(a) for a in args])


def open_created(path, size, create_type, adapter="scsi-buslogic", hw=4):
    made = create(str(path), size, create_type, adapter, hw)
    if made is not None:
        return Disk.around(str(path), made, create_type)
    return Disk(str(path), writable=True)


def fill(disk, size, sequential):
    """Write patterned data (forwards only when the format needs it) and
    return the expected raw image."""
    expected = bytearray(size)
    rng = random.Random(size)
    if sequential:
        spans = [(0, 300000), (1 * MiB, 2 * MiB), (size - 65536, 65536)]
    else:
        spans = [(rng.randrange(0, size - 200000), rng.randrange(1, 200000))
                 for _ in range(15)] + [(size - 700, 700)]
    for offset, length in spans:
        data = bytes([rng.randrange(1, 256)]) * length
        disk.write(offset, data)
        expected[offset:offset + length] = data
    return expected


# The types qemu can open once made; vmfs-sparse (COWD) deltas are C2's and
# checked by their own tests.
QEMU_READABLE = ["monolithic-sparse", "monolithic-flat", "split-sparse",
                 "split-flat", "vmfs-flat", "vmfs-thin", "stream-optimized"]


@pytest.mark.parametrize("create_type", QEMU_READABLE)
def test_created_disk_holds_what_was_written(tmp_path, create_type):
    size = 40 * MiB
    path = tmp_path / "new.vmdk"
    disk = open_created(path, size, create_type)
    try:
        assert disk.size == size
        expected = fill(disk, size, create_type == "stream-optimized")
        disk.flush()
    finally:
        disk.close()
    if create_type != "stream-optimized":
        qemu_img("check", path)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(bytes(expected))
    qemu_img("compare", "-f", "raw", "-F", "vmdk", raw, path)


def test_every_create_type_is_handled():
    assert set(QEMU_READABLE) | {"vmfs-sparse"} == set(CREATE_TYPES)


def test_split_types_cut_at_2047_mib_per_extent(tmp_path):
    size = 5 * 1024 * MiB
    path = tmp_path / "big.vmdk"
    create(str(path), size, "split-sparse")
    desc, _ = read_descriptor(str(path))
    assert desc.create_type == "twoGbMaxExtentSparse"
    assert [e.sectors for e in desc.extents] == [2047 * 2048] * 2 + [
        size // 512 - 2 * 2047 * 2048]
    assert [e.filename for e in desc.extents] == [
        "big-s001.vmdk", "big-s002.vmdk", "big-s003.vmdk"]
    qemu_img("check", path)


@pytest.mark.parametrize("adapter", sorted(ADAPTER_TYPES))
def test_adapter_type_and_hwversion_reach_the_descriptor(tmp_path, adapter):
    path = tmp_path / "a.vmdk"
    create(str(path), 10 * MiB, "monolithic-flat", adapter, 13)
    desc = Descriptor.parse(path.read_bytes())
    assert desc.ddb["adaptertype"] == adapter.replace("scsi-", "")
    assert desc.ddb["virtualhwversion"] == "13"
    assert desc.ddb["geometry.heads"] == ("16" if adapter == "ide"
                                          else "255")


def test_flat_types_name_their_data_file(tmp_path):
    path = str(tmp_path / "vm.vmdk")
    assert planned_files(path, MiB, "vmfs-thin") == [
        path, str(tmp_path / "vm-flat.vmdk")]
    create(path, MiB, "vmfs-thin")
    desc, _ = read_descriptor(path)
    assert desc.create_type == "vmfs"
    assert desc.ddb["thinprovisioned"] == "1"
    assert desc.extents[0].text() == 'RW 2048 VMFS "vm-flat.vmdk"'


def test_a_leftover_extent_file_stops_the_create(tmp_path):
    path = tmp_path / "d.vmdk"
    (tmp_path / "d-flat.vmdk").write_bytes(b"precious")
    values = dict(defaults(), **{"create": True, "create-size": MiB,
                                 "create-type": "monolithic-flat"})
    with pytest.raises(UsageError) as err:
        check_create(str(path), values)
    assert str(err.value).startswith("file: ")
    assert "d-flat.vmdk already exists" in str(err.value)
    assert (tmp_path / "d-flat.vmdk").read_bytes() == b"precious"


def test_a_failed_create_leaves_nothing(tmp_path):
    path = tmp_path / "e.vmdk"
    # A directory in the way of the second extent file makes it fail.
    os.mkdir(str(tmp_path / "e-f002.vmdk"))
    with pytest.raises(OSError):
        create(str(path), 3 * 1024 * MiB, "split-flat")
    assert sorted(os.listdir(str(tmp_path))) == ["e-f002.vmdk"]


def test_monolithic_sparse_is_refused_past_2_tib(tmp_path):
    values = dict(defaults(), **{"create": True,
                                 "create-size": 3 * 1024 ** 4})
    with pytest.raises(UsageError, match="^create-size: .*2 TiB"):
        check_create(str(tmp_path / "huge.vmdk"), values)
