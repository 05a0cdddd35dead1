"""Restore a trained model from a training workdir and evaluate it, for the scripts.

A workdir written by `attnflax.train.train_and_evaluate` holds Orbax checkpoints under
``workdir/checkpoints/<step>/`` with a ``state`` item (params, batch stats, optimiser
state, ...) and a ``meta`` item (model name and arguments, dataset, image shape,
normalisation, class names and the full config). `load_trained` reads the meta,
rebuilds the model from the registry and restores its variables onto one device (or a
mesh).

**Which step** (the one rule of every script: ``--step``, ``--best``): by default the
**latest** checkpoint, the model whose test accuracy ``results.json`` reports;
``best=True`` the best by eval accuracy: ``results.json``'s ``best_step`` (the trainer's
ranking, which includes the final evaluation), else the best step the checkpoints
record, else the latest; ``step=`` that step.

**Evaluation**: `evaluate` is the trainer's masked evaluation (`train.evaluate` over
`train.eval_step`) of a restored model, `predict_logits` its forward pass
(`train.predict_step`) on images without labels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from attnflax import checkpoint, metrics, parallel, train


class CheckpointNotFoundError(FileNotFoundError):
    """No workdir, no checkpoint in it, or not the requested step."""


@dataclasses.dataclass(frozen=True)
class Trained:
    """A restored model and what it was trained on.

    Attributes:
      model: The Flax module (``model.apply(variables, x, train=False)`` -> logits).
      variables: ``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models,
        replicated on `mesh`.
      config: The training config (JSON lists turned back into tuples).
      meta: The checkpoint's meta dict.
      step: The restored step.
      workdir: The workdir it came from.
      mesh: The devices holding `variables` (`evaluate` lays batches out on it: make
        them for ``mesh.size`` devices).
    """

    model: Any
    variables: Any
    config: ml_collections.ConfigDict
    meta: dict[str, Any]
    step: int
    workdir: str
    mesh: jax.sharding.Mesh

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.meta["image_shape"])  # type: ignore[return-value]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(m) for m in self.meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.meta["std"])

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names")
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    @property
    def label(self) -> str:
        """A short name: ``<model> (<attention>) step <n>``."""
        kind = self.meta.get("model_kwargs", {}).get("attention")
        return f"{self.meta['model']}{f' ({kind})' if kind else ''} step {self.step}"


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_meta(meta: dict[str, Any]) -> ml_collections.ConfigDict:
    """The training config saved in a checkpoint's meta (lists back to tuples)."""
    return ml_collections.ConfigDict(_tuples(meta["config"]))


def checkpoint_steps(workdir: str) -> list[int]:
    """The finished checkpoint steps in ``workdir/checkpoints``, sorted.

    Raises:
      CheckpointNotFoundError: If the workdir or its checkpoint directory is missing or
        holds no finished checkpoint.
    """
    if not os.path.isdir(workdir):
        raise CheckpointNotFoundError(f"workdir {workdir!r} does not exist.")
    directory = checkpoint.checkpoint_dir(workdir)
    hint = (" Train one first: python -m attnflax.main --config=experiments/configs/digits.py "
            f"--workdir={workdir}")
    if not directory.exists():
        raise CheckpointNotFoundError(
            f"workdir {workdir!r} has no checkpoints/ directory, so no trained model." + hint)
    manager = checkpoint.create_manager(directory, read_only=True)
    try:
        steps = sorted(manager.all_steps())
    finally:
        manager.close()
    if not steps:
        raise CheckpointNotFoundError(f"{os.fspath(directory)} holds no finished checkpoint."
                                      + hint)
    return steps


def select_step(workdir: str, step: int | None = None, best: bool = False) -> int:
    """The checkpoint step of `workdir` that `load_trained` restores (the rule above).

    Raises:
      CheckpointNotFoundError: No workdir, no checkpoint, or no such step (the saved
        steps are listed).
      ValueError: Both `step` and `best`.
    """
    if step is not None and best:
        raise ValueError(f"pass step={step} or best=True, not both.")
    steps = checkpoint_steps(workdir)
    if step is not None:
        if step not in steps:
            raise CheckpointNotFoundError(
                f"No checkpoint for step {step} in {workdir!r}; saved steps: {steps}.")
        return step
    if not best:
        return steps[-1]
    results = os.path.join(workdir, metrics.RESULTS_FILE)
    if os.path.exists(results):
        with open(results, encoding="utf-8") as f:
            ranked = json.load(f).get("best_step")
        if ranked in steps:
            return int(ranked)
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    try:
        ranked = manager.best_step()
    finally:
        manager.close()
    return int(ranked) if ranked in steps else steps[-1]


def load_trained(workdir: str, step: int | None = None, *, best: bool = False,
                 mesh: jax.sharding.Mesh | None = None) -> Trained:
    """Restores the model of `workdir`, replicated on `mesh` (default: one local device).

    Args:
      workdir: A training workdir.
      step: The checkpoint step (default: `select_step`'s rule: the latest).
      best: Restore the best step by eval accuracy instead of the latest.
      mesh: The devices to restore onto.

    Raises:
      CheckpointNotFoundError: No workdir, no checkpoint, or no such step (the saved
        steps are listed).
      ValueError: Both `step` and `best`.
    """
    step = select_step(workdir, step, best)
    if mesh is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), (parallel.DATA_AXIS,))
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    try:
        meta = checkpoint.read_meta(manager, step)
        config = config_from_meta(meta)
        model = train.create_model(config, int(meta["num_classes"]))
        tx, _ = train.create_optimizer(config, total_steps=1, warmup_steps=0)
        abstract = jax.eval_shape(
            lambda: train.init_state(model, tx, tuple(meta["image_shape"]), config.seed))
        target = checkpoint.abstract_target(abstract, parallel.state_shardings(abstract, mesh))
        state = checkpoint.restore_state(manager, step, target)
    finally:
        manager.close()
    return Trained(model, state.variables(), config, meta, int(step), os.fspath(workdir),
                   mesh)


@functools.lru_cache(maxsize=32)
def _predict_fn(model: Any) -> Callable:
    """``jax.jit(train.predict_step)`` of `model`, compiled once per model."""
    return jax.jit(functools.partial(train.predict_step, model=model))


@functools.lru_cache(maxsize=32)
def _eval_fn(model: Any, mesh: jax.sharding.Mesh,
             with_logits: bool) -> Callable:
    return train.make_eval_step(model, mesh, with_logits=with_logits)


def predict_logits(trained: Trained, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 ``[n, classes]`` logits of normalised images ``[n, h, w, c]`` (eval mode)."""
    fn = _predict_fn(trained.model)
    out = [np.asarray(fn(trained.variables, images[i:i + batch_size]), np.float32)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, trained.num_classes), np.float32)


def evaluate(trained: Trained, batches: Iterable[Mapping[str, Any]], *,
             variables: Any = None,
             on_batch: Callable[[Mapping, Mapping], None] | None = None) -> dict[str, Any]:
    """The trainer's exact evaluation (`train.evaluate`) of `trained` over eval `batches`.

    Args:
      trained: From `load_trained`.
      batches: ``{'image', 'label', 'mask'}`` batches for ``trained.mesh.size`` devices
        (an ``EvalIterable``, or a map over one that perturbs the images).
      variables: Other variables of the same model (e.g. pruned ones; default
        ``trained.variables``).
      on_batch: Called with each host batch and the step's host outputs, which then
        include ``'logits'`` (float32 ``[b, classes]``); single process.

    Returns:
      ``{'accuracy', 'loss', 'examples', 'correct'}`` over the real (mask=True) examples.

    Raises:
      ValueError: No real example in `batches`.
    """
    eval_fn = _eval_fn(trained.model, trained.mesh, on_batch is not None)
    result = train.evaluate(eval_fn, trained.variables if variables is None else variables,
                            batches, trained.mesh, on_batch=on_batch)
    if result["examples"] == 0:
        raise ValueError("no examples to evaluate (empty batches or all masked out).")
    return result
