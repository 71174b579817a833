"""Moved to :mod:`adaption_fx.capture.graph_cache`; this alias is removed in adaption-fx 0.2."""

import importlib
import sys
import warnings

warnings.warn(
    "adaption_fx.graph_cache moved to adaption_fx.capture.graph_cache; "
    "the old path is removed in adaption-fx 0.2",
    DeprecationWarning,
    stacklevel=2,
)
# The old name is the moved module itself, so attributes read and set through it are its own.
sys.modules[__name__] = importlib.import_module("adaption_fx.capture.graph_cache")
