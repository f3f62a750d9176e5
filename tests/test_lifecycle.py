"""The server process: --run, -U -, TCP, -s, socket activation, the daemon
and its pidfile, --exit-with-parent, signals, -r, -e, -t."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import (CLIENT_ENV, ROOT, free_tcp_port, need, run, vddktool,
                      vddktool_cmd)
from vddktool import lifecycle

DISK_SIZE = 4 * 1024 * 1024


@pytest.fixture
def disk(tmp_path):
    """A monolithicFlat VMDK (descriptor + raw extent) made by qemu-img."""
    need("qemu-img")
    path = str(tmp_path / "disk.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         "subformat=monolithicFlat", path, str(DISK_SIZE)])
    return path


def wait_until(predicate, timeout=20, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def process_gone(pid):
    """True once pid has exited (a zombie no one reaps counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def shell_env_report(*names):
    """A --run command printing NAME=VALUE for each variable."""
    return "; ".join('echo "%s=${%s-UNSET}"' % (n, n) for n in names)


def report_lines(text):
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line)


# ---------------------------------------------------------------------------
# --run


def test_run_exit_status_is_the_servers(disk):
    proc = vddktool("-U", "-", disk, "--run", "exit 3", check=False)
    assert proc.returncode == 3, proc.stderr


def test_run_success_exits_zero(disk):
    assert vddktool("-U", "-", disk, "--run", "true").returncode == 0


def test_run_sets_the_unix_socket_variables(disk):
    proc = vddktool("-U", "-", "-e", "my disk", disk, "--run",
                    shell_env_report("uri", "nbd", "unixsocket", "port",
                                     "exportname", "tls"))
    env = report_lines(proc.stdout)
    sock = env["unixsocket"]
    assert sock.startswith("/") and sock.endswith("/socket")
    assert env["uri"] == "nbd+unix:///my%20disk?socket=" + sock
    assert env["nbd"] == env["uri"]
    assert env["port"] == ""
    assert env["exportname"] == "my disk"
    assert env["tls"] == "0"


def listeners_at(unix_path=None, port=None, ipaddr=None):
    listeners = lifecycle.Listeners()
    listeners.unix_path, listeners.port, listeners.ipaddr = \
        unix_path, port, ipaddr
    return listeners


@pytest.mark.parametrize("listeners,export,uri", [
    (listeners_at(unix_path="/run/a b/s"), "",
     "nbd+unix:///?socket=/run/a%20b/s"),
    (listeners_at(port=10809), "", "nbd://localhost"),
    (listeners_at(port=10809), "[ds] a.vmdk",
     "nbd://localhost/%5Bds%5D%20a.vmdk"),
    (listeners_at(port=2000, ipaddr="::1"), "x", "nbd://[::1]:2000/x"),
    (listeners_at(port=2000, ipaddr="10.0.0.1"), "", "nbd://10.0.0.1:2000"),
])
def test_uri_for_run(listeners, export, uri):
    assert lifecycle.nbd_uri(listeners, export) == uri


def test_private_socket_dir_is_removed_on_exit(disk, tmp_path):
    record = tmp_path / "where"
    vddktool("-U", "-", disk, "--run",
             'test -S "$unixsocket" && echo "$unixsocket" > %s' % record)
    sock = record.read_text().strip()
    assert sock, "the command did not see a socket"
    assert not os.path.exists(os.path.dirname(sock))


def test_run_client_reads_the_disk(disk):
    need("nbdinfo")
    proc = vddktool("-U", "-", disk, "--run", 'nbdinfo --size "$uri"')
    assert proc.stdout.strip() == str(DISK_SIZE)


def test_export_name_is_listed_and_served_under_its_uri(disk):
    need("nbdinfo")
    proc = vddktool("-U", "-", "-e", "my disk", disk, "--run",
                    'nbdinfo --size "$uri" && nbdinfo --list --json "$uri"')
    size, listing = proc.stdout.split("\n", 1)
    assert size == str(DISK_SIZE)
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == \
        ["my disk"]


def test_named_unix_socket_is_removed_on_exit(disk, tmp_path):
    sock = str(tmp_path / "named.sock")
    proc = vddktool("-U", sock, disk, "--run",
                    'echo "$uri"; test -S "$unixsocket"')
    assert proc.stdout.strip() == "nbd+unix:///?socket=" + sock
    assert not os.path.exists(sock)


def test_stale_socket_file_is_replaced(disk, tmp_path):
    sock = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock)
    dead.close()
    vddktool("-U", sock, disk, "--run", "true")


def test_socket_path_holding_a_file_is_refused(disk, tmp_path):
    path = tmp_path / "notasocket"
    path.write_text("keep me")
    proc = vddktool("-U", str(path), disk, "--run", "true", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: -U: %s exists and is not a "
                                  "socket" % path)
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM,
                                    signal.SIGUSR1])
def test_killed_run_command_exits_128_plus_the_signal(disk, signum):
    # As nbdkit and the shell report it.
    proc = vddktool("-U", "-", disk, "--run", "kill -%d $$" % signum,
                    check=False)
    assert proc.returncode == 128 + signum
    assert "killed by signal %d" % signum in proc.stderr


# ---------------------------------------------------------------------------
# TCP


def test_tcp_port_and_nbd_uri(disk):
    need("nbdinfo")
    port = free_tcp_port()
    proc = vddktool("-p", str(port), disk, "--run",
                    'echo "$uri $port"; nbdinfo --size "$uri"')
    uri_line, size = proc.stdout.splitlines()
    assert uri_line == "nbd://localhost:%d %d" % (port, port)
    assert size == str(DISK_SIZE)


def test_ipaddr_listens_on_that_address_only(disk):
    need("nbdinfo")
    port = free_tcp_port()
    proc = vddktool("-i", "127.0.0.1", "-p", str(port), disk, "--run",
                    'echo "$uri"; nbdinfo --size nbd://127.0.0.1:%d' % port)
    uri_line, size = proc.stdout.splitlines()
    assert uri_line == "nbd://127.0.0.1:%d" % port
    assert size == str(DISK_SIZE)


def test_port_in_use_is_one_error_line(disk):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = vddktool("-i", "127.0.0.1", "-p", str(port), disk,
                        "--run", "true", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: -i: cannot listen on "
                                  "127.0.0.1 port %d" % port)
    assert len(proc.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------
# -s and socket activation (how libnbd starts servers itself)


def nbdsh(script, timeout=60):
    need("nbdsh")
    return run(["nbdsh", "-c", script], env=CLIENT_ENV, cwd=ROOT,
               timeout=timeout)


def test_single_connection_on_stdio_with_nbdsh(disk):
    command = vddktool_cmd("-s", disk)
    proc = nbdsh("h.connect_command(%r)\n"
                 "h.pwrite(b'hello', 4096)\n"
                 "print(h.get_size(), bytes(h.pread(5, 4096)))" % command)
    assert proc.stdout.strip() == "%d b'hello'" % DISK_SIZE


def test_single_connection_survives_a_print_to_stdout(disk):
    """-v debug output goes to stderr, never into the protocol stream."""
    command = vddktool_cmd("-s", "-v", disk)
    proc = nbdsh("h.connect_command(%r)\nprint(h.get_size())" % command)
    assert proc.stdout.strip() == str(DISK_SIZE)


def test_socket_activation_with_nbdsh(disk):
    command = vddktool_cmd(disk)
    proc = nbdsh("h.connect_systemd_socket_activation(%r)\n"
                 "print(h.get_size())" % command)
    assert proc.stdout.strip() == str(DISK_SIZE)


def test_socket_activation_with_nbdinfo(disk):
    need("nbdinfo")
    proc = run(["nbdinfo", "--size", "--", "["] + vddktool_cmd(disk) + ["]"],
               cwd=ROOT)
    assert proc.stdout.strip() == str(DISK_SIZE)


def test_socket_activation_refuses_listen_options(disk):
    command = vddktool_cmd("-p", "10999", disk)
    proc = run(["nbdsh", "-c", "h.connect_systemd_socket_activation(%r)"
                % command], env=CLIENT_ENV, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "vddktool: -p: cannot be used with socket activation" \
        in proc.stderr


def test_activated_fd_that_is_not_a_socket(disk):
    script = ('export LISTEN_FDS=1 LISTEN_PID=$$; exec 3</dev/null; '
              'exec "$@"')
    proc = run(["sh", "-c", script, "sh"] + vddktool_cmd(disk), cwd=ROOT,
               check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: LISTEN_FDS: file descriptor 3 "
                                  "is not a socket")
    assert len(proc.stderr.splitlines()) == 1


def test_activation_for_another_pid_is_ignored(disk):
    """LISTEN_FDS meant for a parent must not make us serve fd 3."""
    env = dict(CLIENT_ENV, LISTEN_PID="1", LISTEN_FDS="1")
    proc = run(vddktool_cmd("-U", "-", disk, "--run", "true"), env=env,
               cwd=ROOT)
    assert proc.returncode == 0


# ---------------------------------------------------------------------------
# daemon, pidfile, parent


def read_pid(path):
    with open(path) as f:
        return int(f.read())


def test_daemon_writes_its_pid_serves_and_stops_on_sigterm(disk, tmp_path):
    need("nbdinfo")
    pidfile = str(tmp_path / "server.pid")
    sock = str(tmp_path / "daemon.sock")
    launcher = run(vddktool_cmd("-P", pidfile, "-U", sock, disk), cwd=ROOT)
    assert launcher.returncode == 0
    wait_until(lambda: os.path.exists(pidfile), what="the pidfile")
    pid = read_pid(pidfile)
    try:
        assert not process_gone(pid)
        proc = run(["nbdinfo", "--size", "nbd+unix:///?socket=" + sock])
        assert proc.stdout.strip() == str(DISK_SIZE)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), what="the daemon to exit")
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert not os.path.exists(sock)
    assert os.path.exists(pidfile)     # nbdkit leaves it too


def test_daemon_runs_in_its_own_session(disk, tmp_path):
    pidfile = str(tmp_path / "server.pid")
    run(vddktool_cmd("-P", pidfile, "-U", str(tmp_path / "s"), disk),
        cwd=ROOT)
    wait_until(lambda: os.path.exists(pidfile), what="the pidfile")
    pid = read_pid(pidfile)
    try:
        assert os.getsid(pid) == pid
        assert os.readlink("/proc/%d/cwd" % pid) == "/"
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), what="the daemon to exit")


def test_foreground_pidfile_names_the_server(start_server, disk, tmp_path):
    pidfile = str(tmp_path / "fg.pid")
    server = start_server("-P", pidfile, disk)
    wait_until(lambda: os.path.exists(pidfile), what="the pidfile")
    assert read_pid(pidfile) == server.proc.pid


def test_unwritable_pidfile_is_refused_before_forking(disk, tmp_path):
    proc = vddktool("-P", str(tmp_path / "no" / "dir" / "x.pid"), "-U",
                    str(tmp_path / "s"), disk, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: -P: cannot write ")


def test_exit_with_parent(disk, tmp_path):
    pidfile = str(tmp_path / "child.pid")
    server = " ".join("'%s'" % a for a in vddktool_cmd(
        "--exit-with-parent", "-P", pidfile, "-U", str(tmp_path / "s"),
        disk))
    parent = subprocess.Popen(["sh", "-c", server + " & wait"], cwd=ROOT)
    try:
        wait_until(lambda: os.path.exists(pidfile), what="the pidfile")
        pid = read_pid(pidfile)
        assert not process_gone(pid)
        parent.kill()
        parent.wait()
        wait_until(lambda: process_gone(pid), what="the server to follow")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# ---------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM,
                                    signal.SIGQUIT])
def test_signal_stops_cleanly_with_a_client_connected(start_server, disk,
                                                      signum):
    need("nbdsh")
    server = start_server(disk)
    client = subprocess.Popen(
        ["nbdsh", "-u", server.uri, "-c",
         "import sys, time\nprint(h.get_size(), flush=True)\n"
         "time.sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=CLIENT_ENV)
    try:
        assert client.stdout.readline().strip() == str(DISK_SIZE).encode()
        assert server.stop(signum) == 0, server.log()
        assert "Traceback" not in server.log()
    finally:
        client.kill()
        client.wait()


def test_data_written_before_sigterm_is_on_disk(start_server, disk,
                                                tmp_path):
    need("qemu-io")
    server = start_server(disk)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k",
         server.qemu_uri])
    assert server.stop(signal.SIGTERM) == 0
    with open(str(tmp_path / "disk-flat.vmdk"), "rb") as f:
        f.seek(1024 * 1024)
        assert f.read(65536) == b"\x5a" * 65536


# ---------------------------------------------------------------------------
# a parameter given twice


def test_the_last_of_a_repeated_parameter_wins_and_v_says_so(disk,
                                                             tmp_path):
    need("qemu-img")
    other = str(tmp_path / "other.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", other, "3M"])
    proc = vddktool("-v", "-U", "-", "file=" + disk, other,
                    "--run", "nbdinfo --size \"$uri\"", env=CLIENT_ENV)
    assert proc.stdout.strip() == str(3 * 1024 * 1024)
    assert "file= is given more than once: the last one counts" \
        in proc.stderr


# ---------------------------------------------------------------------------
# -r, -e, -t


def test_readonly_refuses_writes(start_server, disk, tmp_path):
    need("qemu-io")
    server = start_server("-r", disk)
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 512",
                server.qemu_uri], check=False)
    assert proc.returncode == 1
    assert "Permission denied" in proc.stderr
    with open(str(tmp_path / "disk-flat.vmdk"), "rb") as f:
        assert f.read(512) == bytes(512)


def test_readonly_export_says_so(start_server, disk):
    server = start_server("-r", disk)
    proc = nbdsh("h.connect_uri(%r)\nprint(h.is_read_only())" % server.uri)
    assert proc.stdout.strip() == "True"


def test_writable_without_readonly(start_server, disk):
    need("qemu-io")
    server = start_server(disk)
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 512", "-c",
                "read -P 7 0 512", server.qemu_uri])
    assert "failed" not in proc.stdout + proc.stderr


def test_threads_0_serves_like_the_default(start_server, disk, tmp_path):
    need("nbdcopy")
    server = start_server("-t", "0", disk)
    out = str(tmp_path / "copy.raw")
    run(["nbdcopy", "--requests=16", server.uri, out])
    assert os.path.getsize(out) == DISK_SIZE


def test_one_thread_still_serves_many_requests(start_server, disk,
                                               tmp_path):
    need("nbdcopy")
    server = start_server("-t", "1", disk)
    out = str(tmp_path / "copy.raw")
    run(["nbdcopy", "--requests=16", server.uri, out])
    assert os.path.getsize(out) == DISK_SIZE


def test_signal_stops_a_single_connection_server(disk):
    server = subprocess.Popen(vddktool_cmd("-s", disk), cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert server.stdout.read(8) == b"NBDMAGIC"
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        for stream in (server.stdin, server.stdout, server.stderr):
            stream.close()


# ---------------------------------------------------------------------------
# bugs must not hang the process

SERVER_BUG = """
import sys
import vddktool.server

def serve_forever(self, listen_sockets):
    raise RuntimeError("injected failure")

vddktool.server.Server.serve_forever = serve_forever
from vddktool.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_unexpected_error_while_serving_is_reported(disk, tmp_path):
    sock = str(tmp_path / "bug.sock")
    proc = run([sys.executable, "-c", SERVER_BUG, "-f", "-U", sock, disk],
               cwd=ROOT, check=False, timeout=20)
    assert proc.returncode == 1
    assert "vddktool: error: internal error: RuntimeError: injected " \
        "failure" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(sock)


# ---------------------------------------------------------------------------
# -v and --log


def test_verbose_messages_go_to_stderr(disk):
    proc = vddktool("-v", "-U", "-", disk, "--run", "true")
    assert "vddktool: debug: listening on Unix socket " in proc.stderr


def test_log_null_silences_even_verbose_messages(disk):
    proc = vddktool("-v", "--log=null", "-U", "-", disk, "--run", "true")
    assert proc.stderr == ""


def test_log_null_still_shows_mistakes(disk):
    proc = vddktool("--log=null", "-U", "-", disk, "colour=red",
                    check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: colour: unknown parameter")


def test_server_stopped_first_still_exits_with_the_commands_status(disk):
    """A signal stops the server; the exit status is still the command's,
    so a script never mistakes an interrupted copy for a finished one."""
    proc = vddktool("-U", "-", disk, "--run",
                    "kill -TERM $PPID; sleep 0.5; exit 7", check=False)
    assert proc.returncode == 7


def test_unix_socket_appears_only_once_listening(start_server, disk, tmp_path):
    """The socket is bound under a temporary name and renamed after
    listen(), so no staging name is left and the final path connects."""
    server = start_server(disk)
    names = sorted(os.listdir(str(tmp_path)))
    assert not [n for n in names if n.endswith("~")], names
    assert os.path.basename(server.sock) in names
    run(["nbdinfo", "--size", server.uri])


def test_sigterm_as_soon_as_the_socket_appears_stops_cleanly(disk,
                                                             tmp_path):
    """The handlers are in place before the socket is: a launcher that
    stops the server the moment it can see it gets a clean exit."""
    for attempt in range(5):
        sock = str(tmp_path / ("s%d" % attempt))
        proc = subprocess.Popen(vddktool_cmd("-f", "-U", sock, disk),
                                cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):   # no sleep: be as quick
                assert proc.poll() is None and time.monotonic() < deadline
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
