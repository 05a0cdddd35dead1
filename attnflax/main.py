r"""The main job: train and evaluate one config into one workdir.

::

    python -m attnflax.main --config=experiments/configs/digits.py --workdir=runs/digits
    python -m attnflax.main --config=experiments/configs/digits.py --workdir=runs/d3 \
        --config.num_epochs=3 --config.data.batch_size=64

``--config.<key>=<value>`` overrides any key of the config file; unknown keys and
values of the wrong type are rejected before anything runs (one ``error:`` line, exit
status 2, as every script's bad command line: `attnflax.cli`). Every error the user can
act on later (bad config value, workdir in use, damaged checkpoints, disk full, corrupt
data, divergence) is printed as one ``error:`` line and exits with status 1; pass
``--verbose`` to see the traceback as well. Running the same
command again resumes from the latest checkpoint in the workdir. SIGTERM/SIGINT
save a checkpoint and exit with status 128 + signal number (143 / 130).

Multi-process jobs (one process per host) pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or the ``JAX_*`` environment variables;
SLURM and TPU pods are detected) -- see `attnflax.parallel.initialize_from_env`.
"""

from __future__ import annotations

import errno
import gc
import logging as std_logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from attnflax import cli  # noqa: E402

# JAX, TensorFlow and the trainer are imported after the flags are parsed (`main`), so
# that ``--help`` answers at once.

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS,
                 argv: Sequence[str] | None = None) -> None:
    """Defines ``--config`` (with its ``--config.<key>`` overrides, read from `argv`,
    default ``sys.argv``), ``--workdir`` and the multi-process flags. Called when run as a
    program, so that importing this module (e.g. in tests) defines no global flags."""
    cli.define_config_flag(flag_values, argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results "
                        "(resumed if it holds a checkpoint).", flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-process jobs: host:port of process 0.", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Multi-process jobs: number of processes.",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "Multi-process jobs: this process's id.",
                         flag_values=flag_values)
    flags.DEFINE_boolean("verbose", False, "Print the traceback of errors too (they are one "
                         "line without it).", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors whose messages are written for the user: printed without a traceback."""
    from attnflax import checkpoint, data, train

    return (
        train.ConfigError,
        train.WorkdirError,
        train.NonFiniteLossError,
        checkpoint.CheckpointMismatchError,
        checkpoint.CheckpointDamagedError,
        checkpoint.CheckpointIOError,
        checkpoint.WorkdirLockedError,
        data.DataError,
    )


def _one_line(error: BaseException) -> str:
    """An error as the line printed to the user: the message (its first line if it is
    not one of ours), and for OS errors the path and what to do."""
    from attnflax import checkpoint

    if isinstance(error, user_errors()):
        return str(error)
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        hint = ("the disk is full: free space there and run the same command again "
                "(it resumes from the last checkpoint)" if error.errno == errno.ENOSPC else
                "fix that and run the same command again (it resumes from the last "
                "checkpoint)")
        return f"{error.strerror or checkpoint.error_reason(error)}{where}: {hint}."
    return checkpoint.error_reason(error)


# Where the background noise of a handled checkpoint failure comes from: Orbax and
# TensorStore's threads, and the asyncio tasks and coroutines they leave behind (the
# project itself does not use asyncio).
_LIBRARIES = ("orbax", "tensorstore", "asyncio")


def _from_libraries(tb: TracebackType | None, *paths: str) -> bool:
    """Whether ``paths`` or a frame of traceback ``tb`` lies in one of `_LIBRARIES`."""
    files = [*paths, *(frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb))]
    return any(f"{os.sep}{name}{os.sep}" in f for f in files for name in _LIBRARIES)


class _QuietLibraryErrors(std_logging.Filter):
    """Drops the libraries' error logs (with tracebacks), e.g. asyncio's "Task exception
    was never retrieved", logged from asyncio's own module whenever the garbage collector
    reaches an Orbax task whose read or write failed."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.ERROR and not record.exc_info:
            return True
        return not _from_libraries(record.exc_info[2] if record.exc_info else None,
                                   record.pathname)


def quiet_library_noise() -> Callable[[], None]:
    """Drops the libraries' error logs, unraisable exceptions ("Exception ignored in:
    <coroutine ...>" when a failed Orbax read is collected), background-thread exceptions
    and never-awaited-coroutine warnings, so that a failure reaches the user once, as the
    one ``error:`` line of `main` (or a one-line warning of a damaged checkpoint). Others
    go to the hooks that were there before.

    Returns:
      A function that restores the previous hooks. `main` never calls it: Orbax's
      abandoned tasks may be collected as late as the interpreter's exit.
    """
    log_filter = _QuietLibraryErrors()
    loggers = [logging.get_absl_logger(), std_logging.getLogger("asyncio"),
               std_logging.getLogger("concurrent.futures")]
    unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook
    warning_filters = list(warnings.filters)

    def on_unraisable(unraisable: Any) -> None:
        if not _from_libraries(unraisable.exc_traceback):
            unraisable_hook(unraisable)

    def on_thread_error(args: Any) -> None:
        if not _from_libraries(args.exc_traceback):
            thread_hook(args)

    def restore() -> None:
        gc.collect()  # Finalises the libraries' abandoned coroutines while still quiet.
        sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook
        warnings.filters[:] = warning_filters
        for logger in loggers:
            logger.removeFilter(log_filter)

    for logger in loggers:
        logger.addFilter(log_filter)
    sys.unraisablehook, threading.excepthook = on_unraisable, on_thread_error
    # The project has no coroutines of its own: these are the libraries' abandoned ones.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    return restore


def _report(error: BaseException, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(error)
    print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> int:
    """Joins the job (if several processes), trains, evaluates; returns the exit status.

    0: finished; 1: a user error (bad config value, workdir, mismatched checkpoint, data,
    divergence), printed as one line without a traceback; 128 + signal number: stopped
    by SIGTERM/SIGINT after saving a checkpoint.
    """
    if len(argv) > 1:
        cli.usage_error("attnflax.main", f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    from attnflax import parallel, train

    if "verbosity" in flag_values and not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS are chatty at INFO.
    try:
        parallel.initialize_from_env(flag_values.coordinator_address,
                                     flag_values.num_processes, flag_values.process_id)
    except (ValueError, RuntimeError) as e:  # Inconsistent job settings, no coordinator.
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    verbose = bool(flag_values["verbose"].value) if "verbose" in flag_values else False
    if not verbose:
        quiet_library_noise()  # For the rest of the process (see there).
    try:
        results = train.train_and_evaluate(flag_values.config, flag_values.workdir)
    except (*user_errors(), OSError) as e:
        _report(e, verbose)
        return 1
    if results.get("interrupted"):
        return 128 + int(signal.Signals[results["signal"]])
    if jax.process_count() > 1:  # Lets a job (and its tests) check that replicas agree.
        print(f"process {jax.process_index()}: params sha256 {results['params_sha256']}",
              flush=True)
    logging.info("Results: %s", {k: v for k, v in results.items() if k != "config"})
    return 0


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """Parses `argv` the way every script does (`attnflax.cli.parse_into`): ``--help``
    exits 0; a bad flag, value or ``--config.<key>`` is one ``error:`` line and status 2."""
    return cli.parse_into(flag_values, argv, doc=__doc__, prog="attnflax.main")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
