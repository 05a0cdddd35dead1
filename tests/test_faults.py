"""Fault injection: damaged checkpoints, kills, full disks, two writers, NaN, bad inputs.

What each fault must give:

* a latest checkpoint that is damaged or incomplete in any way -> one warning line,
  resume from the newest intact step (moved aside, never deleted or rewritten); none
  intact -> one clear error, workdir untouched; never restore data failing its checksum;
* SIGKILL at any moment -> the restarted run ends bitwise equal to the uninterrupted one;
* a full disk, a second run on the same workdir, bad configs, hostile images, a corrupt
  eval image -> one line (and a non-zero exit), nothing lost;
* NaN -> no non-finite state is ever saved.

The fast cases run in ``make test``; the ones that start many processes (SIGKILL over
several seeds, tiny tmpfs disks, concurrent runs, every corruption through the command
line) carry the ``slow`` marker and run in ``make test-slow``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from train_testutil import (
    REPO,
    TINY,
    cli_flags,
    jax_cache_dir,
    persistent_cache,
    read_results,
    run_main,
    subprocess_env,
    tiny_config,
)

from attnflax import checkpoint, data, main, parallel, train
from attnflax.data import image_files

DIGITS = "--config=experiments/configs/digits.py"
# Steps 3 and 6 saved (both kept); the corruptions damage step 6.
SAVES = {"checkpoint_every_steps": 3, "keep_checkpoints": 3}


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    with persistent_cache(jax_cache_dir(tmp_path_factory)) as directory:
        yield directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One 6-step run with checkpoints at steps 3 and 6 (4 devices)."""
    workdir = tmp_path_factory.mktemp("saved")
    results = train.train_and_evaluate(tiny_config(**SAVES), workdir)
    return workdir, results


def plain_state(workdir, step):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state"))


def leaves_equal(a, b) -> bool:
    """Bitwise equal leaves; a `TrainState` is compared field by field with Orbax's
    plain restore (a dict, whose leaves come in sorted-key order)."""
    if isinstance(a, train.TrainState):
        return all(leaves_equal(getattr(a, k), b[k]) for k in sorted(b))
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def own_lines(text: str) -> list[str]:
    """`text` without the lines TensorFlow's C++ logging prints when it starts."""
    return [ln for ln in text.strip().splitlines()
            if not ln.startswith(("WARNING: All log messages before absl", "I0000 ", "W0000 "))]


def snapshot(directory):
    """Every file under `directory` with its size, mtime and content hash."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = (os.path.getsize(path),
                                                         os.stat(path).st_mtime_ns,
                                                         zlib.crc32(f.read()))
    return out


# ----------------------------------------------------------------------------- corruptions


def _data_files(step_dir):
    d = step_dir / "state" / "ocdbt.process_0" / "d"
    return sorted(d.iterdir(), key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir):
    f = _data_files(step_dir)[-1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_array_file(step_dir):
    f = _data_files(step_dir)[-1]
    f.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(f.stat().st_size)))


def _flip_one_byte(step_dir):
    f = _data_files(step_dir)[-1]
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))


def _remove(rel):
    def corrupt(step_dir):
        path = step_dir / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return corrupt


def _garble(rel):
    def corrupt(step_dir):
        path = step_dir / rel
        path.write_bytes(b"{garbled" + path.read_bytes()[8:-8])
    return corrupt


def _zero_all_state_files(step_dir):
    for root, _, names in os.walk(step_dir / "state"):
        for name in names:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write(b"\0" * size)


def _remove_commit_markers(step_dir):
    for root, _, names in os.walk(step_dir):
        if "commit_success.txt" in names:
            os.remove(os.path.join(root, "commit_success.txt"))


def _edit_meta(step_dir):
    """Valid JSON, different content (e.g. a hand edit): fails the meta checksum."""
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["learning_rate_note"] = "edited"
    path.write_text(json.dumps(meta))


CORRUPTIONS = {
    "array file truncated": _truncate_array_file,
    "array file garbled": _garble_array_file,
    "one byte flipped in array data": _flip_one_byte,
    "state METADATA removed": _remove("state/_METADATA"),
    "state METADATA garbled": _garble("state/_METADATA"),
    "meta removed": _remove("meta"),
    "meta garbled": _garble("meta/metadata"),
    "meta edited": _edit_meta,
    "manifest removed": _remove("state/manifest.ocdbt"),
    "state dir removed": _remove("state"),
    "all state files zeroed": _zero_all_state_files,
    "commit markers removed": _remove_commit_markers,
    "integrity record removed": _remove("integrity"),
    "integrity record garbled": _garble("integrity/metadata"),
}


def _target(config, mesh=None):
    mesh = mesh or parallel.create_mesh()
    info = data.get_dataset_info(config.data)
    model = train.create_model(config, info.num_classes)
    tx, _ = train.create_optimizer(config, 6, 0)
    state, shardings = train.create_train_state(model, tx, info.image_shape, 0, mesh)
    meta = train.checkpoint_meta(config, info, state.params)
    return checkpoint.abstract_target(jax.eval_shape(lambda: state), shardings), meta


@pytest.fixture(scope="module")
def target(saved):
    return _target(tiny_config(**SAVES))


@pytest.mark.parametrize("mode", list(CORRUPTIONS))
def test_damaged_latest_step_is_skipped_for_the_newest_intact(mode, saved, target, tmp_path):
    workdir, _ = saved
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    CORRUPTIONS[mode](tmp_path / "checkpoints" / "6")
    damaged = snapshot(tmp_path / "checkpoints" / "6")
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(tmp_path), async_save=False)
    warnings = []
    step, state, meta = checkpoint.restore_newest_intact(
        manager, target[0], target[1], "here", warn=warnings.append)
    manager.close()
    assert step == 3 and meta["step"] == 3
    assert leaves_equal(jax.device_get(state), plain_state(workdir, 3))
    assert len(warnings) == 1 and "checkpoint step 6" in warnings[0]
    assert "\n" not in warnings[0] and "resuming from step 3" in warnings[0]
    # Moved aside unchanged (for inspection), out of the rotation.
    assert snapshot(tmp_path / "checkpoints_damaged" / "6") == damaged
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def test_no_intact_step_is_one_error_and_changes_nothing(saved, target, tmp_path):
    workdir, _ = saved
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    _flip_one_byte(tmp_path / "checkpoints" / "6")
    _remove("state/_METADATA")(tmp_path / "checkpoints" / "3")
    before = snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointDamagedError) as err:
        train.train_and_evaluate(tiny_config(**SAVES), tmp_path)
    message = str(err.value)
    assert "No intact checkpoint" in message and "Nothing was changed" in message
    assert "step 6 (array" in message and "step 3 (state/_METADATA is missing)" in message
    assert "\n" not in message
    assert snapshot(tmp_path) == before


def test_unreadable_for_outside_reasons_is_an_error_not_damage(saved, target, tmp_path,
                                                               monkeypatch):
    """An I/O or permission error says nothing about the files: one-line error, no step
    skipped or moved."""
    workdir, _ = saved
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    before = snapshot(tmp_path)
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(tmp_path), async_save=False)

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(manager, "restore", unreadable)
    with pytest.raises(checkpoint.CheckpointIOError, match="Restoring checkpoint step 6") as err:
        checkpoint.restore_newest_intact(manager, target[0], target[1], "here")
    assert "Input/output error" in str(err.value) and "\n" not in str(err.value)
    manager.close()
    assert snapshot(tmp_path) == before


def test_a_flipped_byte_is_never_restored(saved, target, tmp_path):
    """Whichever bit of the array data flips, the restore gives the saved values or
    refuses: never silently different ones."""
    workdir, _ = saved
    expected = plain_state(workdir, 6)
    largest = _data_files(workdir / "checkpoints" / "6")[-1].name  # the arrays' chunks
    refused = 0
    rng = random.Random(14)
    for trial in range(6):
        copy = tmp_path / str(trial) / "checkpoints"
        shutil.copytree(workdir / "checkpoints", copy)
        f = copy / "6" / "state" / "ocdbt.process_0" / "d" / largest
        b = bytearray(f.read_bytes())
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(b))
        manager = checkpoint.create_manager(copy, read_only=True)
        try:
            state = checkpoint.restore_state(manager, 6, target[0])
            assert leaves_equal(jax.device_get(state), expected)
        except checkpoint.CheckpointDamagedError as e:
            assert e.step == 6
            refused += 1
        finally:
            manager.close()
    assert refused >= 4


def test_resume_after_damage_ends_bitwise_equal(saved, tmp_path):
    workdir, results = saved
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    _flip_one_byte(tmp_path / "checkpoints" / "6")
    resumed = train.train_and_evaluate(tiny_config(**SAVES), tmp_path)
    assert resumed["resumed_from_step"] == 3
    assert resumed["params_sha256"] == results["params_sha256"]
    assert resumed["test_accuracy"] == results["test_accuracy"]
    assert leaves_equal(plain_state(tmp_path, 6), plain_state(workdir, 6))


def test_checkpoints_are_plain_orbax_with_checksums(saved):
    workdir, _ = saved
    step_dir = workdir / "checkpoints" / "6"
    record = json.loads((step_dir / "integrity" / "metadata").read_text())
    state = plain_state(workdir, 6)  # Orbax alone reads the state, as before.
    # Plain Orbax gives dicts (leaves in sorted-key order): compare as sets of arrays.
    plain = sorted((str(np.asarray(x).dtype), list(np.shape(x)), checkpoint._sha256(np.asarray(x)))
                   for x in jax.tree.leaves(state))
    assert plain == sorted((dtype, shape, digest) for _, dtype, shape, digest in record["arrays"])
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    assert checkpoint.meta_checksum(meta) == record["meta_sha256"]
    # Every commit marker verify_files relies on is written by this Orbax.
    checkpoint.verify_files(workdir / "checkpoints", 6)


# ----------------------------------------------------------------------------- lock


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with checkpoint.WorkdirLock(tmp_path):
        with pytest.raises(checkpoint.WorkdirLockedError) as err:
            train.train_and_evaluate(tiny_config(), tmp_path)
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and "in use by another run" in message
        assert "\n" not in message
        assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / checkpoint.LOCK_FILE).exists()  # released: file removed


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / checkpoint.LOCK_FILE).write_text(f"{os.uname().nodename} {dead.pid}\n")
    messages = []
    with checkpoint.WorkdirLock(tmp_path, on_message=messages.append) as lock:
        assert (tmp_path / checkpoint.LOCK_FILE).read_text().split()[1] == str(os.getpid())
        assert lock.path == os.path.join(tmp_path, checkpoint.LOCK_FILE)
    assert len(messages) == 1 and f"pid {dead.pid}" in messages[0]
    assert "no longer running" in messages[0]


# ----------------------------------------------------------------------------- save errors


def test_save_errors_are_one_line(tmp_path, monkeypatch):
    manager = checkpoint.create_manager(tmp_path / "ck", async_save=False)

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ck" / "x"))
        except OSError as e:
            raise ValueError("tensorstore: write failed\n  long detail\n  more") from e

    monkeypatch.setattr(manager, "save", full)
    with pytest.raises(checkpoint.CheckpointIOError) as err:
        checkpoint.save(manager, 1, {"w": np.ones(2, np.float32)}, {"step": 1})
    message = str(err.value)
    assert message.startswith(f"Saving checkpoint step 1 to {tmp_path / 'ck'} failed: "
                              "No space left on device")
    assert "disk is full" in message and "\n" not in message
    assert "no checkpoint was completed" in message
    assert main._one_line(err.value) == message


def test_nan_from_a_huge_learning_rate_is_never_saved(tmp_path):
    config = tiny_config(learning_rate=1e39, checkpoint_every_steps=1, keep_checkpoints=10,
                         grad_clip_norm=0.0)
    with pytest.raises(train.NonFiniteLossError) as err:
        train.train_and_evaluate(config, tmp_path)
    assert "not saved" in str(err.value)
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    for step in steps:  # every saved state ("last good") is finite
        state = plain_state(tmp_path, step)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
                   if np.issubdtype(np.asarray(x).dtype, np.floating))
    if steps:
        assert f"last good checkpoint (step {steps[-1]})" in str(err.value)


def test_final_evaluation_failure_keeps_the_trained_state(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise data.DataError("the eval data went away")

    monkeypatch.setattr(train.loop, "evaluate", broken)
    with pytest.raises(data.DataError, match="went away"):
        train.train_and_evaluate(tiny_config(), tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6"]
    assert int(plain_state(tmp_path, 6)["step"]) == 6


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("flag, message", [
    ("--config.data.batch_size=0", "config.data.batch_size=0: must be >= 1"),
    ("--config.num_devices=64", "config.num_devices=64: num_devices=64 but 4 devices"),
    ("--config.num_devices=0", "config.num_devices=0: must be -1"),
])
def test_bad_configs_are_one_line(flag, message, tmp_path, monkeypatch, capsys):
    from absl import flags
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    argv = ["main", DIGITS, f"--workdir={tmp_path}", flag]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(REPO)
    main.parse_flags(argv, flag_values)
    assert main.main(["main"], flag_values) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1


def _png_header(width: int, height: int, color_type: int, bit_depth: int = 8) -> bytes:
    """A PNG that declares `width` x `height` (IHDR, a tiny IDAT of zeros, IEND)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    if color_type == 3:
        out += chunk(b"PLTE", bytes(range(256)) * 3)
    return out + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


HOSTILE = {
    "30000x30000 gray": (30000, 30000, 0),
    "13000x13000 palette": (13000, 13000, 3),
    "13000x13000 gray": (13000, 13000, 0),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_images_are_refused_before_decoding(kind, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(*HOSTILE[kind]))
    with pytest.raises(image_files.ImageFileError) as err:
        image_files.load_images([path], (8, 8, 1), (0.5,), (0.5,))
    assert "refused without decoding" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(image_files.ImageFileError):
        image_files.decode_image_bytes(path.read_bytes(), "bomb")


# Refuses each hostile image in a fresh process and prints how far its peak memory grew:
# this test process's own peak also moves with whatever its other threads (Orbax's,
# TensorFlow's) allocate meanwhile.
_REFUSE_IN_A_FRESH_PROCESS = """
import json, resource, sys
from attnflax.data import image_files
grown = {}
for path in sys.argv[1:]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for load in (lambda: image_files.load_images([path], (8, 8, 1), (0.5,), (0.5,)),
                 lambda: image_files.decode_image_bytes(open(path, "rb").read(), "bomb")):
        try:
            load()
        except image_files.ImageFileError:
            pass
        else:
            raise SystemExit(f"{path} was not refused")
    grown[path] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
print(json.dumps(grown))
"""


def test_hostile_images_take_no_memory(tmp_path):
    """Constant memory: nothing of a hostile image is decoded (peak RSS of a process that
    refuses all of them grows by less than 64 MiB each; decoding 13000x13000 would take
    161 MiB and more)."""
    paths = []
    for kind, header in HOSTILE.items():
        paths.append(tmp_path / f"{kind.replace(' ', '_')}.png")
        paths[-1].write_bytes(_png_header(*header))
    proc = subprocess.run([sys.executable, "-c", _REFUSE_IN_A_FRESH_PROCESS, *map(str, paths)],
                          cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(grown) == len(HOSTILE) and all(mib < 64 for mib in grown.values()), grown


def test_predict_refuses_a_bomb_in_one_line(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(30000, 30000, 0))
    proc = subprocess.run([sys.executable, "experiments/predict.py", f"--workdir={tmp_path}",
                           os.fspath(path)], cwd=REPO, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refused without decoding" in proc.stderr
    assert own_lines(proc.stderr) == [proc.stderr.strip().splitlines()[-1]]
    assert own_lines(proc.stderr)[0].startswith("predict.py: error:")


def _image_folder(root, bad_split=None, bad_bytes=None):
    for split, n in (("train", 4), ("test", 2)):
        for cls, level in (("a", 40), ("b", 200)):
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(n):
                Image.new("L", (10, 12), level).save(root / split / cls / f"{i}.png")
    if bad_split:
        (root / bad_split / "b" / "bad.png").write_bytes(bad_bytes)


def _folder_config(root, **kw):
    config = tiny_config(num_train_steps=2, data__batch_size=8, data__eval_batch_size=8,
                         **kw)
    config.data.dataset = "image_folder"
    config.data.data_dir = os.fspath(root)
    config.data.image_size = (8, 8)
    config.data.num_channels = 1
    return config


def test_corrupt_eval_image_is_found_before_training(tmp_path):
    root = tmp_path / "folder"
    buf = io.BytesIO()
    Image.new("L", (64, 64), 7).save(buf, format="PNG")
    _image_folder(root, "test", buf.getvalue()[:60])  # header intact, data cut off
    start = time.perf_counter()
    with pytest.raises(data.CorruptImageError) as err:
        train.train_and_evaluate(_folder_config(root), tmp_path / "run")
    assert err.value.paths == (os.fspath(root / "test" / "b" / "bad.png"),)
    assert "\n" not in str(err.value) and "split 'test'" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing lost
    assert time.perf_counter() - start < 60


def test_image_folder_refuses_an_image_over_the_pixel_budget(tmp_path):
    root = tmp_path / "folder"
    _image_folder(root, "train", _png_header(13000, 13000, 3))
    config = _folder_config(root).data
    with pytest.raises(data.DataError, match="refused without decoding") as err:
        next(data.create_train_iterator(config, num_devices=1, process_index=0,
                                        process_count=1))
    assert "bad.png" in str(err.value) and "169,000,000 pixels" in str(err.value)
    config.max_image_pixels = 200_000_000  # configurable
    config.image_size = (8, 8)
    data.get_dataset_info(config)


# ----------------------------------------------------------------------------- slow: processes

KILL_STEPS = 200
KILL_FLAGS = {**TINY, "num_train_steps": KILL_STEPS, "checkpoint_every_steps": 20,
              "log_every_steps": 5, "keep_checkpoints": 2}


def _start_main(workdir, values, cache_dir, num_devices=1, stdout=subprocess.PIPE):
    from train_testutil import _MAIN_SCRIPT
    return subprocess.Popen(
        [sys.executable, "-c", _MAIN_SCRIPT, DIGITS, f"--workdir={workdir}",
         *cli_flags(values)], cwd=REPO, env=subprocess_env(num_devices, cache_dir),
        stdout=stdout, stderr=subprocess.PIPE if stdout is subprocess.PIPE else stdout,
        text=True)


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("kill_reference")
    start = time.perf_counter()
    proc = run_main([DIGITS, f"--workdir={workdir}", *cli_flags(KILL_FLAGS)],
                    cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(workdir), time.perf_counter() - start


def _run_and_kill(workdir, cache_dir, log_path, *, at_step=None, after_seconds=None,
                  extra_delay=0.0) -> bool:
    """Starts the run and SIGKILLs it once it logs step `at_step` (plus `extra_delay`
    seconds: mid-step, mid-save), or `after_seconds` after its start (start-up, restore,
    compile) -- or at its first logged step if that comes sooner, so that a fast machine
    (a warm compile cache) cannot finish the run first. Returns whether it was killed
    (False: it finished first)."""
    with open(log_path, "w") as log:
        proc = _start_main(workdir, KILL_FLAGS, cache_dir, stdout=log)
    start = time.time()
    try:
        while proc.poll() is None:
            logged = re.findall(rf"\] +(\d+)/{KILL_STEPS}", log_path.read_text())
            if after_seconds is not None:
                due = time.time() - start >= after_seconds or bool(logged)
            else:
                due = bool(logged) and int(logged[-1]) >= at_step
            if due:
                time.sleep(extra_delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=60)
                    return True
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(
        seed, kill_reference, tmp_path, cache_dir):
    """Five SIGKILLs per seed: one during start-up, four at random steps (some right at
    a checkpoint boundary, while the asynchronous save is being written)."""
    reference, _ = kill_reference
    rng = random.Random(seed)
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    kills = int(_run_and_kill(workdir, cache_dir, log, after_seconds=rng.uniform(1.0, 8.0)))
    for target in sorted(rng.sample(range(5, KILL_STEPS, 5), 4)):
        kills += _run_and_kill(workdir, cache_dir, log, at_step=target,
                               extra_delay=rng.choice([0.0, rng.uniform(0.0, 0.3)]))
    proc = _start_main(workdir, KILL_FLAGS, cache_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results = read_results(workdir)
    assert kills == 5
    assert results["params_sha256"] == reference["params_sha256"]
    assert results["test_accuracy"] == reference["test_accuracy"]
    print(f"seed {seed}: {kills} SIGKILLs survived bitwise (resumed from step "
          f"{results['resumed_from_step']})")


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(CORRUPTIONS))
def test_command_line_recovers_from_each_corruption(mode, saved, tmp_path, cache_dir):
    workdir, results = saved
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    CORRUPTIONS[mode](tmp_path / "checkpoints" / "6")
    proc = run_main([DIGITS, f"--workdir={tmp_path}", *cli_flags({**TINY, **SAVES})],
                    num_devices=4, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    warnings = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step 6" in warnings[0], proc.stdout
    assert read_results(tmp_path)["params_sha256"] == results["params_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("same_seed", [True, False])
def test_two_runs_on_one_workdir(same_seed, tmp_path, cache_dir):
    """The second run refuses in one line naming the first; the first is not disturbed
    (stopped by SIGTERM, it saves and its checkpoint verifies); nothing hangs."""
    workdir = tmp_path / "run"
    long_run = {**TINY, "num_train_steps": 100_000, "checkpoint_every_steps": 50,
                "log_every_steps": 1000}
    with open(tmp_path / "first.log", "w") as log:
        first = _start_main(workdir, long_run, cache_dir, stdout=log)
        try:
            deadline = time.time() + 120
            while not (workdir / "checkpoints").exists() and time.time() < deadline:
                time.sleep(0.05)
            second = _start_main(workdir, {**long_run, "seed": 0 if same_seed else 1},
                                 cache_dir)
            _, err2 = second.communicate(timeout=180)
            assert first.poll() is None, "the first run should still be training"
            assert second.returncode == 1 and "Traceback" not in err2
            assert own_lines(err2) == [own_lines(err2)[-1]]
            line = own_lines(err2)[-1]
            assert line.startswith("error: The workdir") and f"pid {first.pid}" in line
            assert "in use by another run" in line
        finally:
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=180)
    assert first.returncode == 128 + signal.SIGTERM
    steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints"))
    assert steps and all(n.isdigit() for n in os.listdir(workdir / "checkpoints"))
    checkpoint.verify_files(workdir / "checkpoints", steps[-1])
    assert not (workdir / checkpoint.LOCK_FILE).exists()


def _tmpfs(path, size):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs here ({proc.stderr.strip()}); needs root")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["3m", "1m"])
def test_full_disk_is_one_line_and_resumes_bitwise(size, tmp_path, cache_dir):
    values = {**TINY, "num_train_steps": 60, "checkpoint_every_steps": 2,
              "keep_checkpoints": 100, "keep_best_checkpoints": 0}  # > 3 MiB in all
    reference = tmp_path / "reference"
    proc = run_main([DIGITS, f"--workdir={reference}", *cli_flags(values)], cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    disk = tmp_path / "disk"
    _tmpfs(disk, size)
    try:
        proc = run_main([DIGITS, f"--workdir={disk / 'run'}", *cli_flags(values)],
                        cache_dir=cache_dir, timeout=240)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and ("No space left on device" in errors[0]
                                     or "disk is full" in errors[0]), proc.stderr[-3000:]
        # What was saved is intact; the run resumes elsewhere and ends bitwise equal.
        shutil.copytree(disk / "run", tmp_path / "resumed")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    proc = run_main([DIGITS, f"--workdir={tmp_path / 'resumed'}", *cli_flags(values)],
                    cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (read_results(tmp_path / "resumed")["params_sha256"]
            == read_results(reference)["params_sha256"])
