"""vddktool with backend=vddk, served to real NBD clients, against the fake
libvixDiskLib: the seed manual's examples and the behaviours around them."""

import hashlib
import os
import subprocess
import sys

import pytest

from conftest import CLIENT_ENV, need, run
from fake_vddk.fixtures import FakeVddk, fake_vddk, make_fake_vddk  # noqa: F401

MiB = 1024 * 1024
SAMPLE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "fake_vddk", "sample-vddk.conf")
THUMBPRINT = "B2:31:BD:DE:9F:DB:9D:E0:78:EF:30:42:8A:41:B0:28:92:93:C8:DD"


def pattern(size, seed=0):
    block = hashlib.sha256(str(seed).encode()).digest() * 16
    return (block * (size // len(block) + 1))[:size]


def serve(start_server, fake, *args):
    return start_server("backend=vddk", "libdir=" + fake.libdir, *args,
                        env=fake.env)


def nbdsh(server, script, export=None, check=True, setup=""):
    """Run ``script`` in nbdsh connected to the server; ``setup`` runs
    before connecting."""
    need("nbdsh")
    connect = setup + ("h.set_export_name(%r)\n" % export
                       if export is not None else "") \
        + "h.connect_unix(%r)\n" % server.sock
    return run(["nbdsh", "-c", connect + script], check=check)


def remote_args(fake, **expect):
    """Remote parameters as in the manual's vCenter example, and the fake
    told to insist on each of them."""
    fake.expect(server="vcenter.example.com", thumbprint=THUMBPRINT,
                user="root", password="vmware", vm="moref=vm-16", **expect)
    return ["user=root", "password=vmware", "server=vcenter.example.com",
            "thumbprint=" + THUMBPRINT, "vm=moref=vm-16"]


# -- the manual's examples


def test_local_file_size_and_copy(fake_vddk, start_server, tmp_path):
    data = pattern(10 * MiB)
    disk = fake_vddk.local_disk("file.vmdk", size=10 * MiB, data=data)
    server = serve(start_server, fake_vddk, disk)
    assert run([need("nbdinfo"), "--size", server.uri]).stdout.strip() \
        == str(10 * MiB)
    out = str(tmp_path / "outputfile.raw")
    run([need("nbdcopy"), server.uri, out])
    with open(out, "rb") as f:
        assert f.read() == data


def test_create_and_fill_with_qemu_img(fake_vddk, tmp_path, start_server):
    need("qemu-img")
    source = str(tmp_path / "input.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", source, "3M"])
    run([need("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5a 1M 64k",
         source])
    output = str(tmp_path / "output.vmdk")
    run(vddktool_args(fake_vddk, "-U", str(tmp_path / "sock"), output,
                      "create=true", "create-size=100M",
                      "--run", "qemu-img convert %s $uri" % source),
        env=dict(CLIENT_ENV, **fake_vddk.env), cwd=_root())
    assert os.path.getsize(output) == 100 * MiB
    with open(output, "rb") as f:
        f.seek(MiB)
        assert f.read(64 * 1024) == b"\x5a" * 64 * 1024
    assert fake_vddk.calls("Create")[0].number("capacity") == 100 * MiB // 512


def vddktool_args(fake, *args):
    return [sys.executable, "-m", "vddktool", "backend=vddk",
            "libdir=" + fake.libdir] + list(args)


def test_esxi_example_with_password_file(fake_vddk, start_server,
                                         tmp_path):
    name = fake_vddk.remote_disk("datastore1", "Fedora/Fedora.vmdk",
                                 size=4 * MiB)
    rootpw = tmp_path / "rootpw"
    rootpw.write_text("esxi secret\n")
    fake_vddk.expect(server="esxi.example.com", user="root",
                     password="esxi secret", vm="moref=2",
                     thumbprint=THUMBPRINT)
    server = serve(start_server, fake_vddk, "user=root",
                   "password=+%s" % rootpw, "server=esxi.example.com",
                   "thumbprint=" + THUMBPRINT, "vm=moref=2", name)
    assert run([need("nbdinfo"), "--size", server.uri]).stdout.strip() \
        == str(4 * MiB)
    assert "esxi secret" not in server.log()


def test_file_prefix_is_optional(fake_vddk, start_server):
    disk = fake_vddk.local_disk(size=3 * MiB)
    server = serve(start_server, fake_vddk, "file=" + disk)
    assert run([need("nbdinfo"), "--size", server.uri]).stdout.strip() \
        == str(3 * MiB)
    assert fake_vddk.calls("Open")[-1]["path"] == disk


def test_vcenter_example(fake_vddk, start_server):
    name = fake_vddk.remote_disk("datastore1", "Fedora/Fedora.vmdk",
                                 data=pattern(MiB), size=MiB)
    server = serve(start_server, fake_vddk, name, *remote_args(fake_vddk))
    out = nbdsh(server, "import hashlib\n"
                "print(hashlib.sha256(h.pread(%d, 0)).hexdigest())" % MiB)
    assert out.stdout.strip() == hashlib.sha256(pattern(MiB)).hexdigest()


def test_export_wildcard_lets_nbdsh_choose(fake_vddk, start_server):
    name = fake_vddk.remote_disk("datastore1", "Fedora/Fedora.vmdk",
                                 size=3 * MiB)
    server = serve(start_server, fake_vddk,
                   r"export=\[datastore1\] Fedora/*.vmdk",
                   *remote_args(fake_vddk))
    out = nbdsh(server, "print(h.get_size())", export=name)
    assert out.stdout.strip() == str(3 * MiB)


def test_export_wildcard_with_url_encoded_uri(fake_vddk, start_server):
    fake_vddk.remote_disk("datastore1", "Fedora/Fedora.vmdk", size=2 * MiB)
    server = serve(start_server, fake_vddk,
                   r"export=\[datastore1\] Fedora/*.vmdk",
                   *remote_args(fake_vddk))
    uri = "nbd+unix:///%%5bdatastore1%%5d%%20Fedora/Fedora.vmdk?socket=%s" \
        % server.sock
    assert run([need("nbdinfo"), "--size", uri]).stdout.strip() \
        == str(2 * MiB)


@pytest.mark.parametrize("export", ["[datastore2] Fedora/Fedora.vmdk",
                                    "[datastore1] Other/Other.vmdk", "",
                                    "[datastore1] Fedora/../Other/"
                                    "Other.vmdk"])
def test_export_wildcard_refuses_other_names(fake_vddk, start_server,
                                             export):
    fake_vddk.remote_disk("datastore2", "Fedora/Fedora.vmdk")
    fake_vddk.remote_disk("datastore1", "Other/Other.vmdk")
    server = serve(start_server, fake_vddk,
                   r"export=\[datastore1\] Fedora/*.vmdk",
                   *remote_args(fake_vddk))
    proc = nbdsh(server, "print(h.get_size())", export=export, check=False)
    assert proc.returncode != 0
    assert not fake_vddk.calls("Open")
    # Still serving after the refusal.
    assert server.proc.poll() is None


# -- every parameter reaches the library


EVERY_PARAMETER = [
    # (argument, recorded call, field, value the fake must have seen)
    ("single-link=true", "Open", "flags", None),
    ("unbuffered=true", "Open", "flags", None),
    ("compression=skipz", "Open", "flags", None),
    ("snapshot=snapshot-12", "ConnectEx", "snapshot", "snapshot-12"),
    ("transports=nbd:nbdssl", "ConnectEx", "transports", "nbd:nbdssl"),
    ("port=4443", "ConnectEx", "port", "4443"),
    ("nfchostport=9020", "ConnectEx", "nfcHostPort", "9020"),
    ("config=" + SAMPLE_CONFIG, "InitEx", "config", SAMPLE_CONFIG),
]


@pytest.fixture(scope="module")
def calls_with_every_parameter(tmp_path_factory):
    """One remote server given every optional parameter at once, asked
    for its size; the calls the fake recorded."""
    fake = FakeVddk(tmp_path_factory.mktemp("every-parameter"))
    name = fake.remote_disk()
    args = remote_args(fake) + [arg for arg, _, _, _ in EVERY_PARAMETER]
    sock = str(fake.disk_dir) + "/sock"
    run(vddktool_args(fake, "-U", sock, name, "vimapiver=6.5", *args)
        + ["--run", "nbdinfo --size $uri"],
        env=dict(CLIENT_ENV, **fake.env), cwd=_root())
    return fake.calls()


@pytest.mark.parametrize("arg,call,field,value", EVERY_PARAMETER,
                         ids=[p[0] for p in EVERY_PARAMETER])
def test_parameter_reaches_the_library(calls_with_every_parameter, arg,
                                       call, field, value):
    seen = [c for c in calls_with_every_parameter if c.name == call][-1]
    if value is None:   # an open flag
        flag = {"single-link": 2, "unbuffered": 1, "compression": 64}[
            arg.split("=")[0]]
        assert seen.number("flags") & flag
    else:
        assert seen[field] == value


def test_vimapiver_is_accepted_and_ignored(calls_with_every_parameter):
    assert [c.name for c in calls_with_every_parameter].count("Open") == 1


def test_readonly_option_opens_read_only(fake_vddk, start_server):
    server = serve(start_server, fake_vddk, "-r", fake_vddk.local_disk())
    out = nbdsh(server, "print(h.is_read_only())")
    assert out.stdout.strip() == "True"
    assert fake_vddk.calls("Open")[-1].number("flags") == 4
    assert fake_vddk.calls("ConnectEx")[-1]["readOnly"] == "1"


def test_cookie_authenticates_with_a_session(fake_vddk, start_server):
    name = fake_vddk.remote_disk()
    fake_vddk.expect(cookie="52a1cafe")
    server = serve(start_server, fake_vddk, name, "server=vc.example.com",
                   "thumbprint=" + THUMBPRINT, "user=admin",
                   "cookie=52a1cafe", "vm=moref=vm-16")
    run([need("nbdinfo"), "--size", server.uri])
    assert fake_vddk.calls("ConnectEx")[-1]["credType"] == "2"
    assert "52a1cafe" not in server.log()


# -- passwords


def test_password_from_inherited_fd(fake_vddk, tmp_path):
    name = fake_vddk.remote_disk()
    args = remote_args(fake_vddk)
    fake_vddk.expect(password="piped secret")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"piped secret\n")
    os.close(write_fd)
    args = [a if not a.startswith("password=") else "password=-%d" % read_fd
            for a in args]
    proc = subprocess.Popen(
        vddktool_args(fake_vddk, "-U", str(tmp_path / "sock"), name, *args)
        + ["--run", "nbdinfo --size $uri"],
        pass_fds=(read_fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(CLIENT_ENV, **fake_vddk.env), cwd=_root())
    os.close(read_fd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.decode().strip() == str(MiB)


def _root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_password_asked_on_the_terminal(fake_vddk, tmp_path):
    import pty
    import select
    import time
    name = fake_vddk.remote_disk()
    args = [a if not a.startswith("password=") else "password=-"
            for a in remote_args(fake_vddk)]
    fake_vddk.expect(password="typed secret")
    out_path = tmp_path / "size.txt"
    argv = vddktool_args(fake_vddk, "-U", str(tmp_path / "sock"), name,
                         *args) + ["--run",
                                   "nbdinfo --size $uri > %s" % out_path]
    env = dict(CLIENT_ENV, **fake_vddk.env)
    pid, master = pty.fork()
    if pid == 0:
        os.chdir(_root())
        os.execve(argv[0], argv, env)
    transcript = b""
    deadline = time.time() + 60
    answered = False
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 1024)
        except OSError:
            break
        if not chunk:
            break
        transcript += chunk
        if not answered and b"assword" in transcript:
            os.write(master, b"typed secret\n")
            answered = True
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert answered, transcript
    assert os.WEXITSTATUS(status) == 0, transcript
    assert out_path.read_text().strip() == str(MiB)
    assert b"typed secret" not in transcript.split(b"assword", 1)[1]


# -- faults and recovery


def test_read_fault_is_eio_and_the_server_keeps_serving(fake_vddk,
                                                        start_server):
    fake_vddk.fail_read_at(MiB // 2)
    server = serve(start_server, fake_vddk,
                   fake_vddk.local_disk(size=MiB, data=pattern(MiB)))
    out = nbdsh(server, """
import errno
try:
    h.pread(4096, %d)
    print("no error")
except nbd.Error as e:
    print("errno", e.errno in (errno.EIO, "EIO"))
print(h.pread(512, 0) == %r)
""" % (MiB // 2, pattern(MiB)[:512]))
    assert out.stdout.split() == ["errno", "True", "True"]
    failures = [line for line in server.log().splitlines()
                if "VixDiskLib_ReadAsync" in line]
    assert len(failures) == 1, failures  # logged once, with the request
    assert "READ at offset %d" % (MiB // 2) in failures[0]
    assert run([need("nbdinfo"), "--size", server.uri]).returncode == 0


def test_write_fault_is_eio(fake_vddk, start_server):
    fake_vddk.fail_write_at(8192)
    server = serve(start_server, fake_vddk, fake_vddk.local_disk(size=MiB))
    out = nbdsh(server, """
import errno
try:
    h.pwrite(bytearray(4096), 8192)
    print("no error")
except nbd.Error as e:
    print("errno", e.errno in (errno.EIO, "EIO"))
h.pwrite(bytearray(4096), 0)
print("ok")
""")
    assert out.stdout.split() == ["errno", "True", "ok"]


def test_fua_write_is_followed_by_a_flush(fake_vddk, start_server):
    disk = fake_vddk.local_disk(size=MiB)
    server = serve(start_server, fake_vddk, disk)
    nbdsh(server, "h.pwrite(b'\\x11' * 4096, 8192, nbd.CMD_FLAG_FUA)")
    names = fake_vddk.call_names()
    write = names.index("WriteAsync")
    assert "Flush" in names[write:]
    with open(disk, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"\x11" * 4096


def test_unwritable_directory_needs_readonly(fake_vddk, start_server,
                                            tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    disk = str(locked / "file.vmdk")
    with open(disk, "wb") as f:
        f.truncate(MiB)
    locked.chmod(0o555)
    try:
        server = serve(start_server, fake_vddk, disk)
        refused = run([need("nbdinfo"), "--size", server.uri], check=False)
        assert refused.returncode != 0
        assert "error: FILE: FileLockCreateEntryDirectory" in server.log()
        readonly = serve(start_server, fake_vddk, "-r", disk)
        assert run([need("nbdinfo"), "--size", readonly.uri]).stdout \
            .strip() == str(MiB)
    finally:
        locked.chmod(0o755)


def test_nfc_out_of_memory_is_an_error_the_user_sees(fake_vddk,
                                                     start_server):
    name = fake_vddk.remote_disk(size=8 * MiB)
    fake_vddk.env["FAKE_VDDK_MAX_REQUEST_BYTES"] = str(2 * MiB)
    server = serve(start_server, fake_vddk, name, *remote_args(fake_vddk))
    out = nbdsh(server, """
try:
    h.pread(4 * 1024 * 1024, 0)
    print("no error")
except nbd.Error:
    print("failed")
print(len(h.pread(1024 * 1024, 0)))
""")
    assert out.stdout.split() == ["failed", str(MiB)]
    assert "error: [NFC ERROR]" in server.log()


def test_unaligned_request_is_refused(fake_vddk, start_server):
    server = serve(start_server, fake_vddk, fake_vddk.local_disk(size=MiB))
    out = nbdsh(server, """
h.set_strict_mode(0)
try:
    h.pread(100, 7)
    print("no error")
except nbd.Error as e:
    print("refused")
print(h.get_block_size(nbd.SIZE_MINIMUM))
""")
    assert out.stdout.split() == ["refused", "512"]


def test_fast_zero_is_not_supported_but_zero_works(fake_vddk,
                                                   start_server):
    disk = fake_vddk.local_disk(size=MiB, data=b"\xff" * MiB)
    server = serve(start_server, fake_vddk, disk)
    out = nbdsh(server, """
try:
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("no error")
except nbd.Error as e:
    print(e.errno in (errno.ENOTSUP, "ENOTSUP"))
h.zero(65536, 0)
print(h.pread(65536, 0) == bytearray(65536))
""", setup="import errno\n")
    assert out.stdout.split() == ["True", "True"]
    with open(disk, "rb") as f:
        assert f.read(65536) == bytes(65536)


def test_extents_reach_nbdinfo_map(fake_vddk, start_server):
    disk = fake_vddk.local_disk(size=4 * MiB)
    with open(disk, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"data" * 1024)
    server = serve(start_server, fake_vddk, disk)
    out = run([need("nbdinfo"), "--map", server.uri]).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    data_rows = [r for r in rows if r[2] == "0"]
    assert data_rows and int(data_rows[0][0]) <= 2 * MiB
    assert any(r[2] == "3" for r in rows)


# -- debug flags and statistics


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """debug_run(*flags) -> stderr of `vddktool -v FLAGS... --run nbdcopy`
    over a 1 MiB disk; each set of flags runs once per module."""
    root = tmp_path_factory.mktemp("debug-runs")
    fake = FakeVddk(root)
    disk = fake.local_disk(size=MiB, data=pattern(MiB))
    runs = {}

    def get(*flags):
        if flags not in runs:
            workdir = root / ("run%d" % len(runs))
            workdir.mkdir()
            runs[flags] = run(
                vddktool_args(fake, "-U", str(workdir / "sock"), disk, "-v")
                + list(flags)
                + ["--run", "nbdcopy $uri %s" % (workdir / "copy.raw")],
                env=dict(CLIENT_ENV, **fake.env), cwd=_root()).stderr
        return runs[flags]
    return get


# The manual's advice for performance problems, word for word.
PERFORMANCE_FLAGS = ("-D", "nbdkit.backend.datapath=0", "-D",
                     "vddk.datapath=0", "-D", "vddk.stats=1")


def test_stats_printed_at_exit(debug_run):
    err = debug_run(*PERFORMANCE_FLAGS)
    assert "VixDiskLib_ReadAsync: sector" not in err
    table = err[err.index("VDDK function stats"):]
    read_row = [line for line in table.splitlines()
                if line.split()[2:3] == ["ReadAsync"]]
    assert read_row and int(read_row[0].split()[-1]) == MiB
    assert "InitEx" in table and "Exit" in table


def test_no_stats_without_the_flag(debug_run):
    assert "VDDK function stats" not in debug_run()


def test_datapath_messages_on_by_default(debug_run):
    assert "VixDiskLib_ReadAsync: sector" in debug_run()


def test_datapath_messages_suppressed(debug_run):
    err = debug_run("-D", "vddk.datapath=0")
    assert "VixDiskLib_ReadAsync: sector" not in err
    assert "transport mode: file" in err


def test_diskinfo_flag(debug_run):
    assert "disk info: capacity 2048 sectors" in \
        debug_run("-D", "vddk.diskinfo=1")
    assert "disk info:" not in debug_run()


def test_extents_flag(debug_run):
    assert "allocated: sector 0" in debug_run("-D", "vddk.extents=1")
    assert "allocated:" not in debug_run()


def test_verbose_logs_the_transport_mode(debug_run):
    assert "transport mode: file" in debug_run()


def test_thumbprint_hint_reaches_the_debug_log(fake_vddk, start_server):
    name = fake_vddk.remote_disk()
    args = remote_args(fake_vddk)
    fake_vddk.expect(thumbprint="AA:" * 19 + "AA")
    server = start_server("-v", "backend=vddk",
                          "libdir=" + fake_vddk.libdir, name, *args,
                          env=fake_vddk.env)
    proc = run([need("nbdinfo"), "--size", server.uri], check=False)
    assert proc.returncode != 0
    assert "Failed to verify SSL certificate: actual thumbprint=" \
        in server.log()


# -- library variants


@pytest.mark.parametrize("major,optional", [(6, False), (7, True),
                                            (8, True), (9, True)])
def test_every_library_version_serves(make_fake_vddk, start_server,
                                      major, optional):
    fake = make_fake_vddk(major=major, optional=optional)
    server = serve(start_server, fake, "-v", fake.local_disk(size=2 * MiB))
    assert run([need("nbdinfo"), "--size", server.uri]).stdout.strip() \
        == str(2 * MiB)
    # The disk is one big hole: only QueryAllocatedBlocks can say so.
    kinds = set(line.split()[2] for line in
                run([need("nbdinfo"), "--map", server.uri]).stdout
                .splitlines() if line.strip())
    assert kinds == ({"3"} if optional else {"0"})
    assert ("no VixDiskLib_QueryAllocatedBlocks" in server.log()) \
        == (not optional)
    assert "libvixDiskLib.so.%d (major version %d)" % (major, major) \
        in server.log()


# -- daemonizing


def test_daemon_initializes_vddk_after_forking(fake_vddk, tmp_path):
    """The fake refuses calls from a process forked after InitEx, as real
    VDDK loses its threads then: a daemon that serves proves the order."""
    import signal
    import time
    pidfile = tmp_path / "vddktool.pid"
    sock = str(tmp_path / "sock")
    data = pattern(MiB)
    disk = fake_vddk.local_disk(size=MiB, data=data)
    run(vddktool_args(fake_vddk, "-U", sock, "-P", str(pidfile), disk),
        env=dict(CLIENT_ENV, **fake_vddk.env), cwd=_root())
    # The daemon writes its pidfile after the parent has returned.
    deadline = time.time() + 20
    while not pidfile.exists() or not pidfile.read_text().endswith("\n"):
        assert time.time() < deadline, "no pidfile"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        out = str(tmp_path / "copy.raw")
        run([need("nbdcopy"), "nbd+unix:///?socket=" + sock, out])
        with open(out, "rb") as f:
            assert f.read() == data
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline and os.path.exists("/proc/%d" % pid):
            time.sleep(0.05)
    assert fake_vddk.call_names()[-1] == "Exit"
