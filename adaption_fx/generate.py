"""Moved to :mod:`adaption_fx.generation.loop`; this alias is removed in adaption-fx 0.2."""

from adaption_fx.moved import alias_moved_module

alias_moved_module(__name__, "adaption_fx.generation.loop")
