#!/usr/bin/env bash
# Builds the shmrelay_worker Python package and installs it into a virtualenv for the tests of
# tests/tests/python_workers.rs. The last line printed is `SHMRELAY_PYTHON=<venv python>`.
#
#   bash workers/python/ci-setup.sh            # venv in target/pyvenv (or $SHMRELAY_VENV)
#   PYTHON=python3.12 bash workers/python/ci-setup.sh
#
# On a fresh Debian machine python3 may come without venv/ensurepip (python3-venv) or headers
# (python3-dev): they are installed with apt-get when missing (needs root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${SHMRELAY_VENV:-$root/target/pyvenv}
py=${PYTHON:-python3}

if ! command -v "$py" >/dev/null 2>&1 || ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "ci-setup: installing python3, python3-venv and python3-dev with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q python3 python3-venv python3-dev >&2
        py=python3
    else
        echo "ci-setup: $py lacks venv/ensurepip and apt-get is not usable here" >&2
        exit 1
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv" >&2
fi
"$venv/bin/python" -m pip install -q --upgrade pip >&2
"$venv/bin/python" -m pip install -q 'maturin>=1.5,<2' >&2
# The same build as `pip install ./workers/python`, with the venv's maturin (no second
# download into an isolated build environment).
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pip install -q --force-reinstall --no-build-isolation "$here" >&2
"$venv/bin/python" -c 'import shmrelay_worker; print("ci-setup: shmrelay_worker", shmrelay_worker.__version__, "in", shmrelay_worker.__file__)' >&2
echo "SHMRELAY_PYTHON=$venv/bin/python"
