"""Devices and hosts: joining a multi-process job, the device mesh, global batches.

attnflax is data parallel over a ``("data",)`` mesh axis that spans every device of
every process. JAX's multi-controller runtime does the work: one Python process
per host, :func:`jax.distributed.initialize` to join the job, collectives over
ICI/NCCL (or Gloo on CPU). This module only decides *when* to join and lays the
arrays out:

* :func:`initialize_from_env` joins a job when the flags or the environment say
  this process is one of several (explicit ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, SLURM with more than one task, a
  multi-host TPU VM) and does nothing for a single process.
* :func:`create_mesh` builds the mesh; :func:`batch_sharding` and
  :func:`replicated` are its two layouts; :func:`state_shardings` lays out a
  train state (replicated, or FSDP-style with large leaves split over ``data``).
* :func:`host_to_global` turns each process's numpy batch into one global
  ``jax.Array`` sharded over ``data``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """How this process joins a job: explicit coordinates, auto-detection, or alone."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto_detect: bool = False

    @property
    def is_multiprocess(self) -> bool:
        return self.auto_detect or (self.num_processes or 1) > 1


def job_spec_from_env(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobSpec:
    """Works out from flags and environment whether this is a multi-process job.

    Flags win over the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Without either, a SLURM job step
    with several tasks or a TPU VM with several workers is left to JAX's own
    cluster auto-detection.

    Raises:
      ValueError: inconsistent counts or ids, or a missing coordinator address.
    """
    env = os.environ if environ is None else environ

    def from_env(value: Any, name: str, cast: type) -> Any:
        if value is not None:
            return value
        raw = env.get(name)
        if raw in (None, ""):
            return None
        try:
            return cast(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}.") from None

    address = from_env(coordinator_address, "JAX_COORDINATOR_ADDRESS", str)
    count = from_env(num_processes, "JAX_NUM_PROCESSES", int)
    pid = from_env(process_id, "JAX_PROCESS_ID", int)

    if address is None and count is None and pid is None:
        slurm_tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
        tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
        if ("SLURM_JOB_ID" in env and slurm_tasks > 1) or len(tpu_hosts) > 1:
            return JobSpec(auto_detect=True)
        return JobSpec()

    if count is None or count < 1:
        raise ValueError(
            f"num_processes must be a positive integer for a multi-process job; got {count}. "
            "Set --num_processes or JAX_NUM_PROCESSES."
        )
    if count == 1 and address is None:
        return JobSpec(num_processes=1, process_id=0 if pid is None else pid)
    if pid is None or not 0 <= pid < count:
        raise ValueError(
            f"process_id must be in [0, {count - 1}] for num_processes={count}; got {pid}. "
            "Set --process_id or JAX_PROCESS_ID (0 on the coordinator host)."
        )
    if not address:
        raise ValueError(
            f"A {count}-process job needs a coordinator address (host:port of process 0); "
            "set --coordinator_address or JAX_COORDINATOR_ADDRESS."
        )
    return JobSpec(address, count, pid)


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Blocks until ``host:port`` accepts TCP connections, for at most ``timeout`` s.

    JAX's own client aborts the process with a fatal error when the coordinator
    cannot be reached; checking first lets the error name the address.

    Raises:
      RuntimeError: the address is malformed or nothing answered in time.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RuntimeError(f"Coordinator address {address!r} must look like host:port.")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            last_error = e
            time.sleep(0.5)
    raise RuntimeError(
        f"Could not reach the coordinator at {address} within {timeout:g}s ({last_error}). "
        "Check that process 0 of the job is running, that this host can reach that address "
        "and port, and that every process was given the same address."
    )


def initialize_from_env(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int | None = None,
    heartbeat_timeout_seconds: int | None = None,
) -> bool:
    """Joins JAX's distributed runtime when this process is part of a larger job.

    Call it once, before any other JAX call. On CPU it selects Gloo collectives so
    multi-process CPU jobs can all-reduce. A process that cannot reach the
    coordinator fails after ``initialization_timeout`` seconds with a message that
    names the address; once running, a process whose peer died errors out after
    about ``heartbeat_timeout_seconds`` instead of hanging. The two timeouts default
    to ``ATTNFLAX_INIT_TIMEOUT_SECONDS`` (120) and ``ATTNFLAX_HEARTBEAT_TIMEOUT_SECONDS``
    (30) from the environment.

    Returns:
      True when a multi-process job was joined, False for a single process.
    """
    spec = job_spec_from_env(coordinator_address, num_processes, process_id)
    if initialization_timeout is None:
        initialization_timeout = int(os.environ.get("ATTNFLAX_INIT_TIMEOUT_SECONDS", 120))
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = int(os.environ.get("ATTNFLAX_HEARTBEAT_TIMEOUT_SECONDS", 30))
    if not spec.is_multiprocess:
        return False
    if jax.distributed.is_initialized():
        return True
    if spec.coordinator_address and spec.process_id:
        wait_for_coordinator(spec.coordinator_address, initialization_timeout)
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms.split(",")[0] in ("", "cpu"):
        # Harmless on GPU/TPU (only the CPU client reads it), required on CPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the address named
        where = spec.coordinator_address or "the auto-detected coordinator"
        raise RuntimeError(
            f"Could not join the distributed job at {where} as process "
            f"{spec.process_id} of {spec.num_processes} within {initialization_timeout}s: {e}. "
            "Check that process 0 is running, that the address is reachable from this host, "
            "and that every process uses the same address and process count."
        ) from e
    logging.info(
        "Joined job: process %d of %d, %d local / %d global devices.",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def create_mesh(num_devices: int = -1, mesh_shape: tuple[int, ...] = (-1,),
                axis_names: tuple[str, ...] = (DATA_AXIS,)) -> Mesh:
    """A device mesh over the first ``num_devices`` devices (-1: all, on all hosts).

    ``mesh_shape`` may hold one -1 that absorbs the remaining devices; the default is
    the 1-D ``("data",)`` mesh. A multi-process job always uses every device.

    Raises:
      ValueError: a device count or mesh shape that does not fit the devices.
    """
    devices = jax.devices()
    if num_devices not in (-1, None):
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"num_devices={num_devices} but {len(devices)} devices are available; "
                f"use -1 (all) or a number in [1, {len(devices)}]."
            )
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(
                f"num_devices={num_devices} in a {jax.process_count()}-process job: every "
                f"device must take part; use -1 (all {len(devices)})."
            )
        devices = devices[:num_devices]
    if len(mesh_shape) != len(axis_names):
        raise ValueError(f"mesh_shape {mesh_shape} and axis_names {axis_names} differ in length.")
    shape = list(mesh_shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape {tuple(mesh_shape)} may contain at most one -1.")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"mesh_shape {tuple(mesh_shape)} does not divide {len(devices)} devices."
            )
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh_shape {tuple(mesh_shape)} needs {int(np.prod(shape))} devices but "
            f"{len(devices)} are in use; the product of the shape must equal the device count."
        )
    return Mesh(np.asarray(devices).reshape(shape), axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over ``data``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global arrays sharded over ``data``.

    Each process passes its own ``[global_batch // process_count, ...]`` slice; the
    result has the global batch as its leading dimension.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def _fsdp_spec(shape: tuple[int, ...], n: int, min_size: int) -> PartitionSpec:
    """Shards the largest axis that ``n`` divides, for leaves of at least ``min_size``."""
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool = False,
                    min_fsdp_size: int = 2**12) -> Any:
    """Shardings for a train state (a pytree of arrays or ``ShapeDtypeStruct``).

    Default: everything replicated. With ``fsdp``, every leaf of at least
    ``min_fsdp_size`` elements is split over ``data`` along its largest divisible
    axis (parameters and optimiser moments alike); XLA inserts the all-gathers and
    reduce-scatters, and the numbers stay those of the replicated run.
    """
    n = mesh.shape[DATA_AXIS]

    def leaf(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        spec = _fsdp_spec(shape, n, min_fsdp_size) if fsdp else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(leaf, abstract_state)


def fingerprint(tree: Any, mesh: Mesh) -> str:
    """SHA-256 of a pytree's values as this process holds them (a collective call).

    The tree is first laid out replicated (an all-gather for sharded leaves), so every
    process hashes full arrays: in a multi-process job equal fingerprints on all
    processes mean every process holds identical values.
    """
    import hashlib

    full = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(full):
        digest.update(np.ascontiguousarray(np.asarray(leaf.addressable_data(0))).tobytes())
    return digest.hexdigest()


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (collective in multi-process jobs)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
