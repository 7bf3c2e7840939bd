"""Test setup: 8 virtual CPU devices, set before any JAX computation initialises the backend."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs recompile in many tests (every trainer run builds new step functions, the pytest-xdist
# workers run the same session fixtures, restarted server and client processes compile what they compiled
# before): one persistent compilation cache for the whole test run turns the repeats into disk reads. Set in
# the environment, so that the processes the tests start (servers, clients, sweeps, notebook kernels) share it.
# JAX treats an unreadable entry (one being written by another process) as a miss.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one `pytest -n` run
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"qtl_jax_xla_cache_{_RUN}")
                      if _RUN else tempfile.mkdtemp(prefix="qtl_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite is bound by XLA:CPU compile time (hundreds of small programs, each run a few times): LLVM's backend
# optimisations took a sixth of its CPU time (2,128 s -> 1,787 s user, 18:40 -> 15:55 on 2 cores without them) and
# buy nothing at these sizes. JAX's switch for tests turns
# them off: XLA's HLO passes (fusion, layouts, sharding) still run, only the machine code is less optimised, so a
# value may round differently in its last bit than in an optimised build; no assertion depends on that, as the
# programs compared within a test are compiled alike. In the environment, so the processes the tests start
# inherit it; `JAX_DISABLE_MOST_OPTIMIZATIONS=0 make test` runs the suite with the compiler settings users get.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


import pytest  # noqa: E402


def smoke_config(tmp_path_factory, stage="finetune", arg=None, **overrides):
    """The tiny preset on the smoke-sized Shapes-VQA, 3 steps a stage (stage 0 too, when on), one bucket, 8 examples
    evaluated, 2 + 4 devices; `overrides` as {"section.field": value}.
    The tfds folder is shared by the session (generated once)."""
    from configs.finetune import get_config as finetune_config
    from configs.pretrain import get_config as pretrain_config

    config = (finetune_config if stage == "finetune" else pretrain_config)(arg)
    config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    config.data.shapes_config = "smoke"
    # One padded length (every smoke prompt fits in 64): each stage compiles its step once, not once per bucket;
    # the bucketing itself is tested in tests/data/test_pipeline.py and tests/test_evaluate.py.
    config.data.buckets = (64,)
    config.optim.batch_size = 4
    config.optim.min_steps = 0  # the steps follow the (tiny) data: tests count them
    if "stage1" in config:
        config.stage1.optim.batch_size = 4
        config.stage1.optim.min_steps = 0
    config.optim.max_steps = 3  # stage 0 too
    config.tower.batch_size = 8  # the smoke set has 32 captions
    config.log_every = 1
    config.eval.max_examples = 8
    config.eval.batch_size = 8
    config.split.client_mesh = (2, 1, 1)
    config.split.server_mesh = (1, 2, 2)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        node = config
        for name in filter(None, section.split(".")):
            node = node[name]
        node[field] = value
    return config


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Both stages of `smoke_config`, meshes mode, trained once per session: (workdir, summary).
    Tests that read a trained run (trainer, evaluation, probe, notebooks, privacy) share it; none may modify it."""
    from qtl_jax import trainer

    workdir = tmp_path_factory.mktemp("run")
    return workdir, trainer.train_and_evaluate(smoke_config(tmp_path_factory), str(workdir))
