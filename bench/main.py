"""``python -m bench``: the toy-model table (bench/run.py) or, with ``--model embedded``, the
real-model table (bench/embedded.py), each with its own flags."""

from __future__ import annotations

import argparse

from bench import embedded, run


def main(argv: list[str] | None = None) -> int:
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--model", choices=("toy", "embedded"), default="toy")
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.model == "embedded":
        return embedded.main(rest)
    return run.main(argv)
