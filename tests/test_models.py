"""Tests of the model registry and the CNN / attention-CNN / ResNet models."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnflax import models
from attnflax.nn import attention_maps

# Shapes only: `jax.eval_shape` traces without compiling. Where something runs, it is
# jitted, and `init` gets an RBG key: on CPU, XLA compiles threefry-based initialisers
# of a ResNet ~5x slower than the RBG ones, and the key does not change the model.
# `init` and `apply` are compiled separately, as a trainer does: with jax 0.10.2 on
# CPU, about 1 in 15 compilations of a single program doing init *and* apply of
# `attention_cnn` returns NaN (the same optimised HLO compiles fine the other times; an
# XLA:CPU issue, not seen when the two are separate programs).
RBG_KEY = jax.random.key(0, impl="rbg")


def _init(model, x):
    return jax.jit(lambda x: model.init({"params": RBG_KEY}, x, train=False))(x)
NAMED = ("cnn", "attention_cnn", "resnet", "resnet20", "resnet18")
INPUT_SHAPES = ((8, 8, 1), (28, 28, 1), (32, 32, 3), (12, 20, 3))

# Pinned parameter counts (10 classes), so an accidental architecture change is caught.
# Re-derive with `python experiments/model_summary.py --notabulate [--input_shape=32,32,3]`.
PARAM_COUNTS = {
    ((8, 8, 1), "cnn"): 85_066,
    ((8, 8, 1), "attention_cnn"): 101_874,
    ((8, 8, 1), "resnet"): 272_186,
    ((8, 8, 1), "resnet20"): 272_186,
    ((8, 8, 1), "resnet18"): 11_172_810,
    ((32, 32, 3), "cnn"): 85_642,
    ((32, 32, 3), "attention_cnn"): 102_450,
    ((32, 32, 3), "resnet"): 272_474,
    ((32, 32, 3), "resnet20"): 272_474,
    ((32, 32, 3), "resnet18"): 11_173_962,
}


def _x(shape, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)


def _shapes(model, x, **apply_kwargs):
    """(variables, outputs) as ShapeDtypeStructs: `init` (+ `apply(**apply_kwargs)`) on x."""
    if not apply_kwargs:  # one trace gives both
        out, variables = jax.eval_shape(
            lambda x: model.init_with_output({"params": RBG_KEY}, x, train=False), x)
        return variables, out

    def f(x):
        variables = model.init({"params": RBG_KEY}, x, train=False)
        return variables, model.apply(variables, x, **apply_kwargs)

    return jax.eval_shape(f, x)


def _n_params(variables):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


# --------------------------------------------------------------------------- #
# Registry.                                                                   #
# --------------------------------------------------------------------------- #


def test_registry_lists_the_models():
    assert set(NAMED) <= set(models.list_models())
    assert models.list_models() == sorted(models.list_models())


def test_resnet_is_resnet20():
    a = models.create_model("resnet", num_classes=10)
    b = models.create_model("resnet20", num_classes=10)
    assert (a.depth, a.layout()) == (b.depth, b.layout()) == (20, b.layout())
    assert models.create_model("resnet", num_classes=10, depth=18).layout() == (
        models.create_model("resnet18", num_classes=10).layout())


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("vgg", {}, r"unknown model 'vgg'; known models: attention_cnn, cnn, resnet"),
        ("cnn", {"attention": "local"}, r"unknown keyword argument\(s\) \['attention'\]; "
         r"allowed: \['features', 'hidden'"),
        ("resnet18", {"depth": 20}, r"\['depth'\].*fixed by the variant: \{'depth': 18\}"),
        ("resnet", {"depth": 19}, r"`depth` must be one of \[8, 14, 18, 20, 32, 34, 44, 56, "
         r"110\]; got 19"),
        ("resnet", {"stage_attention": ("none", "block")}, r"one value or 3 values"),
        ("resnet", {"stage_attention": "conv"}, r"one of \('none', 'block', 'replace'\)"),
        ("resnet", {"widths": (8, 8)}, r"must give 3 stage widths"),
        ("resnet", {"stage_attention": "block", "num_heads": 3}, r"`num_heads`=3 must divide"),
        ("resnet", {"window": 4}, r"odd and positive.*got \(4, 4\)"),
        ("attention_cnn", {"window": (3, 2)}, r"odd and positive.*got \(3, 2\)"),
        ("attention_cnn", {"attention": "sparse"}, r"one of \('local', 'global'\)"),
        ("attention_cnn", {"num_heads": 5}, r"`num_heads`=5 must divide .* features\[-1\]=64"),
        ("attention_cnn", {"placement": "after_convs"},
         r"`placement` must be one of \('before_pool', 'after_pool'\); got 'after_convs'"),
    ],
)
def test_bad_configuration_raises(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.create_model(name, num_classes=10, **kwargs)


def test_bad_num_classes_raises():
    with pytest.raises(ValueError, match="`num_classes` must be a positive int; got 0"):
        models.create_model("cnn", num_classes=0)


def test_config_lists_become_tuples():
    model = models.create_model("resnet", num_classes=10, stage_attention=["none"] * 3,
                                window=[5, 5])
    assert model.stage_attention == ("none",) * 3 and model.window == (5, 5)


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("resnet18", (1, 1, 3), r"ResNet-18 downsamples its input by 8x.*at least 8x8; got 1x1"),
        ("resnet20", (2, 9, 3), r"at least 4x4; got 2x9"),
        ("cnn", (1, 1, 1), r"CNN downsamples its input by 2x.*at least 2x2; got 1x1"),
        ("attention_cnn", (8, 1, 1), r"got 8x1"),
        ("cnn", (8, 8), r"\[batch, height, width, channels\]; got shape \(2, 8, 8\)"),
        ("resnet", (1, 8, 8, 3), r"got shape \(2, 1, 8, 8, 3\)"),
    ],
)
def test_bad_input_raises(name, shape, match):
    model = models.create_model(name, num_classes=10)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: model.init({"params": RBG_KEY}, x), _x(shape))


# --------------------------------------------------------------------------- #
# Shapes, dtypes and parameter counts of every registered model.              #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", models.list_models())
def test_output_shape_and_dtypes_on_every_input_size(name):
    for shape in INPUT_SHAPES:
        for dtype in (jnp.float32, jnp.bfloat16):
            model = models.create_model(name, num_classes=7, dtype=dtype)
            variables, logits = _shapes(model, _x(shape, batch=3))
            assert logits.shape == (3, 7) and logits.dtype == jnp.float32, (shape, dtype)
            assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_parameter_counts_are_pinned(name, shape):
    variables, _ = _shapes(models.create_model(name, num_classes=10), _x(shape, batch=1))
    assert _n_params(variables) == PARAM_COUNTS[shape, name]


@pytest.mark.parametrize("name", models.list_models())
def test_flax_tabulate_summarises_every_model(name):
    """What experiments/model_summary.py prints (tabulate traces; nothing compiles)."""
    model = models.create_model(name, num_classes=10)
    console = {"force_terminal": False, "width": 200}
    table = nn.tabulate(model, RBG_KEY, depth=1, console_kwargs=console)
    text = table(_x((8, 8, 1), batch=1), train=False)
    assert "Total Parameters" in text
    assert f" {PARAM_COUNTS[(8, 8, 1), name]:,} (" in text  # the `params` column total


@pytest.mark.parametrize(
    "name, kwargs",
    [("cnn", {}), ("attention_cnn", {}),
     ("resnet", {"depth": 8, "stage_attention": ("none", "block", "replace"), "widths": (8,) * 3})],
)
def test_runs_in_bfloat16_on_a_non_square_image(name, kwargs):
    """Compiles and runs a train-mode forward (the trainer's hot path) in bfloat16.

    The other sizes, float32 and the named ResNets are covered by tracing above; here the
    ResNet is a narrow depth-8 one with every kind of stage (same code paths, less compile).
    """
    model = models.create_model(name, num_classes=5, dtype=jnp.bfloat16, **kwargs)

    x = _x((12, 20, 3))
    run = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    logits = run(_init(model, x), x)
    chex.assert_shape(logits, (2, 5))
    chex.assert_type(logits, jnp.float32)
    assert np.isfinite(logits).all()


def test_models_without_batchnorm_have_no_batch_stats():
    model = models.create_model("attention_cnn", num_classes=10)
    variables, (logits, updates) = _shapes(model, _x((8, 8, 1)), train=True,
                                           mutable=["batch_stats"])
    assert set(variables) == {"params"} and not updates and logits.shape == (2, 10)


# --------------------------------------------------------------------------- #
# Behaviour.                                                                  #
# --------------------------------------------------------------------------- #


def test_batchnorm_running_stats_update_only_in_train_mode():
    model = models.create_model("resnet", num_classes=4, depth=8, widths=(4, 8, 8))
    x = _x((8, 8, 3), batch=4) * 3.0 + 1.0

    @jax.jit
    def run(variables, x):
        train_logits, train_vars = model.apply(variables, x, train=True, mutable=["batch_stats"])
        eval_logits, eval_vars = model.apply(variables, x, train=False, mutable=["batch_stats"])
        eval_half = model.apply(variables, x[:2], train=False)
        stats = (variables, train_vars, eval_vars)
        return [s["batch_stats"] for s in stats], train_logits, eval_logits, eval_half

    (stats, train_stats, eval_stats), train_logits, eval_logits, eval_half = run(
        _init(model, x), x)
    chex.assert_trees_all_equal(eval_stats, stats)  # eval mode: no update
    chex.assert_trees_all_equal_shapes(train_stats, stats)
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(stats),
                                jax.tree.leaves(train_stats), strict=True):
        assert not np.allclose(old, new), path  # train mode: every statistic moved
    # Eval uses the running averages: an example's logits do not depend on its batch,
    # and differ from train mode's batch-statistics logits.
    np.testing.assert_allclose(eval_logits[:2], eval_half, rtol=1e-5, atol=1e-6)
    assert not np.allclose(eval_logits, train_logits, atol=1e-4)


@pytest.mark.parametrize("placement", ["before_pool", "after_pool"])
def test_fresh_attention_cnn_computes_the_cnn(placement):
    """The residual attention blocks start as the identity, at either place."""
    cnn = models.create_model("cnn", num_classes=10)
    x = _x((8, 8, 1), batch=3)

    model = models.create_model("attention_cnn", num_classes=10, mlp_ratio=1.0,
                                placement=placement)

    @jax.jit
    def both(params, x):
        base = {k: v for k, v in params.items() if not k.startswith("attention_block")}
        assert len(base) == len(params) - 1
        return model.apply({"params": params}, x), cnn.apply({"params": base}, x)

    with_attention, without = both(_init(model, x)["params"], x)
    np.testing.assert_array_equal(with_attention, without)


def test_attention_maps_of_models():
    x = _x((12, 20, 3))
    model = models.create_model("resnet20", num_classes=10, widths=(8, 8, 16), num_heads=2,
                                window=5, stage_attention=("block", "replace", "none"))
    variables, _ = _shapes(model, x)
    maps = jax.eval_shape(lambda v, x: attention_maps(model, v, x), variables, x)
    assert {k: v.shape for k, v in maps.items()} == {
        "stage0_attention0/attention": (2, 12, 20, 2, 5, 5),
        "stage1_block0/conv0/attention": (2, 12, 20, 2, 5, 5),  # attends, then pools
        "stage1_block0/conv1/attention": (2, 6, 10, 2, 5, 5),
        **{f"stage1_block{j}/conv{i}/attention": (2, 6, 10, 2, 5, 5)
           for j in (1, 2) for i in (0, 1)},
    }
    model = models.create_model("attention_cnn", num_classes=10, attention="global")
    variables, _ = _shapes(model, _x((8, 8, 1)))
    maps = jax.eval_shape(lambda v, x: attention_maps(model, v, x), variables, _x((8, 8, 1)))
    assert {k: v.shape for k, v in maps.items()} == {
        "attention_block0/attention": (2, 4, 64, 64)}
    model = models.create_model("attention_cnn", num_classes=10, placement="after_pool")
    variables, _ = _shapes(model, _x((12, 8, 1)))
    maps = jax.eval_shape(lambda v, x: attention_maps(model, v, x), variables, _x((12, 8, 1)))
    assert {k: v.shape for k, v in maps.items()} == {  # the max-pooled 6x4 map
        "attention_block0/attention": (2, 6, 4, 4, 3, 3)}


def test_adaptive_avg_pool_matches_cell_means():
    x = _x((5, 7, 2), batch=1)
    got = np.asarray(jax.jit(lambda x: models.adaptive_avg_pool(x, (2, 3)))(x))
    rows, cols = [(0, 3), (2, 5)], [(0, 3), (2, 5), (4, 7)]
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            np.testing.assert_allclose(got[0, i, j], x[0, r0:r1, c0:c1].mean((0, 1)), rtol=1e-5)
    assert models.adaptive_avg_pool(x, (5, 7)) is x


def test_attention_implementation_reaches_every_attention_layer():
    """``attention_implementation`` picks the kernel of every attention layer of a model
    and changes nothing else: same parameters, same logits."""
    x = _x((12, 12, 3))
    kw = dict(num_classes=10, widths=(8, 8, 16), num_heads=2, window=3,
              stage_attention=("block", "replace", "none"))
    plain = models.create_model("resnet20", **kw)
    variables = _init(plain, x)
    logits = {}
    for impl in ("xla", "chunked"):
        model = models.create_model("resnet20", attention_implementation=impl, **kw)
        logits[impl] = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(logits["xla"], logits["chunked"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits["xla"], jax.jit(plain.apply)(variables, x),
                               rtol=1e-5, atol=1e-5)
    model = models.create_model("attention_cnn", num_classes=10, attention_implementation="xla")
    assert model.attention_implementation == "xla"
    with pytest.raises(ValueError, match=r"model 'cnn' has no attention layers.*"
                                         r"'attention_cnn'"):
        models.create_model("cnn", num_classes=10, attention_implementation="xla")
    with pytest.raises(ValueError, match=r"unknown implementation='triton'"):
        _shapes(models.create_model("attention_cnn", num_classes=10,
                                    attention_implementation="triton"), _x((8, 8, 1)))
