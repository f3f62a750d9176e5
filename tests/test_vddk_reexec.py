"""Re-executing with VDDK's directory on LD_LIBRARY_PATH, secrets kept off
the new command line, and the caller's environment given back."""

import os
import sys

import pytest

from conftest import CLIENT_ENV, ROOT, run
from fake_vddk.fixtures import fake_vddk  # noqa: F401
from vddktool import params
from vddktool.vddk import reexec

THUMBPRINT = ":".join(["4F"] * 20)


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# -- the pieces


def test_secrets_become_inherited_pipes():
    env = {}
    argv = reexec.hide_secrets(
        ["python3", "-m", "vddktool", "password=hunter2", "user=root",
         "cookie=c00kie"],
        {"password": params.Secret("hunter2"),
         "cookie": params.Secret("c00kie")}, env)
    assert argv[:3] == ["python3", "-m", "vddktool"] and argv[4] == "user=root"
    assert "hunter2" not in " ".join(argv) and "c00kie" not in " ".join(argv)
    password_fd = int(argv[3][len("password=-"):])
    cookie_fd = int(argv[5][len("cookie=-"):])
    assert env == {"VDDKTOOL_COOKIE_FD": str(cookie_fd),
                   "VDDKTOOL_PASSWORD_FD": str(password_fd)}
    for fd in (password_fd, cookie_fd):
        assert fd > 2 and os.get_inheritable(fd)
    assert read_all(password_fd) == b"hunter2\n"
    assert read_all(cookie_fd) == b"c00kie\n"


def test_password_pipe_reads_back_exactly_even_with_a_newline(monkeypatch):
    # A user's -FD gives its first line only; the re-exec's own pipe,
    # named in the new process's environment, is read whole.
    env = {}
    argv = reexec.hide_secrets(["password=x"],
                               {"password": params.Secret("two\nlines\n")},
                               env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert params.read_password(argv[0].split("=", 1)[1]).value == \
        "two\nlines\n"
    assert "VDDKTOOL_PASSWORD_FD" not in os.environ


def test_cookie_is_recovered_from_its_pipe():
    env = {}
    argv = reexec.hide_secrets(["cookie=abc"],
                               {"cookie": params.Secret("abc")}, env)
    values = {"cookie": params.parse_cookie(argv[0].split("=", 1)[1])}
    reexec.recover_secrets(values, env)
    assert values["cookie"].value == "abc"
    assert "VDDKTOOL_COOKIE_FD" not in env


def test_a_cookie_that_only_looks_like_an_fd_is_left_alone():
    values = {"cookie": params.Secret("-7")}
    reexec.recover_secrets(values, {})
    assert values["cookie"].value == "-7"


def test_reexec_environment_prepends_and_remembers(tmp_path):
    env = reexec.reexec_environment("/opt/vddk/lib64",
                                    {"LD_LIBRARY_PATH": "/usr/local/lib"})
    assert env["LD_LIBRARY_PATH"] == "/opt/vddk/lib64:/usr/local/lib"
    assert env[reexec.ORIGINAL_LD_LIBRARY_PATH] == "/usr/local/lib"
    assert reexec.caller_environment(env) == {
        "LD_LIBRARY_PATH": "/usr/local/lib"}


def test_caller_environment_unsets_what_was_unset():
    env = reexec.reexec_environment("/opt/vddk/lib64", {"HOME": "/root"})
    assert reexec.caller_environment(env) == {"HOME": "/root"}


def test_no_reexec_when_the_directory_is_already_there(tmp_path):
    directory = str(tmp_path)
    assert not reexec.needs_reexec(
        directory, {"LD_LIBRARY_PATH": "/x:%s/" % directory})
    assert reexec.needs_reexec(directory, {"LD_LIBRARY_PATH": "/x"})


def test_no_second_reexec(tmp_path):
    assert not reexec.needs_reexec(str(tmp_path),
                                   {reexec.REEXEC_MARKER: "1"})


# -- the real thing


def _environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(item.decode().split("=", 1)
                    for item in f.read().split(b"\0") if b"=" in item)


def _cmdline_of(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().decode()


@pytest.fixture
def remote_server(fake_vddk, start_server):
    def start(*extra, **env):
        name = fake_vddk.remote_disk()
        fake_vddk.expect(password="very secret")
        merged = dict(fake_vddk.env, **env)
        return start_server(
            "-v", "backend=vddk", "libdir=" + fake_vddk.libdir, name,
            "server=esxi.example.com", "thumbprint=" + THUMBPRINT,
            "user=root", "password=very secret", "vm=moref=2", *extra,
            env=merged)
    return start


def test_server_runs_with_the_library_dir_on_its_path(fake_vddk,
                                                      remote_server):
    server = remote_server(LD_LIBRARY_PATH="/caller/lib")
    environ = _environ_of(server.proc.pid)
    assert environ["LD_LIBRARY_PATH"] == \
        os.path.dirname(fake_vddk.library) + ":/caller/lib"
    assert "re-executing with LD_LIBRARY_PATH" in server.log()


def test_password_is_not_on_the_reexecuted_command_line(remote_server):
    server = remote_server()
    cmdline = _cmdline_of(server.proc.pid)
    assert "very secret" not in cmdline
    assert "\0password=-" in cmdline
    assert run(["nbdinfo", "--size", server.uri]).stdout.strip() == \
        str(1024 * 1024)
    assert "very secret" not in server.log()


def test_run_command_gets_the_callers_library_path(fake_vddk, tmp_path):
    disk = fake_vddk.local_disk()
    env = dict(CLIENT_ENV, **fake_vddk.env)
    env["LD_LIBRARY_PATH"] = "/caller/lib"
    proc = run([sys.executable, "-m", "vddktool", "-U",
                str(tmp_path / "sock"), "backend=vddk",
                "libdir=" + fake_vddk.libdir, disk, "--run",
                "echo \"LD=$LD_LIBRARY_PATH\"; env | grep ^VDDKTOOL_ || :"],
               env=env, cwd=ROOT)
    assert proc.stdout.splitlines() == ["LD=/caller/lib"]


def test_run_command_gets_no_library_path_if_caller_had_none(fake_vddk,
                                                             tmp_path):
    env = dict(CLIENT_ENV, **fake_vddk.env)
    env.pop("LD_LIBRARY_PATH", None)
    proc = run([sys.executable, "-m", "vddktool", "-U",
                str(tmp_path / "sock"), "backend=vddk",
                "libdir=" + fake_vddk.libdir, fake_vddk.local_disk(),
                "--run", "echo \"LD=${LD_LIBRARY_PATH-unset}\""],
               env=env, cwd=ROOT)
    assert proc.stdout.strip() == "LD=unset"


def test_no_reexec_when_the_path_is_already_set(fake_vddk, start_server):
    env = dict(fake_vddk.env,
               LD_LIBRARY_PATH=os.path.dirname(fake_vddk.library))
    server = start_server("-v", "backend=vddk",
                          "libdir=" + fake_vddk.libdir,
                          fake_vddk.local_disk(), env=env)
    assert run(["nbdinfo", "--size", server.uri]).returncode == 0
    assert "re-executing" not in server.log()


def test_socket_activation_survives_the_reexec(fake_vddk, tmp_path):
    import socket
    import subprocess
    sock_path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(8)
    fd = listener.fileno()
    # The launcher moves the socket to fd 3 and becomes vddktool, keeping
    # its PID, as systemd hands sockets over.
    launcher = ("import os, sys\n"
                "os.dup2(int(sys.argv[1]), 3)\n"
                "os.environ.update(LISTEN_PID=str(os.getpid()), "
                "LISTEN_FDS='1')\n"
                "os.execv(sys.argv[2], sys.argv[2:])\n")
    log_path = str(tmp_path / "server.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(fd), sys.executable, "-m",
             "vddktool", "-v", "backend=vddk", "libdir=" + fake_vddk.libdir,
             fake_vddk.local_disk()],
            pass_fds=(fd,), stdout=log_file, stderr=log_file,
            env=dict(CLIENT_ENV, **fake_vddk.env), cwd=ROOT)
    listener.close()
    try:
        size = run(["nbdinfo", "--size", "nbd+unix:///?socket=" + sock_path],
                   timeout=60).stdout.strip()
    finally:
        proc.terminate()
        proc.wait(20)
    with open(log_path) as f:
        log_text = f.read()
    assert size == str(1024 * 1024), log_text
    assert "re-executing" in log_text
