"""The train state, the model it belongs to, and its creation laid out on the mesh."""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from attnflax import models, parallel
from attnflax.train.config import DTYPES, ConfigError


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as a pytree of arrays (saved as-is by Orbax).

    Attributes:
      step: int32 [] -- train steps completed; also the data position (the next
        batch is batch number `step` of the train stream).
      params: The model parameters.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: The Optax state.
      rng: uint32 [2] -- the run's base PRNG key; step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def variables(self) -> dict[str, Any]:
        """The model variables for ``model.apply``."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The configured model from the registry, with the compute dtype.

    Raises:
      ConfigError: the registry refused ``config.model`` / ``config.model_kwargs``.
    """
    try:
        return models.create_model(
            config.model, num_classes=num_classes, dtype=DTYPES[config.dtype],
            attention_implementation=config.get("attention_implementation"),
            **config.model_kwargs.to_dict(),
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model={config.model!r} with config.model_kwargs="
                          f"{config.model_kwargs.to_dict()}: {e}") from e


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               image_shape: tuple[int, ...], seed: int) -> TrainState:
    """A fresh `TrainState` (call under ``jax.jit``/``jax.eval_shape``)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({"params": init_rng}, jnp.zeros((1, *image_shape), jnp.float32),
                           train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=train_rng,
    )


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
    seed: int, mesh: Mesh, fsdp: bool = False,
) -> tuple[TrainState, Any]:
    """Creates the train state directly in its sharded layout.

    Returns:
      ``(state, shardings)``: the state on the mesh and the pytree of its
      ``NamedSharding``s (the restore target and the step's in/out shardings).
    """
    init = functools.partial(init_state, model, tx, tuple(image_shape), seed)
    abstract = jax.eval_shape(init)
    shardings = parallel.state_shardings(abstract, mesh, fsdp=fsdp)
    return jax.jit(init, out_shardings=shardings)(), shardings
