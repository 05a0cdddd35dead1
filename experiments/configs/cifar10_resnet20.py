r"""CIFAR-10 baseline: plain ResNet-20 (no attention), the recipe of ``cifar10.py``.

Command::

    python -m attnflax.main --config=experiments/configs/cifar10_resnet20.py \
        --workdir=runs/cifar10_resnet20

Data: as ``cifar10.py`` (TFDS ``cifar10``, prepared beforehand).

Hardware: one GPU, as ``cifar10.py`` (not measured).

Expected result: not yet measured (ResNet-20: 91.25 % in He et al. 2016; about
92 % is typical with this 200-epoch cosine recipe).
"""

import importlib.util
import pathlib

import ml_collections


def _load(name: str):
    """Imports a sibling config file (config files are loaded by path, not as a package)."""
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"attnflax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    """``cifar10.py`` with no attention in any stage."""
    return _load("cifar10").get_config("none,none,none")
