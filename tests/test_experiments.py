"""Tests of the experiment scripts (compare, visualize, predict, prune, robustness) and of
`attnflax.viz`, the attention-map data their pictures are drawn from.

The scripts are called in-process through their ``main(argv)``. A session-scoped fixture
trains two tiny models on the embedded digits (a few steps each: a local- and a
global-attention CNN) and every script test reads those workdirs.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.colors
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image
from train_testutil import REPO, load_script

import attnflax
from attnflax import data, models, pytree, restore, train, viz
from attnflax.analysis import prune
from attnflax.configs import recipes
from attnflax.data import image_files
from attnflax.nn import CosineSelfAttention, LocalCosineSelfAttention2D, maps
from attnflax.ops import window_validity

# --------------------------------------------------------------------------- #
# attnflax.viz on hand-made models.                                           #
# --------------------------------------------------------------------------- #


class LocalNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = x + LocalCosineSelfAttention2D(num_heads=2, window=3, name="local")(x)
        x = x + LocalCosineSelfAttention2D(num_heads=1, window=(3, 5), name="wide")(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


class GlobalNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=2)(x)  # 7x5 -> 4x3
        x = x + CosineSelfAttention(num_heads=2, name="global")(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def _init(model, shape=(2, 7, 5, 1)):
    x = jax.random.normal(jax.random.key(1), shape)
    return jax.jit(model.init)(jax.random.key(0), x), x


@pytest.fixture(scope="module")
def local_layers():
    model = LocalNet()
    variables, x = _init(model)
    return maps.collect_attention(model, variables, x)


def test_collect_attention_local_layers_and_query_maps(local_layers):
    layers = local_layers
    assert list(layers) == ["local", "wide"]
    assert layers["local"].kind == "local" and layers["local"].grid == (7, 5)
    assert layers["local"].window == (3, 3) and layers["wide"].window == (3, 5)
    assert layers["local"].num_heads == 2
    for layer in layers.values():
        kh, kw = layer.window
        valid = window_validity((kh, kw), layer.grid)
        for b in range(2):
            for y in range(7):
                for xq in range(5):
                    m = maps.query_attention(layer, b, (y, xq))
                    assert m.shape == (7, 5)
                    assert m.sum() == pytest.approx(1.0, abs=1e-5)
                    assert m.min() >= 0
                    window = np.zeros((7, 5), bool)
                    window[max(0, y - kh // 2): y + kh // 2 + 1,
                           max(0, xq - kw // 2): xq + kw // 2 + 1] = True
                    assert np.all(m[~window] == 0)
                    # The window entries are the sown weights, mean over heads.
                    w = layer.weights[b, y, xq].mean(0)
                    np.testing.assert_allclose(m[window], w[valid[y, xq]], rtol=1e-6)
            mean = maps.mean_attention(layer, b)
            assert mean.shape == (7, 5) and mean.sum() == pytest.approx(1.0, abs=1e-5)
        head1 = maps.query_attention(layers["local"], 0, (3, 2), head=1)
        np.testing.assert_allclose(head1[2:5, 1:4], layers["local"].weights[0, 3, 2, 1])


def test_collect_attention_global_layer_knows_its_grid():
    model = GlobalNet()
    variables, x = _init(model)
    layers = maps.collect_attention(model, variables, x)
    layer = layers["global"]
    assert layer.kind == "global" and layer.grid == (4, 3) and layer.window is None
    assert layer.weights.shape == (2, 2, 12, 12)
    m = maps.query_attention(layer, 1, (2, 1))
    np.testing.assert_allclose(m.ravel(), layer.weights[1, :, 7].mean(0), rtol=1e-6)
    assert m.sum() == pytest.approx(1.0, abs=1e-5)
    assert maps.mean_attention(layer, 0).sum() == pytest.approx(1.0, abs=1e-5)
    assert maps.to_grid((6, 4), (7, 5), layer.grid) == (3, 2)
    assert maps.infer_grid(12, (7, 5)) == (4, 3)


class DilatedNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = x + LocalCosineSelfAttention2D(num_heads=2, window=3, dilation=2, name="dilated")(x)
        x = x + LocalCosineSelfAttention2D(num_heads=2, window=3, border="shift", name="shift")(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_maps_of_dilated_or_shifted_layers_are_refused_not_misdrawn():
    model = DilatedNet()
    variables, x = _init(model)
    layers = maps.collect_attention(model, variables, x)
    assert [(v.dilation, v.border) for v in layers.values()] == [((2, 2), "mask"),
                                                                 ((1, 1), "shift")]
    for layer in layers.values():
        match = f"'{layer.name}' has dilation=.*leave it out"
        with pytest.raises(ValueError, match=match):
            maps.query_attention(layer, 0, (3, 2))
        with pytest.raises(ValueError, match=match):
            maps.mean_attention(layer, 0)


def test_unknown_layer_lists_existing_ones(local_layers):
    layers = local_layers
    assert list(maps.select_layers(layers, ["wide"])) == ["wide"]
    assert list(maps.select_layers(layers, None)) == ["local", "wide"]
    with pytest.raises(ValueError, match="unknown attention layer.*nope.*existing: local, wide"):
        maps.select_layers(layers, ["nope"])
    with pytest.raises(ValueError, match="outside"):
        maps.to_grid((7, 0), (7, 5), (7, 5))


def test_plot_helpers_draw_what_they_are_given(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(7, 5, 1))
    panel = viz.Panel(image, rng.uniform(size=(4, 3)), "p", marker=(1, 1))
    fig = viz.attention_figure([[panel, panel], [panel]])
    assert len(fig.axes) == 4  # 2 x 2, the short second row padded with an empty cell
    assert [ax.get_title() for ax in fig.axes[:3]] == ["p"] * 3 and not fig.axes[3].axison
    for ax in fig.axes[:3]:  # the image, the heatmap over it, the query's outline
        assert len(ax.images) == 2
        assert [p.get_gid() for p in ax.patches] == [viz.QUERY_MARKER]
    viz.close(fig)
    with pytest.raises(ValueError, match="no image"):
        viz.attention_figure([[viz.Panel(None, None, "mean")]])

    # The scripts' image grid (evaluate.py, inspect_data.py): 3 images on a 2 x 2 grid.
    fig = viz.image_grid(rng.uniform(size=(3, 4, 4, 1)), ["a", "b", "c"], "grid",
                         colors=["black", "red", "black"])
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 4 and [ax.get_title() for ax in shown] == ["a", "b", "c"]
    assert shown[1].title.get_color() == "red" and fig._suptitle.get_text() == "grid"
    assert shown[0].images[0].get_array().shape == (4, 4)  # one channel: drawn gray
    viz.close(fig)

    fig = viz.line_plot({"x": ([0, 1], [1.0, 0.5])}, xlabel="s", ylabel="acc", title="t")
    ax = fig.axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [1.0, 0.5]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("s", "acc", "t")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x"]
    png = tmp_path / "line.png"
    fig.savefig(png, dpi=100)
    viz.close(fig)
    with Image.open(png) as saved:
        assert saved.size == (500, 350)  # the 5 x 3.5 inch figure at 100 dpi
        pixels = np.asarray(saved.convert("RGB"), np.int64)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # not blank
    line_rgb = np.asarray(matplotlib.colors.to_rgb(line.get_color())) * 255
    assert np.sum(np.abs(pixels - line_rgb).max(-1) < 30) > 100  # the line is drawn

    up = viz.upsample(np.arange(6.0).reshape(2, 3), (4, 6))
    np.testing.assert_array_equal(up, np.arange(6.0).reshape(2, 3).repeat(2, 0).repeat(2, 1))
    assert viz.display_image(np.full((2, 2, 3), 7.0)).max() == 0.0


# --------------------------------------------------------------------------- #
# The scripts, on two tiny models trained on the embedded digits.             #
# --------------------------------------------------------------------------- #

# Tiny versions of the digits recipe: narrow convs, a short run with a short warm-up.
TINY = ["model_kwargs.features=(8,16)", "model_kwargs.hidden=16", "warmup_epochs=0.2",
        "learning_rate=0.01", "num_devices=1"]
STEPS = 30


@pytest.fixture(scope="session")
def compared(tmp_path_factory):
    """Runs compare.py once: local and global attention CNNs x 2 seeds x `STEPS` steps."""
    out = tmp_path_factory.mktemp("compare")
    calls = []

    def trainer(config, workdir):
        calls.append(workdir)
        return train.train_and_evaluate(config, workdir)

    argv = ["--row=attention_local", "--row=attention_global", "--seeds=2",
            f"--steps={STEPS}", f"--out={out}", *(f"--config.{t}" for t in TINY)]
    try:  # compare.py turns on a persistent compilation cache in OUT/jax_cache ...
        result = load_script("compare").main(argv, trainer=trainer)
    finally:  # ... which must not outlive the fixture in this shared test process.
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    return {"out": out, "argv": argv, "result": result, "calls": calls,
            "local": str(out / "runs" / "attention_local" / "seed0"),
            "global": str(out / "runs" / "attention_global" / "seed0")}


def _results(workdir):
    return json.loads((pathlib.Path(workdir) / "results.json").read_text())


def test_compare_writes_both_files_and_skips_finished_runs(compared, capsys):
    out, result = compared["out"], compared["result"]
    assert len(compared["calls"]) == 4
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["attention_local", "attention_global"]
    for r in rows:
        assert r["seeds"] == [0, 1] and len(r["test_accuracy"]) == 2
        assert r["test_accuracy_mean"] == pytest.approx(np.mean(r["test_accuracy"]))
        assert r["test_accuracy_std"] == pytest.approx(np.std(r["test_accuracy"], ddof=1))
        assert r["params"] > 0 and r["multiply_adds"] > 0 and r["train_steps"] == STEPS
        assert r["test_examples"] == 360
        assert r["model_kwargs"]["attention"] == r["label"].split("_")[1]
    assert not result["budget_differences"]  # same data, schedule, steps for both rows
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    md = (out / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| attention_")]
    assert [line.split("|")[1].strip() for line in table] == ["attention_local",
                                                              "attention_global"]
    assert "attention_global vs attention_local" in md

    # Second call: every (config, seed) is finished, nothing is trained again.
    def no_training(config, workdir):
        raise AssertionError(f"re-trained {workdir}")

    capsys.readouterr()
    again = load_script("compare").main([*compared["argv"], "--jax_cache="],
                                        trainer=no_training)
    assert capsys.readouterr().out.count("finished before: skipped") == 4
    assert [r["test_accuracy"] for r in again["rows"]] == [r["test_accuracy"] for r in rows]
    assert not any(run["ran"] for run in again["runs"])
    assert any((out / "jax_cache").iterdir())  # the second seeds reused compiled steps


def test_compare_rejects_bad_rows_before_training(tmp_path, capsys):
    compare = load_script("compare")
    spec = compare.parse_row("wide=experiments/configs/digits.py:cnn+model_kwargs.hidden=8")
    assert (spec.label, spec.arg, spec.overrides) == ("wide", "cnn", (("model_kwargs.hidden", 8),))
    assert compare.parse_row("attention_global").overrides == (
        ("model_kwargs.attention", "global"),)
    for row, message in (
            ("no_such.py", "neither a preset"),
            ("cnn+model_kwargs.hiden.x=8", "unknown config key 'model_kwargs.hiden.x'"),
            ("cnn", None)):
        argv = [f"--row={row}", f"--row={row}"] if message is None else [f"--row={row}"]
        with pytest.raises(SystemExit) as exit_info:
            compare.main([*argv, f"--out={tmp_path}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert (message or "duplicate row labels") in err and len(err.strip().splitlines()) == 1
    # A bad command line is one line and status 2, before anything runs.
    for argv, message in (
            (["--config.learning_rat=0.1"], "unknown config key 'learning_rat'"),
            (["--config.num_epochs=abc"], "could not convert string to float: 'abc'"),
            (["--seeds=0"], "--seeds=0"),
            (["--set", "learning_rate=0.1"], "Unknown command line flag 'set'")):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(["--row=cnn", f"--out={tmp_path}", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("compare.py: error:"), err
        assert len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_compare_overrides_apply_to_every_row_after_its_own():
    """``--config.<key>=<value>`` (typed as attnflax.main types it), ``--steps`` and
    ``--dataset`` reach every row and seed, after the row's ``+KEY=VALUE``; ``--config``
    builds the presets on another recipe."""
    compare = load_script("compare")
    args = compare.parse_args([
        "--row=cnn", "--row=attention_global+learning_rate=0.1+model_kwargs.hidden=4",
        "--config.learning_rate=0.5", "--config.model_kwargs.hidden=8",
        "--config.model_kwargs.window=(5,5)", "--seeds=2", "--steps=7"])
    assert args.base is None  # digits.py: the presets of the table
    rows, configs = compare.row_configs(args)
    assert [r.label for r in rows] == ["cnn", "attention_global"]
    for seeds in configs.values():
        assert [c.seed for c in seeds] == [c.data.seed for c in seeds] == [0, 1]
        for c in seeds:
            assert (c.learning_rate, c.model_kwargs.hidden, c.num_train_steps) == (0.5, 8, 7)
            assert c.model_kwargs.window == (5, 5) and isinstance(c.learning_rate, float)
    assert configs["attention_global"][0].model_kwargs.attention == "global"
    assert configs["cnn"][0].model == "cnn"

    cluttered = compare.parse_args(["--config=experiments/configs/cluttered.py",
                                    "--config.data.eval_batch_size=100", "--seeds=1"])
    rows, configs = compare.row_configs(cluttered)
    assert [r.arg for r in rows] == list(compare.DEFAULT_ROWS)
    assert {c[0].data.dataset for c in configs.values()} == {"attnflax_cluttered"}
    assert {c[0].data.eval_batch_size for c in configs.values()} == {100}
    assert compare.budget_differences(
        {label: compare.config_json(c[0]) for label, c in configs.items()}) == {}


@pytest.mark.parametrize("kind", ["local", "global"])
def test_visualize_panels_come_from_sown_weights(compared, kind, tmp_path):
    workdir = compared[kind]
    out = load_script("visualize").main([
        "--workdir", workdir, "--num_images", "2", "--query=0,0", "--query=3,4", "--query=7,7",
        "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / "attention.png") > 1000
    assert json.loads((tmp_path / "attention.json").read_text())["layers"]
    (name, layer), = out["layer_data"].items()
    assert name == "attention_block0/attention" and layer.kind == kind
    # Independent check: the sown weights of a plain eval forward pass.
    trained = restore.load_trained(workdir)
    images = out["layer_data"][name].weights.shape[0]
    batch = next(iter(data.create_eval_iterator(trained.config.data, num_devices=1)))
    x = batch["image"][:images]
    _, state = jax.jit(lambda v, x: trained.model.apply(v, x, train=False,
                                                        mutable=["intermediates"]))(
        trained.variables, x)
    (sown,) = state["intermediates"]["attention_block0"]["attention"]["attention_weights"]
    sown = np.asarray(sown)
    np.testing.assert_allclose(layer.weights, sown, rtol=1e-5, atol=1e-6)
    for i, panels in enumerate(out["panels"]):
        assert [p.what for p in panels] == ["query"] * 3 + ["mean"]
        for p in panels:
            assert p.heatmap.shape == (8, 8)
            assert p.heatmap.sum() == pytest.approx(1.0, abs=1e-5)
            assert p.heatmap.min() >= 0
        for p in panels[:3]:
            assert p.marker == p.query and p.image is None  # outlined where it looks
            y, xq = p.query_grid
            if kind == "local":
                inside = np.zeros((8, 8), bool)
                inside[max(0, y - 1): y + 2, max(0, xq - 1): xq + 2] = True
                assert np.all(p.heatmap[~inside] == 0)
                valid = window_validity((3, 3), (8, 8))[y, xq]
                np.testing.assert_allclose(p.heatmap[inside], sown[i, y, xq].mean(0)[valid],
                                           rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_allclose(p.heatmap.ravel(), sown[i, :, y * 8 + xq].mean(0),
                                           rtol=1e-5, atol=1e-6)


def test_visualize_unknown_layer_lists_existing_ones(compared, tmp_path):
    with pytest.raises(SystemExit, match="unknown attention layer.*nope.*existing: "
                                         "attention_block0/attention"):
        load_script("visualize").main(["--workdir", compared["local"], "--layers", "nope",
                                       "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="outside"):
        load_script("visualize").main(["--workdir", compared["local"], "--query=8,0",
                                       "--out", str(tmp_path)])


def _test_images(trained, n):
    """The first `n` test images as uint8 [n, 8, 8, 1] and their pipeline inputs."""
    batch = next(iter(data.create_eval_iterator(trained.config.data, num_devices=1)))
    x = np.asarray(batch["image"][:n])
    pixels = np.rint((x * np.asarray(trained.std) + np.asarray(trained.mean)) * 255)
    return pixels.astype(np.uint8), x, np.asarray(batch["label"][:n])


def test_predict_gives_the_label_of_evaluation(compared, tmp_path):
    workdir = compared["local"]
    trained = restore.load_trained(workdir)
    uint8, x, _ = _test_images(trained, 4)
    # The evaluation path: the pipeline batch through the model (results.json's accuracy).
    batches = data.create_eval_iterator(trained.config.data, num_devices=1)
    evaluation = restore.evaluate(trained, batches)
    assert (evaluation["accuracy"], evaluation["examples"]) == (
        pytest.approx(_results(workdir)["test_accuracy"]), 360)
    expected = restore.predict_logits(trained, x).argmax(-1)
    paths = []
    for i, img in enumerate(uint8):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(img[..., 0], mode="L").save(paths[-1])
    # The file is read back into exactly the pipeline's input.
    np.testing.assert_allclose(
        image_files.load_images(paths, trained.image_shape, trained.mean, trained.std), x,
        atol=1e-6)
    results = load_script("predict").main(["--workdir", workdir, "--top_k", "3",
                                           "--out", str(tmp_path / "out"), *paths])
    names = trained.class_names
    assert [r["label"] for r in results] == [names[i] for i in expected]
    for r in results:
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert (tmp_path / "out" / "predictions.json").exists()


def test_predict_handles_any_size_and_format(compared, tmp_path):
    rng = np.random.default_rng(0)
    rgba = tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 256, (7, 5, 4), dtype=np.uint8), mode="RGBA").save(rgba)
    jpeg = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), mode="RGB").save(jpeg)
    for path, shape in ((rgba, (7, 5, 4)), (jpeg, (200, 300, 3))):
        assert image_files.read_image_file(path).shape == shape
    results = load_script("predict").main([
        "--workdir", compared["global"], "--overlay", "--out", str(tmp_path / "out"),
        str(rgba), str(jpeg)])
    assert len(results) == 2
    for r in results:
        assert len(r["top_k"]) == 5 and os.path.getsize(r["overlay"]) > 1000
    batch = image_files.load_images([rgba, jpeg], (8, 8, 1), (0.3,), (0.4,))
    assert batch.shape == (2, 8, 8, 1) and batch.dtype == np.float32


def test_predict_bad_paths_are_clear_errors(compared, tmp_path):
    predict = load_script("predict")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path, message in ((tmp_path / "missing.png", "does not exist"),
                          (text, "not a readable image"), (empty, "empty"),
                          (tmp_path, "not a file")):
        with pytest.raises(SystemExit, match=message):
            predict.main(["--workdir", compared["local"], str(path)])


def test_prune_script(compared, tmp_path):
    workdir = compared["local"]
    result = load_script("prune").main([
        "--workdir", workdir, "--sparsities=0,90", "--finetune_steps", "2",
        "--schedule", "oneshot", "--out", str(tmp_path)])
    trained = restore.load_trained(workdir)
    params = trained.variables["params"]
    base = _results(workdir)["test_accuracy"]
    zero, ninety = result["rows"]
    # Sparsity 0 reproduces the trained model's accuracy exactly.
    assert result["base_accuracy"] == pytest.approx(base)
    assert zero["accuracy_pruned"] == pytest.approx(base)
    assert zero["zero_weights"] == prune.sparsity_report(params).zeros
    # 90 %: achieved to within one weight per tensor; the pruned weights stay zero
    # through the fine-tune (read back from the compressed checkpoint on disk).
    report = prune.sparsity_report(params)
    assert abs(ninety["zero_weights"] - 0.9 * report.total) <= len(report.per_tensor)
    masks = prune.magnitude_masks(params, 0.9, "lamp")
    saved = np.load(ninety["npz_path"])
    changed = 0
    for path, m in jax.tree_util.tree_leaves_with_path(masks):
        if prune.is_prunable(path, m):
            w = saved[pytree.path_name(path)]
            assert np.all(w[~m] == 0)
            changed += int(np.sum(w[m] != np.asarray(
                _leaf(params, path))[m]))
    assert changed > 0  # the fine-tune did update the surviving weights
    assert ninety["npz_bytes"] < zero["npz_bytes"]
    assert os.path.getsize(tmp_path / "prune.png") > 1000
    assert "| 90 | 90.0" in re.sub(r" +", " ", (tmp_path / "prune.md").read_text())


def _leaf(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", k)]
    return tree


@pytest.mark.parametrize("bad", ["100", "-5", "150"])
def test_prune_out_of_range_sparsity(compared, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("prune").main(["--workdir", compared["local"], f"--sparsities=50,{bad}"])
    assert exit_info.value.code == 2
    assert "sparsity must be a percentage in [0, 100)" in capsys.readouterr().err


def test_robustness_script(compared, tmp_path):
    workdirs = [compared["local"], compared["global"]]
    result = load_script("robustness").main([
        *(f"--workdir={w}" for w in workdirs), "--eps=0,0.1", "--pgd_steps", "2",
        "--noise=0.1", "--blur=", "--contrast=", "--out", str(tmp_path)])
    assert len(result["accuracy"]) == 2
    for (label, acc), workdir in zip(result["accuracy"].items(), workdirs, strict=True):
        clean = acc["clean"]
        assert clean == pytest.approx(_results(workdir)["test_accuracy"]), label
        assert acc["fgsm ε=0"] == clean and acc["pgd ε=0"] == clean
        assert acc["fgsm ε=0.1"] <= clean and acc["pgd ε=0.1"] <= clean
        assert set(acc) == {"clean", "gaussian_noise σ0.1", "fgsm ε=0", "fgsm ε=0.1",
                            "pgd ε=0", "pgd ε=0.1"}
        # The attacks' perturbations of the real test images stay within ε.
        linf = result["max_linf_change"][label]
        assert linf["clean"] == 0 and linf["fgsm ε=0"] == 0 and linf["pgd ε=0"] == 0
        assert 0.05 < linf["fgsm ε=0.1"] <= 0.1 + 1e-6 and 0 < linf["pgd ε=0.1"] <= 0.1 + 1e-6
    assert os.path.getsize(tmp_path / "robustness.png") > 1000
    assert "fgsm ε=0.1" in (tmp_path / "robustness.md").read_text()


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "8/0", "big"])
def test_robustness_out_of_range_epsilon(compared, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("robustness").main(["--workdir", compared["local"], f"--eps=0,{bad}"])
    assert exit_info.value.code == 2
    assert "epsilon" in capsys.readouterr().err


@pytest.mark.parametrize("script,extra", [
    ("visualize", []), ("predict", ["x.png"]), ("prune", []), ("robustness", []),
])
def test_workdir_without_checkpoint_is_a_clear_error(script, extra, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoints/ directory"):
        load_script(script).main(["--workdir", str(tmp_path), *extra])
    with pytest.raises(SystemExit, match="does not exist"):
        load_script(script).main(["--workdir", str(tmp_path / "nope"), *extra])


def test_compare_reuses_only_results_of_the_same_config(tmp_path):
    compare = load_script("compare")
    config = compare.build_config(compare.parse_row("cnn"), seed=0)
    saved = compare.config_json(config)
    saved["data"].pop("seed")  # a key the code added after the run finished: reused
    (tmp_path / "results.json").write_text(json.dumps({"config": saved, "test_accuracy": 0.5}))

    def no_training(config, workdir):
        raise AssertionError("re-trained")

    results, ran = compare.run_or_load(config, str(tmp_path), no_training)
    assert (results["test_accuracy"], ran) == (0.5, False)
    saved["learning_rate"] = 1.0  # a different recipe: refused, nothing overwritten
    (tmp_path / "results.json").write_text(json.dumps({"config": saved, "test_accuracy": 0.5}))
    with pytest.raises(ValueError, match="different config.*learning_rate"):
        compare.run_or_load(config, str(tmp_path), no_training)


# Orbax's notices for a read-only manager, and JAX's for a backend it probes and lacks.
_READ_ONLY_NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


def test_checkpoints_open_read_only_without_orbax_notices(compared, caplog):
    """The analysis scripts open checkpoints read-only (`restore`, evaluate.py's
    `checkpoint.create_manager(read_only=True)`); Orbax's notices about it are dropped,
    only while the manager is opened."""
    import logging

    from attnflax import checkpoint

    caplog.set_level(logging.INFO)
    restore.checkpoint_steps(compared["local"])
    restore.load_trained(compared["local"])
    checkpoint.create_manager(checkpoint.checkpoint_dir(compared["global"]),
                              read_only=True).close()
    assert not [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(_READ_ONLY_NOTICES)]
    logging.getLogger("absl").warning("Given directory is read only=%s", "elsewhere")
    assert "Given directory is read only=elsewhere" in caplog.text  # not filtered for good


def test_model_summary_stderr_has_no_backend_probe_notice():
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # JAX probes all
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "model_summary.py"), "--models=cnn",
         "--notabulate"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cnn" in proc.stdout
    assert "Unable to initialize backend" not in proc.stderr
    assert not any(notice in proc.stderr for notice in _READ_ONLY_NOTICES)


# ----------------------------------------------------------------- figures and texts


def _window_extent(artist, renderer):
    return artist.get_window_extent(renderer)


def test_query_marker_is_a_hollow_outline_of_one_pixel():
    """At 32x32 with a 3x3 window the marker must not hide the window: it outlines the
    query pixel alone (about one pixel across) and is not filled."""
    image = np.random.default_rng(0).random((32, 32, 1)).astype(np.float32)
    heat = np.zeros((32, 32), np.float32)
    heat[15:18, 15:18] = 1 / 9
    fig = viz.attention_figure([[viz.Panel(image, heat, "query (16, 16)", marker=(16, 16))]])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    (marker,) = [p for p in ax.patches if p.get_gid() == viz.QUERY_MARKER]
    assert not marker.get_fill()
    pixel = ax.get_window_extent(renderer).width / 32
    box = marker.get_window_extent(renderer)
    line = marker.get_linewidth() * fig.dpi / 72
    assert box.width <= pixel + line + 1 and box.height <= pixel + line + 1
    assert not ax.lines  # no '+' drawn over the window either
    viz.close(fig)


def test_confusion_matrix_title_fits_the_figure():
    evaluate = load_script("evaluate")
    names = [f"class_{i}" for i in range(10)]
    title = ("attention_cnn_with_a_rather_long_model_name step 123456 on "
             "test[:90%] of attnflax_cluttered/with_many_distractors: 99.17%")
    fig = evaluate.confusion_figure(np.eye(10, dtype=np.int64), names, title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.axes[0].title.get_window_extent(renderer)
    assert box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    assert "\n" in fig.axes[0].get_title()  # wrapped, same words
    assert fig.axes[0].get_title().split() == title.split()
    viz.close(fig)


def test_robustness_legend_covers_no_bar_and_stays_in_the_figure():
    rb_script = load_script("robustness")
    labels = ["attention_local/seed0", "attention_global/seed0"]
    conds = rb_script.conditions(rb_script.parse_args(
        ["--workdir", "x", "--eps=0,0.1", "--noise=0.1", "--blur=1", "--contrast=0.5"]))
    accuracy = {m: {c[3]: 0.99 for c in conds} for m in labels}  # tall bars: worst case
    fig = rb_script.robustness_figure(labels, accuracy, conds, ["fgsm", "pgd"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[1]
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(bars) == 2 * 4
    assert not [b for b in bars if b.overlaps(legend)]
    assert legend.x1 <= fig.bbox.x1 and legend.y1 <= fig.bbox.y1
    viz.close(fig)


def test_robustness_markdown_names_each_model_once():
    rb_script = load_script("robustness")
    one = "attention_cnn (local) step 135"
    assert rb_script.models_sentence([one], [one]) == f"Model: `{one}`."
    assert rb_script.models_sentence(["local/seed0", "global/seed0"], [one, "cnn step 9"]) == (
        f"Models: `local/seed0`: {one}; `global/seed0`: cnn step 9.")


def test_robustness_blur_none_skips_it(capsys):
    rb_script = load_script("robustness")
    args = rb_script.parse_args(["--workdir", "x", "--blur=none", "--noise=NONE",
                                 "--attacks=none"])
    assert args.blur == [] and args.noise == [] and args.attacks == []
    assert args.contrast  # the default levels
    assert [c[0] for c in rb_script.conditions(args)] == ["clean"] + ["corruption"] * len(
        args.contrast)
    for bad in ("--blur=none,1", "--blur=soft"):
        with pytest.raises(SystemExit) as exit_:
            rb_script.parse_args(["--workdir", "x", bad])
        assert exit_.value.code == 2  # a usage error
    assert "a number or 'none'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        rb_script.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "'--blur=none' or --blur=: skip it" in " ".join(capsys.readouterr().out.split())


def test_prune_help_names_the_default_criterion(capsys):
    script = load_script("prune")
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # after the usage lines
    assert script.DEFAULT_CRITERION == "lamp" and "LAMP" in description
    assert "(default" in description.split("LAMP")[1][:30]
    assert not description.lower().startswith("global magnitude pruning")
    assert script.parse_args(["--workdir", "x"]).criterion == script.DEFAULT_CRITERION


def _fake_child(ips_by_round):
    calls = []

    def run_child(args, n, argv):
        r = sum(1 for _, m in calls if m == n)
        calls.append((r, n))
        ips = ips_by_round[n][r]
        row = {"model": "cnn", "registry_name": "cnn", "attention_implementation": None,
               "devices": n, "global_batch": 8, "params": 10, "compile_seconds": 1.0 + r,
               "step_ms": 8000 / ips, "images_per_second": ips,
               "images_per_second_min": ips - 1, "images_per_second_max": ips + 1,
               "images_per_second_samples": [ips - 1, ips, ips + 1]}
        return {"rows": [row], "backend": "cpu", "device_kind": "cpu", "jax": "x"}

    return run_child, calls


def test_bench_train_alternates_device_counts_and_reports_the_spread(monkeypatch, tmp_path,
                                                                    capsys):
    bench = load_script("bench_train")
    run_child, calls = _fake_child({1: [100.0, 100.0, 100.0], 2: [90.0, 180.0, 150.0]})
    monkeypatch.setattr(bench, "run_child", run_child)
    report = bench.main(["--devices=1,2", "--rounds=3", f"--out={tmp_path / 'bench'}"])
    assert json.loads((tmp_path / "bench" / "train.json").read_text()) == json.loads(
        json.dumps(report))  # --out is a folder
    assert calls == [(0, 1), (0, 2), (1, 2), (1, 1), (2, 1), (2, 2)]  # alternating order
    two = next(r for r in report["rows"] if r["devices"] == 2)
    assert (two["speedup"], two["speedup_min"], two["speedup_max"]) == (1.5, 0.9, 1.8)
    assert two["images_per_second"] == 150.0  # median of all 9 samples
    assert (two["images_per_second_min"], two["images_per_second_max"]) == (89.0, 181.0)
    assert two["compile_seconds"] == 2.0 and two["scaling_efficiency"] == 0.75
    assert report["scaling"].startswith("strong")
    out = capsys.readouterr().out
    assert "| speed-up (median) | min | max | strong-scaling efficiency |" in out
    assert "| 1.50 | 0.90 | 1.80 | 0.75 |" in out
    doc = " ".join(bench.__doc__.split())
    assert "strong scaling" in doc and "weak" not in doc


def test_bench_train_child_times_every_repeat():
    bench = load_script("bench_train")
    args = bench.parse_args(["--models=cnn", "--batch=8", "--steps=1", "--repeats=2",
                             "--child=2"])
    (row,) = bench.child(args)["rows"]
    assert row["devices"] == 2 and len(row["images_per_second_samples"]) == 2
    assert row["images_per_second_min"] <= row["images_per_second"] <= row[
        "images_per_second_max"]


def test_bench_train_times_named_variants_with_their_attributes(capsys):
    bench = load_script("bench_train")
    args = bench.parse_args(["--models=cnn,resnet20_local_attention", "--image=8,8,1",
                             "--batch=4", "--steps=1", "--repeats=1", "--child=1"])
    rows = {r["model"]: r for r in bench.child(args)["rows"]}
    assert rows["resnet20_local_attention"]["registry_name"] == "resnet20"
    # The variant's attention blocks (stages 2 and 3) are in the timed model.
    plain = models.create_model("resnet20", num_classes=10)
    x = jnp.zeros((1, 8, 8, 1))
    plain_params = pytree.count_params(plain.init(jax.random.PRNGKey(0), x)["params"])
    assert rows["resnet20_local_attention"]["params"] > plain_params
    assert bench.resolve_model("resnet20_local_attention") == recipes.model_variant(
        "resnet20_local_attention")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--models=cnn,bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'bogus'" in err and "resnet20_local_attention" in err


def test_accelerator_check_finds_a_wrong_kernel(monkeypatch):
    """The check compares every kernel with 'xla' at the highest precision: a kernel off
    by 10 % in its output (here 'chunked', sabotaged) fails it, the others pass."""
    check = load_script("accelerator_check")
    right = attnflax.local_cosine_attention_2d

    def off_by_ten_percent(*args, implementation=None, **kwargs):
        out = right(*args, implementation=implementation, **kwargs)
        return out * 1.1 if implementation == "chunked" else out

    monkeypatch.setattr(attnflax, "local_cosine_attention_2d", off_by_ten_percent)
    report = check.check_kernels(quick=True)
    assert report["ok"] is False
    rows = {(r["op"], r["dtype"], r["implementation"]): r for r in report["rows"]}
    for dtype in ("float32", "bfloat16"):
        assert rows["local", dtype, "chunked"]["ok"] is False
        assert rows["local", dtype, "chunked"]["errors"]["output"] > check.TOLERANCE[dtype]
    for key in [("local", "float32", "xla"), ("local", "float32", "pallas_interpret"),
                ("global", "float32", "chunked"), ("global", "bfloat16", "chunked")]:
        assert rows[key]["ok"] and rows[key]["max_error"] < check.TOLERANCE[key[1]], key
    assert "| local | 13x11, 7x7, bias | float32 | chunked |" in check.check_table(report)


def test_accelerator_check_keeps_to_its_budget_and_writes_after_every_step(
        monkeypatch, tmp_path, capsys):
    check = load_script("accelerator_check")
    clock = [0.0]
    ran = []

    def fake_step(argv, out, limit):
        ran.append((os.path.basename(argv[0]), limit))
        clock[0] += 100.0  # every step takes 100 s
        report = {"ok": False, "rows": []} if "--check_only" in argv else {"rows": []}
        return {"status": "ok", "seconds": 100.0, "stdout": "| a | table |\n", "stderr": "",
                "report": report}

    monkeypatch.setattr(check, "run_step", fake_step)
    monkeypatch.setattr(check, "environment", lambda: {"backend": "fake"})
    monkeypatch.setattr(check.time, "perf_counter", lambda: clock[0])
    with pytest.raises(SystemExit) as e:  # the (fake) check failed
        check.main([f"--out={tmp_path}", "--budget_s=350"])
    assert e.value.code == 1
    # check (est. 90 s) and two local steps ran; with 50 s left the rest were skipped.
    assert [name for name, _ in ran] == ["accelerator_check.py", "bench_attention.py",
                                         "bench_attention.py"]
    # each step's limit: three times its estimate, or what is left of the budget
    assert ran[0][1] == 3 * 90 and ran[2][1] == 150
    report = json.loads((tmp_path / "accelerator.json").read_text())
    assert report["checks_passed"] is False
    assert report["steps"]["train_small"]["status"].startswith("skipped (50 s of the budget")
    assert set(report["steps"]) == {name for name, _, _ in check.plan(False)}
    md = (tmp_path / "accelerator.md").read_text()
    assert "## local_float32_4x16: ok, 100.0 s\n\n| a | table |" in md
    assert "===== check:" in (tmp_path / "log.txt").read_text()
    with pytest.raises(SystemExit) as e:
        check.main([f"--out={tmp_path}", "--steps=check,bogus"])
    assert e.value.code == 2 and "unknown ['bogus']" in capsys.readouterr().err


def test_accelerator_check_kills_a_step_with_its_children_at_the_limit(tmp_path):
    """A step that outlives its limit is killed with the processes it started (as
    bench_train.py's children), which would otherwise keep the accelerator."""
    check = load_script("accelerator_check")
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n")
    result = check.run_step([str(script)], str(tmp_path / "out"), limit=3)
    assert result["status"] == "timed out after 3 s" and result["seconds"] < 30
    assert "started" in result["stdout"] and result["report"] is None
    child = int(pid_file.read_text())
    for _ in range(50):  # killed: gone, or a zombie until its parent is reaped
        try:
            state = pathlib.Path(f"/proc/{child}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {child} outlived the step")


@pytest.mark.slow
def test_accelerator_check_runs_every_step_without_tensorflow(tmp_path):
    """The prepared accelerator run, on CPU with tiny shapes (``--quick``), with
    TensorFlow and TFDS unimportable as on the accelerator machine."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nsys.modules['tensorflow'] = None\nsys.modules['tensorflow_datasets'] = None\n")
    env = dict(os.environ, PYTHONPATH=str(block))
    proc = subprocess.run([sys.executable, "experiments/accelerator_check.py", "--quick",
                           f"--out={tmp_path / 'out'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "accelerator.json").read_text())
    assert report["checks_passed"] is True
    assert {s["status"] for s in report["steps"].values()} == {"ok"}, report["steps"]
    rows = report["steps"]["train_resnet20"]["report"]["rows"]
    assert [r["model"] for r in rows] == ["resnet20", "resnet20_local_attention"]
    kernels = {r["implementation"] for r in report["steps"]["local_float32_4x16"]["report"][
        "rows"]}
    assert {"xla", "chunked"} <= kernels
    md = (tmp_path / "out" / "accelerator.md").read_text()
    assert "| local | 13x11, 7x7, bias | float32 | pallas_interpret |" in md
