"""Test session set-up: a CPU-only JAX with 4 forced devices, quiet TensorFlow.

The environment must be set before JAX (or TensorFlow) is first imported, which is
why it lives here rather than in a fixture. Multi-device tests rely on
``jax.device_count() == 4``; single-device code simply uses one of them.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
