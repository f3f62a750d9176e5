"""One writer at a time: the native engine takes qemu's image locks, so
vddktool, qemu-img, qemu-io and qemu-nbd refuse to write an image another
of them has open (and to read one another writes, unless asked to)."""

import fcntl
import hashlib
import os
import subprocess
import time

import pytest

from conftest import CLIENT_ENV, need, run, vddktool
from vddktool.vmdk import locks

MIB = 1024 * 1024


@pytest.fixture
def image(tmp_path):
    """A monolithicSparse image made by qemu-img, with some data."""
    need("qemu-img")
    path = str(tmp_path / "disk.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", path, "4M"])
    run([need("qemu-io"), "-f", "vmdk", "-c", "write -P 0x3c 0 64k", path])
    return path


def digest(*paths):
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def byte_taken(path, offset):
    """Whether some open file description holds ``offset`` of ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return locks._taken_by_another(fd, offset)
    finally:
        os.close(fd)


def wait_for_lock(path, offset=locks.HELD_BASE, proc=None):
    deadline = time.time() + 20
    while time.time() < deadline:
        if byte_taken(path, offset):
            return
        assert proc is None or proc.poll() is None, "the holder exited"
        time.sleep(0.02)
    raise AssertionError("nobody locked %s" % path)


class Holder(object):
    """A qemu program keeping the image open in the background."""

    def __init__(self, argv, path):
        self.proc = subprocess.Popen(argv, env=CLIENT_ENV,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_for_lock(path, proc=self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.communicate(timeout=20)


@pytest.fixture
def hold(tmp_path):
    holders = []

    def start(program, path, readonly=False):
        if program == "qemu-nbd":
            argv = [need("qemu-nbd"), "-f", "vmdk", "-k",
                    str(tmp_path / ("qemu-nbd%d.sock" % len(holders)))]
            argv += ["-r"] if readonly else []
        else:
            argv = [need("qemu-io"), "-f", "vmdk", "-c", "sleep 60000"]
            argv += ["-r"] if readonly else []
        holder = Holder(argv + [path], path)
        holders.append(holder)
        return holder

    yield start
    for holder in holders:
        holder.stop()


def serve_once(*args):
    """vddktool that starts, runs a trivial --run command and exits."""
    return vddktool("-U", "-", *args + ("--run", "true"), check=False)


def refusal(proc, path):
    """The one line a locked image gives."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        "vddktool: file: %s: another process (qemu or vddktool) holds a lock "
        "on this file: " % path), lines[0]
    return lines[0]


# -- qemu holds the image


@pytest.mark.parametrize("program", ["qemu-io", "qemu-nbd"])
def test_a_qemu_writer_keeps_vddktool_out(image, hold, program):
    hold(program, image)
    before = digest(image)
    line = refusal(serve_once(image), image)
    assert "two writers corrupt it" in line
    line = refusal(serve_once("-r", image), image)
    assert "force-share=true" in line
    # Refused before anything was written: no unclean-shutdown mark, no
    # new CID.
    assert digest(image) == before


def test_force_share_reads_beside_a_qemu_writer(image, hold, tmp_path):
    need("nbdcopy")
    hold("qemu-nbd", image)
    out = str(tmp_path / "out.raw")
    proc = vddktool("-U", "-", "-r", "force-share=true", image, "--run",
                    "nbdcopy \"$uri\" %s" % out, check=False)
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        assert f.read(64 * 1024) == b"\x3c" * 64 * 1024


def test_qemu_readers_share_with_vddktool_readers(image, hold):
    hold("qemu-nbd", image, readonly=True)
    before = digest(image)
    assert serve_once("-r", image).returncode == 0
    line = refusal(serve_once(image), image)
    assert "it is reading the image" in line
    assert digest(image) == before


# -- vddktool holds the image


def qemu_fails(argv, message):
    proc = run(argv, check=False)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    assert "Is another process using the image" in proc.stderr


def test_a_vddktool_writer_keeps_qemu_out(image, start_server, tmp_path):
    start_server(image)
    qemu_fails(["qemu-img", "info", image], 'Failed to get shared "write"')
    qemu_fails([need("qemu-io"), "-f", "vmdk", "-c", "write 0 512", image],
               'Failed to get "write" lock')
    qemu_fails([need("qemu-io"), "-r", "-f", "vmdk", "-c", "read 0 512",
                image], 'Failed to get shared "write"')
    qemu_fails([need("qemu-nbd"), "-f", "vmdk", "-k",
                str(tmp_path / "q.sock"), image], 'Failed to get "write"')
    # qemu's -U reads alongside, as force-share does.
    info = run(["qemu-img", "info", "-U", image])
    assert "vmdk" in info.stdout


def test_a_vddktool_reader_lets_qemu_read_but_not_write(image,
                                                        start_server):
    start_server("-r", image)
    assert "vmdk" in run(["qemu-img", "info", image]).stdout
    run([need("qemu-io"), "-r", "-f", "vmdk", "-c", "read -P 0x3c 0 64k",
         image])
    qemu_fails([need("qemu-io"), "-f", "vmdk", "-c", "write 0 512", image],
               'Failed to get "write" lock')


def test_the_locks_go_when_vddktool_stops(image, start_server):
    server = start_server(image)
    assert byte_taken(image, locks.HELD_BASE + 1)      # write, held
    run([need("nbdinfo"), "--size", server.uri])       # fully started
    assert server.stop() == 0
    assert not byte_taken(image, locks.HELD_BASE)
    run([need("qemu-io"), "-f", "vmdk", "-c", "write -P 1 0 512", image])


def test_a_daemon_keeps_its_locks(image, tmp_path):
    # The lock belongs to the open file description, which the daemon
    # inherits across its fork.
    import signal
    pidfile = str(tmp_path / "pid")
    vddktool("-U", str(tmp_path / "sock"), "-P", pidfile, image)
    try:
        qemu_fails([need("qemu-io"), "-f", "vmdk", "-c", "write 0 512",
                    image], 'Failed to get "write" lock')
    finally:
        with open(pidfile) as f:
            os.kill(int(f.read()), signal.SIGTERM)


# -- two vddktools


@pytest.mark.parametrize("first,second,allowed", [
    ((), (), False),
    ((), ("-r",), False),
    (("-r",), (), False),
    (("-r",), ("-r",), True),
    ((), ("-r", "force-share=true"), True),
    (("-r", "force-share=true"), (), True),
])
def test_two_vddktools(image, start_server, first, second, allowed):
    start_server(*first + (image,))
    proc = serve_once(*second + (image,))
    if allowed:
        assert proc.returncode == 0, proc.stderr
    else:
        refusal(proc, image)


def test_every_file_of_a_split_image_is_locked(tmp_path, start_server):
    need("qemu-img")
    path = str(tmp_path / "split.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         "subformat=twoGbMaxExtentFlat", path, "3G"])
    pieces = sorted(str(tmp_path / name) for name in os.listdir(
        str(tmp_path)) if name.startswith("split-f"))
    assert len(pieces) == 2
    start_server(path)
    for locked in [path] + pieces:
        for offset in (101, 103, 201, 203):
            assert byte_taken(locked, offset), (locked, offset)
    # qemu, opening one data file as raw, sees the writer too.
    qemu_fails([need("qemu-io"), "-f", "raw", "-c", "write 0 512",
                pieces[1]], 'Failed to get "write" lock')


def test_force_share_needs_r(image):
    proc = vddktool("-U", "-", "force-share=true", image, "--run", "true",
                    check=False)
    assert proc.returncode == 1
    assert proc.stderr == ("vddktool: force-share: only for reading (add "
                           "-r): two writers corrupt an image, so a writer "
                           "never shares it\n")


# -- the lock bytes themselves


@pytest.mark.parametrize("writer,force_share,bytes_held", [
    (True, False, {100, 101, 103, 201, 203}),
    (False, False, {100, 201, 203}),
    (False, True, {100}),
])
def test_the_bytes_are_qemus(image, writer, force_share, bytes_held):
    # The same bytes /proc/locks shows for qemu-io, qemu-io -r, -U.
    held = locks.ImageLocks(writer, force_share)
    held.lock(image)
    try:
        taken = set(offset for offset in range(95, 210)
                    if byte_taken(image, offset))
        assert taken == bytes_held
    finally:
        held.release()
    assert not byte_taken(image, 100)


def test_the_ofd_numbers_are_linux(monkeypatch):
    assert (locks.F_OFD_GETLK, locks.F_OFD_SETLK) == (36, 37)
    if hasattr(fcntl, "F_OFD_SETLK"):
        assert fcntl.F_OFD_SETLK == 37
