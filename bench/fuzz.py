"""Files from elsewhere: the fuzz harness's per-loader counts, and absurd sizes on the real model.

    python -m bench.fuzz            # 400 cases per loader (toy), 100 on the embedded model
    python -m bench.fuzz --quick    # a few cases, nothing written (the test suite's run)

The harness is the suite's (tests/test_fuzz_files.py, tests/fuzz_harness.py): every case
damages one file of a pristine directory (bytes, JSON fields, safetensors tensors) and
loads it; loading must succeed with what the files say or raise a documented exception
naming the file, within a time bound, leaving the directory (and, on failure, the model) as
it was. Here it runs with fresh random cases: every loader on a tiny Llama, then the adapter
and ONNX loaders on the embedded SmolLM2-135M-Instruct.

Then, on the embedded model, how long an absurd adapter config takes to be refused:
``adapter_len`` 10**9 (a 2.3 TB prompt for this model) and ``adapter_layers`` 10**6, through
``rewrite(model, directory)`` and ``AdaptedModel.load_adapter`` (median of 5 each).

Results: bench/results/fuzz.json and fuzz.md (the docs' reliability page includes the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TEST_FILE = "tests/test_fuzz_files.py"
# The loaders whose files the embedded model changes (the rest read no model).
REAL_MODEL_TESTS = "adapter_directory or peft or trainer or onnx"


def run_harness(examples: int, model: str | None, select: str | None) -> dict:
    """Run the suite's fuzz tests in a subprocess; returns the harness's report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = dict(os.environ)
        env.update(
            ADAPTION_FX_FUZZ_EXAMPLES=str(examples),
            ADAPTION_FX_FUZZ_RANDOM="1",
            ADAPTION_FX_FUZZ_REPORT=str(report),
        )
        if model:
            env["ADAPTION_FX_FUZZ_MODEL"] = model
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE]
        if select:
            command += ["-k", select]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-6000:] + done.stderr[-3000:])
            raise SystemExit(f"the fuzz harness failed (exit {done.returncode})")
        return json.loads(report.read_text())


def absurd_sizes(repeats: int = 5) -> dict[str, float]:
    """Seconds to refuse absurd sizes in a saved adapter's config, on the embedded model."""
    from adaption_fx import AdaptionConfig, rewrite
    from adaption_fx.app.pretrained import load_pretrained
    from adaption_fx.checkpoint import CheckpointError

    base = load_pretrained(None).model
    model = rewrite(base, AdaptionConfig(adapter_len=10, adapter_layers=30))
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for field, value in (("adapter_len", 10**9), ("adapter_layers", 10**6)):
            directory = Path(tmp) / field
            model.save_adapter(directory)
            config = json.loads((directory / "adapter_config.json").read_text())
            config[field] = value
            (directory / "adapter_config.json").write_text(json.dumps(config))
            for name, call in (
                ("rewrite(model, directory)", lambda d=directory: rewrite(base, d)),
                ("load_adapter(directory)", lambda d=directory: model.load_adapter(d, "x")),
            ):
                seconds = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    try:
                        call()
                    except CheckpointError as exc:
                        assert field in str(exc), exc
                    else:
                        raise AssertionError(f"{field}={value} was loaded")
                    seconds.append(time.perf_counter() - start)
                timings[f"{field}={value}: {name}"] = statistics.median(seconds)
    return timings


def render(
    toy: dict, real: dict | None, sizes: dict[str, float] | None, examples: int, real_examples: int
) -> str:
    lines = [
        f"### Fuzzing the loaders: {examples} random cases per loader on a tiny Llama"
        + (
            ""
            if real is None
            else f", {real_examples} per adapter and ONNX loader on SmolLM2-135M-Instruct"
        ),
        "",
        "| model | loader | cases | loaded: same as the original | loaded: what the damaged "
        "files say | refused (exception) | slowest case (s) |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for model, report in (("tiny Llama", toy), ("SmolLM2-135M", real)):
        if report is None:
            continue
        for name, entry in report["loaders"].items():
            outcomes = entry["outcomes"]
            refused = ", ".join(
                f"{n} {k.removeprefix('refused (').rstrip(')')}"
                for k, n in outcomes.items()
                if k.startswith("refused")
            )
            lines.append(
                f"| {model} | {name} | {entry['cases']} | "
                f"{outcomes.get('loaded (same as the original)', 0)} | "
                f"{outcomes.get('loaded (what the files say)', 0)} | {refused} | "
                f"{entry['slowest_s']:.3f} |"
            )
    lines += [
        "",
        "Every case ended in one of the two outcomes the harness allows. The process's peak "
        "resident memory rose by at most "
        f"{toy['peak_rss_growth_mib']:.0f} MiB over one loader's cases on the tiny model"
        + ("" if real is None else f" and {real['peak_rss_growth_mib']:.0f} MiB on the real one")
        + " (bound: 1 GiB plus four times the size of the loader's files; the models the "
        "cases start from not counted).",
    ]
    if sizes:
        lines += [
            "",
            "| absurd size in adapter_config.json (SmolLM2-135M, 30 layers) | refused in (ms, "
            "median of 5) |",
            "|---|---:|",
        ]
        lines += [f"| {name} | {seconds * 1000:.1f} |" for name, seconds in sizes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=400, help="cases per loader (toy)")
    parser.add_argument("--real-examples", type=int, default=100, help="cases per loader (real)")
    parser.add_argument("--quick", action="store_true", help="few cases, no real model, no files")
    args = parser.parse_args(argv)
    if args.quick:
        toy = run_harness(5, None, "data_files or run_json")
        print(render(toy, None, None, 5, 0))
        return
    toy = run_harness(args.examples, None, None)
    real = run_harness(args.real_examples, "embedded", REAL_MODEL_TESTS)
    sizes = absurd_sizes()
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "examples": args.examples,
        "real_examples": args.real_examples,
        "toy": toy,
        "real": real,
        "absurd_sizes_s": sizes,
    }
    (RESULTS / "fuzz.json").write_text(json.dumps(data, indent=2) + "\n")
    text = render(toy, real, sizes, args.examples, args.real_examples)
    (RESULTS / "fuzz.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
