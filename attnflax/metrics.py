"""Metrics out of the train loop: TensorBoard events, a JSON-lines file, console progress.

Only process 0 writes (files and console); on every other process the writers are
silent no-ops, so the train loop calls them unconditionally.

* :class:`MetricWriter` writes each scalar twice: to TensorBoard event files in the
  workdir (``tensorboard --logdir runs/``) and as one JSON object per call to
  ``workdir/metrics.jsonl`` (``{"step": 100, "train/loss": 0.31, ...}``), the
  machine-readable record. A resumed run appends; if it restarted from a checkpoint
  older than the last logged step, the repeated steps appear twice and the later
  line is the one that belongs to the finished run.
* :class:`Console` prints the run's messages (start, resume, warnings, results).
* :class:`Progress`, a `Console` for a run of known length, also prints a line per log
  interval, and by time (the first step, then at least every 10 s on a terminal): a bar,
  the step, loss, accuracy, learning rate, images/second and the estimated time left.
* :class:`EvalSums` accumulates exact evaluation sums (correct predictions, summed
  loss, example count) over batches, in integers and float64 on the host.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
# The run's final results and the config of its last start, in the workdir.
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


def _to_float(value: Any) -> float:
    """A Python float from a scalar (numpy, jax or Python)."""
    return float(np.asarray(value))


class MetricWriter:
    """Scalars to TensorBoard and ``metrics.jsonl`` in `workdir` (process 0 only).

    Args:
      workdir: Directory for the event files and ``metrics.jsonl``; must exist.
      enabled: Whether to write; defaults to ``jax.process_index() == 0``.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool | None = None):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl: TextIO | None = None
        if self.enabled:
            import tensorflow as tf  # Lazy: only process 0 needs TensorFlow's summary writer.

            self._tf = tf
            self._tb = tf.summary.create_file_writer(self.workdir)
            self._jsonl = open(os.path.join(self.workdir, METRICS_FILE), "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes ``{name: scalar}`` at `step` (names like ``'train/loss'``)."""
        if not self.enabled or not scalars:
            return
        values = {name: _to_float(v) for name, v in scalars.items()}
        with self._tb.as_default(step=int(step)):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                        for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes the files; further writes are errors."""
        if self.enabled and self._jsonl is not None:
            self._tb.close()
            self._jsonl.close()
            self._jsonl = None
            self.enabled = False


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``, ``65`` -> ``'1m05s'``, ``4.2`` -> ``'4s'``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Console:
    """Free-form console lines of a run (process 0 only).

    Args:
      enabled: Whether to print; defaults to ``jax.process_index() == 0``.
      stream: Where to print (standard output by default).
    """

    def __init__(self, *, enabled: bool | None = None, stream: TextIO | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.stream = stream or sys.stdout

    def message(self, text: str) -> None:
        """Prints a free-form line (process 0 only)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)


class Progress(Console):
    """Console progress lines: a bar, the step, loss, accuracy, lr, speed and ETA.

    Lines come at every log interval (`update`, from the train loop's log boundaries)
    and also by time (`maybe_update`): at the first completed step, then whenever
    `every_seconds` have passed since the last line, whatever ``log_every_steps`` is.

    The ETA extrapolates the step rate of this invocation: measured from the first
    completed step once a later one has completed (so neither compilation nor the first
    step's warm-up counts; evaluation pauses do), before that from `start`.

    Args:
      total_steps: The step the run ends at.
      enabled: Whether to print; defaults to ``jax.process_index() == 0``.
      stream: Where to print (standard output by default).
      width: Characters in the bar.
      every_seconds: Longest gap between lines (`maybe_update`); ``None``: 10 s on a
        terminal, 60 s when the output goes to a file.
      clock: Seconds as a float (default `Progress.clock`, ``time.perf_counter``).
    """

    clock = staticmethod(time.perf_counter)
    TERMINAL_SECONDS = 10.0
    FILE_SECONDS = 60.0

    def __init__(self, total_steps: int, *, enabled: bool | None = None,
                 stream: TextIO | None = None, width: int = 20,
                 every_seconds: float | None = None, clock: Any = None):
        super().__init__(enabled=enabled, stream=stream)
        self.total_steps = total_steps
        self.width = width
        self._clock = clock or type(self).clock
        if every_seconds is None:
            isatty = getattr(self.stream, "isatty", None)
            every_seconds = (self.TERMINAL_SECONDS if isatty is not None and isatty()
                             else self.FILE_SECONDS)
        self.every_seconds = float(every_seconds)
        self._origin: tuple[float, int] | None = None  # (time, step) of `start`
        self._first: tuple[float, int] | None = None  # the first step seen after it
        self._last_line: float | None = None

    def now(self) -> float:
        """The progress clock."""
        return self._clock()

    def start(self, step: int, now: float | None = None) -> None:
        """Starts the rate clock at `step` (the train loop calls it before its first step)."""
        self._origin = (self._clock() if now is None else now, step)
        self._first = None

    def _observe(self, step: int, now: float) -> None:
        if self._origin is None:
            self._origin = (now, step)
        elif self._first is None and step > self._origin[1]:
            self._first = (now, step)

    def eta(self, step: int, now: float) -> float:
        """Seconds left after `step` at time `now` (NaN before any rate is measured)."""
        self._observe(step, now)
        for t0, s0 in filter(None, (self._first, self._origin)):
            if step > s0 and now > t0:
                return (self.total_steps - step) * (now - t0) / (step - s0)
        return math.nan

    def line(self, step: int, scalars: Mapping[str, float], now: float | None = None) -> str:
        """The progress line for `step` (the first call also starts the rate clock)."""
        now = self._clock() if now is None else now
        eta = self.eta(step, now)
        frac = step / max(self.total_steps, 1)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        digits = len(str(self.total_steps))
        parts = [f"[{bar}] {step:>{digits}}/{self.total_steps} {100 * frac:3.0f}%"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.4f}")
        if "accuracy" in scalars:
            parts.append(f"acc {100 * scalars['accuracy']:5.1f}%")
        if "learning_rate" in scalars:
            parts.append(f"lr {scalars['learning_rate']:.2e}")
        if "images_per_second" in scalars:
            parts.append(f"{scalars['images_per_second']:,.0f} img/s")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def update(self, step: int, scalars: Mapping[str, float], now: float | None = None) -> None:
        """Prints the progress line for `step` (process 0 only)."""
        now = self._clock() if now is None else now
        line = self.line(step, scalars, now)
        self._last_line = now
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def due(self, now: float | None = None) -> bool:
        """Whether a line is due by time: none printed yet, or `every_seconds` passed."""
        now = self._clock() if now is None else now
        return self._last_line is None or now - self._last_line >= self.every_seconds

    def maybe_update(self, step: int, scalars: Callable[[], Mapping[str, float]],
                     now: float | None = None) -> bool:
        """Prints the line for completed step `step` if one is `due`; returns whether.

        `scalars` is called only then (the running averages since the last log line).
        """
        now = self._clock() if now is None else now
        self._observe(step, now)
        if not self.due(now):
            return False
        self.update(step, scalars(), now)
        return True


class EvalSums:
    """Exact evaluation totals over masked batches.

    Each batch contributes the sums its eval step computed over the *real*
    (mask=True) examples; accuracy and loss are the global sums divided by the
    global example count, never a mean of per-batch means.
    """

    def __init__(self) -> None:
        self.correct = 0
        self.loss_sum = 0.0
        self.count = 0

    def add(self, sums: Mapping[str, Any]) -> None:
        """Adds one batch: ``{'correct': int, 'loss_sum': float, 'count': int}``."""
        self.correct += int(np.asarray(sums["correct"]))
        self.loss_sum += float(np.asarray(sums["loss_sum"], dtype=np.float64))
        self.count += int(np.asarray(sums["count"]))

    def result(self) -> dict[str, float | int]:
        """``{'accuracy', 'loss', 'examples', 'correct'}``; NaN accuracy/loss if empty."""
        n = self.count
        return {
            "accuracy": self.correct / n if n else math.nan,
            "loss": self.loss_sum / n if n else math.nan,
            "examples": n,
            "correct": self.correct,
        }
