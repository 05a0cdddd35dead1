"""Metrics out of the train loop: TensorBoard events, a JSON-lines file, console progress.

Only process 0 writes (files and console); on every other process the writers are
silent no-ops, so the train loop calls them unconditionally.

* :class:`MetricWriter` writes each scalar twice: to TensorBoard event files in the
  workdir (``tensorboard --logdir runs/``) and as one JSON object per call to
  ``workdir/metrics.jsonl`` (``{"step": 100, "train/loss": 0.31, ...}``), the
  machine-readable record. A resumed run appends; if it restarted from a checkpoint
  older than the last logged step, the repeated steps appear twice and the later
  line is the one that belongs to the finished run.
* :class:`Progress` prints one line per log interval: a bar, the step, loss,
  accuracy, learning rate, images/second and the estimated time left.
* :class:`EvalSums` accumulates exact evaluation sums (correct predictions, summed
  loss, example count) over batches, in integers and float64 on the host.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


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

    def flush(self) -> None:
        """Flushes pending event-file writes."""
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes the files; further writes are errors."""
        if self.enabled and self._jsonl is not None:
            self._tb.close()
            self._jsonl.close()
            self._jsonl = None
            self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class Progress:
    """One console line per log interval with a bar, loss, accuracy, lr, speed and ETA.

    The ETA extrapolates the step rate measured since the first `update` of this
    invocation (so compilation is excluded and evaluation pauses are included).

    Args:
      total_steps: The step the run ends at.
      start_step: The step this invocation starts from (non-zero after a resume).
      enabled: Whether to print; defaults to ``jax.process_index() == 0``.
      stream: Where to print (standard output by default).
      width: Characters in the bar.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool | None = None,
                 stream: TextIO | None = None, width: int = 20):
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.stream = stream or sys.stdout
        self.width = width
        self._t0: float | None = None
        self._step0 = start_step

    def line(self, step: int, scalars: Mapping[str, float], now: float | None = None) -> str:
        """The progress line for `step` (also resets the rate clock on first call)."""
        now = time.perf_counter() if now is None else now
        if self._t0 is None:
            self._t0, self._step0 = now, step
            eta = math.nan
        else:
            rate = (step - self._step0) / max(now - self._t0, 1e-9)
            eta = (self.total_steps - step) / rate if rate > 0 else math.nan
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

    def update(self, step: int, scalars: Mapping[str, float]) -> None:
        """Prints the progress line for `step` (process 0 only)."""
        line = self.line(step, scalars)
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """Prints a free-form line (process 0 only)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)


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
