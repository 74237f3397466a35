"""Test set-up: eight fake CPU devices, so sharding is exercised without accelerators.

XLA reads the flag when JAX initialises its backend, so it is set here, before any test module
imports jax.
"""

import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    """One compilation cache for the session (`JAX_COMPILATION_CACHE_DIR`, unless set), shared
    by the xdist workers and the processes tests start (`serve.py`, multi-host workers), which
    inherit the environment: most of the suite's time was compiling the same tiny-model programs
    again in every file and process. Programs that compile in under 0.3 s are not worth a file."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    config._dreamr_xla_cache = tempfile.mkdtemp(prefix="dreamr_jax_test_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._dreamr_xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def pytest_unconfigure(config):
    folder = getattr(config, "_dreamr_xla_cache", None)
    if folder:  # the process that made it (the xdist controller), after every worker is done
        shutil.rmtree(folder, ignore_errors=True)
