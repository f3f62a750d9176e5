#!/usr/bin/env python3
"""vddktool's data path against `nbdkit file` and qemu-nbd, with nbdcopy.

For one disk of mixed data (random, repeated and zero runs) it times
three workloads, each server serving the same bytes:

  flat-read    nbdcopy URI null:  vddktool on a monolithicFlat VMDK,
               nbdkit file on its flat extent, qemu-nbd on the VMDK
  sparse-read  nbdcopy URI null:  vddktool and qemu-nbd on a
               monolithicSparse VMDK, nbdkit file on a sparse raw file
               (nbdkit has no VMDK reader: the file plugin is the bar)
  write        nbdcopy SOURCE URI into a preallocated flat extent
               (vddktool: flat VMDK, nbdkit and qemu-nbd: raw file)
  write-1conn  the same over one connection (as qemu-img convert writes)
  sparse-write nbdcopy SOURCE URI into a new, empty monolithicSparse VMDK
               (vddktool and qemu-nbd; nbdkit file: a new sparse raw
               file, the bar)
  randread     fio's nbd engine, 4 KiB random reads at queue depth 64 for
               a fixed time on the flat-read servers (IOPS, not MiB/s)

All servers of a workload run at once; the runs are interleaved (server
A, B, C, then A, B, C again...) so a noisy neighbour hurts all alike, and
the page cache is warm for every server.  Prints the median throughput
and vddktool's ratio to each other server: above 1.0, vddktool is faster.

    python3 bench/bench_server.py [--size MiB] [--runs N] [--python EXE]
                                  [--only flat-read,sparse-read,write]
"""

import json
import os
import shutil
import subprocess
import tempfile

from common import (CLIENT_ENV, MiB, Served, Workspace, bench_arguments,
                    convert, copy_rates, interleaved_rates, make_source,
                    preallocate)


WORKLOADS = ("flat-read", "sparse-read", "write", "write-1conn",
             "sparse-write", "randread")
FIO_SECONDS = 10


def fio_iops(uri):
    """4 KiB random reads at queue depth 64 for FIO_SECONDS: IOPS."""
    out = subprocess.check_output(
        ["fio", "--name=randread", "--ioengine=nbd", "--uri=" + uri,
         "--rw=randread", "--bs=4k", "--iodepth=64", "--time_based",
         "--runtime=%d" % FIO_SECONDS, "--output-format=json"],
        env=CLIENT_ENV).decode()
    # fio's nbd engine says "fio: connected to NBD server" first.
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


class Bench(Workspace):
    def __init__(self, work, size_mib, python):
        super().__init__(work, size_mib, python)
        self.raw = self.path("source.raw")
        self.sparse_raw = self.path("sparse.raw")
        make_source(self.raw, size_mib, sparse=False)
        make_source(self.sparse_raw, size_mib, sparse=True)
        self.flat = self.path("flat.vmdk")
        self.sparse = self.path("sparse.vmdk")
        convert(self.raw, self.flat, "monolithicFlat")
        convert(self.raw, self.sparse, "monolithicSparse")

    def vddktool(self, *args):
        sock = self.sock()
        return Served("vddktool", [self.python, "-m", "vddktool", "-f",
                                   "-U", sock] + list(args), sock)

    def nbdkit(self, *args):
        sock = self.sock()
        return Served("nbdkit file", ["nbdkit", "-f", "-U", sock]
                      + list(args), sock)

    def qemu_nbd(self, *args):
        sock = self.sock()
        return Served("qemu-nbd", ["qemu-nbd", "-t", "-e", "16", "-k", sock]
                      + list(args), sock)

    def servers(self, workload):
        if workload in ("flat-read", "randread"):
            return [self.vddktool("-r", "file=" + self.flat),
                    self.nbdkit("-r", "file", self.path("flat-flat.vmdk")),
                    self.qemu_nbd("-r", "-f", "vmdk", self.flat)]
        if workload == "sparse-read":
            return [self.vddktool("-r", "file=" + self.sparse),
                    self.nbdkit("-r", "file", self.sparse_raw),
                    self.qemu_nbd("-r", "-f", "vmdk", self.sparse)]
        if workload == "sparse-write":
            for name in ("sw-vddktool.vmdk", "sw-qemu.vmdk"):
                if os.path.exists(self.path(name)):
                    os.unlink(self.path(name))
                subprocess.check_call(
                    ["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                     "subformat=monolithicSparse", self.path(name),
                     "%dM" % self.size], env=CLIENT_ENV)
            with open(self.path("sw-nbdkit.raw"), "wb") as f:
                f.truncate(self.size * MiB)
            return [self.vddktool("file=" + self.path("sw-vddktool.vmdk")),
                    self.nbdkit("file", self.path("sw-nbdkit.raw")),
                    self.qemu_nbd("-f", "vmdk", "--cache=writeback",
                                  self.path("sw-qemu.vmdk"))]
        target = self.path("write.vmdk")
        convert(self.raw, target, "monolithicFlat")
        for name in ("write-flat.vmdk", "write-nbdkit.raw", "write-qemu.raw"):
            preallocate(self.path(name), self.size)
        return [self.vddktool("file=" + target),
                self.nbdkit("file", self.path("write-nbdkit.raw")),
                self.qemu_nbd("-f", "raw", "--cache=writeback",
                              self.path("write-qemu.raw"))]

    def run(self, workload, runs):
        servers = self.servers(workload)
        if workload == "randread":
            return interleaved_rates(servers, fio_iops, runs, warm_up=False)
        return copy_rates(servers, workload, self.raw, self.size, runs)


def report(workload, rates):
    unit = "IOPS" if workload == "randread" else "MiB/s"
    ours = rates["vddktool"]
    line = ["%-12s vddktool %6.0f %s" % (workload, ours, unit)]
    for name, rate in rates.items():
        if name != "vddktool":
            line.append("%s %6.0f %s (ratio %.2f)"
                        % (name, rate, unit, ours / rate))
    print("   ".join(line), flush=True)


def main():
    args, _ = bench_arguments(__doc__, WORKLOADS)
    workloads = args.only
    work = tempfile.mkdtemp(prefix="bench-server-", dir=args.dir)
    try:
        bench = Bench(work, args.size, args.python)
        print("disk: %d MiB, nbdcopy, median of %d interleaved runs, "
              "vddktool on %s" % (args.size, args.runs, args.python))
        for workload in workloads:
            report(workload, bench.run(workload, args.runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
