#!/usr/bin/env python3
"""Throughput under TLS: vddktool against nbdkit with the same
certificates, nbdcopy as the client over nbds+unix://.

  read    nbdcopy URI null:   vddktool on a monolithicFlat VMDK, nbdkit
          file on its flat extent
  write   nbdcopy SOURCE URI  into preallocated files (the same layout)

Both servers run with --tls=require and --tls-verify-peer; the client
shows a certificate signed by the same CA (made with openssl, see
tools/testpki.py).  The same servers without TLS run alongside, so the
report also says what TLS costs each.  Runs are interleaved and the
median is reported, with vddktool's ratio to nbdkit (above 1.0,
vddktool is faster).

    python3 bench/bench_tls.py [--size MiB] [--runs N] [--python EXE]
"""

import os
import shutil
import sys
import tempfile

from common import (ROOT, Served, Workspace, bench_arguments, convert,
                    copy_rates, make_source, preallocate)

sys.path.insert(0, os.path.join(ROOT, "tools"))
from testpki import PKI  # noqa: E402

WORKLOADS = ("read", "write")


class Bench(Workspace):
    def __init__(self, work, size_mib, python):
        super().__init__(work, size_mib, python)
        self.pki = PKI(self.path("pki"))
        self.raw = self.path("source.raw")
        make_source(self.raw, size_mib)

    def serve(self, name, program, args, tls):
        sock = self.sock()
        options = ["-f", "-U", sock]
        if tls:
            options += ["--tls=require", "--tls-verify-peer",
                        "--tls-certificates=" + self.pki.server]
        served = Served(name + (" TLS" if tls else ""),
                        program + options + args, sock)
        if tls:
            served.uri = "nbds+unix:///?socket=%s&tls-certificates=%s" % (
                sock, self.pki.client)
        return served

    def servers(self, workload):
        """(vddktool, nbdkit) pairs, with and without TLS.  Each writer
        gets images of its own (vddktool locks an image it writes)."""
        readonly = ["-r"] if workload == "read" else []
        out = []
        for tls in (True, False):
            name = workload if readonly else "%s%s" % (
                workload, "-tls" if tls else "")
            flat = self.path(name + ".vmdk")
            extent = self.path(name + "-flat.vmdk")
            if not os.path.exists(flat):
                convert(self.raw, flat, "monolithicFlat")
            if workload == "write":
                copy = self.path(name + "-nbdkit.raw")
                preallocate(copy, self.size)
                preallocate(extent, self.size)
                extent = copy
            out.append(self.serve("vddktool", [self.python, "-m", "vddktool"],
                                  readonly + ["file=" + flat], tls))
            out.append(self.serve("nbdkit", ["nbdkit"],
                                  readonly + ["file", extent], tls))
        return out

    def run(self, workload, runs):
        return copy_rates(self.servers(workload), workload, self.raw,
                          self.size, runs)


def report(workload, rates):
    ours, theirs = rates["vddktool TLS"], rates["nbdkit TLS"]
    print("%-5s TLS: vddktool %5.0f MiB/s, nbdkit %5.0f MiB/s, ratio %.2f"
          % (workload, ours, theirs, ours / theirs))
    print("%-5s plain: vddktool %5.0f MiB/s, nbdkit %5.0f MiB/s; TLS keeps "
          "%.0f%% of vddktool's speed, %.0f%% of nbdkit's" % (
              "", rates["vddktool"], rates["nbdkit"],
              100 * ours / rates["vddktool"], 100 * theirs / rates["nbdkit"]),
          flush=True)


def main():
    args, _ = bench_arguments(__doc__, WORKLOADS, default_size=512)
    work = tempfile.mkdtemp(prefix="bench-tls-", dir=args.dir)
    try:
        bench = Bench(work, args.size, args.python)
        print("disk: %d MiB, nbdcopy over nbds+unix://, client "
              "certificates, median of %d interleaved runs, vddktool on %s"
              % (args.size, args.runs, args.python))
        for workload in args.only:
            report(workload, bench.run(workload, args.runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
