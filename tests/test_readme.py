"""The README's first command does the main job on a fresh machine: it
creates a disk and serves it with the native engine, no VDDK needed."""

import os
import re
import shlex
import signal
import subprocess

from conftest import ROOT, run, vddktool_cmd, wait_for_socket


def readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_second_command_is_the_ci_test_command():
    assert readme_commands()[1].strip() == "tests/run-matrix.sh"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "tests/run-matrix.sh" in f.read()


def test_first_command_creates_and_serves_a_disk(tmp_path):
    words = shlex.split(readme_commands()[0].replace("\\\n", " "))
    assert words[:3] == ["python3", "-m", "vddktool"]
    # The same command, on a private disk path and a private socket instead
    # of the well-known TCP port (which another test may hold).
    disk = str(tmp_path / "disk.vmdk")
    sock = str(tmp_path / "readme.sock")
    args = [disk if w.startswith("/var/tmp/") else w for w in words[3:]]
    port = args.index("-p")
    args[port:port + 2] = ["-U", sock]
    log_path = str(tmp_path / "server.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(vddktool_cmd(*args), cwd=ROOT,
                                stdout=log_file, stderr=log_file)
    try:
        wait_for_socket(sock, proc, log_path)
        out = run(["nbdinfo", "--json", "nbd+unix:///?socket=" + sock]).stdout
        assert '"export-size": %d' % (10 << 30) in out
        with open(disk, "rb") as f:
            assert f.read(4) == b"KDMV"  # a monolithic sparse VMDK
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
