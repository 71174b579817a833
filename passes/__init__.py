"""Graph passes over torch.export ATen graphs: locate attention sites, insert adaption prompts."""

from adaption_fx.passes.errors import AttentionNotFoundError, UnsupportedGraphError
from adaption_fx.passes.insert import ADAPTION_META_KEY, AdaptionGraph, insert_adaption_prompt
from adaption_fx.passes.locate import locate_attention, select_top_sites
from adaption_fx.passes.mixed_batch import MixedGraph, insert_mixed_adapters
from adaption_fx.passes.site import AttentionSite, Projection

__all__ = [
    "ADAPTION_META_KEY",
    "AdaptionGraph",
    "AttentionNotFoundError",
    "AttentionSite",
    "MixedGraph",
    "Projection",
    "UnsupportedGraphError",
    "insert_adaption_prompt",
    "insert_mixed_adapters",
    "locate_attention",
    "select_top_sites",
]
