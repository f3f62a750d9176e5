#!/usr/bin/env python3
"""Read throughput of the native engine against qemu-nbd and nbdkit.

Builds one disk of mixed data (random, repeated and zero runs), stores it
as a monolithicSparse and a monolithicFlat VMDK, serves each with
vddktool, qemu-nbd and (flat data only) `nbdkit file`, and times
`nbdcopy URI null:` (the median of several runs; the page cache is warm
for every server alike).  Prints MiB/s and vddktool's ratio to each other
server: above 1.0 means vddktool is faster.

    python3 bench/bench_native_read.py [--size 1024] [--runs 5]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import CLIENT_ENV, Served, convert, make_source



def time_copy(uri, runs):
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.check_call(["nbdcopy", uri, "null:"], env=CLIENT_ENV)
        times.append(time.monotonic() - start)
    return statistics.median(times)


def servers(kind, vmdk, flat_data, sock):
    yield "vddktool", [sys.executable, "-m", "vddktool", "-r", "-f", "-U",
                       sock, "file=" + vmdk]
    yield "qemu-nbd", ["qemu-nbd", "-r", "-t", "-e", "16", "-f", "vmdk",
                       "-k", sock, vmdk]
    if kind == "flat" and shutil.which("nbdkit", path=CLIENT_ENV["PATH"]):
        yield "nbdkit file", ["nbdkit", "-r", "-f", "-U", sock, "file",
                              flat_data]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None,
                        help="where to put the images (default: a temp dir)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-native-", dir=args.dir)
    try:
        source = os.path.join(work, "source.raw")
        make_source(source, args.size)
        images = {"sparse": os.path.join(work, "sparse.vmdk"),
                  "flat": os.path.join(work, "flat.vmdk")}
        convert(source, images["sparse"], "monolithicSparse")
        convert(source, images["flat"], "monolithicFlat")
        flat_data = os.path.join(work, "flat-flat.vmdk")
        sock = os.path.join(work, "nbd.sock")
        print("disk: %d MiB, nbdcopy to null:, median of %d runs"
              % (args.size, args.runs))
        for kind in ("sparse", "flat"):
            results = {}
            for name, argv in servers(kind, images[kind], flat_data, sock):
                with Served(name, argv, sock) as uri:
                    time_copy(uri, 1)   # warm the page cache
                    results[name] = args.size / time_copy(uri, args.runs)
            ours = results["vddktool"]
            line = ["%-6s vddktool %7.0f MiB/s" % (kind, ours)]
            for name, rate in results.items():
                if name != "vddktool":
                    line.append("%s %7.0f MiB/s (ratio %.2f)"
                                % (name, rate, ours / rate))
            print("   ".join(line))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
