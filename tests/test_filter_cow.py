"""--filter=cow: side by side with nbdkit's; the disk below never
changes (checksums), the overlay lives in $TMPDIR and is never seen
there, cow-on-read copies what is read."""

import hashlib
import os

import pytest

from conftest import need, run
from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)
from filter_oracle import (assert_same_info, block_map, contents, flat_vmdk,
                           nbdsh, side_by_side)
from test_vddk_async import SLOW_PAUSE_US, most_in_flight
from vmdk_fixtures import random_disk

MiB = 1024 * 1024

def changes(unit=1):
    """An nbdsh script of writes and trims across block edges, then a
    flush; every odd offset and length rounded up to a multiple of
    ``unit`` (512: whole sectors, as VDDK takes them)."""
    def up(n):
        return -(-n // unit) * unit
    return "\n".join([
        "h.pwrite(b'\\x11' * %d, %d)" % (up(1000), up(100)),
        "h.pwrite(b'\\x22' * %d, 65536 * 3 + %d)" % (up(200000), up(17)),
        "h.pwrite(b'\\x33' * 65536, 65536 * 8)",
        "h.trim(65536 * 2, 65536 * 10)",
        "h.trim(%d, 65536 * 13 + %d)" % (up(5000), up(300)),
        "h.pwrite(b'\\x44' * 512, 65536 * 31 - 512, nbd.CMD_FLAG_FUA)",
        "h.flush()", ""])


CHANGES = changes()
SECTOR_CHANGES = changes(512)


def checksum(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_same_as_nbdkit_before_and_after_writes(tmp_path, start_server,
                                                start_nbdkit):
    data = random_disk(2 * MiB, seed=7, hole_every=5, zero_every=7,
                       chunk=64 * 1024)
    env = {"TMPDIR": str(tmp_path)}
    pair = side_by_side(tmp_path, start_server, start_nbdkit, data,
                        ["--filter=cow"], env=env)
    sums = (checksum(pair.our_file), checksum(pair.their_file))
    info = assert_same_info(pair)
    assert not info["is_read_only"] and not info["can_zero"]
    assert block_map(pair.ours.uri) == block_map(pair.theirs.uri)
    for server in (pair.ours, pair.theirs):
        nbdsh(server.uri, CHANGES)
    ours = contents(pair.ours.uri, tmp_path, "ours.out")
    assert ours == contents(pair.theirs.uri, tmp_path, "theirs.out")
    assert ours[100:1100] == b"\x11" * 1000 and ours != data
    assert block_map(pair.ours.uri) == block_map(pair.theirs.uri)
    assert (checksum(pair.our_file), checksum(pair.their_file)) == sums


def overlay_files(pid, directory):
    """(path, allocated bytes) of the deleted files ``pid`` holds open in
    ``directory``."""
    found = []
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith(directory + "/") and \
                target.endswith(" (deleted)"):
            found.append((target, os.stat(os.path.join(fd_dir, fd))
                          .st_blocks * 512))
    return found


def test_the_overlay_is_in_tmpdir_and_never_visible(tmp_path, start_server):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    disk = tmp_path / "disk.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "8M"])
    server = start_server("--filter=cow", str(disk),
                          env={"TMPDIR": str(tmpdir)})
    nbdsh(server.uri, "h.pwrite(b'x' * 1048576, 0)")
    assert os.listdir(str(tmpdir)) == []
    overlays = overlay_files(server.proc.pid, str(tmpdir))
    assert len(overlays) == 1 and overlays[0][1] >= MiB
    server.stop()
    assert os.listdir(str(tmpdir)) == []


def test_an_unwritable_tmpdir_is_refused_at_start(tmp_path):
    from conftest import vddktool
    disk = tmp_path / "disk.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "1M"])
    proc = vddktool("--filter=cow", "-U", str(tmp_path / "s"), str(disk),
                    check=False, env=dict(os.environ, TMPDIR="/nonexistent"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: cow: cannot create the overlay "
                                  "in /nonexistent")


@pytest.mark.parametrize("mode", ["true", "false", "path"])
def test_cow_on_read_copies_what_is_read(tmp_path, start_server, mode):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    switch = tmp_path / "copy-on-read"
    disk = tmp_path / "disk.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "8M"])
    run([need("qemu-io"), "-f", "vmdk", "-c", "write -P 0x61 0 4M",
         str(disk)])
    value = str(switch) if mode == "path" else mode
    server = start_server("--filter=cow", str(disk), "cow-on-read=" + value,
                          env={"TMPDIR": str(tmpdir)})
    script = "assert h.pread(2097152, 0) == b'a' * 2097152"
    nbdsh(server.uri, script)
    copied = overlay_files(server.proc.pid, str(tmpdir))[0][1]
    if mode == "path":
        assert copied < 2 * MiB     # PATH absent: not copied
        switch.write_bytes(b"")
        nbdsh(server.uri, script)
        copied = overlay_files(server.proc.pid, str(tmpdir))[0][1]
    assert (copied >= 2 * MiB) == (mode != "false")


def test_a_sparse_vmdk_below_never_changes(tmp_path, start_server):
    disk = tmp_path / "disk.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "8M"])
    run([need("qemu-io"), "-f", "vmdk", "-c", "write -P 0x62 1M 1M",
         str(disk)])
    before = checksum(str(disk))
    server = start_server("--filter=cow", str(disk),
                          env={"TMPDIR": str(tmp_path)})
    nbdsh(server.uri, CHANGES)
    nbdsh(server.uri, "assert h.pread(1000, 100) == b'\\x11' * 1000")
    assert server.stop() == 0
    assert checksum(str(disk)) == before


def test_every_connection_sees_the_same_overlay(tmp_path, start_server):
    disk = tmp_path / "disk.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "1M"])
    server = start_server("--filter=cow", str(disk),
                          env={"TMPDIR": str(tmp_path)})
    nbdsh(server.uri, "h.pwrite(b'shared', 4096)")
    out = nbdsh(server.uri, "print(bytes(h.pread(6, 4096)))").stdout
    assert out.strip() == "b'shared'"


@pytest.mark.parametrize("cow_on_read", ["false", "true"])
def test_over_vddk_reads_are_submitted_with_the_same_outcome(
        tmp_path, start_server, fake_vddk, cow_on_read):
    """Over VDDK, cow's reads go down as submitted requests, many in
    flight; what a client reads after the same changes is what cow over
    the native engine gives (checked against nbdkit's above), and the
    disk below never changes."""
    data = random_disk(4 * MiB, seed=11, hole_every=5, zero_every=7,
                       chunk=64 * 1024)
    fake_vddk.env["FAKE_VDDK_RECORD_COMPLETIONS"] = "1"
    fake_vddk.env["FAKE_VDDK_ASYNC_DELAY_US"] = SLOW_PAUSE_US
    disk = fake_vddk.local_disk(size=4 * MiB, data=data)
    before = checksum(disk)
    descriptor, _ = flat_vmdk(str(tmp_path), "native", data)
    options = ["--filter=cow", "cow-on-read=" + cow_on_read]
    env = {"TMPDIR": str(tmp_path)}
    # Two threads: the synchronous path would keep two requests in
    # flight on one connection, the submitted one eight.
    vddk = start_server(*options + ["-t", "2", "backend=vddk",
                                    "libdir=" + fake_vddk.libdir, disk],
                        env=dict(fake_vddk.env, **env))
    native = start_server(*options + [descriptor], env=env)
    for server in (vddk, native):
        nbdsh(server.uri, SECTOR_CHANGES)
    ours = contents(vddk.uri, tmp_path, "vddk.out")
    assert ours == contents(native.uri, tmp_path, "native.out")
    assert ours[512:1536] == b"\x11" * 1024 and ours != data
    # Read again on one connection: with cow-on-read, from the overlay
    # alone; without, the disk's part of it many requests at a time.
    calls = len(fake_vddk.calls())
    again = str(tmp_path / "again.out")
    run([need("nbdcopy"), "--connections=1", "--requests=16",
         "--request-size=65536", vddk.uri, again])
    with open(again, "rb") as f:
        assert f.read() == ours
    calls = fake_vddk.calls()[calls:]
    reads = [c for c in calls if c.name == "ReadAsync"]
    if cow_on_read == "true":
        assert reads == []
    else:
        assert most_in_flight(calls) >= 4
    assert vddk.stop() == 0
    assert checksum(disk) == before
