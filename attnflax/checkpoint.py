"""Orbax checkpoints of the train state: save, keep, resume, restore onto any mesh.

Layout of ``workdir/checkpoints/<step>/`` (one Orbax ``CheckpointManager`` step):

* ``state/`` -- the train state as an Orbax ``StandardSave`` item (a pytree of
  arrays: ``step``, ``params``, ``batch_stats``, ``opt_state``, ``rng``). Readable
  without attnflax: ``ocp.StandardCheckpointer().restore('<...>/<step>/state')``
  returns it as nested dicts and lists of arrays.
* ``meta/`` -- JSON (``JsonSave``): the model name and arguments, optimiser, dataset
  shape, parameter shapes and the full config. Read before restoring to refuse a
  checkpoint of a different model with a message that names the difference.
* ``metrics/`` -- the eval metrics of that step, written by Orbax when given, used to
  keep the best checkpoint.

Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices, the files are written in the background, and ``wait_until_finished``
blocks until they are committed. Orbax writes each step into
``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only when complete, so
a save cut short (Ctrl-C, kill, node failure) is never listed as a step or
restored; the manager deletes such leftovers when it opens the directory.

Kept: the last ``keep`` steps plus the ``keep_best`` with the highest eval accuracy.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE_ITEM = "state"
META_ITEM = "meta"
BEST_METRIC = "accuracy"
META_FORMAT = "attnflax-train-state/1"
# The meta fields that must match for a checkpoint to be restored into a run.
MODEL_FIELDS = ("model", "model_kwargs", "optimizer", "num_classes", "image_shape")


class _DropMissingMetricsWarning(std_logging.Filter):
    """Orbax warns on every save without metrics when a best metric is tracked; our
    saves between evaluations (and on SIGTERM) have none by design."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "did not provide metrics" not in str(record.msg)


logging.get_absl_logger().addFilter(_DropMissingMetricsWarning())


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model (or optimiser, or data shape)."""


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    """Where a run's checkpoints live: ``workdir/checkpoints`` (absolute, as Orbax needs)."""
    path = epath.Path(workdir)
    if "://" not in os.fspath(workdir):  # Local paths; gs:// etc. are absolute already.
        path = epath.Path(os.path.abspath(os.fspath(workdir)))
    return path / "checkpoints"


def create_manager(
    directory: str | epath.PathLike,
    *,
    keep: int = 3,
    keep_best: int = 1,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: The checkpoint directory (``workdir/checkpoints``).
      keep: How many of the most recent steps to keep (at least 1).
      keep_best: How many of the steps with the highest eval ``accuracy`` to keep as
        well (0: none beyond the latest ones). Steps saved without metrics count as
        recent steps only.
      async_save: Write in a background thread (``save`` returns once the arrays
        are on the host).
      read_only: Open an existing directory for restoring only (no deletion of
        old or unfinished steps, nothing created).

    Returns:
      An ``ocp.CheckpointManager`` with items ``'state'`` and ``'meta'``.
    """
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be at least 1; got {keep}.")
    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best > 0:
        policies.append(
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[BEST_METRIC], n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m[BEST_METRIC],
        best_mode="max",
        preservation_policy=(
            None if read_only else ocp.checkpoint_managers.AnyPreservationPolicy(policies)
        ),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        epath.Path(directory), item_names=(STATE_ITEM, META_ITEM), options=options
    )


def param_shapes(params: Any) -> dict[str, list[int]]:
    """``{'Conv_0/kernel': [3, 3, 1, 32], ...}`` for a pytree of arrays or shape structs."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): list(leaf.shape)
        for path, leaf in leaves
    }


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (tuples become lists, unknown objects their repr)."""
    return json.loads(json.dumps(value, default=repr))


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Starts an (asynchronous) save of `state` and `meta` at `step`.

    Args:
      manager: From `create_manager`.
      step: The number of completed train steps.
      state: The train state (a pytree of ``jax.Array``s, possibly sharded).
      meta: JSON-serialisable description (see `attnflax.train.checkpoint_meta`).
      metrics: Eval metrics of this step (``{'accuracy': ...}``) to rank best steps.

    Returns:
      Whether a save was started (False if `step` is already saved).
    """
    if step in manager.all_steps():
        return False
    return manager.save(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state),
               META_ITEM: ocp.args.JsonSave(jsonable(dict(meta)))}
        ),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
        force=True,
    )


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON ``meta`` item saved at `step`."""
    restored = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[META_ITEM])


def abstract_target(abstract_state: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s carrying the target shardings, for restoring onto a mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def restore_state(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """Restores the train state saved at `step` onto the shardings in `target`.

    Every array is read straight into the layout of the current mesh, whatever
    the device count of the run that saved it.

    Args:
      manager: From `create_manager`.
      step: A saved step.
      target: The state's structure as ``jax.ShapeDtypeStruct``s with ``sharding``
        set (`abstract_target`).
    """
    restored = manager.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    )
    return restored[STATE_ITEM]


def describe_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any],
                      max_params: int = 5) -> list[str]:
    """The differences between two ``meta`` dicts that make a checkpoint unusable.

    Returns:
      One line per difference (empty if compatible): model fields first, then up to
      `max_params` parameter shapes that were added, removed or reshaped.
    """
    lines = []
    for field in MODEL_FIELDS:
        a, b = jsonable(saved.get(field)), jsonable(current.get(field))
        if a != b:
            lines.append(f"{field}: checkpoint has {a!r}, config asks for {b!r}")
    saved_shapes = saved.get("param_shapes", {})
    shapes = current.get("param_shapes", {})
    params = []
    for name in sorted(set(saved_shapes) | set(shapes)):
        a, b = saved_shapes.get(name), shapes.get(name)
        if a != b:
            params.append(
                f"parameter {name}: checkpoint {'missing' if a is None else tuple(a)}, "
                f"config {'missing' if b is None else tuple(b)}"
            )
    if len(params) > max_params:
        params = params[:max_params] + [f"... and {len(params) - max_params} more parameters"]
    return lines + params


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Raises `CheckpointMismatchError` unless `saved` can be restored into `current`.

    Args:
      saved: The ``meta`` of the checkpoint.
      current: The ``meta`` of the run about to start.
      where: The checkpoint's location, for the message.
    """
    lines = describe_mismatch(saved, current)
    if lines:
        raise CheckpointMismatchError(
            f"{where} holds a checkpoint (step {saved.get('step')}) of a different model:\n  "
            + "\n  ".join(lines)
            + "\nNothing was changed. Use a new --workdir for this config, or resume with the "
            "config the checkpoint was trained with (saved in its 'meta' item)."
        )


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the train loop checks after each step.

    Used as a context manager around the loop. The first signal sets `signum`;
    the loop then saves a checkpoint and returns. A second signal restores the
    default handlers and raises ``KeyboardInterrupt`` (abort without waiting).
    Outside the main thread (where Python cannot install handlers) it does nothing.

    Args:
      signals: The signals to catch.
      on_signal: Called with a message when the first signal arrives.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
                 on_signal: Any = None):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._on_signal = on_signal

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._restore_handlers()
            raise KeyboardInterrupt(f"second {name}: aborting without saving")
        self.signum = signum
        message = (f"Received {name}: saving a checkpoint after this step, then exiting "
                   "(send it again to abort without saving).")
        logging.warning(message)
        if self._on_signal is not None:
            self._on_signal(message)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore_handlers()
