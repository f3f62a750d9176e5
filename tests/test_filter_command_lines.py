"""The command lines that start `nbdkit vddk` with filters, run verbatim
with `python3 -m vddktool` in place of `nbdkit`, against the fake VDDK:
each copies the remote disk out with qemu-img or nbdcopy and compares
the bytes.

- virt-v2v (lib/nbdkit.ml, input/nbdkit_vddk.ml): LANG=C, --filter NAME
  as two words, nbdkit's own -D flag, waits for the pidfile;
- KubeVirt CDI (pkg/image/nbdkit.go): --filter=NAME, --readonly;
- the seed manual's advice: blocksize and noextents.
"""

import hashlib
import os
import subprocess
import time

import pytest

from conftest import CLIENT_ENV, ROOT, Server, need, run, vddktool_cmd
from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)
from vmdk_fixtures import random_disk

MiB = 1024 * 1024
THUMBPRINT = "B2:31:BD:DE:9F:DB:9D:E0:78:EF:30:42:8A:41:B0:28:92:93:C8:DD"
DISK = random_disk(24 * MiB, seed=20, hole_every=4, zero_every=7,
                   chunk=64 * 1024)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def wait_for_pidfile(server, pidfile, timeout=30):
    """What virt-v2v does before connecting."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(pidfile):
        assert server.proc.poll() is None, server.log()
        assert time.monotonic() < deadline, "no pidfile"
        time.sleep(0.02)
    with open(pidfile) as f:
        assert int(f.read()) == server.proc.pid


@pytest.fixture
def launch():
    """launch(argv, env, pidfile, sock) -> Server: started as its caller
    starts it, in the foreground, ready once its pidfile exists."""
    started = []

    def start(argv, env, pidfile, sock):
        log_path = pidfile + ".log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL,
                                    stdout=log_file, stderr=log_file)
        server = Server(proc, sock, log_path)
        started.append(server)
        wait_for_pidfile(server, pidfile)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def remote(fake_vddk, tmp_path):
    """The fake set up as a vCenter holding one VM disk; the words the
    callers pass for it."""
    fake = fake_vddk
    name = fake.remote_disk("datastore1", "guest/guest.vmdk",
                            size=len(DISK), data=DISK)
    password_file = tmp_path / "password"
    password_file.write_text("s3cret\n")
    fake.expect(server="vcenter.example.com", thumbprint=THUMBPRINT,
                user="administrator@vsphere.local", password="s3cret",
                vm="moref=vm-42")
    fake.name = name
    fake.password_file = str(password_file)
    fake.checksum = lambda: sha256(open(fake.remote_file(name), "rb").read())
    return fake


def copy_with_qemu_img(sock, tmp_path):
    need("qemu-img")
    out = str(tmp_path / "copy.raw")
    run(["qemu-img", "convert", "-p", "-f", "raw",
         "nbd:unix:%s" % sock, "-O", "raw", out])
    with open(out, "rb") as f:
        return f.read()


def copy_with_nbdcopy(sock, tmp_path):
    need("nbdcopy")
    out = str(tmp_path / "copy.raw")
    run(["nbdcopy", "nbd+unix:///?socket=" + sock, out])
    with open(out, "rb") as f:
        return f.read()


def virt_v2v_argv(remote, tmp_path, optional=(), rate=False):
    pidfile = str(tmp_path / "nbdkit.pid")
    sock = str(tmp_path / "nbdkit.sock")
    argv = ["--exit-with-parent", "--foreground", "--pidfile", pidfile,
            "--unix", sock, "--threads", "16",
            "-D", "nbdkit.backend.datapath=0", "-D", "vddk.stats=1",
            "-D", "vddk.datapath=0"]
    if rate:
        argv += ["--filter", "rate"]
    argv += ["--filter", "cow", "--filter", "cacheextents",
             "--filter", "retry", "vddk",
             "server=vcenter.example.com",
             "user=administrator@vsphere.local", "vm=moref=vm-42",
             "file=" + remote.name, "libdir=" + remote.libdir]
    argv += list(optional)
    argv += ["thumbprint=" + THUMBPRINT,
             "password=+" + remote.password_file]
    return argv, pidfile, sock


def environment(remote, **extra):
    env = dict(CLIENT_ENV, LANG="C", TMPDIR=os.path.dirname(remote.libdir))
    env.update(remote.env)
    env.update(extra)
    return env


@pytest.mark.parametrize("copy", [copy_with_qemu_img, copy_with_nbdcopy])
def test_virt_v2v(remote, tmp_path, launch, copy):
    argv, pidfile, sock = virt_v2v_argv(remote, tmp_path)
    before = remote.checksum()
    server = launch(vddktool_cmd(*argv), environment(remote), pidfile, sock)
    assert sha256(copy(sock, tmp_path)) == sha256(DISK)
    # virt-v2v then changes the guest through the overlay.
    run(["nbdsh", "-u", "nbd+unix:///?socket=" + sock, "-c",
         "h.pwrite(b'converted' * 512, 0)\n"
         "assert h.pread(4608, 0) == b'converted' * 512"])
    assert server.stop() == 0
    assert remote.checksum() == before
    connect = remote.calls("ConnectEx")[0]
    assert connect["readOnly"] == "1"
    # Without -v the debug flags print nothing: no error either.
    assert server.log() == ""


def test_virt_v2v_every_optional_parameter(remote, tmp_path, launch):
    config = tmp_path / "vddk.conf"
    config.write_text("vixDiskLib.nfcAio.Session.BufSizeIn64KB=16\n")
    remote.expect(port="443", nfchostport="902", snapshot="snapshot-7",
                  transports="nbdssl:nbd")
    optional = ["config=" + str(config), "nfchostport=902", "port=443",
                "snapshot=snapshot-7", "transports=nbdssl:nbd",
                "cow-on-read=true"]
    argv, pidfile, sock = virt_v2v_argv(remote, tmp_path, optional)
    launch(vddktool_cmd(*argv), environment(remote), pidfile, sock)
    assert sha256(copy_with_nbdcopy(sock, tmp_path)) == sha256(DISK)
    assert remote.calls("InitEx")[0]["config"] == str(config)


def test_virt_v2v_with_a_bandwidth_limit(remote, tmp_path, launch):
    rate_file = tmp_path / "rate"
    rate_file.write_text("1G\n")
    argv, pidfile, sock = virt_v2v_argv(
        remote, tmp_path, ["rate=1G", "rate-file=" + str(rate_file)],
        rate=True)
    server = launch(vddktool_cmd(*argv), environment(remote), pidfile, sock)
    assert sha256(copy_with_qemu_img(sock, tmp_path)) == sha256(DISK)
    assert server.stop() == 0


def test_kubevirt_cdi(remote, tmp_path, launch):
    remote.expect(server="vcenter.example.com:443")
    pidfile = str(tmp_path / "nbdkit.pid")
    sock = str(tmp_path / "nbdkit.sock")
    argv = ["--foreground", "--readonly", "--exit-with-parent", "-U", sock,
            "--pidfile", pidfile, "--filter=retry", "--filter=cacheextents",
            "vddk", "libdir=" + remote.libdir,
            "server=vcenter.example.com:443",
            "user=administrator@vsphere.local", "password=s3cret",
            "thumbprint=" + THUMBPRINT, "vm=moref=vm-42",
            "file=" + remote.name]
    before = remote.checksum()
    launch(vddktool_cmd(*argv), environment(remote), pidfile, sock)
    assert sha256(copy_with_qemu_img(sock, tmp_path)) == sha256(DISK)
    assert remote.checksum() == before
    # qemu-img asked for the map once per extent; VDDK was asked once.
    assert len(remote.calls("QueryAllocatedBlocks")) == 1


SEED_PARAMETERS = ["libdir=LIBDIR", "server=vcenter.example.com",
                   "user=administrator@vsphere.local", "password=+PASSWORD",
                   "thumbprint=" + THUMBPRINT, "vm=moref=vm-42"]


@pytest.mark.parametrize("filter_words", [
    ["--filter=blocksize", "minblock=512"],
    ["--filter=blocksize", "minblock=512", "maxdata=2M"],
    ["--filter=noextents"]])
def test_the_seed_manual(remote, tmp_path, launch, filter_words):
    remote.limit_remote_requests(2 * MiB)
    pidfile = str(tmp_path / "pid")
    sock = str(tmp_path / "sock")
    words = [word.replace("LIBDIR", remote.libdir).replace(
        "PASSWORD", remote.password_file) for word in SEED_PARAMETERS]
    # nbdkit vddk ... --filter=...: the words as the manual gives them.
    argv = ["-f", "-U", sock, "-P", pidfile, "vddk"] + words + \
        [remote.name] + filter_words
    launch(vddktool_cmd(*argv), environment(remote), pidfile, sock)
    assert sha256(copy_with_qemu_img(sock, tmp_path)) == sha256(DISK)
    sizes = [call.number("count") * 512
             for call in remote.calls("ReadAsync")]
    if "maxdata=2M" in filter_words:
        assert max(sizes) <= 2 * MiB
    if "--filter=noextents" in filter_words:
        assert remote.calls("QueryAllocatedBlocks") == []
