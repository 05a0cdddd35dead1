"""The jitted steps: one optimiser update, exact masked evaluation, prediction.

Gradient accumulation splits the global batch into ``grad_accum_steps`` micro-batches
inside the step (``lax.scan``) and sums their gradients of the *global* mean loss, so the
update equals the one of the full batch up to float rounding (BatchNorm models excepted:
their statistics are per micro-batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnflax import metrics, parallel
from attnflax.losses import cross_entropy
from attnflax.train.state import TrainState


def _micro_batches(batch: Mapping[str, jax.Array], accum: int, mesh: Mesh) -> dict:
    """``[B, ...]`` -> ``[accum, B / accum, ...]`` without moving data between devices.

    Micro-batch ``j`` takes the rows ``j, j + accum, j + 2 accum, ...``: each device's
    contiguous rows split into ``accum`` strided groups, so every micro-batch stays
    spread over all devices.
    """
    out = {}
    for key, x in batch.items():
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, parallel.DATA_AXIS, *([None] * (x.ndim - 2)))
        out[key] = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return out


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    label_smoothing: float,
    grad_accum_steps: int,
    mesh: Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update on a global batch (jit it with the state donated).

    Args:
      state: The current state.
      batch: ``{'image': [B, h, w, c], 'label': int [B], 'mask': bool [B]}``, sharded
        over ``data``; masked-out examples do not count.
      model, tx, schedule: The model, optimiser and learning-rate schedule.
      label_smoothing: Label smoothing of the loss.
      grad_accum_steps: Micro-batches to split `batch` into (see the module docstring).
      mesh: The device mesh (for the micro-batch layout).

    Returns:
      ``(new_state, metrics)``; metrics are float32 scalars ``loss`` (mean over the
      real examples, with smoothing), ``accuracy``, ``grad_norm`` (before clipping)
      and ``learning_rate``.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    count = jnp.maximum(batch["mask"].sum(), 1).astype(jnp.float32)
    has_stats = bool(state.batch_stats)

    def loss_fn(params: Any, batch_stats: Any, mb: Mapping[str, jax.Array]):
        variables = {"params": params, **({"batch_stats": batch_stats} if has_stats else {})}
        if has_stats:
            logits, updates = model.apply(variables, mb["image"], train=True,
                                          rngs={"dropout": step_rng}, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits = model.apply(variables, mb["image"], train=True, rngs={"dropout": step_rng})
        mask = mb["mask"]
        losses = cross_entropy(logits, mb["label"], label_smoothing)
        loss_sum = jnp.where(mask, losses, 0.0).sum()
        correct = jnp.where(mask, jnp.argmax(logits, -1) == mb["label"], False).sum()
        # Divided by the GLOBAL count: micro-batch gradients then sum to the full one.
        return loss_sum / count, (batch_stats, loss_sum, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (_, (batch_stats, loss_sum, correct)), grads = grad_fn(
            state.params, state.batch_stats, batch)
    else:
        def accumulate(carry, mb):
            grads, batch_stats, loss_sum, correct = carry
            (_, (batch_stats, l_sum, c)), g = grad_fn(state.params, batch_stats, mb)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, batch_stats, loss_sum + l_sum, correct + c), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, state.batch_stats, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, batch_stats, loss_sum, correct), _ = jax.lax.scan(
            accumulate, init, _micro_batches(batch, grad_accum_steps, mesh))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    step_metrics = {
        "loss": loss_sum / count,
        "accuracy": correct.astype(jnp.float32) / count,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    }
    return new_state, step_metrics


def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
              model: nn.Module, with_logits: bool = False) -> dict[str, jax.Array]:
    """Sums over the real (mask=True) examples of one eval batch.

    Returns:
      ``{'correct': int32, 'loss_sum': float32, 'count': int32}`` (replicated when jitted
      by `make_eval_step`), and with
      `with_logits` also ``'logits'``: float32 [b, classes] of every example (`predict_step`).
    """
    logits = predict_step(variables, batch["image"], model=model)
    mask = batch["mask"]
    losses = cross_entropy(logits, batch["label"])
    sums = {
        "correct": jnp.where(mask, jnp.argmax(logits, -1) == batch["label"], False).sum(),
        "loss_sum": jnp.where(mask, losses, 0.0).sum(),
        "count": mask.sum().astype(jnp.int32),
    }
    return {**sums, "logits": logits} if with_logits else sums


def make_eval_step(model: nn.Module, mesh: Mesh,
                   with_logits: bool = False) -> Callable:
    """``eval_step`` jitted with replicated outputs (readable on every process)."""
    return jax.jit(
        functools.partial(eval_step, model=model, with_logits=with_logits),
        out_shardings=parallel.replicated(mesh),
    )


def predict_step(variables: Mapping[str, Any], images: jax.Array, *,
                 model: nn.Module) -> jax.Array:
    """float32 logits [b, classes] of a batch of images [b, h, w, c] (eval mode)."""
    return model.apply(variables, images, train=False).astype(jnp.float32)


def evaluate(eval_fn: Callable, variables: Mapping[str, Any], batches: Iterable[Mapping],
             mesh: Mesh,
             on_batch: Callable[[Mapping, Mapping], None] | None = None
             ) -> dict[str, float | int]:
    """Exact accuracy and loss over every real example of `batches`.

    The one masked evaluation: the trainer's, and the scripts' through
    `attnflax.restore.evaluate` (a perturbation of the inputs is a map over `batches`).

    Args:
      eval_fn: `make_eval_step`'s function (or any with its contract).
      variables: The model variables.
      batches: Host batches ``{'image', 'label', 'mask'}`` (an `EvalIterable`).
      mesh: The mesh the batches are laid out on.
      on_batch: Called with each host batch and the step's outputs on the host (e.g.
        ``'logits'`` of ``make_eval_step(..., with_logits=True)``, which cover the global
        batch: they match the host batch in a single-process job).

    Returns:
      ``{'accuracy', 'loss', 'examples', 'correct'}``: global sums divided by the
      number of real examples (`metrics.EvalSums`).
    """
    sums = metrics.EvalSums()
    for batch in batches:
        out = jax.device_get(eval_fn(variables, parallel.host_to_global(batch, mesh)))
        sums.add(out)
        if on_batch is not None:
            on_batch(batch, out)
    return sums.result()


def abstract_batch(global_batch: int, image_shape: tuple[int, ...], mesh: Mesh
                   ) -> dict[str, Any]:
    """The train batch as ``ShapeDtypeStruct``s sharded over ``data`` (for AOT compiling)."""
    sharding = parallel.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct((global_batch, *image_shape), jnp.float32,
                                      sharding=sharding),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((global_batch,), jnp.bool_, sharding=sharding),
    }
