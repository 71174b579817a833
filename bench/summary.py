"""The README's performance table: rows chosen from the bench result files, copied as they are.

``python -m bench.summary`` prints it; ``--write`` puts it between the README's markers.
``tests/test_docs_site.py`` checks that the README holds exactly what this prints, so a new
bench result (or a renamed row) cannot leave a stale number in the README.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START = "<!-- performance table: python -m bench.summary --write -->"
END = "<!-- end of performance table -->"

# (result file, start of the row's measurement cell, how the README names it)
ROWS: tuple[tuple[str, str, str], ...] = (
    (
        "embedded.md",
        "start-up, warm: rewrite + first generate",
        "start-up, warm (rewrite + first generate), s",
    ),
    (
        "embedded.md",
        "generation (batch 1, 48 new tokens): ours eager / base HF",
        "generation, batch 1: ours / HF generate (time)",
    ),
    (
        "embedded.md",
        "generation (batch 1, 48 new tokens): PEFT generate / base HF",
        "generation, batch 1: PEFT / HF generate (time)",
    ),
    (
        "embedded.md",
        "generation (batch 1, 48 new tokens): ours ORT / ours eager",
        "generation, batch 1: ours in ORT / ours in PyTorch",
    ),
    (
        "embedded.md",
        "training step (batch 8 x 128): ours / PEFT time",
        "training step: ours / PEFT (time)",
    ),
    ("embedded.md", "to_onnx(model, path, for_generation=True)", "to_onnx for generation, s"),
    ("quantized.md", "int4 (GGUF blocks)", "int4 decode file (the GGUF's own blocks): size / fp32"),
    (
        "quantized.md",
        "generation, batch 1: int4 (GGUF blocks) ORT / llama.cpp",
        "generation, batch 1: int4 in ORT / llama.cpp, same GGUF (tokens/s)",
    ),
    (
        "quantized.md",
        "generation, batch 1: int4 (GGUF blocks) with opset 23's fused ops / written out",
        "generation, batch 1: int4 with opset 23's fused ops / written out (tokens/s)",
    ),
    (
        "quantized.md",
        "generation, batch 4: int4 (GGUF blocks) / fp32 ORT",
        "generation, batch 4: int4 / fp32 in ORT (tokens/s)",
    ),
    (
        "serve.md",
        "throughput: (a) 4 adapters / (b) one adapter",
        "server, 32 clients: throughput over 4 adapters / all on one adapter",
    ),
    (
        "serve.md",
        "throughput: (a) 4 adapters / (c) one at a time",
        "server, 32 clients: throughput over 4 adapters / one request at a time",
    ),
    (
        "fuzz.md",
        "adapter_len=1000000000: rewrite(model, directory)",
        "adapter_config.json asking for adapter_len=10**9: refused by rewrite in, ms",
    ),
    (
        "latest.md",
        "eager forward (GQA): ours / base",
        "toy, eager forward (GQA): ours / base model",
    ),
    (
        "latest.md",
        "eager forward (GQA): PEFT / base",
        "toy, eager forward (GQA): PEFT / base model",
    ),
    (
        "latest.md",
        "compiled forward: ours / compiled base",
        "toy, compiled forward: ours / base model",
    ),
)


def _value(file: str, prefix: str) -> str:
    for line in (RESULTS / file).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith(prefix):
            return cells[1]
    raise LookupError(f"bench/results/{file} has no row starting {prefix!r}")


def table() -> str:
    """The table, from the result files as they are now."""
    lines = [
        "| measurement (SmolLM2-135M-Instruct unless toy; CPU, 2 threads) | value | from |",
        "|---|---|---|",
    ]
    for file, prefix, label in ROWS:
        lines.append(f"| {label} | {_value(file, prefix)} | `bench/results/{file}` |")
    return "\n".join(lines)


def readme_block(text: str) -> str:
    """The README's current table (between the markers)."""
    try:
        return text.split(START, 1)[1].split(END, 1)[0].strip()
    except IndexError:
        raise LookupError(f"README.md lacks the markers {START!r} ... {END!r}") from None


def write(readme: Path = README) -> None:
    """Put the table between the README's markers (temporary file, then rename)."""
    text = readme.read_text()
    readme_block(text)  # markers present
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    fd, tmp = tempfile.mkstemp(dir=readme.parent, prefix=".README.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(new)
    os.replace(tmp, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.summary", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    if args.write:
        write()
    else:
        print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
