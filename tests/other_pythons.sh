#!/usr/bin/env bash
# The tests that need neither TensorFlow nor the demo extra, less the slow ones
# (pytest -m "not tf and not slow"), on each Python version in $OTHER_PYTHONS
# (default: 3.10 3.12 3.13; `make test` passes the oldest and newest), each in its own venv .venv-3.X holding `.[test]`
# only: numpy, cloudpickle, pytest, pytest-timeout, psutil.  `make test` runs it
# after the full suite on .venv.  Only tests/ is collected: ecosystem_tests/
# (MONAI, TorchIO, torch...) is `make test-ecosystem`'s, on its own venv.
#
# OTHER_PYTHONS_MARKS overrides the marker expression (e.g. "core and not tf").
#
# An interpreter is looked for as python3.X on PATH, then in pyenv's versions;
# one that is absent is named in a NOTICE line and its run is skipped.  Each
# venv is stamped, so a second run installs nothing.  Every version runs; the
# script fails if any version's tests (or its install) failed.
set -uo pipefail
cd "$(dirname "$0")/.."

versions=${OTHER_PYTHONS-3.10 3.12 3.13}  # OTHER_PYTHONS= (set, empty) runs none
marks=${OTHER_PYTHONS_MARKS:-not tf and not slow}
pytest_args=(-q -p no:cacheprovider -rfEs -m "$marks" tests)

# Prints the path of a working interpreter for version $1 (e.g. 3.12), or nothing.
find_python() {
    local version=$1 candidates=() candidate root
    candidate=$(command -v "python$version" 2>/dev/null) && candidates+=("$candidate")
    # pyenv's shim for a version that is installed but not selected exits non-zero,
    # so look in pyenv's own versions too (newest patch release first).
    if command -v pyenv >/dev/null 2>&1; then
        root=$(pyenv root 2>/dev/null)
    else
        root=${PYENV_ROOT:-$HOME/.pyenv}
    fi
    if [ -n "$root" ] && [ -d "$root/versions" ]; then
        while IFS= read -r candidate; do
            candidates+=("$candidate")
        done < <(ls -d "$root/versions/$version".*/bin/"python$version" 2>/dev/null | sort -rV)
    fi
    for candidate in "${candidates[@]}"; do
        if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$version" ]; then
            echo "$candidate"
            return
        fi
    done
}

failed=() summary=() runs=()
# First every venv, one after another (pip's output stays readable) ...
for version in $versions; do
    python=$(find_python "$version")
    if [ -z "$python" ]; then
        echo "NOTICE: python$version not found (not on PATH, not in pyenv), its run is skipped"
        summary+=("$version: NOT RUN (python$version not found)")
        continue
    fi
    venv=.venv-$version
    stamp=$venv/.stamp-test
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
        start=$SECONDS
        rm -rf "$venv"
        if ! { "$python" -m venv "$venv" \
                && "$venv/bin/python" -m pip install -q --upgrade pip \
                && "$venv/bin/python" -m pip install -q -e ".[test]"; }; then
            echo "FAILED: installing .[test] into $venv"
            failed+=("$version") summary+=("$version: FAILED (install)")
            continue
        fi
        touch "$stamp"
        echo "   ($venv set up in $((SECONDS - start)) s)"
    fi
    runs+=("$version")
done

# ... then the versions' suites at the same time (each is mostly waiting on
# its workers' start-up; run one after another they took 4-5 minutes), each
# into its own log, printed whole when all are done.
start=$SECONDS
declare -A pids logs
for version in "${runs[@]}"; do
    logs[$version]=$(mktemp)
    ".venv-$version/bin/python" -m pytest "${pytest_args[@]}" >"${logs[$version]}" 2>&1 &
    pids[$version]=$!
done
for version in "${runs[@]}"; do
    wait "${pids[$version]}"
    status=$?
    log=${logs[$version]}
    echo
    echo "== Python $(".venv-$version/bin/python" -c 'import platform, sys; print(platform.python_version(), sys.executable)') (.venv-$version): pytest -m \"$marks\" tests"
    cat "$log"
    result=$(grep -E '^=* ?[0-9]+ [a-z]+.* in [0-9.]+s' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    rm -f "$log"
    if [ "$status" -eq 0 ]; then
        summary+=("$version: ok ($result)")
    else
        failed+=("$version")
        summary+=("$version: FAILED, pytest exit $status (${result:-no summary line})")
    fi
done
[ ${#runs[@]} -gt 0 ] && echo "   (the versions ran side by side in $((SECONDS - start)) s)"

echo
echo "== Other Python versions, pytest -m \"$marks\":"
if [ ${#summary[@]} -gt 0 ]; then
    printf '   %s\n' "${summary[@]}"
else
    echo "   none: OTHER_PYTHONS is empty"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED on Python ${failed[*]}"
    exit 1
fi
