"""Test setup: 8 virtual CPU devices, set before any JAX computation initialises the backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)
