"""Test setup: 8 virtual CPU devices, set before any JAX computation initialises the backend."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)
# Identical programs recompile in many tests (every trainer run builds new step functions): a persistent
# compilation cache for the session turns the repeats into disk reads.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="qtl_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
