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

from attnflax import train


def get_config(stage_attention: str = "none,none,block,block") -> ml_collections.ConfigDict:
    """The Imagenette recipe; ``stage_attention`` per stage, comma-separated."""
    config = train.default_config()
    config.data.dataset = "imagenette/160px"
    config.data.image_size = (128, 128)
    config.data.num_channels = 3
    config.data.batch_size = 128
    config.data.eval_batch_size = 256
    config.data.augment.crop_padding = 8
    config.data.augment.flip = True
    config.model = "resnet18"
    config.model_kwargs = ml_collections.ConfigDict({
        "stage_attention": tuple(stage_attention.split(",")),
        "attention": "local",
        "num_heads": 4,
    })
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = True
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    config.grad_clip_norm = 0.0
    config.label_smoothing = 0.1
    config.num_epochs = 100.0
    config.warmup_epochs = 5.0
    config.log_every_steps = 50
    config.eval_every_steps = 740  # every 10 epochs
    config.checkpoint_every_steps = 740
    return config
