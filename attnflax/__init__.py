"""attnflax: cosine-similarity self-attention for image classification in JAX/Flax.

The two pure functions at the heart of the package are re-exported here::

    attnflax.cosine_attention(query, key, value, *, logit_scale, bias=None, mask=None)
    attnflax.local_cosine_attention_2d(query, key, value, *, window, logit_scale, bias=None)

Flax modules live in :mod:`attnflax.nn`, models in :mod:`attnflax.models`.

They are imported on first use, so that ``import attnflax.cli`` (the command line of the
scripts, which answers ``--help`` before JAX is loaded) and ``import attnflax.configs``
(what a config file needs) import neither JAX nor TensorFlow.
"""

from typing import Any

__version__ = "0.1.0"


__all__ = ["cosine_attention", "local_cosine_attention_2d", "__version__"]

_FROM_OPS = ("cosine_attention", "local_cosine_attention_2d")


def __getattr__(name: str) -> Any:
    if name in _FROM_OPS:
        from attnflax import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'attnflax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM_OPS])
