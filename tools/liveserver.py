"""A vddktool server process for the tools (fuzz, load): started on a
Unix socket, watched (threads, descriptors), stopped."""

import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A live server that says nothing for this long is hung.
HANG_SECONDS = 30


class LiveServer(object):
    """python3 -m vddktool -f -U WORK/server.sock ARGS, its log in
    WORK/server.log."""

    def __init__(self, work, python, args):
        self.sock = os.path.join(work, "server.sock")
        self.log_path = os.path.join(work, "server.log")
        argv = [python, "-m", "vddktool", "-f", "-U", self.sock] + list(args)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT,
                                         stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start: see "
                                 + self.log_path)
            time.sleep(0.05)

    def counts(self):
        pid = self.proc.pid
        return (len(os.listdir("/proc/%d/task" % pid)),
                len(os.listdir("/proc/%d/fd" % pid)))

    def quiet_counts(self, idle_threads=2, timeout=HANG_SECONDS):
        """Threads and descriptors once no client is left: the main
        thread and the handshake limit's remain."""
        deadline = time.monotonic() + timeout
        while self.counts()[0] != idle_threads:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return self.counts()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
