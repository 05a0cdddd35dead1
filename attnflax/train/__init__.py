"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

::

    from attnflax import train
    config = train.default_config()        # or an experiments/configs/*.py get_config()
    results = train.train_and_evaluate(config, 'runs/digits')

In parts, each readable on its own:

- `attnflax.train.config`: the config's checks (`validate_config`, `check_batch_layout`),
  its durations in steps and what is due when (`durations`, `Durations`).
- `attnflax.train.optim`: the optimiser and schedule (`create_optimizer`), weight decay
  on kernels only.
- `attnflax.train.state`: `TrainState`, `create_model`, `create_train_state` (laid out
  on the mesh).
- `attnflax.train.steps`: the jitted `train_step` (gradient accumulation, donated
  state), `eval_step` and `evaluate` (exact, masked), `predict_step`.
- `attnflax.train.loop`: `train_and_evaluate` (workdir lock, resume, the loop, results).

The names below are the package's interface; the modules are its parts. The loop and
its names are imported on first use, so that inference code (`attnflax.restore`) can use
the model, state and steps without the training loop's machinery.
"""

import importlib
from typing import Any

from attnflax.metrics import CONFIG_FILE, RESULTS_FILE
from attnflax.train.config import (
    DTYPES,
    OPTIMIZERS,
    ConfigError,
    Due,
    Durations,
    check_batch_layout,
    config_get,
    default_config,
    durations,
    validate_config,
)
from attnflax.train.optim import create_optimizer, weight_decay_mask
from attnflax.train.state import TrainState, create_model, create_train_state, init_state
from attnflax.train.steps import (
    abstract_batch,
    eval_step,
    evaluate,
    make_eval_step,
    predict_step,
    train_step,
)

__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "OPTIMIZERS",
    "RESULTS_FILE",
    "ConfigError",
    "Due",
    "Durations",
    "NonFiniteLossError",
    "TrainState",
    "WorkdirError",
    "abstract_batch",
    "check_batch_layout",
    "checkpoint_meta",
    "config_get",
    "create_model",
    "create_optimizer",
    "create_train_state",
    "default_config",
    "durations",
    "eval_step",
    "evaluate",
    "init_state",
    "lock_workdir",
    "make_eval_step",
    "make_results",
    "predict_step",
    "prepare_workdir",
    "restore_latest",
    "train_and_evaluate",
    "train_step",
    "validate_config",
    "weight_decay_mask",
]

_LOOP = ("NonFiniteLossError", "WorkdirError", "checkpoint_meta", "lock_workdir", "make_results",
         "prepare_workdir", "restore_latest", "train_and_evaluate")


def __getattr__(name: str) -> Any:
    """The loop (`attnflax.train.loop`) and its names, imported on first use."""
    if name == "loop" or name in _LOOP:
        loop = importlib.import_module("attnflax.train.loop")
        return loop if name == "loop" else getattr(loop, name)
    raise AttributeError(f"module 'attnflax.train' has no attribute {name!r}")
