"""Image classifiers selectable by name: the registry the configs and the trainer use.

::

    from attnflax import models
    models.list_models()          # ['attention_cnn', 'cnn', 'resnet', 'resnet18', 'resnet20']
    model = models.create_model('attention_cnn', num_classes=10, attention='local')
    variables = model.init({'params': key}, x, train=False)       # x [batch, H, W, C]
    logits = model.apply(variables, x, train=False)                # float32 [batch, classes]
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])

Models without BatchNorm simply have no ``batch_stats``. ``resnet`` is depth 20 unless
``depth=`` says otherwise; ``resnet20`` and ``resnet18`` fix the depth.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnflax.models.cnn import CNN, AttentionCNN, adaptive_avg_pool
from attnflax.models.resnet import DEPTHS, BasicBlock, ResNet

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}
_RESERVED = frozenset({"parent", "name", "num_classes", "dtype"})


def register_model(name: str, cls: type[nn.Module], **fixed: Any) -> None:
    """Registers ``cls`` under ``name``; ``fixed`` attributes cannot be overridden.

    Raises:
      ValueError: if ``name`` is taken or ``fixed`` names an attribute ``cls`` lacks.
    """
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered.")
    unknown = set(fixed) - _fields(cls)
    if unknown:
        raise ValueError(f"{cls.__name__} has no attributes {sorted(unknown)}.")
    _REGISTRY[name] = (cls, fixed)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str, *, num_classes: int, dtype: Any = jnp.float32,
    attention_implementation: str | None = None, **kwargs: Any
) -> nn.Module:
    """Builds the model registered as ``name``.

    Args:
      name: one of :func:`list_models`.
      num_classes: number of output logits.
      dtype: computation dtype (parameters stay ``param_dtype``, float32 by default;
        logits are always float32).
      attention_implementation: kernel of the model's attention layers (``'xla'``,
        ``'chunked'``, ...; see :func:`attnflax.local_cosine_attention_2d`); None keeps
        the model's default (the op picks for the backend and shape). It changes how,
        not what, the model computes: parameters and outputs are the same.
      **kwargs: the model's other attributes (e.g. ``attention='global'``, ``window=5``,
        ``stage_attention=('none', 'block', 'replace')``); lists become tuples.

    Returns:
      An unbound ``flax.linen.Module`` called as ``model.apply(variables, x, train=...)``.

    Raises:
      ValueError: on an unknown name (the known ones are listed), an unknown or fixed
        keyword, a non-positive ``num_classes`` or an invalid model configuration.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}.")
    cls, fixed = _REGISTRY[name]
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or (
            num_classes <= 0):
        raise ValueError(f"`num_classes` must be a positive int; got {num_classes!r}.")
    allowed = sorted(_fields(cls) - _RESERVED - set(fixed))
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown keyword argument(s) {unknown}; allowed: {allowed}"
            + (f" (fixed by the variant: {fixed})" if fixed else "") + "."
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if attention_implementation is not None:
        if "attention_implementation" not in _fields(cls):
            with_attention = [n for n in list_models()
                              if "attention_implementation" in model_fields(n)]
            raise ValueError(
                f"model {name!r} has no attention layers; attention_implementation="
                f"{attention_implementation!r} applies to {with_attention}."
            )
        kwargs["attention_implementation"] = attention_implementation
    return cls(num_classes=int(num_classes), dtype=dtype, **fixed, **kwargs)


def model_fields(name: str) -> set[str]:
    """Attribute names of the model registered as ``name`` (what ``create_model`` may set,
    plus the reserved and fixed ones)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}.")
    return _fields(_REGISTRY[name][0])


def _fields(cls: type[nn.Module]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


register_model("cnn", CNN)
register_model("attention_cnn", AttentionCNN)
register_model("resnet", ResNet)
register_model("resnet20", ResNet, depth=20)
register_model("resnet18", ResNet, depth=18)

__all__ = [
    "CNN",
    "DEPTHS",
    "AttentionCNN",
    "BasicBlock",
    "ResNet",
    "adaptive_avg_pool",
    "create_model",
    "list_models",
    "multiply_adds",
    "register_model",
]


def multiply_adds(model: nn.Module, x: jax.ShapeDtypeStruct) -> float:
    """Half the XLA-estimated flops of the jitted eval forward pass on ``x`` (shapes only).

    Args:
      model: A registry model (any module taking ``train=``).
      x: The input, e.g. ``jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)`` for per-image
        figures.
    """
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    cost: Any = forward.lower(variables, x).compile().cost_analysis()
    if isinstance(cost, Sequence):  # older jax returned one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan"))) / 2
