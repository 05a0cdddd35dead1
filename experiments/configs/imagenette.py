r"""Imagenette (10 easy ImageNet classes): ResNet-18 with local cosine attention, 128x128.

Command::

    python -m attnflax.main --config=experiments/configs/imagenette.py --workdir=runs/imagenette

Data: TFDS ``imagenette/160px`` (1.5 GB download) must be prepared first
(``tfds build imagenette/160px`` with network, or ``--config.data.download=True``,
or ``--config.data.data_dir`` pointing at a copy). Images are resized to 128x128.

Hardware: one or more GPUs (ResNet-18 with the CIFAR stem at 128x128 is heavy:
several hours on one GPU for 100 epochs, estimated, not measured).

Recipe: SGD + Nesterov, lr 0.1 at batch 128, 5 warm-up then cosine over 100 epochs,
weight decay 5e-4 on kernels, random crop (pad 8) + flip, label smoothing 0.1; a
residual local (3x3) cosine-attention block after each of the last two stages.

Expected result: not yet measured (ResNet-18-class models typically reach about
90 % on Imagenette at this resolution).
"""

import ml_collections

from attnflax.configs import recipes


def get_config(stage_attention: str = "none,none,block,block") -> ml_collections.ConfigDict:
    """The Imagenette recipe; ``stage_attention`` per stage, comma-separated."""
    return recipes.resnet_sgd("imagenette/160px", "resnet18", stage_attention,
                              attention="local", epochs=100, warmup_epochs=5, crop_padding=8,
                              label_smoothing=0.1, eval_batch_size=256, image_size=(128, 128),
                              num_channels=3, log_every_steps=50)
