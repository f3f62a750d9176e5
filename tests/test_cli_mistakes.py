"""Mistakes on the command line, in bulk, and start-up failures that come
after the disk is open: each is one line and exit 1, and the disk is left
as it was found (closed cleanly, never marked as in use)."""

import json
import random
import socket
import sys

import pytest

from conftest import ROOT, need, run, vddktool

# A sparse header's uncleanShutdown byte (vmdk-format.md): 1 while a
# writer has the disk open, 0 once it is closed properly.
UNCLEAN_SHUTDOWN_OFFSET = 72

DISK_SIZE = 1024 * 1024


def assert_one_line_failure(proc):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vddktool: "), lines[0]
    # A bug caught at the top is one line too, but not a user mistake.
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


# Starting one interpreter per command line would cost most of a second
# each; this driver imports vddktool once and runs every command line in a
# forked child, as `python -m vddktool` would (its stderr is the child's
# fd 2, an uncaught exception prints a traceback there).
_DRIVER = r"""
import json, os, sys, traceback
from vddktool.cli import main
results = []
for argv in json.load(sys.stdin):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        status = 99
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 99)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    status = os.waitpid(pid, 0)[1]
    results.append([os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1,
                    b"".join(chunks).decode("utf-8", "replace")])
json.dump(results, sys.stdout)
"""


class Outcome(object):
    def __init__(self, returncode, output):
        self.returncode = returncode
        # The child's stdout and stderr are one pipe: a mistake prints
        # nothing on stdout, so all of it counts as the error output.
        self.stderr = output


def run_command_lines(argvs):
    proc = run([sys.executable, "-c", _DRIVER], input=json.dumps(argvs),
               cwd=ROOT, timeout=120)
    return [Outcome(*result) for result in json.loads(proc.stdout)]


@pytest.fixture
def sparse_disk(tmp_path):
    need("qemu-img")
    path = str(tmp_path / "sparse.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", path, str(DISK_SIZE)])
    return path


def unclean_flag(path):
    with open(path, "rb") as f:
        f.seek(UNCLEAN_SHUTDOWN_OFFSET)
        return f.read(1)[0]


# ---------------------------------------------------------------------------
# a little fuzzing of argv


# Pieces a hurried user might type, right and wrong; each generated argv
# has at least one wrong piece, so every one of them must be refused.
WRONG_PIECES = [
    ["--no-such-option"], ["-Z"], ["-p"], ["-p", "0"], ["-p", "65536"],
    ["-p", "ten"], ["-t", "-3"], ["-t", "many"],
    ["-D", "noflag"], ["-D", "vddk.stats=x"], ["-D", "=1"],
    ["--log=file"], ["--tls=on", "--tls-certificates=/nonexistent"],
    ["--tls=maybe"], ["--handshake-limit=-1"], ["--max-connections=0"],
    ["--filter=cache"],
    ["--oldstyle"], ["-e", "x" * 5000], ["-e", "\udcff"], ["--version=1"],
    ["--run"],
    ["nosuchparam=1"], ["create-size=12Q"], ["create-size=100"],
    ["create-size=-1M"], ["create-type=qcow2"], ["compression=gzip"],
    ["thumbprint="], ["create-hwversion=banana"],
    ["create-adapter-type=usb"], ["single-link=perhaps"], ["vm=42"],
    ["password=-1"], ["password=+/nonexistent/pw"], ["port=0"],
    ["unbuffered=yes please"], ["-U", "-"],
]
# Wrong ways of naming the disk itself.
WRONG_DISKS = [["relative/disk.vmdk"], ["/nonexistent/dir/disk.vmdk"],
               ["file=", "/nonexistent"], []]
RIGHT_PIECES = [["-f"], ["-r"], ["-v"], ["-t", "4"], ["-e", "disk"],
                ["--log=null"], ["-D", "vddk.stats=1"], ["-n"]]


# Options left without their value would take the next word as it.
_VALUE_MISSING = (["-p"], ["--run"])


def malformed_command_lines(seed, count):
    """Right pieces in any order with one wrong piece among them (options
    and parameters may be mixed freely, as with GNU getopt)."""
    chooser = random.Random(seed)
    wrong = [p for p in WRONG_PIECES if p not in _VALUE_MISSING]
    for _ in range(count):
        blocks = chooser.sample(RIGHT_PIECES, chooser.randint(0, 3))
        blocks.insert(chooser.randint(0, len(blocks)), chooser.choice(wrong))
        yield [word for block in blocks for word in block]


@pytest.fixture
def empty_disk(tmp_path):
    """Passes the CLI's checks; only the piece under test can fail."""
    disk = tmp_path / "d.vmdk"
    disk.write_bytes(b"")
    return str(disk)


def named_by(pieces):
    """The option or parameter an error about ``pieces`` must name."""
    return pieces[0].split("=", 1)[0]


def test_each_wrong_piece_is_one_line_naming_it(empty_disk, tmp_path):
    socket_args = ["-U", str(tmp_path / "s")]
    outcomes = run_command_lines([socket_args + [empty_disk] + pieces
                                  for pieces in WRONG_PIECES])
    for pieces, outcome in zip(WRONG_PIECES, outcomes):
        try:
            line = assert_one_line_failure(outcome)
            assert line.startswith("vddktool: %s" % named_by(pieces)), line
        except AssertionError as e:
            raise AssertionError("%r: %s" % (" ".join(pieces), e))


def test_each_wrong_disk_is_one_line_naming_file(tmp_path):
    outcomes = run_command_lines([["-U", str(tmp_path / "s")] + pieces
                                  for pieces in WRONG_DISKS])
    for pieces, outcome in zip(WRONG_DISKS, outcomes):
        line = assert_one_line_failure(outcome)
        assert line.startswith("vddktool: file: "), (pieces, line)


def test_mixed_command_lines_with_a_mistake_are_one_line_each(empty_disk,
                                                             tmp_path):
    argvs = [["-U", str(tmp_path / "s"), empty_disk] + argv
             for argv in malformed_command_lines(seed=2, count=40)]
    for argv, outcome in zip(argvs, run_command_lines(argvs)):
        try:
            assert_one_line_failure(outcome)
        except AssertionError as e:
            raise AssertionError("%s: %s" % (" ".join(argv), e))


def test_the_driver_sees_tracebacks_and_stdout(empty_disk):
    # The checks above are only as good as the driver: it must report what
    # a crash (argv that is not a list) or a success would show.
    version, crash = run_command_lines([["--version"], 42])
    assert version.returncode == 0 and "vddktool" in version.stderr
    assert crash.returncode == 99 and "Traceback" in crash.stderr


# ---------------------------------------------------------------------------
# failures after the disk was opened


def test_port_in_use_closes_the_disk_cleanly(sparse_disk):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = vddktool("-f", "-i", "127.0.0.1", "-p", str(port),
                        sparse_disk, check=False)
    assert_one_line_failure(proc)
    assert unclean_flag(sparse_disk) == 0


def test_unusable_socket_path_closes_a_created_disk_cleanly(tmp_path):
    need("qemu-img")
    taken = tmp_path / "taken"
    taken.write_text("not a socket")
    disk = str(tmp_path / "new.vmdk")
    proc = vddktool("-f", "-U", str(taken), disk, "create=true",
                    "create-size=1M", check=False)
    assert "exists and is not a socket" in assert_one_line_failure(proc)
    assert unclean_flag(disk) == 0
    run(["qemu-img", "check", "-q", disk])


def test_unwritable_pidfile_closes_the_disk_cleanly(sparse_disk, tmp_path):
    proc = vddktool("-U", str(tmp_path / "s"), "-P",
                    str(tmp_path / "missing" / "pid"), sparse_disk,
                    check=False)
    assert "-P:" in assert_one_line_failure(proc)
    assert unclean_flag(sparse_disk) == 0
