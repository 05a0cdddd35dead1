"""Tests of the Flax attention layers and blocks in `attnflax.nn`."""

from __future__ import annotations

import math
from functools import partial

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_testutil import run_readme_snippet

import attnflax
from attnflax import nn as anf
from attnflax.ops import window_validity

README_SECTION = "## Use the layers in your own Flax model"


# Everything that computes is jitted, and test data is made with numpy: on CPU, eager
# JAX compiles every primitive separately, which costs more than the tests themselves.


def _init(module, *args, seed=0, **kwargs):
    """Jitted `module.init`."""
    return jax.jit(lambda k, *a: module.init(k, *a, **kwargs))(jax.random.key(seed), *args)


def _apply(module, variables, *args, **kwargs):
    """Jitted `module.apply`."""
    return jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))(variables, *args)


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _randomize(params, seed=0):
    """Random `position_bias`; `log_scale` spread from 1 to one past the clamp at log(100)."""
    params = dict(params)
    heads = params["log_scale"].shape[0]
    params["log_scale"] = np.linspace(1.0, math.log(100.0) + 1.0, heads).astype(np.float32)
    if "position_bias" in params:
        params["position_bias"] = _normal(seed, params["position_bias"].shape)
    return params


def _project(p, x):
    """q/k/v as the module should compute them: x @ kernel + bias, per head."""
    return [jnp.einsum("...c,chd->...hd", x, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")]


def _out(p, heads):
    return jnp.einsum("...hd,hdo->...o", heads, p["out"]["kernel"]) + p["out"]["bias"]


def _scale(p):
    return jnp.exp(jnp.minimum(p["log_scale"], math.log(100.0)))


def _module_and_reference(module, reference, params, *args, **kwargs):
    """Jitted (module output, reference output) for the same params."""
    return jax.jit(lambda p, *a: (module.apply({"params": p}, *a, **kwargs), reference(p, *a)))(
        params, *args)


# --------------------------------------------------------------------------- #
# Module == op on its own projections.                                        #
# --------------------------------------------------------------------------- #


def test_global_module_equals_op_on_image_with_bias_and_mask():
    x = _normal(0, (2, 3, 4, 8))
    mask = np.random.default_rng(1).random((2, 1, 12, 12)) < 0.7
    mask[..., 0] = True
    module = anf.CosineSelfAttention(num_heads=2, head_dim=5, out_features=6,
                                     relative_position_bias=True)
    params = _randomize(_init(module, x)["params"])
    # Brute-force relative-position lookup: table[:, dy + H - 1, dx + W - 1].
    iy, ix = np.zeros((12, 12), int), np.zeros((12, 12), int)
    for i in range(12):
        for j in range(12):
            iy[i, j], ix[i, j] = j // 4 - i // 4 + 2, j % 4 - i % 4 + 3

    def reference(p, x):
        q, k, v = (a.reshape(2, 12, 2, 5) for a in _project(p, x))
        bias = p["position_bias"][:, iy, ix][None]
        heads = attnflax.cosine_attention(q, k, v, logit_scale=_scale(p), bias=bias, mask=mask)
        return _out(p, heads).reshape(2, 3, 4, 6)

    got, want = _module_and_reference(module, reference, params, x, mask=mask)
    chex.assert_shape(got, (2, 3, 4, 6))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [dict(qkv_features=12), dict(head_dim=3), dict()])
def test_global_module_equals_op_on_tokens(sizes):
    x = _normal(0, (2, 7, 12))
    module = anf.CosineSelfAttention(num_heads=4, **sizes)
    params = _randomize(_init(module, x)["params"])

    def reference(p, x):
        return _out(p, attnflax.cosine_attention(*_project(p, x), logit_scale=_scale(p)))

    np.testing.assert_allclose(*_module_and_reference(module, reference, params, x),
                               rtol=1e-5, atol=1e-5)


def test_local_module_equals_op():
    x = _normal(0, (2, 5, 7, 6))
    module = anf.LocalCosineSelfAttention2D(num_heads=3, window=(3, 5), head_dim=4)
    params = _randomize(_init(module, x)["params"])
    chex.assert_shape(params["position_bias"], (3, 3, 5))

    def reference(p, x):
        heads = attnflax.local_cosine_attention_2d(
            *_project(p, x), window=(3, 5), logit_scale=_scale(p), bias=p["position_bias"])
        return _out(p, heads)

    np.testing.assert_allclose(*_module_and_reference(module, reference, params, x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dilation", "border", "bias_shape"),
                         [((2, 3), "mask", (3, 3, 5)), (2, "shift", (3, 5, 9))])
def test_local_module_natten_options_equal_op(dilation, border, bias_shape):
    """dilation= and border= reach the op; 'shift' learns NATTEN's [heads, 2kh-1, 2kw-1]
    relative-position bias, and its sown weights are kh*kw positive weights per pixel."""
    x = _normal(0, (2, 7, 11, 6))
    module = anf.LocalCosineSelfAttention2D(num_heads=3, window=(3, 5), head_dim=4,
                                            dilation=dilation, border=border)
    params = _randomize(_init(module, x)["params"])
    chex.assert_shape(params["position_bias"], bias_shape)

    def reference(p, x):
        heads = attnflax.local_cosine_attention_2d(
            *_project(p, x), window=(3, 5), logit_scale=_scale(p), bias=p["position_bias"],
            dilation=dilation, border=border)
        return _out(p, heads)

    np.testing.assert_allclose(*_module_and_reference(module, reference, params, x),
                               rtol=1e-5, atol=1e-5)
    if border == "shift":
        _, state = _apply(module, {"params": params}, x, mutable=["intermediates"])
        (w,) = state["intermediates"]["attention_weights"]
        chex.assert_shape(w, (2, 7, 11, 3, 3, 5))
        np.testing.assert_allclose(np.asarray(w).sum(axis=(-2, -1)), 1.0, rtol=1e-5)


def test_blocks_take_natten_options():
    """The residual block and the attention conv pass dilation and border on (parameter
    shapes follow); a fresh residual block is still the identity; the defaults are the
    plain window, bit for bit."""
    x = _normal(1, (2, 8, 9, 8))
    block = anf.ResidualAttentionBlock(num_heads=2, window=3, dilation=(2, 3), border="shift")
    variables = _init(block, x)
    chex.assert_shape(variables["params"]["attention"]["position_bias"], (2, 5, 5))
    np.testing.assert_array_equal(_apply(block, variables, x), x)
    conv = anf.AttentionConv2D(features=4, num_heads=2, window=3, dilation=2, strides=2)
    params = jax.eval_shape(conv.init, jax.random.key(0), x)["params"]
    chex.assert_shape(params["attention"]["position_bias"], (2, 3, 3))
    chex.assert_shape(jax.eval_shape(conv.apply, {"params": params}, x), (2, 4, 5, 4))
    plain = anf.LocalCosineSelfAttention2D(num_heads=2, window=3)
    same = anf.LocalCosineSelfAttention2D(num_heads=2, window=3, dilation=(1, 1), border="mask")
    variables = {"params": _randomize(_init(plain, x)["params"])}
    np.testing.assert_array_equal(_apply(plain, variables, x), _apply(same, variables, x))


@pytest.mark.parametrize(
    "make",
    [lambda **kw: anf.LocalCosineSelfAttention2D(num_heads=2, **kw),
     lambda **kw: anf.ResidualAttentionBlock(num_heads=2, **kw),
     lambda **kw: anf.AttentionConv2D(features=4, **kw)],
    ids=["local", "block", "conv"],
)
def test_bad_natten_options_raise_at_construction(make):
    for dilation in (0, (2, -1), 1.5, (1, 2, 3)):
        with pytest.raises(ValueError, match="`dilation` must be a positive int"):
            make(dilation=dilation)
    with pytest.raises(ValueError, match=r"`border` must be one of \('mask', 'shift'\)"):
        make(border="zeros")


def test_shift_border_needs_a_big_enough_image():
    module = anf.LocalCosineSelfAttention2D(num_heads=2, window=5, dilation=(1, 2),
                                            border="shift")
    with pytest.raises(ValueError, match=r"needs an image of at least 5x10, got 6x8"):
        _trace_init(module, (1, 6, 8, 4))


def test_parameter_names_shapes_and_init():
    x = np.ones((1, 4, 4, 8), np.float32)
    params = _init(anf.LocalCosineSelfAttention2D(num_heads=2, window=3), x)["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "query": {"kernel": (8, 2, 4), "bias": (2, 4)},
        "key": {"kernel": (8, 2, 4), "bias": (2, 4)},
        "value": {"kernel": (8, 2, 4), "bias": (2, 4)},
        "out": {"kernel": (2, 4, 8), "bias": (8,)},
        "log_scale": (2,),
        "position_bias": (2, 3, 3),
    }
    np.testing.assert_allclose(params["log_scale"], np.log(10.0), rtol=1e-6)
    np.testing.assert_array_equal(params["position_bias"], 0.0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_logit_scale_is_clamped_at_100():
    """Beyond log(100) the scale stops growing: same output, zero gradient."""
    x = _normal(0, (1, 9, 4))
    module = anf.CosineSelfAttention(num_heads=3, head_dim=2)
    params = _init(module, x)["params"]
    params = {**params, "log_scale": np.array([1.0, math.log(100.0), 10.0], np.float32)}
    f = jax.jit(jax.value_and_grad(lambda p: module.apply({"params": p}, x).sum()))
    _, grads = f(params)
    assert grads["log_scale"][0] != 0.0 and grads["log_scale"][2] == 0.0
    clamped = {**params, "log_scale": params["log_scale"].clip(max=math.log(100.0))}
    np.testing.assert_allclose(f(clamped)[0], f(params)[0], rtol=1e-6)


# --------------------------------------------------------------------------- #
# Sown attention weights.                                                     #
# --------------------------------------------------------------------------- #


def test_local_sown_weights_are_a_distribution_over_in_image_neighbours():
    x = _normal(0, (2, 4, 6, 8))
    module = anf.LocalCosineSelfAttention2D(num_heads=2, window=(3, 5))
    variables = _init(module, x)
    _, state = _apply(module, variables, x, mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    chex.assert_shape(w, (2, 4, 6, 2, 3, 5))
    chex.assert_type(w, jnp.float32)
    w = np.asarray(w)
    assert w.min() >= 0.0
    np.testing.assert_allclose(w.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    outside = ~window_validity((3, 5), (4, 6))[None, :, :, None]  # [1, H, W, 1, kh, kw]
    np.testing.assert_array_equal(np.where(outside, w, 0.0), 0.0)
    assert np.where(outside, 1.0, w).min() > 0.0  # every in-image neighbour counts
    # The maps helper returns the same weights, by module path.
    maps = anf.attention_maps(module, variables, x)
    assert list(maps) == [""]  # the layer is the root module
    np.testing.assert_array_equal(maps[""], w)


def test_global_sown_weights_respect_mask():
    x = _normal(0, (2, 3, 3, 4))
    mask = np.arange(9)[None, None, None, :] < np.array([4, 9])[:, None, None, None]
    module = anf.CosineSelfAttention(num_heads=2, relative_position_bias=True)
    variables = _init(module, x)
    _, state = _apply(module, variables, x, mask=mask, mutable=["intermediates"])
    (w,) = state["intermediates"]["attention_weights"]
    chex.assert_shape(w, (2, 2, 9, 9))
    w = np.asarray(w)
    assert w.min() >= 0.0
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(w[0, :, :, 4:], 0.0)


# --------------------------------------------------------------------------- #
# Blocks.                                                                     #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kwargs",
    [dict(attention="local", window=5, norm="group", norm_groups=4, mlp_ratio=2.0),
     dict(attention="global", position_bias=False)],
)
def test_fresh_residual_block_is_identity(kwargs):
    x = 3.0 * _normal(0, (2, 5, 6, 8))
    block = anf.ResidualAttentionBlock(num_heads=2, **kwargs)
    variables = _init(block, x)

    @jax.jit
    def output_and_grads(params):
        f = lambda p: block.apply({"params": p}, x)
        return f(params), jax.grad(lambda p: jnp.sum(f(p) * x))(params)

    y, grads = output_and_grads(variables["params"])
    np.testing.assert_array_equal(y, x)
    # ... yet it can learn: the zero-initialised output layer gets a gradient.
    assert np.abs(grads["attention"]["out"]["kernel"]).max() > 0.0


def test_attention_conv_strides_like_a_same_conv():
    x = np.ones((2, 5, 6, 8), np.float32)
    layer = anf.AttentionConv2D(features=12, num_heads=3, window=3, strides=2)
    out = jax.eval_shape(lambda x: layer.apply(layer.init(jax.random.key(0), x), x), x)
    chex.assert_shape(out, (2, 3, 3, 12))


def test_bfloat16_compute_keeps_float32_params():
    x = np.ones((2, 4, 4, 8), jnp.bfloat16)
    block = anf.ResidualAttentionBlock(num_heads=2, mlp_ratio=1.0, dtype=jnp.bfloat16)
    variables = _init(block, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    y = _apply(block, variables, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape


# --------------------------------------------------------------------------- #
# Bad input.                                                                  #
# --------------------------------------------------------------------------- #


def _trace_init(module, shape):
    """Traces `init` on an input of `shape` (shape errors surface here; nothing runs)."""
    return jax.eval_shape(module.init, jax.random.key(0), np.ones(shape, np.float32))


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: anf.LocalCosineSelfAttention2D(num_heads=2), (2, 8, 8),
         r"\[batch, height, width, channels\]; got shape \(2, 8, 8\)"),
        (lambda: anf.CosineSelfAttention(num_heads=2), (1, 2, 2, 2, 8), r"got shape \(1, 2"),
        (lambda: anf.ResidualAttentionBlock(num_heads=2), (4, 8), r"got shape \(4, 8\)"),
        (lambda: anf.LocalCosineSelfAttention2D(num_heads=3), (1, 4, 4, 8),
         "input channels=8 must be a positive multiple of num_heads=3"),
        (lambda: anf.CosineSelfAttention(num_heads=4, qkv_features=10), (1, 3, 8),
         "qkv_features=10 must be a positive multiple of num_heads=4"),
        (lambda: anf.CosineSelfAttention(num_heads=2, head_dim=3, qkv_features=8), (1, 3, 8),
         "qkv_features` must equal num_heads \\* head_dim"),
        (lambda: anf.CosineSelfAttention(num_heads=2, relative_position_bias=True), (1, 3, 8),
         "needs an image"),
        (lambda: anf.ResidualAttentionBlock(num_heads=2, norm="group", norm_groups=3),
         (1, 4, 4, 8), "norm_groups=3 to divide the channels; got 8"),
    ],
)
def test_bad_input_raises_value_error(make, shape, match):
    with pytest.raises(ValueError, match=match):
        _trace_init(make(), shape)


@pytest.mark.parametrize("window", [4, (3, 2), (0, 3), (3, 3, 3)])
def test_even_or_malformed_window_raises(window):
    with pytest.raises(ValueError, match="window"):
        anf.LocalCosineSelfAttention2D(num_heads=2, window=window)
    with pytest.raises(ValueError, match="window"):
        anf.ResidualAttentionBlock(num_heads=2, window=window)


@pytest.mark.parametrize("window", [True, 3.5, "3", (3, False)])
def test_window_that_is_no_int_or_pair_of_ints_raises(window):
    """The layers use the ops' window check (bools are not sizes)."""
    with pytest.raises(ValueError, match=r"`window` must be an int or a pair \(kh, kw\)"):
        anf.LocalCosineSelfAttention2D(num_heads=2, window=window)


def test_unknown_choices_raise():
    with pytest.raises(ValueError, match=r"`attention` must be one of \('local', 'global'\)"):
        anf.ResidualAttentionBlock(attention="sparse")
    with pytest.raises(ValueError, match=r"`norm` must be one of"):
        anf.ResidualAttentionBlock(norm="batch")


@pytest.mark.parametrize(
    "make",
    [lambda i: anf.LocalCosineSelfAttention2D(num_heads=2, window=(3, 5), implementation=i),
     lambda i: anf.CosineSelfAttention(num_heads=2, relative_position_bias=True,
                                       implementation=i),
     lambda i: anf.ResidualAttentionBlock(num_heads=2, window=3, mlp_ratio=1.0,
                                          implementation=i)],
    ids=["local", "global", "block"],
)
def test_every_implementation_gives_the_same_layer(make):
    """Same parameters, every kernel: the same outputs and parameter gradients; and a call
    that collects attention maps computes the same output as one that does not."""
    x = _normal(3, (2, 5, 6, 8))
    names = ("xla", "chunked", None)
    variables = _init(make(None), x)
    params = variables["params"]
    if "log_scale" in params:
        params = _randomize(params)
    elif "attention" in params:
        params = {**params, "attention": _randomize(params["attention"])}
        # A fresh block is the identity (zero output kernel): give it a real output.
        out_kernel = params["attention"]["out"]["kernel"]
        params["attention"]["out"] = {**params["attention"]["out"],
                                      "kernel": _normal(4, out_kernel.shape)}

    def loss(implementation, p):
        return jnp.sum(jnp.sin(make(implementation).apply({"params": p}, x)))

    results = {n: jax.jit(jax.value_and_grad(partial(loss, n)))(params) for n in names}
    ref_value, ref_grads = results["xla"]
    for n in names[1:]:
        value, grads = results[n]
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            # float32 sums in another order: errors scale with the leaf's largest entry
            atol = max(3e-5 * float(np.abs(r).max()), 1e-7)
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=atol, err_msg=n)
    out, state = _apply(make("chunked"), {"params": params}, x, mutable=["intermediates"])
    np.testing.assert_allclose(out, _apply(make("chunked"), {"params": params}, x),
                               rtol=1e-5, atol=1e-5)
    assert jax.tree.leaves(state["intermediates"]), "maps are sown when collected"


def test_unknown_implementation_raises_at_construction():
    with pytest.raises(ValueError, match=r"LocalCosineSelfAttention2D: unknown implementation="
                                         r"'cudnn'.*'xla', 'chunked'"):
        anf.LocalCosineSelfAttention2D(num_heads=2, implementation="cudnn")
    with pytest.raises(ValueError, match=r"CosineSelfAttention: unknown implementation='fast'"):
        anf.CosineSelfAttention(num_heads=2, implementation="fast")


def test_global_position_bias_tied_to_image_size():
    module = anf.CosineSelfAttention(num_heads=2, relative_position_bias=True)
    variables = _trace_init(module, (1, 3, 3, 4))
    with pytest.raises(ValueError, match=r"created with shape \(2, 5, 5\).*needs \(2, 7, 7\)"):
        jax.eval_shape(module.apply, variables, np.ones((1, 4, 4, 4), np.float32))


# --------------------------------------------------------------------------- #
# Used as one layer of somebody else's model.                                 #
# --------------------------------------------------------------------------- #


class _TheirNet(nn.Module):
    """A user's hand-written model with our local attention as one layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = x + anf.LocalCosineSelfAttention2D(num_heads=2, window=3)(x)
        return nn.Dense(2)(x.max(axis=(1, 2)))


def _pairs(rng, n):
    """Noise plus two adjacent bright pixels: label 0 = side by side, 1 = stacked."""
    x = rng.normal(0.0, 0.1, (n, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 2, n)
    r, c = rng.integers(0, 7, n), rng.integers(0, 7, n)
    x[np.arange(n), r, c, 0] += 1.0
    x[np.arange(n), r + y, c + 1 - y, 0] += 1.0
    return x, y


def test_imported_into_another_model_trains_with_optax():
    model, tx = _TheirNet(), optax.adam(1e-2)
    params = _init(model, np.zeros((1, 8, 8, 1), np.float32))["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng, losses = np.random.default_rng(0), []
    for _ in range(60):
        params, opt_state, loss = step(params, opt_state, *_pairs(rng, 32))
        losses.append(float(loss))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > 0.5 and last < 0.2 * first, (first, last)
    attn = params["LocalCosineSelfAttention2D_0"]
    assert np.abs(attn["position_bias"]).max() > 0.0  # the layer itself trained


# --------------------------------------------------------------------------- #
# README.                                                                     #
# --------------------------------------------------------------------------- #


def test_readme_snippet_runs():
    run_readme_snippet(README_SECTION)
