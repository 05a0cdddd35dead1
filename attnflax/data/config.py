"""The data config (`default_config`: `attnflax.configs.defaults.data_config`) and the
checks of batch sizes against devices and processes."""

from __future__ import annotations

import math

from attnflax.configs import defaults
from attnflax.data.errors import DataError

default_config = defaults.data_config


def _suggest(value: int, multiple: int) -> str:
    """Names the multiples of `multiple` nearest to `value` (at least `multiple`)."""
    low = max(multiple, value // multiple * multiple)
    high = max(multiple, -(-value // multiple) * multiple)
    if low == high or value < multiple:
        return f"e.g. {high}"
    return f"e.g. {low} or {high}"


def check_batch_size(name: str, value: int, num_devices: int, process_count: int, *,
                     grad_accum_steps: int = 1, flag: str | None = None) -> None:
    """The one batch-size check: a global batch size must split into `grad_accum_steps`
    micro-batches that split evenly over the devices, and into equal per-process parts.

    The trainer calls it before anything is built (`attnflax.train.check_batch_layout`),
    the pipelines for their own batches, the benchmarks for theirs.

    Args:
      name: The config key under ``data`` (``'batch_size'``, ``'eval_batch_size'``).
      value: The global batch size.
      num_devices: Devices over all processes.
      process_count: Number of processes.
      grad_accum_steps: Micro-batches per step (``config.grad_accum_steps``).
      flag: The command-line flag that sets it (default ``--config.data.<name>``).

    Raises:
      DataError: naming the key, why it does not split, the multiple it must be and the
        nearest sizes that work (``e.g. 96 or 104``), and the flag to set.
    """
    if num_devices < 1 or process_count < 1:
        raise DataError(f"num_devices={num_devices} and process_count={process_count} must be >= 1")
    per_step = grad_accum_steps * num_devices
    multiple = math.lcm(per_step, process_count)
    if value >= per_step and value % multiple == 0:
        return
    devices = (f"{num_devices} devices" if grad_accum_steps == 1 else
               f"config.grad_accum_steps={grad_accum_steps} micro-batches x {num_devices} devices")
    problems = []
    if value < per_step:
        problems.append(f"smaller than the {devices}")
    elif value % per_step:
        problems.append(f"not divisible by the {devices}")
    if value % process_count:
        problems.append(f"not divisible by the {process_count} processes")
    flag = flag or f"--config.data.{name}"
    what = flag.lstrip("-") if flag != f"--config.data.{name}" else f"config.data.{name}"
    raise DataError(
        f"{what}={value} is {' and '.join(problems)}: it is the GLOBAL batch size "
        f"and must be a positive multiple of {multiple} here ({_suggest(value, multiple)}; "
        f"set {flag})."
    )
