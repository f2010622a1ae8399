#!/usr/bin/env bash
# The second half of `make test`: the fast subset of the suite (-m "unit and not slow"
# --no-services, what `make test-fast` runs) on the newest Python available
# (scripts/newest-python.sh), in its own venv (.venv-newest, or $NEWEST_VENV). The venv is made
# again when that Python changes, and reinstalled when pyproject.toml does. Without a Python
# newer than the main one ($1), says so in one line and succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
main=${1:-python3.11}
[ $# -gt 0 ] && shift  # the rest goes to pytest
venv=${NEWEST_VENV:-.venv-newest}

python=$(scripts/newest-python.sh "$main")
if [ -z "$python" ]; then
    echo "test-newest: no Python newer than $("$main" -V 2>&1 || echo "$main") found (python3.13 or python3.12 on PATH or under pyenv); the fast subset on a newer Python is skipped"
    exit 0
fi
full_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'; }
version=$(full_version "$python")
if [ -x "$venv/bin/python" ] && [ "$(full_version "$venv/bin/python" 2>/dev/null)" != "$version" ]; then
    echo "test-newest: $venv is not Python $version; making it again"
    rm -rf "$venv"
fi
[ -x "$venv/bin/python" ] || scripts/make-venv.sh "$python" "$venv"
stamp=$venv/.installed-dev
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e '.[dev]'
    touch "$stamp"
fi
echo "test-newest: the fast subset on Python $version ($python)"
exec "$venv/bin/pytest" -q -p no:cacheprovider -m "unit and not slow" --no-services "$@"
