#!/usr/bin/env bash
# Run the whole test suite on every CPython from 3.6 to 3.13 that pyenv
# holds (or on python3 alone when there is no pyenv), installing first what
# the tests need: Debian's NBD clients and qemu tools, gcc, and pytest in one
# venv per interpreter (.venvs/pyX.Y).  Extra arguments go to pytest.
#
#   tests/run-matrix.sh                 # everything
#   PYTHONS="3.6 3.13" tests/run-matrix.sh -k manual
set -u
cd "$(dirname "$0")/.."
top=$PWD

# --- system packages -------------------------------------------------------
debs="libnbd-bin python3-libnbd qemu-utils nbdkit gcc libc6-dev binutils perl"
missing=""
for p in $debs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
        missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing \
        >/dev/null || { echo "apt-get install failed"; exit 1; }
fi

# --- interpreters ----------------------------------------------------------
# pyenv's versions directory, read directly: CI may not have pyenv on PATH.
pyenv_versions=${PYENV_ROOT:-$HOME/.pyenv}/versions
pythons=()
if [ -n "${PYTHONS:-}" ]; then
    for v in $PYTHONS; do pythons+=("$v"); done
elif [ -d "$pyenv_versions" ]; then
    for v in $(ls "$pyenv_versions" | grep -E '^3\.(6|7|8|9|10|11|12|13)\.[0-9]+$' | sort -V); do
        pythons+=("${v%.*}")
    done
fi
[ ${#pythons[@]} -gt 0 ] || pythons=("$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')")

interpreter() {  # X.Y -> path of that CPython
    local v=$1 full
    if [ -d "$pyenv_versions" ]; then
        full=$(ls "$pyenv_versions" | grep -E "^${v//./\\.}\.[0-9]+$" | sort -V | tail -1)
        [ -n "$full" ] && { echo "$pyenv_versions/$full/bin/python$v"; return; }
    fi
    command -v "python$v"
}

make_venv() {  # X.Y -> venv dir with pytest and hypothesis
    local v=$1 dir=$top/.venvs/py$1 py
    if [ ! -x "$dir/bin/pytest" ]; then
        py=$(interpreter "$v") || { echo "no python$v" >&2; return 1; }
        "$py" -m venv "$dir" || return 1
        if [ "$v" = 3.6 ]; then
            # 3.6's bundled pip would pick wheels it cannot use.
            "$dir/bin/pip" install -q -U 'pip<22' &&
            "$dir/bin/pip" install -q 'pytest<7.1' || return 1
        else
            "$dir/bin/pip" install -q -U pip >/dev/null 2>&1
            "$dir/bin/pip" install -q pytest || return 1
        fi
    fi
    # Checked apart from pytest: venvs made before the property tests came
    # have pytest alone.  6.31 is the last hypothesis for Python 3.6.
    if ! "$dir/bin/python" -c "import hypothesis" 2>/dev/null; then
        local pin=hypothesis
        [ "$v" = 3.6 ] && pin='hypothesis<6.32'
        "$dir/bin/pip" install -q "$pin" || return 1
    fi
    echo "$dir"
}

# The suite mostly waits on servers and clients, so two interpreters run at
# a time (JOBS=1 for one at a time); each one's output is shown whole.
results=$(mktemp -d)
jobs=${JOBS:-2}
run_one() {  # X.Y [pytest args]
    local v=$1; shift
    local venv
    venv=$(make_venv "$v") || { echo "cannot set up Python $v"; return 1; }
    "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --basetemp="$results/tmp-py$v" --junitxml="$results/py$v.xml" "$@"
}
# venvs first, one at a time (pip is not safe to run twice at once).
for v in "${pythons[@]}"; do make_venv "$v" >/dev/null || echo "cannot set up Python $v"; done
status=0
running=0
for v in "${pythons[@]}"; do
    ( run_one "$v" "$@" > "$results/py$v.log" 2>&1; echo $? > "$results/py$v.rc" ) &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then wait -n 2>/dev/null || wait; running=$((running - 1)); fi
done
wait
for v in "${pythons[@]}"; do
    echo "=== Python $v ==="
    cat "$results/py$v.log"
    [ "$(cat "$results/py$v.rc" 2>/dev/null)" = 0 ] || status=1
done

# One closing line for the whole matrix.
python3 - "$results" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for path in glob.glob(sys.argv[1] + "/*.xml"):
    root = ET.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else root):
        t, f, e, s = (int(suite.get(k, 0)) for k in
                      ("tests", "failures", "errors", "skipped"))
        passed += t - f - e - s
        failed += f + e
        skipped += s
print("matrix: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
PY
rm -rf "$results"
exit $status
