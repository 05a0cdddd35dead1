"""The training config: its defaults, its checks, and its durations in steps."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from attnflax import models
from attnflax.configs import defaults
from attnflax.data.config import check_batch_size

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("adamw", "sgd")

default_config = defaults.train_config


class ConfigError(ValueError):
    """A training config that cannot work; the message names the key."""


def config_get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """``config_get(c, 'data.batch_size')`` -> ``c.data.batch_size``."""
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks values that the config's types alone do not (ranges, names, choices).

    Raises:
      ConfigError: naming the key, the bad value and what would work.
    """

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config.{key}={config_get(config, key)!r}: {what}")

    need(config.model in models.list_models(), "model",
         f"unknown model; known models: {', '.join(models.list_models())}")
    need(config.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
    need(config.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}")
    need(config.learning_rate > 0, "learning_rate", "must be > 0")
    need(config.end_learning_rate_factor >= 0, "end_learning_rate_factor", "must be >= 0")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0 = off)")
    need(0 <= config.label_smoothing < 1, "label_smoothing", "must lie in [0, 1)")
    need(config.data.batch_size >= 1, "data.batch_size", "must be >= 1 (the GLOBAL batch size)")
    need(config.data.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    need(config.num_devices == -1 or config.num_devices >= 1, "num_devices",
         "must be -1 (all devices) or >= 1")
    need(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    need(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(config.keep_best_checkpoints >= 0, "keep_best_checkpoints", "must be >= 0")
    for name, keys in defaults.DURATIONS.items():
        for key in keys:
            value = config.get(key)
            if value is None:
                continue
            if name == "train":
                need(value > 0, key, "the training length must be > 0")
            elif name == "log":
                need(value > 0, key, "must be > 0")
            else:
                need(value >= 0, key, "must be >= 0" + ("" if name == "warmup" else
                                                         " (0 = only at the end)"))
    train_keys = defaults.DURATIONS["train"]
    need(any(config.get(k) is not None for k in train_keys), train_keys[-1],
         f"set the training length: one of {', '.join(train_keys)}")


class Due(NamedTuple):
    """What is due at the end of a step: a log line, an evaluation, a checkpoint."""

    log: bool
    eval: bool
    checkpoint: bool

    def __bool__(self) -> bool:
        return self.log or self.eval or self.checkpoint


@dataclasses.dataclass(frozen=True)
class Durations:
    """A run's durations in steps (`durations`), and what is due when (`due`).

    Attributes:
      total_steps: Train steps of the run.
      warmup_steps: Steps of the learning-rate warm-up (<= total_steps).
      log_every: Train-metric interval (>= 1).
      eval_every: Evaluation interval (0: only at the end).
      checkpoint_every: Checkpoint interval (0: only at the end and when stopped).
    """

    total_steps: int
    warmup_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    def due(self, step: int, stopped: bool = False) -> Due:
        """What is due after `step` steps: the last step has everything due, a stopped
        run logs and checkpoints, others when their interval divides `step`."""
        last = step == self.total_steps

        def every(interval: int) -> bool:
            return interval > 0 and step % interval == 0

        return Due(log=last or stopped or every(self.log_every),
                   eval=last or every(self.eval_every),
                   checkpoint=last or stopped or every(self.checkpoint_every))

    def describe(self) -> str:
        """``'eval every 450, checkpoint every 450, log every 100 steps'`` (0: at the end)."""
        parts = [f"{what} {'every ' + str(n) if n else 'at the end'}" for what, n in
                 (("eval", self.eval_every), ("checkpoint", self.checkpoint_every),
                  ("log", self.log_every))]
        return ", ".join(parts) + " steps"


def to_steps(config: ml_collections.ConfigDict, name: str, train_examples: int) -> int | None:
    """Duration `name` of `defaults.DURATIONS` in steps, from the first of its keys that
    is set (steps, then examples, then epochs); None when none is.

    Examples and epochs round to the nearest step (the training length up); a positive
    duration is at least one step.
    """
    steps_key, examples_key, epochs_key = defaults.DURATIONS[name]
    if config.get(steps_key) is not None:
        return int(config[steps_key])
    if config.get(examples_key) is not None:
        steps = config[examples_key] / config.data.batch_size
    elif config.get(epochs_key) is not None:
        steps = config[epochs_key] * (train_examples / config.data.batch_size)
    else:
        return None
    rounded = int(math.ceil(steps) if name == "train" else round(steps))
    return max(1, rounded) if steps > 0 else 0


def durations(config: ml_collections.ConfigDict, train_examples: int) -> Durations:
    """The run's `Durations` in steps, for `train_examples` examples per epoch.

    Raises:
      ConfigError: no training length is set.
    """
    total = to_steps(config, "train", train_examples)
    if total is None:
        validate_config(config)  # Raises, naming the keys.
    total = max(1, total)

    def steps(name: str) -> int:
        value = to_steps(config, name, train_examples)
        return defaults.FALLBACK[name] if value is None else value

    return Durations(total_steps=total, warmup_steps=min(steps("warmup"), total),
                     log_every=max(1, steps("log")), eval_every=steps("eval"),
                     checkpoint_every=steps("checkpoint"))


def check_batch_layout(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The one batch-size check (`attnflax.data.config.check_batch_size`) of
    ``config.data.batch_size`` with ``config.grad_accum_steps``, on every process.

    Raises:
      attnflax.data.DataError: naming ``data.batch_size`` and (when > 1) ``grad_accum_steps``.
    """
    check_batch_size("batch_size", config.data.batch_size, num_devices, jax.process_count(),
                     grad_accum_steps=config.grad_accum_steps)
