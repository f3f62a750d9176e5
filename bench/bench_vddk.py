#!/usr/bin/env python3
"""The VDDK engine's data path, on the fake libvixDiskLib built with -O2,
against nbdkit's vddk plugin on the same library and the native engine
on the same raw data.

The fake pauses each ReadAsync/WriteAsync for a random 0 to 2 ms before
doing it, as a network would (``pause``), or for at most 1 us
(``1us``): the second shows what the data path costs without latency,
and the ratio of the two shows how well the latency is hidden.  By
default the fake starts a thread for each request, which calls back
from there; ``pool`` has four long-lived threads do it instead, as
VDDK's own background threads do (a Python callback pays more on a
thread it has never seen).

Workloads, each with nbdcopy over a Unix socket (one connection: VDDK
does not advertise multi-conn):

  read-pause, read-1us     nbdcopy URI null:
  write-pause, write-1us   nbdcopy SOURCE URI, into a copy of the disk
  read-pool, write-pool    the same with the pause, callbacks from the
                           fake's four long-lived threads
  v2v-read-pause           nbdcopy URI null: through virt-v2v's filters
                           (--filter cow --filter cacheextents --filter
                           retry), on every server alike
  cdi-read-pause           the same through KubeVirt CDI's filters
                           (--filter=retry --filter=cacheextents)
  blocksize-read-pause     the same through the seed's remedy for ESXi
                           running out of memory (--filter=blocksize
                           minblock=512 maxdata=2M)

Servers: ``vddktool vddk`` (backend=vddk), ``nbdkit vddk`` (only with
--nbdkit-vddk PLUGIN.so: Debian does not package it; build it from
nbdkit's source, plugins/vddk), ``vddktool native`` (a monolithicFlat
VMDK over the same raw file).  Runs are interleaved; the median of each
is printed with vddktool vddk's time ratio to the others (above 1.0,
vddktool vddk is faster).

    python3 bench/bench_vddk.py [--size MiB] [--runs N] [--python EXE]
                                [--nbdkit-vddk PATH] [--only WORKLOADS]
"""

import os
import shutil
import sys
import tempfile

from common import (MiB, ROOT, Served, Workspace, bench_arguments, copy_rates,
                    make_source)

sys.path.insert(0, os.path.join(ROOT, "tests"))
from fake_vddk.build import build  # noqa: E402

WORKLOADS = ("read-pause", "read-1us", "write-pause", "write-1us",
             "read-pool", "write-pool", "v2v-read-pause", "cdi-read-pause",
             "blocksize-read-pause")
FILTERS = {
    "v2v": ["--filter=cow", "--filter=cacheextents", "--filter=retry"],
    "cdi": ["--filter=retry", "--filter=cacheextents"],
    "blocksize": ["--filter=blocksize", "minblock=512", "maxdata=2M"],
}
ONE_MICROSECOND = {"FAKE_VDDK_ASYNC_DELAY_US": "1"}
FOUR_COMPLETION_THREADS = {"FAKE_VDDK_COMPLETION_THREADS": "4"}


def flat_descriptor(path, extent, size):
    """A monolithicFlat VMDK descriptor over a raw file."""
    with open(path, "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\n'
                'parentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
                'RW %d FLAT "%s" 0\n\nddb.adapterType = "lsilogic"\n'
                % (size // 512, os.path.basename(extent)))


class Bench(Workspace):
    def __init__(self, work, size_mib, python, nbdkit_vddk):
        super().__init__(work, size_mib, python)
        self.nbdkit_vddk = nbdkit_vddk
        self.libdir = self.path("vddk")
        build(self.libdir, optimize=True)
        self.source = self.path("source.raw")
        make_source(self.source, size_mib)

    def disk_copy(self, name):
        path = self.path(name)
        shutil.copyfile(self.source, path)
        return path

    def servers(self, workload):
        env = ONE_MICROSECOND if workload.endswith("1us") else \
            FOUR_COMPLETION_THREADS if workload.endswith("pool") else {}
        writing = workload.startswith("write")
        mode = [] if writing else ["-r"]
        # nbdkit takes the filters before the plugin, their parameters
        # after it; vddktool either way.
        stack = FILTERS.get(workload.split("-")[0], [])
        mode += [word for word in stack if word.startswith("--")]
        params = [word for word in stack if not word.startswith("--")]
        suffix = workload + ".raw"
        disk = self.disk_copy("vddktool-" + suffix) if writing \
            else self.source
        sock = self.sock()
        served = [Served("vddktool vddk",
                         [self.python, "-m", "vddktool", "-f", "-U", sock]
                         + mode + ["libdir=" + self.libdir, "file=" + disk]
                         + params, sock, env)]
        if self.nbdkit_vddk:
            disk = self.disk_copy("nbdkit-" + suffix) if writing \
                else self.source
            sock = self.sock()
            served.append(Served(
                "nbdkit vddk", ["nbdkit", "-f", "-U", sock] + mode +
                [self.nbdkit_vddk, "libdir=" + self.libdir, "file=" + disk]
                + params, sock, env))
        extent = self.disk_copy("native-" + suffix) if writing \
            else self.source
        vmdk = self.path("native-%s.vmdk" % workload)
        flat_descriptor(vmdk, extent, self.size * MiB)
        sock = self.sock()
        served.append(Served("vddktool native",
                             [self.python, "-m", "vddktool", "-f", "-U",
                              sock] + mode + ["file=" + vmdk] + params,
                             sock))
        return served

    def run(self, workload, runs):
        """[(server name, median seconds)], vddktool vddk first."""
        try:
            rates = copy_rates(self.servers(workload), workload,
                               self.source, self.size, runs)
        finally:
            for name in os.listdir(self.work):
                if name.endswith(workload + ".raw"):
                    os.unlink(self.path(name))
        return [(name, self.size / rate) for name, rate in rates.items()]


def report(workload, size, medians):
    ours = dict(medians)["vddktool vddk"]
    line = ["%-20s" % workload]
    for name, seconds in medians:
        text = "%s %5.2f s %5.0f MiB/s" % (name, seconds, size / seconds)
        if name != "vddktool vddk":
            text += " (ratio %.2f)" % (seconds / ours)
        line.append(text)
    print("   ".join(line), flush=True)


def main():
    args, parser = bench_arguments(__doc__, WORKLOADS, more=lambda p: (
        p.add_argument("--nbdkit-vddk", default=None,
                       help="path of nbdkit-vddk-plugin.so to compare with")))
    workloads = args.only
    if args.nbdkit_vddk and not os.path.exists(args.nbdkit_vddk):
        parser.error("--nbdkit-vddk: %s does not exist" % args.nbdkit_vddk)
    work = tempfile.mkdtemp(prefix="bench-vddk-", dir=args.dir)
    try:
        bench = Bench(work, args.size, args.python, args.nbdkit_vddk)
        print("disk: %d MiB, nbdcopy, median of %d interleaved runs, "
              "vddktool on %s" % (args.size, args.runs, args.python))
        medians = {}
        for workload in workloads:
            medians[workload] = bench.run(workload, args.runs)
            report(workload, args.size, medians[workload])
        for kind in ("read", "write"):
            pause, quick = kind + "-pause", kind + "-1us"
            if pause in medians and quick in medians:
                print("%s: the 0-2 ms pause costs vddktool vddk %.2fx its "
                      "1 us time" % (kind, dict(medians[pause])[
                          "vddktool vddk"] / dict(medians[quick])[
                          "vddktool vddk"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
