r"""CIFAR-10: ResNet-20 with a global cosine-attention block in its last stage.

Command::

    python -m attnflax.main --config=experiments/configs/cifar10.py --workdir=runs/cifar10
    # the same recipe without attention (the baseline):
    python -m attnflax.main --config=experiments/configs/cifar10_resnet20.py \
        --workdir=runs/cifar10_resnet20

Data: TFDS ``cifar10`` must be prepared first (``tfds build cifar10`` with network,
or ``--config.data.download=True``, or ``--config.data.data_dir`` pointing at a copy).

Hardware: one GPU (about 20-40 minutes for 200 epochs on an A100/H100-class GPU,
estimated, not measured); data parallel over every visible device.

Recipe: SGD + Nesterov momentum 0.9, peak lr 0.1 at batch 128 after 5 warm-up
epochs, cosine to 0 over 200 epochs, weight decay 5e-4 on conv/dense kernels,
random crop (pad 4) + horizontal flip.

Expected result: not yet measured. For reference, ResNet-20 without attention is
reported at 91.25 % (He et al. 2016, step schedule, 164 epochs); with this cosine
recipe about 92 % is typical.
"""

import ml_collections

from attnflax.configs import recipes


def get_config(stage_attention: str = "none,none,block") -> ml_collections.ConfigDict:
    """The CIFAR-10 recipe; ``stage_attention`` per stage, comma-separated.

    ``--config=experiments/configs/cifar10.py:none,none,none`` is the plain ResNet-20
    (the same as ``cifar10_resnet20.py``).
    """
    return recipes.resnet_sgd("cifar10", "resnet", stage_attention, attention="global",
                              depth=20, epochs=200, warmup_epochs=5, crop_padding=4)
