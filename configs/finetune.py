"""Stage 2 (finetune): question/answer data, template `llama`; runs stage 1 first unless `init_from` is set.

    python train.py --config configs/finetune.py --workdir /tmp/qtl          # tiny preset, CPU
    python train.py --config configs/finetune.py:preset=paper --workdir ...  # the paper's recipe
"""

from configs.common import parse_arg, training_config


def get_config(arg: str | None = None):
    args = parse_arg(arg, preset="tiny")
    config = training_config("finetune", args.preset)
    # Stage 1, run first when init_from is empty. Its model, compressor and split sections and the shared data
    # fields (data_dir, tokenizer, buckets, ...) follow this config's: set them once, on the command line of the
    # whole recipe. Its own: data.annotation_file, data.image_root, data.template (e.g.
    # --config.stage1.data.image_root=...) and the optimizer (--config.stage1.optim.lr=...); see
    # qtl_jax.trainer.stage1_config.
    config.stage1 = training_config("pretrain", args.preset)
    return config
