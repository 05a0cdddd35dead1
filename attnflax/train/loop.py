"""The train loop: ``train_and_evaluate(config, workdir)``.

Set-up (workdir lock, checks of both splits' files, the sharded state, the newest intact
checkpoint, the compiled step), then one loop: host batch -> global ``jax.Array`` ->
step; at the boundaries the `Durations` make due, a log line, an evaluation and a
checkpoint. Step metrics are read one step late, so the host never stalls the device.
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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

import attnflax
from attnflax import checkpoint, data, metrics, parallel, signals
from attnflax.metrics import CONFIG_FILE, RESULTS_FILE
from attnflax.pytree import count_params
from attnflax.report import write_json
from attnflax.train.config import (
    ConfigError,
    Durations,
    check_batch_layout,
    durations,
    validate_config,
)
from attnflax.train.optim import create_optimizer
from attnflax.train.state import TrainState, create_model, create_train_state
from attnflax.train.steps import abstract_batch, evaluate, make_eval_step, train_step

# In multi-process jobs the processes agree on a stop signal every this many steps.
_STOP_SYNC_EVERY = 10
# Training figures of a finished run that a re-run (which trains no step) keeps.
_TRAINING_FIGURES = ("train_images_per_second", "train_seconds", "compile_seconds",
                     "resumed_from_step")


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; `step` is the first bad step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


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


# --------------------------------------------------------------------------- the loop's parts


_AVERAGED = ("loss", "accuracy", "grad_norm")  # step metrics averaged over an interval


@dataclasses.dataclass
class _Interval:
    """Host-side sums of the step metrics since the last log line."""

    sums: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(_AVERAGED, 0.0))
    learning_rate: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def add(self, step_metrics: Mapping[str, Any]) -> None:
        for key in _AVERAGED:
            self.sums[key] += float(step_metrics[key])
        self.learning_rate = float(step_metrics["learning_rate"])
        self.steps += 1

    def scalars(self, batch_size: int, seconds: float) -> dict[str, float]:
        """The interval's averages, and its images/s over `seconds`."""
        return {**{key: total / self.steps for key, total in self.sums.items()},
                "learning_rate": self.learning_rate,
                "images_per_second": self.steps * batch_size / max(seconds, 1e-9)}


def _all_finite(state: TrainState) -> jax.Array:
    """bool []: every float of the params, batch stats and optimiser state is finite."""
    leaves = [x for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _kept(last_saved: int | None, ckpt_dir: str) -> str:
    return (f"the last good checkpoint (step {last_saved}) in {ckpt_dir} is kept"
            if last_saved is not None else "no checkpoint had been saved yet")


_DIVERGED_HINT = ("Try a lower --config.learning_rate, a smaller --config.grad_clip_norm or "
                  "--config.dtype=float32.")


def _check_finite(step: int, step_metrics: Mapping[str, Any], last_saved: int | None,
                  ckpt_dir: str) -> None:
    """Raises `NonFiniteLossError` if step `step`'s loss or gradient norm is NaN/inf."""
    loss, gnorm = float(step_metrics["loss"]), float(step_metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(gnorm):
        return
    raise NonFiniteLossError(
        f"Training diverged at step {step}: loss={loss}, gradient norm={gnorm}. The state "
        f"of this step was not saved; {_kept(last_saved, ckpt_dir)}. {_DIVERGED_HINT}", step)


def make_results(config: ml_collections.ConfigDict, workdir: str, eval_result: Mapping,
                 *, step: int, start_step: int, trained_steps: int, train_seconds: float,
                 compile_seconds: float, wall_seconds: float, num_params: int,
                 params_sha256: str, best_step: int, mesh: Mesh, ckpt_dir: str
                 ) -> dict[str, Any]:
    """The run's results (``results.json``). A re-run of a finished run (no step trained)
    keeps the training figures of the ``results.json`` already in `workdir`."""
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
        "wall_seconds": wall_seconds,
        "params": num_params,
        "params_sha256": params_sha256,
        "best_step": best_step,
        "devices": mesh.size,
        "processes": jax.process_count(),
        "checkpoint_dir": ckpt_dir,
        "config": json.loads(config.to_json_best_effort()),
    }
    path = os.path.join(workdir, RESULTS_FILE)
    if trained_steps == 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        for key in _TRAINING_FIGURES:
            results[key] = previous.get(key, results[key])
    return results


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Trains `config`'s model, evaluating and checkpointing into `workdir`.

    Resumes automatically from the newest intact checkpoint in ``workdir/checkpoints``
    (damaged newer steps are reported and moved to ``checkpoints_damaged/``). One run
    per workdir (a lock). A state is saved only if it is finite; the trained state is
    saved before the final evaluation, so an error there loses nothing.

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
    console = metrics.Console(enabled=jax.process_index() == 0)
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


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                        console: metrics.Console, wall_start: float) -> dict[str, Any]:
    """`train_and_evaluate` once the workdir is locked (`console` prints its messages)."""
    is_main = jax.process_index() == 0

    # Devices, data (both splits' files checked now, not after the training), model.
    check_batch_layout(config, mesh.size)
    info = data.get_dataset_info(config.data)
    from attnflax.data.sources import open_source

    source = open_source(config.data)
    source.check_files(config.data.train_split)
    source.check_files(config.data.eval_split, decode=True)
    run: Durations = durations(config, data.num_examples(config.data))
    total_steps = run.total_steps
    model = create_model(config, info.num_classes)
    tx, schedule = create_optimizer(config, total_steps, run.warmup_steps)

    # State: created sharded, then replaced by the newest intact checkpoint if any.
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
            raise NonFiniteLossError(
                f"Training diverged by step {step}: the parameters or optimiser state hold "
                f"NaN/inf. This state was not saved; {_kept(last_saved, ckpt_dir)}. "
                f"{_DIVERGED_HINT}", step)
        return checkpoint.save(manager, step, state, {**meta, "step": step}, metrics=(
            None if eval_metrics is None else {"accuracy": eval_metrics["accuracy"]}))

    num_params = count_params(state.params)
    if is_main:
        write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()))

    progress = metrics.Progress(total_steps, enabled=is_main, stream=console.stream)
    console.message(
        f"attnflax: {config.model} ({num_params:,} params) on {info.name} "
        f"{tuple(info.image_shape)}, {mesh.size} device(s), {jax.process_count()} process(es); "
        f"{total_steps} steps of {config.data.batch_size} images ({run.describe()}); "
        f"workdir {workdir}")
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
                          label_smoothing=config.label_smoothing,
                          grad_accum_steps=config.grad_accum_steps, mesh=mesh),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = make_eval_step(model, mesh)
    compile_seconds = 0.0
    if start_step < total_steps:  # Compiled ahead of time, to measure the compile alone.
        compile_start = time.perf_counter()
        step_fn = step_fn.lower(
            state, abstract_batch(config.data.batch_size, info.image_shape, mesh)).compile()
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
                stopped = step < total_steps and (
                    stop.requested if jax.process_count() == 1 else
                    step % _STOP_SYNC_EVERY == 0 and parallel.any_process(stop.requested))
                due = run.due(step, stopped)
                if not due:
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

                if due.log:
                    scalars = interval.scalars(config.data.batch_size, interval.seconds)
                    writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                    progress.update(step, scalars)
                    interval = _Interval()
                if step == total_steps and step not in manager.all_steps() and save(step):
                    # The trained state is on disk before the final evaluation runs.
                    last_saved = step
                if due.eval:
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
                if due.checkpoint and save(step, eval_result if due.eval else None):
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

    results = make_results(
        config, workdir, eval_result, step=step, start_step=start_step,
        trained_steps=trained_steps, train_seconds=train_seconds,
        compile_seconds=compile_seconds, wall_seconds=time.perf_counter() - wall_start,
        num_params=num_params, params_sha256=parallel.fingerprint(state.params, mesh),
        best_step=best_step, mesh=mesh, ckpt_dir=ckpt_dir)
    if is_main:
        write_json(os.path.join(workdir, RESULTS_FILE), results)
    console.message(
        f"Test accuracy {100 * results['test_accuracy']:.2f}% "
        f"({results['test_correct']}/{results['test_examples']}) after {step} steps; "
        f"results in {os.path.join(workdir, RESULTS_FILE)}")
    return results
