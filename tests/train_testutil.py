"""Shared helpers of the training tests: tiny configs, config files, subprocess runs."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from attnflax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_readme_snippet(heading: str) -> None:
    """Runs the first ```python block under README's ``heading`` (so its example stays true)."""
    text = (REPO / "README.md").read_text()
    assert heading in text, f"README.md lacks the section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no ```python snippet in README's {heading!r}"
    exec(compile(match.group(1), "README.md", "exec"), {"__name__": "__readme__"})
CONFIGS = REPO / "experiments" / "configs"
SCRIPTS = ("accelerator_check", "bench_attention", "bench_train", "compare", "evaluate",
           "inspect_data", "model_summary", "predict", "prune", "robustness", "visualize")


@functools.cache
def load_script(name: str) -> Any:
    """Imports ``experiments/<name>.py`` as a module (scripts are not a package), once."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}",
                                                  REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module

# A digits run small enough to compile and train in seconds on a shared CPU.
TINY: dict[str, Any] = {
    "model": "attention_cnn",
    "model_kwargs.features": (16, 16),
    "model_kwargs.hidden": 32,
    "model_kwargs.num_heads": 2,
    "num_train_steps": 6,
    "warmup_epochs": 0.0,
    "learning_rate": 1e-2,
    "data.batch_size": 16,
    "data.eval_batch_size": 120,
    "log_every_steps": 2,
    "eval_every_steps": 0,
    "checkpoint_every_steps": 0,
}


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``experiments/configs/<name>.py``'s ``get_config(arg)`` (`attnflax.cli.load_config_file`)."""
    return cli.load_config_file(f"{CONFIGS / name}.py" + (f":{arg}" if arg is not None else ""))


def override(
    config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Sets dotted keys (``'data.batch_size'``) like ``--config.x=y`` would (`cli.override`)."""
    for dotted, value in values.items():
        cli.override(config, dotted, value)
    return config


def tiny_config(**extra: Any) -> ml_collections.ConfigDict:
    """``digits.py`` shrunk by `TINY` (plus `extra`, dotted keys with '__' for '.')."""
    values = {**TINY, **{k.replace("__", "."): v for k, v in extra.items()}}
    return override(load_config("digits"), values)


def cli_flags(values: Mapping[str, Any]) -> list[str]:
    """``--config.key=value`` flags for `values` (tuples as ``(8,8)``)."""
    flags = []
    for key, value in values.items():
        if isinstance(value, tuple):
            value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
        flags.append(f"--config.{key}={value}")
    return flags


def subprocess_env(num_devices: int, cache_dir: str | None = None) -> dict[str, str]:
    """Environment of a child JAX process with `num_devices` forced CPU devices."""
    env = dict(os.environ)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"),
                                         env.get("PYTHONPATH", "")])
    return env


# Runs attnflax.main in a child process; with SIGTERM_AT=K the train iterator sends the
# process SIGTERM while it produces the batch of step K (a real signal, delivered the
# way a cluster's preemption notice is, at a step the test controls).
_MAIN_SCRIPT = textwrap.dedent("""
    import os, sys
    from absl import app
    from attnflax import data, main
    from train_testutil import sigterm_iterator

    if int(os.environ.get("SIGTERM_AT", "0")):
        data.create_train_iterator = sigterm_iterator(
            data.create_train_iterator, int(os.environ["SIGTERM_AT"]))
    sys.argv[0] = "attnflax.main"
    main.define_flags()
    app.run(main.main, flags_parser=main.parse_flags)
""")


def run_main(
    args: Sequence[str], *, num_devices: int = 1, sigterm_at: int = 0, timeout: int = 300,
    cache_dir: str | None = None,
) -> subprocess.CompletedProcess:
    """Runs ``python -m attnflax.main <args>`` in a child process (optionally SIGTERMed)."""
    env = subprocess_env(num_devices, cache_dir)
    if sigterm_at:
        env["SIGTERM_AT"] = str(sigterm_at)
    return subprocess.run(
        [sys.executable, "-c", _MAIN_SCRIPT, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def read_results(workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """``workdir/results.json``."""
    return json.loads(pathlib.Path(workdir, "results.json").read_text())


def sigterm_iterator(create: Any, stop_at: int) -> Any:
    """Wraps ``data.create_train_iterator`` to SIGTERM this process at step `stop_at`."""
    import signal

    def create_train_iterator(*args, start_step=0, **kwargs):
        iterator = create(*args, start_step=start_step, **kwargs)

        def batches():
            for step, batch in enumerate(iterator, start=start_step + 1):
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch
        return batches()

    return create_train_iterator


def jax_cache_dir(tmp_path_factory: Any) -> str:
    """A compilation-cache directory shared by the training tests and their children.

    The training tests compile the same tiny train step in several runs and child
    processes; JAX's persistent cache turns every compile after the first into a
    lookup. The cache only stores executables (results are identical).
    """
    return os.fspath(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


class persistent_cache:  # noqa: N801 - used as a context manager, like a function
    """Points JAX's persistent compilation cache at `directory`, restoring it on exit."""

    def __init__(self, directory: str):
        self.directory = directory

    def __enter__(self) -> str:
        import jax
        from jax.experimental.compilation_cache import compilation_cache

        self._old = (jax.config.jax_compilation_cache_dir,
                     jax.config.jax_persistent_cache_min_compile_time_secs)
        jax.config.update("jax_compilation_cache_dir", self.directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()
        return self.directory

    def __exit__(self, *exc: object) -> None:
        import jax
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", self._old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", self._old[1])
        compilation_cache.reset_cache()
