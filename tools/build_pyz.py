#!/usr/bin/env python3
"""Build vddktool.pyz: the one file administrators copy to a locked-down host.

    python3 tools/build_pyz.py [-o vddktool.pyz]

The archive holds the vddktool package (sources only, no caches) and a
top-level __main__.py, and runs with any Python 3.6 or newer:
``python3 vddktool.pyz ARGS``.  Works on Python 3.6 too, where zipapp has
no filter argument, by staging a clean copy first.
"""

import argparse
import os
import shutil
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAIN = """\
import sys
from vddktool.cli import main
sys.exit(main())
"""


def build(target):
    staging = tempfile.mkdtemp(prefix="vddktool-pyz-")
    try:
        shutil.copytree(os.path.join(ROOT, "vddktool"),
                        os.path.join(staging, "vddktool"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with open(os.path.join(staging, "__main__.py"), "w") as f:
            f.write(MAIN)
        zipapp.create_archive(staging, target,
                              interpreter="/usr/bin/env python3")
    finally:
        shutil.rmtree(staging)
    return target


def main():
    parser = argparse.ArgumentParser(description="Build vddktool.pyz")
    parser.add_argument("-o", "--output",
                        default=os.path.join(ROOT, "vddktool.pyz"))
    args = parser.parse_args()
    print(build(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
