"""The export's progress bar (tqdm), one step per stage."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class ExportStages:
    """A tqdm bar over the export's stages, named as each starts."""

    def __init__(self, names: list[str], progress: bool | None):
        # disable=None: shown only on a terminal.
        self.bar = tqdm(
            total=len(names),
            desc="ONNX export",
            unit="stage",
            disable=None if progress is None else not progress,
            dynamic_ncols=True,
        )
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(name)

    def close(self, finished: bool) -> None:
        if finished:
            self.bar.update()
            self.bar.set_postfix_str("done")
        self.bar.close()
