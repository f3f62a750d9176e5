"""Sparse VMDKs whose embedded descriptor names some other file: renamed
images, copies, and converters' placeholders.  The file itself is the
extent, as qemu reads it."""

import os
import shutil

from conftest import need, run
from vmdk_fixtures import build_stream, random_disk, served_bytes

MIB = 1024 * 1024
GRAIN = 64 * 1024


def qemu_image(tmp_path, name, data, subformat):
    """A VMDK of ``subformat`` holding ``data``, made by qemu-img."""
    need("qemu-img")
    raw = tmp_path / (name + ".raw")
    raw.write_bytes(data)
    image = str(tmp_path / name)
    run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
         "subformat=" + subformat, str(raw), image])
    return image


def embedded_extent_line(path):
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    return [line for line in head.decode("latin-1").splitlines()
            if " SPARSE " in line]


def test_a_renamed_monolithic_sparse_is_served(tmp_path, start_server):
    data = random_disk(3 * MIB, 11, chunk=GRAIN)
    old = qemu_image(tmp_path, "made-as.vmdk", data, "monolithicSparse")
    renamed = str(tmp_path / "renamed.vmdk")
    os.rename(old, renamed)
    assert 'SPARSE "made-as.vmdk"' in embedded_extent_line(renamed)[0]
    server = start_server(renamed)
    assert served_bytes(server, tmp_path) == data


def test_a_renamed_stream_optimized_is_served(tmp_path, start_server):
    data = random_disk(2 * MIB + 512, 12, chunk=GRAIN)
    old = qemu_image(tmp_path, "exported.vmdk", data, "streamOptimized")
    renamed = str(tmp_path / "guest-disk1.vmdk")
    os.rename(old, renamed)
    server = start_server(renamed)
    assert served_bytes(server, tmp_path) == data


def test_a_placeholder_name_that_never_existed(tmp_path, start_server):
    # As some converters write: the extent line names no real file.
    data = random_disk(MIB, 13, chunk=GRAIN)
    image = str(tmp_path / "from-ova.vmdk")
    build_stream(image, data, extent_name="disk-placeholder.vmdk")
    assert not os.path.exists(str(tmp_path / "disk-placeholder.vmdk"))
    server = start_server(image)
    assert served_bytes(server, tmp_path) == data


def test_a_copy_beside_its_original_serves_its_own_data(tmp_path,
                                                        start_server):
    # The name in the copy points at the original, which has changed
    # since: the copy's own data must be served, not the original's.
    need("qemu-io")
    data = random_disk(MIB, 14, chunk=GRAIN)
    original = qemu_image(tmp_path, "base.vmdk", data, "monolithicSparse")
    copy = str(tmp_path / "base-copy.vmdk")
    shutil.copyfile(original, copy)
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x77 0 1M", original])
    server = start_server("-r", copy)
    assert served_bytes(server, tmp_path) == data


def test_writes_to_a_renamed_image_stay_in_it(tmp_path, start_server):
    need("nbdcopy")
    need("qemu-img")
    data = random_disk(2 * MIB, 15, chunk=GRAIN)
    old = qemu_image(tmp_path, "made-as.vmdk", data, "monolithicSparse")
    renamed = str(tmp_path / "renamed.vmdk")
    os.rename(old, renamed)
    new_data = random_disk(2 * MIB, 16, chunk=GRAIN)
    source = tmp_path / "new.raw"
    source.write_bytes(new_data)
    server = start_server(renamed)
    run(["nbdcopy", str(source), server.uri])
    assert server.stop() == 0
    assert not os.path.exists(old)
    # The embedded descriptor keeps its line; qemu agrees on the data.
    assert 'SPARSE "made-as.vmdk"' in embedded_extent_line(renamed)[0]
    run(["qemu-img", "check", renamed])
    assert "identical" in run(["qemu-img", "compare", renamed,
                               str(source)]).stdout
