"""The install metadata: pyproject's ranges, its extras and constraints.txt agree."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from train_testutil import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    """``constraints.txt`` as ``{normalised name: version}``."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirements(extra: str | None = None) -> list[Requirement]:
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("extra", [None, "test"])
def test_constraints_pin_versions_inside_the_declared_ranges(extra):
    pins = _pins()
    for requirement in _requirements(extra):
        if requirement.marker and not requirement.marker.evaluate():
            continue  # e.g. tensorflow (macOS) beside tensorflow-cpu (Linux)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is declared but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}")


@pytest.mark.parametrize("extra, jax_extra", [("cuda12", "cuda12"), ("tpu", "tpu")])
def test_accelerator_extras_install_the_pinned_jax(extra, jax_extra):
    (jax,) = [r for r in _requirements() if r.name == "jax"]
    (accelerated,) = _requirements(extra)
    assert accelerated.name == "jax" and accelerated.extras == {jax_extra}
    assert accelerated.specifier == jax.specifier  # the plugin of the same jax
    readme = (REPO / "README.md").read_text()
    assert f"-e '.[{extra}]'" in readme  # and README says how to install it


# Accelerator images (e.g. the project's GPU machine) carry JAX, Flax, Optax, Orbax and
# chex but no TensorFlow: the layers, models, train step and benchmarks must run there.
WITHOUT_TENSORFLOW = ("import sys; sys.modules['tensorflow'] = None; "
                      "sys.modules['tensorflow_datasets'] = None; ")


def _run_without_tensorflow(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW + code], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_bench_train_step_runs_without_tensorflow():
    argv = ["bench_train.py", "--child=1", "--models", "attention_cnn", "--image", "8,8,1",
            "--batch", "4", "--steps", "1", "--repeats", "1"]
    proc = _run_without_tensorflow(
        f"import runpy; sys.argv = {argv!r}; "
        "runpy.run_path('experiments/bench_train.py', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert row["model"] == "attention_cnn" and row["images_per_second"] > 0
    assert "tensorflow" not in proc.stderr.lower()


def test_data_pipeline_without_tensorflow_says_what_is_missing():
    proc = _run_without_tensorflow(
        "from attnflax import data; c = data.default_config(); print(c.dataset); "
        "data.get_dataset_info(c)")
    assert proc.returncode == 1 and proc.stdout.strip() == "attnflax_digits"
    assert ("ImportError: attnflax.data.get_dataset_info needs TensorFlow and TensorFlow "
            "Datasets" in proc.stderr)
    assert "pip install -e ." in proc.stderr


def test_inference_imports_neither_the_train_loop_nor_tensorflow():
    """Restoring and evaluating a trained model (`attnflax.restore`, used by predict.py and
    the analyses) needs the model, state and steps of `attnflax.train`, not its loop."""
    proc = _run_without_tensorflow(
        "import attnflax.restore, attnflax.viz, attnflax.analysis.prune; "
        "print(sorted(m for m in ('attnflax.train.loop', 'attnflax.data.pipeline') "
        "if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
