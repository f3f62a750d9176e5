"""python3 -m vddktool (and the zipapp's entry point)."""

import sys

from vddktool.cli import main

if __name__ == "__main__":
    sys.exit(main())
