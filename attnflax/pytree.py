"""Pytree conventions shared by the trainer, pruning and checkpoints (JAX only).

Leaves are named by their ``/``-joined path (``'Conv_0/kernel'``), and the leaves named
``kernel`` (the weights of every ``Dense``, ``Conv`` and attention projection) are the
ones that get weight decay and are pruned; biases, norm scales, attention log-scales and
position biases never are.
"""

from __future__ import annotations

import math
from typing import Any

import jax

KERNEL = "kernel"


def key_name(key: Any) -> Any:
    """The name of one path entry: a dict key, a sequence index or an attribute name."""
    return getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))


def path_name(path: tuple[Any, ...]) -> str:
    """``'Conv_0/kernel'`` for the path ``(DictKey('Conv_0'), DictKey('kernel'))``."""
    return "/".join(str(key_name(k)) for k in path)


def is_kernel(path: tuple[Any, ...]) -> bool:
    """Whether the leaf at `path` is named ``kernel`` (a conv or dense weight)."""
    return bool(path) and key_name(path[-1]) == KERNEL


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or shape structs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
