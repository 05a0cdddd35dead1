"""The data config (`default_config`: `attnflax.configs.defaults.data_config`) and the
checks of batch sizes against devices and processes."""

from __future__ import annotations

import math

import ml_collections

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


def check_batch_size(name: str, value: int, num_devices: int, process_count: int) -> None:
    """Checks that a global batch size splits evenly over devices and processes.

    Args:
      name: The config key, for the message (``'batch_size'``).
      value: The global batch size.
      num_devices: Devices over all processes.
      process_count: Number of processes.

    Raises:
      DataError: If `value` is smaller than `num_devices` or not a multiple of both
        `num_devices` and `process_count`; the message names sizes that would work.
    """
    if num_devices < 1 or process_count < 1:
        raise DataError(f"num_devices={num_devices} and process_count={process_count} must be >= 1")
    multiple = math.lcm(num_devices, process_count)
    if value >= num_devices and value % multiple == 0:
        return
    problems = []
    if value < num_devices:
        problems.append(f"smaller than the {num_devices} devices")
    if value % num_devices:
        problems.append(f"not divisible by the {num_devices} devices")
    if value % process_count:
        problems.append(f"not divisible by the {process_count} processes")
    raise DataError(
        f"config.data.{name}={value} is {' and '.join(problems)}: it is the GLOBAL batch size "
        f"and must be a positive multiple of {multiple} here ({_suggest(value, multiple)})."
    )


def check_batch_sizes(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int
) -> None:
    """Checks `config.batch_size` and `config.eval_batch_size` with `check_batch_size`."""
    check_batch_size("batch_size", config.batch_size, num_devices, process_count)
    check_batch_size("eval_batch_size", config.eval_batch_size, num_devices, process_count)
