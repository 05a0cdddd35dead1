"""The recipes the experiment configs share; imports only ``ml_collections``.

Each experiment config (``experiments/configs/*.py``) is one call of a recipe, plus the
docstring that states its command and its measured result:

- `small_cnn`: the small CNN, with or without one local attention block, on a
  digit-like dataset (``digits.py``, ``digits_cnn.py``, ``mnist.py``, ``fashion_mnist.py``).
- `mnist_benchmark`: the five comparison models of the embedded MNIST benchmarks, with
  one schedule for all (``mnist5k.py``, ``cluttered.py``).
- `resnet_sgd`: a CIFAR-style ResNet, attention blocks per stage, trained with SGD +
  Nesterov and a long cosine schedule (``cifar10.py``, ``cifar100.py``,
  ``cifar10_resnet20.py``, ``imagenette.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from attnflax.configs import defaults

# The small CNN's layers, spelled out so that they can be overridden from the command line.
SMALL_CNN = {"features": (32, 64), "hidden": 64}
# The attention block of the small CNN's attention variant.
ATTENTION_BLOCK = {"window": (3, 3), "num_heads": 4, "num_blocks": 1, "position_bias": True,
                   "mlp_ratio": 0.0}
# The models of the embedded MNIST benchmarks (`mnist_benchmark`), in table order.
BENCHMARK_MODELS = ("cnn", "attention_local", "attention_global", "resnet20",
                    "resnet20_attention")
# Every named model variant (`model_variant`): the benchmark models, and a ResNet-20 with
# local attention stages (the shape of the local kernels' accelerator benchmark).
MODEL_VARIANTS = BENCHMARK_MODELS + ("resnet20_local_attention",)


def _adamw(config: ml_collections.ConfigDict) -> None:
    """AdamW 2e-3, weight decay 5e-2, label smoothing 0.1, gradients clipped at norm 1."""
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.weight_decay = 5e-2
    config.label_smoothing = 0.1
    config.grad_clip_norm = 1.0


def small_cnn(dataset: str, model: str = "attention_cnn", *, batch_size: int,
              eval_batch_size: int, crop_padding: int, flip: bool = False,
              epochs: float, warmup_epochs: float, eval_every_epochs: float,
              log_every_steps: int = 100) -> ml_collections.ConfigDict:
    """The small CNN (``model='cnn'``) or the attention CNN (``'attention_cnn'``: one
    residual 3x3 local cosine-attention block with 4 heads on the 64-channel map) with
    AdamW and a warm-up + cosine schedule; checkpoints at every evaluation.
    """
    if model not in ("cnn", "attention_cnn"):
        raise ValueError(f"unknown model {model!r}; this recipe takes 'cnn' or 'attention_cnn'.")
    config = defaults.train_config()
    config.seed = 0
    config.data.dataset = dataset
    config.data.batch_size = batch_size
    config.data.eval_batch_size = eval_batch_size
    config.data.augment.crop_padding = crop_padding
    config.data.augment.flip = flip
    config.model = model
    config.model_kwargs = ml_collections.ConfigDict(SMALL_CNN)
    if model == "attention_cnn":
        config.model_kwargs.update({"attention": "local", **ATTENTION_BLOCK})
    _adamw(config)
    config.num_epochs = epochs
    config.warmup_epochs = warmup_epochs
    config.log_every_steps = log_every_steps
    config.eval_every_epochs = eval_every_epochs
    config.checkpoint_every_epochs = eval_every_epochs
    return config


def model_variant(name: str, placement: str = "before_pool") -> tuple[str, dict[str, Any]]:
    """``(registry model, model_kwargs)`` of one of `MODEL_VARIANTS`; ``placement`` is
    where the small CNN's attention block runs (``AttentionCNN.placement``)."""
    attention = {**SMALL_CNN, **ATTENTION_BLOCK, "placement": placement}
    stages = {"stage_attention": ("none", "block", "block"), "num_heads": 4}
    table: Mapping[str, tuple[str, dict[str, Any]]] = {
        "cnn": ("cnn", dict(SMALL_CNN)),
        "attention_local": ("attention_cnn", {**attention, "attention": "local"}),
        "attention_global": ("attention_cnn", {**attention, "attention": "global"}),
        "resnet20": ("resnet20", {}),
        "resnet20_attention": ("resnet20", {**stages, "attention": "global"}),
        "resnet20_local_attention": ("resnet20", {**stages, "attention": "local",
                                                  "window": (7, 7)}),
    }
    if name not in table:
        raise ValueError(f"unknown model {name!r}; the named variants are {MODEL_VARIANTS}.")
    return table[name]


def mnist_benchmark(dataset: str, model: str, *, crop_padding: int, eval_batch_size: int,
                    placement: str, steps: int, warmup_epochs: float
                    ) -> ml_collections.ConfigDict:
    """One of `MODEL_VARIANTS` on an embedded MNIST benchmark (the README tables train the
    `BENCHMARK_MODELS`): the same data, augmentation, optimiser (AdamW), batch (64) and
    number of steps for every model."""
    config = defaults.train_config()
    config.seed = 0
    config.data.dataset = dataset
    config.data.batch_size = 64
    config.data.eval_batch_size = eval_batch_size
    config.data.augment.crop_padding = crop_padding
    config.model, kwargs = model_variant(model, placement)
    config.model_kwargs = ml_collections.ConfigDict(kwargs)
    _adamw(config)
    defaults.set_duration(config, "num_train_steps", steps)
    config.warmup_epochs = warmup_epochs
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 150
    return config


def resnet_sgd(dataset: str, model: str, stage_attention: str, *, attention: str,
               epochs: float, warmup_epochs: float, crop_padding: int,
               label_smoothing: float = 0.0, eval_batch_size: int = 500,
               image_size: tuple[int, int] | None = None, num_channels: int | None = None,
               log_every_steps: int = 200, depth: int | None = None
               ) -> ml_collections.ConfigDict:
    """A CIFAR-style ResNet (``model`` from the registry) with attention blocks per stage
    (``stage_attention``, comma-separated: ``'none,none,block'``), SGD + Nesterov 0.9,
    lr 0.1 at batch 128, weight decay 5e-4 on kernels, random crop + flip, a warm-up then
    cosine to 0; evaluates and checkpoints every 10 epochs."""
    config = defaults.train_config()
    config.data.dataset = dataset
    if image_size is not None:
        config.data.image_size = image_size
    if num_channels is not None:
        config.data.num_channels = num_channels
    config.data.batch_size = 128
    config.data.eval_batch_size = eval_batch_size
    config.data.augment.crop_padding = crop_padding
    config.data.augment.flip = True
    config.model = model
    config.model_kwargs = ml_collections.ConfigDict({
        **({"depth": depth} if depth is not None else {}),
        "stage_attention": tuple(stage_attention.split(",")),
        "attention": attention,
        "num_heads": 4,
    })
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.nesterov = True
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    config.grad_clip_norm = 0.0
    config.label_smoothing = label_smoothing
    config.num_epochs = epochs
    config.warmup_epochs = warmup_epochs
    config.log_every_steps = log_every_steps
    config.eval_every_epochs = 10
    config.checkpoint_every_epochs = 10
    return config
