"""Tests for attnflax.train and attnflax.metrics: steps, exact eval, training, bad input."""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from absl import flags
from tensorboard.backend.event_processing import event_accumulator
from train_testutil import (
    CONFIGS,
    REPO,
    jax_cache_dir,
    load_config,
    override,
    persistent_cache,
    tiny_config,
)

from attnflax import data, losses, main, metrics, models, parallel, pytree, train

CONFIG_FILES = ["digits", "digits_cnn", "mnist", "fashion_mnist", "cifar10",
                "cifar10_resnet20", "cifar100", "imagenette"]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    with persistent_cache(jax_cache_dir(tmp_path_factory)) as directory:
        yield directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real run on the embedded digits (shared by several tests), in bfloat16.

    (float32 training runs in every test of test_checkpoint.py.)
    """
    workdir = tmp_path_factory.mktemp("trained")
    config = tiny_config(num_train_steps=40, data__batch_size=32, log_every_steps=5,
                         eval_every_steps=20, checkpoint_every_steps=20, dtype="bfloat16")
    config.data.augment.crop_padding = 0
    config.model_kwargs.attention = "global"
    # The console under a fake clock on which every step takes 61 s (lines by time).
    ticks = itertools.count(0.0, 61.0)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setattr(metrics.Progress, "clock", staticmethod(lambda: next(ticks)))
        results = train.train_and_evaluate(config, workdir)
    (workdir / "console.log").write_text(out.getvalue())
    return workdir, config, results


# ----------------------------------------------------------------------------- configs


# Each config file's input (height, width, channels) and classes, and its model's class.
CONFIG_DATA = {"digits": ((8, 8, 1), 10), "digits_cnn": ((8, 8, 1), 10),
               "mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
               "cifar10": ((32, 32, 3), 10), "cifar10_resnet20": ((32, 32, 3), 10),
               "cifar100": ((32, 32, 3), 100), "imagenette": ((128, 128, 3), 10)}
MODEL_CLASSES = {"cnn": models.CNN, "attention_cnn": models.AttentionCNN,
                 "resnet": models.ResNet, "resnet18": models.ResNet, "resnet20": models.ResNet}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_are_valid(name):
    config = load_config(name)
    train.validate_config(config)
    assert config.model in models.list_models()
    image_shape, num_classes = CONFIG_DATA[name]
    model = train.create_model(config, num_classes=num_classes)
    # The registry's model with the config's attributes, mapping images to class logits.
    assert type(model) is MODEL_CLASSES[config.model]
    for key, value in config.model_kwargs.items():
        assert getattr(model, key) == (tuple(value) if isinstance(value, list) else value), key
    x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    logits, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
    assert (logits.shape, logits.dtype) == ((2, num_classes), jnp.float32)
    assert pytree.count_params(variables["params"]) > 0


def test_config_files_import_only_ml_collections():
    """Building a config needs neither TensorFlow, TFDS, JAX nor Orbax (a fresh process)."""
    code = textwrap.dedent(f"""
        import pathlib, sys
        from attnflax import cli
        for path in sorted(pathlib.Path({str(CONFIGS)!r}).glob("*.py")):
            cli.load_config_file(path)
        heavy = ("tensorflow", "tensorflow_datasets", "jax", "orbax", "flax")
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _docstring_commands(path):
    """The ``python -m attnflax.main ...`` commands of a config file's docstring, as
    argument lists (backslash-continued lines joined)."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    text = re.sub(r"\\\n\s*", " ", doc)
    return [shlex.split(line.split("python -m attnflax.main", 1)[1])
            for line in text.splitlines() if "python -m attnflax.main" in line]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_docstring_commands_run_this_config(name, monkeypatch):
    """What each config's docstring tells the user to run parses with main's flags, and
    the first command trains this very file's config."""
    commands = _docstring_commands(CONFIGS / f"{name}.py")
    assert commands, "no 'python -m attnflax.main' command in the docstring"
    monkeypatch.chdir(CONFIGS.parents[1])  # the commands run from the repository root
    for i, args in enumerate(commands):
        flag_values = flags.FlagValues()
        main.define_flags(flag_values)
        monkeypatch.setattr(sys, "argv", ["main", *args])  # ml_collections reads sys.argv
        main.parse_flags(["main", *args], flag_values)
        config = flag_values.config
        train.validate_config(config)
        train.create_model(config, num_classes=CONFIG_DATA[name][1])
        assert flag_values.workdir
        if i == 0:
            spec = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
            path, _, arg = spec.partition(":")
            assert path == f"experiments/configs/{name}.py"
            if not [a for a in args if a.startswith("--config.")]:
                assert config.to_dict() == load_config(name, arg or None).to_dict()


def test_config_docstrings_state_hardware_and_expected_result():
    """DESIGN.md's convention: each config says what it needs and what it should give."""
    for name in CONFIG_FILES:
        doc = ast.get_docstring(ast.parse((CONFIGS / f"{name}.py").read_text()))
        assert "Expected result" in doc and "Hardware:" in doc, name


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optimizer", "adam", "optimizer"),
        ("dtype", "float16", "dtype"),
        ("model", "vit", "known models"),
        ("label_smoothing", 1.0, "label_smoothing"),
        ("num_epochs", 0.0, "num_epochs"),
        ("learning_rate", -1.0, "learning_rate"),
    ],
)
def test_bad_config_values_are_named(key, value, message):
    config = override(tiny_config(num_train_steps=None), {key: value})
    with pytest.raises(train.ConfigError, match=message):
        train.validate_config(config)


def test_bad_model_arguments_are_a_config_error():
    config = tiny_config()
    config.model_kwargs.num_heads = 3  # does not divide the 16 channels
    with pytest.raises(train.ConfigError, match="num_heads"):
        train.create_model(config, num_classes=10)


def test_batch_must_split_into_micro_batches_over_devices():
    config = tiny_config(grad_accum_steps=3)
    with pytest.raises(data.DataError, match=r"batch_size=16 is not divisible by the "
                       r"config.grad_accum_steps=3 micro-batches x 4 devices.*multiple of 12"):
        train.check_batch_layout(config, num_devices=4)
    train.check_batch_layout(tiny_config(grad_accum_steps=4, data__batch_size=16), 4)


def test_batch_size_divisibility_message():
    """The trainer's check is the pipeline's (`data.check_batch_size`, one for both)."""
    mesh = parallel.create_mesh()
    data.check_batch_size("batch_size", 8, mesh.size, 1)
    with pytest.raises(data.DataError, match=r"batch_size=10 is not divisible by the 4 devices"
                       r".*multiple of 4 here \(e.g. 8 or 12; set --config.data.batch_size\)"):
        data.check_batch_size("batch_size", 10, mesh.size, 1)
    with pytest.raises(data.DataError, match="batch_size=2 is smaller than the 4 devices"):
        train.check_batch_layout(tiny_config(data__batch_size=2), mesh.size)


def test_durations_from_epochs_steps_or_examples():
    config = tiny_config(num_train_steps=None, num_epochs=2.0, warmup_epochs=0.5,
                         log_every_steps=None, eval_every_steps=None, eval_every_epochs=1.0,
                         checkpoint_every_steps=None, checkpoint_every_examples=1000,
                         data__batch_size=100)
    run = train.durations(config, 1437)
    assert (run.total_steps, run.warmup_steps) == (29, 7)  # ceil(28.74), round(7.185)
    assert (run.log_every, run.eval_every, run.checkpoint_every) == (50, 14, 10)
    # Steps win over examples and examples over epochs; the warm-up is capped at the run.
    def total(values):
        return train.durations(override(config.copy_and_resolve_references(), values), 1437)

    assert total({"num_train_examples": 950}).total_steps == 10
    # A positive interval is at least one step (10 examples at batch 100 is not "never").
    assert total({"eval_every_examples": 10, "checkpoint_every_epochs": 0.001}).eval_every == 1
    assert total({"checkpoint_every_epochs": 0.001}).checkpoint_every == 1
    # Set in one unit (an override: --config.x=y), a duration forgets its other units.
    shorter = override(config.copy_and_resolve_references(),
                       {"num_train_examples": 900, "num_train_steps": 5})
    assert (shorter.num_train_steps, shorter.num_train_examples, shorter.num_epochs) == (
        5, None, None)
    # Several units held at once (assigned in a config file): steps, then examples, then
    # epochs; the warm-up is capped at the run.
    shorter.num_train_examples, shorter.num_epochs = 900, 3.0
    run = train.durations(shorter, 1437)
    assert (run.total_steps, run.warmup_steps) == (5, 5)


def test_a_duration_overridden_in_another_unit_replaces_the_configs(monkeypatch):
    """mnist5k.py counts steps; --config.num_epochs=1 must train one epoch, not 200 steps."""
    from attnflax import cli

    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    argv = ["main", f"--config={CONFIGS / 'mnist5k.py'}", "--workdir=/tmp/x",
            "--config.num_epochs=1", "--config.eval_every_epochs=0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    cli.parse_into(flag_values, argv, doc="", prog="main")
    config = flag_values.config
    assert (config.num_train_steps, config.num_epochs) == (None, 1.0)
    assert (config.eval_every_steps, config.eval_every_epochs) == (None, 0.5)
    run = train.durations(config, 4000)
    assert (run.total_steps, run.eval_every) == (63, 31)  # ceil(4000 / 64), round(31.25)


def test_what_is_due_when():
    run = train.Durations(total_steps=10, warmup_steps=0, log_every=4, eval_every=0,
                          checkpoint_every=5)
    due = {step: tuple(run.due(step)) for step in range(1, 11)}
    assert [s for s, d in due.items() if d[0]] == [4, 8, 10]
    assert [s for s, d in due.items() if d[1]] == [10]  # eval_every=0: only at the end
    assert [s for s, d in due.items() if d[2]] == [5, 10]
    assert not run.due(3) and run.due(3, stopped=True) == (True, False, True)
    assert run.describe() == "eval at the end, checkpoint every 5, log every 4 steps"


@pytest.mark.parametrize("values, message", [
    ({"num_train_steps": None, "num_epochs": None}, "set the training length"),
    ({"num_train_steps": 0}, "num_train_steps=0: the training length must be > 0"),
    ({"log_every_steps": 0}, "log_every_steps=0: must be > 0"),
    ({"eval_every_epochs": -1.0}, "eval_every_epochs=-1.0: must be >= 0"),
])
def test_bad_durations_are_named(values, message):
    with pytest.raises(train.ConfigError, match=re.escape(message)):
        train.validate_config(tiny_config(**values))


def test_train_step_loss_is_the_mean_over_real_examples():
    """Masked-out (padding) examples count in neither the loss nor the accuracy (the
    trainer's step, which the pruning fine-tune runs too)."""
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(x.reshape(len(x), -1))

    mesh = parallel.create_mesh(1)
    tx = optax.sgd(0.1)
    state, _ = train.create_train_state(Model(), tx, (2, 2, 1), 0, mesh)
    x = np.random.default_rng(0).normal(size=(4, 2, 2, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 0], np.int32)
    mask = np.array([True, False, True, False])
    logits = Model().apply(state.variables(), x)
    _, metrics = train.train_step(state, {"image": x, "label": labels, "mask": mask},
                                  model=Model(), tx=tx, schedule=lambda _: 0.1,
                                  label_smoothing=0.0, grad_accum_steps=1, mesh=mesh)
    want = losses.cross_entropy(logits, labels)[mask].mean()
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
    assert metrics["accuracy"] == (np.argmax(logits, -1) == labels)[mask].mean()


# ----------------------------------------------------------------------------- optimiser


def test_weight_decay_only_on_kernels():
    model = train.create_model(tiny_config(), num_classes=10)
    params = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                               jnp.zeros((1, 8, 8, 1)))["params"])
    mask = train.weight_decay_mask(params)
    flat = {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {name for name, on in flat.items() if on}
    assert decayed and all(name.endswith("kernel") for name in decayed)
    skipped = set(flat) - decayed
    assert any(name.endswith("log_scale") for name in skipped)
    assert any(name.endswith("position_bias") for name in skipped)
    assert any(name.endswith("bias") for name in skipped)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizers_decay_only_kernels(optimizer):
    params = {
        "conv0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
        "attention": {"log_scale": jnp.ones(2), "position_bias": jnp.ones((2, 3, 3))},
        "norm": {"scale": jnp.ones(2)},
    }
    config = tiny_config(optimizer=optimizer, weight_decay=0.5, learning_rate=0.1,
                         grad_clip_norm=1.0)
    tx, _ = train.create_optimizer(config, total_steps=10, warmup_steps=0)
    zeros = jax.tree.map(jnp.zeros_like, params)  # only weight decay can move anything
    updates = jax.jit(lambda p: tx.update(zeros, tx.init(p), p)[0])(params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        assert bool(jnp.any(u != 0)) == (path[-1].key == "kernel"), path


# ----------------------------------------------------------------------------- steps


def _one_step(config, mesh=None):
    """Builds everything for `config` and runs one train step and one eval batch.

    One device by default: these tests are about the models and data, and a 1-device
    program compiles faster (the multi-device layout has its own tests).
    """
    mesh = mesh or parallel.create_mesh(1)
    info = data.get_dataset_info(config.data)
    model = train.create_model(config, info.num_classes)
    tx, schedule = train.create_optimizer(config, total_steps=10, warmup_steps=0)
    state, shardings = train.create_train_state(model, tx, info.image_shape, config.seed, mesh)
    step = jax.jit(
        lambda s, b: train.train_step(
            s, b, model=model, tx=tx, schedule=schedule,
            label_smoothing=config.label_smoothing,
            grad_accum_steps=config.grad_accum_steps, mesh=mesh),
        donate_argnums=0)
    batch = next(data.create_train_iterator(config.data, num_devices=mesh.size))
    state, m = step(state, parallel.host_to_global(batch, mesh))
    eval_fn = train.make_eval_step(model, mesh)
    first = next(iter(data.create_eval_iterator(config.data, num_devices=mesh.size)))
    sums = jax.device_get(eval_fn(state.variables(), parallel.host_to_global(first, mesh)))
    return state, jax.device_get(m), sums, info


def _shrink(config, **kwargs):
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    for key, value in kwargs.items():
        config.model_kwargs[key] = value
    return config


# The model families: the CNN runs in test_gradient_accumulation_equals_full_batch and the
# attention CNN (local 3x3; global in bfloat16 in the `trained` run) on the embedded
# digits; here the attention CNN on MNIST and the ResNet-20 with attention on CIFAR-10.
@pytest.mark.parametrize(
    "name, shrink",
    [
        ("mnist", {"features": (4, 8), "hidden": 8, "num_heads": 2}),
        ("cifar10", {"widths": (8, 8, 8)}),
    ],
)
def test_one_step_under_mock_data(name, shrink):
    # The data config is the shipped one (download=False): mock_data serves the data.
    config = _shrink(load_config(name), **shrink)
    assert not config.data.download
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        state, m, sums, info = _one_step(config)
    assert info.num_classes == 10
    assert int(state.step) == 1
    assert np.isfinite(m["loss"]) and m["loss"] > 0 and np.isfinite(m["grad_norm"])
    # The first eval batch: 8 real examples, each right or wrong, with a finite loss.
    assert int(sums["count"]) == 8 and 0 <= int(sums["correct"]) <= 8
    assert np.isfinite(sums["loss_sum"]) and sums["loss_sum"] > 0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    if config.model == "resnet":  # BatchNorm statistics were updated
        assert jax.tree.leaves(state.batch_stats)


def test_gradient_accumulation_equals_full_batch():
    mesh = parallel.create_mesh()  # 4 devices: each micro-batch stays spread over all of them
    results = []
    for accum in (1, 4):
        # Plain SGD, so that the parameter change is the gradient itself.
        config = tiny_config(model="cnn", data__batch_size=32, grad_accum_steps=accum,
                             grad_clip_norm=0.0, optimizer="sgd", momentum=0.0,
                             weight_decay=0.0, learning_rate=1.0)
        config.model_kwargs = ml_collections.ConfigDict({"features": (4, 8), "hidden": 8})
        state, m, _, _ = _one_step(config, mesh)
        results.append((jax.device_get(state.params), m))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
    assert m1["accuracy"] == m4["accuracy"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- exact eval


class FixedLogits(nn.Module):
    """Ignores its input: the same logits for every example (argmax = class 7)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        logits = jnp.asarray([0.1, 0.5, -1.0, 0.2, 0.0, 0.3, -0.2, 2.0, 1.0, 0.4])
        return jnp.broadcast_to(logits, (x.shape[0], 10))


def test_exact_eval_over_361_examples_at_batch_32():
    config = data.default_config()
    config.eval_split = "train[:361]"
    config.eval_batch_size = 32  # 361 = 11 * 32 + 9: a padded last batch
    mesh = parallel.create_mesh()  # 4 devices (conftest)
    batches = data.create_eval_iterator(config, num_devices=mesh.size)
    eval_fn = train.make_eval_step(FixedLogits(), mesh)
    result = train.evaluate(eval_fn, {"params": {}}, batches, mesh)

    labels = np.asarray([int(ex["label"]) for ex in tfds.as_numpy(
        tfds.load("attnflax_digits", split="train[:361]"))])
    assert len(labels) == 361
    logits = np.asarray([0.1, 0.5, -1.0, 0.2, 0.0, 0.3, -0.2, 2.0, 1.0, 0.4], np.float64)
    log_z = np.log(np.exp(logits).sum())
    assert result["examples"] == 361
    assert result["correct"] == int((labels == 7).sum())
    assert result["accuracy"] == (labels == 7).sum() / 361
    np.testing.assert_allclose(result["loss"], np.mean(log_z - logits[labels]), rtol=1e-6)


def test_eval_sums_are_global_not_mean_of_means():
    sums = metrics.EvalSums()
    sums.add({"correct": 32, "loss_sum": 3.2, "count": 32})
    sums.add({"correct": 0, "loss_sum": 9.0, "count": 1})
    assert sums.result()["accuracy"] == 32 / 33
    assert sums.result()["loss"] == pytest.approx(12.2 / 33)


# ----------------------------------------------------------------------------- training


def test_training_reduces_loss_and_beats_chance(trained):
    workdir, _, results = trained
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0]  # (label smoothing 0.1 keeps the loss above 0.5)
    assert results["test_accuracy"] > 0.5  # chance is 0.1
    assert results["test_examples"] == 360
    on_disk = json.loads(open(os.path.join(workdir, "results.json")).read())
    for key in ("test_accuracy", "test_loss", "test_examples", "train_steps",
                "train_images_per_second", "compile_seconds", "wall_seconds", "params",
                "config"):
        assert key in on_disk, key
    assert on_disk["train_steps"] == 40 and on_disk["params"] > 0
    assert on_disk["config"]["model"] == "attention_cnn"
    assert on_disk["config"]["dtype"] == "bfloat16"
    saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "40", "state"))
    assert {x.dtype for x in jax.tree.leaves(saved["params"])} == {np.dtype("float32")}


def test_tensorboard_events_are_readable(trained):
    workdir, _, results = trained
    acc = event_accumulator.EventAccumulator(os.fspath(workdir))
    acc.Reload()
    tags = acc.Tags()["tensors"]
    for tag in ("train/loss", "train/accuracy", "train/learning_rate",
                "train/images_per_second", "eval/accuracy", "eval/loss"):
        assert tag in tags, tag
    evals = acc.Tensors("eval/accuracy")
    assert [e.step for e in evals] == [20, 40]
    final = float(tf_make_ndarray(evals[-1].tensor_proto))
    assert final == pytest.approx(results["test_accuracy"])


def tf_make_ndarray(proto):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    create = data.create_train_iterator

    def poisoned(*args, start_step=0, **kwargs):
        for step, batch in enumerate(create(*args, start_step=start_step, **kwargs),
                                     start=start_step + 1):
            if step == 3:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(data, "create_train_iterator", poisoned)
    config = tiny_config(checkpoint_every_steps=2, log_every_steps=100)
    with pytest.raises(train.NonFiniteLossError, match="at step 3") as err:
        train.train_and_evaluate(config, tmp_path)
    assert err.value.step == 3
    assert "last good checkpoint (step 2)" in str(err.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert not (tmp_path / "results.json").exists()


def test_non_writable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(train.WorkdirError, match="Cannot write to workdir"):
        train.train_and_evaluate(tiny_config(), blocker / "run")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(train.WorkdirError, match="Cannot write"):
            train.prepare_workdir(locked)


# ----------------------------------------------------------------------------- console


def test_progress_line_has_loss_accuracy_lr_speed_and_eta():
    progress = metrics.Progress(100, enabled=False)
    scalars = {"loss": 0.5, "accuracy": 0.9, "learning_rate": 1e-3, "images_per_second": 1234}
    progress.line(10, scalars, now=0.0)
    line = progress.line(20, scalars, now=10.0)
    assert "20/100" in line and "loss 0.5000" in line and "acc  90.0%" in line
    assert "lr 1.00e-03" in line and "1,234 img/s" in line
    assert "ETA 1m20s" in line  # 80 steps left at 1 step/s


class _FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _simulate(progress, clock, total, seconds_per_step, log_every):
    """The train loop's calls to `progress`: after dispatching step k it waits for step
    k - 1's metrics (done at (k - 1) x the step time); at a log step, for step k's."""
    progress.start(0)
    for step in range(1, total + 1):
        clock.t = (step - 1) * seconds_per_step
        if step % log_every == 0 or step == total:
            clock.t = step * seconds_per_step
            progress.update(step, {"loss": 1.0})
        elif step > 1:
            progress.maybe_update(step - 1, lambda: {"loss": 1.0})


def test_progress_by_time_with_a_long_log_interval():
    """43 steps of 6 s with log_every_steps=100: a line after the first step, with an
    ETA, and then at least every 10 s, not one line after 4 minutes with 'ETA ?'."""
    clock, out = _FakeClock(), io.StringIO()
    progress = metrics.Progress(43, stream=out, every_seconds=10, clock=clock)
    times = []
    progress.update = functools.wraps(progress.update)(
        lambda step, scalars, now=None, _u=progress.update: (times.append(clock.t),
                                                              _u(step, scalars, now)))
    _simulate(progress, clock, total=43, seconds_per_step=6.0, log_every=100)
    lines = out.getvalue().splitlines()
    assert lines[0].split(" | ")[0].endswith(" 1/43   2%")
    assert times[0] == 6.0  # as soon as step 1 is done
    assert "ETA 4m12s" in lines[0]  # 42 steps of 6 s left
    assert all("ETA ?" not in line for line in lines)
    assert max(b - a for a, b in itertools.pairwise([0.0, *times])) <= 12.0
    assert "43/43" in lines[-1] and "ETA 0s" in lines[-1]
    # The rate is measured from the first completed step once possible: 6 s/step.
    progress = metrics.Progress(10, stream=io.StringIO(), clock=clock)
    progress.start(0, now=0.0)
    assert progress.eta(1, now=20.0) == 9 * 20.0  # a slow first step: all we know
    assert progress.eta(3, now=32.0) == 7 * 6.0


def test_progress_interval_is_10_s_on_a_terminal_and_60_s_in_a_file():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert metrics.Progress(5, stream=Terminal()).every_seconds == 10.0
    assert metrics.Progress(5, stream=io.StringIO()).every_seconds == 60.0


def test_training_prints_progress_by_time_between_log_steps(trained):
    workdir, config, _ = trained
    lines = [ln for ln in (workdir / "console.log").read_text().splitlines()
             if ln.startswith("[")]
    steps = [int(ln.split("/")[0].split()[-1]) for ln in lines]
    assert steps[0] == 1 and "ETA ?" not in lines[0]
    assert [s for s in steps if s % config.log_every_steps]  # lines between log steps
    assert steps[-1] == config.num_train_steps
