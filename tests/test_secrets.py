"""Passwords and session cookies never show: not in log lines (even with -v
and every debug flag), not in errors sent to the user or to clients, not
on the command line or in the environment of the re-executed server."""

import os

import pytest

from conftest import CLIENT_ENV, ROOT, need, run, vddktool_cmd
from fake_vddk.fixtures import fake_vddk  # noqa: F401 (a fixture)

SECRET = "SECRET-LITERAL-7f3a"
THUMBPRINT = ":".join(["4F"] * 20)
EVERY_DEBUG_FLAG = ["-D", "vddk.diskinfo=1", "-D", "vddk.extents=1",
                    "-D", "vddk.datapath=1", "-D", "vddk.stats=1"]


def remote_args(fake, credential):
    return ["-v"] + EVERY_DEBUG_FLAG + [
        "backend=vddk", "libdir=" + fake.libdir, fake.remote_disk(),
        "server=esxi.example.com", "thumbprint=" + THUMBPRINT, "user=root",
        "vm=moref=2", credential]


def process_text(pid, name):
    """/proc/PID/NAME as text, minus the fake library's own settings (the
    test tells it the secret to expect through the environment)."""
    with open("/proc/%d/%s" % (pid, name), "rb") as f:
        items = f.read().decode("utf-8", "replace").split("\0")
    return "\0".join(item for item in items
                      if not item.startswith("FAKE_VDDK_EXPECT_"))


def assert_secret_hidden_in(server):
    need("nbdinfo")
    assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == \
        str(1024 * 1024)
    for where in ("cmdline", "environ"):
        assert SECRET not in process_text(server.proc.pid, where), where
    server.stop()
    log_text = server.log()
    assert "re-executing" in log_text    # the path that must hide it
    assert SECRET not in log_text


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "password"
    path.write_text(SECRET + "\n")
    return str(path)


def test_literal_password(fake_vddk, start_server):
    fake_vddk.expect(password=SECRET)
    server = start_server(*remote_args(fake_vddk, "password=" + SECRET),
                          env=fake_vddk.env)
    assert_secret_hidden_in(server)


def test_password_from_a_file(fake_vddk, start_server, secret_file):
    fake_vddk.expect(password=SECRET)
    server = start_server(
        *remote_args(fake_vddk, "password=+" + secret_file),
        env=fake_vddk.env)
    assert "\0password=+" not in process_text(server.proc.pid, "cmdline")
    assert_secret_hidden_in(server)


def test_session_cookie(fake_vddk, start_server):
    fake_vddk.expect(cookie=SECRET)
    server = start_server(*remote_args(fake_vddk, "cookie=" + SECRET),
                          env=fake_vddk.env)
    assert_secret_hidden_in(server)


def test_wrong_password_errors_do_not_repeat_it(fake_vddk, tmp_path):
    need("nbdinfo")
    fake_vddk.expect(password="the right one")
    proc = run(vddktool_cmd("-U", str(tmp_path / "sock"),
                            *remote_args(fake_vddk, "password=" + SECRET))
               + ["--run", "nbdinfo --size \"$uri\""],
               check=False, env=dict(CLIENT_ENV, **fake_vddk.env), cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "password" in output          # the failure was explained...
    assert SECRET not in output, output  # ...without quoting it


@pytest.mark.parametrize("mistake", [
    "thumbprint=",             # refused while parsing, after password=
    "port=seventy",
    "server=",
])
def test_start_up_mistakes_do_not_repeat_it(fake_vddk, mistake, tmp_path):
    args = remote_args(fake_vddk, "password=" + SECRET)
    args = [a for a in args if a.split("=")[0] != mistake.split("=")[0]]
    proc = run(vddktool_cmd("-U", str(tmp_path / "sock"), *args + [mistake]),
               check=False, env=dict(CLIENT_ENV, **fake_vddk.env), cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: ")
    assert SECRET not in proc.stdout + proc.stderr


def test_debug_output_of_a_password_pipe_stays_clean(fake_vddk, tmp_path):
    # -FD: the secret comes through a pipe the caller made.
    import subprocess
    need("nbdinfo")
    fake_vddk.expect(password=SECRET)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, (SECRET + "\n").encode())
    os.close(write_fd)
    argv = vddktool_cmd("-U", str(tmp_path / "sock"),
                        *remote_args(fake_vddk, "password=-%d" % read_fd)) \
        + ["--run", "nbdinfo --size \"$uri\""]
    proc = subprocess.Popen(argv, pass_fds=(read_fd,), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(CLIENT_ENV, **fake_vddk.env))
    os.close(read_fd)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert SECRET.encode() not in out + err
