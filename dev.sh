#!/usr/bin/env bash
# Set up a local virtual environment (once) and run the main job or the tests.
#   ./dev.sh demo [args]   the demo on the embedded default model (python -m adaption_fx)
#   ./dev.sh test [args]   the test suite (python -m pytest -x -q)
# torch is installed first at a pinned version: a bare `pip install torch` (or a range that
# admits newer releases) pulls the newest CUDA build, gigabytes of it.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
    local extra="$1"
    local stamp="$VENV/.adaption-fx-$extra"
    local want
    want="$(sha256sum pyproject.toml | cut -c1-16)-torch$TORCH_VERSION"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    if [[ "$extra" == "test" ]]; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    else
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
    fi
    echo "$want" > "$stamp"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    demo)
        setup base
        exec "$VENV/bin/python" -m adaption_fx "$@"
        ;;
    test)
        setup test
        exec "$VENV/bin/python" -m pytest -x -q "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo [args] | ./dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac
