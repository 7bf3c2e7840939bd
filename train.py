"""Entry point: `python train.py --config configs/finetune.py[:preset=paper] --workdir DIR [--config.x=y ...]`.

Flags -> `qtl_jax.trainer.train_and_evaluate(config, workdir)`; everything else lives there.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py", "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where checkpoints, metrics and the summary go.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    import jax

    from qtl_jax.split.runtime import SplitConfig

    # On a CPU-only machine, give the two meshes their virtual devices (before JAX starts its backend);
    # accelerators are unaffected by this setting.
    jax.config.update("jax_num_cpu_devices", SplitConfig.from_config(_CONFIG.value.split).num_devices)
    from qtl_jax.trainer import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
