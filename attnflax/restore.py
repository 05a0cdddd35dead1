"""Restore a trained model from a training workdir, for the experiment scripts.

A workdir written by `attnflax.train.train_and_evaluate` holds Orbax checkpoints under
``workdir/checkpoints/<step>/`` with a ``state`` item (params, batch stats, optimiser
state, ...) and a ``meta`` item (model name and arguments, dataset, image shape,
normalisation, class names and the full config). :func:`load_trained` reads the meta,
rebuilds the model from the registry and restores only what inference needs onto one
device.

The default step is the **latest** one: the model whose test accuracy
``results.json`` reports. (``experiments/evaluate.py`` defaults to the best step by eval
accuracy, which is the test split in the shipped configs; pass ``step=`` to match it.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from attnflax import checkpoint, train


class CheckpointNotFoundError(FileNotFoundError):
    """No workdir, no checkpoint in it, or not the requested step."""


@dataclasses.dataclass(frozen=True)
class Trained:
    """A restored model and what it was trained on.

    Attributes:
      model: The Flax module (``model.apply(variables, x, train=False)`` -> logits).
      variables: ``{'params': ...}`` plus ``'batch_stats'`` for BatchNorm models, on one
        device.
      config: The training config (JSON lists turned back into tuples).
      meta: The checkpoint's meta dict.
      step: The restored step.
      workdir: The workdir it came from.
    """

    model: Any
    variables: Any
    config: ml_collections.ConfigDict
    meta: dict[str, Any]
    step: int
    workdir: str

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


def load_trained(workdir: str, step: int | None = None) -> Trained:
    """Restores the model of `workdir` at `step` (default: the latest) onto one device.

    Raises:
      CheckpointNotFoundError: No workdir, no checkpoint, or no such step (the saved
        steps are listed).
    """
    steps = checkpoint_steps(workdir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointNotFoundError(
            f"no checkpoint for step {step} in {workdir!r}; saved steps: {steps}.")
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    try:
        meta = checkpoint.read_meta(manager, step)
        config = config_from_meta(meta)
        model = train.create_model(config, int(meta["num_classes"]))
        tx, _ = train.create_optimizer(config, total_steps=1, warmup_steps=0)
        abstract = jax.eval_shape(
            lambda: train.init_state(model, tx, tuple(meta["image_shape"]), config.seed))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state = checkpoint.restore_state(manager, step, target)
    finally:
        manager.close()
    return Trained(model, state.variables(), config, meta, int(step), os.fspath(workdir))


@functools.lru_cache(maxsize=32)
def jitted_logits(model: Any) -> Any:
    """``jax.jit((variables, images) -> eval-mode logits)`` of `model`, cached per model."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def predict_logits(trained: Trained, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 ``[n, classes]`` logits of normalised images ``[n, h, w, c]`` (eval mode)."""
    fn = jitted_logits(trained.model)
    out = [np.asarray(fn(trained.variables, images[i:i + batch_size]), np.float32)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, trained.num_classes), np.float32)


def evaluate_accuracy(model: Any, variables: Any, batches: Any) -> tuple[float, int]:
    """Exact accuracy of `variables` over the masked-in examples of eval `batches`.

    Args:
      model: The Flax module.
      variables: Its variables (e.g. pruned ones).
      batches: ``{'image', 'label', 'mask'}`` batches (an ``EvalIterable``).

    Returns:
      ``(accuracy, examples)``.
    """
    fn = jitted_logits(model)
    correct = count = 0
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        pred = np.asarray(fn(variables, batch["image"])).argmax(-1)
        correct += int(np.sum((pred == np.asarray(batch["label"])) & mask))
        count += int(mask.sum())
    if count == 0:
        raise ValueError("no examples to evaluate.")
    return correct / count, count
