"""Pure JAX attention functions: no Flax, no configuration, no I/O."""

from attnflax.ops.attention import (
    GLOBAL_IMPLEMENTATIONS,
    LOCAL_IMPLEMENTATIONS,
    cosine_attention,
    local_cosine_attention_2d,
    window_validity,
)

__all__ = [
    "GLOBAL_IMPLEMENTATIONS",
    "LOCAL_IMPLEMENTATIONS",
    "cosine_attention",
    "local_cosine_attention_2d",
    "window_validity",
]
