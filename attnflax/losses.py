"""The classification loss shared by training and the pruning fine-tune (JAX and Optax only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing, in float32.

    Args:
      logits: float [b, classes] (any float dtype; computed in float32).
      labels: int [b], in ``[0, classes)``.
      label_smoothing: Label smoothing in ``[0, 1)`` (0: none).

    Returns:
      float32 [b].
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing > 0:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
