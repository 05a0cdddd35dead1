"""attnflax: cosine-similarity self-attention for image classification in JAX/Flax.

The two pure functions at the heart of the package are re-exported here::

    attnflax.cosine_attention(query, key, value, *, logit_scale, bias=None, mask=None)
    attnflax.local_cosine_attention_2d(query, key, value, *, window, logit_scale, bias=None)

Flax modules live in :mod:`attnflax.nn`, models in :mod:`attnflax.models`.
"""

from attnflax.ops import cosine_attention, local_cosine_attention_2d

__version__ = "0.1.0"

__all__ = ["cosine_attention", "local_cosine_attention_2d", "__version__"]
