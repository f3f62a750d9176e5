#!/bin/sh
# Render the manual page.  The date and release are fixed arguments so the
# committed vddktool.1 only changes when the POD does (tests compare them).
set -e
cd "$(dirname "$0")"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' ../vddktool/__init__.py)
pod2man --section=1 --center="vddktool" --release="vddktool $version" \
    --date="2026-11-30" --name=VDDKTOOL vddktool.pod > "${1:-vddktool.1}"
