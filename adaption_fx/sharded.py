"""Moved to :mod:`adaption_fx.training.sharded`; this alias is removed in adaption-fx 0.2."""

import importlib
import sys
import warnings

warnings.warn(
    "adaption_fx.sharded moved to adaption_fx.training.sharded; "
    "the old path is removed in adaption-fx 0.2",
    DeprecationWarning,
    stacklevel=2,
)
# The old name is the moved module itself, so attributes read and set through it are its own.
sys.modules[__name__] = importlib.import_module("adaption_fx.training.sharded")
