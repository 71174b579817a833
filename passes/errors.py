"""Exceptions raised by the graph passes when a graph does not meet a pass's precondition."""


class UnsupportedGraphError(ValueError):
    """The graph is not one the passes can work on (not ATen, already rewritten, ...)."""


class AttentionNotFoundError(ValueError):
    """No attention site the passes recognise was found, or a site did not match fully."""
