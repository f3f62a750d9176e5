"""The native engine end to end: vddktool serving VMDKs to nbdinfo,
nbdcopy and qemu, checked against qemu-img's own view of the files."""

import json

import pytest

from conftest import need, run, vddktool

MiB = 1024 * 1024


def qemu_img(*args):
    need("qemu-img")
    return run(["qemu-img"] + [str(a) for a in args])


def make_chain(tmp_path):
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "24M")
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 3M",
         "-c", "write -P 0x22 10M 200k", str(base)])
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
             child)
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x33 1M 100k",
         "-c", "write -z 10M 64k", str(child)])
    return child


def zero_map(entries, is_zero):
    """[[start, length, zero?]] with neighbours of the same kind merged.
    nbdinfo says "offset", qemu-img "start"."""
    merged = []
    for entry in entries:
        start = entry["start"] if "start" in entry else entry["offset"]
        zero = is_zero(entry)
        if merged and merged[-1][2] == zero:
            merged[-1][1] += entry["length"]
        else:
            merged.append([start, entry["length"], zero])
    return merged


def test_nbdinfo_map_agrees_with_qemu_img_map(tmp_path, start_server):
    need("nbdinfo")
    child = make_chain(tmp_path)
    server = start_server("-r", "file=%s" % child)
    ours = json.loads(run(["nbdinfo", "--map", "--json", server.uri]).stdout)
    theirs = json.loads(qemu_img("map", "--output=json", child).stdout)
    expected = zero_map(theirs, lambda e: e["zero"])
    assert len(expected) >= 4
    assert zero_map(ours, lambda e: bool(e["type"] & 2)) == expected


def test_nbdcopy_reads_what_qemu_img_convert_reads(tmp_path, start_server):
    need("nbdcopy")
    child = make_chain(tmp_path)
    server = start_server("-r", "file=%s" % child)
    ours = tmp_path / "ours.raw"
    run(["nbdcopy", server.uri, str(ours)])
    theirs = tmp_path / "theirs.raw"
    qemu_img("convert", "-O", "raw", child, theirs)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("create_type", ["monolithic-sparse", "split-flat",
                                         "stream-optimized"])
def test_nbdcopy_into_a_created_disk(tmp_path, start_server, create_type):
    need("nbdcopy")
    source = tmp_path / "source.raw"
    data = bytearray(12 * MiB)
    for i in range(0, len(data), 3 * 65536 + 4096):
        data[i:i + 50000] = bytes([i % 251 + 1]) * 50000
    source.write_bytes(bytes(data))
    target = tmp_path / "made.vmdk"
    server = start_server("file=%s" % target, "create=true",
                          "create-size=12M", "create-type=%s" % create_type)
    # Several connections write at once: allocation must stay consistent.
    connections = "1" if create_type == "stream-optimized" else "4"
    run(["nbdcopy", "--connections=" + connections, str(source),
         server.uri])
    assert server.stop() == 0
    if create_type != "stream-optimized":
        qemu_img("check", target)
    qemu_img("compare", "-f", "raw", "-F", "vmdk", source, target)


def test_read_only_export(tmp_path, start_server):
    need("nbdinfo")
    child = make_chain(tmp_path)
    server = start_server("-r", "file=%s" % child)
    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
    assert info["exports"][0]["is_read_only"] is True


def test_any_export_name_serves_the_disk(tmp_path, start_server):
    need("nbdinfo")
    child = make_chain(tmp_path)
    server = start_server("file=%s" % child)
    out = run(["nbdinfo", "--size", server.uri_for("any/name")]).stdout
    assert int(out) == 24 * MiB


def test_a_damaged_disk_is_one_line_and_exit_1(tmp_path):
    path = tmp_path / "d.vmdk"
    path.write_bytes(b"KDMV" + b"\x07" + bytes(600))
    proc = vddktool("-f", "-U", str(tmp_path / "s.sock"),
                    "file=%s" % path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("vddktool: file: %s: " % path)
    assert "Traceback" not in proc.stderr
