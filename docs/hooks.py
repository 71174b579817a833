"""mkdocs hook: let mkdocstrings read the package as it installs.

``passes/`` and ``export/`` install as ``adaption_fx.passes`` and ``adaption_fx.export``
(pyproject's package-dir mapping), so the source tree has no ``adaption_fx/passes``. For the
API pages this hook builds that layout out of symbolic links in a temporary folder (the
source files themselves; only ``__init__.py`` is copied) and puts it first on mkdocstrings'
search path.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"passes": "passes", "export": "export"}  # adaption_fx.<name> -> source folder


def installed_layout(target: Path) -> Path:
    """``target/adaption_fx``: links to every entry of ``adaption_fx/`` plus the mapped
    subpackages; returns ``target``."""
    package = target / "adaption_fx"
    package.mkdir(parents=True)
    for entry in (ROOT / "adaption_fx").iterdir():
        if entry.name == "__init__.py":
            # A copy: griffe follows a linked __init__.py back to the source folder, and then
            # walks that folder (without passes/ and export/) for the submodules.
            shutil.copyfile(entry, package / entry.name)
        elif entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    return target


@event_priority(100)  # before mkdocstrings creates its handler from these paths
def on_config(config: Any) -> Any:
    tree = Path(tempfile.mkdtemp(prefix="adaption-fx-api-"))
    atexit.register(shutil.rmtree, tree, ignore_errors=True)
    handlers = config.plugins["mkdocstrings"].config.handlers
    python = handlers.setdefault("python", {})
    python["paths"] = [str(installed_layout(tree)), *python.get("paths", [])]
    return config
