"""Tests for attnflax.parallel: job detection, meshes, global batches, FSDP layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnflax import parallel


def test_single_process_without_env():
    spec = parallel.job_spec_from_env(environ={})
    assert not spec.is_multiprocess
    assert parallel.initialize_from_env() is False  # conftest sets no job variables


def test_explicit_env_variables():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    spec = parallel.job_spec_from_env(environ=env)
    assert spec == parallel.JobSpec("10.0.0.1:1234", 4, 3)
    # Flags win over the environment.
    spec = parallel.job_spec_from_env(num_processes=2, process_id=1, environ=env)
    assert (spec.num_processes, spec.process_id) == (2, 1)


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"},
        {"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"},
    ],
)
def test_cluster_auto_detection(env):
    assert parallel.job_spec_from_env(environ=env) == parallel.JobSpec(auto_detect=True)


def test_single_task_cluster_runs_alone():
    assert not parallel.job_spec_from_env(
        environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}
    ).is_multiprocess


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=2),
            r"process_id must be in \[0, 1\]",
        ),
        (dict(coordinator_address="h:1", num_processes=2), "process_id must be in"),
        (dict(num_processes=0, process_id=0), "num_processes must be a positive"),
        (dict(num_processes=2, process_id=0), "coordinator address"),
    ],
)
def test_inconsistent_job_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parallel.job_spec_from_env(environ={}, **kwargs)


def test_malformed_env_variable():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        parallel.job_spec_from_env(environ={"JAX_NUM_PROCESSES": "two"})


def test_mesh_over_all_and_some_devices():
    assert parallel.create_mesh().shape == {"data": jax.device_count()}
    assert parallel.create_mesh(num_devices=2).devices.tolist() == jax.devices()[:2]
    mesh = parallel.create_mesh(mesh_shape=(-1, 2), axis_names=("data", "model"))
    assert mesh.shape == {"data": 2, "model": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_devices=5), r"num_devices=5 but 4 devices"),
        (dict(mesh_shape=(3,)), r"needs 3 devices but 4"),
        (dict(mesh_shape=(-1, 3), axis_names=("data", "model")), "does not divide 4"),
        (dict(mesh_shape=(-1, -1), axis_names=("data", "model")), "at most one -1"),
    ],
)
def test_bad_mesh(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parallel.create_mesh(**kwargs)


def test_host_to_global_shards_the_batch():
    mesh = parallel.create_mesh()
    batch = {
        "image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
        "label": np.arange(8, dtype=np.int32),
    }
    out = parallel.host_to_global(batch, mesh)
    assert out["image"].shape == (8, 3)
    assert out["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert [s.data.shape for s in out["image"].addressable_shards] == [(2, 3)] * 4
    np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])


def test_fsdp_shards_large_leaves_only():
    mesh = parallel.create_mesh()
    state = {
        "big": jax.ShapeDtypeStruct((64, 128), jnp.float32),
        "odd": jax.ShapeDtypeStruct((4099,), jnp.float32),
        "small": jax.ShapeDtypeStruct((16,), jnp.float32),
    }
    rep = parallel.state_shardings(state, mesh)
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(rep))
    fsdp = parallel.state_shardings(state, mesh, fsdp=True, min_fsdp_size=1024)
    assert fsdp["big"].spec == jax.sharding.PartitionSpec(None, "data")
    assert fsdp["odd"].spec == jax.sharding.PartitionSpec()  # 4099 not divisible by 4
    assert fsdp["small"].spec == jax.sharding.PartitionSpec()


def test_fsdp_gives_the_same_loss_curve_and_parameters_as_replicated(tmp_path):
    """6 steps on 4 devices: FSDP-sharded state vs replicated state, same numbers."""
    import json

    import orbax.checkpoint as ocp
    from train_testutil import tiny_config

    from attnflax import data, train

    config = tiny_config(checkpoint_every_steps=6)
    mesh = parallel.create_mesh(4)
    model = train.create_model(config, 10)
    tx, _ = train.create_optimizer(config, 6, 0)
    info = data.get_dataset_info(config.data)
    _, shardings = train.create_train_state(model, tx, info.image_shape, 0, mesh, fsdp=True)
    sharded = [
        s for s in jax.tree.leaves(shardings.params) if s.spec != jax.sharding.PartitionSpec()
    ]
    assert sharded, "the tiny model should have at least one FSDP-sharded parameter"

    curves, params = {}, {}
    for fsdp in (False, True):
        config.fsdp = fsdp
        workdir = tmp_path / f"fsdp_{fsdp}"
        train.train_and_evaluate(config, workdir)
        lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        curves[fsdp] = [x["train/loss"] for x in lines if "train/loss" in x]
        params[fsdp] = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "6" / "state")[
            "params"
        ]
    assert len(curves[True]) == 3
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params[False]), jax.tree.leaves(params[True]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
