"""Command lines written for nbdkit's VDDK plugin behave the same here:
the thumbprint procedure of the manual, relative libdir= and config= in a
daemon, and open failures that name the disk.  Against the fake VDDK."""

import os
import sys

import pytest

from conftest import CLIENT_ENV, ROOT, need, run
from fake_vddk.fixtures import fake_vddk  # noqa: F401

REAL_THUMBPRINT = ("B2:31:BD:DE:9F:DB:9D:E0:78:EF:30:42:8A:41:B0:28:92:93:"
                   "C8:DD")
REAL_SHA256 = ":".join(["5C"] * 32)


def remote_command(fake, thumbprint, *options):
    """vddktool run as the manual's THUMBPRINTS section does: a remote
    disk, -f, --run with a client; the fake's server has REAL_THUMBPRINT
    unless the test says otherwise."""
    name = fake.remote_disk(size=1024 * 1024)
    fake.env.setdefault("FAKE_VDDK_EXPECT_THUMBPRINT", REAL_THUMBPRINT)
    return [sys.executable, "-m", "vddktool", "-f", "-U", "-"] \
        + list(options) + [
            "backend=vddk", "libdir=" + fake.libdir,
            "server=esxi.example.com", "user=root", "password=vmware",
            "vm=moref=2", "thumbprint=" + thumbprint, name,
            "--run", "%s --size \"$uri\"" % need("nbdinfo")]


def run_remote(fake, thumbprint, *options):
    return run(remote_command(fake, thumbprint, *options), check=False,
               env=dict(CLIENT_ENV, **fake.env), cwd=ROOT)


# -- 1. the thumbprint procedure


def test_wrong_thumbprint_on_purpose_reveals_the_real_one(fake_vddk):
    # The manual's trick, word for word: thumbprint=12 with -v.
    proc = run_remote(fake_vddk, "12", "-v")
    assert proc.returncode != 0
    assert ("actual thumbprint=%s expected=12" % REAL_THUMBPRINT) \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fake_vddk.calls("ConnectEx")[-1]["thumbPrint"] == "12"


def test_the_real_thumbprint_reaches_the_user_without_v(fake_vddk):
    proc = run_remote(fake_vddk, "12")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines()
              if "actual thumbprint=" in line]
    assert len(errors) == 1, proc.stderr
    assert REAL_THUMBPRINT in errors[0]
    assert "vmware" not in proc.stderr


def test_a_value_unlike_a_thumbprint_is_noted_under_v(fake_vddk):
    proc = run_remote(fake_vddk, "12", "-v")
    # Once, although the process starts again for VDDK.
    assert proc.stderr.count(
        "thumbprint=12 is not a SHA-1 or SHA-256 fingerprint") == 1


@pytest.mark.parametrize("given", [
    REAL_THUMBPRINT.replace(":", ""), REAL_THUMBPRINT.lower(), REAL_SHA256,
    REAL_SHA256.replace(":", "")])
def test_other_thumbprint_forms_reach_vddk_as_given(fake_vddk, given):
    fake_vddk.expect(thumbprint=given)
    proc = run_remote(fake_vddk, given, "-v")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(1024 * 1024)
    assert fake_vddk.calls("ConnectEx")[-1]["thumbPrint"] == given
    assert "is not a SHA-1 or SHA-256" not in proc.stderr


def test_the_right_thumbprint_connects(fake_vddk):
    proc = run_remote(fake_vddk, REAL_THUMBPRINT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(1024 * 1024)


def test_an_empty_thumbprint_is_refused(fake_vddk):
    proc = run_remote(fake_vddk, "")
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: thumbprint: '' is empty")
    assert len(proc.stderr.splitlines()) == 1


# -- 3. password=-FD from a launcher that keeps the pipe open


def test_password_fd_from_a_pipe_left_open(fake_vddk):
    import subprocess
    fake_vddk.expect(password="secret")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"secret\n\n")
    argv = [a if a != "password=vmware" else "password=-%d" % read_fd
            for a in remote_command(fake_vddk, REAL_THUMBPRINT)]
    proc = subprocess.Popen(argv, pass_fds=(read_fd,), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(CLIENT_ENV, **fake_vddk.env))
    os.close(read_fd)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the server waited for the pipe to close")
    finally:
        os.close(write_fd)
    assert proc.returncode == 0, err
    assert out.decode().strip() == str(1024 * 1024)
    assert fake_vddk.calls("ConnectEx")[-1]["password"] == "secret"


# -- messages about the command line, once despite the re-exec


def test_the_restart_for_vddk_does_not_repeat_command_line_notes(fake_vddk):
    disk = fake_vddk.local_disk()
    proc = run([sys.executable, "-m", "vddktool", "-v", "-U", "-", "-D",
                "vddk.no-such=1", "backend=vddk", "libdir=" + fake_vddk.libdir,
                disk, disk, "--run", "true"],
               check=False, env=dict(CLIENT_ENV, **fake_vddk.env), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "re-executing with LD_LIBRARY_PATH" in proc.stderr
    assert proc.stderr.count("-D vddk.no-such: no such debug flag") == 1
    assert proc.stderr.count("file= is given more than once") == 1


def test_force_share_is_a_native_engine_matter(fake_vddk):
    disk = fake_vddk.local_disk()
    proc = run([sys.executable, "-m", "vddktool", "-U", "-", "-r",
                "force-share=true", "backend=vddk",
                "libdir=" + fake_vddk.libdir, disk, "--run", "true"],
               check=False, env=dict(CLIENT_ENV, **fake_vddk.env), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: force-share: ignored by the VDDK "
                             "engine") == 1, proc.stderr


# -- 8. open failures name the disk


def test_open_failure_names_the_disk(fake_vddk):
    fake_vddk.fail_open()
    proc = run_remote(fake_vddk, REAL_THUMBPRINT)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines()
             if "VixDiskLib_Open" in line]
    assert len(lines) == 1, proc.stderr
    assert "cannot open [datastore1] vm/vm.vmdk: VixDiskLib_Open" in lines[0]


# -- 4. relative libdir= and config= in a daemon


def daemon_with_relative_paths(fake, tmp_path, config_name):
    """Start a daemon (no -f) from the fake's root directory with
    libdir= and config= relative to it; stop it again."""
    root = os.path.dirname(fake.libdir)
    disk = fake.local_disk(size=1024 * 1024)
    sock = str(tmp_path / "sock")
    pidfile = str(tmp_path / "pid")
    proc = run([sys.executable, "-m", "vddktool", "-U", sock, "-P", pidfile,
                "backend=vddk", "libdir=" + os.path.basename(fake.libdir),
                "config=" + config_name, disk],
               check=False, env=dict(os.environ, PYTHONPATH=ROOT, **fake.env),
               cwd=root)
    return proc, sock, pidfile


def stop_daemon(pidfile):
    import signal
    import time
    with open(pidfile) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_relative_libdir_and_config_are_absolute_in_the_daemon(fake_vddk,
                                                               tmp_path):
    root = os.path.dirname(fake_vddk.libdir)
    with open(os.path.join(root, "vddk.conf"), "w") as f:
        f.write("vixDiskLib.transport.LogLevel = 1\n")
    proc, sock, pidfile = daemon_with_relative_paths(fake_vddk, tmp_path,
                                                     "vddk.conf")
    assert proc.returncode == 0, proc.stderr
    try:
        size = run([need("nbdinfo"), "--size",
                    "nbd+unix:///?socket=" + sock])
        assert size.stdout.strip() == str(1024 * 1024)
    finally:
        stop_daemon(pidfile)
    init = fake_vddk.calls("InitEx")[-1]
    assert init["libdir"] == fake_vddk.libdir
    assert init["config"] == os.path.join(root, "vddk.conf")


def test_a_missing_config_file_is_refused_with_its_path(fake_vddk,
                                                       tmp_path):
    proc, _, _ = daemon_with_relative_paths(fake_vddk, tmp_path,
                                            "no-such.conf")
    assert proc.returncode == 1
    missing = os.path.join(os.path.dirname(fake_vddk.libdir), "no-such.conf")
    assert proc.stderr == ("vddktool: config: %s does not exist (name an "
                           "existing VDDK configuration file, or drop "
                           "config=)\n" % missing)
    assert fake_vddk.calls("InitEx") == []
