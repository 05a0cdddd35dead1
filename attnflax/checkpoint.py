"""Orbax checkpoints of the train state: save, keep, resume, restore onto any mesh.

Layout of ``workdir/checkpoints/<step>/`` (one Orbax ``CheckpointManager`` step):

* ``state/`` -- the train state as an Orbax ``StandardSave`` item (a pytree of
  arrays: ``step``, ``params``, ``batch_stats``, ``opt_state``, ``rng``). Readable
  without attnflax: ``ocp.StandardCheckpointer().restore('<...>/<step>/state')``
  returns it as nested dicts and lists of arrays.
* ``meta/`` -- JSON (``JsonSave``): the model name and arguments, optimiser, dataset
  shape, parameter shapes and the full config. Read before restoring to refuse a
  checkpoint of a different model with a message that names the difference.
* ``integrity/`` -- JSON (``JsonSave``): the SHA-256 of every array's bytes of ``state``
  (with its dtype and shape, in leaf order) and of the canonical JSON of ``meta``.
  Written in the same Orbax commit as the other items, so a step either has all three
  or is not a step.
* ``metrics/`` -- the eval metrics of that step, written by Orbax when given, used to
  keep the best checkpoint.

Integrity: `restore_state` verifies every restored array against ``integrity`` and
never returns data that fails its checksum (`CheckpointDamagedError`). `verify_step`
also checks the commit markers and the items' files. `restore_newest_intact` (the
trainer's resume) walks the steps from the newest, reports each damaged one in one
warning line and takes the newest intact one; the damaged steps are moved, unchanged,
to ``workdir/checkpoints_damaged/`` for inspection, out of the keep-N rotation (and out
of the way of the step being saved again). With no intact step it raises and changes
nothing.

One writer per workdir: `WorkdirLock` (``fcntl.flock`` on ``workdir/attnflax.lock``,
which records host and pid) is held by the trainer for the whole run, by process 0 of
a multi-process job.

Faults: every failure of Orbax, TensorStore or the file system while saving or
restoring is raised as `CheckpointIOError` with a one-line message (what failed, the
path, what to do); the original exception is its ``__cause__``.

Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices, the files are written in the background, and ``wait_until_finished``
blocks until they are committed. Orbax writes each step into
``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only when complete, so
a save cut short (Ctrl-C, kill, node failure) is never listed as a step or
restored; the manager deletes such leftovers when it opens the directory.

Kept: the last ``keep`` steps plus the ``keep_best`` with the highest eval accuracy.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging as std_logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from attnflax import pytree

STATE_ITEM = "state"
META_ITEM = "meta"
INTEGRITY_ITEM = "integrity"
INTEGRITY_FORMAT = "attnflax-integrity/1"
COMMIT_MARKER = "commit_success.txt"
DAMAGED_DIR = "checkpoints_damaged"
LOCK_FILE = "attnflax.lock"
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


class _DropReadOnlyNotices(std_logging.Filter):
    """Orbax warns about every option a read-only manager overrides and that the
    directory is read-only: what ``create_manager(read_only=True)`` asked for."""

    NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.levelno <= std_logging.WARNING
                    and str(record.msg).startswith(self.NOTICES))


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model (or optimiser, or data shape)."""


class CheckpointDamagedError(ValueError):
    """A checkpoint step that is incomplete or fails its checksums; `step`, `reason`."""

    def __init__(self, message: str, step: int | None = None, reason: str = ""):
        super().__init__(message)
        self.step = step
        self.reason = reason or message


class CheckpointIOError(OSError):
    """Saving or restoring failed in Orbax, TensorStore or the file system (one-line message)."""


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock."""


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
      An ``ocp.CheckpointManager`` with items ``'state'``, ``'meta'`` and ``'integrity'``.
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
        **({"save_interval_steps": 0} if read_only else {}),
    )
    quiet = _DropReadOnlyNotices()
    if read_only:  # Only while this manager is opened: nothing else's logs are touched.
        logging.get_absl_logger().addFilter(quiet)
    try:
        return ocp.CheckpointManager(
            epath.Path(directory), item_names=(STATE_ITEM, META_ITEM, INTEGRITY_ITEM),
            options=options,
        )
    finally:
        logging.get_absl_logger().removeFilter(quiet)


def param_shapes(params: Any) -> dict[str, list[int]]:
    """``{'Conv_0/kernel': [3, 3, 1, 32], ...}`` for a pytree of arrays or shape structs."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {pytree.path_name(path): list(leaf.shape) for path, leaf in leaves}


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (tuples become lists, unknown objects their repr)."""
    return json.loads(json.dumps(value, default=repr))


def _host_value(leaf: Any) -> np.ndarray:
    """The full value of one leaf on this host (an all-gather for sharded multi-host arrays)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _sha256(value: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()


def array_checksums(tree: Any) -> list[list[Any]]:
    """``[[name, dtype, shape, sha256 of the C-order bytes], ...]`` per leaf, in leaf order.

    A collective call in multi-process jobs when leaves are sharded across hosts.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    local = [not isinstance(x, jax.Array) or x.is_fully_addressable for _, x in leaves]
    fetched = iter(jax.device_get([x for (_, x), ok in zip(leaves, local, strict=True) if ok]))
    entries = []
    for (path, leaf), ok in zip(leaves, local, strict=True):
        value = np.asarray(next(fetched)) if ok else _host_value(leaf)
        name = pytree.path_name(path)
        entries.append([name, str(value.dtype), list(value.shape), _sha256(value)])
    return entries


def meta_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a ``meta`` dict (sorted keys, no spaces)."""
    text = json.dumps(jsonable(dict(meta)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _is_enospc(error: BaseException) -> bool:
    return _find_errno(error) == errno.ENOSPC or "No space left on device" in _chain_text(error)


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen and len(seen) < 20:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _chain_text(error: BaseException) -> str:
    return " ".join(str(e) for e in _chain(error))


def _find_errno(error: BaseException) -> int | None:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno:
            return e.errno
    return None


def error_reason(error: BaseException, limit: int = 240) -> str:
    """A short, one-line reason for `error` (its root OS error if there is one)."""
    code = _find_errno(error)
    if code is not None:
        return f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})"
    text = _chain_text(error)
    for marker in ("No space left on device", "Permission denied", "Read-only file system",
                   "Directory not empty", "Disk quota exceeded"):
        if marker in text:
            return marker
    for e in reversed(_chain(error)):  # The innermost message names the real failure.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if lines:
            line = lines[0]
            return f"{type(e).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"
    return type(error).__name__


def _committed_steps(directory: Any) -> list[int]:
    """The step directories Orbax renamed into place (complete saves), sorted."""
    try:
        return sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())
    except OSError:
        return []


def _save_error(error: BaseException, step: int | None, directory: Any) -> CheckpointIOError:
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    steps = _committed_steps(directory)
    intact = (f"the checkpoints up to step {steps[-1]} are complete" if steps else
              "no checkpoint was completed")
    if _is_enospc(error):
        hint = (f"The disk is full: free space there ({intact}), then run the same command "
                "again to resume.")
    else:
        hint = (f"Check that the directory is writable and has space ({intact}), then run "
                "the same command again to resume.")
    err = CheckpointIOError(f"Saving {what} to {os.fspath(directory)} failed: "
                            f"{error_reason(error)}. {hint}")
    err.__cause__ = error
    return err


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Starts an (asynchronous) save of `state`, `meta` and their checksums at `step`.

    The checksums are computed here, synchronously, from the values being saved.

    Args:
      manager: From `create_manager`.
      step: The number of completed train steps.
      state: The train state (a pytree of ``jax.Array``s, possibly sharded).
      meta: JSON-serialisable description (see `attnflax.train.checkpoint_meta`).
      metrics: Eval metrics of this step (``{'accuracy': ...}``) to rank best steps.

    Returns:
      Whether a save was started (False if `step` is already saved).

    Raises:
      CheckpointIOError: this save, or an earlier asynchronous one, failed.
    """
    if step in manager.all_steps():
        return False
    try:  # An earlier asynchronous save that failed is reported as itself.
        manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
        raise _save_error(e, None, manager.directory) from None
    meta = jsonable(dict(meta))
    integrity = {"format": INTEGRITY_FORMAT, "step": int(step),
                 "meta_sha256": meta_checksum(meta), "arrays": array_checksums(state)}
    try:
        return manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardSave(state),
                   META_ITEM: ocp.args.JsonSave(meta),
                   INTEGRITY_ITEM: ocp.args.JsonSave(integrity)}
            ),
            metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
            force=True,
        )
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore/OS errors, made one line
        raise _save_error(e, step, manager.directory) from None


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Blocks until pending saves are committed.

    Raises:
      CheckpointIOError: a pending save failed (e.g. the disk is full).
    """
    try:
        manager.wait_until_finished()
        manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
        raise _save_error(e, None, manager.directory) from None


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for pending saves and closes `manager` (errors as `CheckpointIOError`)."""
    try:
        wait_until_finished(manager)
    finally:
        try:
            manager.close()
        except Exception as e:  # noqa: BLE001
            raise _save_error(e, None, manager.directory) from None


def _damaged(step: int, reason: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"checkpoint step {step} is damaged: {reason}", step, reason)


# OS errors that say nothing about the checkpoint's content: reported, never taken as damage.
_ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOMEM, errno.EIO, errno.EMFILE,
                       errno.ENFILE, errno.ETIMEDOUT, errno.ECONNRESET)


def _restore_items(manager: ocp.CheckpointManager, step: int, **args: Any) -> Any:
    """``manager.restore`` of some items.

    Raises:
      CheckpointIOError: the files could not be read for a reason outside them
        (permissions, memory, I/O error).
      CheckpointDamagedError: any other failure (missing, truncated or garbled files).
    """
    try:
        return manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - whatever Orbax/TensorStore/json raise
        if _find_errno(e) in _ENVIRONMENT_ERRNOS:
            err = CheckpointIOError(
                f"Restoring checkpoint step {step} from {os.fspath(manager.directory)} "
                f"failed: {error_reason(e)}. Nothing was changed; fix that and run the same "
                "command again.")
            raise err from e
        raise _damaged(step, f"cannot read {'/'.join(args)} ({error_reason(e)})") from None


def read_integrity(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The ``integrity`` record of `step` (`CheckpointDamagedError` if missing or garbled)."""
    record = dict(_restore_items(manager, step, **{INTEGRITY_ITEM: ocp.args.JsonRestore()})
                  [INTEGRITY_ITEM] or {})
    if record.get("format") != INTEGRITY_FORMAT or not isinstance(record.get("arrays"), list):
        raise _damaged(step, "its integrity record is missing or not in the format "
                       f"{INTEGRITY_FORMAT!r} (written by another version, or damaged)")
    return record


def read_meta(manager: ocp.CheckpointManager, step: int, verify: bool = True) -> dict[str, Any]:
    """The JSON ``meta`` item saved at `step`, checked against its checksum.

    Raises:
      CheckpointDamagedError: `verify` and the meta (or its integrity record) is missing,
        unreadable or does not match its checksum.
    """
    meta = _restore_items(manager, step, **{META_ITEM: ocp.args.JsonRestore()})[META_ITEM]
    if not isinstance(meta, Mapping):
        raise _damaged(step, f"its meta item is not a JSON object ({type(meta).__name__})")
    meta = dict(meta)
    if verify and meta_checksum(meta) != read_integrity(manager, step)["meta_sha256"]:
        raise _damaged(step, "its meta item does not match its checksum")
    return meta


def abstract_target(abstract_state: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s carrying the target shardings, for restoring onto a mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def verify_arrays(step: int, tree: Any, recorded: Sequence[Sequence[Any]]) -> None:
    """Raises `CheckpointDamagedError` unless `tree`'s leaves match the recorded checksums."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if len(leaves) != len(recorded):
        raise _damaged(step, f"{len(leaves)} arrays restored, {len(recorded)} recorded")
    for (_, leaf), entry in zip(leaves, recorded, strict=True):
        name, dtype, shape, digest = entry
        value = _host_value(leaf)
        if str(value.dtype) != dtype or list(value.shape) != list(shape):
            raise _damaged(step, f"array {name} restored as {value.dtype}{list(value.shape)}, "
                           f"saved as {dtype}{list(shape)}")
        if _sha256(value) != digest:
            raise _damaged(step, f"array {name} fails its SHA-256 checksum: its data "
                           "changed on disk")


def verify_files(directory: str | epath.PathLike, step: int) -> None:
    """Checks the files of step `step` that Orbax's listing does not: the commit markers
    of the step and of its items, and that the items' files are there and non-empty.

    Raises:
      CheckpointDamagedError: naming what is missing.
    """
    step_dir = epath.Path(directory) / str(step)
    if not (step_dir / COMMIT_MARKER).exists():
        raise _damaged(step, f"its commit marker {COMMIT_MARKER} is missing")
    for item in (STATE_ITEM, META_ITEM, INTEGRITY_ITEM):
        item_dir = step_dir / item
        if not item_dir.is_dir():
            raise _damaged(step, f"its {item}/ directory is missing")
        if not (item_dir / COMMIT_MARKER).exists():
            raise _damaged(step, f"the commit marker {item}/{COMMIT_MARKER} is missing")
    for name in ("_METADATA", "manifest.ocdbt"):
        path = step_dir / STATE_ITEM / name
        if not path.exists():
            raise _damaged(step, f"{STATE_ITEM}/{name} is missing")
        if path.stat().length == 0:
            raise _damaged(step, f"{STATE_ITEM}/{name} is empty")


def restore_state(manager: ocp.CheckpointManager, step: int, target: Any,
                  verify: bool = True) -> Any:
    """Restores the train state saved at `step` onto the shardings in `target`.

    Every array is read straight into the layout of the current mesh, whatever
    the device count of the run that saved it, then checked against the SHA-256
    recorded at save time.

    Args:
      manager: From `create_manager`.
      step: A saved step.
      target: The state's structure as ``jax.ShapeDtypeStruct``s with ``sharding``
        set (`abstract_target`).
      verify: Check the commit markers and every array's checksum (default).

    Raises:
      CheckpointDamagedError: the step is incomplete, unreadable or fails a checksum;
        nothing that failed its checksum is returned.
    """
    if verify:
        verify_files(manager.directory, step)
        recorded = read_integrity(manager, step)["arrays"]
    state = _restore_items(manager, step, **{STATE_ITEM: ocp.args.StandardRestore(target)}
                           )[STATE_ITEM]
    if verify:
        verify_arrays(step, state, recorded)
    return state


def _all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (collective in multi-process jobs)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def _quarantine(directory: epath.Path, step: int) -> str:
    """Moves ``<directory>/<step>`` unchanged to ``<directory>/../checkpoints_damaged/``."""
    dest_root = directory.parent / DAMAGED_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / str(step)
    n = 1
    while dest.exists():
        dest, n = dest_root / f"{step}.{n}", n + 1
    (directory / str(step)).rename(dest)
    return os.fspath(dest)


def restore_newest_intact(
    manager: ocp.CheckpointManager,
    target: Any,
    current_meta: Mapping[str, Any],
    where: str,
    warn: Any = None,
    quarantine: bool = True,
) -> tuple[int | None, Any, dict[str, Any] | None]:
    """Restores the newest step that is complete and passes its checksums.

    Each damaged step newer than it is reported in one warning line (step, what is
    wrong) and, if `quarantine` (the trainer's case, holding the workdir lock), moved
    unchanged to ``workdir/checkpoints_damaged/`` -- out of the keep-N rotation and out
    of the way of the step being saved again -- once an intact step was found.

    Args:
      manager: From `create_manager`.
      target: `abstract_target` of the state.
      current_meta: The meta of the run about to start (for `check_compatible`).
      where: The workdir, for messages.
      warn: Called with each one-line warning (default ``logging.warning``).
      quarantine: Move the damaged steps aside.

    Returns:
      ``(step, state, meta)``, or ``(None, None, None)`` if there is no checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint is of another model.
      CheckpointDamagedError: there are checkpoints but none is intact (nothing changed).
    """
    warn = warn or logging.warning
    damaged: list[CheckpointDamagedError] = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem: CheckpointDamagedError | None = None
        try:
            verify_files(manager.directory, step)
            meta = read_meta(manager, step)
        except CheckpointDamagedError as e:
            problem = e
        if _all_processes(problem is None):
            check_compatible(meta, current_meta, where)
            try:
                state = restore_state(manager, step, target)
            except CheckpointDamagedError as e:
                problem = e
        if not _all_processes(problem is None):
            problem = problem or _damaged(step, "it is damaged as another process reads it")
            damaged.append(problem)
            continue
        for bad in damaged:
            dest = (_quarantine(epath.Path(manager.directory), bad.step)
                    if quarantine and jax.process_index() == 0 else None)
            moved = f"moved unchanged to {dest} for inspection" if dest else "left in place"
            warn(f"checkpoint step {bad.step} in {os.fspath(manager.directory)} is damaged "
                 f"({bad.reason}); skipped ({moved}), resuming from step {step}.")
        if damaged and quarantine:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("attnflax:quarantine")
            manager.reload()
        return step, state, meta
    if damaged:
        steps = ", ".join(f"step {e.step} ({e.reason})" for e in damaged)
        raise CheckpointDamagedError(
            f"No intact checkpoint in {os.fspath(manager.directory)}: {steps}. Nothing was "
            f"changed. Restore the directory from a backup, or move it aside to train from "
            "scratch.")
    return None, None, None


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """One writer per workdir: an exclusive ``fcntl.flock`` on ``workdir/attnflax.lock``.

    The file records ``host pid`` of the holder. `acquire` never waits: if another
    process holds the lock it raises `WorkdirLockedError` naming the holder. The kernel
    drops the lock of a process that died (SIGKILL, crash), so a lock file left behind
    is taken over, with a message naming the dead holder. `release` deletes the file
    while still holding the lock; `acquire` checks that the file it locked is still the
    one at the path (so a file deleted in between is never trusted).

    Used as a context manager. Multi-process jobs lock once, on process 0
    (`attnflax.train` does that and tells the other processes the outcome).

    Args:
      workdir: The run's directory (must exist).
      on_message: Called with the take-over message (default ``logging.warning``).
    """

    def __init__(self, workdir: str | os.PathLike[str], on_message: Any = None):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
        self._fd: int | None = None
        self._on_message = on_message or logging.warning

    @staticmethod
    def holder_of(path: str) -> str:
        """``'host <h> pid <p>'`` as recorded in the lock file at `path` ('' if none)."""
        try:
            with open(path, encoding="utf-8") as f:
                fields = f.read(512).split()
        except OSError:
            return ""
        if len(fields) >= 2 and fields[1].isdigit():
            return f"host {fields[0]} pid {fields[1]}"
        return ""

    def acquire(self) -> WorkdirLock:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CheckpointIOError(f"Cannot create the workdir lock {self.path}: "
                                        f"{error_reason(e)}. Choose a writable --workdir.") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise CheckpointIOError(f"Cannot lock {self.path}: {error_reason(e)}.") from e
                holder = self.holder_of(self.path) or "another process"
                raise WorkdirLockedError(
                    f"The workdir {os.path.dirname(self.path)} is in use by another run "
                    f"({holder}, lock {self.path}). Wait for it to finish or stop it, or "
                    "use another --workdir.") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # Deleted by its releasing holder after we opened it: retry.
                os.close(fd)
                continue
            previous = self.holder_of(self.path)
            host, pid = socket.gethostname(), os.getpid()
            if previous:
                fields = previous.split()
                alive = fields[1] == host and _pid_alive(int(fields[3]))
                state = "" if alive else ", no longer running,"
                self._on_message(f"Taking over the lock {self.path} left by {previous}{state} "
                                 "(it does not hold it any more).")
            os.ftruncate(fd, 0)
            os.write(fd, f"{host} {pid}\n".encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise CheckpointIOError(f"Cannot lock {self.path}: it keeps being replaced.")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # Closing drops the flock.
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
