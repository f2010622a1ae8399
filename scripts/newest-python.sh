#!/usr/bin/env bash
# Print the path of the newest Python newer than the project's main one ($1, default python3.11):
# python3.13, then python3.12, on PATH or under pyenv (`pyenv root`/versions/3.13.*, ...). Each
# candidate must run (pyenv's shims exist on PATH but fail unless a version is selected). Prints
# nothing, and exits 0, when there is none.
set -uo pipefail
main=${1:-python3.11}

minor_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

main_version=$(minor_of "$main") || main_version=3.11
pyenv_root=$(pyenv root 2>/dev/null) || pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
for minor in 3.13 3.12; do
    # newer than the main Python? (sort -V: version order)
    [ "$(printf '%s\n%s\n' "$minor" "$main_version" | sort -V | tail -n 1)" = "$minor" ] || continue
    [ "$minor" = "$main_version" ] && continue
    candidates=()
    found=$(command -v "python$minor" 2>/dev/null) && candidates+=("$found")
    while IFS= read -r dir; do
        [ -n "$dir" ] && candidates+=("$dir/bin/python$minor")
    done < <(ls -d "$pyenv_root/versions/$minor".* 2>/dev/null | sort -V -r)
    for python in "${candidates[@]}"; do
        if [ -x "$python" ] && [ "$(minor_of "$python")" = "$minor" ]; then
            echo "$python"
            exit 0
        fi
    done
done
exit 0
