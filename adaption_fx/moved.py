"""Old module paths kept for one release after a module moved (CONTRIBUTING.md, Layout)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_moved_module(old: str, new: str) -> None:
    """Make the module ``old`` the module ``new``, warning once that it moved.

    Called from the old path's file: the import system then hands out ``new`` itself for
    ``old``, so attributes read and set through the old name are the new module's own.
    """
    warnings.warn(
        f"{old} moved to {new}; the old path is removed in adaption-fx 0.2",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
