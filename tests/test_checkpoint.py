"""Tests for attnflax.checkpoint and resuming: SIGTERM, device counts, plain Orbax, refusals.

The runs use the tiny digits config of `train_testutil.TINY` (6 steps). The reference is
one uninterrupted 6-step run on the 4 CPU devices of the test session; the other runs
stop at step 3 (a real SIGTERM, in a child process or in this one) and resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_testutil import (
    TINY,
    cli_flags,
    jax_cache_dir,
    load_script,
    persistent_cache,
    read_results,
    run_main,
    sigterm_iterator,
    tiny_config,
)

from attnflax import checkpoint, data, parallel, restore, signals, train

DIGITS = "--config=experiments/configs/digits.py"


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    with persistent_cache(jax_cache_dir(tmp_path_factory)) as directory:
        yield directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 6-step run (4 devices)."""
    workdir = tmp_path_factory.mktemp("reference")
    results = train.train_and_evaluate(tiny_config(), workdir)
    return workdir, results


def plain_restore(workdir, step: int = 6):
    """The saved train state, read with nothing but Orbax."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def assert_trees_equal(a, b, exact: bool = True):
    """Equal leaves, in the same order (the tree types may differ: Orbax's plain restore
    gives dicts and lists where the train state has dataclasses and named tuples)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if exact:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_checkpoint_restores_with_plain_orbax(reference):
    workdir, results = reference
    state = plain_restore(workdir)
    assert set(state) == {"step", "params", "batch_stats", "opt_state", "rng"}
    assert int(state["step"]) == 6
    assert state["rng"].dtype == np.uint32
    n = sum(np.asarray(x).size for x in jax.tree.leaves(state["params"]))
    assert n == results["params"]
    meta = json.loads(open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata")).read())
    assert meta["model"] == "attention_cnn" and meta["step"] == 6
    assert meta["param_shapes"] == checkpoint.param_shapes(state["params"])


def test_sigterm_then_resume_is_bitwise_identical(reference, tmp_path, cache_dir):
    ref_dir, ref_results = reference
    proc = run_main([DIGITS, f"--workdir={tmp_path}", *cli_flags(TINY)], num_devices=4,
                    sigterm_at=3, cache_dir=cache_dir)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "Stopped by SIGTERM at step 3" in proc.stdout
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert not (tmp_path / "results.json").exists()

    results = train.train_and_evaluate(tiny_config(), tmp_path)
    assert results["resumed_from_step"] == 3 and results["train_steps"] == 6
    # Same params, optimiser state, batch stats, key and step, bit for bit.
    assert_trees_equal(plain_restore(tmp_path), plain_restore(ref_dir))
    assert results["test_accuracy"] == ref_results["test_accuracy"]
    assert results["test_loss"] == ref_results["test_loss"]


def test_periodic_async_saves_resume_exactly(reference, tmp_path):
    ref_dir, _ = reference
    config = tiny_config(checkpoint_every_steps=2, keep_checkpoints=10)
    train.train_and_evaluate(config, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["2", "4", "6"]
    assert_trees_equal(plain_restore(tmp_path), plain_restore(ref_dir))
    # Step 2 was written in the background while the next steps reused (donated) the
    # state's buffers; resuming from it must still give the reference run.
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    results = train.train_and_evaluate(config, tmp_path)
    assert results["resumed_from_step"] == 2
    assert_trees_equal(plain_restore(tmp_path), plain_restore(ref_dir))


def test_save_on_one_device_restore_and_continue_on_four(reference, tmp_path, cache_dir):
    ref_dir, _ = reference
    proc = run_main([DIGITS, f"--workdir={tmp_path}", *cli_flags(TINY)], num_devices=1,
                    sigterm_at=3, cache_dir=cache_dir)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]

    # Every array lands in the 4-device layout, with the values saved from 1 device.
    mesh = parallel.create_mesh()
    assert mesh.size == 4
    config = tiny_config()
    info = data.get_dataset_info(config.data)
    model = train.create_model(config, info.num_classes)
    tx, _ = train.create_optimizer(config, 6, 0)
    state, shardings = train.create_train_state(model, tx, info.image_shape, 0, mesh)
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(tmp_path), read_only=True)
    target = checkpoint.abstract_target(jax.eval_shape(lambda: state), shardings)
    restored = checkpoint.restore_state(manager, 3, target)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings),
                              strict=True):
        assert leaf.sharding == sharding and len(leaf.sharding.device_set) == 4
    saved = plain_restore(tmp_path, 3)
    for field in ("step", "params", "batch_stats", "opt_state", "rng"):
        assert_trees_equal(jax.device_get(getattr(restored, field)), saved[field])

    results = train.train_and_evaluate(config, tmp_path)
    assert results["resumed_from_step"] == 3 and results["train_steps"] == 6
    assert results["devices"] == 4
    # The same run up to float rounding (1-device and 4-device sums differ in order).
    assert_trees_equal(plain_restore(tmp_path)["params"], plain_restore(ref_dir)["params"],
                       exact=False)


def test_save_on_four_devices_continue_on_one(reference, tmp_path, monkeypatch, cache_dir):
    ref_dir, _ = reference
    monkeypatch.setattr(data, "create_train_iterator",
                        sigterm_iterator(data.create_train_iterator, stop_at=3))
    stopped = train.train_and_evaluate(tiny_config(), tmp_path)
    assert stopped == {"interrupted": True, "signal": "SIGTERM", "train_steps": 3,
                       "checkpoint_dir": os.fspath(tmp_path / "checkpoints")}
    monkeypatch.undo()

    # This child process is also the test of the command line's normal path.
    proc = run_main([DIGITS, f"--workdir={tmp_path}", *cli_flags(TINY)], num_devices=1,
                    cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from checkpoint step 3" in proc.stdout
    assert f"results in {tmp_path / 'results.json'}" in proc.stdout
    assert "Traceback" not in proc.stderr
    results = read_results(tmp_path)
    assert results["resumed_from_step"] == 3 and results["devices"] == 1
    assert_trees_equal(plain_restore(tmp_path)["params"], plain_restore(ref_dir)["params"],
                       exact=False)


def _snapshot(directory):
    return {
        os.path.relpath(os.path.join(root, name), directory):
            os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(directory) for name in names
    }


def test_workdir_of_another_model_is_refused_untouched(reference):
    workdir, _ = reference
    before = _snapshot(workdir)
    config = tiny_config(model="cnn")
    config.model_kwargs = ml_collections.ConfigDict({"features": (16, 16), "hidden": 32})
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        train.train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "model: checkpoint has 'attention_cnn', config asks for 'cnn'" in message
    assert "model_kwargs" in message and "Nothing was changed" in message
    assert _snapshot(workdir) == before


def test_mismatch_names_parameter_shapes():
    saved = {"model": "cnn", "param_shapes": {"conv0/kernel": [3, 3, 1, 32], "head/bias": [10]}}
    current = {"model": "cnn", "param_shapes": {"conv0/kernel": [3, 3, 1, 64],
                                                "head/bias": [10], "extra/kernel": [2]}}
    lines = checkpoint.describe_mismatch(saved, current)
    assert lines == [
        "parameter conv0/kernel: checkpoint (3, 3, 1, 32), config (3, 3, 1, 64)",
        "parameter extra/kernel: checkpoint missing, config (2,)",
    ]
    checkpoint.check_compatible(saved, saved, "here")  # no error


def test_half_written_checkpoint_is_never_picked_up(reference, tmp_path):
    workdir, _ = reference
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(workdir / "checkpoints", ckpt)
    # What a save killed mid-way leaves: Orbax's temporary directory, never renamed.
    partial = ckpt / "9.orbax-checkpoint-tmp"
    shutil.copytree(ckpt / "6", partial)
    os.remove(partial / "commit_success.txt")
    manager = checkpoint.create_manager(ckpt, async_save=False)
    assert manager.latest_step() == 6 and 9 not in manager.all_steps()
    # The resumed run reaches step 9 again and saves it: the leftover is cleared first.
    assert checkpoint.save(manager, 9, plain_restore(workdir), {"step": 9})
    assert manager.latest_step() == 9
    assert not partial.exists() and (ckpt / "9" / "commit_success.txt").exists()
    manager.close()


def test_every_script_restores_the_same_step(tmp_path):
    """`restore.select_step`, the rule of `load_trained` and every script: the latest by
    default; ``best``: results.json's best_step (the trainer's ranking, which includes the
    final, unranked checkpoint), else the best ranked checkpoint, else the latest."""
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(tmp_path), keep=5,
                                        keep_best=1, async_save=False)
    for step, acc in [(1, 0.5), (2, 0.9), (3, None)]:
        checkpoint.save(manager, step, {"w": np.ones(3, np.float32)}, {"step": step},
                        None if acc is None else {"accuracy": acc})
    manager.close()
    workdir = os.fspath(tmp_path)
    assert restore.select_step(workdir) == 3
    assert restore.select_step(workdir, best=True) == 2
    (tmp_path / "results.json").write_text(json.dumps({"best_step": 3}))
    assert restore.select_step(workdir, best=True) == 3
    assert restore.select_step(workdir, step=1) == 1
    with pytest.raises(ValueError, match="not both"):
        restore.select_step(workdir, step=1, best=True)
    with pytest.raises(restore.CheckpointNotFoundError,
                       match=r"No checkpoint for step 7.*saved steps: \[1, 2, 3\]"):
        restore.select_step(workdir, step=7)


def test_keeps_the_last_k_plus_the_best(tmp_path):
    manager = checkpoint.create_manager(tmp_path, keep=2, keep_best=1, async_save=False)
    state = {"w": np.ones(3, np.float32)}
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.3), (4, None), (5, 0.4)]:
        metrics = None if acc is None else {"accuracy": acc}
        assert checkpoint.save(manager, step, state, {"step": step}, metrics)
    assert not checkpoint.save(manager, 5, state, {"step": 5})  # already there: no-op
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4, 5]
    assert manager.best_step() == 2
    manager.close()


def test_second_signal_aborts():
    with signals.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_evaluate_script_restores_and_reports(reference):
    workdir, results = reference
    evaluate = load_script("evaluate")
    summary = evaluate.evaluate_workdir(os.fspath(workdir), num_images=16)
    assert summary["step"] == 6 and summary["split"] == "test"  # the latest = the only step
    assert summary["examples"] == 360 and summary["correct"] == results["test_correct"]
    assert summary["accuracy"] == results["test_accuracy"]
    assert summary["loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    cm = np.asarray(summary["confusion_matrix"])
    assert cm.sum() == 360 and np.trace(cm) == results["test_correct"]
    assert set(summary["per_class_accuracy"]) == {str(i) for i in range(10)}
    for key in ("confusion_matrix", "predictions", "json"):
        path = summary["outputs"][key]
        assert os.path.getsize(path) > 0 and path.startswith(os.fspath(workdir / "eval"))
    with pytest.raises(FileNotFoundError, match="No checkpoint for step 5"):
        evaluate.evaluate_workdir(os.fspath(workdir), step=5)
