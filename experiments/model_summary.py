"""Parameter count, multiply-adds and layer table of every registered model.

Usage::

    python experiments/model_summary.py                      # 8x8x1 digits, 10 classes
    python experiments/model_summary.py --input_shape=32,32,3 --models=resnet20,resnet18
    python experiments/model_summary.py --notabulate         # only the final table

Multiply-adds are half the ``flops`` that XLA's cost analysis reports for the jitted
eval-mode forward pass of one example. XLA counts the elementwise work of norms,
softmax and activations too, and skips a conv's multiplies by 'SAME' zero padding
(so a 3x3 conv on an 8x8 map counts (22/24)^2 of its nominal 8*8*9*Cin*Cout).
Parameter counts are of the ``params`` collection; the "Total Parameters" line of
Flax's table also counts BatchNorm statistics.
"""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from attnflax import cli

# Imported at their first use, after the flags are parsed.
jax = cli.lazy_import("jax")
jnp = cli.lazy_import("jax.numpy")
nn = cli.lazy_import("flax.linen")
models = cli.lazy_import("attnflax.models")
pytree = cli.lazy_import("attnflax.pytree")


class _QuietBackendProbe(std_logging.Filter):
    """Drops JAX's INFO notice about each optional backend it probes and does not find
    ("Unable to initialize backend 'tpu': ... libtpu.so ..."): absl's default verbosity
    prints INFO, and a CPU or GPU machine lacks a TPU by design. A backend that was asked
    for (``JAX_PLATFORMS``) and fails is an error, not this notice, and is kept."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.levelno < std_logging.WARNING
                    and str(record.msg).startswith("Unable to initialize backend"))


std_logging.getLogger("jax._src.xla_bridge").addFilter(_QuietBackendProbe())


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags."""
    cli.define_list("input_shape", [8, 8, 1], "Image shape H,W,C.", flag_values, item=int)
    flags.DEFINE_integer("num_classes", 10, "Number of classes.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_list("models", None, "Models to summarise (default: all registered).",
                      flag_values=flag_values)
    flags.DEFINE_boolean("tabulate", True, "Print each model's Flax tabulate table.",
                         flag_values=flag_values)
    flags.DEFINE_integer("depth", 2, "Module nesting depth of the tabulate tables.",
                         lower_bound=1, flag_values=flag_values)
    flags.register_validator("input_shape", lambda s: len(s) == 3,
                             "--input_shape must be H,W,C.", flag_values=flag_values)


def count_params(model: nn.Module, x: jax.ShapeDtypeStruct) -> int:
    """Number of parameters (not BatchNorm statistics), from shapes only."""
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return pytree.count_params(variables["params"])


def summarise(name: str, shape: tuple[int, ...], num_classes: int, tabulate: bool = True,
              depth: int = 2) -> tuple[int, float]:
    """Prints one model's tabulate table (if asked) and returns (params, multiply-adds)."""
    model = models.create_model(name, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    params, macs = count_params(model, x), models.multiply_adds(model, x)
    if tabulate:
        table = nn.tabulate(model, jax.random.key(0), depth=depth,
                            console_kwargs={"width": 140, "force_terminal": sys.stdout.isatty()})
        print(f"\n=== {name}: input {shape}, {num_classes} classes ===")
        print(table(jnp.zeros((1, *shape), jnp.float32), train=False))
        print(f"{name}: {params:,} parameters, {macs / 1e6:,.2f} M multiply-adds per example")
    return params, macs


def main(argv: Sequence[str] | None = None) -> list[tuple[Any, ...]]:
    """Summarises the models; returns ``[(name, params, multiply-adds), ...]``."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="model_summary.py")
    shape = tuple(args.input_shape)
    names = args.models or models.list_models()
    rows = [(n, *summarise(n, shape, args.num_classes, args.tabulate, args.depth))
            for n in names]
    print(f"\nModels at input {'x'.join(map(str, shape))}, {args.num_classes} classes "
          "(multiply-adds per example, XLA cost analysis):")
    print(f"{'model':<16}{'parameters':>14}{'M mult-adds':>14}")
    for name, params, macs in rows:
        print(f"{name:<16}{params:>14,}{macs / 1e6:>14.2f}")
    return rows


if __name__ == "__main__":
    main()
