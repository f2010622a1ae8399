#!/usr/bin/env bash
# Create the project's virtual environment; on a fresh Debian machine the venv module may be
# missing (package python3-venv), so install it when we are allowed to.
set -euo pipefail
python=${1:?python interpreter}
venv=${2:?venv directory}
if [ -z "$python" ]; then
    echo "make-venv: no python3.11 or python3 on PATH; install Python 3.11 first" >&2
    exit 1
fi
if ! "$python" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "make-venv: installing python3-venv with apt-get" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev
        "$python" -m venv "$venv"
    else
        echo "make-venv: '$python -m venv' failed; install python3-venv (apt-get install python3-venv)" >&2
        exit 1
    fi
fi
