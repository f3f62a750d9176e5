"""The server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io."""

import os
import re

from conftest import need, run
from rawserver import make_disk, raw_server  # noqa: F401 (fixture)


def info_field(output, name):
    match = re.search(r"^\s*%s: (.*)$" % name, output, re.M)
    assert match, "%s missing from:\n%s" % (name, output)
    return match.group(1)


def test_nbdinfo_reports_size_and_capabilities(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"))
    out = run([need("nbdinfo"), server.uri]).stdout
    assert info_field(out, "export-size").startswith("4194304 ")
    assert info_field(out, "is_read_only") == "false"
    assert info_field(out, "can_multi_conn") == "true"
    assert info_field(out, "can_trim") == "true"
    assert info_field(out, "block_size_maximum") == str(64 << 20)
    assert "using structured packets" in out


def test_nbdinfo_sees_readonly(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"), "--readonly")
    out = run([need("nbdinfo"), server.uri]).stdout
    assert info_field(out, "is_read_only") == "true"
    assert info_field(out, "can_zero") == "false"


def test_nbdinfo_list_shows_every_export_and_description(raw_server,
                                                         tmp_path):
    server = raw_server("--ram", "65536", "--export", "=the default",
                        "--export", "second=another disk")
    out = run([need("nbdinfo"), "--list", server.uri]).stdout
    assert re.findall(r'^export="(.*)":', out, re.M) == ["", "second"]
    assert "description: another disk" in out
    assert "description: the default" in out


def test_nbdinfo_unknown_export_fails(raw_server):
    server = raw_server("--ram", "65536")
    proc = run([need("nbdinfo"), server.uri_for("nope")], check=False)
    assert proc.returncode != 0
    assert "No such file or directory" in proc.stderr  # ERR_UNKNOWN


def test_nbdinfo_map_shows_holes_and_data(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"), "--sparse")
    out = run([need("nbdinfo"), "--map", server.uri]).stdout
    rows = [tuple(int(x) for x in line.split()[:3])
            for line in out.splitlines()]
    # A filesystem may allocate in larger blocks than we wrote: check the
    # written runs are data, the ends are holes, and the map is contiguous.
    assert rows[0][0] == 0 and rows[0][2] == 3
    assert rows[-1][2] == 3 and rows[-1][0] + rows[-1][1] == 4 << 20
    for (offset, length, _), (next_offset, _, _) in zip(rows, rows[1:]):
        assert offset + length == next_offset
    data = [(o, o + n) for o, n, t in rows if t == 0]
    assert any(a <= 1 << 20 and (1 << 20) + 65536 <= b for a, b in data)
    assert any(a <= 3 << 20 and (3 << 20) + 4096 <= b for a, b in data)
    flags = [t for _, _, t in rows]
    assert all(a != b for a, b in zip(flags, flags[1:])), "not merged"


def test_nbdcopy_from_server_multi_conn(raw_server, tmp_path):
    content = make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"), "--sparse")
    out = str(tmp_path / "copy")
    run([need("nbdcopy"), "-C", "4", server.uri, out])
    with open(out, "rb") as f:
        assert f.read() == content


def test_nbdcopy_to_server_multi_conn(raw_server, tmp_path):
    source = str(tmp_path / "source")
    content = make_disk(source, data=((0, 300000), (2 << 20, 777777)))
    target = str(tmp_path / "target")
    with open(target, "wb") as f:
        f.write(os.urandom(4 << 20))  # the holes must come out as zeros
    server = raw_server("--file", target)
    run([need("nbdcopy"), "-C", "4", "--flush", source, server.uri])
    with open(target, "rb") as f:
        assert f.read() == content


def test_nbdcopy_through_a_serialized_engine(raw_server, tmp_path):
    content = make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"), "--serialize",
                        "--threads", "4")
    out = str(tmp_path / "copy")
    run([need("nbdcopy"), server.uri, out])
    with open(out, "rb") as f:
        assert f.read() == content


def test_qemu_img_info_and_convert_compare(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"), "--sparse",
                        "--readonly")
    qemu_img = need("qemu-img")
    info = run([qemu_img, "info", "--output=json", server.qemu_uri]).stdout
    assert '"virtual-size": 4194304' in info
    out = str(tmp_path / "out.qcow2")
    run([qemu_img, "convert", "-O", "qcow2", server.qemu_uri, out])
    run([qemu_img, "compare", server.qemu_uri, out])
    run([qemu_img, "compare", str(tmp_path / "disk"), out])


def test_qemu_img_compare_notices_a_difference(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    other = str(tmp_path / "other")
    make_disk(other)
    server = raw_server("--file", str(tmp_path / "disk"), "--sparse")
    proc = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw",
                other, server.qemu_uri], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_qemu_io_write_then_read_back(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"))
    qemu_io = need("qemu-io")
    run([qemu_io, "-f", "raw", "-c", "write -P 0xab 512k 64k",
         "-c", "write -z 1M 4k", "-c", "flush", server.qemu_uri])
    out = run([qemu_io, "-f", "raw", "-r", "-c", "read -P 0xab 512k 64k",
               "-c", "read -P 0 1M 4k", server.qemu_uri]).stdout
    assert "Pattern verification failed" not in out
    with open(str(tmp_path / "disk"), "rb") as f:
        f.seek(512 << 10)
        assert f.read(65536) == b"\xab" * 65536


def test_qemu_io_read_pattern_mismatch_is_reported(raw_server):
    server = raw_server("--ram", str(1 << 20))
    out = run([need("qemu-io"), "-f", "raw", "-r", "-c",
               "read -P 0x11 0 4k", server.qemu_uri], check=False)
    assert "Pattern verification failed" in out.stdout + out.stderr


def test_map_without_engine_extents_is_all_data(raw_server, tmp_path):
    make_disk(str(tmp_path / "disk"))
    server = raw_server("--file", str(tmp_path / "disk"))
    out = run([need("nbdinfo"), "--map", server.uri]).stdout
    assert [line.split()[:3] for line in out.splitlines()] == [
        ["0", str(4 << 20), "0"]]
