"""--log=syslog, and the daemon's default of syslog.

Python's syslog module hands messages to libc, which writes to /dev/log;
test machines often have no syslog daemon and no /dev/log, and libc's path
cannot be moved.  So the program runs under a launcher that puts a
recording stand-in for the syslog module in place before vddktool is
imported: what is checked is everything vddktool decides (which messages,
which priority, the identity, that nothing goes to stderr), not libc."""

import json
import os
import signal
import sys

import pytest

from conftest import CLIENT_ENV, ROOT, need, run
from test_lifecycle import process_gone, read_pid, wait_until

# The stand-in records each call as one JSON line in $SYSLOG_RECORD.
_LAUNCHER = r"""
import json, os, sys, types
record_path = os.environ["SYSLOG_RECORD"]
def _record(*call):
    with open(record_path, "a") as f:
        f.write(json.dumps(call) + "\n")
fake = types.ModuleType("syslog")
for name, value in (("LOG_PID", 1), ("LOG_DAEMON", 3 << 3),
                    ("LOG_ERR", 3), ("LOG_WARNING", 4), ("LOG_INFO", 6),
                    ("LOG_DEBUG", 7)):
    setattr(fake, name, value)
fake.openlog = lambda ident, option=0, facility=0: _record(
    "openlog", ident, option, facility, os.getpid())
fake.syslog = lambda priority, message: _record(
    "syslog", priority, message, os.getpid())
fake.closelog = lambda: _record("closelog")
sys.modules["syslog"] = fake
from vddktool.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def disk(tmp_path):
    need("qemu-img")
    path = str(tmp_path / "disk.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", path, "1M"])
    return path


def launch(tmp_path, *args, **kwargs):
    record = str(tmp_path / "syslog.jsonl")
    env = dict(CLIENT_ENV, SYSLOG_RECORD=record)
    proc = run([sys.executable, "-c", _LAUNCHER] + list(args), env=env,
               cwd=ROOT, **kwargs)
    return proc, record


def recorded(record):
    if not os.path.exists(record):
        return []
    with open(record) as f:
        return [json.loads(line) for line in f]


def messages(calls):
    return [(call[1], call[2]) for call in calls if call[0] == "syslog"]


def test_log_syslog_sends_everything_there_and_nothing_to_stderr(
        tmp_path, disk):
    proc, record = launch(tmp_path, "--log=syslog", "-v", "-U",
                          str(tmp_path / "sock"), disk, "--run",
                          "nbdinfo --size \"$uri\" >/dev/null")
    assert proc.stderr == ""
    calls = recorded(record)
    assert calls[0][:4] == ["openlog", "vddktool", 1, 3 << 3]
    sent = messages(calls)
    assert any(priority == 7 and text.startswith("debug: listening on")
               for priority, text in sent), sent
    assert any("new connection" in text for _, text in sent), sent


# A client that negotiates with EXPORT_NAME, then sends a request with a
# bad magic: the server logs an error and hangs up.
_BAD_MAGIC_CLIENT = (
    "import os, socket, struct\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.connect(os.environ['unixsocket'])\n"
    "s.recv(18, socket.MSG_WAITALL)\n"
    "s.sendall(struct.pack('>IQII', 3, 0x49484156454F5054, 1, 0))\n"
    "s.recv(10, socket.MSG_WAITALL)\n"
    "s.sendall(b'\\xff' * 28)\n"
    "s.recv(1)\n")


def test_log_syslog_without_verbose_sends_errors_only(tmp_path, disk):
    script = tmp_path / "client.py"
    script.write_text(_BAD_MAGIC_CLIENT)
    proc, record = launch(tmp_path, "--log=syslog", "-U",
                          str(tmp_path / "sock"), disk, "--run",
                          "%s %s" % (sys.executable, script))
    assert proc.stderr == ""
    sent = messages(recorded(record))
    assert [priority for priority, _ in sent] == [3], sent
    assert sent[0][1].startswith("error: ") and "bad request magic" in \
        sent[0][1]


def test_mistakes_still_reach_the_terminal_with_log_syslog(tmp_path):
    proc, record = launch(tmp_path, "--log=syslog", "relative.vmdk",
                          check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vddktool: file: ")
    assert messages(recorded(record)) == []


def test_daemon_logs_to_syslog_by_default(tmp_path, disk):
    need("nbdinfo")
    pidfile = str(tmp_path / "pid")
    sock = str(tmp_path / "sock")
    proc, record = launch(tmp_path, "-v", "-P", pidfile, "-U", sock, disk)
    wait_until(lambda: os.path.exists(pidfile), what="the pidfile")
    pid = read_pid(pidfile)
    try:
        run(["nbdinfo", "--size", "nbd+unix:///?socket=" + sock])
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: process_gone(pid), what="the daemon to stop")
    from_daemon = [call for call in recorded(record)
                   if call[0] == "syslog" and call[-1] == pid]
    assert any("new connection" in call[2] for call in from_daemon), \
        recorded(record)
    # Until it forks, the terminal is still there and gets the messages.
    assert "listening on" in proc.stderr
    assert "new connection" not in proc.stderr
