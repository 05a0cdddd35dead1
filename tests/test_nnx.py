"""Tests of the NNX attention layers in `attnflax.nnx` against their linen twins."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from train_testutil import run_readme_snippet

from attnflax import nn as anf
from attnflax import nnx as annx

README_SECTION = "## Use the layers in a Flax NNX model"

# Everything that computes is jitted (eager JAX compiles every primitive on its own).


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _linen_params(module, x, **kwargs):
    """Params of the linen `module`, every leaf random (`log_scale` spread across the
    clamp), so that no zero-initialised kernel hides a difference."""
    shapes = jax.eval_shape(lambda k, x: module.init(k, x, **kwargs), jax.random.key(0), x)
    flat = traverse_util.flatten_dict(shapes["params"])
    for i, (key, value) in enumerate(sorted(flat.items())):
        if key[-1] == "log_scale":
            heads = value.shape[0]
            flat[key] = np.linspace(1.0, math.log(100.0) + 1.0, heads).astype(np.float32)
        else:
            flat[key] = 0.5 * _normal(i, value.shape)
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------- #
# linen == NNX: outputs, gradients and attention maps for the same params.     #
# --------------------------------------------------------------------------- #

_GLOBAL_MASK = np.random.default_rng(1).random((2, 1, 20, 20)) < 0.7
_GLOBAL_MASK[..., 0] = True

# (id, linen module, NNX constructor, input shape, call kwargs). The 'xla' kernel keeps
# the compiled graphs small; the kernels agree with each other (test_nn, test_ops).
XLA = dict(implementation="xla")
CASES = [
    ("local", anf.LocalCosineSelfAttention2D(num_heads=2, window=(3, 5), head_dim=3, **XLA),
     lambda r: annx.LocalCosineSelfAttention2D(8, 2, window=(3, 5), head_dim=3, rngs=r, **XLA),
     (2, 4, 5, 8), {}),
    ("local-no-bias-dilated", anf.LocalCosineSelfAttention2D(
        num_heads=2, use_position_bias=False, dilation=(2, 1), out_features=6, **XLA),
     lambda r: annx.LocalCosineSelfAttention2D(8, 2, use_position_bias=False, dilation=(2, 1),
                                               out_features=6, rngs=r, **XLA),
     (2, 4, 5, 8), {}),
    ("local-shift-dilated", anf.LocalCosineSelfAttention2D(
        num_heads=2, border="shift", dilation=2, **XLA),
     lambda r: annx.LocalCosineSelfAttention2D(8, 2, border="shift", dilation=2, rngs=r, **XLA),
     (2, 6, 7, 8), {}),
    ("global", anf.CosineSelfAttention(num_heads=2, relative_position_bias=True, **XLA),
     lambda r: annx.CosineSelfAttention(8, 2, relative_position_bias=True, image_shape=(4, 5),
                                        rngs=r, **XLA),
     (2, 4, 5, 8), {}),
    ("global-no-bias-tokens-mask", anf.CosineSelfAttention(num_heads=4, qkv_features=12, **XLA),
     lambda r: annx.CosineSelfAttention(8, 4, qkv_features=12, rngs=r, **XLA),
     (2, 20, 8), {"mask": _GLOBAL_MASK}),
] + [
    # Each of position bias on/off and MLP on/off, for local and for global attention.
    (f"block-{kind}-{'bias' if bias else 'no-bias'}-{'mlp' if mlp else 'no-mlp'}-{norm}",
     anf.ResidualAttentionBlock(num_heads=2, attention=kind, window=3, position_bias=bias,
                                mlp_ratio=mlp, norm=norm, norm_groups=4, **XLA),
     lambda r, kind=kind, bias=bias, mlp=mlp, norm=norm: annx.ResidualAttentionBlock(
         8, 2, attention=kind, window=3, position_bias=bias, image_shape=(4, 5),
         mlp_ratio=mlp, norm=norm, norm_groups=4, rngs=r, **XLA),
     (2, 4, 5, 8), {})
    for kind, bias, mlp, norm in [("local", True, 2.0, "layer"), ("local", False, 0.0, "group"),
                                  ("global", True, 0.0, "layer"),
                                  ("global", False, 2.0, "group")]
]


def _case(linen, make_nnx, shape, kwargs):
    """(params, NNX model loaded with them, input, function of (params, NNX state, input)
    running one forward and backward pass per API, collecting the maps on the way)."""
    x = _normal(2, shape)
    params = _linen_params(linen, x, **kwargs)
    model = nnx.eval_shape(lambda: make_nnx(nnx.Rngs(0)))  # no init: the params are loaded
    chex.assert_trees_all_equal_shapes_and_dtypes(annx.to_linen_params(model), params)
    annx.from_linen_params(model, params)
    graphdef, state = nnx.split(model)

    def loss_linen(p, x):
        y, variables = linen.apply({"params": p}, x, mutable=["intermediates"], **kwargs)
        return jnp.sum(jnp.sin(y)), (y, variables["intermediates"])

    def loss_nnx(state, x):
        y, maps = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(x, **kwargs)
        return jnp.sum(jnp.sin(y)), (y, maps)

    def run(p, state, x):
        return (jax.value_and_grad(loss_linen, (0, 1), has_aux=True)(p, x),
                jax.value_and_grad(loss_nnx, (0, 1), has_aux=True)(state, x))

    return params, model, x, run


@pytest.fixture(scope="module")
def equivalence_results():
    """{case id: (params, NNX model, linen result, NNX result)}, every case in one jit.

    Compiling is nearly all the cost: one XLA compilation for all cases instead of one
    each, and without the backend's code optimisation (half the time; what is compared
    is the two APIs on the same compiled ops, not XLA's optimiser)."""
    cases = {c[0]: _case(*c[1:]) for c in CASES}
    runs = [run for _, _, _, run in cases.values()]
    args = [(params, nnx.state(model), x) for params, model, x, _ in cases.values()]
    compiled = jax.jit(lambda args: [run(*a) for run, a in zip(runs, args, strict=True)]).lower(
        args).compile({"xla_backend_optimization_level": 0})
    results = compiled(args)
    return {name: (params, model, *result)
            for (name, (params, model, _, _)), result in zip(cases.items(), results, strict=True)}


def test_block_passes_dilation_and_border_on():
    """The block's local layer gets dilation= and border= (tested above on the layer):
    the linen block's parameter shapes (border='shift': a [heads, 2kh-1, 2kw-1] table)."""
    x = jnp.zeros((1, 6, 6, 8))
    linen = anf.ResidualAttentionBlock(num_heads=2, window=3, dilation=2, border="shift")
    model = nnx.eval_shape(lambda: annx.ResidualAttentionBlock(
        8, 2, window=3, dilation=2, border="shift", rngs=nnx.Rngs(0)))
    assert (model.attention.dilation, model.attention.border) == ((2, 2), "shift")
    chex.assert_trees_all_equal_shapes_and_dtypes(
        annx.to_linen_params(model),
        jax.eval_shape(linen.init, jax.random.key(0), x)["params"])
    assert model.attention.position_bias.shape == (2, 5, 5)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_nnx_layer_equals_linen_layer(case, equivalence_results):
    """Same params: the NNX parameter tree is the linen one (names, nesting, shapes) and
    round-trips; same outputs, parameter and input gradients, and sown maps."""
    params, model, linen_result, nnx_result = equivalence_results[case]
    chex.assert_trees_all_equal(annx.to_linen_params(model), params)
    (v_linen, (y_linen, maps_linen)), g_linen = linen_result
    (v_nnx, (y_nnx, maps_nnx)), (g_state, g_x) = nnx_result
    g_nnx, maps_nnx = (nnx.to_pure_dict(g_state), g_x), nnx.to_pure_dict(maps_nnx)
    np.testing.assert_allclose(v_nnx, v_linen, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_nnx, g_linen, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(maps_nnx, maps_linen, rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(maps_nnx), "the NNX layer sows its maps under nnx.capture"


def test_maps_only_under_capture_and_layout():
    """No capture: no weights built, nothing stored on the module; under capture, one
    `attention_weights` per call, the documented layout, rows summing to 1."""
    model = annx.ResidualAttentionBlock(8, 2, window=(3, 5), rngs=nnx.Rngs(0))
    x = _normal(0, (2, 4, 5, 8))

    @nnx.jit
    def plain(m, x):
        return m(x), jax.tree.leaves(nnx.state(m, nnx.Intermediate))

    @nnx.jit
    def captured(m, x):
        return nnx.capture(m, nnx.Intermediate)(x)

    (y, stored), (y_captured, maps) = plain(model, x), captured(model, x)
    assert stored == []
    assert jax.tree.leaves(nnx.state(model, nnx.Intermediate)) == []
    np.testing.assert_allclose(y_captured, y, rtol=1e-5, atol=1e-5)
    (w,) = maps["attention"]["attention_weights"]
    chex.assert_shape(w, (2, 4, 5, 2, 3, 5))
    np.testing.assert_allclose(w.sum(axis=(-2, -1)), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Training an NNX model with the block, as a user would write it.              #
# --------------------------------------------------------------------------- #


class TinyCNN(nnx.Module):
    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.block = annx.ResidualAttentionBlock(8, num_heads=2, window=3, mlp_ratio=1.0,
                                                 rngs=rngs)
        self.head = nnx.Linear(8, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.block(nnx.relu(self.conv(x)))
        return self.head(x.mean(axis=(1, 2)))


def test_nnx_model_trains_with_optimizer_and_jit():
    model = TinyCNN(4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    x = _normal(0, (16, 6, 6, 1))
    y = np.random.default_rng(1).integers(0, 4, size=16)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    attention = model.block.attention
    assert np.abs(attention.position_bias[...]).max() > 0.0  # the attention itself trained
    assert np.abs(attention.out.kernel[...]).max() > 0.0


# --------------------------------------------------------------------------- #
# Errors: the linen layers' messages.                                         #
# --------------------------------------------------------------------------- #


def _linen_error(module, shape):
    with pytest.raises(ValueError) as e:
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
    return str(e.value)


@pytest.mark.parametrize(
    "linen, make_nnx, shape",
    [
        (anf.LocalCosineSelfAttention2D(num_heads=2),
         lambda: annx.LocalCosineSelfAttention2D(8, 2, rngs=nnx.Rngs(0)), (2, 8, 8)),
        (anf.CosineSelfAttention(num_heads=2),
         lambda: annx.CosineSelfAttention(8, 2, rngs=nnx.Rngs(0)), (1, 2, 2, 2, 8)),
        (anf.ResidualAttentionBlock(num_heads=2),
         lambda: annx.ResidualAttentionBlock(8, 2, rngs=nnx.Rngs(0)), (4, 8)),
        (anf.ResidualAttentionBlock(num_heads=2, attention="global", position_bias=False),
         lambda: annx.ResidualAttentionBlock(8, 2, attention="global", position_bias=False,
                                             rngs=nnx.Rngs(0)), (4, 8)),
        (anf.LocalCosineSelfAttention2D(num_heads=3),
         lambda: annx.LocalCosineSelfAttention2D(8, 3, rngs=nnx.Rngs(0)), (1, 4, 4, 8)),
        (anf.CosineSelfAttention(num_heads=4, qkv_features=10),
         lambda: annx.CosineSelfAttention(8, 4, qkv_features=10, rngs=nnx.Rngs(0)), (1, 3, 8)),
        (anf.CosineSelfAttention(num_heads=2, head_dim=3, qkv_features=8),
         lambda: annx.CosineSelfAttention(8, 2, head_dim=3, qkv_features=8, rngs=nnx.Rngs(0)),
         (1, 3, 8)),
        (anf.ResidualAttentionBlock(num_heads=2, norm="group", norm_groups=3),
         lambda: annx.ResidualAttentionBlock(8, 2, norm="group", norm_groups=3,
                                             rngs=nnx.Rngs(0)), (1, 4, 4, 8)),
    ],
    ids=["local-rank", "global-rank", "block-rank", "block-global-rank", "heads",
         "qkv-features", "head-dim-and-qkv", "norm-groups"],
)
def test_bad_input_raises_the_linen_error(linen, make_nnx, shape):
    """The NNX layer raises the linen layer's message, at construction or when called."""
    want = _linen_error(linen, shape)
    with pytest.raises(ValueError) as e:
        model = nnx.eval_shape(make_nnx)  # abstract: the checks come before any compute
        jax.eval_shape(lambda x: model(x), jnp.zeros(shape))
    assert str(e.value) == want


@pytest.mark.parametrize(
    "linen, make_nnx",
    [
        (lambda: anf.LocalCosineSelfAttention2D(num_heads=2, window=4),
         lambda: annx.LocalCosineSelfAttention2D(8, 2, window=4, rngs=nnx.Rngs(0))),
        (lambda: anf.ResidualAttentionBlock(window=(3, 3, 3)),
         lambda: annx.ResidualAttentionBlock(8, window=(3, 3, 3), rngs=nnx.Rngs(0))),
        (lambda: anf.ResidualAttentionBlock(attention="sparse"),
         lambda: annx.ResidualAttentionBlock(8, attention="sparse", rngs=nnx.Rngs(0))),
        (lambda: anf.ResidualAttentionBlock(norm="batch"),
         lambda: annx.ResidualAttentionBlock(8, norm="batch", rngs=nnx.Rngs(0))),
        (lambda: anf.ResidualAttentionBlock(mlp_ratio=-1.0),
         lambda: annx.ResidualAttentionBlock(8, mlp_ratio=-1.0, rngs=nnx.Rngs(0))),
        (lambda: anf.LocalCosineSelfAttention2D(num_heads=2, dilation=0),
         lambda: annx.LocalCosineSelfAttention2D(8, 2, dilation=0, rngs=nnx.Rngs(0))),
        (lambda: anf.ResidualAttentionBlock(border="reflect"),
         lambda: annx.ResidualAttentionBlock(8, border="reflect", rngs=nnx.Rngs(0))),
        (lambda: anf.LocalCosineSelfAttention2D(num_heads=2, implementation="cudnn"),
         lambda: annx.LocalCosineSelfAttention2D(8, 2, implementation="cudnn",
                                                 rngs=nnx.Rngs(0))),
        (lambda: anf.CosineSelfAttention(num_heads=2, implementation="fast"),
         lambda: annx.CosineSelfAttention(8, 2, implementation="fast", rngs=nnx.Rngs(0))),
    ],
    ids=["even-window", "malformed-window", "attention", "norm", "mlp-ratio", "dilation",
         "border",
         "local-implementation", "global-implementation"],
)
def test_bad_arguments_raise_the_linen_error_at_construction(linen, make_nnx):
    with pytest.raises(ValueError) as want:
        linen()
    with pytest.raises(ValueError) as got:
        nnx.eval_shape(make_nnx)
    assert str(got.value) == str(want.value)


def test_nnx_only_errors():
    """What only NNX can get wrong: sizes fixed at construction, and loading params."""
    with pytest.raises(ValueError, match=r"needs `image_shape`=\(H, W\) at construction"):
        annx.CosineSelfAttention(8, 2, relative_position_bias=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"position_bias=False for inputs without one"):
        annx.ResidualAttentionBlock(8, 2, attention="global", rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: annx.CosineSelfAttention(
        4, 2, relative_position_bias=True, image_shape=(3, 3), rngs=nnx.Rngs(0)))
    # The linen layer's message for a table of another image size.
    with pytest.raises(ValueError, match=r"created with shape \(2, 5, 5\).*needs \(2, 7, 7\)"):
        jax.eval_shape(lambda x: model(x), jnp.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"in_features=4 input channels; got an input of shape"):
        jax.eval_shape(lambda x: model(x), jnp.zeros((1, 3, 3, 6)))
    with pytest.raises(ValueError, match=r"needs an image.*H\*W == length=8; got \(3, 3\)"):
        jax.eval_shape(lambda x: model(x), jnp.zeros((1, 8, 4)))  # tokens of another image
    params = annx.to_linen_params(model)
    with pytest.raises(ValueError, match=r"missing \['position_bias'\], unexpected \[\]"):
        annx.from_linen_params(model, {k: v for k, v in params.items() if k != "position_bias"})
    with pytest.raises(ValueError, match=r"'log_scale' has shape \(3,\).*holds \(2,\)"):
        annx.from_linen_params(model, {**params, "log_scale": np.zeros(3, np.float32)})


# --------------------------------------------------------------------------- #
# dtypes, imports, README.                                                    #
# --------------------------------------------------------------------------- #


def test_bfloat16():
    """dtype=bfloat16 computes in bfloat16 like the linen block; param_dtype sets the
    parameters' dtype."""
    x = jnp.asarray(_normal(0, (2, 4, 4, 8)), jnp.bfloat16)
    linens, models = [], []
    for attention in ("local", "global"):
        linens.append(anf.ResidualAttentionBlock(num_heads=2, attention=attention,
                                                 mlp_ratio=1.0, dtype=jnp.bfloat16))
        models.append(annx.from_linen_params(nnx.eval_shape(lambda a=attention: (
            annx.ResidualAttentionBlock(8, 2, attention=a, image_shape=(4, 4), mlp_ratio=1.0,
                                        dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))),
            _linen_params(linens[-1], x)))

    @nnx.jit
    def run(models, x):
        return [(m(x), linen.apply({"params": annx.to_linen_params(m)}, x))
                for m, linen in zip(models, linens, strict=True)]

    for y_nnx, y_linen in run(models, x):
        assert y_nnx.dtype == y_linen.dtype == jnp.bfloat16
        y_nnx, y_linen = np.asarray(y_nnx, np.float32), np.asarray(y_linen, np.float32)
        assert np.all(np.isfinite(y_nnx))
        # bfloat16 rounding: a few elements differ by an ulp (2**-8 relative) of the largest.
        np.testing.assert_allclose(y_nnx, y_linen, rtol=2e-2,
                                   atol=2**-6 * np.abs(y_linen).max())
    bf16 = nnx.eval_shape(lambda: annx.ResidualAttentionBlock(
        8, 2, attention="global", image_shape=(4, 4), mlp_ratio=1.0, param_dtype=jnp.bfloat16,
        rngs=nnx.Rngs(0)))
    assert {p.dtype for p in jax.tree.leaves(annx.to_linen_params(bf16))} == {
        jnp.dtype(jnp.bfloat16)}


def test_imports_without_tensorflow():
    code = ("import sys; sys.modules['tensorflow'] = None; "
            "sys.modules['tensorflow_datasets'] = None; import attnflax.nnx")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_readme_snippet_runs():
    run_readme_snippet(README_SECTION)
