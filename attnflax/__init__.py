"""attnflax: cosine-similarity self-attention for image classification in JAX/Flax.

The two pure functions at the heart of the package are re-exported here::

    attnflax.cosine_attention(query, key, value, *, logit_scale, bias=None, mask=None)
    attnflax.local_cosine_attention_2d(query, key, value, *, window, logit_scale, bias=None)

Flax modules live in :mod:`attnflax.nn`, models in :mod:`attnflax.models`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """The two functions, imported on first use: ``import attnflax.configs`` (what a
    config file needs) then imports neither JAX nor TensorFlow."""
    if name in ("cosine_attention", "local_cosine_attention_2d"):
        from attnflax import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'attnflax' has no attribute {name!r}")

__all__ = ["cosine_attention", "local_cosine_attention_2d", "__version__"]
