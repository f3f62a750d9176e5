"""Real NBD clients against the native engine, end to end: nbdinfo,
nbdcopy, qemu-img and qemu-io over Unix sockets and TCP."""

import json
import os

import pytest

from conftest import free_tcp_port, need, run, vddktool

DISK_SIZE = 8 * 1024 * 1024
MIB = 1024 * 1024

# Where test_data_* writes before serving: two separate runs of data in an
# otherwise empty disk, so maps and copies have holes to get right.
DATA_RUNS = ((1 * MIB, 0x11, 64 * 1024), (5 * MIB, 0x22, 128 * 1024))

SUBFORMATS = ["monolithicFlat", "monolithicSparse"]


def make_vmdk(path, subformat, with_data=True):
    need("qemu-img")
    need("qemu-io")
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         "subformat=" + subformat, path, str(DISK_SIZE)])
    if with_data:
        for offset, pattern, length in DATA_RUNS:
            run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x%x %d %d" % (
                pattern, offset, length), path])
    return path


def expected_image():
    image = bytearray(DISK_SIZE)
    for offset, pattern, length in DATA_RUNS:
        image[offset:offset + length] = bytes([pattern]) * length
    return bytes(image)


@pytest.fixture(params=SUBFORMATS)
def vmdk(request, tmp_path):
    return make_vmdk(str(tmp_path / "disk.vmdk"), request.param)


@pytest.fixture
def sparse_vmdk(tmp_path):
    return make_vmdk(str(tmp_path / "sparse.vmdk"), "monolithicSparse")


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def local_raw(vmdk_path, out):
    """What qemu-img itself reads from the VMDK: the reference."""
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", vmdk_path, out])
    return read_file(out)


# ---------------------------------------------------------------------------
# nbdinfo


def test_nbdinfo_describes_the_export(start_server, vmdk):
    need("nbdinfo")
    server = start_server(vmdk)
    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
    export = info["exports"][0]
    assert export["export-size"] == DISK_SIZE
    assert export["is_read_only"] is False
    assert export["can_flush"] is True


def test_nbdinfo_readonly_export(start_server, vmdk):
    need("nbdinfo")
    server = start_server("-r", vmdk)
    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
    assert info["exports"][0]["is_read_only"] is True


def test_nbdinfo_list_shows_one_export(start_server, vmdk):
    need("nbdinfo")
    server = start_server(vmdk)
    info = json.loads(run(["nbdinfo", "--list", "--json",
                           server.uri]).stdout)
    assert len(info["exports"]) == 1
    assert info["exports"][0]["export-size"] == DISK_SIZE


def test_nbdinfo_map_of_a_sparse_disk(start_server, sparse_vmdk):
    need("nbdinfo")
    server = start_server(sparse_vmdk)
    extents = json.loads(run(["nbdinfo", "--map", "--json",
                              server.uri]).stdout)
    data = [(e["offset"], e["length"]) for e in extents
            if not e["type"] & 1]
    assert sum(length for _, length in data) < DISK_SIZE // 2
    for offset, _, length in DATA_RUNS:
        assert any(start <= offset and offset + length <= start + size
                   for start, size in data), (offset, data)
    assert sum(e["length"] for e in extents) == DISK_SIZE


# ---------------------------------------------------------------------------
# nbdcopy


def test_nbdcopy_out_with_multi_conn(start_server, vmdk, tmp_path):
    need("nbdcopy")
    server = start_server(vmdk)
    out = str(tmp_path / "out.raw")
    run(["nbdcopy", "--connections=4", server.uri, out])
    assert read_file(out) == expected_image()


def test_nbdcopy_in_with_multi_conn(start_server, tmp_path):
    need("nbdcopy")
    target = make_vmdk(str(tmp_path / "target.vmdk"), "monolithicSparse",
                       with_data=False)
    source = str(tmp_path / "source.raw")
    content = os.urandom(3 * MIB) + bytes(2 * MIB) + os.urandom(3 * MIB)
    with open(source, "wb") as f:
        f.write(content)
    server = start_server(target)
    run(["nbdcopy", "--connections=4", source, server.uri])
    assert server.stop() == 0
    assert local_raw(target, str(tmp_path / "check.raw")) == content


# ---------------------------------------------------------------------------
# qemu-img and qemu-io


def test_qemu_img_info_over_unix_socket(start_server, vmdk):
    server = start_server("-r", vmdk)
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           server.qemu_uri]).stdout)
    assert info["virtual-size"] == DISK_SIZE


def test_qemu_img_convert_over_tcp(vmdk, tmp_path, start_server):
    port = free_tcp_port()
    out = str(tmp_path / "tcp.raw")
    vddktool("-p", str(port), "-r", vmdk, "--run",
             "qemu-img convert -O raw nbd://localhost:%d %s" % (port, out))
    assert read_file(out) == expected_image()


def test_qemu_img_compare_matches_the_file(start_server, vmdk):
    server = start_server("-r", vmdk)
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk",
                server.qemu_uri, vmdk], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Images are identical" in proc.stdout


def test_qemu_img_convert_into_the_disk(start_server, tmp_path):
    target = make_vmdk(str(tmp_path / "target.vmdk"), "monolithicFlat",
                       with_data=False)
    source = str(tmp_path / "source.raw")
    with open(source, "wb") as f:
        f.write(expected_image())
    server = start_server(target)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source,
         server.qemu_uri])
    assert server.stop() == 0
    assert local_raw(target, str(tmp_path / "check.raw")) == \
        expected_image()


def test_qemu_io_writes_reach_the_vmdk(start_server, vmdk, tmp_path):
    server = start_server(vmdk)
    proc = run(["qemu-io", "-f", "raw",
                "-c", "write -P 0x77 3M 100k",
                "-c", "write -z 1M 4k",
                "-c", "read -P 0x77 3M 100k",
                "-c", "read -P 0 1M 4k",
                server.qemu_uri])
    assert "Pattern verification failed" not in proc.stdout
    assert server.stop() == 0
    image = bytearray(expected_image())
    image[3 * MIB:3 * MIB + 100 * 1024] = b"\x77" * (100 * 1024)
    image[1 * MIB:1 * MIB + 4096] = bytes(4096)
    assert local_raw(vmdk, str(tmp_path / "check.raw")) == bytes(image)
