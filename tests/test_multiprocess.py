"""Same numbers on any layout: 1 device, 4 devices, and 2 processes x 2 devices.

Each run is the real main job (``python -m attnflax.main``) in subprocesses on
localhost, with forced CPU devices and Gloo collectives. A tiny budget (6 steps of
16 images on the embedded digits) keeps the whole file to a couple of minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
TINY = [
    f"--config={ROOT / 'experiments/configs/digits.py'}",
    "--config.data.batch_size=16",
    "--config.data.eval_batch_size=40",
    "--config.log_every_steps=3",
    "--config.checkpoint_every_steps=3",
    "--config.async_checkpointing=False",
]
TIMEOUT = 240


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    if "ATTNFLAX_TEST_COMPILE_CACHE" in os.environ:
        env.update(JAX_COMPILATION_CACHE_DIR=os.environ["ATTNFLAX_TEST_COMPILE_CACHE"],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir: Path, steps: int, devices: int, process: int | None = None,
           num_processes: int = 1, port: int = 0, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = _env(devices, ATTNFLAX_HEARTBEAT_TIMEOUT_SECONDS="10")
    if process is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process))
    cmd = [sys.executable, "-m", "attnflax.main", f"--workdir={workdir}", *TINY,
           f"--config.num_train_steps={steps}", *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[str]:
    """Waits for every process; on a timeout kills them all. Returns their outputs."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outputs


def run_single(workdir: Path, steps: int = STEPS, devices: int = 1) -> str:
    (out,) = _finish([_start(workdir, steps, devices)])
    assert "Test accuracy" in out, out[-3000:]
    return out


def run_multi(workdir: Path, steps: int = STEPS, n: int = 2, devices: int = 2) -> list[str]:
    port = _free_port()
    procs = [_start(workdir, steps, devices, i, n, port) for i in range(n)]
    outputs = _finish(procs)
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    return outputs


def saved_params(workdir: Path, step: int = STEPS):
    """Params read with plain Orbax onto one device of this process.

    A checkpoint written by a multi-process job records shardings over devices this
    process does not have; Orbax then needs a target or, as here, a fallback sharding.
    """
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
        workdir / "checkpoints" / str(step) / "state",
        args=ocp.args.StandardRestore(fallback_sharding=one_device))
    return state["params"]


def results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def fingerprints(outputs: list[str]) -> list[str]:
    found = [line.split("params sha256 ")[1].split()[0]
             for out in outputs for line in out.splitlines() if "params sha256 " in line]
    assert len(found) == len(outputs), outputs
    return found


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One persistent XLA compile cache for every subprocess of this module."""
    path = tmp_path_factory.mktemp("xla_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNFLAX_TEST_COMPILE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The same 6-step run on 1 device, 4 devices and 2 processes x 2 devices."""
    base = tmp_path_factory.mktemp("layouts")
    runs = {"1x1": base / "1x1", "1x4": base / "1x4", "2x2": base / "2x2"}
    run_single(runs["1x1"], devices=1)
    run_single(runs["1x4"], devices=4)
    runs["2x2_outputs"] = run_multi(runs["2x2"])
    return runs


@pytest.mark.slow  # the layouts (~75 s here) keep `make test` near 10 min: `make test-slow`
def test_same_parameters_and_accuracy_on_every_layout(layouts):
    reference = saved_params(layouts["1x1"])
    for name in ("1x4", "2x2"):
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(saved_params(layouts[name])),
                        strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-5,
                                       err_msg=name)
    accuracies = {name: results(layouts[name])["test_accuracy"] for name in ("1x1", "1x4", "2x2")}
    assert len(set(accuracies.values())) == 1, accuracies
    for name in ("1x1", "1x4", "2x2"):
        r = results(layouts[name])
        assert r["test_examples"] == 360 and r["train_steps"] == STEPS, (name, r)
    assert results(layouts["2x2"])["processes"] == 2
    assert results(layouts["2x2"])["devices"] == 4


@pytest.mark.slow
def test_both_processes_hold_identical_parameters(layouts):
    a, b = fingerprints(layouts["2x2_outputs"])
    assert a == b


@pytest.mark.slow
def test_joint_checkpoint_resumes_in_one_process(layouts, tmp_path):
    workdir = tmp_path / "from_2x2"
    shutil.copytree(layouts["2x2"], workdir)
    run_single(workdir, steps=STEPS + 3, devices=1)
    r = results(workdir)
    assert (r["resumed_from_step"], r["train_steps"], r["processes"]) == (STEPS, STEPS + 3, 1)


@pytest.mark.slow  # ~40 s here: `make test-slow` (CI runs it after `make test`)
def test_single_process_checkpoint_resumes_in_two_processes(layouts, tmp_path):
    workdir = tmp_path / "from_1x1"
    shutil.copytree(layouts["1x1"], workdir)
    run_multi(workdir, steps=STEPS + 3)
    r = results(workdir)
    assert (r["resumed_from_step"], r["train_steps"], r["processes"]) == (STEPS, STEPS + 3, 2)


@pytest.mark.slow  # ~90 s here: `make test-slow` (CI runs it after `make test`)
def test_dead_process_stops_the_job_and_a_restart_resumes(tmp_path):
    workdir = tmp_path / "killed"
    port = _free_port()
    long_run = 2000
    procs = [_start(workdir, long_run, 1, i, 2, port) for i in range(2)]
    try:
        # Wait for the first checkpoint (step 3), then kill process 1 hard.
        deadline = time.monotonic() + TIMEOUT
        while not (workdir / "checkpoints" / "3").exists():
            assert time.monotonic() < deadline, "no checkpoint was written"
            assert all(p.poll() is None for p in procs), _finish(procs)
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = procs[0].communicate(timeout=90)
        assert procs[0].returncode != 0, out[-2000:]
        assert time.monotonic() - killed_at < 90
    finally:
        _finish(procs, timeout=5)
    run_multi(workdir, steps=9)
    r = results(workdir)
    assert r["resumed_from_step"] >= 3 and r["train_steps"] == 9


def test_unreachable_coordinator_fails_fast_naming_the_address(tmp_path):
    port = _free_port()
    env = _env(1, ATTNFLAX_INIT_TIMEOUT_SECONDS="3", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "attnflax.main", f"--workdir={tmp_path}", *TINY],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"localhost:{port}" in proc.stderr and "coordinator" in proc.stderr
    assert time.monotonic() - start < 45


@pytest.mark.parametrize("env, match", [
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, r"process_id must be in \[0, 1\]"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
])
def test_inconsistent_process_settings_are_rejected(tmp_path, env, match):
    import re

    proc = subprocess.run(
        [sys.executable, "-m", "attnflax.main", f"--workdir={tmp_path}", *TINY],
        env=_env(1, **env), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert re.search(match, proc.stderr), proc.stderr[-2000:]
