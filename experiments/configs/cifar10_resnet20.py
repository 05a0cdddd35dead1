r"""CIFAR-10 baseline: plain ResNet-20 (no attention), the recipe of ``cifar10.py``.

Command::

    python -m attnflax.main --config=experiments/configs/cifar10_resnet20.py \
        --workdir=runs/cifar10_resnet20

Data: as ``cifar10.py`` (TFDS ``cifar10``, prepared beforehand).

Hardware: one GPU, as ``cifar10.py`` (not measured).

Expected result: not yet measured (ResNet-20: 91.25 % in He et al. 2016; about
92 % is typical with this 200-epoch cosine recipe).
"""

import ml_collections

from attnflax.configs import recipes


def get_config() -> ml_collections.ConfigDict:
    """``cifar10.py`` with no attention in any stage."""
    return recipes.resnet_sgd("cifar10", "resnet", "none,none,none", attention="global",
                              depth=20, epochs=200, warmup_epochs=5, crop_padding=4)
