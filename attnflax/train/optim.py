"""The optimiser: gradient clipping, AdamW or SGD, a warm-up + cosine schedule, and
weight decay on kernels only (never on norms, biases, attention log-scales or position
biases)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from attnflax import pytree


def weight_decay_mask(params: Any) -> Any:
    """True for leaves named ``kernel`` (conv/dense weights), False for everything else."""
    return jax.tree_util.tree_map_with_path(lambda path, _: pytree.is_kernel(path), params)


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Gradient clipping + AdamW/SGD with a warm-up + cosine schedule.

    Returns:
      ``(tx, schedule)``; ``schedule(step)`` is the learning rate of update ``step``.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=config.learning_rate * config.end_learning_rate_factor,
    )
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "adamw":
        parts.append(optax.adamw(schedule, b1=config.momentum, b2=config.adam_b2,
                                 weight_decay=config.weight_decay, mask=weight_decay_mask))
    else:
        if config.weight_decay > 0:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                               nesterov=config.nesterov))
    return optax.chain(*parts), schedule
