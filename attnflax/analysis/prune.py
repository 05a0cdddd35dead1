"""Global pruning (one ranking of LAMP scores or of |w| over all kernels) with fixed
masks, and a masked fine-tune.

Pruning acts on the leaves named ``kernel`` (the weights of every ``Dense``, ``Conv`` and
attention projection; the project's weight-decay/pruning convention). Biases, norm scales,
attention log-scales and position biases are never pruned.

*Global* magnitude pruning ranks **all** kernel weights together and zeroes the lowest
``round(sparsity * n)`` of them. Ties are broken by position, which makes the number of
zeroed weights exact: the achieved sparsity over all kernels is ``round(sparsity * n) / n``.
Two rankings (:func:`magnitude_masks`): ``'magnitude'`` ranks ``|w|`` itself, so layers
with many small weights lose more than others and can be emptied entirely (on the digits
attention CNN, the big dense layer at 95 %); ``'lamp'`` ranks LAMP scores (Lee et al.,
"Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021), magnitudes
normalised within each tensor, which keeps every layer alive.

During fine-tuning the masks stay fixed, enforced three ways (each sufficient alone for
plain SGD, together exact for any Optax optimiser): the gradients are masked before the
optimiser, its updates are masked after it (:func:`masked`), and the pruned weights are
re-zeroed after every step (:func:`make_finetune_step`, the trainer's step with masks).

No I/O here: :func:`compressed_size` measures an ``np.savez_compressed`` archive in memory;
scripts decide where files go.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from attnflax import parallel, pytree
from attnflax.train import TrainState, train_step

PyTree = Any
Array = jax.Array


def check_sparsity(sparsity: float) -> float:
    """Returns `sparsity` as a float after checking it lies in ``[0, 1)``.

    Raises:
      ValueError: If it is not a finite number in ``[0, 1)`` (1 would zero every kernel).
    """
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1); got {sparsity!r}.") from None
    if not (np.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"sparsity must be a fraction in [0, 1) (e.g. 0.9 for 90 %); got {sparsity!r}."
        )
    return value


def is_prunable(path: tuple[Any, ...], leaf: Any) -> bool:
    """Whether a params leaf is pruned: its name is ``kernel`` (and it is an array)."""
    return pytree.is_kernel(path) and hasattr(leaf, "shape")


def prunable_names(params: PyTree) -> list[str]:
    """The ``/``-joined paths of the prunable leaves of `params`, in tree order."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [pytree.path_name(p) for p, x in leaves if is_prunable(p, x)]


CRITERIA = ("magnitude", "lamp")


def lamp_scores(weights: np.ndarray) -> np.ndarray:
    """LAMP scores of one tensor (Lee et al., ICLR 2021), same shape as `weights`.

    With the tensor's squared weights sorted ascending, ``w_u^2 / sum_{v >= u} w_v^2``:
    the share of a weight in the energy of itself and everything larger in its tensor.
    Ranking these globally is magnitude pruning with a per-tensor normalisation; the
    largest weight of every tensor scores 1, so no tensor is pruned away entirely
    before all are.
    """
    sq = np.square(np.asarray(weights, np.float64)).ravel()
    order = np.argsort(sq, kind="stable")
    ranked = sq[order]
    suffix = np.cumsum(ranked[::-1])[::-1]
    scores = np.empty_like(sq)
    scores[order] = np.divide(ranked, suffix, out=np.zeros_like(ranked), where=suffix > 0)
    return scores.reshape(np.shape(weights))


def magnitude_masks(params: PyTree, sparsity: float, criterion: str = "magnitude") -> PyTree:
    """Global magnitude-pruning masks.

    Args:
      params: A params pytree (e.g. ``variables['params']``).
      sparsity: Fraction in ``[0, 1)`` of all kernel weights to remove.
      criterion: What is ranked globally over all kernels: ``'magnitude'`` (``|w|``, plain
        global magnitude pruning) or ``'lamp'`` (:func:`lamp_scores`, magnitudes
        normalised within each tensor).

    Returns:
      A pytree with the structure of `params`: bool arrays of each leaf's shape, False
      where a weight is pruned. Non-kernel leaves are all True. Exactly
      ``round(sparsity * n)`` of the ``n`` kernel weights are False, the ones with the
      smallest score (ties broken by tree order, then position; weights that are
      already zero score lowest, so masks of growing sparsity nest).

    Raises:
      ValueError: On a sparsity outside ``[0, 1)``, an unknown criterion or params
        without any ``kernel`` leaf.
    """
    sparsity = check_sparsity(sparsity)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    prunable = [is_prunable(p, x) for p, x in flat]
    if not any(prunable):
        raise ValueError("params hold no leaf named 'kernel'; nothing to prune.")
    score = (lambda w: np.abs(np.asarray(w, np.float32))) if criterion == "magnitude" else (
        lamp_scores)
    mags = [score(x).ravel() for (_, x), k in zip(flat, prunable, strict=True) if k]
    sizes = [m.size for m in mags]
    total = int(sum(sizes))
    num_pruned = int(round(sparsity * total))
    keep = np.ones(total, bool)
    if num_pruned:
        order = np.argsort(np.concatenate(mags), kind="stable")
        keep[order[:num_pruned]] = False
    pieces = iter(np.split(keep, np.cumsum(sizes)[:-1]))
    masks = [
        next(pieces).reshape(np.shape(x)) if k else np.ones(np.shape(x), bool)
        for (_, x), k in zip(flat, prunable, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, masks)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params * masks`` leaf by leaf, keeping each leaf's dtype."""
    return jax.tree_util.tree_map(
        lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.asarray(p).dtype)), params, masks
    )


class SparsityReport(NamedTuple):
    """Zero counts over the kernel leaves of a params tree.

    Attributes:
      zeros: Number of exactly-zero kernel weights.
      total: Number of kernel weights.
      per_tensor: ``{path: (zeros, size)}`` for each kernel leaf.
    """

    zeros: int
    total: int
    per_tensor: dict[str, tuple[int, int]]

    @property
    def sparsity(self) -> float:
        """Fraction of kernel weights that are zero."""
        return self.zeros / max(self.total, 1)


def sparsity_report(params: PyTree) -> SparsityReport:
    """Counts the exact zeros of every kernel leaf of `params`."""
    per_tensor = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if is_prunable(path, x):
            a = np.asarray(x)
            per_tensor[pytree.path_name(path)] = (int(np.sum(a == 0)), int(a.size))
    zeros = sum(z for z, _ in per_tensor.values())
    total = sum(n for _, n in per_tensor.values())
    return SparsityReport(zeros, total, per_tensor)


class MaskState(NamedTuple):
    """The optimiser state of :func:`masked`: the fixed masks and the inner state."""

    masks: PyTree
    inner: Any


def masked(tx: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """Wraps `tx` so pruned weights get zero gradients in and zero updates out.

    The masks live in the optimiser state (set by ``init``), not in the update's
    closure, so one jitted step serves every sparsity.

    Args:
      tx: Any Optax optimiser.
      masks: Bool pytree with the structure of the params (see :func:`magnitude_masks`),
        or None when the masks come with the state (``init`` is then not used:
        :func:`make_finetune_step` puts them in the state's ``opt_state``).

    Returns:
      A transformation computing ``mask * tx(mask * grads)``; state `MaskState`.
    """

    def init(params: PyTree) -> MaskState:
        return MaskState(jax.tree_util.tree_map(jnp.asarray, masks), tx.init(params))

    def update(updates: PyTree, state: MaskState, params: PyTree | None = None):
        updates, inner = tx.update(apply_masks(updates, state.masks), state.inner, params)
        return apply_masks(updates, state.masks), MaskState(state.masks, inner)

    return optax.GradientTransformation(init, update)


def make_finetune_step(
    model: Any, tx: optax.GradientTransformation, *, mesh: Mesh, label_smoothing: float = 0.0,
    grad_accum_steps: int = 1, schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, Mapping[str, Array]], tuple[TrainState, dict[str, Array]]]:
    """The trainer's step (`attnflax.train.train_step`) with masks: jitted, reusable for
    any masks, with the trainer's sharding over `mesh` and gradient accumulation.

    Args:
      model: The Flax module.
      tx: The (unmasked) optimiser; the step masks it with the masks in its state (the
        state's ``opt_state`` is ``masked(tx, masks).init(params)``).
      mesh: The device mesh the batches are laid out on.
      label_smoothing: Of the train loss.
      grad_accum_steps: Micro-batches per step.
      schedule: The learning rate of each step, for the step's metrics only.

    Returns:
      ``step(state, batch) -> (state, metrics)`` (the state donated), with `batch` a global
      batch ``{'image', 'label', 'mask'}`` on `mesh`; after the update the pruned weights
      are set to exactly zero again.
    """
    mtx = masked(tx, None)  # `update` reads the masks from the state.

    def step(state: TrainState, batch: Mapping[str, Array]):
        state, metrics = train_step(
            state, batch, model=model, tx=mtx, schedule=schedule or (lambda _: 0.0),
            label_smoothing=label_smoothing,
            grad_accum_steps=grad_accum_steps, mesh=mesh)
        return state.replace(params=apply_masks(state.params, state.opt_state.masks)), metrics

    return jax.jit(step, donate_argnums=0)


def masked_finetune(
    model: Any,
    variables: PyTree,
    masks: PyTree,
    batches: Iterable[Mapping[str, Any]],
    tx: optax.GradientTransformation,
    num_steps: int,
    seed: int = 0,
    label_smoothing: float = 0.0,
    step: Callable[..., Any] | None = None,
    mesh: Mesh | None = None,
) -> tuple[PyTree, list[float]]:
    """Fine-tunes with the masks fixed: pruned weights are zero before, during and after.

    Args:
      model: The Flax module.
      variables: ``{'params': ..., 'batch_stats': ...}``; params are masked first.
      masks: Bool pytree like ``variables['params']``.
      batches: Yields at least `num_steps` host batches with ``image``, ``label`` (and
        ``mask``), each splitting evenly over the devices of `mesh`.
      tx: Optax optimiser (wrapped with :func:`masked` here).
      num_steps: Number of steps (0 returns the masked variables).
      seed: Seeds the steps' PRNG keys (dropout).
      label_smoothing: Of the train loss.
      step: A step from ``make_finetune_step(model, tx, mesh=mesh, ...)`` to reuse (its
        compilation) across calls; built here when None.
      mesh: The devices to train on (default: all, as the trainer).

    Returns:
      ``(variables, losses)``, the losses of each step as floats.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0; got {num_steps}.")
    mesh = mesh or parallel.create_mesh()
    variables = flax.core.unfreeze(variables)
    params = apply_masks(variables["params"], masks)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}),
                       opt_state=masked(tx, masks).init(params), rng=jax.random.PRNGKey(seed))
    state = jax.device_put(state, parallel.replicated(mesh))
    step = step or make_finetune_step(model, tx, mesh=mesh, label_smoothing=label_smoothing)
    losses: list[float] = []
    iterator: Iterator[Mapping[str, Any]] = iter(batches)
    for i in range(num_steps):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"`batches` ran out after {i} of {num_steps} steps.") from None
        batch = {"mask": np.ones(len(batch["label"]), bool),
                 **{k: v for k, v in batch.items() if k in ("image", "label", "mask")}}
        state, metrics = step(state, parallel.host_to_global(batch, mesh))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.variables()), losses


def compressed_size(params: PyTree) -> int:
    """Bytes of ``np.savez_compressed`` (zip/deflate) of the params, one array per leaf.

    The leaves are stored densely in their own dtype; zeros compress, so the size falls
    with sparsity. Measured in memory: write the same archive to disk with
    :func:`save_compressed` to get the identical file.
    """
    buffer = io.BytesIO()
    save_compressed(buffer, params)
    return buffer.getbuffer().nbytes


def save_compressed(file: Any, params: PyTree) -> None:
    """Writes `params` as ``np.savez_compressed`` to `file` (a path or binary file object).

    Keys are the ``/``-joined leaf paths, so ``np.load(file)[path]`` reads one back.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    arrays = {pytree.path_name(p): np.asarray(x) for p, x in leaves}
    np.savez_compressed(file, **arrays)


def dense_size(params: PyTree) -> int:
    """Bytes of all params leaves stored uncompressed (``sum(leaf.nbytes)``)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params)))
