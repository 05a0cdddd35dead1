"""Pure JAX attention functions: no Flax, no configuration, no I/O."""

from attnflax.ops.attention import (
    cosine_attention,
    local_cosine_attention_2d,
    window_validity,
)

__all__ = [
    "cosine_attention",
    "local_cosine_attention_2d",
    "window_validity",
]
