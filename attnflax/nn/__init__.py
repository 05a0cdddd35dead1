"""Flax ``linen`` layers: cosine self-attention and blocks that put it into CNNs.

- :class:`CosineSelfAttention`: global multi-head cosine attention over tokens or images.
- :class:`LocalCosineSelfAttention2D`: the same over each pixel's ``kh x kw`` window.
- :class:`ResidualAttentionBlock`: pre-norm residual attention (+ optional MLP) that
  starts as the identity, for use after any conv stage.
- :class:`AttentionConv2D`: local attention as a drop-in for a strided ``k x k`` conv.
- :func:`attention_maps`: the sown attention weights of a model, by module path.
"""

from attnflax.nn.attention import (
    CosineSelfAttention,
    LocalCosineSelfAttention2D,
    relative_position_index,
)
from attnflax.nn.blocks import AttentionConv2D, ResidualAttentionBlock
from attnflax.nn.maps import attention_maps

__all__ = [
    "AttentionConv2D",
    "CosineSelfAttention",
    "LocalCosineSelfAttention2D",
    "ResidualAttentionBlock",
    "attention_maps",
    "relative_position_index",
]
