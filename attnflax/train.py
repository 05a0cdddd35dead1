"""Training and evaluation: ``train_and_evaluate(config, workdir)``, one readable loop.

::

    from attnflax import train
    config = train.default_config()        # or an experiments/configs/*.py get_config()
    results = train.train_and_evaluate(config, 'runs/digits')

What happens, in order (all of it in `train_and_evaluate`):

1. The workdir is checked for writability and locked (one run per workdir,
   `checkpoint.WorkdirLock`); a ``("data",)`` mesh spans all devices.
2. The files of both splits are checked (image folders: every header against the
   pixel budget, and the eval split decoded once), so a bad file stops the run now,
   not after the training. The model is built from the registry, sized from the
   dataset's metadata.
3. The train state (`TrainState`: step, params, batch stats, Optax state, PRNG key)
   is created already laid out on the mesh (``jax.eval_shape`` then ``jax.jit`` with
   ``out_shardings``); if ``workdir/checkpoints`` holds a checkpoint of the same
   model, the newest intact one (checksums verified; damaged newer steps reported and
   moved to ``checkpoints_damaged/``) is restored onto that layout (any device count).
4. The train step (``jax.jit``, state donated) is compiled ahead of time, so its
   compile time is measured on its own.
5. The loop: host batch -> global ``jax.Array`` sharded over ``data`` -> step. Step
   metrics are read one step late, so the host never stalls the device; a NaN/inf
   loss or gradient stops the run naming the step, without saving the bad state.
   Every ``log_every_steps`` the averages go to TensorBoard, ``metrics.jsonl`` and the
   console (which also gets a line at the first step and then at least every 10 s on a
   terminal, `metrics.Progress`); every ``eval_every_steps`` the eval split is
   evaluated exactly (global sums over the mask); every ``checkpoint_every_steps`` an
   asynchronous Orbax save starts. SIGTERM/SIGINT make the loop save and return.
   A state is saved only if its parameters and optimiser state are finite.
6. A final checkpoint, then the final evaluation (so an error there loses nothing),
   ``workdir/results.json``.

Weight decay applies only to leaves named ``kernel`` (conv and dense weights), never
to norms, biases, attention log-scales or position biases. Gradient accumulation
splits the global batch into ``grad_accum_steps`` micro-batches inside the step
(``lax.scan``) and sums their gradients of the *global* mean loss, so the update equals
the one of the full batch up to float rounding (BatchNorm models excepted: their
statistics are per micro-batch).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import attnflax
from attnflax import checkpoint, data, metrics, models, parallel, pytree, signals
from attnflax.losses import cross_entropy
from attnflax.pytree import count_params
from attnflax.report import write_json

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("adamw", "sgd")
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
# In multi-process jobs the processes agree on a stop signal every this many steps.
_STOP_SYNC_EVERY = 10


class ConfigError(ValueError):
    """A training config that cannot work; the message names the key."""


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; `step` is the first bad step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as a pytree of arrays (saved as-is by Orbax).

    Attributes:
      step: int32 [] -- train steps completed; also the data position (the next
        batch is batch number `step` of the train stream).
      params: The model parameters.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: The Optax state.
      rng: uint32 [2] -- the run's base PRNG key; step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict[str, Any]:
        """The model variables for ``model.apply``."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


# --------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """The full training config with its defaults (experiment configs start from it).

    Keys:
      seed: Seeds parameter initialisation and the step keys (the data order has
        its own ``data.seed``).
      data: The data config (`attnflax.data.default_config`): dataset, splits,
        GLOBAL ``batch_size`` and ``eval_batch_size``, augmentation, ...
      model: A name from ``attnflax.models.list_models()``.
      model_kwargs: Extra keyword arguments of the model (e.g. ``attention='local'``).
      attention_implementation: Kernel of the attention layers (``'xla'``, ``'chunked'``,
        ``'cudnn'``; None: the best for the backend and shape). Not part of the model's
        identity: a run may resume with another kernel.
      dtype: Compute dtype, ``'float32'`` or ``'bfloat16'`` (parameters, optimiser
        state, logits and loss stay float32).
      optimizer: ``'adamw'`` (decoupled weight decay) or ``'sgd'`` (momentum, L2
        weight decay added to the gradient).
      learning_rate: Peak learning rate, reached after the warm-up.
      end_learning_rate_factor: Final learning rate as a fraction of the peak.
      warmup_epochs: Linear warm-up from 0, in epochs (capped at the run length);
        then cosine decay to the end.
      momentum, nesterov: SGD momentum (also Adam's ``b1`` for ``adamw``) and Nesterov.
      adam_b2: Adam's ``b2``.
      weight_decay: Weight decay on leaves named ``kernel`` only.
      grad_clip_norm: Clip gradients to this global norm (0: off).
      label_smoothing: Label smoothing of the train cross-entropy (eval: none).
      num_epochs: Training length in epochs of the train split (may be fractional).
      num_train_steps: Training length in steps; overrides `num_epochs` when > 0.
      grad_accum_steps: Micro-batches per step (the global batch must divide by
        ``grad_accum_steps * devices``).
      num_devices: Devices in the mesh (-1: all).
      fsdp: Shard large parameters and optimiser moments over ``data``.
      log_every_steps: Train-metric (and console) interval.
      eval_every_steps: Evaluation interval (0: only at the end).
      checkpoint_every_steps: Checkpoint interval (0: only at the end and on SIGTERM).
      keep_checkpoints: How many recent checkpoints to keep.
      keep_best_checkpoints: How many of the best (by eval accuracy) to keep besides.
      async_checkpointing: Write checkpoints in the background.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data.default_config()
    c.model = "attention_cnn"
    c.model_kwargs = ml_collections.ConfigDict()
    c.attention_implementation = ml_collections.config_dict.placeholder(str)
    c.dtype = "float32"
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.end_learning_rate_factor = 0.0
    c.warmup_epochs = 1.0
    c.momentum = 0.9
    c.nesterov = False
    c.adam_b2 = 0.999
    c.weight_decay = 1e-4
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.0
    c.num_epochs = 10.0
    c.num_train_steps = -1
    c.grad_accum_steps = 1
    c.num_devices = -1
    c.fsdp = False
    c.log_every_steps = 50
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.keep_best_checkpoints = 1
    c.async_checkpointing = True
    return c


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
    need(config.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0 = off)")
    need(0 <= config.label_smoothing < 1, "label_smoothing", "must lie in [0, 1)")
    need(config.data.batch_size >= 1, "data.batch_size", "must be >= 1 (the GLOBAL batch size)")
    need(config.data.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    need(config.num_devices == -1 or config.num_devices >= 1, "num_devices",
         "must be -1 (all devices) or >= 1")
    need(config.num_train_steps > 0 or config.num_epochs > 0, "num_epochs",
         "must be > 0 (or set num_train_steps > 0)")
    need(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    need(config.log_every_steps >= 1, "log_every_steps", "must be >= 1")
    need(config.eval_every_steps >= 0, "eval_every_steps", "must be >= 0 (0 = only at the end)")
    need(config.checkpoint_every_steps >= 0, "checkpoint_every_steps",
         "must be >= 0 (0 = only at the end)")
    need(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(config.keep_best_checkpoints >= 0, "keep_best_checkpoints", "must be >= 0")


def config_get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """``config_get(c, 'data.batch_size')`` -> ``c.data.batch_size``."""
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check_batch_size(batch_size: int, num_devices: int, grad_accum_steps: int = 1,
                     process_count: int | None = None,
                     flag: str = "--config.data.batch_size") -> None:
    """Checks that the global batch splits into micro-batches that split over the devices
    (and into equal per-process parts).

    The one batch-size check of training: the trainer calls it (`check_batch_layout`)
    before anything is built, the benchmarks directly.

    Args:
      batch_size: The GLOBAL batch size.
      num_devices: Devices over all processes.
      grad_accum_steps: Micro-batches per step.
      process_count: Processes of the job (None: ``jax.process_count()``).
      flag: The command-line flag that sets `batch_size`, for the message.

    Raises:
      ConfigError: naming the flag, the multiple it must be and the nearest sizes that work.
    """
    processes = jax.process_count() if process_count is None else process_count
    per_step = grad_accum_steps * num_devices
    unit = math.lcm(per_step, processes)
    if batch_size >= unit and batch_size % unit == 0:
        return
    devices = f"{num_devices} device{'s' if num_devices != 1 else ''}"
    if grad_accum_steps > 1:
        factors = f"config.grad_accum_steps={grad_accum_steps} x {devices}"
        why = "each micro-batch is split evenly over the devices"
    else:
        factors = devices
        why = "the GLOBAL batch is split evenly over the devices"
    if unit != per_step:
        factors += f", and of the {processes} processes"
        why += " and the processes"
    low = max(unit, batch_size // unit * unit)
    high = max(unit, -(-batch_size // unit) * unit)
    sizes = f"{low}" if low == high else f"{low} or {high}"
    raise ConfigError(
        f"{flag.lstrip('-')}={batch_size} must be a positive multiple of {unit} ({factors}): "
        f"{why} (e.g. {flag}={sizes})."
    )


def check_batch_layout(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`check_batch_size` of ``config.data.batch_size`` and ``config.grad_accum_steps``.

    Raises:
      ConfigError: naming ``data.batch_size`` and (when > 1) ``grad_accum_steps``.
    """
    check_batch_size(config.data.batch_size, num_devices, config.grad_accum_steps)


def split_size(data_config: ml_collections.ConfigDict, split: str) -> int:
    """Examples in `split` of the configured dataset (TFDS slicing such as 'train[:90%]' works)."""
    info = data.get_dataset_info(data_config)
    if split in info.split_sizes:
        return int(info.split_sizes[split])
    from attnflax.data.sources import open_source  # Sliced or unlisted splits: count them.

    return int(sum(open_source(data_config).shard_sizes(split, 1)))


def schedule_lengths(config: ml_collections.ConfigDict, train_examples: int) -> tuple[int, int]:
    """``(total_steps, warmup_steps)`` from epochs (or ``num_train_steps``) and the batch size."""
    steps_per_epoch = train_examples / config.data.batch_size
    if config.num_train_steps > 0:
        total = int(config.num_train_steps)
    else:
        total = max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total)
    return total, warmup


# --------------------------------------------------------------------------- model & optimiser


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The configured model from the registry, with the compute dtype.

    Raises:
      ConfigError: the registry refused ``config.model`` / ``config.model_kwargs``.
    """
    try:
        return models.create_model(
            config.model, num_classes=num_classes, dtype=DTYPES[config.dtype],
            attention_implementation=config.get("attention_implementation"),
            **config.model_kwargs.to_dict(),
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model={config.model!r} with config.model_kwargs="
                          f"{config.model_kwargs.to_dict()}: {e}") from e


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


# --------------------------------------------------------------------------- state


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               image_shape: tuple[int, ...], seed: int) -> TrainState:
    """A fresh `TrainState` (call under ``jax.jit``/``jax.eval_shape``)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({"params": init_rng}, jnp.zeros((1, *image_shape), jnp.float32),
                           train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=train_rng,
    )


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
    seed: int, mesh: Mesh, fsdp: bool = False,
) -> tuple[TrainState, Any]:
    """Creates the train state directly in its sharded layout.

    Returns:
      ``(state, shardings)``: the state on the mesh and the pytree of its
      ``NamedSharding``s (the restore target and the step's in/out shardings).
    """
    init = functools.partial(init_state, model, tx, tuple(image_shape), seed)
    abstract = jax.eval_shape(init)
    shardings = parallel.state_shardings(abstract, mesh, fsdp=fsdp)
    return jax.jit(init, out_shardings=shardings)(), shardings


# --------------------------------------------------------------------------- steps


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
    num_classes: int,
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
      num_classes: Logits per example.
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
              model: nn.Module, num_classes: int,
              with_logits: bool = False) -> dict[str, jax.Array]:
    """Sums over the real (mask=True) examples of one eval batch.

    Returns:
      ``{'correct': int32, 'loss_sum': float32, 'count': int32}`` (replicated), and with
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


def make_eval_step(model: nn.Module, num_classes: int, mesh: Mesh,
                   with_logits: bool = False) -> Callable:
    """``eval_step`` jitted with replicated outputs (readable on every process)."""
    return jax.jit(
        functools.partial(eval_step, model=model, num_classes=num_classes,
                          with_logits=with_logits),
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


# --------------------------------------------------------------------------- workdir & meta


def prepare_workdir(workdir: str | os.PathLike[str]) -> str:
    """Creates `workdir` if needed and checks that files can be written in it.

    Raises:
      WorkdirError: naming the directory and the reason.
    """
    path = os.path.abspath(os.fspath(workdir))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise WorkdirError(
            f"Cannot write to workdir {path!r}: {e.strerror or e}. Choose a writable --workdir."
        ) from e
    return path


def checkpoint_meta(config: ml_collections.ConfigDict, info: data.DatasetInfo,
                    params: Any, step: int = 0) -> dict[str, Any]:
    """What a checkpoint says about itself (its JSON ``meta`` item)."""
    return {
        "format": checkpoint.META_FORMAT,
        "attnflax_version": attnflax.__version__,
        "step": int(step),
        "model": config.model,
        "model_kwargs": checkpoint.jsonable(config.model_kwargs.to_dict()),
        "optimizer": config.optimizer,
        "num_classes": int(info.num_classes),
        "image_shape": list(info.image_shape),
        "dataset": info.name,
        "class_names": list(info.class_names) if info.class_names else None,
        "mean": list(info.mean),
        "std": list(info.std),
        "batch_size": int(config.data.batch_size),
        "param_shapes": checkpoint.param_shapes(params),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "config": json.loads(config.to_json_best_effort()),
    }


def restore_latest(manager: Any, state: TrainState, shardings: Any,
                   meta: Mapping[str, Any], where: str,
                   warn: Callable[[str], None] | None = None) -> TrainState:
    """`state` replaced by the newest intact, compatible checkpoint in `manager`, if any.

    Damaged steps newer than it are reported (one line each) and moved aside
    (`checkpoint.restore_newest_intact`).

    Raises:
      checkpoint.CheckpointMismatchError: the latest checkpoint is of another model.
      checkpoint.CheckpointDamagedError: there are checkpoints, none of them intact.
    """
    abstract = jax.eval_shape(lambda: state)
    step, restored, saved = checkpoint.restore_newest_intact(
        manager, checkpoint.abstract_target(abstract, shardings), meta, where, warn=warn)
    if step is None:
        return state
    if saved.get("batch_size") != meta["batch_size"]:
        logging.warning("Resuming with batch_size %s (checkpoint: %s): the data position "
                        "counts steps, so the example order differs from the original run.",
                        meta["batch_size"], saved.get("batch_size"))
    return restored


def abstract_batch(global_batch: int, info: data.DatasetInfo, mesh: Mesh) -> dict[str, Any]:
    """The train batch as ``ShapeDtypeStruct``s sharded over ``data`` (for AOT compiling)."""
    sharding = parallel.batch_sharding(mesh)
    return {
        "image": jax.ShapeDtypeStruct((global_batch, *info.image_shape), jnp.float32,
                                      sharding=sharding),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((global_batch,), jnp.bool_, sharding=sharding),
    }


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Interval:
    """Host-side sums of the step metrics since the last log line."""

    loss: float = 0.0
    accuracy: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    learning_rate: float = 0.0

    def add(self, step_metrics: Mapping[str, Any]) -> None:
        self.loss += float(step_metrics["loss"])
        self.accuracy += float(step_metrics["accuracy"])
        self.grad_norm += float(step_metrics["grad_norm"])
        self.learning_rate = float(step_metrics["learning_rate"])
        self.steps += 1

    def scalars(self, batch_size: int, seconds: float) -> dict[str, float]:
        """The interval's averages, and its images/s over `seconds`."""
        return {
            "loss": self.loss / self.steps,
            "accuracy": self.accuracy / self.steps,
            "grad_norm": self.grad_norm / self.steps,
            "learning_rate": self.learning_rate,
            "images_per_second": self.steps * batch_size / max(seconds, 1e-9),
        }


def _all_finite(state: TrainState) -> jax.Array:
    """bool []: every float of the params, batch stats and optimiser state is finite."""
    leaves = [x for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_finite(step: int, step_metrics: Mapping[str, Any], last_saved: int | None,
                  ckpt_dir: str) -> None:
    """Raises `NonFiniteLossError` if step `step`'s loss or gradient norm is NaN/inf."""
    loss, gnorm = float(step_metrics["loss"]), float(step_metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(gnorm):
        return
    kept = (f"the last good checkpoint (step {last_saved}) in {ckpt_dir} is kept"
            if last_saved is not None else "no checkpoint had been saved yet")
    raise NonFiniteLossError(
        f"Training diverged at step {step}: loss={loss}, gradient norm={gnorm}. The state "
        f"of this step was not saved; {kept}. Try a lower "
        "--config.learning_rate, a smaller --config.grad_clip_norm or --config.dtype=float32.",
        step)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Trains `config`'s model, evaluating and checkpointing into `workdir`.

    Resumes automatically from the latest checkpoint in ``workdir/checkpoints``.

    Args:
      config: A training config (`default_config` and the experiment configs).
      workdir: Where checkpoints, TensorBoard events, ``metrics.jsonl``,
        ``config.json`` and ``results.json`` go.

    Returns:
      The results dict (also written to ``workdir/results.json`` when the run
      completes): ``test_accuracy``, ``test_loss``, ``test_examples``, ``train_steps``,
      ``train_images_per_second``, ``compile_seconds``, ``wall_seconds``, ``params``,
      ... and ``config``. A run stopped by SIGTERM/SIGINT returns
      ``{'interrupted': True, 'signal': ..., 'train_steps': ...}`` after saving.

    Raises:
      ConfigError, WorkdirError, checkpoint.CheckpointMismatchError,
      checkpoint.CheckpointDamagedError (no intact checkpoint), checkpoint.CheckpointIOError
      (a save or restore failed: disk full, ...), checkpoint.WorkdirLockedError (another
      run uses the workdir), NonFiniteLossError, data.DataError: with messages that say
      what to do.
    """
    wall_start = time.perf_counter()
    validate_config(config)
    workdir = prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    console = metrics.Console(enabled=is_main)  # The progress lines come once sized.
    try:
        mesh = parallel.create_mesh(config.num_devices)
    except ValueError as e:
        raise ConfigError(f"config.num_devices={config.num_devices}: {e}") from None
    lock = lock_workdir(workdir, console.message)
    try:
        return _train_and_evaluate(config, workdir, mesh, console, wall_start)
    finally:
        if lock is not None:
            lock.release()


def lock_workdir(workdir: str, on_message: Callable[[str], None]
                 ) -> checkpoint.WorkdirLock | None:
    """Takes the workdir's lock on process 0; every process learns whether it worked.

    Returns:
      The held lock (process 0) or None (other processes).

    Raises:
      checkpoint.WorkdirLockedError: another run holds it (on every process).
    """
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = checkpoint.WorkdirLock(workdir, on_message=on_message).acquire()
        except (checkpoint.WorkdirLockedError, checkpoint.CheckpointIOError) as e:
            error = e
    if parallel.any_process(error is not None):
        if error is not None:
            raise error
        raise checkpoint.WorkdirLockedError(
            f"Process 0 could not lock the workdir {workdir} (see its message).")
    return lock


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                        console: metrics.Console, wall_start: float) -> dict[str, Any]:
    """`train_and_evaluate` once the workdir is locked (`console` prints its messages)."""
    is_main = jax.process_index() == 0

    # Devices, data, model, optimiser.
    check_batch_layout(config, mesh.size)
    info = data.get_dataset_info(config.data)
    # Both splits' files are checked before anything trains (eval: decoded once), so a
    # bad file is found now, not after the training.
    from attnflax.data.sources import open_source

    source = open_source(config.data)
    source.check_files(config.data.train_split)
    source.check_files(config.data.eval_split, decode=True)
    total_steps, warmup_steps = schedule_lengths(
        config, split_size(config.data, config.data.train_split))
    model = create_model(config, info.num_classes)
    tx, schedule = create_optimizer(config, total_steps, warmup_steps)

    # State: created sharded, then replaced by the latest checkpoint if there is one.
    state, shardings = create_train_state(model, tx, info.image_shape, config.seed, mesh,
                                          config.fsdp)
    meta = checkpoint_meta(config, info, state.params)
    ckpt_dir = os.fspath(checkpoint.checkpoint_dir(workdir))
    manager = checkpoint.create_manager(
        ckpt_dir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
        async_save=config.async_checkpointing)
    try:
        state = restore_latest(manager, state, shardings, meta, where=f"workdir {workdir}",
                               warn=lambda m: console.message(f"warning: {m}"))
    except BaseException:
        manager.close()
        raise
    start_step = int(jax.device_get(state.step))
    last_saved = manager.latest_step()
    all_finite = jax.jit(_all_finite, out_shardings=parallel.replicated(mesh))

    def save(step: int, eval_metrics: Mapping[str, Any] | None = None) -> bool:
        """Saves `state` at `step` if its parameters and optimiser state are finite."""
        if not bool(jax.device_get(all_finite(state))):
            kept = (f"the last good checkpoint (step {last_saved}) in {ckpt_dir} is kept"
                    if last_saved is not None else "no checkpoint had been saved yet")
            raise NonFiniteLossError(
                f"Training diverged by step {step}: the parameters or optimiser state hold "
                f"NaN/inf. This state was not saved; {kept}. Try a lower "
                "--config.learning_rate, a smaller --config.grad_clip_norm or "
                "--config.dtype=float32.", step)
        return checkpoint.save(manager, step, state, {**meta, "step": step}, metrics=(
            None if eval_metrics is None else {"accuracy": eval_metrics["accuracy"]}))
    num_params = count_params(state.params)
    if is_main:
        write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()))

    progress = metrics.Progress(total_steps, enabled=is_main, stream=console.stream)
    console.message(
        f"attnflax: {config.model} ({num_params:,} params) on {info.name} "
        f"{tuple(info.image_shape)}, {mesh.size} device(s), {jax.process_count()} process(es); "
        f"{total_steps} steps of {config.data.batch_size} images; workdir {workdir}")
    if start_step:
        console.message(f"Resumed from checkpoint step {start_step} in {ckpt_dir}.")

    # Data (positioned at the restored step) and the compiled steps.
    train_iter = data.create_train_iterator(config.data, num_devices=mesh.size,
                                            start_step=start_step)
    if start_step < total_steps:  # Start the input pipeline before the clock does.
        train_iter = itertools.chain([next(train_iter)], train_iter)
    eval_batches = data.create_eval_iterator(config.data, num_devices=mesh.size)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                          num_classes=info.num_classes, label_smoothing=config.label_smoothing,
                          grad_accum_steps=config.grad_accum_steps, mesh=mesh),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = make_eval_step(model, info.num_classes, mesh)
    compile_seconds = 0.0
    if start_step < total_steps:  # Compiled ahead of time, to measure the compile alone.
        compile_start = time.perf_counter()
        step_fn = step_fn.lower(state, abstract_batch(config.data.batch_size, info, mesh)
                                ).compile()
        compile_seconds = time.perf_counter() - compile_start

    writer = metrics.MetricWriter(workdir, enabled=is_main)
    interval, pending = _Interval(), None
    train_seconds, trained_steps = 0.0, 0
    eval_result: dict[str, Any] | None = None
    step, stopped = start_step, False
    try:
        with signals.StopSignal(on_signal=console.message) as stop:
            tick = time.perf_counter()
            progress.start(step)  # The ETA's clock: compilation and set-up excluded.
            while step < total_steps:
                batch = parallel.host_to_global(next(train_iter), mesh)
                state, step_metrics = step_fn(state, batch)
                step += 1
                # Read the previous step's metrics while this one runs on the device.
                if pending is not None:
                    _check_finite(pending[0], pending[1], last_saved, ckpt_dir)
                    interval.add(pending[1])
                pending = (step, step_metrics)

                # All processes agree on stopping (a signal may reach only some of them).
                is_last = step == total_steps
                stopped = not is_last and (
                    stop.requested if jax.process_count() == 1 else
                    step % _STOP_SYNC_EVERY == 0 and parallel.any_process(stop.requested))
                do_log = step % config.log_every_steps == 0 or is_last or stopped
                do_eval = is_last or (config.eval_every_steps
                                      and step % config.eval_every_steps == 0)
                do_ckpt = is_last or stopped or (config.checkpoint_every_steps
                                                 and step % config.checkpoint_every_steps == 0)
                if not (do_log or do_eval or do_ckpt):
                    if interval.steps:  # By time: step - 1 is done (its metrics were read).
                        progress.maybe_update(step - 1, functools.partial(
                            interval.scalars, config.data.batch_size,
                            time.perf_counter() - tick))
                    continue

                # A boundary: everything up to `step` is on the host and known finite.
                host_metrics = jax.device_get(pending[1])
                _check_finite(step, host_metrics, last_saved, ckpt_dir)
                interval.add(host_metrics)
                pending = None
                interval.seconds += time.perf_counter() - tick
                train_seconds += interval.seconds
                trained_steps += interval.steps

                if do_log:
                    scalars = interval.scalars(config.data.batch_size, interval.seconds)
                    writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                    progress.update(step, scalars)
                    interval = _Interval()
                if is_last and step not in manager.all_steps() and save(step):
                    # The trained state is on disk before the final evaluation runs.
                    last_saved = step
                if do_eval:
                    try:
                        eval_result = evaluate(eval_fn, state.variables(), eval_batches, mesh)
                    except Exception:
                        if step not in manager.all_steps() and save(step):
                            last_saved = step
                        checkpoint.wait_until_finished(manager)
                        console.message(f"Evaluation at step {step} failed; the state of "
                                        f"step {step} is saved in {ckpt_dir}.")
                        raise
                    writer.write_scalars(step, {"eval/accuracy": eval_result["accuracy"],
                                                "eval/loss": eval_result["loss"]})
                    console.message(
                        f"eval at step {step}: accuracy {100 * eval_result['accuracy']:.2f}% "
                        f"({eval_result['correct']}/{eval_result['examples']}), "
                        f"loss {eval_result['loss']:.4f}")
                if do_ckpt and save(step, eval_result if do_eval else None):
                    last_saved = step
                if stopped:
                    break
                tick = time.perf_counter()

        if stopped:
            checkpoint.wait_until_finished(manager)
            name = signal.Signals(stop.signum or signal.SIGTERM).name  # (another process's)
            console.message(f"Stopped by {name} at step {step}; checkpoint saved in "
                            f"{ckpt_dir}. Run the same command again to resume.")
            return {"interrupted": True, "signal": name, "train_steps": step,
                    "checkpoint_dir": ckpt_dir}

        # Already finished earlier (resumed at the end): evaluate the restored state.
        if eval_result is None:
            eval_result = evaluate(eval_fn, state.variables(), eval_batches, mesh)
            if save(step, eval_result):
                last_saved = step
        checkpoint.wait_until_finished(manager)
        best_step = manager.best_step()
        if best_step is None or eval_result["accuracy"] >= (
                manager.metrics(best_step) or {}).get("accuracy", -1.0):
            best_step = step  # The final step is saved before its evaluation, unranked.
    except BaseException:
        writer.close()
        try:  # A pending save is never abandoned half-written.
            checkpoint.close(manager)
        except checkpoint.CheckpointIOError as e:
            logging.warning("%s", e)  # The error already on its way counts.
        raise
    writer.close()
    checkpoint.close(manager)

    results = {
        "test_accuracy": eval_result["accuracy"],
        "test_loss": eval_result["loss"],
        "test_examples": eval_result["examples"],
        "test_correct": eval_result["correct"],
        "eval_split": config.data.eval_split,
        "train_steps": step,
        "resumed_from_step": start_step,
        "train_images_per_second": (trained_steps * config.data.batch_size / train_seconds
                                    if train_seconds > 0 else None),
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "params": num_params,
        "params_sha256": parallel.fingerprint(state.params, mesh),
        "best_step": best_step,
        "devices": mesh.size,
        "processes": jax.process_count(),
        "checkpoint_dir": ckpt_dir,
        "config": json.loads(config.to_json_best_effort()),
    }
    results_path = os.path.join(workdir, RESULTS_FILE)
    if trained_steps == 0 and os.path.exists(results_path):
        # Re-run of a finished run: fresh evaluation, but keep the training figures.
        with open(results_path, encoding="utf-8") as f:
            previous = json.load(f)
        for key in ("train_images_per_second", "train_seconds", "compile_seconds",
                    "resumed_from_step"):
            results[key] = previous.get(key, results[key])
    if is_main:
        write_json(results_path, results)
    console.message(
        f"Test accuracy {100 * results['test_accuracy']:.2f}% "
        f"({results['test_correct']}/{results['test_examples']}) after {step} steps; "
        f"results in {os.path.join(workdir, RESULTS_FILE)}")
    return results
